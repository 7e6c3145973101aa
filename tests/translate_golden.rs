//! Golden files for the pure translation: a config dir and a proxy scope in,
//! every Envoy resource out, as proto3 JSON. `UPDATE_GOLDEN=1 cargo test
//! --test translate_golden` rewrites them; review the diff like code.
//! Envoy itself checks the same resources in `envoy_accepts_the_translated_resources`.

mod support;

use std::path::PathBuf;
use std::process::Command;

use meshpilot::cli::mesh::offline_snapshot;
use meshpilot::model::MeshSnapshot;
use meshpilot::sources::file::{SourceMemory, load_config_dir};
use meshpilot::translate::{ProxyScope, translate};
use meshpilot::xds::codec;
use meshpilot::xds::resources::{ResourceSet, ResourceType};
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn to_json(set: &ResourceSet) -> Value {
    let mut out = serde_json::Map::new();
    for ty in ResourceType::PUSH_ORDER {
        let items: Vec<Value> = set.of_type(ty).values().map(|r| codec::any_to_json(&r.body()).expect("known type")).collect();
        if !items.is_empty() {
            out.insert(ty.short_name().to_string(), Value::Array(items));
        }
    }
    Value::Object(out)
}

fn check_golden(name: &str, actual: &Value) {
    let path = root().join("tests/golden").join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(actual).unwrap() + "\n";
    if std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{} missing; run with UPDATE_GOLDEN=1", path.display()));
    if want != text {
        let got = path.with_extension("actual.json");
        std::fs::write(&got, &text).unwrap();
        panic!("{name}: translation differs from {}; see {} (UPDATE_GOLDEN=1 to accept)", path.display(), got.display());
    }
}

fn snapshot(dir: &str) -> MeshSnapshot {
    offline_snapshot(&root().join(dir)).unwrap()
}

fn productpage() -> ProxyScope {
    ProxyScope::sidecar("management-plane", "default", &[("app", "productpage"), ("version", "v1")])
}

#[test]
fn golden_seed_scenario_productpage_sidecar() {
    let set = translate(&snapshot("examples/bookinfo"), &productpage());
    check_golden("bookinfo-productpage", &to_json(&set));
}

#[test]
fn golden_seed_scenario_reaches_clients_in_the_other_cluster_too() {
    let scope = ProxyScope::sidecar("remote-cluster", "default", &[("app", "ratings")]);
    check_golden("bookinfo-remote-ratings", &to_json(&translate(&snapshot("examples/bookinfo"), &scope)));
}

/// The seed scenario with an Istio Sidecar: productpage imports only
/// `reviews`, and still gets the remote v3 its TrafficPolicy shifts to.
const PRODUCTPAGE_SIDECAR: &str = "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: productpage, namespace: default}
spec:
  workloadSelector: {labels: {app: productpage}}
  egress:
  - hosts: [\"./reviews.default.svc.cluster.local\"]
";

#[test]
fn golden_a_sidecar_narrows_productpage_to_what_it_imports_and_its_policy_destinations() {
    // The Sidecar read from a config dir of its own, added to the seed's inputs.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("mesh")).unwrap();
    std::fs::write(dir.path().join("mesh/sidecar.yaml"), PRODUCTPAGE_SIDECAR).unwrap();
    let load = |d: &std::path::Path| load_config_dir(d, &mut SourceMemory::default()).unwrap();
    let mut inputs = load(&root().join("examples/bookinfo"));
    inputs.sidecars = load(dir.path()).sidecars;
    let s = MeshSnapshot::build(inputs, &mut Default::default());
    let status: Vec<String> =
        s.mesh_object_status.iter().filter(|(id, _)| id.kind == "Sidecar").map(|(id, st)| format!("{id} {:?}", st.state)).collect();
    assert_eq!(status, ["Sidecar default/productpage Accepted"]);
    let set = to_json(&translate(&s, &productpage()));
    check_golden("bookinfo-productpage-sidecar", &set);
    let clusters: Vec<&str> = set["CDS"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    // The remote reviews: not imported as a host of its own, but the policy's 75% goes there.
    assert!(clusters.contains(&"outbound|9080||reviews.default.svc.remote-cluster.global"), "{clusters:?}");
    let vhosts: Vec<&str> =
        set["RDS"].as_array().unwrap().iter().flat_map(|rc| rc["virtualHosts"].as_array().unwrap()).map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(vhosts, ["reviews.default.svc.cluster.local:9080"]);
    assert!(clusters.iter().all(|c| c.contains("|reviews.")), "only reviews and its policy's destinations: {clusters:?}");
    // Workloads the Sidecar does not select still see the whole mesh.
    let details = ProxyScope::sidecar("management-plane", "default", &[("app", "details")]);
    let whole = to_json(&translate(&s, &details));
    assert!(whole["CDS"].as_array().unwrap().iter().any(|c| c["name"].as_str().unwrap().contains("|ratings.")));
}

#[test]
fn golden_every_action_local_and_remote_subsets() {
    let s = snapshot("tests/testdata/rich");
    check_golden("rich-productpage", &to_json(&translate(&s, &productpage())));
    let details = ProxyScope::sidecar("management-plane", "default", &[("app", "details")]);
    check_golden("rich-details", &to_json(&translate(&s, &details)));
}

fn route<'a>(set: &'a Value, config: &str, vhost: &str) -> &'a Value {
    let rc = set["RDS"].as_array().unwrap().iter().find(|r| r["name"] == config).expect("route config");
    rc["virtualHosts"].as_array().unwrap().iter().find(|v| v["name"] == vhost).unwrap_or_else(|| panic!("vhost {vhost}"))
}

