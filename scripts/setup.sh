#!/usr/bin/env bash
# Installs what podmigrate needs on a Debian bookworm-like host, idempotently:
# containerd, runc, iptables, busybox-static, protoc, zip/unzip, zstd, samba + smbnetfs (the SMB share
# of the two-node suite) and a CRIU 4.x that passes `criu check`.
# Host names are never written here: the next release's sources reuse this machine's own apt URIs.
set -euo pipefail

CRIU_VERSION=${CRIU_VERSION:-4.1.1}
NEXT_SUITE=${NEXT_SUITE:-trixie}
BUILD_ROOT=${PODMIGRATE_BUILD_ROOT:-/var/cache/podmigrate/build}
APT_STAMP=/var/cache/podmigrate/apt-updated

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages and builds CRIU)"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian-like hosts only"
export DEBIAN_FRONTEND=noninteractive
mkdir -p "$(dirname "$APT_STAMP")" "$BUILD_ROOT"

apt_updated=0
apt_update_once() {
  [ "$apt_updated" -eq 1 ] && return 0
  log "apt-get update"
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt_updated=1
  touch "$APT_STAMP"
}

# Installs each package whose dpkg status is not 'installed'.
install_missing() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "${pkg%%/*}" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  apt_update_once
  log "installing ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
}

