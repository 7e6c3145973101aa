//! `meshpilot serve`: wires sources, the debouncer, the xDS server and the admin API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use crate::admin::{AdminState, serve_admin};
use crate::cache::MeshResources;
use crate::metrics::Metrics;
use crate::sources::file::{SourceMemory, load_config_dir, watch_config_dir};
use crate::sources::kubernetes::{self, KubeSourceOptions, SourceHealth};
use crate::sources::kubernetes_status::{LeaseConfig, run_status_writer};
use crate::static_resources::{load_resource_file, watch_resource_file};
use crate::xds::csds::Csds;
use crate::xds::debounce::{DebounceConfig, run_debouncer};
use crate::xds::provider::{ChangeNotifier, ResourceProvider, SharedResources};
use crate::xds::registry::ConnectionRegistry;
use crate::xds::resources::ResourceSet;
use crate::xds::server::{XdsServer, XdsServerConfig};

/// Connections the kernel may hold for the xDS listener before they are
/// accepted: a whole fleet reconnects at once after a restart, and an overflow
/// makes some of them fail (SYN cookies) instead of waiting. Capped by
/// `net.core.somaxconn`. (A thread of its own accepts, so the queue drains
/// even when every core is busy: `xds::accept_on_own_thread`.)
const XDS_ACCEPT_BACKLOG: u32 = 8192;

