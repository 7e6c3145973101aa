//! The seed scenario as Istio-injected pods (examples/bookinfo-captured), run
//! as root: one network namespace per pod with Istio's iptables REDIRECT
//! rules, Envoy as uid 1337 in each, the application (`meshpilot echo`)
//! listening on 0.0.0.0:<port> as any container does, and the east-west
//! gateway as the only link between the two networks. Applications call
//! services by name (`http://reviews:9080/`, resolved by the pod's hosts file
//! to the ClusterIP); nothing in them knows about the sidecar.
//!
//! [`CapturedMesh`] is shared by `meshpilot demo --multi-network` (as root)
//! and the capture e2e test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::demo_support::{Children, Window, copy_dir, is_synced, report_traffic, share_line, start_proxy, start_serving, tempfile_dir, wait_until};
use super::http;
use super::mesh::offline_snapshot;
use crate::admin::SyncStatus;
use crate::model::MeshSnapshot;
use crate::model::protocol::Layout;
use crate::netns::pods::{self, GLOBAL_NAMES_ADDRESS, NetworkSpec, PROXY_UID, PodNetwork};
use crate::translate::names;
use crate::xds::resource::ResourceType;

/// One pod of the example.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub cluster: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// Container port → whether its Service port is raw TCP (the echo answers on connect).
    pub ports: BTreeMap<u16, bool>,
    /// Its network namespace.
    pub netns: String,
    /// Its sidecar's Envoy admin socket and xDS node id.
    pub admin: PathBuf,
    pub node: String,
}

/// Everything running: the control plane, every pod and the gateway; stopped when dropped.
pub struct CapturedMesh {
    pub work: PathBuf,
    pub config: PathBuf,
    pub admin_addr: String,
    pub pods: Vec<Pod>,
    pub gateway_admin: Option<PathBuf>,
    pub proxies: Vec<String>,
    children: Children,
    network: PodNetwork,
    me: PathBuf,
}

/// What `meshpilot sample --json` reports.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Sampled {
    pub answers: BTreeMap<String, usize>,
    pub peers: BTreeMap<String, BTreeSet<String>>,
    pub versions: BTreeMap<String, BTreeSet<String>>,
}

/// A pod's hosts file: its cluster's services by ClusterIP under their
/// Kubernetes names, every other cluster's by their `.global` names.
pub fn hosts_file(snapshot: &MeshSnapshot, cluster: &str) -> String {
    let mut out = String::new();
    for peer in snapshot.peers_of(cluster) {
        let Some(state) = snapshot.clusters.get(&peer) else { continue };
        for svc in state.services.values() {
            let (n, ns) = (&svc.key.name, &svc.key.namespace);
            match (&svc.cluster_ip, peer == cluster) {
                (Some(ip), true) => out.push_str(&format!("{ip} {n} {n}.{ns} {n}.{ns}.svc {}\n", names::kubernetes_host(&svc.key))),
                (_, false) => out.push_str(&format!("{GLOBAL_NAMES_ADDRESS} {}\n", names::global_host(&svc.key))),
                _ => {}
            }
        }
    }
    out
}

/// The pods of a snapshot that have sidecars (`security.istio.io/tlsMode: istio`), by address.
fn pods_of(snapshot: &MeshSnapshot) -> Vec<Pod> {
    let mut by_address: BTreeMap<String, Pod> = BTreeMap::new();
    for (cluster, state) in &snapshot.clusters {
        for (key, eps) in &state.endpoints {
            if !state.services.contains_key(key) {
                continue;
            }
            for ep in eps.iter().filter(|e| e.mesh_tls) {
                let name = ep.pod.clone().unwrap_or_else(|| format!("{}-{}", key.1, ep.address));
                let pod = by_address.entry(ep.address.clone()).or_insert_with(|| Pod {
                    node: format!("{name}.{}", key.0),
                    name,
                    namespace: key.0.clone(),
                    cluster: cluster.clone(),
                    address: ep.address.clone(),
                    labels: (*ep.labels).clone(),
                    service_account: ep.service_account.clone(),
                    ports: BTreeMap::new(),
                    netns: String::new(),
                    admin: PathBuf::new(),
                });
                let served = snapshot.workload_ports(cluster).and_then(|w| w.get(&ep.address)).into_iter().flatten();
                pod.ports.extend(served.map(|(port, protocol)| (*port, protocol.layout() == Layout::Tcp)));
            }
        }
    }
    by_address.into_values().collect()
}

