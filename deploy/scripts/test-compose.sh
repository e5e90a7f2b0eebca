#!/usr/bin/env bash
# `make test-compose`: an engine, the images, then pytest tests/compose (extra arguments go to
# pytest). Prints how long each setup step took. Stops the engine only if this run started it;
# the images stay cached for the next run.
# shellcheck source=deploy/scripts/lib.sh
source "$(dirname "$0")/lib.sh"

scripts=deploy/scripts
started_engine=false
engine_answers || started_engine=true
cleanup() { if $started_engine; then "$scripts/docker-teardown.sh"; fi; }
trap cleanup EXIT

timed() {
    local start=$SECONDS
    "$scripts/$1.sh"
    log "$1: $((SECONDS - start)) s"
}
setup_start=$SECONDS
timed docker-setup
timed base-image
timed infra-images
timed wheelhouse
timed image
log "setup total: $((SECONDS - setup_start)) s"

export DF_NATS_IMAGE="$NATS_LOCAL_IMAGE" DF_REDIS_IMAGE="$REDIS_LOCAL_IMAGE" DF_IMAGE="$PROJECT_IMAGE"
"$PYTHON" -m pytest tests/compose "$@"