/// `TcpListener::bind` with a chosen accept backlog (tokio's is 1024).
async fn bind_with_backlog(addr: &str, backlog: u32, send_buffer: u32) -> std::io::Result<tokio::net::TcpListener> {
    let mut last_error = None;
    for address in tokio::net::lookup_host(addr).await? {
        let socket = if address.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        if send_buffer > 0 {
            // Accepted connections inherit it from the listening socket.
            socket.set_send_buffer_size(send_buffer)?;
        }
        match socket.bind(address) {
            Ok(()) => return socket.listen(backlog),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the address resolved to nothing")))
}

/// Runs blocking work so that the tokio worker it is called from hands its
/// other tasks to another thread meanwhile (`block_in_place` on the
/// multi-threaded runtime; directly elsewhere).
fn outside_the_runtime<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(work),
        _ => work(),
    }
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// gRPC address for ADS, the per-type xDS services and CSDS.
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub xds_addr: String,
    /// Also serve xDS on this Unix socket (proxies in other network namespaces reach it by path).
    #[arg(long)]
    pub xds_socket: Option<PathBuf>,
    /// HTTP address for /healthz, /readyz, /metrics and /debug/*.
    #[arg(long, default_value = "127.0.0.1:15014")]
    pub admin_addr: String,
    /// A YAML/JSON file of Envoy resources (`resources: [{"@type": ...}]`) served to every proxy; watched.
    #[arg(long, conflicts_with_all = ["config_dir", "kubernetes"])]
    pub resources: Option<PathBuf>,
    /// Local mode: DIR/<cluster>/*.yaml hold each cluster's Services, EndpointSlices, Pods and
    /// Namespaces; DIR/mesh/*.yaml the VirtualMeshes and TrafficPolicies. Watched.
    #[arg(long, conflicts_with = "kubernetes")]
    pub config_dir: Option<PathBuf>,
    /// Kubernetes mode: read TrafficPolicies, VirtualMeshes and KubernetesClusters from the
    /// management cluster, and Services, EndpointSlices and Pods from every registered cluster.
    #[arg(long)]
    pub kubernetes: bool,
    /// The management cluster's kubeconfig (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// The management cluster's kubeconfig context.
    #[arg(long, requires = "kubernetes")]
    pub context: Option<String>,
    /// The management cluster's name in messages.
    #[arg(long, default_value = "management-plane")]
    pub management_cluster_name: String,
    /// Namespace of KubernetesClusters, their kubeconfig Secrets and the status-writer Lease.
    #[arg(long, default_value = "service-mesh-hub")]
    pub registration_namespace: String,
    /// This replica's identity for the status-writer Lease (default: $POD_NAME, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    pub id: Option<String>,
    /// How long a status-writer Lease lasts without renewal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// Lifetime of workload certificates (re-issued after two thirds of it).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
    /// Where VirtualMesh CAs are kept (DIR/<namespace>.<name>/ca.crt, ca.key): a CA found there
    /// is used (a provided CA), one generated is written there. Without it CAs live in memory.
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// Changes that follow a push within this long are merged and pushed after config has been
    /// quiet this long (istiod's PILOT_DEBOUNCE_AFTER); a change after a quiet period is pushed at once.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub debounce_after: Duration,
    /// ...but no later than this after the first change (istiod's PILOT_DEBOUNCE_MAX is 10s; pushes here
    /// are cheap enough that under continuous churn a push every half second keeps convergence under a second).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub debounce_max: Duration,
    /// Proxies computing a push at once (PILOT_PUSH_THROTTLE).
    #[arg(long, default_value_t = 100)]
    pub push_concurrency: usize,
    /// Disconnect a proxy that does not read its responses for this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub send_timeout: Duration,
    /// HTTP/2 keepalive: ping each proxy this often...
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,
    /// ...and close its connection when a ping is not answered within this.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,
    /// Kernel send buffer of each xDS connection (SO_SNDBUF, bytes; 0: the
    /// kernel's autotuning, up to net.ipv4.tcp_wmem's 4 MiB per connection).
    /// A fleet's initial sync queues megabytes per proxy: unbounded, 10,000
    /// connections' buffers exceed the kernel's TCP memory (net.ipv4.tcp_mem)
    /// and every connection slows down under its memory pressure.
    #[arg(long, default_value_t = 65_536)]
    pub xds_send_buffer: u32,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A client for the management cluster: the given kubeconfig and context, or
/// kube's usual inference ($KUBECONFIG, ~/.kube/config, in-cluster).
async fn kube_client(path: Option<&std::path::Path>, context: Option<String>) -> anyhow::Result<kube::Client> {
    let options = kube::config::KubeConfigOptions { context, ..Default::default() };
    let mut config = match path {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p).with_context(|| format!("reading --kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &options).await?
        }
        None if options.context.is_some() => kube::Config::from_kubeconfig(&options).await?,
        None => kube::Config::infer()
            .await
            .context("finding the management cluster (no --kubeconfig, $KUBECONFIG, ~/.kube/config or in-cluster config)")?,
    };
    config.read_timeout = None;
    Ok(kube::Client::try_from(config)?)
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "meshpilot".into());
    format!("{host}-{}", std::process::id())
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let (notifier, changes) = ChangeNotifier::channel();
    let mut mesh: Option<Arc<MeshResources>> = None;
    let mut _file_watcher = None;
    let mut _dir_watcher = None;
    let mut cluster_health = None;
    let mut background_tasks = Vec::new();
    let certs = Arc::new(crate::ca::WorkloadCertificates::new(args.cert_ttl, args.ca_dir.clone()));
    let provider: Arc<dyn ResourceProvider> = match (&args.resources, &args.config_dir) {
        _ if args.kubernetes => {
            let resources = MeshResources::with_certificates(notifier, certs.clone()).counting(&metrics.translation).shared();
            let client = kube_client(args.kubeconfig.as_deref(), args.context.clone()).await?;
            let health = SourceHealth::default();
            let (snapshots_tx, snapshots_rx) = watch::channel(0u64);
            let sink = resources.clone();
            let options = KubeSourceOptions {
                management_name: args.management_cluster_name.clone(),
                registration_namespace: args.registration_namespace.clone(),
            };
            let source_health = health.clone();
            let source_client = client.clone();
            background_tasks.push(tokio::spawn(async move {
                let apply = move |inputs| {
                    // CPU work: give this worker's other tasks (the debouncer it
                    // just woke among them) to another thread meanwhile.
                    outside_the_runtime(|| sink.update(inputs));
                    snapshots_tx.send_modify(|v| *v += 1);
                };
                if let Err(e) = kubernetes::run(source_client, options, source_health, apply).await {
                    tracing::error!(error = %e, "the Kubernetes source stopped");
                }
            }));
            let lease = LeaseConfig {
                namespace: args.registration_namespace.clone(),
                name: "meshpilot-status-writer".into(),
                identity: args.id.clone().unwrap_or_else(default_identity),
                duration: args.lease_duration,
            };
            background_tasks.push(tokio::spawn(run_status_writer(client, lease, resources.clone(), snapshots_rx)));
            cluster_health = Some(health);
            mesh = Some(resources.clone());
            resources
        }
        (_, Some(dir)) => {
            let resources = MeshResources::with_certificates(notifier, certs.clone()).counting(&metrics.translation).shared();
            let memory = Arc::new(std::sync::Mutex::new(SourceMemory::default()));
            let inputs = load_config_dir(dir, &mut memory.lock().expect("source memory lock"))
                .with_context(|| format!("reading --config-dir {}", dir.display()))?;
            for e in &inputs.errors {
                tracing::error!(error = %e, "config dir: bad input");
            }
            tracing::info!(dir = %dir.display(), clusters = inputs.clusters.len(), policies = inputs.traffic_policies.len(), "loaded config dir");
            resources.update(inputs);
            let sink = resources.clone();
            _dir_watcher = Some(
                watch_config_dir(dir.clone(), memory, move |inputs| sink.update(inputs)).with_context(|| format!("watching {}", dir.display()))?,
            );
            mesh = Some(resources.clone());
            resources
        }
        (Some(path), None) => {
            let shared = Arc::new(SharedResources::new(notifier));
            let set = load_resource_file(path)?;
            tracing::info!(path = %path.display(), resources = set.len(), "loaded resource file");
            shared.set(set);
            _file_watcher = Some(watch_resource_file(path.clone(), shared.clone()).with_context(|| format!("watching {}", path.display()))?);
            shared
        }
        (None, None) => {
            let shared = Arc::new(SharedResources::new(notifier));
            shared.set(ResourceSet::new());
            shared
        }
    };

    if let Some(resources) = &mesh {
        // Rotation: re-issue certificates that passed two thirds of their life, and push them.
        let resources = resources.clone();
        let every = (args.cert_ttl / 20).clamp(Duration::from_millis(500), Duration::from_secs(60));
        background_tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if resources.certificates().rotation_due(std::time::SystemTime::now()) {
                    tracing::info!("rotating workload certificates");
                    resources.rotate_certificates();
                }
            }
        }));
    }
    let (push_tx, push_rx) = watch::channel(None);
    let debounce = DebounceConfig { quiet: args.debounce_after, max: args.debounce_max };
    let debouncer = tokio::spawn(run_debouncer(debounce, changes, push_tx, metrics.clone()));

    let registry = Arc::new(ConnectionRegistry::new());
    let server = XdsServer::new(
        provider.clone(),
        registry.clone(),
        metrics.clone(),
        push_rx,
        XdsServerConfig {
            push_concurrency: args.push_concurrency,
            send_timeout: args.send_timeout,
            keepalive_interval: args.keepalive_interval,
            keepalive_timeout: args.keepalive_timeout,
            ..Default::default()
        },
    );
    let xds_listener = bind_with_backlog(&args.xds_addr, XDS_ACCEPT_BACKLOG, args.xds_send_buffer)
        .await
        .with_context(|| format!("binding --xds-addr {}", args.xds_addr))?;
    let admin_listener =
        tokio::net::TcpListener::bind(&args.admin_addr).await.with_context(|| format!("binding --admin-addr {}", args.admin_addr))?;
    tracing::info!(xds = ?xds_listener.local_addr().ok(), admin = ?admin_listener.local_addr().ok(), "meshpilot serving");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let grpc_unix = match &args.xds_socket {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("binding --xds-socket {}", path.display()))?;
            tracing::info!(socket = %path.display(), "serving xDS on a Unix socket too");
            Some(tokio::spawn(crate::xds::serve_grpc_unix(listener, server.clone(), Csds::new(registry.clone()), stopped(stop_rx.clone()))))
        }
        None => None,
    };
    let grpc = tokio::spawn(crate::xds::serve_grpc(xds_listener, server, Csds::new(registry.clone()), stopped(stop_rx.clone())));
    let admin =
        tokio::spawn(serve_admin(admin_listener, AdminState { registry, metrics, provider, mesh, clusters: cluster_health }, stopped(stop_rx)));

    shutdown_signal().await;
    tracing::info!("shutting down: closing xDS streams");
    // Dropping the push channel ends every stream; Envoy keeps its config and reconnects elsewhere.
    debouncer.abort();
    for t in &background_tasks {
        t.abort();
    }
    let _ = stop_tx.send(true);
    let drain = async {
        let _ = grpc.await;
        if let Some(g) = grpc_unix {
            let _ = g.await;
        }
        let _ = admin.await;
    };
    if tokio::time::timeout(Duration::from_secs(5), drain).await.is_err() {
        tracing::warn!("shutdown timed out after 5s");
    }
    Ok(())
}
