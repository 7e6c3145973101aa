//! Kubernetes objects (the real shapes, parsed with k8s-openapi) into one
//! cluster's [`ClusterState`]: Services, EndpointSlices and the Pods behind
//! them (subset labels, service accounts), and Namespaces (the cluster's
//! network, Istio's `topology.istio.io/network` label).
//!
//! A Service with no EndpointSlice gets its endpoints from the Pods its
//! selector matches, the way the endpointslice controller would write them,
//! so hand-written local-mode folders can stay short.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ContainerPort, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{ClusterState, Endpoint, Locality, Service as MeshService, ServiceKey, ServicePort};

/// Istio's label for the network of a namespace, pod or gateway Service.
pub const NETWORK_LABEL: &str = "topology.istio.io/network";
/// Istio's pod label saying its sidecar accepts mTLS.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One cluster's objects as read from a source, shared (`Arc`) with the
/// source's cache so that gathering them copies no object.
#[derive(Debug, Clone, Default)]
pub struct ClusterObjects {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub pods: Vec<Arc<PodSummary>>,
    pub namespaces: Vec<Arc<Namespace>>,
}

/// What [`cluster_state`] reads from a Pod, kept instead of the Pod itself: a
/// parsed `Pod` is ≈4 KB (its spec and status inline, containers and all),
/// and a mesh keeps one per endpoint (30,000 in the scale fixture: ≈130 MB).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodSummary {
    pub namespace: String,
    pub name: Option<String>,
    pub labels: Arc<BTreeMap<String, String>>,
    pub service_account: Option<String>,
    pub pod_ip: Option<String>,
    /// The Ready condition, when the status has one.
    pub ready: Option<bool>,
    /// Being deleted (`deletionTimestamp` set): not serving new connections,
    /// whatever its Ready condition still says.
    pub terminating: bool,
    /// (name, containerPort) of every container port, for named target ports.
    pub container_ports: Vec<(Option<String>, i32)>,
}

impl From<&PodView> for PodSummary {
    fn from(pod: &PodView) -> Self {
        let status = pod.status.as_ref();
        PodSummary {
            namespace: ns_of(&pod.metadata),
            name: pod.metadata.name.clone(),
            labels: Arc::new(pod.metadata.labels.clone().unwrap_or_default()),
            service_account: pod.spec.as_ref().and_then(|s| s.service_account_name.clone()),
            pod_ip: status.and_then(|s| s.pod_ip.clone()).filter(|ip| !ip.is_empty()),
            ready: status.and_then(|s| s.conditions.as_ref()).and_then(|cs| cs.iter().find(|c| c.type_ == "Ready")).map(|c| c.status == "True"),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            container_ports: pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter().flatten())
                .flat_map(|c| c.ports.iter().flatten())
                .map(|p| (p.name.clone(), p.container_port))
                .collect(),
        }
    }
}

impl From<&Pod> for PodSummary {
    fn from(pod: &Pod) -> Self {
        PodSummary::from(&PodView::from(pod))
    }
}

impl From<Pod> for PodSummary {
    fn from(pod: Pod) -> Self {
        PodSummary::from(&pod)
    }
}

