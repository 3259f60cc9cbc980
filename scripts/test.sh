#!/usr/bin/env bash
# naiad's single test command (README and .ci/run call it):
#   1. install missing system packages the tests need (as root, via apt-get);
#   2. build and cache the Debian fixture image under $NAIAD_FIXTURES;
#   3. cargo fmt --check and cargo clippy (warnings are errors);
#   4. cargo test --workspace (debug build), exiting with its status.
# Extra arguments are passed to `cargo test`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export NAIAD_FIXTURES=${NAIAD_FIXTURES:-/tmp/naiad-fixtures}

echo "== test.sh: system dependencies"
bash scripts/install-test-deps.sh

echo "== test.sh: Debian fixture image ($NAIAD_FIXTURES)"
mkdir -p "$NAIAD_FIXTURES"
flock "$NAIAD_FIXTURES/.debian-python.lock" bash scripts/build-debian-image.sh

echo "== test.sh: cargo fmt --check"
cargo fmt --check

echo "== test.sh: cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

echo "== test.sh: cargo test --workspace"
exec cargo test --workspace "$@"
