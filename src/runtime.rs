//! The composition root: the one place that wires a source into the mesh
//! cache, the cache into the debouncer and the xDS server, and the server and
//! the admin API onto their listeners. `meshpilot serve` starts meshpilot
//! through it, and so do the tests that drive the server in-process
//! (`tests/ads_protocol.rs`, with a provider of their own).
//!
//! ```text
//!  Source ──► MeshResources (cache) ──► ChangeNotifier ──► debouncer ──► XdsServer ──► listeners
//!                     └──► status writer (Kubernetes, Lease holder)        AdminState ──► admin listener
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin::{AdminState, serve_admin};
use crate::ca::WorkloadCertificates;
use crate::ca::clusters::ClusterClients;
use crate::ca::kube_roots::{RootPublisher, load_root};
use crate::ca::service::{CertificateServer, CertificateService};
use crate::ca::serving::ServingCertificate;
use crate::ca::stream_auth::TokenAuthenticator;
use crate::ca::token::KubeTokenReviewer;
use crate::cache::MeshResources;
use crate::metrics::Metrics;
use crate::sources::file::{SourceMemory, load_config_dir, watch_config_dir};
use crate::sources::kubernetes::{self, KubeSourceOptions, SourceHealth};
use crate::static_resources::{load_resource_file, watch_resource_file};
use crate::status::{LeaseConfig, run_status_writer};
use crate::xds::csds::Csds;
use crate::xds::debounce::{DebounceConfig, DebouncerThread};
use crate::xds::provider::{ChangeNotifier, ResourceProvider, SharedResources};
use crate::xds::registry::ConnectionRegistry;
use crate::xds::resources::ResourceSet;
use crate::xds::server::{XdsServer, XdsServerConfig};

/// Where the served configuration comes from.
pub enum Source {
    /// Local mode: a watched folder of cluster manifests and mesh objects.
    ConfigDir(PathBuf),
    /// Kubernetes mode: the management cluster (mesh objects, registrations)
    /// and every registered cluster.
    Kubernetes(Box<KubernetesSource>),
    /// A watched file of raw Envoy resources, served to every proxy as written.
    ResourceFile(PathBuf),
    /// Nothing: an empty resource set (a server to point tools at).
    Empty,
}

/// Kubernetes mode's inputs.
pub struct KubernetesSource {
    /// The management cluster.
    pub client: kube::Client,
    pub options: KubeSourceOptions,
    /// Policy status is written back by the replica holding this Lease.
    pub lease: LeaseConfig,
}

/// How the mesh cache, the debouncer and the xDS server are tuned.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Lifetime of workload certificates (re-issued after two thirds of it).
    pub cert_ttl: Duration,
    /// Where VirtualMesh CAs are kept on disk (none: in memory).
    pub ca_dir: Option<PathBuf>,
    pub debounce: DebounceConfig,
    pub xds: XdsServerConfig,
    /// Names (DNS or IP) the TLS xDS listener's certificate covers besides
    /// meshpilot's and istiod's Service names.
    pub xds_tls_names: Vec<String>,
}

/// Where a control plane listens.
pub struct Listeners {
    pub xds: tokio::net::TcpListener,
    /// xDS on a Unix socket too (proxies in other network namespaces reach it by path).
    pub xds_unix: Option<tokio::net::UnixListener>,
    /// xDS and Istio's certificate API over TLS (Istio's 15012): the only
    /// listener where streams prove identities and certificates are signed.
    pub xds_tls: Option<tokio::net::TcpListener>,
    pub admin: Option<tokio::net::TcpListener>,
}

/// A control plane, wired and computing, not yet listening.
pub struct ControlPlane {
    pub metrics: Arc<Metrics>,
    pub registry: Arc<ConnectionRegistry>,
    pub provider: Arc<dyn ResourceProvider>,
    /// The mesh cache, when serving from mesh sources (policy status, describe).
    pub mesh: Option<Arc<MeshResources>>,
    /// The Kubernetes source's per-cluster watch health.
    pub clusters: Option<SourceHealth>,
    /// Istio's certificate API (Kubernetes mode: tokens are reviewed by the
    /// registered clusters), for the TLS xDS listener; never served in plaintext.
    pub certificates: Option<CertificateService>,
    /// The TLS listener's certificate, from the mesh CA.
    pub serving: Arc<ServingCertificate>,
    pub server: XdsServer,
    /// Turns the provider's changes into pushes; stopped at shutdown.
    debouncer: DebouncerThread,
    /// The sources' background work: aborted at shutdown.
    tasks: Vec<JoinHandle<()>>,
    /// File watchers: they stop when dropped.
    _watchers: Vec<notify::RecommendedWatcher>,
}