/// The fields of a Pod that [`PodSummary`] reads, as the Kubernetes watch
/// parses and stores them: name, namespace and labels, service account, IP,
/// the Ready condition and the container ports. Every other field of the
/// API server's JSON is skipped while parsing. The watch had stored whole
/// `Pod`s, about 13 KB each in a heap profile (13 MiB of a 1,000-Pod
/// cluster), for the few fields read here.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct PodView {
    pub metadata: ObjectMeta,
    pub spec: Option<PodViewSpec>,
    pub status: Option<PodViewStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodViewSpec {
    pub service_account_name: Option<String>,
    pub containers: Option<Vec<PodViewContainer>>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct PodViewContainer {
    pub ports: Option<Vec<ContainerPort>>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodViewStatus {
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    pub conditions: Option<Vec<PodViewCondition>>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct PodViewCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

impl PodView {
    /// The metadata a view keeps: the Pod's identity (name, namespace, uid,
    /// resource version), its labels and whether it is being deleted. The
    /// rest (managed fields, annotations, owners, finalizers) can be most of
    /// what the parse leaves, and nothing here reads it.
    fn kept_metadata(meta: &ObjectMeta) -> ObjectMeta {
        ObjectMeta {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            labels: meta.labels.clone(),
            deletion_timestamp: meta.deletion_timestamp.clone(),
            ..Default::default()
        }
    }

    /// The one condition a view keeps.
    fn is_kept_condition(type_: &str) -> bool {
        type_ == "Ready"
    }

    /// Drops what the parse kept and a view does not (the watch calls this
    /// before it stores a Pod); [`PodView::from`] a parsed Pod keeps the same.
    pub fn trim(&mut self) {
        self.metadata = Self::kept_metadata(&self.metadata);
        if let Some(conditions) = self.status.as_mut().and_then(|s| s.conditions.as_mut()) {
            conditions.retain(|c| Self::is_kept_condition(&c.type_));
        }
    }
}

impl From<&Pod> for PodView {
    /// The view of a parsed Pod, as trimmed as the watch keeps it.
    fn from(pod: &Pod) -> Self {
        PodView {
            metadata: PodView::kept_metadata(&pod.metadata),
            spec: pod.spec.as_ref().map(|s| PodViewSpec {
                service_account_name: s.service_account_name.clone(),
                containers: Some(s.containers.iter().map(|c| PodViewContainer { ports: c.ports.clone() }).collect()),
            }),
            status: pod.status.as_ref().map(|s| PodViewStatus {
                pod_ip: s.pod_ip.clone(),
                conditions: s.conditions.as_ref().map(|cs| {
                    cs.iter()
                        .filter(|c| PodView::is_kept_condition(&c.type_))
                        .map(|c| PodViewCondition { type_: c.type_.clone(), status: c.status.clone() })
                        .collect()
                }),
            }),
        }
    }
}

impl k8s_openapi::Resource for PodView {
    const API_VERSION: &'static str = <Pod as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Pod as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Pod as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Pod as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <Pod as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::Metadata for PodView {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

fn ns_of(meta: &ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".to_string())
}

/// A Service port and the `targetPort` it names (for endpoints derived from Pods).
type TargetPort = (ServicePort, Option<IntOrString>);

/// What one build of a cluster's state read and made per service, for the
/// next build of the same cluster: an endpoint change rewrites one service's
/// EndpointSlice, and only that service's endpoints are built again (the
/// others keep their lists, the same `Arc`s, which the snapshot diff then
/// skips without comparing). On the 1,000-service fixture this took the
/// reload of one endpoint change from 39–41 ms to 28 ms (docs/performance.md).
#[derive(Debug, Default)]
pub struct ClusterMemo {
    /// Each stored Service's conversion, kept while it is the same object.
    services: DerivedByObject<Service, Arc<ConvertedService>>,
    built: HashMap<(String, String), BuiltEndpoints>,
    /// The Pods of the last build, in order (None before the first)...
    pods: Option<Vec<Arc<PodSummary>>>,
    /// ...and their index, namespace → name → Pod, kept up to date with the
    /// Pods that changed instead of built again from every Pod.
    pod_index: HashMap<String, HashMap<String, Arc<PodSummary>>>,
    /// A Pod's (namespace, name) → the services whose endpoints name it: a
    /// changed Pod rebuilds those, and a service no changed Pod is named by
    /// and whose slices are the same objects is kept without looking any Pod up.
    pod_users: HashMap<(String, String), Vec<(String, String)>>,
}

impl ClusterMemo {
    /// Brings the Pod index up to `pods`: the (namespace, name) of every Pod
    /// that changed, or None when the index was built afresh (the first
    /// build, or Pods added or removed: every service is then checked).
    fn refresh_pods(&mut self, pods: &[Arc<PodSummary>]) -> Option<std::collections::HashSet<(String, String)>> {
        let key = |p: &PodSummary| p.name.clone().map(|n| (p.namespace.clone(), n));
        match &self.pods {
            Some(last) if last.len() == pods.len() => {
                let changed_at: Vec<usize> = (0..pods.len()).filter(|i| !Arc::ptr_eq(&last[*i], &pods[*i])).collect();
                let mut changed = std::collections::HashSet::new();
                for &i in &changed_at {
                    if let Some((ns, name)) = key(&last[i]) {
                        if let Some(names) = self.pod_index.get_mut(&ns) {
                            names.remove(&name);
                        }
                        changed.insert((ns, name));
                    }
                }
                for &i in &changed_at {
                    if let Some((ns, name)) = key(&pods[i]) {
                        self.pod_index.entry(ns.clone()).or_default().insert(name.clone(), pods[i].clone());
                        changed.insert((ns, name));
                    }
                }
                if !changed_at.is_empty() {
                    self.pods = Some(pods.to_vec());
                }
                Some(changed)
            }
            _ => {
                self.pod_index.clear();
                self.pod_users.clear();
                for p in pods {
                    if let Some((ns, name)) = key(p) {
                        self.pod_index.entry(ns).or_default().insert(name, p.clone());
                    }
                }
                self.pods = Some(pods.to_vec());
                None
            }
        }
    }
}

/// One service's endpoints from slices, and what they were built from.
#[derive(Debug)]
struct BuiltEndpoints {
    /// Its routable slices, in order (held: an address stays theirs).
    slices: Vec<Arc<EndpointSlice>>,
    /// The Pod each of their endpoints' `targetRef` found, in order.
    pods: Vec<Option<Arc<PodSummary>>>,
    network: String,
    endpoints: Arc<Vec<Endpoint>>,
}

/// Values derived from stored objects (a Service's conversion, a Pod's summary, a policy's parse),
/// kept by the stored object's address (the object is held with its value,
/// so the address cannot be reused meanwhile): an object that did not change
/// is not derived again on the next rebuild.
#[derive(Debug)]
pub struct DerivedByObject<K, V> {
    kept: HashMap<usize, (Arc<K>, V)>,
}

impl<K, V> Default for DerivedByObject<K, V> {
    fn default() -> Self {
        DerivedByObject { kept: HashMap::new() }
    }
}

impl<K, V: Clone> DerivedByObject<K, V> {
    /// Each of `stored`'s values, derived by `derive` for the objects not seen
    /// last time; the values of objects no longer stored are dropped.
    pub fn derive(&mut self, stored: &[Arc<K>], derive: impl Fn(&K) -> V) -> Vec<V> {
        let mut kept = HashMap::with_capacity(stored.len());
        let values = stored
            .iter()
            .map(|object| {
                let at = Arc::as_ptr(object) as usize;
                let entry = self.kept.remove(&at).unwrap_or_else(|| (object.clone(), derive(object)));
                let value = entry.1.clone();
                kept.insert(at, entry);
                value
            })
            .collect();
        self.kept = kept;
        values
    }
}

/// One Service as the cluster's state holds it, with what the build of its
/// endpoints needs (target ports, selector) and what was wrong with it.
#[derive(Debug)]
struct ConvertedService {
    /// None: not routable (no name).
    service: Option<Arc<MeshService>>,
    targets: Vec<TargetPort>,
    selector: Option<BTreeMap<String, String>>,
    errors: Vec<String>,
}

fn convert_service(cluster: &str, svc: &Service) -> ConvertedService {
    let mut errors = Vec::new();
    let Some(svc_name) = svc.metadata.name.clone() else {
        errors.push(format!("cluster {cluster}: a Service without metadata.name"));
        return ConvertedService { service: None, targets: Vec::new(), selector: None, errors };
    };
    let namespace = ns_of(&svc.metadata);
    let spec = svc.spec.as_ref();
    let mut ports = Vec::new();
    let mut targets = Vec::new();
    for (i, p) in spec.and_then(|s| s.ports.as_ref()).into_iter().flatten().enumerate() {
        let Ok(port) = u16::try_from(p.port) else {
            errors.push(format!("Service {namespace}/{svc_name} in cluster {cluster}: spec.ports[{i}].port {} is out of range", p.port));
            continue;
        };
        let port_name = p.name.clone().unwrap_or_default();
        let (protocol, protocol_reason) = super::protocol::port_protocol(&port_name, p.app_protocol.as_deref(), p.protocol.as_deref());
        let sp = ServicePort { name: port_name, port, protocol, protocol_reason };
        targets.push((sp.clone(), p.target_port.clone()));
        ports.push(sp);
    }
    if ports.is_empty() {
        errors.push(format!("Service {namespace}/{svc_name} in cluster {cluster}: spec.ports is empty; it is not routable"));
    }
    let cluster_ip = spec.and_then(|s| s.cluster_ip.as_deref());
    let service = MeshService {
        key: ServiceKey::new(cluster, &namespace, &svc_name),
        ports,
        labels: svc.metadata.labels.clone().unwrap_or_default(),
        headless: cluster_ip == Some("None"),
        excluded_ports: Vec::new(),
        cluster_ip: cluster_ip.filter(|ip| !ip.is_empty() && *ip != "None").map(str::to_string),
        external_addresses: spec
            .and_then(|s| s.external_ips.clone())
            .unwrap_or_default()
            .into_iter()
            .chain(svc.status.iter().filter_map(|s| s.load_balancer.as_ref()).flat_map(|lb| lb.ingress.iter().flatten()).filter_map(|i| i.ip.clone()))
            .collect(),
    };
    ConvertedService { service: Some(Arc::new(service)), targets, selector: spec.and_then(|s| s.selector.clone()).filter(|s| !s.is_empty()), errors }
}

/// Builds a cluster's services and endpoints; problems (a slice for an unknown
/// service, a Service without ports) are returned as messages naming the object.
pub fn cluster_state(name: &str, objects: &ClusterObjects) -> (ClusterState, Vec<String>) {
    cluster_state_reusing(name, objects, &mut ClusterMemo::default())
}

/// [`cluster_state`], reusing what `memo` kept of the last build of this
/// cluster for every service whose inputs are the same objects; `memo` then
/// holds this build.
pub fn cluster_state_reusing(name: &str, objects: &ClusterObjects, memo: &mut ClusterMemo) -> (ClusterState, Vec<String>) {
    let mut errors = Vec::new();
    let mut state = ClusterState { name: name.to_string(), ..Default::default() };

    // The cluster's network: the istio-system namespace's label (Istio's rule), else any namespace's.
    let ns_network = |ns: &Arc<Namespace>| ns.metadata.labels.as_ref().and_then(|l| l.get(NETWORK_LABEL)).cloned();
    state.network = objects
        .namespaces
        .iter()
        .find(|ns| ns.metadata.name.as_deref() == Some("istio-system"))
        .and_then(ns_network)
        .or_else(|| objects.namespaces.iter().find_map(ns_network))
        .unwrap_or_default();
    state.namespaces = objects
        .namespaces
        .iter()
        .filter(|ns| ns.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating"))
        .filter_map(|ns| ns.metadata.name.clone())
        .collect();

    // Each Service converted, or its conversion from the last build when it
    // is the same stored object (most are: an endpoint change rewrites a slice).
    // Each routable Service's conversion, by (namespace, name): its target
    // ports and selector, for endpoints derived from Pods.
    let mut by_key: HashMap<(String, String), Arc<ConvertedService>> = HashMap::new();
    for converted in memo.services.derive(&objects.services, |svc| Arc::new(convert_service(name, svc))) {
        errors.extend(converted.errors.iter().cloned());
        if let Some(service) = &converted.service {
            let key = (service.key.namespace.clone(), service.key.name.clone());
            state.services.insert(key.clone(), service.clone());
            by_key.insert(key, converted);
        }
    }

    exclude_colliding_ports(name, &mut state, &mut errors);

    let changed_pods = memo.refresh_pods(&objects.pods);
    // The services a changed Pod's endpoints belong to (None: check every one).
    let dirty: Option<std::collections::HashSet<(String, String)>> =
        changed_pods.map(|changed| changed.iter().filter_map(|k| memo.pod_users.get(k)).flatten().cloned().collect());
    let no_labels = Arc::new(BTreeMap::new());
    let pod_facts = |pod: Option<&PodSummary>| -> (Arc<BTreeMap<String, String>>, String, Option<String>) {
        match pod {
            Some(p) => (p.labels.clone(), p.service_account.clone().unwrap_or_else(|| "default".into()), p.name.clone()),
            None => (no_labels.clone(), "default".into(), None),
        }
    };

    // Each service's routable slices, in order.
    let mut has_slices: std::collections::HashSet<(String, String)> = Default::default();
    let mut slices_of: BTreeMap<(String, String), Vec<&Arc<EndpointSlice>>> = BTreeMap::new();
    for (si, slice) in objects.endpoint_slices.iter().enumerate() {
        // (The slice's name is only made for a message: a slice per service,
        // its strings copied each rebuild, had been a part of every reload.)
        let slice_name = || slice.metadata.name.clone().unwrap_or_else(|| format!("#{si}"));
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        let Some(svc_name) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            errors
                .push(format!("EndpointSlice {namespace}/{} in cluster {name}: metadata.labels has no {SERVICE_NAME_LABEL}; ignored", slice_name()));
            continue;
        };
        let key = (namespace.to_string(), svc_name.clone());
        if !state.services.contains_key(&key) {
            errors.push(format!(
                "EndpointSlice {namespace}/{} in cluster {name}: Service {namespace}/{svc_name} does not exist; ignored",
                slice_name()
            ));
            continue;
        }
        has_slices.insert(key.clone());
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue; // FQDN slices are not routable by address
        }
        slices_of.entry(key).or_default().push(slice);
    }

    // Endpoints from slices, per service: a service whose slices, the pods
    // they name and the cluster's network are what the last build read keeps
    // the list that build made.
    let mut built = HashMap::with_capacity(slices_of.len());
    for (key, slices) in slices_of {
        let namespace = key.0.as_str();
        // Its slices are the same objects and no Pod they name changed: kept, nothing looked up.
        if dirty.as_ref().is_some_and(|dirty| !dirty.contains(&key))
            && let Some(last) = memo.built.get(&key)
            && last.network == state.network
            && last.slices.len() == slices.len()
            && last.slices.iter().zip(&slices).all(|(a, b)| Arc::ptr_eq(a, b))
        {
            let last = memo.built.remove(&key).expect("found above");
            if !last.endpoints.is_empty() {
                state.endpoints.insert(key.clone(), last.endpoints.clone());
            }
            built.insert(key, last);
            continue;
        }
        let refs: Vec<Option<(&str, &str)>> = slices
            .iter()
            .flat_map(|slice| slice.endpoints.iter())
            .filter(|ep| !ep.addresses.is_empty())
            .map(|ep| {
                let r = ep.target_ref.as_ref().filter(|r| r.kind.as_deref().unwrap_or("Pod") == "Pod")?;
                Some((r.namespace.as_deref().unwrap_or(namespace), r.name.as_deref()?))
            })
            .collect();
        for (ns, name) in refs.iter().flatten() {
            let users = memo.pod_users.entry((ns.to_string(), name.to_string())).or_default();
            if !users.contains(&key) {
                users.push(key.clone());
            }
        }
        let slice_pods: Vec<Option<&Arc<PodSummary>>> = refs.iter().map(|r| r.and_then(|(ns, name)| memo.pod_index.get(ns)?.get(name))).collect();
        if let Some(last) = memo.built.remove(&key)
            && last.network == state.network
            && last.slices.len() == slices.len()
            && last.slices.iter().zip(&slices).all(|(a, b)| Arc::ptr_eq(a, b))
            && last.pods.len() == slice_pods.len()
            && last.pods.iter().zip(&slice_pods).all(|(a, b)| match (a, b) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            })
        {
            if !last.endpoints.is_empty() {
                state.endpoints.insert(key.clone(), last.endpoints.clone());
            }
            built.insert(key, last);
            continue;
        }
        let mut eps = Vec::with_capacity(slice_pods.len());
        let mut found = slice_pods.iter();
        for slice in &slices {
            let ports: Arc<BTreeMap<String, u16>> = Arc::new(
                slice.ports.iter().flatten().filter_map(|p| Some((p.name.clone().unwrap_or_default(), u16::try_from(p.port?).ok()?))).collect(),
            );
            for ep in &slice.endpoints {
                let Some(address) = ep.addresses.first().cloned() else { continue };
                let pod = found.next().expect("one lookup per endpoint with an address").map(|p| &**p);
                let (labels, service_account, pod_name) = pod_facts(pod);
                let network = labels.get(NETWORK_LABEL).cloned().unwrap_or_else(|| state.network.clone());
                let mesh_tls = labels.get(TLS_MODE_LABEL).is_some_and(|m| m == "istio");
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                eps.push(Endpoint {
                    address,
                    ports: ports.clone(),
                    labels,
                    ready,
                    locality: Locality { region: String::new(), zone: ep.zone.clone().unwrap_or_default() },
                    network,
                    mesh_tls,
                    service_account,
                    pod: pod_name,
                });
            }
        }
        sort_endpoints(&mut eps);
        let endpoints = Arc::new(eps);
        if !endpoints.is_empty() {
            state.endpoints.insert(key.clone(), endpoints.clone());
        }
        built.insert(
            key,
            BuiltEndpoints {
                slices: slices.into_iter().cloned().collect(),
                pods: slice_pods.into_iter().map(|p| p.cloned()).collect(),
                network: state.network.clone(),
                endpoints,
            },
        );
    }
    memo.built = built;

    // Services without slices: endpoints from the Pods their selector matches.
    for (key, converted) in &by_key {
        let Some(selector) = &converted.selector else { continue };
        if has_slices.contains(key) {
            continue;
        }
        let targets = &converted.targets;
        let mut eps = Vec::new();
        for pod in objects.pods.iter().filter(|p| p.namespace == key.0) {
            if !selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v)) {
                continue;
            }
            let Some(address) = pod.pod_ip.clone() else { continue };
            // As the endpointslice controller writes it: a terminating Pod is
            // not ready, even while its Ready condition still says so.
            let ready = pod.ready.unwrap_or(true) && !pod.terminating;
            let container_ports = &pod.container_ports;
            let mut ports = BTreeMap::new();
            for (sp, target) in targets {
                let port = match target {
                    None => Some(sp.port),
                    Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                    Some(IntOrString::String(n)) => {
                        container_ports.iter().find(|(cn, _)| cn.as_deref() == Some(n.as_str())).and_then(|(_, p)| u16::try_from(*p).ok())
                    }
                };
                if let Some(port) = port {
                    ports.insert(sp.name.clone(), port);
                }
            }
            let (labels, service_account, pod_name) = pod_facts(Some(&**pod));
            let network = labels.get(NETWORK_LABEL).cloned().unwrap_or_else(|| state.network.clone());
            let mesh_tls = labels.get(TLS_MODE_LABEL).is_some_and(|m| m == "istio");
            eps.push(Endpoint {
                address,
                ports: Arc::new(ports),
                labels,
                ready,
                locality: Locality::default(),
                network,
                mesh_tls,
                service_account,
                pod: pod_name,
            });
        }
        if !eps.is_empty() {
            sort_endpoints(&mut eps);
            state.endpoints.insert(key.clone(), Arc::new(eps));
        }
    }
    (state, errors)
}