#[test]
fn the_seed_split_is_weighted_clusters_with_istio_names() {
    let set = to_json(&translate(&snapshot("examples/bookinfo"), &productpage()));
    let vh = route(&set, "9080", "reviews.default.svc.cluster.local:9080");
    assert_eq!(vh["domains"], json!(["reviews.default.svc.cluster.local", "reviews", "reviews.default", "reviews.default.svc"]));
    let weighted = &vh["routes"][0]["route"]["weightedClusters"]["clusters"];
    assert_eq!(
        weighted,
        &json!([
            {"name": "outbound|9080||reviews.default.svc.remote-cluster.global", "weight": 75},
            {"name": "outbound|9080|version-v1|reviews.default.svc.cluster.local", "weight": 15},
            {"name": "outbound|9080|version-v2|reviews.default.svc.cluster.local", "weight": 10},
        ])
    );
    // Every weighted cluster exists, with endpoints filtered by pod labels.
    let eds = set["EDS"].as_array().unwrap();
    let addrs = |name: &str| -> Vec<String> {
        let cla = eds.iter().find(|c| c["clusterName"] == name).unwrap_or_else(|| panic!("no EDS {name}"));
        cla["endpoints"][0]["lbEndpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["endpoint"]["address"]["socketAddress"]["address"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(addrs("outbound|9080|version-v1|reviews.default.svc.cluster.local"), ["127.0.10.21"]);
    assert_eq!(addrs("outbound|9080|version-v2|reviews.default.svc.cluster.local"), ["127.0.10.22"]);
    assert_eq!(addrs("outbound|9080||reviews.default.svc.remote-cluster.global"), ["127.0.20.23"]);
    assert_eq!(addrs("outbound|9080||reviews.default.svc.cluster.local"), ["127.0.10.21", "127.0.10.22"]);
    let cds: Vec<&str> = set["CDS"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert!(cds.contains(&"outbound|9080|version-v1|reviews.default.svc.cluster.local"));
    // Remote services are addressable by their .global name, local ones keep the short name.
    route(&set, "9080", "ratings.default.svc.remote-cluster.global:9080");
    let listeners: Vec<&str> = set["LDS"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(listeners, ["127.0.0.1_9080"]);
}

#[test]
fn without_a_policy_a_service_name_stays_in_its_own_cluster() {
    let mut s = snapshot("examples/bookinfo");
    s.applied.clear();
    let set = to_json(&translate(&s, &productpage()));
    let vh = route(&set, "9080", "reviews.default.svc.cluster.local:9080");
    assert_eq!(vh["routes"][0]["route"]["cluster"], "outbound|9080||reviews.default.svc.cluster.local");
}

#[test]
fn a_service_only_in_another_cluster_answers_to_its_kubernetes_names() {
    let set = to_json(&translate(&snapshot("tests/testdata/rich"), &productpage()));
    let vh = route(&set, "9080", "legacy.default.svc.remote-cluster.global:9080");
    assert_eq!(
        vh["domains"],
        json!(["legacy.default.svc.remote-cluster.global", "legacy.default.svc.cluster.local", "legacy", "legacy.default", "legacy.default.svc"])
    );
    // details is shifted wholesale to it; the target port 8080 comes from the EndpointSlice; unready endpoints are left out.
    let details = route(&set, "9080", "details.default.svc.cluster.local:9080");
    assert_eq!(details["routes"][0]["route"]["cluster"], "outbound|9080||legacy.default.svc.remote-cluster.global");
    let eds = set["EDS"].as_array().unwrap();
    let cla = eds.iter().find(|c| c["clusterName"] == "outbound|9080||legacy.default.svc.remote-cluster.global").unwrap();
    assert_eq!(cla["endpoints"].as_array().unwrap().len(), 1);
    assert_eq!(cla["endpoints"][0]["locality"]["zone"], "zone-b");
    assert_eq!(cla["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"], json!({"address": "127.0.20.31", "portValue": 8080}));
}

#[test]
fn source_selectors_decide_which_clients_get_a_rule() {
    let s = snapshot("tests/testdata/rich");
    let pp = to_json(&translate(&s, &productpage()));
    let details = to_json(&translate(&s, &ProxyScope::sidecar("management-plane", "default", &[("app", "details")])));
    let routes_pp = route(&pp, "9080", "reviews.default.svc.cluster.local:9080")["routes"].as_array().unwrap().len();
    let routes_details = route(&details, "9080", "reviews.default.svc.cluster.local:9080")["routes"].as_array().unwrap().len();
    assert_eq!((routes_pp, routes_details), (3, 1), "two matchers + catch-all for productpage only");
}

/// Envoy (`--mode validate`) accepts every translated resource: the golden
/// sets are turned into a static bootstrap (clusters with their endpoints
/// inline, listeners with their routes inline).
#[test]
fn envoy_accepts_the_translated_resources() {
    let Some(envoy) = support::envoy_or_skip("envoy_accepts_the_translated_resources") else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = snapshot("tests/testdata/rich");
    for (i, scope) in [productpage(), ProxyScope::sidecar("remote-cluster", "default", &[("app", "ratings")])].iter().enumerate() {
        envoy_validates(&envoy, &dir.path().join(format!("static-{i}.json")), &to_json(&translate(&s, scope)));
    }
}

/// Writes `set` as a static bootstrap to `path` and asserts `envoy --mode validate` accepts it.
fn envoy_validates(envoy: &std::path::Path, path: &std::path::Path, set: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(&static_bootstrap(set)).unwrap()).unwrap();
    let out = Command::new(envoy).args(["--mode", "validate", "-c"]).arg(path).args(["-l", "error"]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "envoy rejected {}:\n{stdout}{stderr}", path.display());
}

fn static_bootstrap(set: &Value) -> Value {
    // Resources as xDS carries them are `Any`s; inline in a bootstrap they are plain messages.
    let mut set = set.clone();
    for list in set.as_object_mut().unwrap().values_mut() {
        for r in list.as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("@type");
        }
    }
    let set = &set;
    let eds = set["EDS"].as_array().unwrap();
    let clusters: Vec<Value> = set["CDS"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let mut c = c.clone();
            let name = c["name"].clone();
            let obj = c.as_object_mut().unwrap();
            if obj.remove("edsClusterConfig").is_none() {
                return c; // ORIGINAL_DST and static clusters stand as they are
            }
            obj.insert("type".into(), json!("STATIC"));
            let cla = eds.iter().find(|e| e["clusterName"] == name).cloned().unwrap_or(json!({"clusterName": name}));
            obj.insert("loadAssignment".into(), cla);
            c
        })
        .collect();
    let no_routes = Vec::new();
    let routes = set["RDS"].as_array().unwrap_or(&no_routes);
    let listeners: Vec<Value> = set["LDS"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let mut l = l.clone();
            for chain in l["filterChains"].as_array_mut().unwrap() {
                for filter in chain["filters"].as_array_mut().unwrap() {
                    let config = &mut filter["typedConfig"];
                    let Some(name) = config.get("rds").map(|r| r["routeConfigName"].clone()) else { continue };
                    let rc = routes.iter().find(|r| r["name"] == name).cloned().unwrap();
                    config.as_object_mut().unwrap().remove("rds");
                    config.as_object_mut().unwrap().insert("routeConfig".into(), rc);
                }
            }
            l
        })
        .collect();
    json!({"staticResources": {"clusters": clusters, "listeners": listeners}})
}

