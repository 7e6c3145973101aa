//! Istio's own sidecars, unchanged, against meshpilot: each pod is a network
//! namespace with its application, `pilot-agent istio-iptables` capture and
//! `pilot-agent proxy sidecar` running as uid 1337 and starting Envoy 1.40;
//! the agents and meshpilot are built from their sources (Istio's
//! `pilot-agent` from the `istio.io/istio` Go module by e2e/istio/build.sh).
//!
//! Two real Kubernetes clusters (kubeenv) hold bookinfo and are registered
//! with two meshpilot replicas (`serve --kubernetes`); the seed guide's
//! VirtualMesh and TrafficPolicy are applied verbatim. Each agent proves its
//! pod's identity with a TokenRequest token (audience `istio-ca`), verifies
//! meshpilot with the root meshpilot published as `istio-ca-root-cert`, has
//! its own key signed through Istio's certificate API and serves it to its
//! Envoy over its SDS socket. productpage's agent talks to replica a,
//! reviews-v1/v2's to replica b: the split through them (chi-square over
//! 2,000 requests), with every hop's caller identity checked at the callee,
//! shows both replicas sign for one root. meshpilot never sends these
//! proxies a key.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshpilot::cli::demo_captured::Sampled;
use meshpilot::netns::pods::{self, NetworkSpec, PROXY_UID, PodNetwork};
use support::istio::istio_or_skip;
use support::kube::{KubeCluster, KubeMeshpilot, kubeenv_or_skip, register, seed_policy};
use support::{Proc, Watchdog, envoy_or_skip, meshpilot_bin, require_e2e, split_matches, wait_for};

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

const PRODUCTPAGE_ID: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";

/// One injected pod.
struct AgentPod {
    name: &'static str,
    app: &'static str,
    version: &'static str,
    service_account: &'static str,
    address: &'static str,
    cluster: &'static str,
    /// Which replica its agent's `discoveryAddress` points at (0: a, 1: b).
    replica: usize,
    /// Its agent keeps Istio's default `CLUSTER_ID` (`Kubernetes`), which
    /// replica a maps to remote-cluster with `--cluster-alias`.
    default_cluster_id: bool,
}

const PODS: [AgentPod; 4] = [
    AgentPod {
        name: "productpage-v1",
        app: "productpage",
        version: "v1",
        service_account: "bookinfo-productpage",
        address: "10.10.0.10",
        cluster: "management-plane",
        replica: 0,
        default_cluster_id: false,
    },
    AgentPod {
        name: "reviews-v1",
        app: "reviews",
        version: "v1",
        service_account: "bookinfo-reviews",
        address: "10.10.0.21",
        cluster: "management-plane",
        replica: 1,
        default_cluster_id: false,
    },
    AgentPod {
        name: "reviews-v2",
        app: "reviews",
        version: "v2",
        service_account: "bookinfo-reviews",
        address: "10.10.0.22",
        cluster: "management-plane",
        replica: 1,
        default_cluster_id: false,
    },
    AgentPod {
        name: "reviews-v3",
        app: "reviews",
        version: "v3",
        service_account: "bookinfo-reviews",
        address: "10.20.0.23",
        cluster: "remote-cluster",
        replica: 0,
        default_cluster_id: true,
    },
];

