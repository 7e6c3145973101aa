#!/usr/bin/env bash
# Sets up and runs every test. Tests that need a real part fail (never skip)
# here: a real Envoy (MESHPILOT_REQUIRE_ENVOY=1) and real Kubernetes clusters
# built from the Go modules by e2e/build.sh, and Istio's own agent built by
# e2e/istio/build.sh (MESHPILOT_REQUIRE_E2E=1).
set -euo pipefail
cd "$(dirname "$0")/.."
ENVOY_BIN="$(scripts/setup.sh | tail -n 1)"
KUBEENV_BIN="$(e2e/build.sh | tail -n 1)"
# Istio's pilot-agent (and pilot-discovery) from the istio.io/istio module: the
# real sidecar agent tests/istio_agent_e2e.rs runs against meshpilot.
ISTIO_BIN_DIR="$(e2e/istio/build.sh | tail -n 1)"
export ENVOY_BIN KUBEENV_BIN ISTIO_BIN_DIR MESHPILOT_REQUIRE_ENVOY=1 MESHPILOT_REQUIRE_E2E=1
command -v kubectl >/dev/null || { echo "scripts/test.sh: kubectl is required for the Kubernetes e2e" >&2; exit 1; }
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
# The control plane without the testkit feature (load generator, fixtures, demos) still builds.
cargo clippy --no-default-features --features mimalloc --lib --bins --locked -- -D warnings
cargo build --all-targets --locked
# Every test bounds its own waits; this bounds the whole run well inside CI's
# 90 minutes (a full run takes about 10), so a hang ends with the binary named.
status=0
timeout --kill-after=30 2400 cargo test --locked --all-targets || status=$?
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    echo "scripts/test.sh: the tests did not finish within 40 minutes; the binary running last (above) hung" >&2
fi
exit "$status"