fn multinet_productpage() -> ProxyScope {
    let mut s = productpage();
    s.service_account = "bookinfo-productpage".into();
    s.instance_ips = vec!["10.10.0.10".into()];
    s
}

fn multinet_gateway() -> ProxyScope {
    let mut s = ProxyScope::sidecar("remote-cluster", "istio-system", &[("app", "istio-eastwestgateway")]);
    s.role = meshpilot::xds::node::ProxyRole::Gateway;
    s.instance_ips = vec!["10.99.0.2".into()];
    s
}

#[test]
fn golden_two_networks_sidecar_and_gateway() {
    let s = snapshot("examples/bookinfo-multinet");
    check_golden("multinet-productpage", &to_json(&translate(&s, &multinet_productpage())));
    check_golden("multinet-gateway", &to_json(&translate(&s, &multinet_gateway())));
}

#[test]
fn another_networks_endpoints_are_its_gateway_with_mtls_and_the_sni() {
    let s = snapshot("examples/bookinfo-multinet");
    let set = to_json(&translate(&s, &multinet_productpage()));
    let eds = set["EDS"].as_array().unwrap();
    let cla = |name: &str| eds.iter().find(|c| c["clusterName"] == name).unwrap_or_else(|| panic!("no EDS {name}")).clone();
    // v3 lives on network-rc: productpage (network-mp) gets the gateway, weighted by the one endpoint behind it.
    let v3 = cla("outbound|9080||reviews.default.svc.remote-cluster.global");
    let lb = &v3["endpoints"][0]["lbEndpoints"];
    assert_eq!(lb.as_array().unwrap().len(), 1);
    assert_eq!(lb[0]["endpoint"]["address"]["socketAddress"], json!({"address": "10.99.0.2", "portValue": 15443}));
    // Weight 1 (the one endpoint behind it) is Envoy's default, so it is left out.
    assert_eq!(lb[0]["loadBalancingWeight"], serde_json::Value::Null);
    assert_eq!(lb[0]["metadata"]["filterMetadata"]["envoy.transport_socket_match"], json!({"tlsMode": "istio"}));
    // Local ones stay direct, still mTLS.
    let v1 = cla("outbound|9080|version-v1|reviews.default.svc.cluster.local");
    assert_eq!(v1["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"]["address"], "10.10.0.21");
    assert_eq!(v1["endpoints"][0]["lbEndpoints"][0]["metadata"]["filterMetadata"]["envoy.transport_socket_match"]["tlsMode"], "istio");
    // The cluster originates mTLS with the SNI the remote gateway routes on.
    let cds = set["CDS"].as_array().unwrap();
    let c = cds.iter().find(|c| c["name"] == "outbound|9080||reviews.default.svc.remote-cluster.global").unwrap();
    let tls = &c["transportSocketMatches"][0]["transportSocket"]["typedConfig"];
    assert_eq!(tls["sni"], "outbound_.9080_._.reviews.default.svc.cluster.local");
    assert_eq!(tls["commonTlsContext"]["tlsCertificateSdsSecretConfigs"][0]["name"], "default");
    // The inbound side terminates mTLS for the workload's own port.
    let listeners: Vec<&str> = set["LDS"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(listeners, ["10.10.0.10_9080", "127.0.0.1_9080"]);

    // The gateway exports reviews (no subset) by SNI, passthrough to v3's address.
    let gw = to_json(&translate(&s, &multinet_gateway()));
    let chains = gw["LDS"][0]["filterChains"].as_array().unwrap();
    let sni: Vec<&str> = chains.iter().map(|c| c["filterChainMatch"]["serverNames"][0].as_str().unwrap()).collect();
    assert!(sni.contains(&"outbound_.9080_._.reviews.default.svc.cluster.local"), "{sni:?}");
    let gw_eds = gw["EDS"].as_array().unwrap();
    let reviews = gw_eds.iter().find(|c| c["clusterName"] == "outbound_.9080_._.reviews.default.svc.cluster.local").unwrap();
    assert_eq!(reviews["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"]["address"], "10.20.0.23");
    assert!(reviews["endpoints"][0]["lbEndpoints"][0].get("metadata").is_none(), "passthrough: no TLS from the gateway");
}

#[test]
fn without_a_ca_another_networks_endpoints_are_left_out() {
    let mut s = snapshot("examples/bookinfo-multinet");
    s.trust.clear();
    let set = to_json(&translate(&s, &multinet_productpage()));
    let eds = set["EDS"].as_array().unwrap();
    let v3 = eds.iter().find(|c| c["clusterName"] == "outbound|9080||reviews.default.svc.remote-cluster.global").unwrap();
    assert!(v3.get("endpoints").is_none_or(|e| e.as_array().unwrap().is_empty()), "{v3}");
}

/// An Istio-injected pod of examples/bookinfo-captured (iptables REDIRECT).
fn captured(app: &str, version: &str, sa: &str, ip: &str) -> ProxyScope {
    ProxyScope::captured_sidecar("management-plane", "default", &[("app", app), ("version", version)], sa, ip)
}

#[test]
fn golden_captured_sidecars_outbound_and_inbound() {
    let s = snapshot("examples/bookinfo-captured");
    check_golden("captured-productpage", &to_json(&translate(&s, &captured("productpage", "v1", "bookinfo-productpage", "10.10.0.10"))));
    check_golden("captured-greeter", &to_json(&translate(&s, &captured("greeter", "v1", "greeter", "10.10.0.41"))));
}

fn names_of<'a>(set: &'a Value, ty: &str) -> Vec<&'a str> {
    set[ty].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect()
}

