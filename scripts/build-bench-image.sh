#!/usr/bin/env bash
# Builds (once) and caches a real Debian bookworm OCI image for naiad's startup
# benchmark. Usage: scripts/build-bench-image.sh NAME, NAME one of:
#
#   minbase  layers: debootstrap minbase; /etc/naiad-bench-release
#            cmd: bash -c 'ls /'
#   python3  layers: debootstrap minbase; apt-get install python3; release file
#            cmd: python3 -c 'print(1)'
#   nodejs   layers: ...; apt-get install nodejs; release file
#            cmd: node -e 'console.log(1)'
#   numpy    layers: ...; apt-get install python3 python3-numpy; release file
#            cmd: python3 -c 'import numpy'
#
# Output, under ${NAIAD_FIXTURES:-/tmp/naiad-fixtures}/bench-NAME/: layout/ (OCI
# image layout, tag "latest", gzip layers, made by umoci) and COMPLETE (marker,
# written last). The last line printed is `layout: PATH`. The debootstrap
# result is cached once as $FIXTURES/.bench-base-rootfs.tar and reused (delete
# it to rebuild). Work is done in a staging directory renamed at the end, so an
# interrupted build never looks complete. Run as root.
set -euo pipefail

FIXTURES=${NAIAD_FIXTURES:-/tmp/naiad-fixtures}
MIRROR=${NAIAD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
BENCH=${1:-}

log() { printf 'build-bench-image: %s\n' "$*" >&2; }

case $BENCH in
    minbase) PKGS=(); CMD=(bash -c 'ls /') ;;
    python3) PKGS=(python3); CMD=(python3 -c 'print(1)') ;;
    nodejs) PKGS=(nodejs); CMD=(node -e 'console.log(1)') ;;
    numpy) PKGS=(python3 python3-numpy); CMD=(python3 -c 'import numpy') ;;
    *) log "usage: $0 minbase|python3|nodejs|numpy"; exit 2 ;;
esac
NAME=bench-$BENCH
BASE_TAR="$FIXTURES/.bench-base-rootfs.tar"

done_msg() { echo "layout: $FINAL/layout"; }

# shellcheck source=scripts/lib/fixture-build.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/fixture-build.sh"
fixture_begin naiad-bench-build chroot tar

TAR_OPTS=(--numeric-owner --xattrs --xattrs-include='*' --one-file-system)

repack() {
    umoci repack --refresh-bundle --history.created "$CREATED" \
        --history.created_by "$1" --image "$LAYOUT:$TAG" "$BUNDLE"
}
clean_rootfs() {
    rm -f "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin
    rm -rf "$ROOTFS"/var/lib/apt/lists/*
    mkdir -p "$ROOTFS/var/lib/apt/lists/partial"
    rm -f "$ROOTFS/etc/resolv.conf" "$ROOTFS/etc/hostname"
}

# --- layer 1: debootstrap minbase (from the cached tarball if there is one) ----
exec 8>"$FIXTURES/.bench-base.lock"
flock 8
if [[ -f $BASE_TAR ]] && tar "${TAR_OPTS[@]}" -xpf "$BASE_TAR" -C "$ROOTFS" 2>"$SCRATCH/untar.log"; then
    step "layer 1 from cached $BASE_TAR"
else
    [[ -f $BASE_TAR ]] && { log "bad base cache, rebuilding:"; head -n 5 "$SCRATCH/untar.log" >&2; }
    rm -f "$BASE_TAR"
    find "$ROOTFS" -mindepth 1 -maxdepth 1 -exec rm -rf --one-file-system -- {} +
    step "debootstrap $SUITE into $ROOTFS (mirror $MIRROR)"
    debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" \
        >"$SCRATCH/debootstrap.log" 2>&1 || {
        log "debootstrap failed; last lines of its log:"
        tail -n 40 "$SCRATCH/debootstrap.log" >&2
        exit 1
    }
    clean_rootfs
    rm -f "$BASE_TAR".tmp.*
    tar "${TAR_OPTS[@]}" -cf "$BASE_TAR.tmp.$$" -C "$ROOTFS" .
    mv -- "$BASE_TAR.tmp.$$" "$BASE_TAR"
fi
flock -u 8
step "repack layer 1 (rootfs: $(du -sh "$ROOTFS" | cut -f1))"
repack "debootstrap --variant=minbase $SUITE"

# --- layer 2 (app images): apt-get install in a chroot -------------------------
if ((${#PKGS[@]})); then
    step "layer 2: apt-get install ${PKGS[*]}"
    cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
    chmod 0755 "$ROOTFS/usr/sbin/policy-rc.d"
    mount -t proc proc "$ROOTFS/proc"
    apt_in_chroot() {
        chroot "$ROOTFS" /usr/bin/env -i DEBIAN_FRONTEND=noninteractive LC_ALL=C \
            PATH=/usr/sbin:/usr/bin:/sbin:/bin apt-get -q -y "$@"
    }
    if ! { apt_in_chroot update && apt_in_chroot install --no-install-recommends "${PKGS[@]}"; } \
        >"$SCRATCH/apt.log" 2>&1; then
        log "apt-get in chroot failed; last lines of its log:"
        tail -n 40 "$SCRATCH/apt.log" >&2
        exit 1
    fi
    apt_in_chroot clean >/dev/null 2>&1 || true
    umount "$ROOTFS/proc"
    rm -f "$ROOTFS/usr/sbin/policy-rc.d"
    clean_rootfs
    step "repack layer 2 (rootfs: $(du -sh "$ROOTFS" | cut -f1))"
    repack "apt-get install -y --no-install-recommends ${PKGS[*]}"
fi

# --- top layer: a small file ------------------------------------------------------
step "top layer: /etc/naiad-bench-release"
printf 'naiad bench image %s\nsuite=%s\n' "$BENCH" "$SUITE" >"$ROOTFS/etc/naiad-bench-release"
chmod 0644 "$ROOTFS/etc/naiad-bench-release"
repack "naiad: /etc/naiad-bench-release"

# --- config ------------------------------------------------------------------------
step "config: cmd ${CMD[*]}"
CMD_ARGS=()
for a in "${CMD[@]}"; do CMD_ARGS+=("--config.cmd=$a"); done
umoci config --history.created "$CREATED" --created "$CREATED" "${CMD_ARGS[@]}" \
    --config.env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --image "$LAYOUT:$TAG"
umoci gc --layout "$LAYOUT"

# --- publish ----------------------------------------------------------------------
fixture_publish "suite=$SUITE" "mirror=$MIRROR" "packages=${PKGS[*]}"
