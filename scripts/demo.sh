#!/usr/bin/env bash
# The main job, on a fresh Debian bookworm-like machine, as root: migrates a live counter between
# the two nodes of a real Kubernetes cluster on this one machine.
#
#   scripts/demo.sh          kubectl migrate: steps 1 to 3 below
#   scripts/demo.sh drain    kubectl drain: steps 1 and 4 below
#   scripts/demo.sh --help   this text
#
#   1. scripts/local-up-cluster.sh up: installs what is missing (scripts/setup.sh), builds
#      Kubernetes (cached) and podmigrate, and brings up a stock control plane and two kubelets,
#      with podmigrate installed by `kubectl apply -f kubelet-plugin/deploy/`
#   2. the proof of concept's own workflow: a pod manifest with `spec.clonePod`, applied with
#      `kubectl migrate apply -f`, clones a live counter onto node-b
#   3. `kubectl apply` a migratable counter on node-a, count to 5, `kubectl migrate counter
#      --to node-b`, `kubectl get pods -o wide`, and the pod on node-b answers 6
#   4. (drain) `kubectl apply` a migratable counter StatefulSet (its pod starts on node-a: node-b
#      is cordoned meanwhile), count to 5, `kubectl drain node-a --ignore-daemonsets
#      --delete-emptydir-data`: the pod departs, checkpointed before it stops, and the
#      StatefulSet's new counter-0 restores the checkpoint on node-b; `kubectl get pods -o wide`,
#      the Departed and Replacing Events, counter-0 answers 6, and node-a is uncordoned
#
# The cluster is torn down on exit (Ctrl-C included); PODMIGRATE_DEMO_KEEP=1 leaves it up.
# The last two lines on success: the CLI's summary line, then `counter 5 -> 6` (drain: node-a
# uncordoned, then `counter-0 5 -> 6`).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
section() { printf '\n==== %s ====\n' "$*"; }
die() { printf 'demo.sh: error: %s\n' "$*" >&2; exit 1; }
# usage: the comment above, from its second line.
usage() { sed -n '2,/^set -euo pipefail/{/^#/s/^# \{0,1\}//p;}' "${BASH_SOURCE[0]}"; }

mode=migrate
cluster_up=0
case ${1:-} in
  "") ;;
  drain) mode=drain ;;
  -h | --help) usage; exit 0 ;;
  *) usage >&2; die "unknown mode '$1' (none, or drain)" ;;
esac
[ $# -le 1 ] || { usage >&2; die "one mode at most"; }
[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages; runs containerd, kubelet, runc and CRIU)"

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ "$mode" = drain ] && [ "$cluster_up" = 1 ]; then
    # A drain demo that stopped half-way leaves no node cordoned.
    kubectl uncordon node-a node-b --request-timeout=5s >/dev/null 2>&1 || true
  fi
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
cluster_up=1
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

# ready_again POD UID: waits until a pod named POD other than UID is Ready; prints its node.
ready_again() {
  local deadline=$((SECONDS + 120)) now
  while :; do
    now=$(kubectl get pod "$1" --ignore-not-found \
      -o jsonpath='{.metadata.uid} {.status.conditions[?(@.type=="Ready")].status} {.spec.nodeName}') || true
    case $now in
      "$2 "*) ;;
      *" True "*) echo "${now##* }"; return ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] || die "no new $1 ready within 120 s"
    sleep 1
  done
}

# drain_demo: step 4 (scripts/demo.sh drain).
drain_demo() {
  section "kubectl apply a migratable counter StatefulSet (node-b cordoned while it starts on node-a)"
  kubectl cordon node-b
  kubectl apply -f - <<'MANIFEST'
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: counter
spec:
  serviceName: counter
  replicas: 1
  selector:
    matchLabels: {app: counter}
  template:
    metadata:
      labels: {app: counter, podmigrate.io/migratable: "true"}
    spec:
      runtimeClassName: migrate
      terminationGracePeriodSeconds: 30   # the departure's checkpoint must fit in it
      containers:
        - name: counter
          image: localhost/podmigrate/counter:dev
          ports: [{containerPort: 8080}]
          readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
MANIFEST
  kubectl rollout status statefulset/counter --timeout=120s
  kubectl uncordon node-b
  [ "$(kubectl get pod counter-0 -o jsonpath='{.spec.nodeName}')" = node-a ] || die "counter-0 is not on node-a"
  local uid before after node
  uid=$(kubectl get pod counter-0 -o jsonpath='{.metadata.uid}')
  for _ in 1 2 3 4; do count counter-0 >/dev/null; done
  before=$(count counter-0)
  printf 'counter-0 on node-a answers %s\n' "$before"

  section "kubectl drain node-a --ignore-daemonsets --delete-emptydir-data"
  kubectl drain node-a --ignore-daemonsets --delete-emptydir-data --timeout=240s
  # The StatefulSet makes counter-0 again once the departed one is gone, and it restores the
  # checkpoint wherever it is scheduled: node-b, node-a being cordoned.
  node=$(ready_again counter-0 "$uid")
  kubectl get pods -o wide
  [ "$node" = node-b ] || die "the new counter-0 is on $node, not node-b"
  echo
  kubectl get events --field-selector involvedObject.name=counter-0 \
    -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message |
    grep -E '^TYPE|Depart|Replacing|StartedFresh' || true
  after=$(count counter-0)
  echo
  kubectl uncordon node-a
  echo "counter-0 $before -> $after"
  [ "$after" -eq $((before + 1)) ] || die "the counter did not continue: $before -> $after"
}

if [ "$mode" = drain ]; then
  drain_demo
  exit 0
fi

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