fn listener<'a>(set: &'a Value, name: &str) -> &'a Value {
    set["LDS"].as_array().unwrap().iter().find(|l| l["name"] == name).unwrap_or_else(|| panic!("no listener {name}"))
}

#[test]
fn a_captured_sidecar_has_istios_listeners() {
    let s = snapshot("examples/bookinfo-captured");
    let set = to_json(&translate(&s, &captured("productpage", "v1", "bookinfo-productpage", "10.10.0.10")));
    assert_eq!(
        names_of(&set, "LDS"),
        ["0.0.0.0_7000", "0.0.0.0_7070", "0.0.0.0_8080", "0.0.0.0_9080", "10.96.0.30_9000", "10.96.0.50_7000", "virtualInbound", "virtualOutbound"]
    );
    let outbound = listener(&set, "virtualOutbound");
    assert_eq!(outbound["address"]["socketAddress"], json!({"address": "0.0.0.0", "portValue": 15001}));
    assert_eq!(outbound["useOriginalDst"], true);
    assert_eq!(outbound["filterChains"][0]["filters"][0]["typedConfig"]["cluster"], "PassthroughCluster");
    let http = listener(&set, "0.0.0.0_9080");
    assert_eq!(http["bindToPort"], false);
    assert_eq!(http["filterChains"][0]["filters"][0]["typedConfig"]["rds"]["routeConfigName"], "9080");
    // The TCP service: its ClusterIP, shifted 50/50 across clusters by tcp_proxy weighted clusters.
    let tcp = &listener(&set, "10.96.0.30_9000")["filterChains"][0]["filters"][0]["typedConfig"];
    assert_eq!(
        tcp["weightedClusters"]["clusters"],
        json!([{"name": "outbound|9000||tcp-echo.default.svc.cluster.local", "weight": 50}, {"name": "outbound|9000||tcp-echo.default.svc.remote-cluster.global", "weight": 50}])
    );
    // The seed split is unchanged; unmatched Hosts pass through.
    let vh = route(&set, "9080", "reviews.default.svc.cluster.local:9080");
    assert_eq!(vh["domains"], json!(["reviews.default.svc.cluster.local", "reviews", "reviews.default", "reviews.default.svc", "10.96.0.20"]));
    assert_eq!(vh["routes"][0]["route"]["weightedClusters"]["clusters"].as_array().unwrap().len(), 3);
    let last =
        set["RDS"].as_array().unwrap().iter().find(|r| r["name"] == "9080").unwrap()["virtualHosts"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((last["name"].as_str(), last["routes"][0]["route"]["cluster"].as_str()), (Some("allow_any"), Some("PassthroughCluster")));
    // gRPC keeps HTTP/2 upstream; HTTP/1.1 does not.
    let cds = set["CDS"].as_array().unwrap();
    let cluster = |n: &str| cds.iter().find(|c| c["name"] == n).unwrap_or_else(|| panic!("no cluster {n}")).clone();
    let h2 = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
    assert!(cluster("outbound|7070||greeter.default.svc.cluster.local")["typedExtensionProtocolOptions"][h2]["explicitHttpConfig"]["http2ProtocolOptions"].is_object());
    assert!(cluster("outbound|8080||greeter.default.svc.cluster.local").get("typedExtensionProtocolOptions").is_none());
    assert_eq!(cluster("PassthroughCluster")["type"], "ORIGINAL_DST");
    assert_eq!(cluster("BlackHoleCluster")["type"], "STATIC");
    // Inbound: productpage serves 9080, mTLS required, to the application from 127.0.0.6.
    let inbound = listener(&set, "virtualInbound");
    assert_eq!(inbound["address"]["socketAddress"]["portValue"], 15006);
    assert_eq!(inbound["listenerFilters"][0]["name"], "envoy.filters.listener.original_dst");
    let chain = &inbound["filterChains"][0];
    assert_eq!(chain["filterChainMatch"]["destinationPort"], 9080);
    assert_eq!(chain["transportSocket"]["typedConfig"]["requireClientCertificate"], true);
    let app = cluster("inbound|9080||");
    assert_eq!(app["type"], "ORIGINAL_DST");
    assert_eq!(app["upstreamBindConfig"]["sourceAddress"]["address"], "127.0.0.6");
}

#[test]
fn a_registry_only_sidecar_refuses_what_it_does_not_import() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("mesh")).unwrap();
    let sidecar = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: default}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n";
    std::fs::write(dir.path().join("mesh/sidecar.yaml"), sidecar).unwrap();
    let load = |d: &std::path::Path| load_config_dir(d, &mut SourceMemory::default()).unwrap();
    let mut inputs = load(&root().join("examples/bookinfo-captured"));
    inputs.sidecars = load(dir.path()).sidecars;
    let s = MeshSnapshot::build(inputs, &mut Default::default());
    let set = to_json(&translate(&s, &captured("productpage", "v1", "bookinfo-productpage", "10.10.0.10")));
    assert_eq!(listener(&set, "virtualOutbound")["filterChains"][0]["filters"][0]["typedConfig"]["cluster"], "BlackHoleCluster");
    let rc = set["RDS"].as_array().unwrap().iter().find(|r| r["name"] == "9080").unwrap();
    let last = rc["virtualHosts"].as_array().unwrap().last().unwrap();
    assert_eq!((last["name"].as_str(), last["routes"][0]["directResponse"]["status"].as_u64()), (Some("block_all"), Some(502)));
}

