#!/usr/bin/env bash
# Interleaved timings of `naiad run` for two builds or two images, against
# the registry a held startup bench keeps up:
#
#   NAIAD_BENCH_HOLD=/tmp/hold NAIAD_BENCH_IMAGES=nodejs cargo bench --bench startup &
#   scripts/compare-runs.sh N  A BIN_A REF_A  B BIN_B REF_B  -- CMD...
#
# Runs A then B, N times, each from empty caches, over the bench's emulated
# 100 Mbit/s, 20 ms link (LINK=loopback for the registry's loopback port),
# and prints one line per run: label, seconds, what CMD printed. REF is a
# repository and tag on that registry (nodejs:naiad-opt). HOLD names the
# hold file (default /tmp/hold).
set -euo pipefail

usage() {
    sed -n '2,12p' "$0" >&2
    exit 2
}
[ $# -ge 8 ] || usage
n=$1
shift
labels=("$1" "$4")
bins=("$2" "$5")
refs=("$3" "$6")
shift 6
[ "${1:-}" = "--" ] || usage
shift

hold=${HOLD:-/tmp/hold}
[ -f "$hold" ] || {
    echo "compare-runs: no hold file $hold (start the startup bench with NAIAD_BENCH_HOLD)" >&2
    exit 2
}
case ${LINK:-link} in
    link) host=$(awk '$1 == "link" {print $2}' "$hold") ;;
    loopback) host=$(awk '$1 == "loopback" {print $2}' "$hold") ;;
    *) echo "compare-runs: LINK is link or loopback" >&2; exit 2 ;;
esac

work=$(mktemp -d /tmp/naiad-compare.XXXXXX)
trap 'rm -rf "$work"' EXIT
for _ in $(seq "$n"); do
    for k in 0 1; do
        rm -rf "$work/run"
        mkdir -p "$work/run"
        start=$(date +%s.%N)
        out=$("${bins[$k]}" run --cache-dir "$work/run/cache" --run-dir "$work/run/state" "docker://$host/${refs[$k]}" -- "$@" 2>"$work/stderr") || {
            echo "compare-runs: ${labels[$k]} failed:" >&2
            cat "$work/stderr" >&2
            exit 1
        }
        end=$(date +%s.%N)
        printf '%s %.3f %s\n' "${labels[$k]}" "$(echo "$end - $start" | bc)" "$out"
    done
done
