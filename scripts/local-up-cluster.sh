#!/usr/bin/env bash
# A one-node development cluster, the way the original proof of concept was developed: Kubernetes'
# own hack/local-up-cluster.sh against a containerd that has podmigrate's runtime configured.
#
# Needs a Kubernetes source checkout (with its build prerequisites: Go, etcd via
# hack/install-etcd.sh) and root. Nothing here is patched: stock kubelet, stock containerd.
#
# Usage: KUBE_ROOT=~/go/src/k8s.io/kubernetes scripts/local-up-cluster.sh
#
# Environment:
#   KUBE_ROOT           the Kubernetes checkout (required)
#   CONTAINERD_CONFIG   containerd's config file (default /etc/containerd/config.toml)
#   SHARE_ROOT          the share's mount point (default /var/lib/podmigrate/share)
#
# This script cannot run on machines without a Kubernetes checkout (such as podmigrate's CI);
# it is documentation that runs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KUBE_ROOT=${KUBE_ROOT:?set KUBE_ROOT to a Kubernetes source checkout}
CONTAINERD_CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
SHARE_ROOT=${SHARE_ROOT:-/var/lib/podmigrate/share}

log() { printf '[local-up] %s\n' "$*"; }
die() { printf '[local-up] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (installs the shim, configures and restarts containerd)"
[ -x "$KUBE_ROOT/hack/local-up-cluster.sh" ] || die "$KUBE_ROOT/hack/local-up-cluster.sh not found"

log "installing CRIU, runc and containerd where missing"
"$ROOT/scripts/setup.sh"

log "building podmigrate"
(cd "$ROOT" && cargo build --release -p containerd-shim-migrate -p podmigrate-kubelet-plugin)
install -m 0755 "$ROOT/target/release/containerd-shim-migrate-v2" /usr/local/bin/
install -m 0755 "$ROOT/target/release/podmigrate" /usr/local/bin/
ln -sf podmigrate /usr/local/bin/kubectl-migrate
mkdir -p "$SHARE_ROOT" /var/lib/podmigrate/work

log "configuring containerd ($CONTAINERD_CONFIG) with the migrate runtime"
mkdir -p "$(dirname "$CONTAINERD_CONFIG")"
if [ ! -s "$CONTAINERD_CONFIG" ]; then
  containerd config default >"$CONTAINERD_CONFIG"
fi
if ! grep -q 'runtimes.migrate]' "$CONTAINERD_CONFIG"; then
  cp "$CONTAINERD_CONFIG" "$CONTAINERD_CONFIG.before-podmigrate"
  cat >>"$CONTAINERD_CONFIG" <<'TOML'

# podmigrate (see docs/containerd.md)
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.migrate]
  runtime_type = "io.containerd.runc.v2"
  runtime_path = "/usr/local/bin/containerd-shim-migrate-v2"
  pod_annotations = ["podmigrate.io/*"]
TOML
fi
# The shims inherit containerd's environment: that is where their settings come from.
mkdir -p /etc/systemd/system/containerd.service.d
cat >/etc/systemd/system/containerd.service.d/podmigrate.conf <<UNIT
[Service]
Environment=PODMIGRATE_SHARE_ROOT=$SHARE_ROOT
Environment=PODMIGRATE_WORK_DIR=/var/lib/podmigrate/work
Environment=NODE_NAME=$(hostname)
Environment=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
UNIT
systemctl daemon-reload
systemctl enable --now containerd
systemctl restart containerd

log "starting Kubernetes from $KUBE_ROOT (Ctrl-C stops it)"
cd "$KUBE_ROOT"
export CONTAINER_RUNTIME_ENDPOINT=unix:///run/containerd/containerd.sock
export IMAGE_SERVICE_ENDPOINT=$CONTAINER_RUNTIME_ENDPOINT
export CGROUP_DRIVER=${CGROUP_DRIVER:-cgroupfs}
export ALLOW_PRIVILEGED=true
log "in another shell: export KUBECONFIG=/var/run/kubernetes/admin.kubeconfig;"
log "  kubectl apply -f $ROOT/kubelet-plugin/deploy/  (RuntimeClass, RBAC, agent DaemonSet)"
exec hack/local-up-cluster.sh