#[test]
fn envoy_accepts_the_captured_layout() {
    let Some(envoy) = support::envoy_or_skip("envoy_accepts_the_captured_layout") else { return };
    let dir = tempfile::tempdir().unwrap();
    // Without the CA: SDS over ADS needs a live control plane (the real-Envoy e2e covers mTLS).
    let mut s = snapshot("examples/bookinfo-captured");
    s.trust.clear();
    for (i, scope) in
        [captured("productpage", "v1", "bookinfo-productpage", "10.10.0.10"), captured("greeter", "v1", "greeter", "10.10.0.41")].iter().enumerate()
    {
        envoy_validates(&envoy, &dir.path().join(format!("captured-{i}.json")), &to_json(&translate(&s, scope)));
    }
}

/// examples/bookinfo-captured plus `extra` files (path under the config dir, contents).
fn captured_with(extra: &[(&str, &str)]) -> MeshSnapshot {
    let dir = tempfile::tempdir().unwrap();
    meshpilot::cli::demo_support::copy_dir(&root().join("examples/bookinfo-captured"), dir.path()).unwrap();
    for (path, text) in extra {
        std::fs::write(dir.path().join(path), text).unwrap();
    }
    offline_snapshot(dir.path()).unwrap()
}

#[test]
fn a_headless_service_is_reached_at_the_pod_address_the_client_dialled() {
    let db = "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: default}\nspec: {clusterIP: None, selector: {app: db}, ports: [{name: tcp-db, port: 5432}]}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: db-0, namespace: default, labels: {app: db, security.istio.io/tlsMode: istio}}\n\
spec: {containers: [{name: db, ports: [{containerPort: 5432}]}]}\nstatus: {podIP: 10.10.0.51}\n";
    let s = captured_with(&[("management-plane/db.yaml", db)]);
    let set = to_json(&translate(&s, &captured("productpage", "v1", "bookinfo-productpage", "10.10.0.10")));
    let l = listener(&set, "10.10.0.51_5432");
    assert_eq!(l["filterChains"][0]["filters"][0]["typedConfig"]["cluster"], "outbound|5432||db.default.svc.cluster.local");
    let cds = set["CDS"].as_array().unwrap();
    let c = cds.iter().find(|c| c["name"] == "outbound|5432||db.default.svc.cluster.local").unwrap();
    assert_eq!(c["type"], "ORIGINAL_DST");
    assert_eq!(
        c["transportSocket"]["typedConfig"]["sni"], "outbound_.5432_._.db.default.svc.cluster.local",
        "mTLS outright: no endpoint metadata to match"
    );
    assert!(set["EDS"].as_array().unwrap().iter().all(|e| e["clusterName"] != c["name"]), "no EDS for an original-destination cluster");
}

