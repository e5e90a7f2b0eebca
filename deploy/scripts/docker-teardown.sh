#!/usr/bin/env bash
# Stops the engine docker-setup.sh started, if it started one; images stay cached in its data root.
# shellcheck source=deploy/scripts/lib.sh
source "$(dirname "$0")/lib.sh"

pidfile="$STATE_DIR/dockerd.pid"
[[ -f "$pidfile" ]] || { log "no engine of ours to stop"; exit 0; }
pid="$(cat "$pidfile")"
if kill -0 "$pid" 2>/dev/null; then
    log "stopping dockerd $pid"
    kill -TERM "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && { log "dockerd $pid still running after 30 s"; exit 1; }
fi
rm -f "$pidfile"
