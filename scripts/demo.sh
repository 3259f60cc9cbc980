#!/usr/bin/env bash
# naiad end to end on the embedded default store (a local OCI image layout,
# no server): build a Debian bookworm + python3 image with debootstrap and
# umoci, convert it, inspect and check it, mount it lazily, read from it,
# show what was fetched, and run python3 in it. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

export NAIAD_FIXTURES="${NAIAD_FIXTURES:-/tmp/naiad-fixtures}"
WORK="${NAIAD_DEMO_DIR:-/tmp/naiad-demo}"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing what the demo needs (only what is missing)"
bash scripts/install-test-deps.sh
if ! command -v cargo >/dev/null; then echo "cargo is needed (https://rustup.rs)" >&2; exit 1; fi

say "building naiad (release)"
cargo build --release --quiet
NAIAD="$PWD/target/release/naiad"

say "building the source image: debootstrap bookworm + python3, 4 layers (cached)"
bash scripts/build-debian-image.sh
SRC="oci:$NAIAD_FIXTURES/debian-python/layout:latest"

rm -rf "$WORK"; mkdir -p "$WORK"
STORE="oci:$WORK/store:python"
MNT="$WORK/mnt"; mkdir -p "$MNT"
cleanup() { mountpoint -q "$MNT" && "$NAIAD" umount "$MNT" || true; }
trap cleanup EXIT

say "naiad convert $SRC $STORE"
"$NAIAD" convert "$SRC" "$STORE"

say "naiad inspect $STORE"
"$NAIAD" inspect "$STORE"

say "naiad check $STORE"
"$NAIAD" check "$STORE"

say "naiad mount $STORE $MNT (lazy: only the bootstrap is loaded)"
"$NAIAD" mount "$STORE" "$MNT" --cache-dir "$WORK/cache"
ls "$MNT"
head -n 3 "$MNT/etc/os-release"

say "naiad stats $MNT (bytes fetched after reading one file)"
"$NAIAD" stats "$MNT"
"$NAIAD" umount "$MNT"

say "naiad run $STORE -- python3 -c 'import json; print(json.dumps({\"answer\": 42}))'"
"$NAIAD" run "$STORE" --cache-dir "$WORK/cache" -- python3 -c 'import json; print(json.dumps({"answer": 42}))'

say "done: the converted image is at $WORK/store"
