//! The seed scenario across two isolated networks (Linux network namespaces,
//! one per cluster, joined only by the remote cluster's east-west gateway):
//! meshpilot (root namespace, xDS over a Unix socket) serves
//! examples/bookinfo-multinet; real Envoys play productpage's, reviews v1/v2/v3's
//! sidecars and the gateway; `meshpilot echo` processes play the applications.
//!
//! Checked: the seed's 75/15/10 split over 2,000 requests (chi-square, p >
//! 0.001); v3 is reachable only through the gateway (its stats count the
//! connections, a direct attempt fails); every backend saw productpage's
//! SPIFFE id in its client certificate (mTLS end to end); a client without a
//! certificate cannot get through the gateway; then disaster recovery: the
//! local reviews backends stop, the policy shifts 100% to the remote cluster,
//! and no request fails after the push settles.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshpilot::netns::{self, Topology};
use support::{Proc, assert_split, envoy_or_skip, free_port, meshpilot_bin, require_e2e, wait_for};

/// GET over a Unix socket (Envoy's admin page there), body only.
async fn uds_get(path: &Path, url: &str) -> String {
    meshpilot::cli::http::get_unix(path, url).await.unwrap_or_default()
}

struct Sidecar {
    _proc: Proc,
    admin: PathBuf,
    node: String,
}

struct Scenario {
    dir: PathBuf,
    xds_socket: PathBuf,
    envoy: PathBuf,
}

impl Scenario {
    #[allow(clippy::too_many_arguments)]
    fn envoy(
        &self,
        ns: &str,
        node: &str,
        cluster: &str,
        role: &str,
        labels: &str,
        sa: &str,
        instance_ip: &str,
        outbound: &str,
        app: &str,
    ) -> Sidecar {
        let admin = self.dir.join(format!("{node}.admin"));
        let bootstrap = self.dir.join(format!("{node}.json"));
        let status = Command::new(meshpilot_bin())
            .args(["bootstrap", "--node-id", node, "--cluster", cluster, "--role", role, "--labels", labels])
            .args(["--namespace", if role == "gateway" { "istio-system" } else { "default" }])
            .args(["--service-account", sa, "--instance-ip", instance_ip, "--outbound-bind", outbound, "--app-address", app])
            .arg("--xds-addr")
            .arg(format!("unix:{}", self.xds_socket.display()))
            .arg("--admin-socket")
            .arg(&admin)
            .arg("-o")
            .arg(&bootstrap)
            .status()
            .unwrap();
        assert!(status.success());
        let mut cmd = Topology::command(ns, &self.envoy);
        cmd.arg("-c").arg(&bootstrap).args(meshpilot::cli::demo_support::SIDECAR_ENVOY_ARGS).args(["-l", "info"]);
        Sidecar { _proc: Proc::spawn(&format!("envoy-{node}"), cmd, &self.dir), admin, node: node.to_string() }
    }

    fn echo(&self, ns: &str, name: &str, listen: &str) -> Proc {
        let mut cmd = Topology::command(ns, meshpilot_bin());
        cmd.args(["echo", "--listen", listen, "--name", name]);
        Proc::spawn(&format!("echo-{name}"), cmd, &self.dir)
    }
}

