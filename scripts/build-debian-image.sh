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
#   3. replaces a directory wholesale (rm -rf + recreate: umoci emits a `.wh.`
#      per old file, not an opaque marker), adds a hardlink to a lower-layer
#      file (umoci re-emits that file in this layer, since its nlink changed,
#      and links to the copy), a hardlink pair, symlinks, and user xattrs
#   4. `umoci insert --opaque`: a directory that masks its lower contents
#      (an opaque whiteout `.wh..wh..opq`)
# plus a config with Cmd, Env and WorkingDir.
#
# The work is done in a staging directory next to the final one and renamed at
# the end, so an interrupted build never looks complete. Run as root.
set -euo pipefail

FIXTURES=${NAIAD_FIXTURES:-/tmp/naiad-fixtures}
NAME=debian-python
MIRROR=${NAIAD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm

log() { printf 'build-debian-image: %s\n' "$*"; }

done_msg() {
    log "layout:      $FINAL/layout (tag latest)"
    log "layout-zstd: $FINAL/layout-zstd (tag latest)"
    log "rootfs-ref:  $FINAL/rootfs-ref"
}

# shellcheck source=scripts/lib/fixture-build.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/fixture-build.sh"
fixture_begin naiad-debian-build skopeo setfattr

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

# --- layer 4: opaque directory ------------------------------------------------
# umoci 0.4.7's `insert --opaque` writes a tar without its final padding and
# end-of-archive blocks (GNU tar and Go's archive/tar reject it), so this
# layer is written by Python's tarfile and appended verbatim.
step "layer 4: opaque directory (tarfile + umoci raw add-layer)"
OPQ_TAR="$SCRATCH/opaque-layer.tar"
python3 - "$OPQ_TAR" "$CREATED" <<'PYEOF'
import io, sys, tarfile, datetime
out, created = sys.argv[1], sys.argv[2]
mtime = int(datetime.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp())
d = "usr/share/doc/python3.11"
with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
    def add(name, kind, data=b"", mode=0o644):
        i = tarfile.TarInfo(name)
        i.type, i.mode, i.mtime, i.size = kind, mode, mtime, len(data)
        t.addfile(i, io.BytesIO(data) if data else None)
    add(d, tarfile.DIRTYPE, mode=0o755)
    add(d + "/.wh..wh..opq", tarfile.REGTYPE, mode=0)
    add(d + "/ONLY", tarfile.REGTYPE, b"only this survives\n")
    add(d + "/sub", tarfile.DIRTYPE, mode=0o755)
    add(d + "/sub/file", tarfile.REGTYPE, b"sub\n")
PYEOF
umoci raw add-layer --history.created "$CREATED" \
    --history.created_by "naiad: opaque /usr/share/doc/python3.11" \
    --image "$LAYOUT:$TAG" "$OPQ_TAR"

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
fixture_publish "suite=$SUITE" "mirror=$MIRROR"
