#!/usr/bin/env bash
# Builds podmigrate's container images locally with buildah (no registry, no base image: each is
# FROM scratch) and writes each as an OCI archive that `ctr images import` loads:
#   <out>/agent.tar    localhost/podmigrate/agent:<version>  the podmigrate binary and the libraries
#                      it links, from target/release (the DaemonSet's image)
#   <out>/counter.tar  localhost/podmigrate/counter:dev      the static test app `counter` and a
#                      static busybox (for `kubectl exec`)
#   <out>/pause.tar    localhost/podmigrate/pause:1          the pod sandbox (tests/fixtures/pause.c)
# Usage: scripts/images.sh OUT_DIR   (after `cargo build --release --workspace`)
# Prints one line per image: NAME REFERENCE ARCHIVE.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:?usage: scripts/images.sh OUT_DIR}
AGENT_IMAGE=${PODMIGRATE_AGENT_IMAGE:-localhost/podmigrate/agent:$(awk -F'"' '/^version = / {print $2; exit}' "$ROOT/Cargo.toml")}
COUNTER_IMAGE=${PODMIGRATE_COUNTER_IMAGE:-localhost/podmigrate/counter:dev}
PAUSE_IMAGE=${PODMIGRATE_PAUSE_IMAGE:-localhost/podmigrate/pause:1}

die() { printf '[images] error: %s\n' "$*" >&2; exit 1; }
command -v buildah >/dev/null || die "buildah not found (scripts/setup.sh installs it)"
[ -x "$ROOT/target/release/podmigrate" ] || die "target/release/podmigrate missing: run cargo build --release --workspace"

work=$(mktemp -d /var/tmp/podmigrate-images.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT"
# A private vfs store: nothing is left in the host's container storage.
bah() { buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs "$@"; }

# build NAME REFERENCE CONTEXT: FROM scratch, the context's rootfs/ as /, then the Containerfile's
# own lines (passed on stdin).
build() {
  local name=$1 ref=$2 ctx=$3
  { printf 'FROM scratch\nCOPY rootfs/ /\n'; cat; } >"$ctx/Containerfile"
  bah bud --quiet --isolation chroot -f "$ctx/Containerfile" -t "$ref" "$ctx" >/dev/null \
    || die "buildah bud of $ref failed"
  rm -f "$OUT/$name.tar"
  bah push --quiet "$ref" "oci-archive:$OUT/$name.tar:$ref" >/dev/null || die "buildah push of $ref failed"
  printf '%s %s %s\n' "$name" "$ref" "$OUT/$name.tar"
}

# copy_with_libs BINARY ROOTFS: the binary at /usr/local/bin and every library ldd names, at
# the same paths as on this host (the loader included).
copy_with_libs() {
  local bin=$1 rootfs=$2 lib
  install -D -m 0755 "$bin" "$rootfs/usr/local/bin/$(basename "$bin")"
  for lib in $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
    install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
  done
}

# The agent: the same binary serves `podmigrate agent`, `key install` and the CLI.
ctx=$work/agent
copy_with_libs "$ROOT/target/release/podmigrate" "$ctx/rootfs"
ln -s podmigrate "$ctx/rootfs/usr/local/bin/kubectl-migrate"
mkdir -p "$ctx/rootfs/tmp"
build agent "$AGENT_IMAGE" "$ctx" <<'EOF'
ENTRYPOINT ["/usr/local/bin/podmigrate"]
CMD ["agent"]
EOF

# The counter: static, beside a static busybox and its applets.
ctx=$work/counter
counter=$(bash "$ROOT/tests/apps/counter/build.sh")
install -D -m 0755 "$counter" "$ctx/rootfs/bin/counter"
install -D -m 0755 /bin/busybox "$ctx/rootfs/bin/busybox"
for applet in sh cat ls sleep echo mkdir rm wc head tail grep sha256sum dd stat kill ps; do
  ln -s busybox "$ctx/rootfs/bin/$applet"
done
mkdir -p "$ctx/rootfs/tmp" "$ctx/rootfs/data"
build counter "$COUNTER_IMAGE" "$ctx" <<'EOF'
EXPOSE 8080
ENTRYPOINT ["/bin/counter"]
EOF

# The pod sandbox.
ctx=$work/pause
mkdir -p "$ctx/rootfs"
gcc -static -O2 -o "$ctx/rootfs/pause" "$ROOT/tests/fixtures/pause.c" || die "building pause failed"
build pause "$PAUSE_IMAGE" "$ctx" <<'EOF'
ENTRYPOINT ["/pause"]
EOF
