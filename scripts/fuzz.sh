#!/usr/bin/env bash
# Fuzzes one target with AFL++ through cargo-afl, on the stable toolchain:
#   scripts/fuzz.sh TARGET SECONDS [MAX_EXECS]
# TARGET: bootstrap | chunk | layer | json | auth | reference (fuzz/src/lib.rs).
# Stops after SECONDS or MAX_EXECS executions (default 10,000,000), whichever
# comes first, then prints the figures (executions, coverage, crashes) from
# AFL's fuzzer_stats. Seeds: fuzz/seeds/TARGET (from real images); findings:
# $NAIAD_FUZZ_OUT/TARGET (default /tmp/naiad-fuzz). Installs cargo-afl from
# crates.io when it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=${1:?usage: scripts/fuzz.sh TARGET SECONDS [MAX_EXECS]}
seconds=${2:?usage: scripts/fuzz.sh TARGET SECONDS [MAX_EXECS]}
max_execs=${3:-10000000}
out=${NAIAD_FUZZ_OUT:-/tmp/naiad-fuzz}/$target

[ -d "fuzz/seeds/$target" ] || { echo "fuzz.sh: no target $target (seeds: $(ls fuzz/seeds | tr '\n' ' '))" >&2; exit 2; }
command -v cargo-afl >/dev/null || cargo install cargo-afl
(cd fuzz && cargo afl build --release --bin "$target" >&2)

mkdir -p "$out"
# This machine's kernel settings are not AFL's to change.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
resume=(-i "fuzz/seeds/$target")
[ -f "$out/default/fuzzer_stats" ] && resume=(-i -)
cargo afl fuzz "${resume[@]}" -o "$out" -V "$seconds" -E "$max_execs" -t 5000 -- "fuzz/target/release/$target" >"$out/afl.log" 2>&1 || {
    echo "fuzz.sh: afl-fuzz failed; see $out/afl.log" >&2
    tail -20 "$out/afl.log" >&2
    exit 1
}
stats=$out/default/fuzzer_stats
get() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
crashes=$(find "$out/default/crashes" -type f -name 'id:*' 2>/dev/null | wc -l)
printf '%s: %s executions in %ss (%s/s), coverage %s of the map (%s edges), %s corpus entries, %s crashes, %s hangs\n' \
    "$target" "$(get execs_done)" "$(get run_time)" "$(get execs_per_sec)" "$(get bitmap_cvg)" "$(get edges_found)" "$(get corpus_count)" "$crashes" "$(get saved_hangs)"
[ "$crashes" -eq 0 ] || { echo "fuzz.sh: crashing inputs in $out/default/crashes" >&2; exit 1; }
