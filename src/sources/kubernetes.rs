//! The Kubernetes source: the management cluster's mesh objects (TrafficPolicy,
//! VirtualMesh, AccessControlPolicy, KubernetesCluster) and, for every
//! registered cluster, a watcher per kind (Service, EndpointSlice, Pod,
//! Namespace) whose events go one by one into the cluster's
//! [`ClusterBuilder`], assembled into the same [`MeshInputs`] the file source
//! produces. Nothing below the sources knows where inputs came from.
//!
//! Faults: a cluster whose API server stops answering keeps its last known
//! objects (a kind is only replaced by a complete re-list) and is
//! marked stale in `/debug/clusterz`; kube-rs' watcher re-lists after a 410
//! Gone or a reconnect, and a re-list that changes nothing changes no snapshot,
//! so it pushes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::model::api::{AccessControlPolicy, KubernetesCluster, Sidecar, TrafficPolicy, VirtualMesh};
use crate::model::cluster_build::{ClusterBuilder, ClusterObject, Kind};
use crate::model::k8s::{DerivedByObject, PodSummary, PodView};
use crate::model::{ClusterState, MeshInputs, PolicyObject};

/// What is known about one registered cluster's watches.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterHealth {
    pub name: String,
    /// The API server the cluster's kubeconfig points at.
    pub server: String,
    /// Every kind has completed an initial list.
    pub synced: bool,
    /// A watch has failed since its last complete list: the objects served
    /// for this cluster are its last known ones.
    pub stale: bool,
    pub last_error: Option<String>,
    /// Seconds since the epoch of the last watch event or completed list.
    pub last_event_unix: Option<u64>,
    /// How many complete lists (initial and re-lists) the watches did.
    pub lists: u64,
    /// The kinds whose watch has completed a list (synced means all of them).
    pub listed: std::collections::BTreeSet<String>,
    pub watch_errors: u64,
    /// Kinds whose watch is currently failing.
    pub failing: Vec<String>,
    pub objects: BTreeMap<String, usize>,
    /// How many builds gave the cluster a new state (a re-list of unchanged
    /// objects gives none). Counted with `synced`: once that is true, every
    /// build of the lists that made it so is counted.
    pub state_changes: u64,
}

/// Shared view of the source's health for the admin API.
#[derive(Debug, Clone, Default)]
pub struct SourceHealth {
    inner: Arc<Mutex<BTreeMap<String, ClusterHealth>>>,
    mesh_synced: Arc<std::sync::atomic::AtomicBool>,
}