fn prefix_of(address: &str) -> String {
    address.rsplit_once('.').map(|(p, _)| p.to_string()).unwrap_or_default()
}

fn chmod(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

impl CapturedMesh {
    /// Starts `example` under `work` with the `meshpilot` binary given; `serve_args` go to `meshpilot serve`.
    pub async fn start(
        meshpilot: &Path,
        example: &Path,
        envoy: &Path,
        work: &Path,
        xds_addr: &str,
        admin_addr: &str,
        serve_args: &[&str],
    ) -> anyhow::Result<CapturedMesh> {
        anyhow::ensure!(pods::available(), "the captured layout needs root, ip, iptables and setpriv (apt-get install iptables)");
        let me = meshpilot.to_path_buf();
        std::fs::create_dir_all(work)?;
        chmod(work, 0o755)?;
        let config = work.join("config");
        let logs = work.join("logs");
        std::fs::create_dir_all(&logs)?;
        copy_dir(example, &config)?;
        let snapshot = offline_snapshot(&config)?;
        let mut pods = pods_of(&snapshot);
        anyhow::ensure!(!pods.is_empty(), "no pod with a sidecar (security.istio.io/tlsMode: istio) in {}", example.display());

        // Networks: each cluster's pods' /24, the first cluster's linked to the gateway.
        let mut prefixes: Vec<String> = Vec::new();
        for p in &pods {
            let prefix = prefix_of(&p.address);
            if !prefixes.contains(&prefix) {
                prefixes.push(prefix);
            }
        }
        let id = format!("{}", std::process::id() % 100000);
        let mut network = PodNetwork::create(&id, &prefixes.iter().map(|p| NetworkSpec { prefix: p.clone() }).collect::<Vec<_>>())?;
        for p in &mut pods {
            p.netns = network.add_pod(&p.address, &hosts_file(&snapshot, &p.cluster), true)?;
        }

        let mut children = Children(Vec::new());
        let xds_socket = work.join("xds.sock");
        start_serving(&mut children, &me, &config, &xds_socket, (xds_addr, admin_addr), serve_args, &logs).await?;
        // Envoy runs as the proxy user: the socket, the binary and its own folder must be theirs to use.
        chmod(&xds_socket, 0o666)?;
        let proxy_envoy = pods::envoy_for_proxy_user(envoy, work)?;

        let mut proxies = Vec::new();
        let xds = format!("unix:{}", xds_socket.display());
        for p in &mut pods {
            let dir = work.join("pods").join(&p.name);
            std::fs::create_dir_all(&dir)?;
            std::os::unix::fs::chown(&dir, Some(PROXY_UID), Some(PROXY_UID))?;
            p.admin = dir.join("admin.sock");
            let bootstrap = dir.join("envoy-rev.json");
            let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let bootstrap_args = [
                "--cluster",
                &p.cluster,
                "--namespace",
                &p.namespace,
                "--interception",
                "redirect",
                "--labels",
                &labels.join(","),
                "--service-account",
                &p.service_account,
                "--instance-ip",
                &p.address,
                "--xds-addr",
                &xds,
            ]
            .map(String::from);
            let envoy = PodNetwork::command(&p.netns, Some(PROXY_UID), &proxy_envoy);
            start_proxy(&mut children, &me, envoy, &p.node, &bootstrap_args, (&bootstrap, &p.admin), &logs)?;
            proxies.push(p.node.clone());
            for (port, tcp) in &p.ports {
                let mut cmd = PodNetwork::command(&p.netns, None, &me);
                cmd.args(["echo", "--listen", &format!("0.0.0.0:{port}"), "--name", &p.name]);
                if *tcp {
                    cmd.arg("--tcp");
                }
                children.spawn(&format!("app-{}-{port}", p.name), &mut cmd, &logs)?;
            }
        }

        // The east-west gateway of each network that has one: its own pod, no capture.
        let mut gateway_admin = None;
        for gw in snapshot.gateways.values().flatten() {
            let Some(pod_prefix) = pods.iter().find(|p| p.cluster == gw.service.cluster).map(|p| prefix_of(&p.address)) else { continue };
            anyhow::ensure!(gw.address == pods::GATEWAY_LINK_ADDRESS, "the gateway's external address must be {}", pods::GATEWAY_LINK_ADDRESS);
            let ns = network.add_gateway(&format!("{pod_prefix}.99"), &prefixes[0])?;
            let node = format!("{}.{}", gw.service.name, gw.service.namespace);
            let admin = work.join(format!("{node}.admin"));
            let bootstrap = work.join(format!("{node}.json"));
            let (svc, app) = (&gw.service, format!("app={}", gw.service.name));
            let bootstrap_args = [
                "--cluster",
                &svc.cluster,
                "--namespace",
                &svc.namespace,
                "--role",
                "gateway",
                "--instance-ip",
                &gw.address,
                "--labels",
                &app,
                "--xds-addr",
                &xds,
            ]
            .map(String::from);
            start_proxy(&mut children, &me, PodNetwork::command(&ns, None, envoy), &node, &bootstrap_args, (&bootstrap, &admin), &logs)?;
            proxies.push(node);
            gateway_admin.get_or_insert(admin);
        }
        let mut mesh = CapturedMesh {
            work: work.to_path_buf(),
            config,
            admin_addr: admin_addr.to_string(),
            pods,
            gateway_admin,
            proxies,
            children,
            network,
            me,
        };
        mesh.wait_all_synced(Duration::from_secs(60)).await?;
        Ok(mesh)
    }

    /// meshpilot's sync status of every proxy.
    pub async fn syncz(&self) -> Vec<SyncStatus> {
        match http::get(&self.admin_addr, "/debug/syncz").await {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Waits until every proxy has ACKed clusters and listeners.
    pub async fn wait_all_synced(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let admin = self.admin_addr.clone();
        for proxy in self.proxies.clone() {
            let admin = admin.clone();
            wait_until(&format!("{proxy} to be SYNCED"), timeout, &mut self.children, || {
                let (admin, proxy) = (admin.clone(), proxy.clone());
                async move { is_synced(&admin, &proxy, &[ResourceType::Cluster, ResourceType::Listener]).await }
            })
            .await?;
        }
        Ok(())
    }

    /// The first pod labelled `app=<app>`.
    pub fn pod(&self, app: &str) -> anyhow::Result<&Pod> {
        self.pods.iter().find(|p| p.labels.get("app").map(String::as_str) == Some(app)).with_context(|| format!("no pod app={app}"))
    }

    /// `meshpilot sample` run inside `pod`'s namespace as its application would (captured).
    pub fn sample(&self, pod: &Pod, to: &str, protocol: &str, count: usize) -> anyhow::Result<Sampled> {
        let out = PodNetwork::command(&pod.netns, None, &self.me)
            .args(["sample", "--to", to, "--protocol", protocol, "--count", &count.to_string(), "--concurrency", "8", "--json"])
            .output()?;
        anyhow::ensure!(out.status.success(), "meshpilot sample in {} failed: {}", pod.name, String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// [`CapturedMesh::sample`] of HTTP requests with this method and path.
    pub fn sample_request(&self, pod: &Pod, to: &str, (method, path): (&str, &str), count: usize) -> anyhow::Result<Sampled> {
        let out = PodNetwork::command(&pod.netns, None, &self.me)
            .args(["sample", "--to", to, "--method", method, "--path", path, "--count", &count.to_string(), "--concurrency", "8", "--json"])
            .output()?;
        anyhow::ensure!(out.status.success(), "meshpilot sample in {} failed: {}", pod.name, String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The router namespace of the network `address` is on, and that router's
    /// address there (a place outside the mesh that pods can reach).
    pub fn outside(&self, address: &str) -> Option<(String, String)> {
        let prefix = prefix_of(address);
        Some((self.network.router(&prefix)?.to_string(), format!("{prefix}.1")))
    }

    /// Fails if any process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.children.check_alive()
    }
}

/// `meshpilot demo --multi-network` as root: the captured pods of
/// examples/bookinfo-captured, productpage calling `http://reviews:9080/`.
pub async fn run(args: super::demo::DemoArgs) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("finding the meshpilot binary")?;
    // The two-network example has no ClusterIPs for pods to call by name: its captured twin stands in for it.
    let example = if [Path::new("examples/bookinfo"), Path::new("examples/bookinfo-multinet")].contains(&args.example.as_path()) {
        PathBuf::from("examples/bookinfo-captured")
    } else {
        args.example.clone()
    };
    let work = tempfile_dir()?.join("captured");
    let snapshot = offline_snapshot(&example)?;
    let (report, _) = super::mesh::validation_report(&snapshot);
    println!(
        "== two networks as Linux network namespaces, one per pod: Istio's iptables rules capture every pod's traffic \
         (REDIRECT to 15001 out, 15006 in), Envoy runs as uid {PROXY_UID}, applications listen on 0.0.0.0 and call services by name; \
         only the east-west gateway crosses the networks"
    );
    println!("== {} (copied to {})\n{report}", example.display(), work.join("config").display());
    let mut mesh = CapturedMesh::start(&me, &example, &args.envoy, &work, &args.xds_addr, &args.admin_addr, &["--debounce-after", "20ms"]).await?;
    println!("\n$ meshpilot proxy-status\n{}", super::status::render_status_table(&mesh.syncz().await));
    let client = mesh.pod(&args.client_app)?.clone();
    let port = snapshot
        .service(&crate::model::ServiceKey::new(&client.cluster, &client.namespace, &args.target))
        .and_then(|s| s.ports.first())
        .map_or(9080, |p| p.port);
    let to = format!("{}:{port}", args.target);
    println!(
        "\n{}'s calls: GET http://{to}/ from its pod (no proxy address in the application); every hop mTLS, remote calls through the east-west gateway.\nEdit {} while this runs to move the split.\n",
        args.client_app,
        mesh.config.join("mesh").display()
    );
    // Envoy may still be warming clusters right after its ACK: wait until the target answers at all.
    let started = std::time::Instant::now();
    while mesh.sample(&client, &to, "http", 20).map(|s| s.answers.keys().any(|k| k.starts_with("error"))).unwrap_or(true) {
        mesh.check_alive()?;
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "{to} did not answer {} within 30 s; logs in {}",
            client.name,
            work.join("logs").display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gateway_admin = mesh.gateway_admin.clone();
    let sample = |n: usize| -> anyhow::Result<Window> {
        let s = mesh.sample(&client, &to, "http", n)?;
        Ok((s.answers, s.peers.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect()))
    };
    let totals = report_traffic((args.duration, args.rate), sample, gateway_admin.as_deref(), || Ok(())).await?;
    mesh.check_alive()?;
    println!("\ntotal {} requests: {}", totals.values().sum::<usize>(), share_line(&totals));
    let logs = work.join("logs");
    drop(mesh);
    if args.keep {
        println!("logs: {}", logs.display());
    } else {
        let _ = std::fs::remove_dir_all(work.parent().unwrap_or(&work));
    }
    Ok(())
}
