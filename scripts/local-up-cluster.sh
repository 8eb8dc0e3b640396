#!/usr/bin/env bash
# A real two-node Kubernetes cluster on this one machine, with podmigrate installed the way an
# operator installs it. Every component is stock and unpatched (scripts/kube-build.sh builds
# Kubernetes from source; containerd, runc, CRIU and the CNI plugins are Debian's).
#
#   scripts/local-up-cluster.sh up     # tear down what is left, then bring the cluster up
#   scripts/local-up-cluster.sh down   # stop everything; no namespace, mount or process is left
#   scripts/local-up-cluster.sh status # one line per component
#   scripts/local-up-cluster.sh kubelet NODE stop|start   # what a node restart does to kubelet
#   scripts/local-up-cluster.sh containerd NODE stop|start # containerd alone; its shims run on
#   scripts/local-up-cluster.sh link NODE down|up         # the node's only network link, cut or back
#
# The control plane runs on the host: etcd, kube-apiserver (TLS, RBAC and NodeRestriction on,
# certificates made here), kube-scheduler and kube-controller-manager. Each node (node-a, node-b)
# is a network namespace on a host bridge, with its own mount namespace in which the usual node
# paths (/run/containerd, /var/lib/kubelet, /var/lib/containerd, /etc/cni/net.d, /var/log/pods,
# /var/lib/podmigrate/work, ...) are the node's own directories, its own cgroup parent, and its
# own containerd (the `migrate` runtime as docs/containerd.md tells operators), stock kubelet
# (its own client certificate) and kube-proxy. Pods get IPs from the node's pod CIDR through
# Debian's CNI bridge plugin; pod IPs are routed from the host and between the nodes. The share
# is one directory bound at /var/lib/podmigrate/share on every node.
#
# podmigrate is then installed: the shim on the nodes, the images (agent, counter, pause) built
# with buildah and imported into each node's containerd, and `kubectl apply -f
# kubelet-plugin/deploy/`, so the agent runs as a DaemonSet under its own RBAC.
#
# `up` ends by printing KUBECONFIG=<path> and a PATH that has kubectl and kubectl-migrate.
#
# Environment:
#   PODMIGRATE_CLUSTER_INDEX a second cluster beside the first: 1-9 (default 0); its state is
#                            /var/lib/podmigrate/cluster-<index>, its addresses 10.214.<index>.0/24
#   PODMIGRATE_CLUSTER_DIR   state, certificates and logs (default /var/lib/podmigrate/cluster)
#   PODMIGRATE_SKIP_BUILD=1  use the binaries already in target/release (scripts/test.sh built them)
#   PODMIGRATE_CONTAINERD_BIN_DIR  the nodes' containerd, ctr and runc shim (default: containerd's
#                            on PATH); a 1.6 gets docs/containerd.md's 1.6 stanza
#   PODMIGRATE_SHARE=smb     serve the share over SMB (smbd on the host, smbnetfs on each node;
#                            docs/operations.md, "The share over SMB") instead of a bound directory
#   PODMIGRATE_AGENT_ARGS    extra arguments for `podmigrate agent` (patched into the DaemonSet)
#   KUBE_VERSION             the Kubernetes release to build (scripts/kube-build.sh)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# A second cluster beside the first (its own addresses, namespaces, cgroups and state): 1-9.
IDX=${PODMIGRATE_CLUSTER_INDEX:-0}
[[ $IDX =~ ^[0-9]$ ]] || { echo "[local-up] error: PODMIGRATE_CLUSTER_INDEX must be 0-9, not $IDX" >&2; exit 1; }
SUFFIX=$([ "$IDX" = 0 ] || echo "-$IDX")
STATE=${PODMIGRATE_CLUSTER_DIR:-/var/lib/podmigrate/cluster$SUFFIX}
NODES=(node-a node-b)
declare -A NODE_IP=([node-a]=10.214.$IDX.2 [node-b]=10.214.$IDX.3)
declare -A POD_CIDR=([node-a]=10.244.$((IDX * 2 + 1)).0/24 [node-b]=10.244.$((IDX * 2 + 2)).0/24)
BRIDGE=pmk$IDX
HOST_IP=10.214.$IDX.1
NODE_PREFIX=24
CLUSTER_CIDR=10.244.0.0/16
SERVICE_CIDR=10.96.0.0/16
KUBERNETES_SVC_IP=10.96.0.1
ETCD_PORT=$((12379 + IDX * 10))
ETCD_PEER_PORT=$((12380 + IDX * 10))
API_PORT=6443
# Where containerd, ctr and containerd-shim-runc-v2 come from (scripts/setup.sh extracts 1.6 to
# /var/cache/podmigrate/containerd-1.6/root/usr/bin).
CONTAINERD_BIN=${PODMIGRATE_CONTAINERD_BIN_DIR:-$(dirname "$(command -v containerd 2>/dev/null || echo /usr/bin/containerd)")}
SHARE_IN_NODE=/var/lib/podmigrate/share
# The share: one host directory bound into every node, or (smb) that directory served by a
# private smbd on the host bridge and mounted on each node through FUSE (smbnetfs).
SHARE_KIND=${PODMIGRATE_SHARE:-directory}
SMB_SHARE_NAME=podmigrate
# The node paths each node has for its own (bound from $STATE/nodes/<node>/root/<path>);
# /run/netns too, so the pods' network namespaces (containerd's cni-*) stay with their node.
NODE_PATHS=(/run/containerd /var/lib/containerd /var/lib/kubelet /var/log/pods /var/log/containers
  /etc/cni/net.d /var/lib/cni /var/lib/podmigrate/work /var/lib/podmigrate/keys /run/podmigrate
  /etc/containerd /etc/kubernetes /run/netns)

