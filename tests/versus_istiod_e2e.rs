//! meshpilot and istiod on the same work, at a size CI can afford, so the
//! side-by-side harness (`benches/versus-istiod.sh`) cannot rot: one real
//! kube-apiserver (kubeenv) holds a mesh loaded by `meshpilot fixtures
//! --kubeconfig --istio` (services, their pods and EndpointSlices, weighted
//! splits as TrafficPolicies and as VirtualService + DestinationRule);
//! `meshpilot serve --kubernetes` and then istiod (`pilot-discovery` built
//! from the `istio.io/istio` module) each serve the same fleet of simulated
//! Istio sidecars (`meshpilot load --istio --delta`), which must all become
//! SYNCED and receive one EndpointSlice update and one weight change
//! (TrafficPolicy for meshpilot, VirtualService for istiod), every proxy.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::istio::istio_or_skip;
use support::kube::{KubeCluster, KubeMeshpilot, kubeenv_or_skip, register};
use support::{Proc, Watchdog, free_port, meshpilot_bin, wait_for};

const TEST: &str = "meshpilot_and_istiod_serve_the_same_fleet";
const PROXIES: &str = "200";
const SERVICES: &str = "100";
const ENDPOINTS: &str = "2";

/// `meshpilot load` against `xds`: its report (stdout and stderr).
fn run_fleet(cluster: &KubeCluster, xds: &str, server_pid: u32, extra: &[&str], logs: &Path, label: &str) -> String {
    let out = Command::new(meshpilot_bin())
        .args(["load", "--xds-addr", xds, "--proxies", PROXIES, "--delta", "--istio", "--istio-cluster-id", &cluster.name])
        .args(["--apps", SERVICES, "--endpoints", ENDPOINTS, "--pid", &server_pid.to_string(), "--sync-timeout", "240s"])
        .args(["--settle", "10s", "--kubeconfig"])
        .arg(cluster.kubeconfig())
        .args(["--context", &cluster.context(), "--cluster-name", &cluster.name, "--endpoint-change", "--policy-change"])
        .args(extra)
        .output()
        .expect("meshpilot load");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    std::fs::write(logs.join(format!("load-{label}.log")), &report).unwrap();
    assert!(out.status.success(), "{label}: meshpilot load failed:\n{report}");
    report
}

/// The fleet synced and every proxy got both changes.
fn assert_delivered(label: &str, report: &str) {
    let line = |what: &str| report.lines().find(|l| l.contains(what)).unwrap_or_else(|| panic!("{label}: no `{what}` in:\n{report}")).to_string();
    let synced = line("proxies, ");
    assert!(synced.contains(&format!("{PROXIES} proxies, all SYNCED")), "{label}: {synced}");
    for what in ["one endpoint change", "one weight change"] {
        let measured = line(what);
        assert!(
            measured.contains(&format!("over {PROXIES} (proxy, change) pairs")) && measured.contains("; 0 not delivered;"),
            "{label}: {measured}"
        );
    }
    eprintln!("{label}:\n  {synced}\n  {}\n  {}\n  {}", line("per proxy until SYNCED"), line("one endpoint change"), line("one weight change"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshpilot_and_istiod_serve_the_same_fleet() {
    let Some(kubeenv) = kubeenv_or_skip(TEST) else { return };
    let Some(istio) = istio_or_skip(TEST) else { return };
    let work = tempfile::tempdir().unwrap();
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let _watchdog = Watchdog::arm(TEST, Duration::from_secs(900), &logs);

    let cluster = KubeCluster::start(&kubeenv, "bench", work.path()).await;
    cluster.install_meshpilot();
    cluster.kubectl(&["apply", "--server-side", "-f", istio.join("istio-crds.yaml").to_str().unwrap()]);
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/virtualservices.networking.istio.io",
        "crd/destinationrules.networking.istio.io",
    ]);
    cluster.kubectl(&["create", "namespace", "istio-system"]);
    register(&cluster, &cluster);
    let loaded = Command::new(meshpilot_bin())
        .args(["fixtures", "--kubeconfig"])
        .arg(cluster.kubeconfig())
        .args(["--context", &cluster.context(), "--cluster-name", &cluster.name, "--services", SERVICES, "--clusters", "1"])
        .args(["--endpoints", ENDPOINTS, "--policies", "10", "--istio"])
        .output()
        .unwrap();
    assert!(loaded.status.success(), "fixtures --kubeconfig: {}", String::from_utf8_lossy(&loaded.stderr));
    let pods = (SERVICES.parse::<usize>().unwrap() * ENDPOINTS.parse::<usize>().unwrap()).to_string();
    wait_for("every fixture pod Ready", Duration::from_secs(300), || {
        let ready = cluster
            .kubectl(&["get", "pods", "-A", "-o", r#"jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#])
            .lines()
            .filter(|l| *l == "True")
            .count()
            .to_string();
        let pods = pods.clone();
        async move { (ready == pods).then_some(()) }
    })
    .await;

    // meshpilot.
    let mp = KubeMeshpilot::start_with(work.path(), &cluster, "bench", &[]).await;
    let report = run_fleet(&cluster, &format!("127.0.0.1:{}", mp.xds_port), mp._proc.child.id(), &[], &logs, "meshpilot");
    assert_delivered("meshpilot", &report);
    drop(mp);

    // istiod, stock settings, outside the cluster as the harness runs it.
    let mesh_config = work.path().join("mesh.yaml");
    std::fs::write(&mesh_config, "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n").unwrap();
    let istiod_dir = work.path().join("istiod");
    std::fs::create_dir_all(&istiod_dir).unwrap();
    let (grpc, http, secure, monitoring) = (free_port(), free_port(), free_port(), free_port());
    let mut cmd = Command::new(istio.join("pilot-discovery"));
    cmd.current_dir(&istiod_dir)
        .envs([("POD_NAMESPACE", "istio-system"), ("POD_NAME", "istiod-bench"), ("REVISION", "default")])
        .args(["discovery", "--kubeconfig"])
        .arg(cluster.kubeconfig())
        .arg("--meshConfig")
        .arg(&mesh_config)
        .args(["--clusterID", &cluster.name])
        .args(["--grpcAddr", &format!("127.0.0.1:{grpc}"), "--httpAddr", &format!("127.0.0.1:{http}")])
        .args(["--secureGRPCAddr", &format!("127.0.0.1:{secure}"), "--monitoringAddr", &format!("127.0.0.1:{monitoring}")]);
    let istiod = Proc::spawn("istiod", cmd, &logs);
    let ready_addr = format!("127.0.0.1:{http}");
    wait_for("istiod /ready", Duration::from_secs(180), || {
        let addr = ready_addr.clone();
        async move { matches!(meshpilot::cli::http::get(&addr, "/ready").await, Ok((200, _))).then_some(()) }
    })
    .await;
    let report = run_fleet(&cluster, &format!("127.0.0.1:{grpc}"), istiod.child.id(), &["--change-virtual-service"], &logs, "istiod");
    assert_delivered("istiod", &report);
}