# The first URI of this machine's own Debian sources (deb822 or one-line format).
debian_mirror_uri() {
  local uri=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$uri" ]; then
    uri=$(grep -hsE '^deb(-src)? ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | grep -v security | awk '{for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' | head -n1)
  fi
  [ -n "$uri" ] || die "no Debian apt source found to derive the ${NEXT_SUITE} source from"
  printf '%s\n' "$uri"
}

# Adds the next release's binary and source entries at low priority, so nothing upgrades by accident:
# only packages named with /${NEXT_SUITE} come from it.
add_next_suite() {
  local list=/etc/apt/sources.list.d/podmigrate-${NEXT_SUITE}.sources
  local pin=/etc/apt/preferences.d/podmigrate-${NEXT_SUITE}
  if [ ! -f "$list" ]; then
    local uri; uri=$(debian_mirror_uri)
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    log "adding ${NEXT_SUITE} (deb, deb-src) from this machine's own mirror configuration"
    {
      echo "Types: deb deb-src"
      echo "URIs: ${uri}"
      echo "Suites: ${NEXT_SUITE}"
      echo "Components: main"
      [ -f "$keyring" ] && echo "Signed-By: ${keyring}"
    } >"$list"
    apt_updated=0
  fi
  if [ ! -f "$pin" ]; then
    printf 'Package: *\nPin: release n=%s\nPin-Priority: 100\n' "$NEXT_SUITE" >"$pin"
  fi
  apt_update_once
}

# --- base packages ----------------------------------------------------------------------------
install_missing runc iptables busybox-static protobuf-compiler zip unzip zstd ca-certificates \
  iproute2 pkg-config gcc libc6-dev make python3

# --- containerd: 1.7 from the next release where it has it, otherwise the distro's ---------------
containerd_version() { containerd --version 2>/dev/null | awk '{print $3}' | sed 's/^v//'; }
if ! command -v containerd >/dev/null || ! [[ $(containerd_version) =~ ^(1\.7|2\.) ]]; then
  add_next_suite
  # awk reads all of madison's output (grep -q would close the pipe early and trip pipefail).
  cand=$(apt-cache madison containerd | awk -v s="$NEXT_SUITE" '$0 ~ s"/" && /Packages/ && $3 ~ /^1\.7/ && !found {print $3; found=1}')
  if [ -n "${cand:-}" ]; then
    log "installing containerd ${cand} from ${NEXT_SUITE}"
    apt-get install -y -qq --no-install-recommends "containerd=${cand}" >/dev/null || die "installing containerd ${cand} failed"
  else
    log "no containerd 1.7 in ${NEXT_SUITE}; using the distro's"
    install_missing containerd
  fi
fi
# The packaged service would race our own test daemons for /run/containerd; podmigrate starts its own.
if command -v systemctl >/dev/null && systemctl is-enabled containerd >/dev/null 2>&1; then
  systemctl disable --now containerd >/dev/null 2>&1 || true
fi

# --- containerd 1.6 beside it, for the suites that also run against 1.6 (scripts/test.sh) --------
# bookworm's 1.6 .deb, extracted (not installed) into ${CONTAINERD16_ROOT}/root/usr/bin; the tests
# choose it with PODMIGRATE_CONTAINERD_BIN_DIR. Set CONTAINERD16_VERSION= (empty) to skip.
CONTAINERD16_VERSION=${CONTAINERD16_VERSION-1.6.20~ds1-1+deb12u3}
CONTAINERD16_ROOT=${CONTAINERD16_ROOT:-/var/cache/podmigrate/containerd-1.6}
if [ -n "$CONTAINERD16_VERSION" ]; then
  c16_bin=${CONTAINERD16_ROOT}/root/usr/bin
  c16_stamp=${CONTAINERD16_ROOT}/version
  if [ "$(cat "$c16_stamp" 2>/dev/null)" != "$CONTAINERD16_VERSION" ] || [ ! -x "${c16_bin}/containerd" ]; then
    if ! apt-cache madison containerd | awk -v v="$CONTAINERD16_VERSION" '$3 == v {f=1} END {exit !f}'; then
      apt_update_once
    fi
    log "fetching containerd ${CONTAINERD16_VERSION} (extracted into ${CONTAINERD16_ROOT}, not installed)"
    rm -rf "${CONTAINERD16_ROOT}" && mkdir -p "${CONTAINERD16_ROOT}/deb"
    (cd "${CONTAINERD16_ROOT}/deb" && apt-get download -qq "containerd=${CONTAINERD16_VERSION}" >/dev/null) \
      || die "apt-get download containerd=${CONTAINERD16_VERSION} failed (apt-cache madison containerd lists what the mirror has)"
    dpkg-deb -x "${CONTAINERD16_ROOT}"/deb/containerd_*.deb "${CONTAINERD16_ROOT}/root"
    rm -rf "${CONTAINERD16_ROOT}/deb"
    for b in containerd ctr containerd-shim-runc-v2; do
      [ -x "${c16_bin}/${b}" ] || die "${b} missing from the containerd ${CONTAINERD16_VERSION} package"
    done
    printf '%s\n' "$CONTAINERD16_VERSION" >"$c16_stamp"
  fi
fi

# --- the SMB share of the two-node suite: a private smbd, mounted on each node through FUSE -----
# smbnetfs (libsmbclient) writes through to the server and renames with SMB's rename, so the
# archive's commit by rename holds; rclone's SMB mount (1.60) uploads after close under the final
# name, which would reopen the race (docs/operations.md). fuse3 brings fusermount3.
install_missing samba smbnetfs fuse3
# The tests start their own smbd bound to their own addresses; a packaged one on *:445 is not wanted.
if command -v systemctl >/dev/null; then
  for unit in smbd nmbd samba-ad-dc; do
    systemctl is-enabled "$unit" >/dev/null 2>&1 && { systemctl disable --now "$unit" >/dev/null 2>&1 || true; }
  done
fi

# --- CRIU 4.x ---------------------------------------------------------------------------------
# Our fixes to CRIU (scripts/criu/*.patch), identified by their digest: a CRIU built without the
# current set is rebuilt, because `criu check` passes even where a dump would fail.
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CRIU_PATCHES=("$REPO_ROOT"/scripts/criu/*.patch)
CRIU_STAMP=/usr/local/share/podmigrate/criu-build
criu_build_id() { printf '%s %s\n' "$CRIU_VERSION" "$(cat "${CRIU_PATCHES[@]}" | sha256sum | cut -d' ' -f1)"; }
criu_ok() {
  command -v criu >/dev/null && criu check >/dev/null 2>&1 || return 1
  [[ $(criu --version) =~ Version:\ ([0-9]+)\. ]] && [ "${BASH_REMATCH[1]}" -ge 4 ] || return 1
  # A CRIU we built must carry today's patches; one from elsewhere is trusted as it is.
  [ "$(command -v criu)" != /usr/local/sbin/criu ] || [ "$(cat "$CRIU_STAMP" 2>/dev/null)" = "$(criu_build_id)" ]
}
if ! criu_ok; then
  log "no working CRIU 4.x with podmigrate's fixes; building CRIU ${CRIU_VERSION} from ${NEXT_SUITE}'s source tarball"
  install_missing libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev libnl-3-dev libnet1-dev \
    libcap-dev libbsd-dev libgnutls28-dev libnftables-dev uuid-dev python3-protobuf dpkg-dev xz-utils patch
  add_next_suite
  src_dir=${BUILD_ROOT}/criu
  mkdir -p "$src_dir"
  tarball=${src_dir}/criu_${CRIU_VERSION}.orig.tar.xz
  if [ ! -s "$tarball" ]; then
    # The .dsc may be missing from the mirror; the orig tarball is what we need.
    (cd "$src_dir" && apt-get source --download-only -qq "criu/${NEXT_SUITE}" >/dev/null 2>&1) || true
    [ -s "$tarball" ] || die "could not download criu_${CRIU_VERSION}.orig.tar.xz from ${NEXT_SUITE}'s sources"
  fi
  rm -rf "${src_dir}/criu-${CRIU_VERSION}"
  tar -C "$src_dir" -xJf "$tarball"
  for p in "${CRIU_PATCHES[@]}"; do
    log "applying $(basename "$p")"
    patch -d "${src_dir}/criu-${CRIU_VERSION}" -p1 --quiet <"$p" || die "applying $p to CRIU ${CRIU_VERSION} failed"
  done
  log "make -j$(nproc) criu"
  (cd "${src_dir}/criu-${CRIU_VERSION}" && make -j"$(nproc)" criu >"${src_dir}/build.log" 2>&1) \
    || die "CRIU build failed; see ${src_dir}/build.log"
  install -m 0755 "${src_dir}/criu-${CRIU_VERSION}/criu/criu" /usr/local/sbin/criu
  mkdir -p "$(dirname "$CRIU_STAMP")" && criu_build_id >"$CRIU_STAMP"
  hash -r
  criu_ok || die "CRIU ${CRIU_VERSION} built but 'criu check' fails: $(criu check 2>&1 | tail -n1)"
fi

# --- post-copy ---------------------------------------------------------------------------------
# CRIU's page server splices pages through pipes of up to 4 MiB. Root here lacks CAP_SYS_RESOURCE,
# so CRIU cannot grow a pipe past fs.pipe-max-size; CRIU 4.1.1 ignores that failure and its page
# server then dies with "page-pipe: splice: -1: Bad file descriptor". Not persisted: setup runs
# before every demo and test.
PIPE_MAX_SIZE=$((4 * 1024 * 1024))
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt "$PIPE_MAX_SIZE" ]; then
  log "sysctl fs.pipe-max-size=${PIPE_MAX_SIZE} (CRIU's page server, for post-copy)"
  sysctl -qw fs.pipe-max-size="$PIPE_MAX_SIZE" || die "raising fs.pipe-max-size to ${PIPE_MAX_SIZE} failed"
fi

# --- the local Kubernetes cluster (scripts/local-up-cluster.sh, scripts/images.sh) -------------
# Kubernetes itself is built from source by scripts/kube-build.sh. etcd 3.5 and the CNI plugins
# come from the next release (bookworm's etcd is 3.4); buildah builds the images locally.
install_missing buildah openssl conntrack util-linux
etcd_ok() { command -v etcd >/dev/null && [[ $(etcd --version 2>/dev/null | awk '/etcd Version/ {print $3}') =~ ^3\.([5-9]|[1-9][0-9]) ]]; }
cni_ok() { [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/portmap ]; }
if ! etcd_ok || ! cni_ok; then
  add_next_suite
  log "installing etcd-server and containernetworking-plugins from ${NEXT_SUITE}"
  apt-get install -y -qq --no-install-recommends "etcd-server/${NEXT_SUITE}" "containernetworking-plugins/${NEXT_SUITE}" >/dev/null \
    || die "installing etcd-server and containernetworking-plugins from ${NEXT_SUITE} failed"
  etcd_ok || die "etcd 3.5 or newer not found after installing etcd-server"
fi
# The packaged etcd service is not ours: the cluster script runs its own on its own ports.
if command -v systemctl >/dev/null && systemctl is-enabled etcd >/dev/null 2>&1; then
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi

# --- report -----------------------------------------------------------------------------------
log "versions:"
printf '  %-11s %s\n' containerd "$(containerd --version | awk '{print $3}')"
[ -z "$CONTAINERD16_VERSION" ] || printf '  %-11s %s\n' containerd "$("${CONTAINERD16_ROOT}/root/usr/bin/containerd" --version | awk '{print $3}') (${CONTAINERD16_ROOT}/root/usr/bin, tests only)"
printf '  %-11s %s\n' runc "$(runc --version | awk 'NR==1 {print $3}')"
printf '  %-11s %s\n' criu "$(criu --version | awk '/Version/ {print $2}')"
printf '  %-11s %s\n' protoc "$(protoc --version | awk '{print $2}')"
printf '  %-11s %s\n' smbd "$(smbd --version | awk '{print $2}')"
printf '  %-11s %s\n' etcd "$(etcd --version | awk '/etcd Version/ {print $3}')"
printf '  %-11s %s\n' buildah "$(buildah --version | awk '{print $3}')"
printf '  %-11s %s\n' kernel "$(uname -r)"
printf '  %-11s %s\n' pipe-max "$(cat /proc/sys/fs/pipe-max-size)"
printf '  criu check: %s\n' "$(criu check 2>&1 | tail -n1)"
