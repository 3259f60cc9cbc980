#!/usr/bin/env bash
# Builds the naiad binary of an earlier revision, for benchmarks that
# measure it beside the current build in one run:
#   scripts/build-baseline.sh REV        # prints the binary's path
#   NAIAD_BENCH_BASELINE=$(scripts/build-baseline.sh REV) cargo bench --bench convert
# The build lives in a git worktree under /tmp (NAIAD_BASELINE_DIR), reused
# when it is already at REV.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rev=${1:?usage: scripts/build-baseline.sh REV}
commit=$(git rev-parse --verify "$rev^{commit}")
dir=${NAIAD_BASELINE_DIR:-/tmp/naiad-baseline-${commit:0:12}}
if [ ! -d "$dir" ]; then
    git worktree add --detach "$dir" "$commit" >&2
fi
(cd "$dir" && cargo build --release --quiet --bin naiad >&2)
echo "$dir/target/release/naiad"