impl SourceHealth {
    pub fn clusters(&self) -> Vec<ClusterHealth> {
        self.inner.lock().expect("health lock").values().cloned().collect()
    }
    pub fn mesh_synced(&self) -> bool {
        self.mesh_synced.load(std::sync::atomic::Ordering::Acquire)
    }
    fn update(&self, cluster: &str, f: impl FnOnce(&mut ClusterHealth)) {
        let mut map = self.inner.lock().expect("health lock");
        let h = map.entry(cluster.to_string()).or_insert_with(|| ClusterHealth { name: cluster.to_string(), ..Default::default() });
        f(h);
    }
    fn remove(&self, cluster: &str) {
        self.inner.lock().expect("health lock").remove(cluster);
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The health entry of the management cluster's mesh-object watches.
pub const MESH_OBJECTS: &str = "mesh-objects";
/// The mesh object kinds watched in the management cluster.
const MESH_KINDS: [&str; 4] = ["TrafficPolicy", "VirtualMesh", "AccessControlPolicy", "Sidecar"];

#[derive(Debug)]
enum Dirty {
    /// A cluster's objects changed ([`MESH_OBJECTS`]: the mesh objects).
    Cluster(String),
    /// A KubernetesCluster was added, changed or removed.
    Registrations,
}

/// The kinds watched in every registered cluster.
const CLUSTER_KINDS: [&str; 4] = ["Service", "EndpointSlice", "Pod", "Namespace"];

struct ClusterWatch {
    /// The KubernetesCluster spec and secret version it was started from.
    fingerprint: String,
    /// The API server its kubeconfig points at.
    server: String,
    /// The cluster's objects, which its watches apply one by one as events
    /// arrive, and its state, built again only where they reach.
    builder: Arc<Mutex<ClusterBuilder>>,
    /// Aborted when dropped: dropping the watch stops its reflectors.
    _tasks: JoinSet<()>,
}

/// Where one kind's watch puts what it reads: complete lists, and the
/// objects added, changed or deleted after them.
trait WatchSink<K>: Send + 'static {
    /// A complete list: every object of the kind (the others are gone).
    fn listed(&mut self, objects: Vec<K>);
    fn applied(&mut self, object: K);
    fn deleted(&mut self, object: K);
}

/// A reflector store (the mesh objects, read as a whole on every rebuild).
impl<K> WatchSink<K> for reflector::store::Writer<K>
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send,
{
    fn listed(&mut self, objects: Vec<K>) {
        self.apply_watcher_event(&watcher::Event::Init);
        for object in objects {
            self.apply_watcher_event(&watcher::Event::InitApply(object));
        }
        self.apply_watcher_event(&watcher::Event::InitDone);
    }
    fn applied(&mut self, object: K) {
        self.apply_watcher_event(&watcher::Event::Apply(object));
    }
    fn deleted(&mut self, object: K) {
        self.apply_watcher_event(&watcher::Event::Delete(object));
    }
}

/// A registered cluster's kinds go straight into its [`ClusterBuilder`],
/// object by object (Pods as their summaries).
struct ClusterSink(Arc<Mutex<ClusterBuilder>>);

impl ClusterSink {
    fn builder(&self) -> std::sync::MutexGuard<'_, ClusterBuilder> {
        self.0.lock().expect("cluster builder lock")
    }
}

/// A kind a registered cluster's watch reads, as the cluster's builder takes it.
trait ClusterKind: Sized + Send + 'static {
    const KIND: Kind;
    fn into_object(self) -> ClusterObject;
}

impl ClusterKind for Service {
    const KIND: Kind = Kind::Service;
    fn into_object(self) -> ClusterObject {
        ClusterObject::Service(Arc::new(self))
    }
}

impl ClusterKind for EndpointSlice {
    const KIND: Kind = Kind::EndpointSlice;
    fn into_object(self) -> ClusterObject {
        ClusterObject::EndpointSlice(Arc::new(self))
    }
}

/// Pods are kept as their summaries (the view is dropped once summarised).
impl ClusterKind for PodView {
    const KIND: Kind = Kind::Pod;
    fn into_object(self) -> ClusterObject {
        ClusterObject::Pod(Arc::new(PodSummary::from(&self)))
    }
}

impl ClusterKind for Namespace {
    const KIND: Kind = Kind::Namespace;
    fn into_object(self) -> ClusterObject {
        ClusterObject::Namespace(Arc::new(self))
    }
}

impl<K: ClusterKind> WatchSink<K> for ClusterSink {
    fn listed(&mut self, objects: Vec<K>) {
        let objects = objects.into_iter().map(K::into_object).collect();
        self.builder().replace(K::KIND, objects);
    }
    fn applied(&mut self, object: K) {
        let object = object.into_object();
        self.builder().apply(object);
    }
    fn deleted(&mut self, object: K) {
        if let Some(id) = object.into_object().id() {
            self.builder().remove(&id);
        }
    }
}

/// Drops an object's `managedFields` (server-side apply bookkeeping, often
/// the larger part of a small object), which nothing here reads.
fn without_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(3);