/// A pod's hosts file: its cluster's Services by their real ClusterIPs, and
/// istiod's name at the control plane's address on its network.
fn hosts_file(cluster: &KubeCluster, control_plane: &str) -> String {
    let services =
        cluster.kubectl(&["get", "svc", "-n", "default", "-o", "jsonpath={range .items[*]}{.spec.clusterIP} {.metadata.name}{\"\\n\"}{end}"]);
    let mut out = String::new();
    for line in services.lines() {
        if let Some((ip, name)) = line.split_once(' ')
            && ip != "None"
        {
            out.push_str(&format!("{ip} {name} {name}.default {name}.default.svc {name}.default.svc.cluster.local\n"));
        }
    }
    out.push_str(&format!("{control_plane} istiod.istio-system.svc meshpilot.service-mesh-hub.svc\n"));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_agents_get_the_seed_split_with_their_own_keys_from_two_replicas() {
    const TEST: &str = "istio_agents_get_the_seed_split_with_their_own_keys_from_two_replicas";
    if !pods::available() {
        assert!(!require_e2e(), "{TEST}: needs root, ip, iptables and setpriv here (scripts/setup.sh installs iptables)");
        eprintln!("{TEST}: skipped (needs root, iptables and setpriv)");
        return;
    }
    let Some(kubeenv) = kubeenv_or_skip(TEST) else { return };
    let Some(envoy) = envoy_or_skip(TEST) else { return };
    let Some(istio) = istio_or_skip(TEST) else { return };
    let tmp = tempfile::Builder::new().prefix("mpa").tempdir_in("/tmp").unwrap();
    let root = tmp.path();
    chmod(root, 0o755);
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let _watchdog = Watchdog::arm(TEST, Duration::from_secs(600), &logs);
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));

    // Two clusters, meshpilot installed, both registered, bookinfo in both.
    let (mgmt, remote) = tokio::join!(KubeCluster::start(&kubeenv, "management-plane", &logs), KubeCluster::start(&kubeenv, "remote-cluster", &logs));
    mgmt.install_meshpilot();
    register(&mgmt, &mgmt);
    register(&mgmt, &remote);
    let manifest = |f: &str, prefix: &str| {
        std::fs::read_to_string(repo.join("e2e/manifests").join(f))
            .unwrap()
            // The gateway is reached from the other network at its link address.
            .replace("POD_PREFIX.99", pods::GATEWAY_LINK_ADDRESS)
            .replace("POD_PREFIX", prefix)
    };
    mgmt.kubectl_stdin(&["apply", "-f", "-"], Some(&manifest("management-plane.yaml", "10.10.0"))).unwrap();
    remote.kubectl_stdin(&["apply", "-f", "-"], Some(&manifest("remote-cluster.yaml", "10.20.0"))).unwrap();
    remote.kubectl_stdin(&["apply", "-f", "-"], Some(&manifest("reviews-v3.yaml", "10.20.0"))).unwrap();
    mgmt.kubectl(&["apply", "-f", repo.join("examples/bookinfo-multinet/mesh/virtual-mesh.yaml").to_str().unwrap()]);
    mgmt.kubectl_stdin(&["apply", "-f", "-"], Some(&seed_policy())).unwrap();

    // Two replicas; the gateway (a plain Envoy, no secrets) reaches replica a by its Unix socket.
    let socket = root.join("xds.sock");
    let socket_arg = socket.display().to_string();
    let replica_a =
        KubeMeshpilot::start_with(&logs, &mgmt, "replica-a", &["--xds-socket", &socket_arg, "--cluster-alias", "Kubernetes=remote-cluster"]).await;
    let replica_b = KubeMeshpilot::start_with(&logs, &mgmt, "replica-b", &[]).await;
    let replicas = [&replica_a, &replica_b];

    // The networks, and the control plane's address on each.
    let id = format!("{}", std::process::id() % 100000);
    let mut network = PodNetwork::create(&id, &[NetworkSpec { prefix: "10.10.0".into() }, NetworkSpec { prefix: "10.20.0".into() }]).unwrap();
    let host = network.link_host().unwrap();
    let agent = root.join("pilot-agent");
    std::fs::copy(istio.join("pilot-agent"), &agent).unwrap();
    chmod(&agent, 0o755);
    let proxy_envoy = pods::envoy_for_proxy_user(&envoy, root).unwrap();

    let mut procs: Vec<Proc> = Vec::new();
    let mut netns: BTreeMap<&str, String> = BTreeMap::new();
    for pod in &PODS {
        let cluster = if pod.cluster == "management-plane" { &mgmt } else { &remote };
        let prefix = pod.address.rsplit_once('.').unwrap().0;
        let ns = network.add_pod(pod.address, &hosts_file(cluster, &host[prefix]), false).unwrap();
        // Istio's own capture rules, written by the agent's istio-iptables.
        let out = PodNetwork::command(&ns, None, &agent)
            .args([
                "istio-iptables",
                "-p",
                "15001",
                "-z",
                "15006",
                "-u",
                "1337",
                "-m",
                "REDIRECT",
                "-i",
                "*",
                "-x",
                "",
                "-b",
                "*",
                "-d",
                "15090,15021,15020",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "istio-iptables in {}: {}{}",
            pod.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        // The pod's files, as the injector mounts them: the token, the root
        // meshpilot published, the bootstrap template, the labels.
        let dir = root.join("pods").join(pod.name);
        for sub in
            ["var/run/secrets/tokens", "var/run/secrets/istio", "var/lib/istio/envoy", "var/lib/istio/data", "etc/istio/proxy", "etc/istio/pod"]
        {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let token = cluster.kubectl(&["create", "token", pod.service_account, "-n", "default", "--audience", "istio-ca"]);
        std::fs::write(dir.join("var/run/secrets/tokens/istio-token"), token.trim()).unwrap();
        let root_cert = wait_for("istio-ca-root-cert in default", Duration::from_secs(60), || async {
            cluster
                .kubectl_stdin(&["get", "configmap", "istio-ca-root-cert", "-n", "default", "-o", "jsonpath={.data.root-cert\\.pem}"], None)
                .ok()
                .filter(|r| r.contains("BEGIN CERTIFICATE"))
        })
        .await;
        std::fs::write(dir.join("var/run/secrets/istio/root-cert.pem"), root_cert).unwrap();
        std::fs::copy(istio.join("envoy_bootstrap.json"), dir.join("var/lib/istio/envoy/envoy_bootstrap_tmpl.json")).unwrap();
        std::fs::write(dir.join("etc/istio/pod/labels"), format!("app=\"{}\"\nversion=\"{}\"\n", pod.app, pod.version)).unwrap();
        Command::new("chown").args(["-R", "1337:1337"]).arg(&dir).status().unwrap();
        chmod(&root.join("pods"), 0o755);

        let discovery = format!("istiod.istio-system.svc:{}", replicas[pod.replica].tls_port);
        let proxy_config = serde_json::json!({
            "discoveryAddress": discovery,
            "binaryPath": proxy_envoy.display().to_string(),
            "configPath": "./etc/istio/proxy",
        });
        let mut cmd = PodNetwork::command(&ns, Some(PROXY_UID), &agent);
        cmd.args(["proxy", "sidecar"])
            .current_dir(&dir)
            .env("POD_NAME", pod.name)
            .env("POD_NAMESPACE", "default")
            .env("INSTANCE_IP", pod.address)
            .env("SERVICE_ACCOUNT", pod.service_account)
            .env("ISTIO_METAJSON_LABELS", serde_json::json!({"app": pod.app, "version": pod.version}).to_string())
            .env("PROXY_CONFIG", proxy_config.to_string())
            .env("HOME", &dir);
        if !pod.default_cluster_id {
            cmd.env("ISTIO_META_CLUSTER_ID", pod.cluster);
        }
        procs.push(Proc::spawn(&format!("agent-{}", pod.name), cmd, &logs));
        // The application: answers with its pod's name, on 0.0.0.0 like any container.
        let mut app = PodNetwork::command(&ns, None, meshpilot_bin());
        app.args(["echo", "--listen", "0.0.0.0:9080", "--name", pod.name]);
        procs.push(Proc::spawn(&format!("app-{}", pod.name), app, &logs));
        netns.insert(pod.name, ns);
    }

    // The remote network's east-west gateway: SNI passthrough, no key of its own.
    let gw_ns = network.add_gateway("10.20.0.99", "10.10.0").unwrap();
    let gw_bootstrap = root.join("gateway.json");
    let status = Command::new(meshpilot_bin())
        .args(["bootstrap", "--node-id", "istio-eastwestgateway.istio-system", "--cluster", "remote-cluster", "--namespace", "istio-system"])
        .args(["--role", "gateway", "--labels", "app=istio-eastwestgateway", "--instance-ip", pods::GATEWAY_LINK_ADDRESS])
        .args(["--xds-addr", &format!("unix:{}", socket.display()), "--admin-socket", &root.join("gateway.admin").display().to_string(), "-o"])
        .arg(&gw_bootstrap)
        .status()
        .unwrap();
    assert!(status.success());
    let mut gw = PodNetwork::command(&gw_ns, None, &envoy);
    gw.arg("-c").arg(&gw_bootstrap).args(["--disable-hot-restart", "--concurrency", "1", "-l", "warning"]);
    procs.push(Proc::spawn("gateway", gw, &logs));

    // Every agent's Envoy connected through its agent, proved its pod's
    // identity, and ACKed its configuration; none was sent a secret.
    for pod in &PODS {
        let node = format!("sidecar~{}~{}.default~default.svc.cluster.local", pod.address, pod.name);
        let replica = replicas[pod.replica];
        let row = wait_for(&format!("{node} SYNCED"), Duration::from_secs(120), || async {
            let rows = replica.get_json("/debug/syncz").await;
            let row = rows.as_array()?.iter().find(|r| r["proxy"] == node.as_str())?.clone();
            ["CDS", "LDS"].iter().all(|t| row["types"][t]["state"] == "SYNCED").then_some(row)
        })
        .await;
        // (reviews-v3's agent says `Kubernetes`: the alias made it remote-cluster, for its token and its config.)
        assert_eq!(row["cluster"], pod.cluster, "{row}");
        assert_eq!(row["identity"], format!("default/{} (token in {})", pod.service_account, pod.cluster), "{row}");
        assert_eq!(row["mode"], "delta", "Istio's bootstrap uses delta ADS");
        assert_eq!(row["types"]["SDS"]["resource_count"].as_u64().unwrap_or(0), 0, "meshpilot sent {node} a secret: {row}");
    }

    // The seed split through the agents' Envoys, productpage calling `http://reviews:9080/`.
    let productpage_ns = netns["productpage-v1"].clone();
    let sample = |count: usize| -> Sampled {
        let out = PodNetwork::command(&productpage_ns, None, meshpilot_bin())
            .args(["sample", "--to", "reviews:9080", "--protocol", "http", "--count", &count.to_string(), "--concurrency", "8", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "sample: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    wait_for("every reviews version to answer productpage", Duration::from_secs(60), || async {
        let s = sample(60);
        ["reviews-v1", "reviews-v2", "reviews-v3"].iter().all(|v| s.answers.contains_key(*v)).then_some(())
    })
    .await;
    let split = sample(2000);
    let stat = split_matches(&split.answers, &[("reviews-v3", 0.75), ("reviews-v1", 0.15), ("reviews-v2", 0.10)]).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("seed split through Istio's agents: {:?}, chi-square {stat:.2}", split.answers);
    // Every hop mTLS: each reviews' inbound saw productpage's certificate,
    // which productpage's agent made the key for (replica a signed it;
    // reviews-v1/v2 trust it through replica b: one root).
    for backend in ["reviews-v1", "reviews-v2", "reviews-v3"] {
        assert_eq!(split.peers[backend], BTreeSet::from([PRODUCTPAGE_ID.to_string()]), "{backend}: the caller's identity");
    }
    let captured = PodNetwork::nat_counters(&productpage_ns).unwrap();
    assert!(pods::jump_packets(&captured, "ISTIO_OUTPUT", "ISTIO_REDIRECT") > 0, "productpage's calls were not captured:\n{captured}");
    drop(procs);
    drop(network);
}
