#!/usr/bin/env bash
# Fills wheelhouse/ with wheels of the project and every pinned dependency (plus the build
# backend), so deploy/Dockerfile can install with no index at all. Dependencies are resolved
# again only when pyproject.toml changed since the last run; the project wheel every time.
# shellcheck source=deploy/scripts/lib.sh
source "$(dirname "$0")/lib.sh"

# Environment markers are evaluated against the interpreter that runs pip, so resolve with the
# image's own Python version: Debian bookworm's /usr/bin/python3 (3.11.2) is the one in the
# debootstrap base, and it needs wheels that a newer 3.11 skips (async-timeout for redis).
wheelhouse_python="${WHEELHOUSE_PYTHON:-/usr/bin/python3}"
stamp=wheelhouse/.resolved-from
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1) $("$wheelhouse_python" --version)"
mkdir -p wheelhouse
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    log "dependencies unchanged since the last run: project wheel only"
    "$wheelhouse_python" -m pip wheel -q --no-deps -w wheelhouse .
    exit 0
fi
log "$("$wheelhouse_python" --version): pip wheel . setuptools -> wheelhouse/"
"$wheelhouse_python" -m pip wheel -q -w wheelhouse . "setuptools>=68" wheel
# pip picks the highest matching torch; the CPU build (2.13.0+cpu) must win over the CUDA one.
torch_wheels=(wheelhouse/torch-*.whl)
case "${torch_wheels[*]}" in
    *+cpu*) ;;
    *) log "warning: no CPU torch wheel in wheelhouse/ (${torch_wheels[*]}); the image will be large" ;;
esac
echo "$wanted" >"$stamp"
du -sh wheelhouse >&2
