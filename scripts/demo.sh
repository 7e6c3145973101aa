#!/usr/bin/env bash
# Sets up and runs the local demo: meshpilot serving a real Envoy, two echo
# backends, traffic through Envoy, and the operator's views.
set -euo pipefail
cd "$(dirname "$0")/.."
ENVOY_BIN="$(scripts/setup.sh | tail -n 1)"
cargo build --release --locked --bin meshpilot
MP=target/release/meshpilot
work="$(mktemp -d)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$MP" echo --listen 127.0.0.1:19081 --name backend-1 >"$work/echo1.log" 2>&1 & pids+=($!)
"$MP" echo --listen 127.0.0.1:19082 --name backend-2 >"$work/echo2.log" 2>&1 & pids+=($!)
"$MP" serve --resources examples/foundation/resources.yaml \
  --xds-addr 127.0.0.1:15010 --admin-addr 127.0.0.1:15014 >"$work/meshpilot.log" 2>&1 & pids+=($!)
"$MP" bootstrap --node-id demo-sidecar --cluster management-plane --namespace default \
  --labels app=productpage --xds-addr 127.0.0.1:15010 --admin-port 15000 -o "$work/bootstrap.json"
"$ENVOY_BIN" -c "$work/bootstrap.json" --disable-hot-restart --concurrency 1 -l warning \
  >"$work/envoy.log" 2>&1 & pids+=($!)

echo "waiting for Envoy to be SYNCED..."
for _ in $(seq 1 200); do
  if "$MP" proxy-status 2>/dev/null | grep -q "demo-sidecar.*SYNCED.*SYNCED.*SYNCED.*SYNCED"; then break; fi
  sleep 0.1
done
echo
"$MP" proxy-status
echo
echo "100 requests through Envoy (127.0.0.1:18080), split by the route's 80/20 weights:"
for _ in $(seq 1 100); do curl -s 127.0.0.1:18080/; done | sort | uniq -c
echo
echo "Try: $MP config-dump demo-sidecar | less   (meshpilot's view)"
echo "     curl -s 127.0.0.1:15000/config_dump   (Envoy's view)"
