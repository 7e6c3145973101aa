#!/usr/bin/env bash
# Sets up and runs every test. Tests that need a real Envoy fail (never skip)
# here: MESHPILOT_REQUIRE_ENVOY=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ENVOY_BIN="$(scripts/setup.sh | tail -n 1)"
export ENVOY_BIN MESHPILOT_REQUIRE_ENVOY=1
cargo build --all-targets --locked
cargo test --locked --all-targets
