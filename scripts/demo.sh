#!/usr/bin/env bash
# Sets up and runs the local demo of the seed scenario: meshpilot serving the
# bookinfo example (two clusters, the seed's TrafficPolicy verbatim), a real
# process per pod, a real Envoy sidecar for productpage, and the live split of
# productpage's calls to reviews (75% remote v3, 15% local v1, 10% local v2).
# Extra arguments go to `meshpilot demo` (e.g. --duration 0s to run until Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
ENVOY_BIN="$(scripts/setup.sh | tail -n 1)"
cargo build --release --locked --bin meshpilot
exec target/release/meshpilot demo --envoy "$ENVOY_BIN" --example examples/bookinfo "$@"
