//! `meshpilot serve`: its flags, the listeners, and the control plane that
//! `runtime` wires from them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::runtime::{ControlPlane, KubernetesSource, Listeners, Settings, Source};
use crate::sources::kubernetes::KubeSourceOptions;
use crate::status::LeaseConfig;
use crate::xds::auth::IdentityPolicy;
use crate::xds::debounce::DebounceConfig;
use crate::xds::server::XdsServerConfig;

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

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// gRPC address for ADS, the per-type xDS services and CSDS.
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub xds_addr: String,
    /// xDS and Istio's certificate API over TLS (Istio's port is 15012), with a
    /// certificate from the mesh CA. Streams here prove their identity with their
    /// ServiceAccount token; only they get certificates and keys.
    #[arg(long)]
    pub xds_tls_addr: Option<String>,
    /// More names (DNS or IP) for the TLS listener's certificate; it always covers
    /// meshpilot.service-mesh-hub.svc, istiod.istio-system.svc (and their short and
    /// long forms) and localhost. Repeatable.
    #[arg(long = "xds-tls-san")]
    pub xds_tls_sans: Vec<String>,
    /// Map a cluster name proxies use to a registered cluster: ALIAS=CLUSTER, e.g.
    /// `Kubernetes=cluster-1` for Istio's default CLUSTER_ID. Repeatable.
    #[arg(long = "cluster-alias", value_parser = parse_alias)]
    pub cluster_aliases: Vec<(String, String)>,
    /// INSECURE, for local demos: give a stream that proved nothing the certificate and key
    /// of whatever identity its node metadata claims (over plaintext too). Logs a warning.
    #[arg(long)]
    pub insecure_self_asserted_identities: bool,
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
    /// Bytes of large responses (64 KiB or more: a sync's clusters, endpoints and virtual hosts)
    /// on their way to proxies at once, in MiB; the rest wait their turn (0: no limit).
    #[arg(long, default_value_t = (crate::xds::server::DEFAULT_SEND_BUDGET_BYTES >> 20) as u64)]
    pub send_budget_mib: u64,
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

fn parse_alias(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((alias, cluster)) if !alias.is_empty() && !cluster.is_empty() => Ok((alias.to_string(), cluster.to_string())),
        _ => Err(format!("{s:?}: expected ALIAS=CLUSTER, e.g. Kubernetes=cluster-1")),
    }
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
pub(crate) async fn kube_client(path: Option<&std::path::Path>, context: Option<String>) -> anyhow::Result<kube::Client> {
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
    // Freed heap memory goes back to the kernel when the workers idle (src/allocator.rs).
    #[cfg(feature = "mimalloc")]
    tokio::spawn(crate::allocator::release_freed_memory_periodically());
    let source = match (&args.resources, &args.config_dir) {
        _ if args.kubernetes => Source::Kubernetes(Box::new(KubernetesSource {
            client: kube_client(args.kubeconfig.as_deref(), args.context.clone()).await?,
            options: KubeSourceOptions {
                management_name: args.management_cluster_name.clone(),
                registration_namespace: args.registration_namespace.clone(),
                on_cluster_client: None,
            },
            lease: LeaseConfig {
                namespace: args.registration_namespace.clone(),
                name: "meshpilot-status-writer".into(),
                identity: args.id.clone().unwrap_or_else(default_identity),
                duration: args.lease_duration,
            },
        })),
        (_, Some(dir)) => Source::ConfigDir(dir.clone()),
        (Some(path), None) => Source::ResourceFile(path.clone()),
        (None, None) => Source::Empty,
    };
    let settings = Settings {
        cert_ttl: args.cert_ttl,
        ca_dir: args.ca_dir.clone(),
        debounce: DebounceConfig { quiet: args.debounce_after, max: args.debounce_max },
        xds: XdsServerConfig {
            push_concurrency: args.push_concurrency,
            send_budget_bytes: usize::try_from(args.send_budget_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
            send_timeout: args.send_timeout,
            keepalive_interval: args.keepalive_interval,
            keepalive_timeout: args.keepalive_timeout,
            identity_policy: if args.insecure_self_asserted_identities {
                tracing::warn!(
                    "--insecure-self-asserted-identities: any process that reaches the xDS ports gets the certificate and key of whatever identity it claims; for local demos only"
                );
                IdentityPolicy::TrustSelfAsserted
            } else {
                IdentityPolicy::RequireProof
            },
            cluster_aliases: args.cluster_aliases.iter().cloned().collect(),
            ..Default::default()
        },
        xds_tls_names: args.xds_tls_sans.clone(),
    };
    let plane = ControlPlane::start(source, settings).await?;

    let xds = bind_with_backlog(&args.xds_addr, XDS_ACCEPT_BACKLOG, args.xds_send_buffer)
        .await
        .with_context(|| format!("binding --xds-addr {}", args.xds_addr))?;
    let admin = tokio::net::TcpListener::bind(&args.admin_addr).await.with_context(|| format!("binding --admin-addr {}", args.admin_addr))?;
    tracing::info!(xds = ?xds.local_addr().ok(), admin = ?admin.local_addr().ok(), "meshpilot serving");
    let xds_unix = match &args.xds_socket {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("binding --xds-socket {}", path.display()))?;
            tracing::info!(socket = %path.display(), "serving xDS on a Unix socket too");
            Some(listener)
        }
        None => None,
    };
    let xds_tls = match &args.xds_tls_addr {
        Some(addr) => {
            let listener =
                bind_with_backlog(addr, XDS_ACCEPT_BACKLOG, args.xds_send_buffer).await.with_context(|| format!("binding --xds-tls-addr {addr}"))?;
            tracing::info!(addr = ?listener.local_addr().ok(), "serving xDS and the certificate API over TLS");
            Some(listener)
        }
        None => None,
    };
    plane.serve(Listeners { xds, xds_unix, xds_tls, admin: Some(admin) }, shutdown_signal()).await;
    Ok(())
}