#[test]
fn colliding_ports_are_left_out_with_a_message_and_the_rest_keeps_working() {
    let clash = "apiVersion: v1\nkind: Service\nmetadata: {name: clash, namespace: default}\nspec: {clusterIP: 10.96.0.30, ports: [{name: tcp, port: 9000}, {name: http, port: 9100}]}\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {name: sidecar-port, namespace: default}\nspec: {clusterIP: 10.96.0.60, ports: [{name: http, port: 15001}]}\n";
    let s = captured_with(&[("management-plane/clash.yaml", clash)]);
    let errors = s.input_errors.join("\n");
    assert!(errors.contains("Service default/clash in cluster management-plane: port 9000 on ClusterIP 10.96.0.30 is also claimed by Service default/tcp-echo; left out of sidecars"), "{errors}");
    assert!(
        errors.contains(
            "Service default/tcp-echo in cluster management-plane: port 9000 on ClusterIP 10.96.0.30 is also claimed by Service default/clash"
        ),
        "{errors}"
    );
    assert!(
        errors.contains("Service default/sidecar-port in cluster management-plane: port 15001 collides with the sidecar's own ports (15000-15090)"),
        "{errors}"
    );
    let set = to_json(&translate(&s, &captured("productpage", "v1", "bookinfo-productpage", "10.10.0.10")));
    let listeners = names_of(&set, "LDS");
    assert!(!listeners.contains(&"10.96.0.30_9000") && !listeners.contains(&"0.0.0.0_15001"), "{listeners:?}");
    assert!(listeners.contains(&"0.0.0.0_9100") && listeners.contains(&"0.0.0.0_9080"), "{listeners:?}");
    let d = meshpilot::model::describe::describe_service(&s, &meshpilot::model::ServiceKey::new("management-plane", "default", "clash"));
    assert!(d.port_protocols.iter().any(|p| p.contains("also claimed by Service default/tcp-echo")), "{:?}", d.port_protocols);
}

#[test]
fn http_only_actions_on_a_tcp_service_make_the_policy_invalid() {
    let policy = "apiVersion: networking.zephyr.solo.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: tcp-timeout, namespace: service-mesh-hub}\n\
spec:\n  destinationSelector: {serviceRefs: {services: [{cluster: management-plane, name: tcp-echo, namespace: default}]}}\n  requestTimeout: 1s\n";
    let s = captured_with(&[("mesh/tcp-timeout.yaml", policy)]);
    let (_, status) = s.policy_status.iter().find(|(id, _)| id.name == "tcp-timeout").unwrap();
    assert_eq!(status.state, meshpilot::model::PolicyState::Invalid);
    assert!(
        status
            .messages
            .iter()
            .any(|m| m.starts_with("spec.requestTimeout: HTTP-only, but tcp-echo.default.management-plane serves no HTTP port (9000 (TCP))")),
        "{:?}",
        status.messages
    );
}

#[test]
fn an_unknown_port_name_is_tcp_and_describe_says_why() {
    let web = "apiVersion: v1\nkind: Service\nmetadata: {name: oldweb, namespace: default}\nspec: {clusterIP: 10.96.0.70, ports: [{name: web, port: 8000}, {port: 8001}]}\n";
    let s = captured_with(&[("management-plane/oldweb.yaml", web)]);
    let set = to_json(&translate(&s, &captured("productpage", "v1", "bookinfo-productpage", "10.10.0.10")));
    let tcp = listener(&set, "10.96.0.70_8000");
    assert_eq!(tcp["filterChains"][0]["filters"][0]["name"], "envoy.filters.network.tcp_proxy", "never a broken HTTP listener");
    // The unnamed port is detected: HTTP inspector, HTTP routes for HTTP, tcp_proxy otherwise.
    let detected = listener(&set, "10.96.0.70_8001");
    assert_eq!(detected["listenerFilters"][0]["name"], "envoy.filters.listener.http_inspector");
    assert_eq!(detected["filterChains"][0]["filterChainMatch"]["applicationProtocols"], json!(["http/1.0", "http/1.1", "h2c"]));
    assert_eq!(detected["filterChains"][1]["filters"][0]["name"], "envoy.filters.network.tcp_proxy");
    let d = meshpilot::model::describe::describe_service(&s, &meshpilot::model::ServiceKey::new("management-plane", "default", "oldweb"));
    assert!(d.port_protocols[0].contains("8000: TCP (port name \"web\" has no protocol prefix Istio knows"), "{:?}", d.port_protocols);
    assert!(d.port_protocols[1].contains("8001: detected"), "{:?}", d.port_protocols);
}

/// The captured example's VirtualMesh with access control enforced.
fn enforcing_virtual_mesh(value: &str) -> String {
    let vm = std::fs::read_to_string(root().join("examples/bookinfo-captured/mesh/virtual-mesh.yaml")).unwrap();
    format!("{vm}  enforceAccessControl: {value}\n")
}

