#!/usr/bin/env bash
# How much of a FUSE round trip is the wakeup across CPUs: `ls -lR` of a
# fresh mount of the Debian fixture image, with the daemon and `ls` free to
# run anywhere, and with both pinned to CPU 0 (taskset). As root, after
# `cargo build --release` and the fixture (scripts/build-debian-image.sh):
#   scripts/fuse-cpu-placement.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-5}
naiad=target/release/naiad
fixture=${NAIAD_FIXTURES:-/tmp/naiad-fixtures}/debian-python/layout
work=$(mktemp -d /tmp/naiad-cpu-XXXXXX)
trap 'umount -l "$work/mnt" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir "$work/mnt"
$naiad convert "oci:$fixture:latest" "oci:$work/store:naiad" --quiet
for mode in free pinned; do
    times=()
    for _ in $(seq "$rounds"); do
        rm -rf "$work/cache"
        $naiad mount "oci:$work/store:naiad" "$work/mnt" --cache-dir "$work/cache" --run-dir "$work/run"
        pid=$($naiad stats --json --run-dir "$work/run" "$work/mnt" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
        pin=()
        if [ "$mode" = pinned ]; then
            taskset -a -p -c 0 "$pid" >/dev/null
            pin=(taskset -c 0)
        fi
        start=$(date +%s.%N)
        "${pin[@]}" ls -lR "$work/mnt" >/dev/null
        end=$(date +%s.%N)
        times+=("$(echo "$end - $start" | bc)")
        $naiad umount "$work/mnt" --run-dir "$work/run"
    done
    median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (rounds + 1) / 2 ))p")
    echo "ls -lR, fresh mount, daemon and ls $mode: median ${median} s of $rounds (${times[*]})"
done
