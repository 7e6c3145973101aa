#!/usr/bin/env bash
# Builds the e2e harness (kubeenv: kube-apiserver + etcd + the endpointslice
# controller + a kubelet stand-in, from the official Kubernetes Go modules) into
# .e2e-cache/bin/kubeenv and prints its path on the last line.
#
# The first build compiles kube-apiserver and kube-controller-manager (minutes
# on 2 cores); Go's build cache makes later builds take seconds, and a binary
# built from the same sources is reused as it is.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="$root/e2e/kubeenv"
out="$root/.e2e-cache/bin"
mkdir -p "$out"
command -v go >/dev/null || { echo "e2e/build.sh: go is not installed" >&2; exit 1; }
stamp="$( (cd "$src" && cat go.mod go.sum *.go; go version) | sha256sum | cut -c1-16)"
if [[ -x "$out/kubeenv" && "$(cat "$out/kubeenv.stamp" 2>/dev/null)" == "$stamp" ]]; then
  echo "$out/kubeenv"
  exit 0
fi
echo "e2e/build.sh: building kubeenv (first build takes minutes; cached afterwards)" >&2
start=$(date +%s)
(cd "$src" && GOFLAGS=-buildvcs=false go build -trimpath -o "$out/kubeenv.tmp" .)
mv "$out/kubeenv.tmp" "$out/kubeenv"
echo "$stamp" > "$out/kubeenv.stamp"
echo "e2e/build.sh: built in $(( $(date +%s) - start ))s" >&2
echo "$out/kubeenv"