/// The watch loop of one kind in one cluster: gives `sink` each object as
/// `trim` leaves it (what meshpilot reads of it), and reports progress and
/// failures. Any watch error ends the watch; after a short backoff a fresh
/// one starts with a complete list, so "fresh again" always means
/// "re-listed" (which is also what a 410 Gone requires). A list's objects
/// reach the sink only when it completes (one cut short is dropped), so
/// while the API server is away the last known objects keep serving.
async fn reflect<K>(
    api: Api<K>,
    mut sink: impl WatchSink<K>,
    cluster: String,
    kind: &'static str,
    health: SourceHealth,
    dirty: mpsc::UnboundedSender<Dirty>,
    trim: fn(&mut K),
) where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut retry = RETRY_FIRST;
    loop {
        let mut stream = std::pin::pin!(watcher(api.clone(), watcher::Config::default()));
        let mut listing = false;
        // A list's objects, held until it completes (then they replace the kind's).
        let mut listed: Vec<K> = Vec::new();
        while let Some(item) = stream.next().await {
            let mut event = match item {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(cluster = %cluster, kind, error = %e, "watch failed; serving the last known objects until a re-list completes");
                    health.update(&cluster, |h| {
                        h.watch_errors += 1;
                        h.last_error = Some(format!("{kind}: {e}"));
                        if !h.failing.iter().any(|k| k == kind) {
                            h.failing.push(kind.to_string());
                        }
                        h.stale = true;
                    });
                    break;
                }
            };
            if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o) = &mut event {
                trim(o);
            }
            let changed = match event {
                watcher::Event::Init => {
                    listing = true;
                    listed.clear();
                    false
                }
                watcher::Event::InitApply(object) => {
                    listed.push(object);
                    false
                }
                watcher::Event::InitDone => {
                    listing = false;
                    retry = RETRY_FIRST;
                    sink.listed(std::mem::take(&mut listed));
                    health.update(&cluster, |h| {
                        h.lists += 1;
                        h.listed.insert(kind.to_string());
                        h.failing.retain(|k| k != kind);
                        h.stale = !h.failing.is_empty();
                        h.last_event_unix = Some(now_unix());
                    });
                    let _ = dirty.send(Dirty::Cluster(cluster.clone()));
                    false
                }
                watcher::Event::Apply(object) => {
                    sink.applied(object);
                    true
                }
                watcher::Event::Delete(object) => {
                    sink.deleted(object);
                    true
                }
            };
            if changed && !listing {
                health.update(&cluster, |h| h.last_event_unix = Some(now_unix()));
                let _ = dirty.send(Dirty::Cluster(cluster.clone()));
            }
        }
        // A list cut short is dropped: the last complete one keeps serving.
        listed.clear();
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// A client for a registered cluster, from the kubeconfig in its Secret.
pub async fn client_from_kubeconfig_yaml(yaml: &str, context: Option<String>) -> anyhow::Result<(Client, String)> {
    let kubeconfig = Kubeconfig::from_yaml(yaml)?;
    let options = KubeConfigOptions { context, ..Default::default() };
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?;
    // Watches are long-lived; the read timeout would cut them (kube's watcher sets its own).
    config.read_timeout = None;
    let server = config.cluster_url.to_string();
    Ok((Client::try_from(config)?, server))
}

/// The kubeconfig a KubernetesCluster's secret holds (key `kubeconfig`, or its only key).
fn kubeconfig_from_secret(secret: &Secret) -> Option<String> {
    let data = secret.data.as_ref()?;
    let bytes = data.get("kubeconfig").or_else(|| if data.len() == 1 { data.values().next() } else { None })?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// Reads a policy object leniently: a spec that does not parse is passed on
/// with its errors (it shows INVALID while its last accepted version serves).
fn policy_object<S: serde::de::DeserializeOwned + Default>(obj: &DynamicObject, cluster: &str) -> PolicyObject<S> {
    let spec_doc = obj.data.get("spec").cloned().unwrap_or(Value::Object(Default::default()));
    let mut parse_errors = Vec::new();
    let spec = match serde_path_to_error::deserialize::<_, S>(&spec_doc) {
        Ok(s) => s,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            parse_errors.push(if path == "." { format!("spec: {inner}") } else { format!("spec.{path}: {inner}") });
            S::default()
        }
    };
    PolicyObject {
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        generation: obj.metadata.generation,
        created_ms: obj.metadata.creation_timestamp.as_ref().map(|t| t.0.as_millisecond()).unwrap_or(0),
        origin: format!("cluster {cluster}"),
        spec,
        parse_errors,
    }
}

