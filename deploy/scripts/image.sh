#!/usr/bin/env bash
# Builds the project image from deploy/Dockerfile on the given base (the local debootstrap one
# by default here) with the docker CLI of the local stand-in (infra-images.sh); deploy/Dockerfile
# installs from wheelhouse/ when that holds wheels.
# shellcheck source=deploy/scripts/lib.sh
source "$(dirname "$0")/lib.sh"

base="${DF_BUILD_BASE_IMAGE:-$BASE_IMAGE_TAG}"
docker_cli="${DF_BUILD_DOCKER_CLI_IMAGE:-$DOCKER_CLI_LOCAL_IMAGE}"
log "building $PROJECT_IMAGE on $base"
docker build -q --build-arg "BASE_IMAGE=$base" --build-arg "DOCKER_CLI_IMAGE=$docker_cli" \
    -t "$PROJECT_IMAGE" -f deploy/Dockerfile . >/dev/null
docker image ls "$PROJECT_IMAGE" >&2