/// productpage (management-plane) may GET `/reviews*` on reviews:9080.
const REVIEWS_ACCESS: &str = "apiVersion: networking.zephyr.solo.io/v1alpha1
kind: AccessControlPolicy
metadata: {namespace: service-mesh-hub, name: productpage-reads-reviews}
spec:
  sourceSelector:
    serviceAccountRefs:
      serviceAccounts: [{name: bookinfo-productpage, namespace: default, cluster: management-plane}]
  destinationSelector:
    matcher: {namespaces: [default]}
  allowedPaths: [\"/reviews*\"]
  allowedMethods: [GET]
  allowedPorts: [9080]
";

fn access_status(s: &MeshSnapshot, name: &str) -> meshpilot::model::MeshObjectStatus {
    let id = meshpilot::model::MeshObjectId { kind: "AccessControlPolicy".into(), namespace: "service-mesh-hub".into(), name: name.into() };
    s.mesh_object_status[&id].clone()
}

fn chain<'a>(set: &'a Value, listener_name: &str, chain_name: &str) -> &'a Value {
    let l = set["LDS"].as_array().unwrap().iter().find(|l| l["name"] == listener_name).unwrap();
    l["filterChains"].as_array().unwrap().iter().find(|c| c["name"] == chain_name).unwrap_or_else(|| panic!("no chain {chain_name} in {l}"))
}

#[test]
fn golden_access_control_on_the_captured_inbound_side() {
    let s = captured_with(&[("mesh/virtual-mesh.yaml", &enforcing_virtual_mesh("ENABLED")), ("mesh/access.yaml", REVIEWS_ACCESS)]);
    let status = access_status(&s, "productpage-reads-reviews");
    assert_eq!(status.state, meshpilot::model::PolicyState::Accepted, "{status:?}");
    assert_eq!(s.access_enforced.len(), 2, "both clusters of the virtual mesh");
    let reviews = to_json(&translate(&s, &captured("reviews", "v1", "bookinfo-reviews", "10.10.0.21")));
    check_golden("captured-reviews-enforced", &reviews);
    // `describe service` says who may call, and that the rest are refused.
    let describe = |cluster: &str, name: &str| {
        meshpilot::model::describe::describe_service(&s, &meshpilot::model::ServiceKey::new(cluster, "default", name)).access
    };
    assert_eq!(
        describe("remote-cluster", "reviews"),
        [
            "AccessControlPolicy service-mesh-hub/productpage-reads-reviews allows spiffe://cluster.local/ns/default/sa/bookinfo-productpage: GET /reviews* on 9080"
        ]
    );
    assert_eq!(
        describe("management-plane", "tcp-echo"),
        ["enforced in cluster management-plane: no AccessControlPolicy allows anyone, every caller is refused"]
    );
    // HTTP: the RBAC filter first, allowing exactly productpage's identity, GET, /reviews*.
    let hcm = &chain(&reviews, "virtualInbound", "0.0.0.0_9080")["filters"][0]["typedConfig"];
    let filters = hcm["httpFilters"].as_array().unwrap();
    assert_eq!(filters[0]["name"], "envoy.filters.http.rbac");
    let policy = &filters[0]["typedConfig"]["rules"]["policies"]["ns[service-mesh-hub]-policy[productpage-reads-reviews]-rule[0]"];
    assert_eq!(policy["principals"][0]["authenticated"]["principalName"]["exact"], "spiffe://cluster.local/ns/default/sa/bookinfo-productpage");
    assert_eq!(hcm["normalizePath"], true);
    // Nothing passes undeclared ports.
    let passthrough = chain(&reviews, "virtualInbound", "InboundPassthroughFilterChain");
    assert_eq!(passthrough["filters"][0]["name"], "envoy.filters.network.rbac");
    assert_eq!(passthrough["filters"][1]["typedConfig"]["cluster"], "BlackHoleCluster");
    // tcp-echo's port is in no policy's allowedPorts: denied and closed.
    let echo = to_json(&translate(&s, &captured("tcp-echo", "v1", "tcp-echo", "10.10.0.31")));
    let tcp = chain(&echo, "virtualInbound", "0.0.0.0_9000");
    assert_eq!(tcp["filters"][0]["typedConfig"]["rules"]["policies"], json!(null), "an empty allow list");
    assert_eq!(tcp["filters"][1]["typedConfig"]["cluster"], "BlackHoleCluster");
    // Enforcement off (the enum, its number, the old bool): no RBAC at all, as before.
    for off in ["DISABLED", "MESH_DEFAULT", "false", "2"] {
        let s = captured_with(&[("mesh/virtual-mesh.yaml", &enforcing_virtual_mesh(off)), ("mesh/access.yaml", REVIEWS_ACCESS)]);
        let set = to_json(&translate(&s, &captured("reviews", "v1", "bookinfo-reviews", "10.10.0.21")));
        assert!(!set.to_string().contains("rbac"), "{off}");
    }
}