/// Told each registered cluster's client as its watches start (`Some`) and
/// when the cluster is deregistered (`None`): the certificate API reviews
/// tokens with the same registration identity.
pub type ClusterClientHook = Arc<dyn Fn(&str, Option<Client>) + Send + Sync>;

/// Options for [`run`].
#[derive(Clone)]
pub struct KubeSourceOptions {
    /// The name the management cluster goes by in messages.
    pub management_name: String,
    /// Where KubernetesCluster objects and their Secrets live.
    pub registration_namespace: String,
    pub on_cluster_client: Option<ClusterClientHook>,
}

/// Runs the source until the process ends: calls `apply` with fresh inputs
/// after every change (coalesced), and once all registered clusters have
/// listed (or failed to) and the mesh objects are listed.
pub async fn run(
    management: Client,
    options: KubeSourceOptions,
    health: SourceHealth,
    apply: impl Fn(MeshInputs) + Send + 'static,
) -> anyhow::Result<()> {
    let (dirty_tx, mut dirty_rx) = mpsc::unbounded_channel::<Dirty>();
    let mgmt = options.management_name.clone();

    // Mesh objects, read as dynamic objects so that one object that does not
    // parse cannot fail the whole list.
    let mut mesh_tasks = JoinSet::new();
    let mesh_store = |ar: ApiResource, kind: &'static str, mesh_tasks: &mut JoinSet<()>| {
        let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
        let store = writer.as_reader();
        let api = Api::<DynamicObject>::all_with(management.clone(), &ar);
        mesh_tasks.spawn(reflect(api, writer, MESH_OBJECTS.to_string(), kind, health.clone(), dirty_tx.clone(), without_managed_fields));
        store
    };
    let traffic_policies = mesh_store(ApiResource::erase::<TrafficPolicy>(&()), "TrafficPolicy", &mut mesh_tasks);
    let virtual_meshes = mesh_store(ApiResource::erase::<VirtualMesh>(&()), "VirtualMesh", &mut mesh_tasks);
    let access_policies = mesh_store(ApiResource::erase::<AccessControlPolicy>(&()), "AccessControlPolicy", &mut mesh_tasks);
    // Istio's Sidecar is optional: without its CRD (or read access), Sidecars
    // are not read and every proxy sees its whole virtual mesh.
    let sidecar_resource = ApiResource::erase::<Sidecar>(&());
    let sidecars = match Api::<DynamicObject>::all_with(management.clone(), &sidecar_resource).list(&kube::api::ListParams::default().limit(1)).await
    {
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 403 => {
            tracing::warn!(
                code = e.code,
                error = %e.message,
                "Sidecars (networking.istio.io/v1) cannot be read, so proxies are not scoped: install deploy/crds/sidecars.networking.istio.io.yaml and deploy/rbac.yaml, then restart"
            );
            health.update(MESH_OBJECTS, |h| {
                h.listed.insert("Sidecar".to_string());
            });
            reflector::store::Writer::<DynamicObject>::new(sidecar_resource).as_reader()
        }
        // Anything else (the API server is away): the watch retries like the others.
        _ => mesh_store(sidecar_resource, "Sidecar", &mut mesh_tasks),
    };

    let (registrations, reg_writer) = reflector::store::<KubernetesCluster>();
    let reg_api = Api::<KubernetesCluster>::namespaced(management.clone(), &options.registration_namespace);
    {
        let tx = dirty_tx.clone();
        let stream = reflector::reflector(reg_writer, watcher(reg_api, watcher::Config::default()).default_backoff());
        mesh_tasks.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                        let _ = tx.send(Dirty::Registrations);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "KubernetesCluster watch failed"),
                }
            }
        });
    }

    let mut watches: HashMap<String, ClusterWatch> = HashMap::new();
    let mut states: BTreeMap<String, Arc<ClusterState>> = BTreeMap::new();
    let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut published_once = false;
    // Each mesh object is parsed once, not every policy on every EndpointSlice event.
    let (mut parsed_policies, mut parsed_meshes, mut parsed_access, mut parsed_sidecars) =
        (DerivedByObject::default(), DerivedByObject::default(), DerivedByObject::default(), DerivedByObject::default());
    // The KubernetesCluster watch reports only after its initial list.
    let mut registrations_listed = false;

    while let Some(first) = dirty_rx.recv().await {
        let started = std::time::Instant::now();
        let mut batch = vec![first];
        while let Ok(more) = dirty_rx.try_recv() {
            batch.push(more);
        }
        if batch.iter().any(|d| matches!(d, Dirty::Registrations)) {
            registrations_listed = true;
            // Start, restart or stop cluster watches to match the registrations.
            let wanted: Vec<Arc<KubernetesCluster>> = registrations.state();
            let mut live = Vec::new();
            for kc in wanted {
                let name = kc.name_any();
                live.push(name.clone());
                let secret_ns =
                    kc.spec.secret_ref.namespace.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| options.registration_namespace.clone());
                let secret_name = kc.spec.secret_ref.name.clone();
                let secret = match Api::<Secret>::namespaced(management.clone(), &secret_ns).get_opt(&secret_name).await {
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        let msg = format!("KubernetesCluster {name}: spec.secretRef: Secret {secret_ns}/{secret_name} not found");
                        health.update(&name, |h| h.last_error = Some(msg.clone()));
                        tracing::error!("{msg}");
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(cluster = %name, error = %e, "reading the cluster's kubeconfig secret failed; keeping the current watch");
                        continue;
                    }
                };
                let fingerprint = format!("{:?}/{:?}", kc.spec, secret.metadata.resource_version);
                if watches.get(&name).is_some_and(|w| w.fingerprint == fingerprint) {
                    continue;
                }
                let Some(yaml) = kubeconfig_from_secret(&secret) else {
                    let msg = format!("KubernetesCluster {name}: Secret {secret_ns}/{secret_name} has no `kubeconfig` key");
                    health.update(&name, |h| h.last_error = Some(msg.clone()));
                    tracing::error!("{msg}");
                    continue;
                };
                let context = kc.spec.context.clone().filter(|c| !c.is_empty());
                let (client, server) = match client_from_kubeconfig_yaml(&yaml, context).await {
                    Ok(c) => c,
                    Err(e) => {
                        let msg = format!("KubernetesCluster {name}: the kubeconfig in Secret {secret_ns}/{secret_name} is unusable: {e}");
                        health.update(&name, |h| h.last_error = Some(msg.clone()));
                        tracing::error!("{msg}");
                        continue;
                    }
                };
                tracing::info!(cluster = %name, server = %server, "starting watches");
                health.update(&name, |h| {
                    h.server = server.clone();
                    h.synced = false;
                });
                if let Some(hook) = &options.on_cluster_client {
                    hook(&name, Some(client.clone()));
                }
                // A watch restarted for the same API server keeps the cluster's
                // builder: its objects serve until each kind has listed again,
                // and what did not change marks nothing. Another server's
                // cluster starts empty (its objects are not mixed with the old ones).
                let builder = watches.get(&name).filter(|w| w.server == server).map(|w| w.builder.clone());
                let watch = start_cluster(client, &name, fingerprint, server, &health, &dirty_tx, builder);
                // Replacing a watch aborts the old one (JoinSet aborts on drop);
                // its objects keep serving until the new one has listed.
                watches.insert(name.clone(), watch);
            }
            let gone: Vec<String> = watches.keys().filter(|k| !live.contains(k)).cloned().collect();
            for name in gone {
                tracing::info!(cluster = %name, "cluster deregistered: stopping its watches");
                watches.remove(&name);
                if let Some(hook) = &options.on_cluster_client {
                    hook(&name, None);
                }
                states.remove(&name);
                errors.remove(&name);
                health.remove(&name);
            }
        }
        for d in &batch {
            if let Dirty::Cluster(name) = d
                && let Some(w) = watches.get(name)
            {
                let (state, errs, counts) = {
                    let mut builder = w.builder.lock().expect("cluster builder lock");
                    let (state, errs) = builder.build();
                    (state, errs, builder.counts())
                };
                let changed = states.get(name).is_none_or(|served| !Arc::ptr_eq(served, &state));
                states.insert(name.clone(), state);
                errors.insert(name.clone(), errs);
                health.update(name, |h| {
                    h.objects = counts;
                    h.state_changes += u64::from(changed);
                    h.synced = CLUSTER_KINDS.iter().all(|k| h.listed.contains(*k)) || h.synced;
                });
            }
        }
        // Publish the first snapshot only when every registered cluster has
        // listed (or is known unreachable) and the mesh objects have listed,
        // so that sidecars never see a half-read mesh.
        let health_now = health.clusters();
        let clusters_settled = watches.keys().all(|name| health_now.iter().any(|h| &h.name == name && (h.synced || h.stale)));
        let mesh_synced =
            health.mesh_synced() || health_now.iter().any(|h| h.name == MESH_OBJECTS && MESH_KINDS.iter().all(|k| h.listed.contains(*k)));
        if mesh_synced && !health.mesh_synced() {
            health.update(MESH_OBJECTS, |h| h.synced = true);
            health.mesh_synced.store(true, std::sync::atomic::Ordering::Release);
        }
        let everything_listed = registrations_listed && clusters_settled && mesh_synced;
        if !published_once && !everything_listed {
            continue;
        }
        published_once = true;
        let mut inputs = MeshInputs { clusters: states.clone(), ..Default::default() };
        inputs.errors = errors.values().flatten().cloned().collect();
        inputs.traffic_policies = parsed_policies.derive(&traffic_policies.state(), |o| policy_object(o, &mgmt));
        inputs.virtual_meshes = parsed_meshes.derive(&virtual_meshes.state(), |o| policy_object(o, &mgmt));
        inputs.access_policies = parsed_access.derive(&access_policies.state(), |o| policy_object(o, &mgmt));
        inputs.sidecars = parsed_sidecars.derive(&sidecars.state(), |o| policy_object(o, &mgmt));
        let gathered = started.elapsed();
        apply(inputs);
        tracing::debug!(events = batch.len(), gathered = ?gathered, applied = ?(started.elapsed() - gathered), "mesh inputs rebuilt");
    }
    Ok(())
}

