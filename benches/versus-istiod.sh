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
# lifted; ISTIOD_RPS=none: meshpilot only, to measure a change to meshpilot
# against an earlier run's istiod figures; MESHPILOT_SERVE_ARGS: more
# `serve` flags, such as "--send-budget-mib 0"). Ends with one markdown table per fleet size (benches/versus_table.py,
# for docs/performance.md) with the ratio istiod/meshpilot per figure.
set -euo pipefail
cd "$(dirname "$0")/.."
points=("${@:-1000}")
services=${SERVICES:-200}
endpoints=${ENDPOINTS:-5}
policies=${POLICIES:-20}
rps=${ISTIOD_RPS:-25}
churn=${CHURN_RATE:-100}

# MESHPILOT_BIN: another build of meshpilot to measure (an A/B of a change).
if [[ -n ${MESHPILOT_BIN:-} ]]; then bin=$MESHPILOT_BIN; else cargo build --release --quiet; bin=target/release/meshpilot; fi
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

# real_envoy LABEL: with REAL_ENVOY=1, one real Envoy (ENVOY_BIN, else setup.sh's)
# as the first fixture pod's sidecar (svc-00000-0 in ns-0, Istio's node id and
# metadata, delta ADS) against the running server, until its configuration
# settles; prints what that configuration costs the Envoy, since every pod
# pays it: RSS, heap, config dump size, clusters, listeners, and what it
# rejected (stock Envoy lacks istio-proxy's own filters).
real_envoy() {
  [[ -n "${REAL_ENVOY:-}" ]] || return 0
  local label=$1 envoy dir="$work/envoy-$1" aport=$((port + 30))
  envoy="${ENVOY_BIN:-$(scripts/setup.sh 2>/dev/null | tail -n 1)}"
  mkdir -p "$dir"
  cat > "$dir/bootstrap.yaml" <<YAML
node:
  id: sidecar~10.0.0.1~svc-00000-0.ns-0~ns-0.svc.cluster.local
  cluster: svc-00000.ns-0
  metadata: {ISTIO_VERSION: 1.31-dev, CLUSTER_ID: bench, NAMESPACE: ns-0, INSTANCE_IPS: 10.0.0.1, SERVICE_ACCOUNT: svc-00000, INTERCEPTION_MODE: REDIRECT, LABELS: {app: svc-00000, version: v1}}
dynamic_resources:
  ads_config: {api_type: DELTA_GRPC, transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: xds}}]}
  cds_config: {ads: {}, resource_api_version: V3}
  lds_config: {ads: {}, resource_api_version: V3}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment: {cluster_name: xds, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ${xds##*:}}}}}]}]}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $aport}}}
YAML
  "$envoy" -c "$dir/bootstrap.yaml" --concurrency 2 --use-dynamic-base-id -l warning > "$dir/envoy.log" 2>&1 &
  local pid=$! last="" now stats settled=0
  pids+=("$pid")
  # Settled: CDS and LDS answered (accepted or rejected), nothing warming, and
  # the update counters unchanged over three polls a second apart.
  for i in $(seq 1 120); do
    stats=$(curl -sf "127.0.0.1:$aport/stats?filter=(cds|lds|rds|eds).update_(success|rejected)|warming_clusters" 2>/dev/null || true)
    now=$( { echo "$stats" | grep -E 'update_(success|rejected)' || true; } | sort | md5sum)
    if echo "$stats" | grep -qE 'cds.update_(success|rejected): [1-9]' && echo "$stats" | grep -qE 'lds.update_(success|rejected): [1-9]' \
      && echo "$stats" | grep -q 'warming_clusters: 0' && [[ "$now" == "$last" ]]; then
      settled=$((settled + 1)); [[ $settled -ge 3 ]] && break
    else
      settled=0
    fi
    last=$now; sleep 1
  done
  local rss dump clusters listeners memory rejected
  rss=$(awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$pid/status")
  memory=$(curl -sf "127.0.0.1:$aport/memory" | python3 -c 'import json,sys; m=json.load(sys.stdin); print("heap %.0f MiB allocated, %.0f MiB" % (int(m["allocated"])/1048576, int(m["heap_size"])/1048576))')
  dump=$(curl -sf "127.0.0.1:$aport/config_dump?include_eds" | wc -c)
  clusters=$(curl -sf "127.0.0.1:$aport/stats?filter=cluster_manager.active_clusters" | awk '{print $2}')
  listeners=$(curl -sf "127.0.0.1:$aport/stats?filter=listener_manager.total_listeners_active" | awk '{print $2}')
  rejected=$(curl -sf "127.0.0.1:$aport/stats?filter=update_rejected" | awk '$2 > 0 {printf "%s %s; ", $1, $2}' || true)
  echo "real Envoy ($label): RSS $rss MiB ($memory); config dump with endpoints $((dump / 1024)) KiB; $clusters clusters, $listeners listeners; rejected: ${rejected:-none}"
  grep -m 3 -iE 'rejected|error' "$dir/envoy.log" | cut -c1-300 || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

for n in "${points[@]}"; do
  # meshpilot
  xport=$((port + 10))
  MESHPILOT_LOG=warn "$bin" serve --kubernetes --context bench-context --management-cluster-name bench \
    --xds-addr "127.0.0.1:$xport" --admin-addr "127.0.0.1:$((xport + 1))" --id bench --keepalive-timeout 120s \
    ${MESHPILOT_SERVE_ARGS:-} > "$work/serve-$n.log" 2>&1 &
  server=$!; pids+=("$server"); xds="127.0.0.1:$xport"
  for _ in $(seq 1 240); do curl -sf "127.0.0.1:$((xport + 1))/readyz" > /dev/null && break; sleep 0.5; done
  kill -0 "$server" 2> /dev/null || { echo "meshpilot exited:"; tail -n 5 "$work/serve-$n.log"; exit 1; }
  echo "== meshpilot, $n proxies"; real_envoy "meshpilot-$n"; run_one meshpilot "$n"
  kill "$server"; wait "$server" 2>/dev/null || true
  # istiod, stock and (optionally) with its stream admission lifted
  for limit in $rps; do
    [[ $limit == none ]] && continue
    [[ $limit == lifted ]] && limit=10000
    iport=$((port + 20))
    (cd "$work" && exec env POD_NAMESPACE=istio-system POD_NAME=istiod-bench REVISION=default PILOT_MAX_REQUESTS_PER_SECOND="$limit" \
      "$istio/pilot-discovery" discovery --kubeconfig "$KUBECONFIG" --meshConfig "$work/mesh.yaml" --clusterID bench \
      --grpcAddr "127.0.0.1:$iport" --httpAddr "127.0.0.1:$((iport + 1))" --secureGRPCAddr "127.0.0.1:$((iport + 2))" \
      --monitoringAddr "127.0.0.1:$((iport + 3))" > "$work/istiod-$n-$limit.log" 2>&1) &
    server=$!; pids+=("$server"); xds="127.0.0.1:$iport"
    for _ in $(seq 1 600); do curl -sf "127.0.0.1:$((iport + 1))/ready" > /dev/null && break; kill -0 "$server" 2> /dev/null || break; sleep 0.5; done
    kill -0 "$server" 2> /dev/null || { echo "istiod exited:"; tail -n 5 "$work/istiod-$n-$limit.log"; exit 1; }
    echo "== istiod (PILOT_MAX_REQUESTS_PER_SECOND=$limit), $n proxies"; real_envoy "istiod-$limit-$n"; run_one "istiod-$limit" "$n"
    kill "$server"; wait "$server" 2>/dev/null || true
  done
done
echo
# One table per fleet size, every figure with its ratio istiod / meshpilot.
python3 benches/versus_table.py "$work"
echo "logs and raw rows: $work"
