#!/usr/bin/env bash
# Fills wheelhouse/ with wheels of the project and every pinned dependency (plus the build
# backend), so deploy/Dockerfile can install with no index at all.
source "$(dirname "$0")/lib.sh"

mkdir -p wheelhouse
log "pip wheel . setuptools -> wheelhouse/"
"$PYTHON" -m pip wheel -q -w wheelhouse . "setuptools>=68" wheel
# pip picks the highest matching torch; the CPU build (2.13.0+cpu) must win over the CUDA one.
torch_wheels=(wheelhouse/torch-*.whl)
case "${torch_wheels[*]}" in
    *+cpu*) ;;
    *) log "warning: no CPU torch wheel in wheelhouse/ (${torch_wheels[*]}); the image will be large" ;;
esac
du -sh wheelhouse >&2