log() { printf "[local-up %4ss] %s\n" "$SECONDS" "$*" >&2; }
die() { printf '[local-up] error: %s\n' "$*" >&2; exit 1; }

netns_of() { printf 'podmigrate%s-%s' "$SUFFIX" "$1"; }
mntns_of() { printf '%s/ns/%s.mnt' "$STATE" "$1"; }
cgroup_of() { printf 'podmigrate%s-%s' "$SUFFIX" "$1"; }
veth_of() { printf 'pmk%s-%s' "$IDX" "${1#node-}"; }
kubectl_() { "$STATE/bin/kubectl" --kubeconfig "$STATE/admin.kubeconfig" "$@"; }

# Every cgroup v1 hierarchy and the unified one, as mounted here.
cgroup_roots() {
  local d
  for d in /sys/fs/cgroup/*/; do [ -f "${d}cgroup.procs" ] && printf '%s\n' "${d%/}"; done
}

# wait_for SECONDS WHAT LOG COMMAND...: polls COMMAND every half second.
wait_for() {
  local secs=$1 what=$2 logf=$3; shift 3
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      [ -f "$logf" ] && tail -n 20 "$logf" >&2
      die "$what not ready after ${secs}s (log: $logf)"
    fi
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------------------------
# Processes: each has a pid file and a log; a node's run inside its namespaces and cgroup.

start_host() { # NAME COMMAND...
  local name=$1; shift
  setsid "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/pids/$name.pid"
}

start_on_node() { # NODE NAME COMMAND...
  local node=$1 name=$2; shift 2
  local cg; cg=$(cgroup_of "$node")
  # The process joins the node's cgroup in every hierarchy before it execs, so `down` finds it
  # and everything it starts (shims, containers) there.
  setsid nsenter --net="/run/netns/$(netns_of "$node")" --mount="$(mntns_of "$node")" -- \
    sh -c 'cg=$1; shift; for r in /sys/fs/cgroup/*/; do [ -f "$r$cg/cgroup.procs" ] && echo $$ >"$r$cg/cgroup.procs"; done; exec "$@"' \
    sh "$cg" env NODE_NAME="$node" "$@" >>"$STATE/logs/$node-$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/pids/$node-$name.pid"
}