fn start_cluster(
    client: Client,
    name: &str,
    fingerprint: String,
    server: String,
    health: &SourceHealth,
    dirty: &mpsc::UnboundedSender<Dirty>,
    builder: Option<Arc<Mutex<ClusterBuilder>>>,
) -> ClusterWatch {
    let mut tasks = JoinSet::new();
    let builder = builder.unwrap_or_else(|| Arc::new(Mutex::new(ClusterBuilder::new(name))));
    let sink = || ClusterSink(builder.clone());
    health.update(name, |h| {
        h.lists = 0;
        h.listed.clear();
        h.failing.clear();
    });
    tasks.spawn(reflect(Api::<Service>::all(client.clone()), sink(), name.into(), "Service", health.clone(), dirty.clone(), without_managed_fields));
    tasks.spawn(reflect(
        Api::<EndpointSlice>::all(client.clone()),
        sink(),
        name.into(),
        "EndpointSlice",
        health.clone(),
        dirty.clone(),
        without_managed_fields,
    ));
    tasks.spawn(reflect(Api::<PodView>::all(client.clone()), sink(), name.into(), "Pod", health.clone(), dirty.clone(), PodView::trim));
    tasks.spawn(reflect(Api::<Namespace>::all(client), sink(), name.into(), "Namespace", health.clone(), dirty.clone(), without_managed_fields));
    ClusterWatch { fingerprint, server, builder, _tasks: tasks }
}