#[test]
fn access_control_policies_are_checked_field_by_field() {
    let cases = [
        (
            "name: bookinfo-productpage, namespace: default, cluster: management-plane",
            "name: nobody, namespace: default, cluster: management-plane",
            "spec.sourceSelector.serviceAccountRefs.serviceAccounts[0]: no workload in cluster management-plane runs as service account default/nobody",
        ),
        (
            "cluster: management-plane}]",
            "cluster: elsewhere}]",
            "spec.sourceSelector.serviceAccountRefs.serviceAccounts[0].cluster: cluster \"elsewhere\" is not registered",
        ),
        ("[\"/reviews*\"]", "[\"reviews\"]", "spec.allowedPaths[0]: \"reviews\" is not a path"),
        ("[\"/reviews*\"]", "[\"\"]", "spec.allowedPaths[0]: is empty"),
        ("[GET]", "[FETCH]", "spec.allowedMethods[0]: \"FETCH\" is not one of"),
        ("[9080]", "[9081]", "spec.allowedPorts[0]: no selected service has port 9081"),
        ("{namespaces: [default]}", "{namespaces: [nowhere]}", "spec.destinationSelector.matcher: selects no service"),
    ];
    for (from, to, message) in cases {
        let bad = REVIEWS_ACCESS.replace(from, to);
        let s = captured_with(&[("mesh/virtual-mesh.yaml", &enforcing_virtual_mesh("ENABLED")), ("mesh/access.yaml", &bad)]);
        let status = access_status(&s, "productpage-reads-reviews");
        assert_eq!(status.state, meshpilot::model::PolicyState::Invalid, "{to}");
        assert!(status.messages.iter().any(|m| m.starts_with(message)), "{to}: {:?}", status.messages);
        // Never accepted: it allows nothing (enforcement still denies).
        assert!(s.access_policies.is_empty());
    }
    // A bad enforcement value names the field and does not turn enforcement on or off by accident.
    let s = captured_with(&[("mesh/virtual-mesh.yaml", &enforcing_virtual_mesh("YES"))]);
    let id = meshpilot::model::MeshObjectId { kind: "VirtualMesh".into(), namespace: "service-mesh-hub".into(), name: "virtual-mesh".into() };
    let status = &s.mesh_object_status[&id];
    assert_eq!(status.state, meshpilot::model::PolicyState::Invalid);
    assert!(
        status.messages[0].starts_with("spec.enforceAccessControl: \"YES\" is not one of MESH_DEFAULT, ENABLED, DISABLED"),
        "{:?}",
        status.messages
    );
}

#[test]
fn envoy_accepts_access_control() {
    let Some(envoy) = support::envoy_or_skip("envoy_accepts_access_control") else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s = captured_with(&[("mesh/virtual-mesh.yaml", &enforcing_virtual_mesh("ENABLED")), ("mesh/access.yaml", REVIEWS_ACCESS)]);
    s.trust.clear();
    for (i, scope) in
        [captured("reviews", "v1", "bookinfo-reviews", "10.10.0.21"), captured("tcp-echo", "v1", "tcp-echo", "10.10.0.31")].iter().enumerate()
    {
        envoy_validates(&envoy, &dir.path().join(format!("enforced-{i}.json")), &to_json(&translate(&s, scope)));
    }
}

#[test]
fn each_clusters_trust_domain_names_its_identities() {
    let vm = |domains: &str| format!("{}  trustDomains: {domains}\n", enforcing_virtual_mesh("ENABLED"));
    let acp = REVIEWS_ACCESS.replace(
        "serviceAccountRefs:\n      serviceAccounts: [{name: bookinfo-productpage, namespace: default, cluster: management-plane}]",
        "matcher: {namespaces: [default], clusters: [remote-cluster]}",
    );
    let s = captured_with(&[("mesh/virtual-mesh.yaml", &vm("{remote-cluster: remote.example}")), ("mesh/access.yaml", &acp)]);
    assert_eq!(s.trust["remote-cluster"].trust_domain, "remote.example");
    assert_eq!(s.trust["management-plane"].trust_domain, "cluster.local");
    // productpage's upstream TLS: the remote reviews by its own domain's identity, still mTLS across clusters.
    let set = to_json(&translate(&s, &captured("productpage", "v1", "bookinfo-productpage", "10.10.0.10")));
    let cluster = |name: &str| set["CDS"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().to_string();
    assert!(
        cluster("outbound|9080||reviews.default.svc.remote-cluster.global")
            .contains("\"exact\":\"spiffe://remote.example/ns/default/sa/bookinfo-reviews\"")
    );
    assert!(
        cluster("outbound|9080|version-v1|reviews.default.svc.cluster.local")
            .contains("\"exact\":\"spiffe://cluster.local/ns/default/sa/bookinfo-reviews\"")
    );
    // A matcher's clusters give principals in their trust domain.
    let reviews = to_json(&translate(&s, &captured("reviews", "v1", "bookinfo-reviews", "10.10.0.21")));
    let rbac = chain(&reviews, "virtualInbound", "0.0.0.0_9080")["filters"][0]["typedConfig"]["httpFilters"][0].to_string();
    assert!(rbac.contains("\"prefix\":\"spiffe://remote.example/ns/default/sa/\"") && !rbac.contains("spiffe://cluster.local"), "{rbac}");
    // Wrong entries: INVALID with the field; the cluster keeps the default (never accepted otherwise).
    for (domains, message) in [
        ("{nowhere: a.example}", "spec.trustDomains[\"nowhere\"]: cluster \"nowhere\" is not a member of this virtual mesh"),
        ("{remote-cluster: Remote Example}", "spec.trustDomains[\"remote-cluster\"]: \"Remote Example\" is not a trust domain"),
    ] {
        let s = captured_with(&[("mesh/virtual-mesh.yaml", &vm(domains))]);
        let id = meshpilot::model::MeshObjectId { kind: "VirtualMesh".into(), namespace: "service-mesh-hub".into(), name: "virtual-mesh".into() };
        let status = &s.mesh_object_status[&id];
        assert_eq!(status.state, meshpilot::model::PolicyState::Invalid, "{domains}");
        assert!(status.messages.iter().any(|m| m.starts_with(message)), "{domains}: {:?}", status.messages);
        assert_eq!(s.trust["remote-cluster"].trust_domain, "cluster.local");
    }
}
