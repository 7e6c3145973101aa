#!/usr/bin/env bash
# meshpilot against istiod on the same work, one server on the machine at a
# time: one kubeenv cluster (a real kube-apiserver and endpointslice
# controller) holding the benchmark mesh (`meshpilot fixtures --kubeconfig
# --istio`: S services x E pods in 10 namespaces, P weighted splits as
# TrafficPolicies and as VirtualService + DestinationRule), watched by
# `meshpilot serve --kubernetes` and then by istiod (`pilot-discovery`
# built from the istio.io/istio module by e2e/istio/build.sh), each synced
# by the same fleet of simulated Istio sidecars (`meshpilot load --istio`,
# delta ADS) which then measures one endpoint change (an EndpointSlice
# update), 100 endpoint changes/s for 30 s and one weight change
# (TrafficPolicy / VirtualService), API write to delivery at every proxy.
#
#   benches/versus-istiod.sh [PROXIES...]          (default: 1000)
#   SERVICES=200 ENDPOINTS=5 POLICIES=20 ISTIOD_RPS=25 benches/versus-istiod.sh 1000 5000
#
# istiod admits 25 new streams a second by default (PILOT_MAX_REQUESTS_PER_SECOND);
# ISTIOD_RPS="25 lifted" runs it with 10000 as well (ISTIOD_RPS=lifted: only
# lifted). Ends with one markdown table per fleet size (benches/versus_table.py,
# for docs/performance.md) with the ratio istiod/meshpilot per figure.
set -euo pipefail
cd "$(dirname "$0")/.."
points=("${@:-1000}")
services=${SERVICES:-200}
endpoints=${ENDPOINTS:-5}
policies=${POLICIES:-20}
rps=${ISTIOD_RPS:-25}
churn=${CHURN_RATE:-100}

cargo build --release --quiet
bin=target/release/meshpilot
kubeenv="$(e2e/build.sh | tail -n 1)"
istio="$(e2e/istio/build.sh | tail -n 1)"
work="$(mktemp -d /tmp/versus-istiod.XXXXXX)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Below the kernel's ephemeral range (32768+): thousands of simulated proxies'
# connections there once took istiod's port, and it exited at start.
port=$((20000 + RANDOM % 10000))
"$kubeenv" cluster --name bench --port "$port" --dir "$work/cluster" > "$work/kubeenv.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 240); do [[ -f "$work/cluster/ready" ]] && break; sleep 0.5; done
export KUBECONFIG="$work/cluster/admin.kubeconfig"
k() { kubectl --context bench-context "$@"; }
k apply -k deploy/ > /dev/null
k apply --server-side -f "$istio/istio-crds.yaml" > /dev/null
k wait --for=condition=Established --timeout=60s crd/trafficpolicies.networking.zephyr.solo.io crd/virtualservices.networking.istio.io > /dev/null
k create namespace istio-system > /dev/null
"$bin" cluster register --kubeconfig "$KUBECONFIG" --context bench-context --remote-context bench-context --remote-cluster-name bench > /dev/null
"$bin" fixtures --kubeconfig "$KUBECONFIG" --context bench-context --cluster-name bench \
  --services "$services" --clusters 1 --endpoints "$endpoints" --policies "$policies" --istio
# (kubectl wait takes each pod in turn, at kubectl's request rate: minutes over 1,000 pods.)
for _ in $(seq 1 600); do
  unready=$(k get pods -A -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -vc True || true)
  [[ $unready == 0 ]] && break
  sleep 1
done
printf 'defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n' > "$work/mesh.yaml"

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%F)"
echo "mesh: $services services x $endpoints pods in 10 namespaces, $policies weighted splits, one kubeenv cluster"
echo

# run_one LABEL PROXIES: the server is running as $server on $xds; the fleet syncs and measures.
run_one() {
  local label=$1 n=$2 extra=()
  [[ $label == istiod* ]] && extra=(--change-virtual-service)
  "$bin" load --xds-addr "$xds" --proxies "$n" --delta --istio --istio-cluster-id bench --apps "$services" \
    --endpoints "$endpoints" --pid "$server" --sync-timeout 900s --pause-after-sync 15s --settle 10s \
    --kubeconfig "$KUBECONFIG" --context bench-context --cluster-name bench \
    --endpoint-change --churn-rate "$churn" --churn-duration 30s --policy-change --markdown "${extra[@]}" \
    2> "$work/load-$label-$n.err" | tee "$work/load-$label-$n.out" | grep -v '^|' || true
}

for n in "${points[@]}"; do
  # meshpilot
  xport=$((port + 10))
  MESHPILOT_LOG=warn "$bin" serve --kubernetes --context bench-context --management-cluster-name bench \
    --xds-addr "127.0.0.1:$xport" --admin-addr "127.0.0.1:$((xport + 1))" --id bench --keepalive-timeout 120s > "$work/serve-$n.log" 2>&1 &
  server=$!; pids+=("$server"); xds="127.0.0.1:$xport"
  for _ in $(seq 1 240); do curl -sf "127.0.0.1:$((xport + 1))/readyz" > /dev/null && break; sleep 0.5; done
  kill -0 "$server" 2> /dev/null || { echo "meshpilot exited:"; tail -n 5 "$work/serve-$n.log"; exit 1; }
  echo "== meshpilot, $n proxies"; run_one meshpilot "$n"
  kill "$server"; wait "$server" 2>/dev/null || true
  # istiod, stock and (optionally) with its stream admission lifted
  for limit in $rps; do
    [[ $limit == lifted ]] && limit=10000
    iport=$((port + 20))
    (cd "$work" && exec env POD_NAMESPACE=istio-system POD_NAME=istiod-bench REVISION=default PILOT_MAX_REQUESTS_PER_SECOND="$limit" \
      "$istio/pilot-discovery" discovery --kubeconfig "$KUBECONFIG" --meshConfig "$work/mesh.yaml" --clusterID bench \
      --grpcAddr "127.0.0.1:$iport" --httpAddr "127.0.0.1:$((iport + 1))" --secureGRPCAddr "127.0.0.1:$((iport + 2))" \
      --monitoringAddr "127.0.0.1:$((iport + 3))" > "$work/istiod-$n-$limit.log" 2>&1) &
    server=$!; pids+=("$server"); xds="127.0.0.1:$iport"
    for _ in $(seq 1 600); do curl -sf "127.0.0.1:$((iport + 1))/ready" > /dev/null && break; kill -0 "$server" 2> /dev/null || break; sleep 0.5; done
    kill -0 "$server" 2> /dev/null || { echo "istiod exited:"; tail -n 5 "$work/istiod-$n-$limit.log"; exit 1; }
    echo "== istiod (PILOT_MAX_REQUESTS_PER_SECOND=$limit), $n proxies"; run_one "istiod-$limit" "$n"
    kill "$server"; wait "$server" 2>/dev/null || true
  done
done
echo
# One table per fleet size, every figure with its ratio istiod / meshpilot.
python3 benches/versus_table.py "$work"
echo "logs and raw rows: $work"