impl ControlPlane {
    /// Wires `source` into a mesh cache (or a shared resource set) and that
    /// into the debouncer and the xDS server; the first configuration is read
    /// before this returns (Kubernetes: once every cluster has listed, which
    /// `/readyz` reports).
    pub async fn start(source: Source, settings: Settings) -> anyhow::Result<ControlPlane> {
        let metrics = Arc::new(Metrics::new());
        let (notifier, changes) = ChangeNotifier::channel();
        let certs = Arc::new(match &source {
            // Every replica signs with the management cluster's roots, never its own.
            Source::Kubernetes(_) => WorkloadCertificates::installed_only(settings.cert_ttl),
            _ => WorkloadCertificates::new(settings.cert_ttl, settings.ca_dir.clone()),
        });
        let mut tasks = Vec::new();
        let mut watchers = Vec::new();
        let (mut mesh, mut clusters, mut certificates, mut authenticator) = (None, None, None, None);
        let serving = Arc::new(ServingCertificate::new(crate::ca::serving::default_names(&settings.xds_tls_names), settings.cert_ttl));
        let provider: Arc<dyn ResourceProvider> = match source {
            Source::Kubernetes(kube) => {
                let KubernetesSource { client, mut options, lease } = *kube;
                let resources = MeshResources::with_certificates(notifier, certs.clone()).counting(&metrics.translation).shared();
                // Every registered cluster's client reviews its workloads' tokens.
                let cluster_clients = Arc::new(ClusterClients::default());
                let reviewer = Arc::new(KubeTokenReviewer::new(cluster_clients.clone()));
                // ... and gets the mesh root published into its namespaces.
                let publisher = Arc::new(RootPublisher::new(cluster_clients.clone()));
                let hook_publisher = publisher.clone();
                options.on_cluster_client = Some(Arc::new(move |cluster: &str, client: Option<kube::Client>| {
                    match client {
                        Some(c) => cluster_clients.set(cluster, c),
                        None => cluster_clients.remove(cluster),
                    }
                    hook_publisher.forget_cluster(cluster);
                }));
                certificates = Some(
                    CertificateService::new(reviewer.clone(), resources.clone(), certs).with_cluster_aliases(settings.xds.cluster_aliases.clone()),
                );
                authenticator = Some(Arc::new(TokenAuthenticator(reviewer)));
                let health = SourceHealth::default();
                let (snapshots_tx, snapshots_rx) = watch::channel(0u64);
                let sink = resources.clone();
                let (source_client, source_health) = (client.clone(), health.clone());
                tasks.push(tokio::spawn(async move {
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
                tasks.push(tokio::spawn(keep_mesh_roots(client.clone(), resources.clone(), publisher, serving.clone(), snapshots_rx.clone())));
                tasks.push(tokio::spawn(run_status_writer(client, lease, resources.clone(), snapshots_rx)));
                clusters = Some(health);
                mesh = Some(resources.clone());
                resources
            }
            Source::ConfigDir(dir) => {
                let resources = MeshResources::with_certificates(notifier, certs).counting(&metrics.translation).shared();
                let memory = Arc::new(std::sync::Mutex::new(SourceMemory::default()));
                let inputs = load_config_dir(&dir, &mut memory.lock().expect("source memory lock"))
                    .with_context(|| format!("reading --config-dir {}", dir.display()))?;
                for e in &inputs.errors {
                    tracing::error!(error = %e, "config dir: bad input");
                }
                tracing::info!(dir = %dir.display(), clusters = inputs.clusters.len(), policies = inputs.traffic_policies.len(), "loaded config dir");
                resources.update(inputs);
                let sink = resources.clone();
                watchers.push(
                    watch_config_dir(dir.clone(), memory, settings.debounce.quiet, move |inputs| sink.update(inputs))
                        .with_context(|| format!("watching {}", dir.display()))?,
                );
                mesh = Some(resources.clone());
                resources
            }
            Source::ResourceFile(path) => {
                let shared = Arc::new(SharedResources::new(notifier));
                let set = load_resource_file(&path)?;
                tracing::info!(path = %path.display(), resources = set.len(), "loaded resource file");
                shared.set(set);
                watchers.push(watch_resource_file(path.clone(), shared.clone()).with_context(|| format!("watching {}", path.display()))?);
                shared
            }
            Source::Empty => {
                let shared = Arc::new(SharedResources::new(notifier));
                shared.set(ResourceSet::new());
                shared
            }
        };
        if let Some(resources) = &mesh {
            tasks.push(tokio::spawn(rotate_certificates(resources.clone(), serving.clone(), settings.cert_ttl)));
        }
        let mut plane = ControlPlane::with_provider(provider, changes, metrics, settings.debounce, settings.xds);
        plane.mesh = mesh;
        plane.clusters = clusters;
        plane.certificates = certificates;
        plane.serving = serving;
        if let Some(a) = authenticator {
            plane.server.set_authenticator(a);
        }
        plane.tasks.extend(tasks);
        plane._watchers = watchers;
        Ok(plane)
    }

    /// Any provider behind the same debouncer and xDS server: `changes` is
    /// the receiving end of the provider's [`ChangeNotifier`].
    pub fn with_provider(
        provider: Arc<dyn ResourceProvider>,
        changes: mpsc::UnboundedReceiver<Instant>,
        metrics: Arc<Metrics>,
        debounce: DebounceConfig,
        xds: XdsServerConfig,
    ) -> ControlPlane {
        let (push_tx, push_rx) = watch::channel(None);
        let debouncer = DebouncerThread::spawn(debounce, changes, push_tx, metrics.clone()).expect("starting the debouncer's thread");
        let registry = Arc::new(ConnectionRegistry::new());
        let server = XdsServer::new(provider.clone(), registry.clone(), metrics.clone(), push_rx, xds);
        ControlPlane {
            metrics,
            registry,
            provider,
            mesh: None,
            clusters: None,
            certificates: None,
            serving: Arc::new(ServingCertificate::new(crate::ca::serving::default_names(&[]), Duration::from_secs(86400))),
            server,
            debouncer,
            tasks: Vec::new(),
            _watchers: Vec::new(),
        }
    }

    /// What the admin API reads.
    pub fn admin_state(&self) -> AdminState {
        AdminState {
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            provider: self.provider.clone(),
            mesh: self.mesh.clone(),
            clusters: self.clusters.clone(),
        }
    }

    /// Serves xDS (ADS, the per-type services and CSDS) and the admin API
    /// until `shutdown` resolves; then stops pushing, closes every stream
    /// (Envoy keeps its config and reconnects elsewhere) and waits 5 s at
    /// most for the listeners to drain.
    pub async fn serve(mut self, listeners: Listeners, shutdown: impl std::future::Future<Output = ()>) {
        let admin_state = self.admin_state();
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let csds = Csds::new(self.registry.clone());
        let mut servers = Vec::new();
        if let Some(unix) = listeners.xds_unix {
            let (server, csds, stop) = (self.server.clone(), csds.clone(), stopped(stop_rx.clone()));
            servers.push(tokio::spawn(async move {
                if let Err(e) = crate::xds::serve_grpc_unix(unix, server, csds, stop).await {
                    tracing::error!(error = %e, "xDS on the Unix socket stopped");
                }
            }));
        }
        if let Some(tls) = listeners.xds_tls {
            let (server, csds, stop) = (self.server.clone(), csds.clone(), stopped(stop_rx.clone()));
            let config = Arc::new(self.serving.server_config());
            let ca = match self.certificates.clone() {
                Some(c) => tonic::service::Routes::new(CertificateServer::new(c)),
                None => tonic::service::Routes::default(),
            };
            servers.push(tokio::spawn(async move {
                if let Err(e) = crate::xds::serve_grpc_tls(tls, config, server, csds, ca, stop).await {
                    tracing::error!(error = %e, "TLS xDS server stopped");
                }
            }));
        }
        let (server, stop) = (self.server.clone(), stopped(stop_rx.clone()));
        servers.push(tokio::spawn(async move {
            if let Err(e) = crate::xds::serve_grpc(listeners.xds, server, csds, stop).await {
                tracing::error!(error = %e, "xDS server stopped");
            }
        }));
        if let Some(admin) = listeners.admin {
            let stop = stopped(stop_rx);
            servers.push(tokio::spawn(async move {
                if let Err(e) = serve_admin(admin, admin_state, stop).await {
                    tracing::error!(error = %e, "admin server stopped");
                }
            }));
        }

        shutdown.await;
        tracing::info!("shutting down: closing xDS streams");
        // Ending the debouncer drops the push channel, which ends every stream.
        self.debouncer.stop();
        for t in &self.tasks {
            t.abort();
        }
        let _ = stop_tx.send(true);
        let drain = futures::future::join_all(servers);
        if tokio::time::timeout(Duration::from_secs(5), drain).await.is_err() {
            tracing::warn!("shutdown timed out after 5s");
        }
    }
}

/// Kubernetes mode: loads every VirtualMesh's CA from the management
/// cluster (creating a builtin root's Secret once) as the snapshot names
/// them, re-translates the secrets when one arrives or changes, and keeps
/// each root published in its clusters' namespaces. Failures are retried
/// every 10 s; every ConfigMap is written again every 5 minutes.
async fn keep_mesh_roots(
    client: kube::Client,
    resources: Arc<MeshResources>,
    publisher: Arc<RootPublisher>,
    serving: Arc<ServingCertificate>,
    mut snapshots: watch::Receiver<u64>,
) {
    const RETRY: Duration = Duration::from_secs(10);
    const REPUBLISH: Duration = Duration::from_secs(300);
    let mut loaded: std::collections::BTreeMap<String, crate::model::CaSource> = Default::default();
    let mut last_republish = Instant::now();
    loop {
        let snapshot = resources.snapshot();
        let mut retry = false;
        let mut changed = false;
        let trusts: std::collections::BTreeMap<&String, &crate::model::MeshTrust> = snapshot.trust.values().map(|t| (&t.virtual_mesh, t)).collect();
        for (vm, trust) in trusts {
            if loaded.get(vm) == Some(&trust.ca) {
                continue;
            }
            match load_root(&client, trust).await {
                Ok(ca) => {
                    changed |= resources.certificates().install(vm, ca);
                    loaded.insert(vm.clone(), trust.ca.clone());
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot load a VirtualMesh CA; its workloads get no certificates until it loads");
                    retry = true;
                }
            }
        }
        if changed {
            tracing::info!("mesh CA loaded: re-issuing workload certificates");
            resources.rotate_certificates();
        }
        refresh_serving(&resources, &serving);
        if last_republish.elapsed() > REPUBLISH {
            publisher.forget();
            last_republish = Instant::now();
        }
        let roots = snapshot
            .trust
            .iter()
            .filter_map(|(cluster, trust)| {
                let ca = resources.certificates().installed(&trust.virtual_mesh)?;
                let namespaces = snapshot.clusters.get(cluster).map(|c| c.namespaces.clone()).unwrap_or_default();
                Some((cluster.clone(), (ca.root_pem.clone(), namespaces)))
            })
            .collect();
        retry |= publisher.publish(&roots).await > 0;
        let wait = if retry { RETRY } else { REPUBLISH };
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The TLS listener's certificate from the first VirtualMesh's CA (by
/// name): issued when there is none, re-issued when due or the CA changed.
fn refresh_serving(resources: &MeshResources, serving: &ServingCertificate) {
    let snapshot = resources.snapshot();
    let Some(trust) = snapshot.trust.values().min_by(|a, b| a.virtual_mesh.cmp(&b.virtual_mesh)) else { return };
    match resources.certificates().authority(trust) {
        Ok(ca) => {
            if let Err(e) = serving.refresh(&ca, std::time::SystemTime::now()) {
                tracing::error!(error = %e, "cannot issue the TLS xDS listener's certificate");
            }
        }
        Err(crate::ca::CaError::NotLoaded(_)) => {}
        Err(e) => tracing::error!(error = %e, "no CA for the TLS xDS listener's certificate"),
    }
}

/// Re-issues the certificates that passed two thirds of their life, and pushes them.
async fn rotate_certificates(resources: Arc<MeshResources>, serving: Arc<ServingCertificate>, cert_ttl: Duration) {
    let every = (cert_ttl / 20).clamp(Duration::from_millis(500), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        refresh_serving(&resources, &serving);
        if resources.certificates().rotation_due(std::time::SystemTime::now()) {
            tracing::info!("rotating workload certificates");
            resources.rotate_certificates();
        }
    }
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
