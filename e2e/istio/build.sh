#!/usr/bin/env bash
# Builds Istio's pilot-agent and pilot-discovery from the istio.io/istio Go
# module (pinned in e2e/istio/go.mod) into .e2e-cache/bin/ as real test
# peers, and prints the folder on the last line. Their version is stamped
# (a plain build says "unknown"), and the module's sidecar bootstrap template
# (tools/packaging/common/envoy_bootstrap.json) and Istio's CRDs
# (manifests/charts/base/files/crd-all.gen.yaml, as istio-crds.yaml: istiod
# needs them installed) are copied beside them.
#
# The first build takes about 5 minutes on 2 cores; Go's build cache and a
# source stamp make later runs take seconds.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
src="$root/e2e/istio"
out="$root/.e2e-cache/bin"
mkdir -p "$out"
command -v go >/dev/null || { echo "e2e/istio/build.sh: go is not installed" >&2; exit 1; }
stamp="$( (cd "$src" && cat go.mod go.sum tools.go build.sh; go version) | sha256sum | cut -c1-16)"
if [[ -x "$out/pilot-agent" && -x "$out/pilot-discovery" && -f "$out/envoy_bootstrap.json" && -f "$out/istio-crds.yaml" && "$(cat "$out/istio.stamp" 2>/dev/null)" == "$stamp" ]]; then
  echo "$out"
  exit 0
fi
echo "e2e/istio/build.sh: building pilot-agent and pilot-discovery (first build takes minutes; cached afterwards)" >&2
start=$(date +%s)
version=1.31-dev
revision="$(cd "$src" && go list -m -f '{{.Version}}' istio.io/istio | sed 's/.*-//')"
ldflags="-X istio.io/istio/pkg/version.buildVersion=$version -X istio.io/istio/pkg/version.buildGitRevision=$revision"
ldflags+=" -X istio.io/istio/pkg/version.buildStatus=Clean -X istio.io/istio/pkg/version.buildTag=$version"
tmp="$out/istio.tmp"
rm -rf "$tmp" && mkdir -p "$tmp"
(cd "$src" && GOFLAGS=-buildvcs=false go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
  istio.io/istio/pilot/cmd/pilot-agent istio.io/istio/pilot/cmd/pilot-discovery)
module_dir="$(cd "$src" && go list -m -f '{{.Dir}}' istio.io/istio)"
cp "$module_dir/tools/packaging/common/envoy_bootstrap.json" "$tmp/envoy_bootstrap.json"
cp "$module_dir/manifests/charts/base/files/crd-all.gen.yaml" "$tmp/istio-crds.yaml"
chmod u+w "$tmp/envoy_bootstrap.json" "$tmp/istio-crds.yaml"
mv "$tmp/pilot-agent" "$tmp/pilot-discovery" "$tmp/envoy_bootstrap.json" "$tmp/istio-crds.yaml" "$out/"
rmdir "$tmp"
echo "$stamp" > "$out/istio.stamp"
echo "e2e/istio/build.sh: built in $(( $(date +%s) - start ))s" >&2
echo "$out"
