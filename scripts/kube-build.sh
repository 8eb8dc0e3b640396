#!/usr/bin/env bash
# Builds stock Kubernetes (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
# kube-proxy, kubectl) from the Go module proxy, unpatched, and caches the binaries by version:
#   /var/cache/podmigrate/kubernetes/<version>/bin/
# Prints that bin directory on stdout; progress goes to stderr. A cached build is reused.
#
# k8s.io/kubernetes' module zip lacks its staging/ tree, and a dependency's replace directives are
# ignored, so a small wrapper module requires k8s.io/kubernetes and replaces every staging module
# it names with the matching published v0.<minor>.<patch>. The version is stamped the way
# hack/lib/version.sh stamps it, so `kubectl version` and the nodes report the real release.
set -euo pipefail

KUBE_VERSION=${KUBE_VERSION:-v1.37.2}
CACHE=${PODMIGRATE_CACHE:-/var/cache/podmigrate}/kubernetes/${KUBE_VERSION}
BIN=${CACHE}/bin
COMMANDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

log() { printf '[kube-build] %s\n' "$*" >&2; }
die() { printf '[kube-build] error: %s\n' "$*" >&2; exit 1; }

built() {
  local c
  for c in "${COMMANDS[@]}"; do [ -x "${BIN}/${c}" ] || return 1; done
  [ "$(cat "${CACHE}/built" 2>/dev/null)" = "${KUBE_VERSION}" ]
}
if built; then printf '%s\n' "$BIN"; exit 0; fi

command -v go >/dev/null || die "go not found (Go 1.26 or newer builds Kubernetes ${KUBE_VERSION})"
[[ $KUBE_VERSION =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || die "KUBE_VERSION must look like v1.37.2, not ${KUBE_VERSION}"
minor=${BASH_REMATCH[1]}
staging_version=v0.${minor}.${BASH_REMATCH[2]}
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0

start=$(date +%s)
mod=${CACHE}/module
rm -rf "$mod" && mkdir -p "$mod" "$BIN"
log "Kubernetes ${KUBE_VERSION}: resolving k8s.io/kubernetes and its staging modules at ${staging_version}"
gomod=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@${KUBE_VERSION}" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
[ -s "$gomod" ] || die "the module proxy did not serve k8s.io/kubernetes@${KUBE_VERSION}"
# Every k8s.io module that k8s.io/kubernetes replaces with a staging directory.
mapfile -t staging < <(awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "$gomod")
[ "${#staging[@]}" -gt 10 ] || die "found no staging replacements in ${gomod}"
go_directive=$(awk '$1 == "go" {print $2; exit}' "$gomod")
{
  printf 'module podmigrate.local/kubernetes-build\n\ngo %s\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' \
    "$go_directive" "$KUBE_VERSION"
  for m in "${staging[@]}"; do printf '\t%s => %s %s\n' "$m" "$m" "$staging_version"; done
  printf ')\n'
} >"${mod}/go.mod"
cat >"${mod}/tools.go" <<'GO'
//go:build tools

// Package tools pins the Kubernetes commands this module builds.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
(cd "$mod" && go mod tidy >&2) || die "go mod tidy failed for k8s.io/kubernetes ${KUBE_VERSION}"

# The version stamp, as hack/lib/version.sh writes it.
commit=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@${KUBE_VERSION}" | sed -n 's/.*"Hash": "\(.*\)",/\1/p' | head -n1)
ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  ldflags+=" -X '${pkg}.gitVersion=${KUBE_VERSION}' -X '${pkg}.gitMajor=1' -X '${pkg}.gitMinor=${minor}'"
  ldflags+=" -X '${pkg}.gitTreeState=clean' -X '${pkg}.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)'"
  [ -z "$commit" ] || ldflags+=" -X '${pkg}.gitCommit=${commit}'"
done

log "building ${COMMANDS[*]} (the first build takes a while on two cores)"
pkgs=()
for c in "${COMMANDS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/${c}"); done
(cd "$mod" && go build -trimpath -ldflags "$ldflags" -o "$BIN/" "${pkgs[@]}") >&2 \
  || die "go build of Kubernetes ${KUBE_VERSION} failed"
printf '%s\n' "$KUBE_VERSION" >"${CACHE}/built"
log "built Kubernetes ${KUBE_VERSION} in $(( $(date +%s) - start ))s into ${BIN}"
printf '%s\n' "$BIN"
