# Shared by the scripts that build cached Debian OCI fixtures
# (build-debian-image.sh, build-bench-image.sh); sourced, not run.
#
# It owns what makes such a build safe to interrupt and to run twice at once:
# one builder per fixture (a lock), a staging directory next to the final one
# that is renamed only when the build is complete (marked by COMPLETE, written
# last), scratch space under /tmp (creating many files under /var is slow),
# and the removal of what interrupted builds left behind.
#
# The sourcing script sets FIXTURES, NAME (the fixture's directory under
# FIXTURES) and defines `log` and `done_msg` (what it prints when the fixture
# is ready), then calls, in order:
#   fixture_begin SCRATCH_PREFIX TOOL...  exits 0 if the fixture is complete;
#                                         else sets STAGE, SCRATCH, LAYOUT,
#                                         BUNDLE, ROOTFS, TAG, CREATED and
#                                         unpacks an empty image into BUNDLE
#   step MESSAGE...                       progress, with the seconds so far
#   fixture_publish [KEY=VALUE...]        writes COMPLETE, renames the stage

FINAL="$FIXTURES/$NAME"
TAG=latest
# Deterministic-ish history timestamps.
CREATED=2024-01-01T00:00:00Z
START=$(date +%s)

step() { log "[$(($(date +%s) - START))s] $NAME: $*"; }

# Unmount anything below $1 (proc in a chroot, debootstrap's mounts), deepest
# first, then remove $1 without crossing file systems.
remove_tree() {
    local dir=$1 mnt
    [[ -e $dir ]] || return 0
    while read -r mnt; do
        umount -l "$mnt" 2>/dev/null || true
    done < <(awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r)
    rm -rf --one-file-system -- "$dir"
}

fixture_begin() {
    local scratch_prefix=$1 tool d pid
    shift
    if [[ -f "$FINAL/COMPLETE" ]]; then
        log "cached, nothing to do"
        done_msg
        exit 0
    fi
    if [[ $(id -u) -ne 0 ]]; then
        log "must run as root (debootstrap, chroot, umoci unpack/repack keep ownership)"
        exit 1
    fi
    for tool in debootstrap umoci "$@"; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            log "missing tool: $tool (run scripts/install-test-deps.sh)"
            exit 1
        fi
    done
    mkdir -p "$FIXTURES"
    # One builder per fixture (callers may hold their own lock on another
    # file, such as $FIXTURES/.debian-python.lock: no deadlock).
    exec 9>"$FIXTURES/.$NAME.build.lock"
    flock 9
    if [[ -f "$FINAL/COMPLETE" ]]; then
        log "built by another process meanwhile"
        done_msg
        exit 0
    fi

    # Leftovers of interrupted builds: our staging dirs (safe under the
    # lock) and scratch dirs under /tmp whose builder process is gone.
    for d in "$FIXTURES/.$NAME.tmp."*; do
        [[ -d $d ]] && remove_tree "$d"
    done
    for d in "/tmp/$scratch_prefix".*; do
        [[ -d $d ]] || continue
        pid=$(cat "$d/.pid" 2>/dev/null || true)
        if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then
            log "removing stale scratch dir $d"
            remove_tree "$d"
        fi
    done

    STAGE=$(mktemp -d "$FIXTURES/.$NAME.tmp.XXXXXX")
    SCRATCH=$(mktemp -d "/tmp/$scratch_prefix.XXXXXX")
    echo $$ >"$SCRATCH/.pid"
    trap 'remove_tree "$SCRATCH"; remove_tree "$STAGE"' EXIT
    trap 'exit 130' INT TERM

    LAYOUT="$STAGE/layout"
    BUNDLE="$SCRATCH/bundle"
    ROOTFS="$BUNDLE/rootfs"
    step "umoci init + new"
    umoci init --layout "$LAYOUT"
    umoci new --image "$LAYOUT:$TAG"
    umoci unpack --image "$LAYOUT:$TAG" "$BUNDLE"
}

fixture_publish() {
    local elapsed=$(($(date +%s) - START)) line
    {
        echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "seconds=$elapsed"
        for line in "$@"; do
            echo "$line"
        done
    } >"$STAGE/COMPLETE"
    chmod 0755 "$STAGE" # mktemp -d made it 0700
    rm -rf -- "$FINAL"
    mv -- "$STAGE" "$FINAL"
    trap 'remove_tree "$SCRATCH"' EXIT
    log "done in ${elapsed}s"
    done_msg
}
