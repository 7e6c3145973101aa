#!/usr/bin/env bash
# Sets up and runs the local demo of the seed scenario: two clusters on two
# networks (the seed's TrafficPolicy verbatim; as root examples/bookinfo-captured,
# Istio-injected pods captured by iptables, else examples/bookinfo-multinet),
# meshpilot serving them, a real Envoy sidecar per pod with an mTLS identity
# from the VirtualMesh's CA, a real east-west gateway, a real process per
# application, and the live split of productpage's calls to reviews (75%
# remote v3 through the gateway, 15% local v1, 10% local v2). As root the
# pods and networks are Linux network namespaces; otherwise loopback addresses.
# Extra arguments go to `meshpilot demo` (e.g. --duration 0s to run until
# Ctrl-C); `--single-network` runs the one-network demo of examples/bookinfo.
set -euo pipefail
cd "$(dirname "$0")/.."
ENVOY_BIN="$(scripts/setup.sh | tail -n 1)"
cargo build --release --locked --bin meshpilot
if [[ "${1:-}" == "--single-network" ]]; then
  shift
  exec target/release/meshpilot demo --envoy "$ENVOY_BIN" --example examples/bookinfo "$@"
fi
exec target/release/meshpilot demo --multi-network --envoy "$ENVOY_BIN" "$@"