fn sort_endpoints(eps: &mut [Endpoint]) {
    eps.sort_by(|a, b| (&a.address, &a.pod).cmp(&(&b.address, &b.pod)));
}

/// The ports a sidecar keeps for itself (Istio's 15000–15090: admin, 15001
/// outbound, 15006 inbound, 15020/15021 health, 15090 stats).
pub const SIDECAR_PORTS: std::ops::RangeInclusive<u16> = 15000..=15090;

/// Leaves out of sidecars the Service ports they cannot serve: a port in the
/// sidecar's own range, and a ClusterIP and port two Services claim (which one
/// a connection meant cannot be told). Each is named in `errors` and in the
/// Service's `excluded_ports`; every other port keeps working. East-west
/// gateway Services (15021, 15443, …) are not called by sidecars and are kept.
fn exclude_colliding_ports(cluster: &str, state: &mut ClusterState, errors: &mut Vec<String>) {
    // (Read with borrowed keys, and only a Service with ports left out is
    // copied: the others stay shared with the conversion the next build reuses.)
    let mut claims: HashMap<(&str, u16), Vec<&(String, String)>> = HashMap::new();
    for (key, svc) in &state.services {
        if let Some(ip) = &svc.cluster_ip {
            for p in &svc.ports {
                claims.entry((ip.as_str(), p.port)).or_default().push(key);
            }
        }
    }
    // Each Service that leaves ports out, and each such port with the note why.
    type PortNotes = Vec<(u16, String)>;
    let mut excluded: Vec<((String, String), PortNotes)> = Vec::new();
    for (key, svc) in &state.services {
        if svc.labels.contains_key(NETWORK_LABEL) {
            continue;
        }
        let notes: PortNotes = svc
            .ports
            .iter()
            .filter_map(|p| {
                let why = if SIDECAR_PORTS.contains(&p.port) {
                    Some(format!("port {} collides with the sidecar's own ports (15000-15090)", p.port))
                } else {
                    svc.cluster_ip.as_deref().and_then(|ip| {
                        let owners = &claims[&(ip, p.port)];
                        (owners.len() > 1).then(|| {
                            let others: Vec<String> = owners.iter().filter(|o| **o != key).map(|(n, s)| format!("{n}/{s}")).collect();
                            format!("port {} on ClusterIP {ip} is also claimed by Service {}", p.port, others.join(", "))
                        })
                    })
                };
                why.map(|why| (p.port, format!("{why}; left out of sidecars")))
            })
            .collect();
        if !notes.is_empty() {
            excluded.push((key.clone(), notes));
        }
    }
    for (key, notes) in excluded {
        let (ns, name) = &key;
        for (_, n) in &notes {
            errors.push(format!("Service {ns}/{name} in cluster {cluster}: {n}"));
        }
        if let Some(shared) = state.services.get_mut(&key) {
            let svc = Arc::make_mut(shared);
            svc.ports.retain(|p| !notes.iter().any(|(port, _)| *port == p.port));
            svc.excluded_ports = notes.into_iter().map(|(_, n)| n).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn service(name: &str) -> Arc<Service> {
        Arc::new(parse(&format!(
            "metadata: {{name: {name}, namespace: default}}\nspec: {{selector: {{app: {name}}}, ports: [{{name: http, port: 9080}}]}}"
        )))
    }

    fn slice(service: &str, address: &str, pod: &str) -> Arc<EndpointSlice> {
        Arc::new(parse(&format!(
            "metadata: {{name: {service}-1, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 9080}}]\nendpoints:\n- addresses: [{address}]\n  targetRef: {{kind: Pod, name: {pod}}}"
        )))
    }

    fn pod(name: &str, app: &str, account: &str) -> Arc<PodSummary> {
        Arc::new(PodSummary::from(parse::<Pod>(&format!(
            "metadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}\nspec: {{serviceAccountName: {account}, containers: [{{name: c}}]}}"
        ))))
    }

    #[test]
    fn a_pod_view_has_the_same_summary_as_the_pod_and_nothing_else() {
        let yaml = r#"
metadata:
  name: reviews-v1-abc
  namespace: bookinfo
  labels: {app: reviews, version: v1}
  annotations: {sidecar.istio.io/status: '{"containers":["istio-proxy"]}'}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1, uid: u1}]
  managedFields: [{manager: kubectl, operation: Apply}]
spec:
  serviceAccountName: bookinfo-reviews
  nodeName: node-1
  volumes: [{name: data, emptyDir: {}}]
  initContainers: [{name: istio-init, image: proxyv2}]
  containers:
  - name: reviews
    image: reviews:v1
    env: [{name: LOG_DIR, value: /tmp/logs}]
    ports: [{name: http, containerPort: 9080}, {containerPort: 9090}]
  - name: istio-proxy
    image: proxyv2
    args: [proxy, sidecar]
status:
  phase: Running
  podIP: 10.0.0.7
  hostIP: 192.168.1.1
  conditions:
  - {type: Initialized, status: "True"}
  - {type: Ready, status: "False", reason: ContainersNotReady, message: not ready}
  containerStatuses: [{name: reviews, ready: false, restartCount: 3, image: reviews:v1, imageID: x}]
"#;
        let full: Pod = parse(yaml);
        // As the watch parses it from the API server's JSON, and trims it.
        let mut view: PodView = serde_json::from_value(serde_json::to_value(&full).unwrap()).unwrap();
        view.trim();
        let summary = PodSummary::from(&view);
        assert_eq!(summary, PodSummary::from(&full));
        assert_eq!(PodView::from(&full).spec, view.spec);
        // A config-dir Pod's view is what the watch keeps.
        assert_eq!(PodView::from(&full), view);
        assert_eq!(summary.ready, Some(false));
        assert_eq!(summary.container_ports, vec![(Some("http".to_string()), 9080), (None, 9090)]);
        assert_eq!(summary.service_account.as_deref(), Some("bookinfo-reviews"));
        let kept = format!("{view:?}");
        for gone in [
            "sidecar.istio.io/status",
            "ReplicaSet",
            "kubectl",
            "node-1",
            "emptyDir",
            "istio-init",
            "LOG_DIR",
            "proxyv2",
            "192.168.1.1",
            "Initialized",
            "ContainersNotReady",
            "restartCount",
        ] {
            assert!(!kept.contains(gone), "{gone} kept in {kept}");
        }
    }

    #[test]
    fn a_rebuild_reuses_the_endpoints_of_every_service_whose_slices_and_pods_are_the_same_objects() {
        let key = |n: &str| ("default".to_string(), n.to_string());
        let mut objects = ClusterObjects {
            services: vec![service("a"), service("b"), service("c")],
            endpoint_slices: vec![slice("a", "10.0.0.1", "a-1"), slice("b", "10.0.0.2", "b-1"), slice("c", "10.0.0.3", "c-1")],
            pods: vec![pod("a-1", "a", "sa-a"), pod("b-1", "b", "sa-b"), pod("c-1", "c", "sa-c")],
            namespaces: Vec::new(),
        };
        let mut memo = ClusterMemo::default();
        let (first, _) = cluster_state_reusing("c1", &objects, &mut memo);
        // a's slice is rewritten (a new address); c's pod changes its service account.
        objects.endpoint_slices[0] = slice("a", "10.0.0.9", "a-1");
        objects.pods[2] = pod("c-1", "c", "sa-c2");
        let (second, errors) = cluster_state_reusing("c1", &objects, &mut memo);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(second.endpoints[&key("a")][0].address, "10.0.0.9");
        assert_eq!(second.endpoints[&key("c")][0].service_account, "sa-c2");
        assert!(!Arc::ptr_eq(&first.endpoints[&key("a")], &second.endpoints[&key("a")]));
        assert!(!Arc::ptr_eq(&first.endpoints[&key("c")], &second.endpoints[&key("c")]));
        assert!(Arc::ptr_eq(&first.endpoints[&key("b")], &second.endpoints[&key("b")]), "b's inputs are the same objects: its list is kept");
        // Reused or not, the state is what a build from scratch makes.
        assert_eq!(second, cluster_state("c1", &objects).0);
        // The network is an input of every endpoint: a new one rebuilds all.
        objects.namespaces = vec![parse("metadata: {name: istio-system, labels: {topology.istio.io/network: net2}}")];
        let (third, _) = cluster_state_reusing("c1", &objects, &mut memo);
        assert_eq!(third.endpoints[&key("b")][0].network, "net2");
        // A slice removed: its service has no endpoints, and the memo forgets it.
        objects.endpoint_slices.remove(1);
        let (fourth, _) = cluster_state_reusing("c1", &objects, &mut memo);
        assert!(!fourth.endpoints.contains_key(&key("b")));
        assert_eq!(memo.built.len(), 2);
    }

    #[test]
    fn a_rebuild_keeps_the_conversion_of_every_service_that_is_the_same_object() {
        let key = |n: &str| ("default".to_string(), n.to_string());
        let with_ip = |name: &str, ip: &str| -> Arc<Service> {
            Arc::new(parse(&format!(
                "metadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 9080}}]}}"
            )))
        };
        let mut objects =
            ClusterObjects { services: vec![with_ip("a", "10.96.0.1"), with_ip("b", "10.96.0.2"), with_ip("c", "10.96.0.3")], ..Default::default() };
        let mut memo = ClusterMemo::default();
        let (first, _) = cluster_state_reusing("c1", &objects, &mut memo);
        // b is rewritten: a new object, converted again; a and c are kept.
        objects.services[1] = with_ip("b", "10.96.0.3");
        let (second, errors) = cluster_state_reusing("c1", &objects, &mut memo);
        assert!(Arc::ptr_eq(&first.services[&key("a")], &second.services[&key("a")]), "the same object: its conversion is kept");
        assert!(!Arc::ptr_eq(&first.services[&key("b")], &second.services[&key("b")]));
        // b now claims c's ClusterIP and port: both leave the port out, each a copy of its own...
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(second.services[&key("c")].ports.is_empty() && !second.services[&key("c")].excluded_ports.is_empty());
        assert_eq!(second, cluster_state("c1", &objects).0, "reused or not, what a build from scratch makes");
        // ...and the kept conversion is untouched: once b moves away, c serves its port again.
        objects.services[1] = with_ip("b", "10.96.0.2");
        let (third, errors) = cluster_state_reusing("c1", &objects, &mut memo);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(third.services[&key("c")].ports.len(), 1);
        assert!(third.services[&key("c")].excluded_ports.is_empty());
        assert!(Arc::ptr_eq(&first.services[&key("c")], &third.services[&key("c")]));
        // A Service removed leaves the memo.
        objects.services.remove(0);
        let (fourth, _) = cluster_state_reusing("c1", &objects, &mut memo);
        assert!(!fourth.services.contains_key(&key("a")));
        assert_eq!(memo.services.kept.len(), 2);
    }

    #[test]
    fn slices_and_pods_become_endpoints_with_pod_labels() {
        let objects = ClusterObjects {
            services: vec![parse(
                "metadata: {name: reviews, namespace: default}\nspec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}",
            )],
            endpoint_slices: vec![parse(
                r#"
metadata: {name: reviews-abc, namespace: default, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 9080}]
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: reviews-v1-1, namespace: default}
- addresses: [10.0.0.2]
  conditions: {ready: false}
  zone: z1
  targetRef: {kind: Pod, name: reviews-v2-1}
"#,
            )],
            pods: vec![
                parse::<Pod>("metadata: {name: reviews-v1-1, namespace: default, labels: {app: reviews, version: v1}}\nspec: {serviceAccountName: bookinfo-reviews, containers: [{name: c}]}"),
                parse::<Pod>("metadata: {name: reviews-v2-1, namespace: default, labels: {app: reviews, version: v2}}\nspec: {containers: [{name: c}]}"),
            ]
            .into_iter()
            .map(|p| Arc::new(PodSummary::from(p)))
            .collect(),
            namespaces: vec![parse("metadata: {name: istio-system, labels: {topology.istio.io/network: net1}}")],
        };
        let (state, errors) = cluster_state("c1", &objects);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(state.network, "net1");
        let eps = &state.endpoints[&("default".to_string(), "reviews".to_string())];
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].labels["version"], "v1");
        assert_eq!(eps[0].service_account, "bookinfo-reviews");
        assert_eq!(eps[0].ports["http"], 9080);
        assert!(eps[0].ready && !eps[1].ready);
        assert_eq!(eps[1].locality.zone, "z1");
        assert_eq!(eps[1].network, "net1");
    }

    #[test]
    fn pods_stand_in_for_missing_slices() {
        let objects = ClusterObjects {
            services: vec![parse(
                "metadata: {name: ratings}\nspec: {selector: {app: ratings}, ports: [{name: http, port: 9080, targetPort: web}]}",
            )],
            pods: vec![
                parse::<Pod>("metadata: {name: ratings-1, labels: {app: ratings, version: v1}}\nspec: {containers: [{name: c, ports: [{name: web, containerPort: 8080}]}]}\nstatus: {podIP: 127.0.0.5}"),
                parse::<Pod>("metadata: {name: other, labels: {app: other}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 127.0.0.6}"),
                parse::<Pod>("metadata: {name: ratings-2, labels: {app: ratings}, deletionTimestamp: '2026-12-05T16:00:00Z'}\nspec: {containers: [{name: c, ports: [{name: web, containerPort: 8080}]}]}\nstatus: {podIP: 127.0.0.7, conditions: [{type: Ready, status: 'True'}]}"),
            ]
            .into_iter()
            .map(|p| Arc::new(PodSummary::from(p)))
            .collect(),
            ..Default::default()
        };
        let (state, errors) = cluster_state("c1", &objects);
        assert!(errors.is_empty(), "{errors:?}");
        let eps = &state.endpoints[&("default".to_string(), "ratings".to_string())];
        assert_eq!(eps.len(), 2);
        assert_eq!((eps[0].address.as_str(), eps[0].ports["http"], eps[0].ready), ("127.0.0.5", 8080, true));
        // Being deleted: listed, not ready, though its Ready condition is still True.
        assert_eq!((eps[1].address.as_str(), eps[1].ready), ("127.0.0.7", false));
    }

    #[test]
    fn orphans_are_reported_by_name() {
        let objects = ClusterObjects {
            endpoint_slices: vec![parse(
                "metadata: {name: s1, namespace: default, labels: {kubernetes.io/service-name: ghost}}\naddressType: IPv4\nendpoints: []",
            )],
            ..Default::default()
        };
        let (_, errors) = cluster_state("c1", &objects);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("EndpointSlice default/s1") && errors[0].contains("default/ghost"), "{errors:?}");
    }

    #[test]
    fn a_value_is_derived_once_per_stored_object() {
        let calls = std::cell::Cell::new(0);
        let mut derived = DerivedByObject::<String, usize>::default();
        let length = |s: &String| {
            calls.set(calls.get() + 1);
            s.len()
        };
        let (a, b) = (Arc::new("a".to_string()), Arc::new("bb".to_string()));
        assert_eq!(derived.derive(&[a.clone(), b.clone()], length), [1, 2]);
        assert_eq!(calls.get(), 2);
        // The same objects: nothing derived again. A new object (an equal value included) is.
        let c = Arc::new("a".to_string());
        assert_eq!(derived.derive(&[b.clone(), a.clone(), c.clone()], length), [2, 1, 1]);
        assert_eq!(calls.get(), 3);
        // An object no longer stored is forgotten.
        assert_eq!(derived.derive(&[c], length), [1]);
        assert_eq!(derived.kept.len(), 1);
        assert_eq!(calls.get(), 3);
    }
}