on_node() { # NODE COMMAND...: runs a command in the node's namespaces, in the foreground.
  local node=$1; shift
  nsenter --net="/run/netns/$(netns_of "$node")" --mount="$(mntns_of "$node")" -- "$@"
}

# ---------------------------------------------------------------------------------------------
# Certificates

gen_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
# sign NAME SUBJECT [SANS] [EXT_USAGE]: a key and a CA-signed certificate in $STATE/pki.
sign() {
  local name=$1 subj=$2 sans=${3:-} usage=${4:-clientAuth}
  local pki=$STATE/pki ext=$STATE/pki/$1.ext
  gen_key "$pki/$name.key"
  openssl req -new -key "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    [ -z "$sans" ] || echo "subjectAltName=$sans"
  } >"$ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$ext"
}

# kubeconfig FILE CERT_NAME: a kubeconfig for the API server with that client certificate.
kubeconfig() {
  local file=$1 name=$2 pki=$STATE/pki
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: podmigrate
  cluster:
    server: https://${HOST_IP}:${API_PORT}
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: ${name}
  user:
    client-certificate-data: $(base64 -w0 "$pki/$name.crt")
    client-key-data: $(base64 -w0 "$pki/$name.key")
contexts:
- name: podmigrate
  context: {cluster: podmigrate, user: ${name}}
current-context: podmigrate
EOF
  chmod 0600 "$file"
}

make_pki() {
  local pki=$STATE/pki n
  mkdir -p "$pki" && chmod 0700 "$pki"
  gen_key "$pki/ca.key"
  openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=podmigrate-local-ca" -days 365 -sha256 \
    -out "$pki/ca.crt" 2>/dev/null
  sign apiserver "/CN=kube-apiserver" \
    "IP:${HOST_IP},IP:${KUBERNETES_SVC_IP},IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
    serverAuth
  sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  sign admin "/O=system:masters/CN=podmigrate-admin"
  sign controller-manager "/CN=system:kube-controller-manager"
  sign scheduler "/CN=system:kube-scheduler"
  sign kube-proxy "/CN=system:kube-proxy"
  for n in "${NODES[@]}"; do
    sign "kubelet-$n" "/O=system:nodes/CN=system:node:$n"
    sign "kubelet-$n-serving" "/CN=$n" "IP:${NODE_IP[$n]},DNS:$n" serverAuth
  done
  gen_key "$pki/sa.key"
  openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  kubeconfig "$STATE/admin.kubeconfig" admin
  kubeconfig "$STATE/controller-manager.kubeconfig" controller-manager
  kubeconfig "$STATE/scheduler.kubeconfig" scheduler
  kubeconfig "$STATE/kube-proxy.kubeconfig" kube-proxy
  for n in "${NODES[@]}"; do kubeconfig "$STATE/kubelet-$n.kubeconfig" "kubelet-$n"; done
}

# ---------------------------------------------------------------------------------------------
# Network: a host bridge, one veth per node, routes for the pod CIDRs.

make_network() {
  local n other ns veth
  ip link add "$BRIDGE" type bridge
  ip addr add "${HOST_IP}/${NODE_PREFIX}" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for n in "${NODES[@]}"; do
    ns=$(netns_of "$n") veth=$(veth_of "$n")
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "${NODE_IP[$n]}/${NODE_PREFIX}" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$HOST_IP"
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
    ip route add "${POD_CIDR[$n]}" via "${NODE_IP[$n]}" dev "$BRIDGE"
    for other in "${NODES[@]}"; do
      [ "$other" = "$n" ] || ip -n "$ns" route add "${POD_CIDR[$other]}" via "${NODE_IP[$other]}"
    done
  done
}

# ---------------------------------------------------------------------------------------------
# A node: mount namespace, cgroup, containerd, images, kubelet, kube-proxy.

