#!/usr/bin/env bash
# Builds the test app `counter` as a fully static binary (glibc, +crt-static) and copies it to
# target/counter/counter (override with COUNTER_OUT=/path). Prints the binary's path.
#
# It builds for the host triple with an explicit --target, so RUSTFLAGS apply to the target only:
# host build scripts and proc macros, and the workspace's ordinary target/release, are unaffected.
# Needs no extra rustup target (x86_64-unknown-linux-gnu is the host on our machines).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
HOST=$(rustc -vV | sed -n 's/^host: //p')
case $HOST in
  *-linux-gnu*) ;;
  *) echo "build.sh: host $HOST is not a *-linux-gnu target; static glibc linking needs one" >&2; exit 1;;
esac
OUT=${COUNTER_OUT:-$ROOT/target/counter/counter}

cd "$ROOT"
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release -q --target "$HOST" -p podmigrate-counter
BIN=$ROOT/target/$HOST/release/counter
mkdir -p "$(dirname "$OUT")"
install -m 0755 "$BIN" "$OUT"

# Refuse to hand out a dynamically linked binary: a busybox rootfs has no libc to load.
if ! file -b "$OUT" | grep -qE 'static(-pie)? linked'; then
  echo "build.sh: $OUT is not statically linked: $(file -b "$OUT")" >&2
  exit 1
fi
if ldd "$OUT" >/dev/null 2>&1 && ! ldd "$OUT" 2>&1 | grep -q 'statically linked'; then
  echo "build.sh: ldd sees dynamic dependencies in $OUT:" >&2
  ldd "$OUT" >&2
  exit 1
fi
echo "$OUT"
