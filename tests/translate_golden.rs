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
    let status: Vec<String> = s.mesh_object_status.iter().filter(|(id, _)| id.kind == "Sidecar").map(|(id, st)| format!("{id} {:?}", st.state)).collect();
    assert_eq!(status, ["Sidecar default/productpage Accepted"]);
    let set = to_json(&translate(&s, &productpage()));
    check_golden("bookinfo-productpage-sidecar", &set);
    let clusters: Vec<&str> = set["CDS"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    // The remote reviews: not imported as a host of its own, but the policy's 75% goes there.
    assert!(clusters.contains(&"outbound|9080||reviews.default.svc.remote-cluster.global"), "{clusters:?}");
    let vhosts: Vec<&str> = set["RDS"].as_array().unwrap().iter().flat_map(|rc| rc["virtualHosts"].as_array().unwrap()).map(|v| v["name"].as_str().unwrap()).collect();
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
        cla["endpoints"][0]["lbEndpoints"].as_array().unwrap().iter().map(|e| e["endpoint"]["address"]["socketAddress"]["address"].as_str().unwrap().to_string()).collect()
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
        let set = to_json(&translate(&s, scope));
        let bootstrap = static_bootstrap(&set);
        let path = dir.path().join(format!("static-{i}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&bootstrap).unwrap()).unwrap();
        let out = Command::new(&envoy).args(["--mode", "validate", "-c"]).arg(&path).args(["-l", "error"]).output().unwrap();
        assert!(out.status.success(), "envoy rejected {}:\n{}{}", path.display(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
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
            obj.remove("edsClusterConfig");
            obj.insert("type".into(), json!("STATIC"));
            let cla = eds.iter().find(|e| e["clusterName"] == name).cloned().unwrap_or(json!({"clusterName": name}));
            obj.insert("loadAssignment".into(), cla);
            c
        })
        .collect();
    let routes = set["RDS"].as_array().unwrap();
    let listeners: Vec<Value> = set["LDS"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let mut l = l.clone();
            let hcm = &mut l["filterChains"][0]["filters"][0]["typedConfig"];
            let name = hcm["rds"]["routeConfigName"].clone();
            let rc = routes.iter().find(|r| r["name"] == name).cloned().unwrap();
            hcm.as_object_mut().unwrap().remove("rds");
            hcm.as_object_mut().unwrap().insert("routeConfig".into(), rc);
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