make_node_namespace() {
  local n=$1 p src mnt
  mnt=$(mntns_of "$n")
  touch "$mnt"
  unshare --mount="$mnt" --propagation private true
  for p in "${NODE_PATHS[@]}"; do
    src=$STATE/nodes/$n/root$p
    mkdir -p "$src" "$p"
    on_node "$n" mount --bind "$src" "$p"
  done
  mkdir -p "$STATE/share" "$SHARE_IN_NODE" /dev/shm/podmigrate
  [ "$SHARE_KIND" = smb ] || on_node "$n" mount --bind "$STATE/share" "$SHARE_IN_NODE"
  # The shims' memory work space (PODMIGRATE_MEMORY_DIR's default): memory-backed, the node's own.
  on_node "$n" mount -t tmpfs -o mode=0700 "$(cgroup_of "$n")" /dev/shm/podmigrate
  # Shared within the node, as systemd leaves a real node's mounts (mountPropagation needs it);
  # these peer groups are the node's own, so nothing propagates to the host or the other node.
  on_node "$n" mount --make-rshared /
}

make_node_cgroup() {
  local cg r; cg=$(cgroup_of "$1")
  while read -r r; do
    mkdir -p "$r/$cg"
    if [ -f "$r/cpuset.cpus" ]; then
      cat "$r/cpuset.cpus" >"$r/$cg/cpuset.cpus"
      cat "$r/cpuset.mems" >"$r/$cg/cpuset.mems"
    fi
  done < <(cgroup_roots)
}

# The migrate handler as docs/containerd.md gives it for this containerd: the 1.7 stanza from
# 1.7.1 on, the 1.6 stanza (our shim found by its runtime type on containerd's PATH, runc's
# options in a file of their own) before.
migrate_stanza() {
  if [[ $("$CONTAINERD_BIN/containerd" --version | awk '{print $3}') =~ ^v?1\.6\. ]]; then
    cat <<EOF
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.migrate]
      runtime_type = "io.containerd.runc.migrate.v2"
      pod_annotations = ["podmigrate.io/*"]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.migrate.options]
        ConfigPath = "/etc/containerd/podmigrate-runc.toml"
EOF
  else
    cat <<EOF
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.migrate]
      runtime_type = "io.containerd.runc.v2"
      runtime_path = "/usr/local/bin/containerd-shim-migrate-v2"
      pod_annotations = ["podmigrate.io/*"]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.migrate.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
EOF
  fi
}

write_node_config() {
  local n=$1 root=$STATE/nodes/$1/root
  printf 'BinaryName = "/usr/sbin/runc"\nSystemdCgroup = false\n' >"$root/etc/containerd/podmigrate-runc.toml"
  # containerd: docs/containerd.md's stanza beside an ordinary runc handler.
  cat >"$root/etc/containerd/config.toml" <<EOF
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/podmigrate/pause:1"
  # Root here lacks CAP_SYS_RESOURCE: an oom_score_adj below containerd's own (kubelet asks
  # -998 for the pause container) would fail in runc's nsexec.
  restrict_oom_score_adj = true
  # The same on every machine: no host-dependent confinement (it would also bind CRIU restores).
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false

    # podmigrate (docs/containerd.md)
$(migrate_stanza)
EOF
  cat >"$root/etc/cni/net.d/10-podmigrate.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "podmigrate",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "${POD_CIDR[$n]}"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  local pki=$STATE/pki
  cat >"$root/etc/kubernetes/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# These machines run cgroup v1, which kubelet 1.35+ refuses unless told otherwise.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$(cgroup_of "$n")
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: ${NODE_IP[$n]}
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: ${pki}/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: ${pki}/kubelet-$n-serving.crt
tlsPrivateKeyFile: ${pki}/kubelet-$n-serving.key
clusterDomain: cluster.local
failSwapOn: false
resolvConf: /etc/resolv.conf
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
serializeImagePulls: false
EOF
}

