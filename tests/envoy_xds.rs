//! The xDS server against the real client: Envoy 1.40 started from a
//! `meshpilot bootstrap` file, over SotW and delta ADS.

mod support;

use std::time::Duration;

use envoy_types::pb::envoy::service::status::v3::{
    ClientStatusRequest, ConfigStatus, client_status_discovery_service_client::ClientStatusDiscoveryServiceClient,
};
use meshpilot::cli::http;
use support::{Envoy, Meshpilot, envoy_or_skip, free_port, wait_for};

/// An EDS cluster over ADS and its one-endpoint assignment.
fn eds_cluster(name: &str, host: &str, port: &str) -> String {
    format!(
        r#"- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: {name}
  type: EDS
  connectTimeout: 1s
  edsClusterConfig: {{edsConfig: {{ads: {{}}, resourceApiVersion: V3}}}}
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  clusterName: {name}
  endpoints:
  - lbEndpoints:
    - endpoint: {{address: {{socketAddress: {{address: "{host}", portValue: {port}}}}}}}
"#
    )
}

/// Envoy resources: one listener → route → EDS cluster → the given backend,
/// and a second EDS cluster (`steady`, port 9) that never changes.
fn resources(listener_port: u16, backend: &str, extra_listener: Option<&str>) -> String {
    let (host, port) = backend.rsplit_once(':').unwrap();
    let mut text = format!(
        r#"resources:
{backend}{steady}- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: http_routes
  virtualHosts:
  - name: all
    domains: ["*"]
    routes:
    - match: {{prefix: /}}
      route: {{cluster: backend}}
{listener}"#,
        backend = eds_cluster("backend", host, port),
        steady = eds_cluster("steady", "127.0.0.9", "9"),
        listener = listener("listener_http", listener_port, "http")
    );
    if let Some(bad) = extra_listener {
        text.push_str(bad);
    }
    text
}

fn listener(name: &str, port: u16, stat_prefix: &str) -> String {
    format!(
        r#"- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: {name}
  address: {{socketAddress: {{address: 127.0.0.1, portValue: {port}}}}}
  filterChains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typedConfig:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        statPrefix: "{stat_prefix}"
        rds: {{routeConfigName: http_routes, configSource: {{ads: {{}}, resourceApiVersion: V3}}}}
        httpFilters:
        - name: envoy.filters.http.router
          typedConfig: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    )
}

async fn body_via(addr: &str) -> Option<String> {
    match http::get(addr, "/").await {
        Ok((200, body)) => Some(body.trim().to_string()),
        _ => None,
    }
}