/// `meshpilot sample` run inside `ns`: (answers, caller identities per answer).
fn sample(ns: &str, to: &str, host: &str, count: usize) -> (BTreeMap<String, usize>, BTreeMap<String, Vec<String>>) {
    let out = Topology::command(ns, meshpilot_bin())
        .args(["sample", "--to", to, "--host", host, "--count", &count.to_string(), "--concurrency", "8", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "sample failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (serde_json::from_value(v["answers"].clone()).unwrap(), serde_json::from_value(v["peers"].clone()).unwrap())
}

async fn syncz(admin: &str) -> Vec<meshpilot::admin::SyncStatus> {
    match meshpilot::cli::http::get(admin, "/debug/syncz").await {
        Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
        _ => Vec::new(),
    }
}

async fn rds_version(admin: &str, proxy: &str) -> Option<String> {
    let s = syncz(admin).await.into_iter().find(|s| s.proxy == proxy)?;
    let rds = s.types.get("RDS")?;
    (rds.state == "SYNCED").then(|| rds.acked_version.clone()).flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_across_isolated_networks() {
    if !netns::available() {
        assert!(!require_e2e(), "this test needs root and `ip` (network namespaces) here");
        eprintln!("seed_scenario_across_isolated_networks: skipped (needs root for network namespaces)");
        return;
    }
    let Some(envoy) = envoy_or_skip("seed_scenario_across_isolated_networks") else { return };
    let tmp = tempfile::Builder::new().prefix("mpn").tempdir_in("/tmp").unwrap();
    let dir = tmp.path().to_path_buf();
    let id = format!("{}", std::process::id() % 100000);
    let topo = Topology::create(&id).expect("creating the network namespaces");
    let (a, b) = (topo.management.clone(), topo.remote.clone());

    // The control plane, in the root namespace, on a copy of the example.
    let config = dir.join("config");
    meshpilot::cli::demo_support::copy_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/bookinfo-multinet"), &config).unwrap();
    let xds_socket = dir.join("xds.sock");
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(meshpilot_bin());
    cmd.args(["serve", "--config-dir"]).arg(&config).args(["--xds-addr", &format!("127.0.0.1:{}", free_port())]);
    cmd.arg("--xds-socket").arg(&xds_socket).args(["--admin-addr", &admin, "--debounce-after", "20ms"]);
    // Short-lived workload certificates: the run outlives several, so it only passes if rotation works.
    cmd.args(["--cert-ttl", "6s", "--insecure-self-asserted-identities"]);
    cmd.env("MESHPILOT_LOG", "info,meshpilot=debug");
    let _meshpilot = Proc::spawn("meshpilot", cmd, &dir);
    wait_for("meshpilot ready", Duration::from_secs(20), || {
        let admin = admin.clone();
        async move { matches!(meshpilot::cli::http::get(&admin, "/readyz").await, Ok((200, _))).then_some(()) }
    })
    .await;

    let s = Scenario { dir: dir.clone(), xds_socket, envoy };
    // Applications (listening on their pod's loopback, behind their sidecars).
    let mut v1 = s.echo(&a, "reviews-v1", "127.0.0.21:9080");
    let mut v2 = s.echo(&a, "reviews-v2", "127.0.0.22:9080");
    let _v3 = s.echo(&b, "reviews-v3", "127.0.0.23:9080");
    // Sidecars and the gateway.
    let mp = "management-plane";
    let productpage = s.envoy(
        &a,
        "productpage-v1.default",
        mp,
        "sidecar",
        "app=productpage,version=v1",
        "bookinfo-productpage",
        "10.10.0.10",
        "127.0.0.10",
        "127.0.0.10",
    );
    let r1 = s.envoy(&a, "reviews-v1.default", mp, "sidecar", "app=reviews,version=v1", "bookinfo-reviews", "10.10.0.21", "127.0.1.21", "127.0.0.21");
    let r2 = s.envoy(&a, "reviews-v2.default", mp, "sidecar", "app=reviews,version=v2", "bookinfo-reviews", "10.10.0.22", "127.0.1.22", "127.0.0.22");
    let r3 = s.envoy(
        &b,
        "reviews-v3.default",
        "remote-cluster",
        "sidecar",
        "app=reviews,version=v3",
        "bookinfo-reviews",
        "10.20.0.23",
        "127.0.1.23",
        "127.0.0.23",
    );
    let gateway = s.envoy(
        &b,
        "istio-eastwestgateway.istio-system",
        "remote-cluster",
        "gateway",
        "app=istio-eastwestgateway",
        "istio-eastwestgateway",
        netns::GATEWAY_ADDRESS,
        "127.0.1.99",
        "127.0.0.99",
    );
    for proxy in [&productpage, &r1, &r2, &r3, &gateway] {
        let admin = admin.clone();
        wait_for(&format!("{} SYNCED", proxy.node), Duration::from_secs(30), || {
            let admin = admin.clone();
            async move {
                syncz(&admin).await.into_iter().find(|x| {
                    x.proxy == proxy.node && x.types.iter().filter(|(t, _)| ["CDS", "LDS"].contains(&t.as_str())).all(|(_, st)| st.state == "SYNCED")
                })
            }
        })
        .await;
    }
    // Every sidecar got its certificate over SDS (the gateway none: it never terminates TLS).
    for proxy in [&productpage, &r3] {
        let dump = uds_get(&proxy.admin, "/config_dump?resource=dynamic_active_secrets").await;
        assert!(dump.contains("\"name\": \"default\"") && dump.contains("\"name\": \"ROOTCA\""), "{}: {dump}", proxy.node);
    }
    // Ready when every destination answers (Envoy may still be warming clusters after its ACK).
    wait_for("all three destinations answering", Duration::from_secs(30), || async {
        let (answers, _) = sample(&a, "127.0.0.10:9080", "reviews", 60);
        (answers.keys().all(|k| k.starts_with("reviews-v")) && answers.len() == 3).then_some(())
    })
    .await;

    // The split, over 2,000 requests through productpage's sidecar.
    let (answers, peers) = sample(&a, "127.0.0.10:9080", "reviews", 2000);
    let stat = assert_split(&answers, &[("reviews-v3", 0.75), ("reviews-v1", 0.15), ("reviews-v2", 0.10)]);
    eprintln!("two networks: {answers:?}, chi-square {stat:.2}");
    // mTLS end to end: each backend's sidecar saw productpage's SPIFFE id.
    let productpage_id = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
    for backend in ["reviews-v1", "reviews-v2", "reviews-v3"] {
        assert_eq!(peers[backend], vec![productpage_id.to_string()], "{backend} saw {:?}", peers[backend]);
    }
    // v3's requests crossed the gateway: its passthrough cluster counted them, and v3 is not reachable directly.
    let stats = uds_get(&gateway.admin, "/stats?filter=outbound_.9080_._.reviews.default.svc.cluster.local.upstream_cx_total").await;
    let crossings: u64 = stats.lines().filter_map(|l| l.rsplit(": ").next()?.trim().parse::<u64>().ok()).sum();
    assert!(crossings > 0, "gateway stats: {stats}");
    let (direct, _) = sample(&a, "10.20.0.23:9080", "reviews", 3);
    assert!(direct.keys().all(|k| k.starts_with("error")), "network A must not reach v3 directly: {direct:?}");
    // A client outside the mesh (no certificate) cannot get through the gateway.
    let sni = "outbound_.9080_._.reviews.default.svc.cluster.local";
    let outsider = Topology::command(&a, "curl")
        .args(["-sk", "--max-time", "5", "--connect-to", &format!("{sni}:443:{}:15443", netns::GATEWAY_ADDRESS), &format!("https://{sni}/")])
        .output()
        .unwrap();
    assert!(
        !outsider.status.success() && outsider.stdout.is_empty(),
        "a client without a certificate got an answer: {}",
        String::from_utf8_lossy(&outsider.stdout)
    );

    // Disaster recovery: the local reviews backends go away; the policy shifts everything to the remote cluster.
    v1.kill();
    v2.kill();
    let before = rds_version(&admin, &productpage.node).await.unwrap();
    let policy_path = config.join("mesh/traffic-policy.yaml");
    let policy = std::fs::read_to_string(&policy_path).unwrap();
    let cut = policy.find("      - destination:\n          cluster: management-plane").unwrap();
    let all_remote = policy[..cut].replace("weight: 75", "weight: 100");
    let tmp_policy = policy_path.with_extension("tmp");
    std::fs::write(&tmp_policy, all_remote).unwrap();
    std::fs::rename(&tmp_policy, &policy_path).unwrap();
    wait_for("productpage to ACK the 100% remote routes", Duration::from_secs(20), || async {
        rds_version(&admin, &productpage.node).await.filter(|v| *v != before)
    })
    .await;
    let (after, _) = sample(&a, "127.0.0.10:9080", "reviews", 500);
    assert_eq!(after, BTreeMap::from([("reviews-v3".to_string(), 500)]), "after the push every request is served by v3");

    // Rotation: productpage's certificate is replaced over SDS before it expires, and mTLS keeps working.
    let first = workload_cert_version(&productpage.admin).await;
    let rotated = wait_for("productpage's certificate to be rotated", Duration::from_secs(20), || async {
        workload_cert_version(&productpage.admin).await.filter(|v| Some(v) != first.as_ref())
    })
    .await;
    eprintln!("workload certificate rotated: {first:?} -> {rotated}");
    wait_for("a second rotation, past the first certificate's expiry", Duration::from_secs(20), || async {
        workload_cert_version(&productpage.admin).await.filter(|v| *v != rotated)
    })
    .await;
    let (later, peers) = sample(&a, "127.0.0.10:9080", "reviews", 200);
    assert_eq!(later, BTreeMap::from([("reviews-v3".to_string(), 200)]), "mTLS still works with rotated certificates");
    assert_eq!(peers["reviews-v3"], vec![productpage_id.to_string()]);
}

/// The version of the SDS secret `default` Envoy is using.
async fn workload_cert_version(admin: &Path) -> Option<String> {
    let dump: serde_json::Value = serde_json::from_str(&uds_get(admin, "/config_dump?resource=dynamic_active_secrets").await).ok()?;
    dump["configs"].as_array()?.iter().find(|s| s["name"] == "default").and_then(|s| s["version_info"].as_str().map(String::from))
}

/// The README's main job: `meshpilot demo --multi-network` brings the two-network scenario up and prints the split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_the_two_network_scenario() {
    let Some(envoy) = envoy_or_skip("demo_runs_the_two_network_scenario") else { return };
    let out = Command::new(meshpilot_bin())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["demo", "--multi-network", "--duration", "1s", "--rate", "300"])
        .args(["--xds-addr", &format!("127.0.0.1:{}", free_port()), "--admin-addr", &format!("127.0.0.1:{}", free_port())])
        .arg("--envoy")
        .arg(&envoy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let mode = if netns::available() { "as Linux network namespaces" } else { "logical only" };
    assert!(text.contains(mode), "{text}");
    let total = text.lines().find(|l| l.starts_with("total ")).unwrap_or_else(|| panic!("no total line:\n{text}"));
    assert!(total.contains("reviews-v3") && total.contains("reviews-v1") && total.contains("reviews-v2") && !total.contains("error"), "{total}");
    assert!(text.contains("backends saw caller spiffe://cluster.local/ns/default/sa/bookinfo-productpage"), "{text}");
}