# smbd on the host bridge's address, serving $STATE/share as //HOST_IP/podmigrate to root.
start_smb() {
  local smb=$STATE/smb d password
  for d in lock state cache pid private ncalrpc log; do mkdir -p "$smb/$d"; done
  cat >"$smb/smb.conf" <<EOF
[global]
  server role = standalone server
  interfaces = ${HOST_IP}
  bind interfaces only = yes
  smb ports = 445
  disable netbios = yes
  server min protocol = SMB2_10
  lock directory = $smb/lock
  state directory = $smb/state
  cache directory = $smb/cache
  pid directory = $smb/pid
  private dir = $smb/private
  ncalrpc dir = $smb/ncalrpc
  passdb backend = tdbsam:$smb/private/passdb.tdb
  log file = $STATE/logs/smbd.log
  load printers = no
  printing = bsd
  printcap name = /dev/null
  disable spoolss = yes
  # A client's fsync is the server's fsync: the archive's commit relies on it.
  strict sync = yes
[${SMB_SHARE_NAME}]
  path = $STATE/share
  read only = no
  valid users = root
EOF
  password=$(openssl rand -hex 12)
  printf '%s\n%s\n' "$password" "$password" | smbpasswd -c "$smb/smb.conf" -s -a root >/dev/null \
    || die "smbpasswd -a root failed"
  (umask 077 && printf '%s\n' "$password" >"$smb/password")
  start_host smbd smbd --foreground --no-process-group -s "$smb/smb.conf"
  wait_for 30 smbd "$STATE/logs/smbd.log" bash -c "exec 3<>/dev/tcp/${HOST_IP}/445"
}

# smbnetfs in the node's namespaces at /run/podmigrate/smb; the share is bound from there.
mount_smb_on_node() {
  local n=$1 home=$STATE/nodes/$1/smbnetfs mnt=/run/podmigrate/smb
  mkdir -p -m 0700 "$home/.smb"
  (umask 077
    printf '[global]\n  client min protocol = SMB2_10\n  client max protocol = SMB3\n' >"$home/.smb/smb.conf"
    printf 'smb_query_browsers "false"\nauth "%s" "root" "%s"\nhost "%s" visible=true\n' \
      "$HOST_IP" "$(cat "$STATE/smb/password")" "$HOST_IP" >"$home/.smb/smbnetfs.conf")
  on_node "$n" mkdir -p "$mnt"
  start_on_node "$n" smbnetfs env HOME="$home" smbnetfs "$mnt" -f -o \
    "config=$home/.smb/smbnetfs.conf,log_file=$STATE/logs/$n-smbnetfs-fuse.log,entry_timeout=0,attr_timeout=0,negative_timeout=0,big_writes,max_write=131072"
  wait_for 30 "the SMB share on $n" "$STATE/logs/$n-smbnetfs.log" \
    on_node "$n" test -d "$mnt/$HOST_IP/$SMB_SHARE_NAME"
  on_node "$n" mount --bind "$mnt/$HOST_IP/$SMB_SHARE_NAME" "$SHARE_IN_NODE"
}

start_kubelet() {
  local n=$1
  start_on_node "$n" kubelet "$STATE/bin/kubelet" \
    --config=/etc/kubernetes/kubelet.yaml \
    --kubeconfig="$STATE/kubelet-$n.kubeconfig" \
    --hostname-override="$n" --node-ip="${NODE_IP[$n]}" -v=2
}

stop_kubelet() {
  local f=$STATE/pids/$1-kubelet.pid
  [ -f "$f" ] || die "no kubelet of $1 is running"
  kill_pidfile "$f"
  for _ in $(seq 1 100); do kill -0 "$(cat "$f")" 2>/dev/null || { rm -f "$f"; return 0; }; sleep 0.1; done
  kill -KILL "$(cat "$f")" 2>/dev/null || true
  rm -f "$f"
}

start_containerd() {
  local n=$1
  # containerd's own directory first on its PATH, so its runc shim serves the runc handler,
  # and our shim delegates to that same runc shim.
  start_on_node "$n" containerd \
    env PODMIGRATE_SHARE_ROOT="$SHARE_IN_NODE" \
    PODMIGRATE_DELEGATE_SHIM="$CONTAINERD_BIN/containerd-shim-runc-v2" \
    PATH="$CONTAINERD_BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    "$CONTAINERD_BIN/containerd" --config /etc/containerd/config.toml
  wait_for 30 "containerd on $n" "$STATE/logs/$n-containerd.log" \
    on_node "$n" "$CONTAINERD_BIN/ctr" --address /run/containerd/containerd.sock version
}