async fn scenario(test: &str, delta: bool) {
    let Some(envoy_bin) = envoy_or_skip(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let backend_a = support::start_echo("backend-a").await;
    let backend_b = support::start_echo("backend-b").await;
    let listener_port = free_port();
    let res_path = dir.path().join("resources.yaml");
    std::fs::write(&res_path, resources(listener_port, &backend_a, None)).unwrap();
    let (xds_port, admin_port) = (free_port(), free_port());
    let mut mp = Meshpilot::start(dir.path(), &res_path, xds_port, admin_port).await;
    let node_id = format!("{test}-proxy");
    let extra: &[&str] = if delta { &["--delta"] } else { &[] };
    let envoy = Envoy::start(&envoy_bin, dir.path(), &node_id, xds_port, extra);

    // 1. Envoy connects, receives the set, ACKs every type.
    let synced = mp.wait_synced(&node_id).await;
    assert_eq!(synced.mode, if delta { "delta" } else { "sotw" });
    assert_eq!(synced.envoy_version, "1.40.0");
    let traffic = format!("127.0.0.1:{listener_port}");
    let body = wait_for("traffic through Envoy", Duration::from_secs(20), || body_via(&traffic)).await;
    assert_eq!(body, "backend-a");

    // Envoy's own config dump holds what we sent.
    let dump = envoy.admin_get("/config_dump?include_eds").await;
    for needle in ["listener_http", "http_routes", "\"backend\"", backend_a.rsplit_once(':').unwrap().1] {
        assert!(dump.contains(needle), "Envoy config_dump lacks {needle}");
    }
    // meshpilot's view of the same, via the CLI.
    let out =
        std::process::Command::new(support::meshpilot_bin()).args(["config-dump", &node_id, "--admin-addr", &mp.admin_addr()]).output().unwrap();
    assert!(out.status.success());
    let ours: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lds = ours["configs"].as_array().unwrap().iter().find(|c| c["type"] == "LDS").unwrap();
    assert_eq!(lds["resources"][0]["resource"]["name"], "listener_http");
    let out = std::process::Command::new(support::meshpilot_bin()).args(["proxy-status", "--admin-addr", &mp.admin_addr()]).output().unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    let row = table.lines().find(|l| l.starts_with(&node_id)).expect("proxy in the table");
    assert_eq!(row.matches("SYNCED").count(), 4, "{table}");

    // CSDS answers the same, for standard tooling.
    let mut csds = ClientStatusDiscoveryServiceClient::connect(format!("http://127.0.0.1:{xds_port}")).await.unwrap();
    let status = csds.fetch_client_status(ClientStatusRequest::default()).await.unwrap().into_inner();
    let config = status.config.iter().find(|c| c.node.as_ref().unwrap().id == node_id).unwrap();
    let listener_status = config.generic_xds_configs.iter().find(|g| g.name == "listener_http").unwrap();
    assert_eq!(listener_status.config_status, ConfigStatus::Synced as i32);

    // 2. A listener Envoy rejects: ERROR with Envoy's message; the good config keeps serving.
    let cds_version_before = synced.types["CDS"].sent_version.clone();
    let bad = listener("listener_bad", free_port(), "");
    support::write_atomically(&res_path, &resources(listener_port, &backend_a, Some(&bad)));
    let error = wait_for("LDS ERROR in syncz", Duration::from_secs(20), || async {
        mp.syncz().await.into_iter().find(|s| s.proxy == node_id)?.types.get("LDS")?.last_error.clone()
    })
    .await;
    assert!(error.contains("listener_bad"), "NACK message names the listener: {error}");
    assert!(error.contains("StatPrefix"), "NACK message is Envoy's: {error}");
    assert_eq!(body_via(&traffic).await.as_deref(), Some("backend-a"), "previous good config keeps serving");
    assert!(mp.metrics().await.contains("meshpilot_xds_rejects_total{type=\"LDS\"} 1"));

    // 3. Fix the listener and move the endpoint: pushed without restarting anything.
    support::write_atomically(&res_path, &resources(listener_port, &backend_b, None));
    wait_for("traffic moved to backend-b", Duration::from_secs(20), || async {
        (body_via(&traffic).await.as_deref() == Some("backend-b")).then_some(())
    })
    .await;
    let after_fix = mp.wait_synced(&node_id).await;
    // The endpoint push carried only `backend` (SotW EDS sends what changed);
    // Envoy kept the other cluster's endpoints.
    let clusters = envoy.admin_get("/clusters").await;
    assert!(clusters.contains("steady::127.0.0.9:9::"), "the unchanged cluster keeps its endpoints: {clusters}");
    assert!(after_fix.types["LDS"].last_error.is_none(), "the ACK cleared the error");
    assert_eq!(after_fix.types["CDS"].sent_version, cds_version_before, "unchanged CDS keeps its version");
    let metrics = mp.metrics().await;
    let eds_latencies =
        metrics.lines().find_map(|l| l.strip_prefix("meshpilot_proxy_convergence_seconds_count{type=\"EDS\"} ")).and_then(|n| n.parse::<u64>().ok());
    assert!(eds_latencies.is_some_and(|n| n > 0), "change→ACK latency recorded: {eds_latencies:?}");

    // 4. Restart meshpilot: Envoy keeps serving, reconnects, ends SYNCED, same versions.
    let versions_before: Vec<_> = ["CDS", "EDS", "LDS", "RDS"].iter().map(|t| after_fix.types[*t].sent_version.clone()).collect();
    mp.proc.kill();
    assert_eq!(body_via(&traffic).await.as_deref(), Some("backend-b"), "Envoy serves while meshpilot is down");
    drop(mp);
    let mp = Meshpilot::start(dir.path(), &res_path, xds_port, admin_port).await;
    let again = mp.wait_synced(&node_id).await;
    let versions_after: Vec<_> = ["CDS", "EDS", "LDS", "RDS"].iter().map(|t| again.types[*t].sent_version.clone()).collect();
    assert_eq!(versions_before, versions_after, "same config, same versions across a restart");
    assert_eq!(body_via(&traffic).await.as_deref(), Some("backend-b"));
    drop(envoy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sotw_ads_end_to_end() {
    scenario("envoy_sotw", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_delta_ads_end_to_end() {
    scenario("envoy_delta", true).await;
}

#[tokio::test]
async fn envoy_accepts_the_bootstrap_unchanged() {
    let Some(envoy_bin) = envoy_or_skip("envoy_accepts_the_bootstrap_unchanged") else { return };
    let dir = tempfile::tempdir().unwrap();
    for (i, extra) in
        [vec![], vec!["--delta", "--role", "gateway", "--network", "net2", "--labels", "app=reviews,version=v3"]].into_iter().enumerate()
    {
        let path = dir.path().join(format!("b{i}.json"));
        let status = std::process::Command::new(support::meshpilot_bin())
            .args(["bootstrap", "--node-id", "n", "--cluster", "c", "--xds-addr", "meshpilot.service-mesh-hub.svc:15010"])
            .args(&extra)
            .arg("-o")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let out = std::process::Command::new(&envoy_bin).args(["--mode", "validate", "--disable-hot-restart", "-c"]).arg(&path).output().unwrap();
        assert!(out.status.success(), "envoy --mode validate: {}", String::from_utf8_lossy(&out.stderr));
    }
}
