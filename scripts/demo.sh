#!/usr/bin/env bash
# The main job, on a fresh Debian bookworm-like machine, as root: migrates a live counter between
# two nodes on this one machine, the way it runs on a cluster.
#
#   1. scripts/setup.sh  (idempotent: containerd, runc, CRIU 4.x, busybox-static, ...)
#   2. cargo build --release --workspace, and the static counter app
#   3. target/release/two-node-demo: two nodes (each its own network namespace podmigrate-*,
#      containerd with our shim, podmigrate agent and test kubelet), one API server stand-in,
#      one share; counter to 5 on node-a, `kubectl migrate counter --to node-b`, 6 on node-b.
#
# The demo tears everything down itself, also on failure, Ctrl-C or SIGTERM; this script's trap
# then deletes any of its own network namespaces still left (e.g. after a kill -9).
# The last two lines on success: the CLI's summary line, then `counter 5 -> 6`.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

section() { printf '\n==== %s ====\n' "$*"; }
die() { printf 'demo.sh: error: %s\n' "$*" >&2; exit 1; }

# The demo's namespaces are podmigrate-<tag>-<node>; naming the tag lets the trap delete this
# run's namespaces only, never those of a test run beside it.
export PODMIGRATE_NETNS_TAG="d$(printf '%04x' $(( $$ & 0xffff )))"

leftover_netns() {
  command -v ip >/dev/null 2>&1 || return 0
  ip netns list 2>/dev/null | awk '{print $1}' | grep "^podmigrate-${PODMIGRATE_NETNS_TAG}-" || true
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  local ns
  for ns in $(leftover_netns); do
    printf 'demo.sh: deleting leftover network namespace %s\n' "$ns" >&2
    ip netns del "$ns" 2>/dev/null || true
  done
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" -eq 0 ] || die "must run as root (setup installs packages; containerd, runc and CRIU need root)"

section "setup (scripts/setup.sh)"
bash scripts/setup.sh

section "toolchain"
# shellcheck source=scripts/toolchain.sh
. scripts/toolchain.sh
command -v ip >/dev/null 2>&1 || die "ip (iproute2) not found"

section "cargo build --release --workspace"
cargo build --release --workspace
# The counter runs in a bare busybox rootfs: a static build of its own.
bash tests/apps/counter/build.sh >/dev/null

section "two-node demo"
# Not exec: the trap must run after the demo ends.
status=0
target/release/two-node-demo || status=$?
exit "$status"
