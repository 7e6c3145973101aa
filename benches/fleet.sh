#!/usr/bin/env bash
# The fleet benchmark: a synthetic mesh (default 1,000 services x 3 clusters x
# 10 endpoints, 100 TrafficPolicies), `meshpilot serve --config-dir` on it
# (release build), then `meshpilot load` at each fleet size, SotW and delta:
# initial sync, endpoint churn, one TrafficPolicy change; then 10,000
# proxies again with per-namespace Istio Sidecars. Prints a markdown
# table (paste it into docs/performance.md with the machine it ran on).
#
#   benches/fleet.sh [PROXIES...]          default: 1000 5000 10000
#   CHURN_RATE=100 CHURN_SECONDS=30 MODES="sotw delta" benches/fleet.sh 100 500
#   SERVE_ARGS="--debounce-max 500ms" benches/fleet.sh 1000     (extra flags for serve)
#   SCOPED_SIZES="1000 10000" benches/fleet.sh   fleet sizes also run with per-namespace
#                                                Sidecars (default 10000; "" for none)
#   INTERCEPTION=NONE benches/fleet.sh      the explicit loopback layout instead of Istio's
#                                                captured one (REDIRECT, the default)
#   INSTANCE_IPS=1 benches/fleet.sh         Istio-like proxies: each one of the fixture's pods,
#                                                with that pod's INSTANCE_IPS
#   SERVE_LOGS=DIR RUST_LOG=meshpilot=debug benches/fleet.sh   keep each point's serve log in DIR
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=("${@:-1000 5000 10000}")
read -r -a SIZES <<< "${SIZES[*]}"
SERVICES="${SERVICES:-1000}" CLUSTERS="${CLUSTERS:-3}" ENDPOINTS="${ENDPOINTS:-10}" POLICIES="${POLICIES:-100}"
CHURN_RATE="${CHURN_RATE:-100}" CHURN_SECONDS="${CHURN_SECONDS:-30}" MODES="${MODES:-sotw delta}"
SYNC_TIMEOUT="${SYNC_TIMEOUT:-300s}" INTERCEPTION="${INTERCEPTION:-REDIRECT}"
cargo build --release --locked --bin meshpilot >&2
bin="$PWD/target/release/meshpilot"
work="$(mktemp -d)"
trap 'kill "${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
[[ -n "${SERVE_LOGS:-}" ]] && mkdir -p "$SERVE_LOGS"
if [[ "$(cat /proc/sys/net/core/somaxconn)" -lt 8192 ]]; then
  echo "note: net.core.somaxconn is $(cat /proc/sys/net/core/somaxconn): the xDS accept backlog (8192) is capped to it; sysctl -w net.core.somaxconn=65535 for the 10,000-proxy points" >&2
fi
# Every simulated proxy's socket buffers are on this one host (a real fleet's
# are on its own nodes): a 10,000-proxy sync holds 1.5-2.2 GiB in loopback
# sockets. Past tcp_mem's pressure threshold the kernel drops segments; the
# retransmissions cost a tenth of the sync's CPU, and under BBR a connection
# that lost half its bytes paced itself to 150 kbit/s and held the sync for
# minutes (docs/performance.md, 2026-12-05).
read -r _ tcp_pressure _ < /proc/sys/net/ipv4/tcp_mem
if [[ "$tcp_pressure" -lt 1048576 ]]; then
  echo "note: net.ipv4.tcp_mem's pressure threshold is $((tcp_pressure / 256)) MiB; a 10,000-proxy point needs ~2.2 GiB of socket buffers on this one host: sysctl -w net.ipv4.tcp_mem='1048576 1572864 2097152'" >&2
fi
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%F)"
echo "mesh: ${SERVICES} services x ${CLUSTERS} clusters x ${ENDPOINTS} endpoints, ${POLICIES} TrafficPolicies; proxies' INTERCEPTION_MODE ${INTERCEPTION}"
echo
echo "| mode | proxies | measurement | initial sync | control-plane RSS MiB | CPU s | p50 ms | p90 ms | p99 ms | max ms | MiB sent |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
# run_point MODE PROXIES [--sidecars]: one fixture, one serve, one load run.
run_point() {
  local mode=$1 n=$2 scoped=("${@:3}") label=$1
  [[ ${#scoped[@]} -gt 0 ]] && label="$mode, Sidecar ./*"
  rm -rf "$work/mesh"
  "$bin" fixtures --out "$work/mesh" --services "$SERVICES" --clusters "$CLUSTERS" --endpoints "$ENDPOINTS" --policies "$POLICIES" "${scoped[@]}" >&2
  # Below the ephemeral range (32768+), so no client connection holds it.
  port=$((20000 + RANDOM % 10000))
  # shellcheck disable=SC2086
  # The load generator shares the cores and can be starved past serve's 10 s
  # HTTP/2 ping timeout (real Envoys answer at once): that closed a third of
  # the streams at 3,000 proxies. The benchmark waits longer for pings.
  "$bin" serve --config-dir "$work/mesh" --xds-addr "127.0.0.1:$port" --admin-addr "127.0.0.1:$((port + 1))" ${SERVE_ARGS:---keepalive-timeout 120s} > "$work/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 1 240); do curl -sf "127.0.0.1:$((port + 1))/readyz" > /dev/null && break; sleep 0.5; done
  delta=(); [[ "$mode" == delta ]] && delta=(--delta)
  pods=(); [[ -n "${INSTANCE_IPS:-}" ]] && pods=(--instance-ips)
  "$bin" load --xds-addr "127.0.0.1:$port" --proxies "$n" "${delta[@]}" --interception "$INTERCEPTION" "${pods[@]}" --pid "$server" --sync-timeout "$SYNC_TIMEOUT" \
    --config-dir "$work/mesh" --services "$SERVICES" --endpoints "$ENDPOINTS" "${scoped[@]}" \
    --endpoint-change --churn-rate "$CHURN_RATE" --churn-duration "${CHURN_SECONDS}s" --policy-change --markdown 2> "$work/load.err" \
    | grep '^|' | sed "s#^| $mode |#| $label |#" || echo "| $label | $n | failed: $(tail -n 1 "$work/load.err") | | | | | | | | |"
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  [[ -n "${SERVE_LOGS:-}" ]] && cp "$work/serve.log" "$SERVE_LOGS/serve-${label//[^a-zA-Z]/_}-$n.log"
  true
}
for mode in $MODES; do
  for n in "${SIZES[@]}"; do
    run_point "$mode" "$n"
  done
done
# The same mesh with Istio's usual scoping (one Sidecar per namespace
# importing ./*): each proxy sees a tenth of it, and a change reaches the
# proxies of its namespace.
read -r -a SCOPED <<< "${SCOPED_SIZES-10000}"
for mode in $MODES; do
  for n in "${SCOPED[@]}"; do
    run_point "$mode" "$n" --sidecars
  done
done