# What `systemctl restart containerd` stops (KillMode=process): containerd alone; the shims and
# their containers run on, and containerd finds them again when it starts.
stop_containerd() {
  local f=$STATE/pids/$1-containerd.pid pid
  [ -f "$f" ] || die "no containerd of $1 is running"
  pid=$(cat "$f")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$f"
}

start_node() {
  local n=$1 ns pki=$STATE/pki
  ns=$(netns_of "$n")
  start_containerd "$n"
  local img
  for img in "$STATE"/images/*.tar; do
    [ -e "$img" ] || continue
    on_node "$n" "$CONTAINERD_BIN/ctr" --address /run/containerd/containerd.sock -n k8s.io images import \
      --no-unpack=false "$img" >/dev/null || die "importing $(basename "$img") into $n's containerd failed"
  done
  start_kubelet "$n"
  cat >"$STATE/nodes/$n/root/etc/kubernetes/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: ${STATE}/kube-proxy.kubeconfig}
hostnameOverride: $n
mode: iptables
clusterCIDR: ${CLUSTER_CIDR}
bindAddress: ${NODE_IP[$n]}
healthzBindAddress: ${NODE_IP[$n]}:10256
metricsBindAddress: 127.0.0.1:10249
conntrack: {maxPerCore: 0}
EOF
  start_on_node "$n" kube-proxy "$STATE/bin/kube-proxy" --config=/etc/kubernetes/kube-proxy.yaml
}

# ---------------------------------------------------------------------------------------------

build_everything() {
  log "installing what is missing (scripts/setup.sh)"
  bash "$ROOT/scripts/setup.sh" >&2
  . "$ROOT/scripts/toolchain.sh" >&2
  KBIN=$(bash "$ROOT/scripts/kube-build.sh")
  if [ "${PODMIGRATE_SKIP_BUILD:-0}" != 1 ]; then
    log "cargo build --release --workspace"
    (cd "$ROOT" && cargo build --release --workspace >&2)
  fi
}

up() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (namespaces, mounts, containerd, kubelet)"
  case $SHARE_KIND in directory|smb) ;; *) die "PODMIGRATE_SHARE must be directory or smb, not $SHARE_KIND" ;; esac
  build_everything
  down_quietly
  rm -rf "$STATE/logs"
  local start n; start=$(date +%s)
  mkdir -p "$STATE"/{bin,logs,pids,ns,images,etcd}
  for n in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
    ln -sf "$KBIN/$n" "$STATE/bin/$n"
  done
  install -m 0755 "$ROOT/target/release/podmigrate" "$STATE/bin/podmigrate"
  ln -sf podmigrate "$STATE/bin/kubectl-migrate"
  # The shim, installed on the nodes as docs/containerd.md says (the nodes share this host's /usr).
  install -m 0755 "$ROOT/target/release/containerd-shim-migrate-v2" /usr/local/bin/
  log "images (buildah)"
  bash "$ROOT/scripts/images.sh" "$STATE/images" >&2
  log "certificates"
  make_pki
  # The persistent mount namespaces need a private mount to live on.
  mount --bind "$STATE/ns" "$STATE/ns" && mount --make-private "$STATE/ns"
  log "network: bridge $BRIDGE ${HOST_IP}/${NODE_PREFIX}, nodes ${NODE_IP[*]}"
  make_network

  log "control plane"
  start_host etcd etcd --name podmigrate --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:${ETCD_PORT}" --advertise-client-urls "http://127.0.0.1:${ETCD_PORT}" \
    --listen-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-cluster "podmigrate=http://127.0.0.1:${ETCD_PEER_PORT}" --listen-metrics-urls "" --log-level warn
  local pki=$STATE/pki
  start_host kube-apiserver "$STATE/bin/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:${ETCD_PORT}" \
    --bind-address="$HOST_IP" --advertise-address="$HOST_IP" --secure-port="$API_PORT" \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$pki/ca.crt" \
    --kubelet-preferred-address-types=InternalIP \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --allow-privileged=true --profiling=false
  wait_for 60 kube-apiserver "$STATE/logs/kube-apiserver.log" kubectl_ get --raw /readyz
  start_host kube-controller-manager "$STATE/bin/kube-controller-manager" \
    --kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --bind-address="$HOST_IP" --secure-port=10257 --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
    --cluster-cidr="$CLUSTER_CIDR" --service-cluster-ip-range="$SERVICE_CIDR"
  start_host kube-scheduler "$STATE/bin/kube-scheduler" \
    --kubeconfig="$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig="$STATE/scheduler.kubeconfig" \
    --authorization-kubeconfig="$STATE/scheduler.kubeconfig" \
    --bind-address="$HOST_IP" --secure-port=10259 --leader-elect=false

  if [ "$SHARE_KIND" = smb ]; then
    log "the share over SMB: //${HOST_IP}/${SMB_SHARE_NAME}"
    start_smb
  fi
  for n in "${NODES[@]}"; do
    log "node $n: ${NODE_IP[$n]}, pods ${POD_CIDR[$n]}"
    make_node_namespace "$n"
    make_node_cgroup "$n"
    [ "$SHARE_KIND" != smb ] || mount_smb_on_node "$n"
    write_node_config "$n"
    start_node "$n"
  done
  for n in "${NODES[@]}"; do
    wait_for 90 "node $n registered" "$STATE/logs/$n-kubelet.log" kubectl_ get node "$n"
    kubectl_ patch node "$n" --type merge \
      -p "{\"spec\":{\"podCIDR\":\"${POD_CIDR[$n]}\",\"podCIDRs\":[\"${POD_CIDR[$n]}\"]}}" >/dev/null
  done
  kubectl_ wait --for=condition=Ready node --all --timeout=120s >/dev/null \
    || die "nodes not Ready: $(kubectl_ get nodes --no-headers 2>&1 | tr '\n' ';')"

  log "podmigrate: kubectl apply -f kubelet-plugin/deploy/"
  wait_for 60 "the default ServiceAccount" "$STATE/logs/kube-controller-manager.log" \
    kubectl_ -n default get serviceaccount default
  kubectl_ apply -f "$ROOT/kubelet-plugin/deploy/" >&2
  if [ -n "${PODMIGRATE_AGENT_ARGS:-}" ]; then
    local args; args=$(printf '"%s",' agent --log-format json ${PODMIGRATE_AGENT_ARGS})
    kubectl_ -n podmigrate-system patch daemonset podmigrate-agent --type json \
      -p "[{\"op\":\"replace\",\"path\":\"/spec/template/spec/containers/0/args\",\"value\":[${args%,}]}]" >&2
  fi
  kubectl_ -n podmigrate-system rollout status daemonset/podmigrate-agent --timeout=120s >&2 \
    || die "the podmigrate agent DaemonSet did not roll out: $(kubectl_ -n podmigrate-system get pods -o wide --no-headers 2>&1 | tr '\n' ';')"
  kubectl_ get nodes -o wide >&2
  printf '%s\n' "$SHARE_KIND" >"$STATE/share-kind"
  log "up in $(( $(date +%s) - start ))s"
  printf 'KUBECONFIG=%s\n' "$STATE/admin.kubeconfig"
  printf 'PATH=%s:$PATH\n' "$STATE/bin"
}

# ---------------------------------------------------------------------------------------------

kill_pidfile() {
  local f=$1 pid
  pid=$(cat "$f" 2>/dev/null) || return 0
  [ -n "$pid" ] || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
}

# Kills every process in a node's cgroup (containerd, shims, containers, kubelet, kube-proxy)
# and removes the cgroups, deepest first.
kill_node_cgroup() {
  local cg=$1 r pids tries
  for tries in $(seq 1 50); do
    pids=$(cgroup_roots | while read -r r; do
      if [ -d "$r/$cg" ]; then find "$r/$cg" -name cgroup.procs -exec cat {} + 2>/dev/null || true; fi
    done | sort -u)
    [ -z "$pids" ] && break
    # A frozen container would not die: thaw it first.
    find /sys/fs/cgroup/freezer/"$cg" -name freezer.state 2>/dev/null | while read -r f; do
      echo THAWED >"$f" 2>/dev/null || true
    done
    kill -KILL $pids 2>/dev/null || true
    sleep 0.2
  done
  cgroup_roots | while read -r r; do
    if [ -d "$r/$cg" ]; then find "$r/$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || true; fi
  done
}

down_quietly() {
  local f n ns
  [ -d "$STATE/pids" ] && for f in "$STATE"/pids/*.pid; do [ -e "$f" ] && kill_pidfile "$f"; done
  for n in "${NODES[@]}"; do kill_node_cgroup "$(cgroup_of "$n")"; done
  [ -d "$STATE/pids" ] && for f in "$STATE"/pids/*.pid; do
    [ -e "$f" ] || continue
    for _ in $(seq 1 50); do kill -0 "$(cat "$f")" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
  for n in "${NODES[@]}"; do
    umount "$(mntns_of "$n")" 2>/dev/null || true
    ns=$(netns_of "$n")
    ip netns del "$ns" 2>/dev/null || true
    ip link del "$(veth_of "$n")" 2>/dev/null || true
    ip route del "${POD_CIDR[$n]}" 2>/dev/null || true
  done
  umount "$STATE/ns" 2>/dev/null || true
  ip link del "$BRIDGE" 2>/dev/null || true
  # State goes; the logs stay for a look after a failure (the next `up` starts them afresh).
  [ ! -d "$STATE" ] || find "$STATE" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
}

down() {
  [ "$(id -u)" -eq 0 ] || die "must run as root"
  down_quietly
  log "down: no node namespaces, mounts or processes left"
}

status() {
  local f name
  for f in "$STATE"/pids/*.pid; do
    [ -e "$f" ] || { echo "not up"; return 1; }
    name=$(basename "$f" .pid)
    if kill -0 "$(cat "$f")" 2>/dev/null; then printf '%-26s running\n' "$name"; else printf '%-26s stopped\n' "$name"; fi
  done
  kubectl_ get nodes -o wide 2>/dev/null || true
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  kubelet)
    node=${2:-}; [ -n "${NODE_IP[$node]:-}" ] || die "no node ${node:-(none)}: the nodes are ${NODES[*]}"
    case ${3:-} in
      stop) stop_kubelet "$node" ;;
      start) [ ! -f "$STATE/pids/$node-kubelet.pid" ] || die "$node's kubelet is running"; start_kubelet "$node" ;;
      *) die "usage: scripts/local-up-cluster.sh kubelet NODE stop|start" ;;
    esac ;;
  containerd)
    node=${2:-}; [ -n "${NODE_IP[$node]:-}" ] || die "no node ${node:-(none)}: the nodes are ${NODES[*]}"
    case ${3:-} in
      stop) stop_containerd "$node" ;;
      start) [ ! -f "$STATE/pids/$node-containerd.pid" ] || die "$node's containerd is running"; start_containerd "$node" ;;
      *) die "usage: scripts/local-up-cluster.sh containerd NODE stop|start" ;;
    esac ;;
  link)
    node=${2:-}; [ -n "${NODE_IP[$node]:-}" ] || die "no node ${node:-(none)}: the nodes are ${NODES[*]}"
    case ${3:-} in
      down|up) ip link set "$(veth_of "$node")" "$3" ;;
      *) die "usage: scripts/local-up-cluster.sh link NODE down|up" ;;
    esac ;;
  *) die "usage: scripts/local-up-cluster.sh up | down | status | kubelet|containerd NODE stop|start | link NODE down|up" ;;
esac
