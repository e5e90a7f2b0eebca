#!/usr/bin/env bash
# Builds the local base image (Debian bookworm with python3.11) with debootstrap, because no
# image registry is reachable here. Cached by tag: an existing image is kept.
# shellcheck source=deploy/scripts/lib.sh
source "$(dirname "$0")/lib.sh"

if image_exists "$BASE_IMAGE_TAG"; then
    log "$BASE_IMAGE_TAG exists; keeping it"
    exit 0
fi
rootfs="$(mktemp -d /var/tmp/df-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
# wget serves the nats image's health check (the same command the official -alpine image runs).
log "debootstrap bookworm into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,wget,ca-certificates \
    bookworm "$rootfs" ${DF_DEBIAN_MIRROR:+"$DF_DEBIAN_MIRROR"} >"$rootfs.log" 2>&1 \
    || { tail -n 30 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
log "importing as $BASE_IMAGE_TAG"
tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$BASE_IMAGE_TAG" >/dev/null
