#!/usr/bin/env bash
# Builds (once) and caches a real multi-layer OCI image of Debian bookworm with
# python3, for naiad's integration tests. Output, under
# ${NAIAD_FIXTURES:-/tmp/naiad-fixtures}/debian-python/:
#
#   layout/       OCI image layout, tag "latest", gzip layers, made by umoci
#   layout-zstd/  the same image with zstd layers (skopeo copy)
#   rootfs-ref/   reference unpack of layout:latest by `umoci raw unpack`
#   COMPLETE      marker, written last
#
# Layers:
#   1. debootstrap --variant=minbase --include=python3 bookworm
#   2. deletes files and a directory (.wh. whiteouts), adds a file, changes a mode
#   3. replaces a directory wholesale (rm -rf + recreate), adds a hardlink to a
#      lower-layer file, a hardlink pair, a symlink, and sets a user xattr
#   4. `umoci insert --opaque`: a directory that masks its lower contents
#      (an opaque whiteout `.wh..wh..opq`)
# plus a config with Cmd, Env and WorkingDir.
#
# The work is done in a staging directory next to the final one and renamed at
# the end, so an interrupted build never looks complete. Run as root.
set -euo pipefail

FIXTURES=${NAIAD_FIXTURES:-/tmp/naiad-fixtures}
NAME=debian-python
FINAL="$FIXTURES/$NAME"
MIRROR=${NAIAD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm

log() { printf 'build-debian-image: %s\n' "$*"; }

print_paths() {
    log "layout:      $FINAL/layout (tag latest)"
    log "layout-zstd: $FINAL/layout-zstd (tag latest)"
    log "rootfs-ref:  $FINAL/rootfs-ref"
}

if [[ -f "$FINAL/COMPLETE" ]]; then
    log "cached, nothing to do"
    print_paths
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (debootstrap, umoci unpack/repack keep ownership)"
    exit 1
fi

for tool in debootstrap umoci skopeo setfattr; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        log "missing tool: $tool (run scripts/install-test-deps.sh)"
        exit 1
    fi
done

START=$(date +%s)
mkdir -p "$FIXTURES"
STAGE=$(mktemp -d "$FIXTURES/.$NAME.tmp.XXXXXX")
# Scratch rootfs/bundle under /tmp: creating many files under /var is slow.
SCRATCH=$(mktemp -d /tmp/naiad-debian-build.XXXXXX)
cleanup() {
    rm -rf -- "$SCRATCH" "$STAGE"
}
trap cleanup EXIT

LAYOUT="$STAGE/layout"
BUNDLE="$SCRATCH/bundle"
ROOTFS="$BUNDLE/rootfs"
TAG=latest
# Deterministic-ish history timestamps.
CREATED=2024-01-01T00:00:00Z

step() {
    log "[$(($(date +%s) - START))s] $*"
}

# --- empty image, unpacked to a bundle ----------------------------------------
step "umoci init + new"
umoci init --layout "$LAYOUT"
umoci new --image "$LAYOUT:$TAG"
umoci unpack --image "$LAYOUT:$TAG" "$BUNDLE"

# --- layer 1: debootstrap -------------------------------------------------------
step "debootstrap $SUITE into $ROOTFS (mirror $MIRROR)"
debootstrap --variant=minbase --include=python3 "$SUITE" "$ROOTFS" "$MIRROR" \
    >"$SCRATCH/debootstrap.log" 2>&1 || {
    log "debootstrap failed; last lines of its log:"
    tail -n 40 "$SCRATCH/debootstrap.log" >&2
    exit 1
}
rm -f "$ROOTFS"/var/cache/apt/archives/*.deb
rm -rf "$ROOTFS"/var/lib/apt/lists/*
mkdir -p "$ROOTFS/var/lib/apt/lists/partial"
# debootstrap leaves the host's resolv.conf/hostname; keep the image neutral.
rm -f "$ROOTFS/etc/resolv.conf" "$ROOTFS/etc/hostname"
step "repack layer 1 (rootfs: $(du -sh "$ROOTFS" | cut -f1))"
umoci repack --refresh-bundle --history.created "$CREATED" \
    --history.created_by "debootstrap --variant=minbase --include=python3 $SUITE" \
    --image "$LAYOUT:$TAG" "$BUNDLE"

# --- layer 2: deletions (whiteouts), an added file, a mode change ---------------
step "layer 2: whiteouts, new file, chmod"
rm -f "$ROOTFS/etc/issue.net" "$ROOTFS/etc/motd"
rm -rf "$ROOTFS/usr/share/doc/bash"          # a whole directory with files
rm -rf "$ROOTFS/usr/share/doc/debconf"
printf 'naiad test image\nlayer=2\n' >"$ROOTFS/etc/naiad-release"
chmod 0644 "$ROOTFS/etc/naiad-release"
chmod 0600 "$ROOTFS/etc/issue"                  # mode change of a lower file
umoci repack --refresh-bundle --history.created "$CREATED" \
    --history.created_by "naiad: whiteouts + add + chmod" \
    --image "$LAYOUT:$TAG" "$BUNDLE"

# --- layer 3: replace a directory, hardlinks, symlink, xattr -------------------
step "layer 3: replace dir, hardlinks, symlink, xattr"
# Replace /usr/share/doc/python3 wholesale: old files go, new ones come.
rm -rf "$ROOTFS/usr/share/doc/python3"
mkdir -p "$ROOTFS/usr/share/doc/python3/naiad"
printf 'replaced by naiad layer 3\n' >"$ROOTFS/usr/share/doc/python3/README.naiad"
printf 'nested\n' >"$ROOTFS/usr/share/doc/python3/naiad/nested.txt"
# Hardlink to a file that lives in a lower layer.
ln "$ROOTFS/usr/bin/python3.11" "$ROOTFS/usr/local/bin/python-hardlink"
# A hardlink pair of files new in this layer.
printf 'hardlinked content\n' >"$ROOTFS/usr/local/share/naiad-hl-a"
ln "$ROOTFS/usr/local/share/naiad-hl-a" "$ROOTFS/usr/local/share/naiad-hl-b"
# Symlinks: absolute and relative.
ln -s /usr/bin/python3 "$ROOTFS/usr/local/bin/py"
ln -s ../share/naiad-hl-a "$ROOTFS/usr/local/bin/hl-rel"
# A user xattr on a file from layer 2 and on a new file.
setfattr -n user.naiad -v test "$ROOTFS/etc/naiad-release"
printf 'xattr file\n' >"$ROOTFS/usr/local/share/naiad-xattr"
setfattr -n user.naiad -v test "$ROOTFS/usr/local/share/naiad-xattr"
umoci repack --refresh-bundle --history.created "$CREATED" \
    --history.created_by "naiad: replace dir + hardlinks + symlinks + xattr" \
    --image "$LAYOUT:$TAG" "$BUNDLE"

# --- layer 4: opaque directory via umoci insert --opaque ----------------------
step "layer 4: opaque directory (umoci insert --opaque)"
OPQ="$SCRATCH/opaque-src"
mkdir -p "$OPQ/sub"
printf 'only this survives\n' >"$OPQ/ONLY"
printf 'sub\n' >"$OPQ/sub/file"
umoci insert --opaque --history.created "$CREATED" \
    --history.created_by "naiad: opaque /usr/share/doc/python3.11" \
    --image "$LAYOUT:$TAG" "$OPQ" /usr/share/doc/python3.11

# --- config ----------------------------------------------------------------------
step "config"
umoci config --history.created "$CREATED" --created "$CREATED" \
    --config.cmd=/usr/bin/python3 --config.cmd=-c --config.cmd='print(42)' \
    --config.env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env=NAIAD_TEST=1 \
    --config.env=LANG=C.UTF-8 \
    --config.workingdir=/ \
    --image "$LAYOUT:$TAG"
umoci gc --layout "$LAYOUT"

# --- zstd copy ----------------------------------------------------------------
step "skopeo copy to zstd"
skopeo copy --quiet --dest-compress --dest-compress-format zstd \
    "oci:$LAYOUT:$TAG" "oci:$STAGE/layout-zstd:$TAG"
if ! grep -q 'tar+zstd' "$STAGE"/layout-zstd/blobs/sha256/*; then
    log "skopeo did not produce zstd layers"
    exit 1
fi

# --- reference unpack ----------------------------------------------------------
step "reference unpack"
umoci raw unpack --image "$LAYOUT:$TAG" "$STAGE/rootfs-ref"

# --- publish -------------------------------------------------------------------
ELAPSED=$(($(date +%s) - START))
{
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "seconds=$ELAPSED"
    echo "suite=$SUITE"
    echo "mirror=$MIRROR"
} >"$STAGE/COMPLETE"
rm -rf -- "$FINAL"
mv -- "$STAGE" "$FINAL"
trap 'rm -rf -- "$SCRATCH"' EXIT
log "done in ${ELAPSED}s"
print_paths
