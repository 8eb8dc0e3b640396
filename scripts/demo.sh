#!/usr/bin/env bash
# The main job, on a fresh Debian bookworm-like machine, as root: migrates a live counter between
# the two nodes of a real Kubernetes cluster on this one machine.
#
#   1. scripts/local-up-cluster.sh up: installs what is missing (scripts/setup.sh), builds
#      Kubernetes (cached) and podmigrate, and brings up a stock control plane and two kubelets,
#      with podmigrate installed by `kubectl apply -f kubelet-plugin/deploy/`
#   2. the proof of concept's own workflow: a pod manifest with `spec.clonePod`, applied with
#      `kubectl migrate apply -f`, clones a live counter onto node-b
#   3. `kubectl apply` a migratable counter on node-a, count to 5, `kubectl migrate counter
#      --to node-b`, `kubectl get pods -o wide`, and the pod on node-b answers 6
#
# The cluster is torn down on exit (Ctrl-C included); PODMIGRATE_DEMO_KEEP=1 leaves it up.
# The last two lines on success: the CLI's summary line, then `counter 5 -> 6`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
section() { printf '\n==== %s ====\n' "$*"; }
die() { printf 'demo.sh: error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages; runs containerd, kubelet, runc and CRIU)"

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ "${PODMIGRATE_DEMO_KEEP:-0}" = 1 ]; then
    printf '\nThe cluster stays up (PODMIGRATE_DEMO_KEEP=1): scripts/local-up-cluster.sh down ends it.\n' >&2
  else
    bash scripts/local-up-cluster.sh down || true
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

section "a two-node Kubernetes cluster (scripts/local-up-cluster.sh up)"
env_lines=$(bash scripts/local-up-cluster.sh up)
eval "export ${env_lines//$'\n'/; export }"
kubectl version 2>/dev/null | sed 's/^/  /'

# count POD: the counter's next count, from the pod's own IP.
count() {
  local ip
  ip=$(kubectl get pod "$1" -o jsonpath='{.status.podIP}')
  [ -n "$ip" ] || die "pod $1 has no IP"
  curl -fsS --max-time 5 "http://$ip:8080/" | tr -d '[:space:]'
}

# counter_pod NAME NODE: a migratable counter pinned to NODE (kubectl apply).
counter_pod() {
  kubectl apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $1
  labels: {app: counter, podmigrate.io/migratable: "true"}
spec:
  runtimeClassName: migrate
  nodeSelector: {kubernetes.io/hostname: $2}
  containers:
    - name: counter
      image: localhost/podmigrate/counter:dev
      ports: [{containerPort: 8080}]
      readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
EOF
  kubectl wait --for=condition=Ready "pod/$1" --timeout=120s >/dev/null
}

section "the proof of concept's workflow: spec.clonePod, applied with kubectl migrate apply -f"
counter_pod seed node-a
for _ in 1 2; do count seed >/dev/null; done
printf 'seed on node-a answers %s\n' "$(count seed)"
cat >/tmp/podmigrate-demo-clone.yaml <<'EOF'
apiVersion: v1
kind: Pod
metadata:
  name: seed-clone
spec:
  clonePod: seed      # the proof of concept's field; kubectl migrate apply makes it the annotation
  nodeName: node-b
  containers:
    - name: counter
      image: localhost/podmigrate/counter:dev
EOF
cat /tmp/podmigrate-demo-clone.yaml
kubectl migrate apply -f /tmp/podmigrate-demo-clone.yaml
kubectl wait --for=condition=Ready pod/seed-clone --timeout=120s >/dev/null
printf 'seed-clone on node-b answers %s (it carried on from the checkpoint)\n' "$(count seed-clone)"
kubectl delete pod seed seed-clone --wait=false >/dev/null

section "kubectl apply a migratable counter on node-a"
counter_pod counter node-a
for _ in 1 2 3 4; do count counter >/dev/null; done
before=$(count counter)
printf 'counter on node-a answers %s\n' "$before"

section "kubectl migrate counter --to node-b"
summary_file=$(mktemp)
kubectl migrate counter --to node-b | tee "$summary_file"
summary=$(tail -n 1 "$summary_file")
rm -f "$summary_file"
kubectl get pods -o wide
clone=$(kubectl get pods -l podmigrate.io/clone-of=counter -o jsonpath='{.items[0].metadata.name}')
[ -n "$clone" ] || die "no pod labelled podmigrate.io/clone-of=counter"
[ "$(kubectl get pod "$clone" -o jsonpath='{.spec.nodeName}')" = node-b ] || die "$clone is not on node-b"
after=$(count "$clone")

echo
echo "$summary"
echo "counter $before -> $after"
[ "$after" -eq $((before + 1)) ] || die "the counter did not continue: $before -> $after"
