//! One cluster's [`ClusterState`], kept up to date object by object.
//!
//! Sources tell a [`ClusterBuilder`] each object that was added, changed or
//! removed (a watch event, a rewritten file); the builder marks the services
//! that object feeds, and [`ClusterBuilder::build`] converts again only
//! those: a changed EndpointSlice rebuilds its service's endpoints, a changed
//! Pod the endpoints of the services that name it (or select it), a changed
//! Service its own entry and, through a shared ClusterIP and port, the
//! entries of the Services it collides with. Nothing else is looked at: the
//! cluster is not joined again. A build that changed nothing returns the same
//! `Arc`, and an unchanged service keeps its `Arc`s, so the snapshot diff
//! skips both by pointer; a new state records what its build changed since
//! the state before it (`ClusterState::built_after`), which the diff reads
//! instead of comparing every service.
//!
//! An object equal to the kept one keeps the kept `Arc` (returned, so that
//! a source can hold that one too) and marks nothing. A complete list (a
//! watch's re-list) goes through [`ClusterBuilder::replace`]: what is kept
//! and not listed is removed, the rest applied.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::k8s::{
    ClusterObjects, ConvertedService, NETWORK_LABEL, PodSummary, SERVICE_NAME_LABEL, SIDECAR_PORTS, TLS_MODE_LABEL, convert_service, ns_of,
};
use super::{BuiltAfter, ClusterChanges, ClusterState, Endpoint, Locality, Service as MeshService};

/// Where an object is in its cluster: (namespace, name). A Namespace's is
/// ("", name).
pub type ObjectKey = (String, String);

/// The kinds a cluster's state is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Namespace,
}

/// Which object: its kind and key.
pub type ObjectId = (Kind, ObjectKey);

/// An object of one of those kinds, as sources hand it over (a Pod as its summary).
#[derive(Debug, Clone)]
pub enum ClusterObject {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Pod(Arc<PodSummary>),
    Namespace(Arc<Namespace>),
}

impl ClusterObject {
    /// Its kind and key; None without a name.
    pub fn id(&self) -> Option<ObjectId> {
        match self {
            ClusterObject::Service(o) => Some((Kind::Service, object_key(&o.metadata)?)),
            ClusterObject::EndpointSlice(o) => Some((Kind::EndpointSlice, object_key(&o.metadata)?)),
            ClusterObject::Pod(o) => Some((Kind::Pod, pod_key(o)?)),
            ClusterObject::Namespace(o) => Some((Kind::Namespace, (String::new(), o.metadata.name.clone()?))),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            ClusterObject::Service(_) => Kind::Service,
            ClusterObject::EndpointSlice(_) => Kind::EndpointSlice,
            ClusterObject::Pod(_) => Kind::Pod,
            ClusterObject::Namespace(_) => Kind::Namespace,
        }
    }
}

impl ClusterObjects {
    /// Every object, kind by kind, in order.
    pub fn objects(&self) -> impl Iterator<Item = ClusterObject> + '_ {
        let services = self.services.iter().map(|o| ClusterObject::Service(o.clone()));
        let slices = self.endpoint_slices.iter().map(|o| ClusterObject::EndpointSlice(o.clone()));
        let pods = self.pods.iter().map(|o| ClusterObject::Pod(o.clone()));
        services.chain(slices).chain(pods).chain(self.namespaces.iter().map(|o| ClusterObject::Namespace(o.clone())))
    }

    pub fn push(&mut self, object: ClusterObject) {
        match object {
            ClusterObject::Service(o) => self.services.push(o),
            ClusterObject::EndpointSlice(o) => self.endpoint_slices.push(o),
            ClusterObject::Pod(o) => self.pods.push(o),
            ClusterObject::Namespace(o) => self.namespaces.push(o),
        }
    }
}

/// Both the same `Arc`, or equal values.
fn unchanged<T: PartialEq>(kept: &Arc<T>, new: &Arc<T>) -> bool {
    Arc::ptr_eq(kept, new) || **kept == **new
}

/// A namespaced object's key; None without a name.
fn object_key(meta: &ObjectMeta) -> Option<ObjectKey> {
    Some((ns_of(meta), meta.name.clone()?))
}

/// A Pod summary's key; None without a name.
fn pod_key(pod: &PodSummary) -> Option<ObjectKey> {
    Some((pod.namespace.clone(), pod.name.clone()?))
}

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name`
/// label, in the slice's namespace).
fn slice_service(key: &ObjectKey, slice: &EndpointSlice) -> Option<ObjectKey> {
    slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL).map(|s| (key.0.clone(), s.clone()))
}

/// A Service's (ClusterIP, port) claims.
fn claims_of(converted: &ConvertedService) -> Vec<(String, u16)> {
    let Some(service) = &converted.service else { return Vec::new() };
    let Some(ip) = &service.cluster_ip else { return Vec::new() };
    service.ports.iter().map(|p| (ip.clone(), p.port)).collect()
}

fn selects(selector: &BTreeMap<String, String>, pod: &PodSummary) -> bool {
    selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
}

/// Both absent, or the same `Arc`.
fn same<T>(a: Option<&Arc<T>>, b: Option<&Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fn sort_endpoints(eps: &mut [Endpoint]) {
    eps.sort_by(|a, b| (&a.address, &a.pod).cmp(&(&b.address, &b.pod)));
}

/// One cluster's objects, by key, and its state built from them; see the module doc.
#[derive(Debug)]
pub struct ClusterBuilder {
    name: String,
    /// Each Service with its conversion (made once per stored object).
    services: HashMap<ObjectKey, (Arc<Service>, ConvertedService)>,
    slices: HashMap<ObjectKey, Arc<EndpointSlice>>,
    /// Pods by namespace, then name (a selector reads one namespace's).
    pods: HashMap<String, HashMap<String, Arc<PodSummary>>>,
    pod_count: usize,
    namespaces: BTreeMap<String, Arc<Namespace>>,
    /// A Service → the names of the EndpointSlices that say they are its
    /// (routable or not: any slice means the Pods do not stand in).
    slices_of: HashMap<ObjectKey, BTreeSet<String>>,
    /// A Pod → the services whose endpoints named it when they were last
    /// built. Kept loosely: a service that no longer names the Pod is only
    /// built once more for nothing, and the Pod's removal drops the entry.
    pod_users: HashMap<ObjectKey, Vec<ObjectKey>>,
    /// The same for Pods that do not exist (yet): a service → the missing
    /// Pods its endpoints name, and each such Pod → those services, kept
    /// exact, so names that never come (or went) are not kept.
    missing_named: HashMap<ObjectKey, Vec<ObjectKey>>,
    missing_users: HashMap<ObjectKey, Vec<ObjectKey>>,
    /// A namespace → its Services with a selector, and the selector (their
    /// endpoints come from the Pods it selects when they have no EndpointSlice).
    selecting: HashMap<String, BTreeMap<String, BTreeMap<String, String>>>,
    /// (ClusterIP, port) → the Services claiming it; two claims collide.
    claims: HashMap<(String, u16), BTreeSet<ObjectKey>>,
    /// The services to build again.
    dirty: HashSet<ObjectKey>,
    /// The EndpointSlices whose message (orphan, no label) to check again.
    dirty_slices: HashSet<ObjectKey>,
    namespaces_changed: bool,
    /// Per Service: its conversion's messages and the ports left out.
    service_errors: BTreeMap<ObjectKey, Vec<String>>,
    slice_errors: BTreeMap<ObjectKey, String>,
    /// Objects without a name, by kind (ignored).
    unnamed: BTreeMap<Kind, usize>,
    state: Arc<ClusterState>,
}

impl ClusterBuilder {
    pub fn new(name: &str) -> Self {
        ClusterBuilder {
            name: name.to_string(),
            services: HashMap::new(),
            slices: HashMap::new(),
            pods: HashMap::new(),
            pod_count: 0,
            namespaces: BTreeMap::new(),
            slices_of: HashMap::new(),
            pod_users: HashMap::new(),
            missing_named: HashMap::new(),
            missing_users: HashMap::new(),
            selecting: HashMap::new(),
            claims: HashMap::new(),
            dirty: HashSet::new(),
            dirty_slices: HashSet::new(),
            namespaces_changed: true,
            service_errors: BTreeMap::new(),
            slice_errors: BTreeMap::new(),
            unnamed: BTreeMap::new(),
            state: Arc::new(ClusterState { name: name.to_string(), ..Default::default() }),
        }
    }

    /// How many objects of each kind are kept.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        BTreeMap::from([
            ("Service".to_string(), self.services.len()),
            ("EndpointSlice".to_string(), self.slices.len()),
            ("Pod".to_string(), self.pod_count),
            ("Namespace".to_string(), self.namespaces.len()),
        ])
    }

    /// A Service added or changed. Returns the `Arc` kept for it: the one
    /// kept already when it is equal (a source keeps that one too, so that
    /// an object rewritten unchanged is not held twice).
    fn apply_service(&mut self, object: Arc<Service>) -> Arc<Service> {
        let Some(key) = object_key(&object.metadata) else {
            *self.unnamed.entry(Kind::Service).or_default() += 1;
            return object;
        };
        if let Some((kept, _)) = self.services.get(&key)
            && unchanged(kept, &object)
        {
            return kept.clone();
        }
        let converted = convert_service(&self.name, &object);
        let new_claims = claims_of(&converted);
        let selector = converted.selector.clone();
        if let Some((_, old)) = self.services.insert(key.clone(), (object.clone(), converted)) {
            self.unindex_service(&key, &old);
        }
        for claim in new_claims {
            let owners = self.claims.entry(claim).or_default();
            owners.insert(key.clone());
            self.dirty.extend(owners.iter().cloned());
        }
        if let Some(selector) = selector {
            self.selecting.entry(key.0.clone()).or_default().insert(key.1.clone(), selector);
        }
        self.dirty.insert(key);
        object
    }

    /// A Service removed.
    fn remove_service(&mut self, key: &ObjectKey) {
        if let Some((_, old)) = self.services.remove(key) {
            self.unindex_service(key, &old);
            self.dirty.insert(key.clone());
        }
    }

    fn unindex_service(&mut self, key: &ObjectKey, old: &ConvertedService) {
        for claim in claims_of(old) {
            if let Some(owners) = self.claims.get_mut(&claim) {
                owners.remove(key);
                self.dirty.extend(owners.iter().cloned());
                if owners.is_empty() {
                    self.claims.remove(&claim);
                }
            }
        }
        if old.selector.is_some()
            && let Some(names) = self.selecting.get_mut(&key.0)
        {
            names.remove(&key.1);
            if names.is_empty() {
                self.selecting.remove(&key.0);
            }
        }
    }

    /// An EndpointSlice added or changed; returns the `Arc` kept for it.
    fn apply_slice(&mut self, object: Arc<EndpointSlice>) -> Arc<EndpointSlice> {
        let Some(key) = object_key(&object.metadata) else {
            *self.unnamed.entry(Kind::EndpointSlice).or_default() += 1;
            return object;
        };
        if let Some(kept) = self.slices.get(&key)
            && unchanged(kept, &object)
        {
            return kept.clone();
        }
        if let Some(old) = self.slices.insert(key.clone(), object.clone()) {
            self.unlink_slice(&key, &old);
        }
        if let Some(service) = slice_service(&key, &object) {
            self.slices_of.entry(service.clone()).or_default().insert(key.1.clone());
            self.dirty.insert(service);
        }
        self.dirty_slices.insert(key);
        object
    }

    /// An EndpointSlice removed.
    fn remove_slice(&mut self, key: &ObjectKey) {
        if let Some(old) = self.slices.remove(key) {
            self.unlink_slice(key, &old);
            self.dirty_slices.insert(key.clone());
        }
    }

    fn unlink_slice(&mut self, key: &ObjectKey, old: &EndpointSlice) {
        if let Some(service) = slice_service(key, old) {
            if let Some(names) = self.slices_of.get_mut(&service) {
                names.remove(&key.1);
                if names.is_empty() {
                    self.slices_of.remove(&service);
                }
            }
            self.dirty.insert(service);
        }
    }

    /// A Pod added or changed; returns the `Arc` kept for it.
    fn apply_pod(&mut self, pod: Arc<PodSummary>) -> Arc<PodSummary> {
        let Some(key) = pod_key(&pod) else {
            *self.unnamed.entry(Kind::Pod).or_default() += 1;
            return pod;
        };
        let names = self.pods.entry(key.0.clone()).or_default();
        if let Some(kept) = names.get(&key.1)
            && unchanged(kept, &pod)
        {
            return kept.clone();
        }
        let old = names.insert(key.1.clone(), pod.clone());
        if old.is_none() {
            self.pod_count += 1;
        }
        self.pod_changed(&key, old.as_deref(), Some(&pod));
        pod
    }

    /// A Pod removed.
    fn remove_pod(&mut self, key: &ObjectKey) {
        let Some(names) = self.pods.get_mut(&key.0) else { return };
        let Some(old) = names.remove(&key.1) else { return };
        if names.is_empty() {
            self.pods.remove(&key.0);
        }
        self.pod_count -= 1;
        self.pod_changed(key, Some(&old), None);
    }

    /// Marks the services a Pod's change reaches: those whose slices name it
    /// (they name it again when built, if they still do), and those whose
    /// selector matched it before or matches it now.
    fn pod_changed(&mut self, key: &ObjectKey, old: Option<&PodSummary>, new: Option<&PodSummary>) {
        if let Some(users) = self.pod_users.remove(key) {
            self.dirty.extend(users);
        }
        if let Some(users) = self.missing_users.get(key) {
            self.dirty.extend(users.iter().cloned());
        }
        let Some(selecting) = self.selecting.get(&key.0) else { return };
        for (name, selector) in selecting {
            if old.is_some_and(|p| selects(selector, p)) || new.is_some_and(|p| selects(selector, p)) {
                let service = (key.0.clone(), name.clone());
                if !self.slices_of.contains_key(&service) {
                    self.dirty.insert(service); // (a service with slices: they decide its endpoints)
                }
            }
        }
    }

    /// A Namespace added or changed (its network label is the cluster's
    /// network); returns the `Arc` kept for it.
    fn apply_namespace(&mut self, object: Arc<Namespace>) -> Arc<Namespace> {
        let Some(name) = object.metadata.name.clone() else {
            *self.unnamed.entry(Kind::Namespace).or_default() += 1;
            return object;
        };
        if let Some(kept) = self.namespaces.get(&name)
            && unchanged(kept, &object)
        {
            return kept.clone();
        }
        self.namespaces.insert(name, object.clone());
        self.namespaces_changed = true;
        object
    }

    /// A Namespace removed.
    fn remove_namespace(&mut self, name: &str) {
        if self.namespaces.remove(name).is_some() {
            self.namespaces_changed = true;
        }
    }

    /// An object added or changed. Returns it as kept: the object kept
    /// already when it is equal (a source keeps that one too, so that an
    /// object rewritten unchanged is not held twice).
    pub fn apply(&mut self, object: ClusterObject) -> ClusterObject {
        match object {
            ClusterObject::Service(o) => ClusterObject::Service(self.apply_service(o)),
            ClusterObject::EndpointSlice(o) => ClusterObject::EndpointSlice(self.apply_slice(o)),
            ClusterObject::Pod(o) => ClusterObject::Pod(self.apply_pod(o)),
            ClusterObject::Namespace(o) => ClusterObject::Namespace(self.apply_namespace(o)),
        }
    }

    /// An object removed.
    pub fn remove(&mut self, (kind, key): &ObjectId) {
        match kind {
            Kind::Service => self.remove_service(key),
            Kind::EndpointSlice => self.remove_slice(key),
            Kind::Pod => self.remove_pod(key),
            Kind::Namespace => self.remove_namespace(&key.1),
        }
    }

    /// Every object of one kind, as a complete list gives them: the kept
    /// ones not in it are removed, the others applied.
    pub fn replace(&mut self, kind: Kind, objects: Vec<ClusterObject>) {
        let listed: HashSet<ObjectId> = objects.iter().filter_map(ClusterObject::id).collect();
        let kept: Vec<ObjectKey> = match kind {
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.slices.keys().cloned().collect(),
            Kind::Pod => self.pods.iter().flat_map(|(ns, names)| names.keys().map(move |n| (ns.clone(), n.clone()))).collect(),
            Kind::Namespace => self.namespaces.keys().map(|n| (String::new(), n.clone())).collect(),
        };
        for gone in kept.into_iter().map(|key| (kind, key)).filter(|id| !listed.contains(id)) {
            self.remove(&gone);
        }
        self.unnamed.remove(&kind);
        for object in objects {
            debug_assert_eq!(object.kind(), kind);
            self.apply(object);
        }
    }

    /// Every object of the cluster (what is kept and not in `objects` is removed).
    pub fn replace_all(&mut self, objects: &ClusterObjects) {
        for kind in [Kind::Namespace, Kind::Service, Kind::EndpointSlice, Kind::Pod] {
            self.replace(kind, objects.objects().filter(|o| o.kind() == kind).collect());
        }
    }

    /// The cluster's state with every change applied so far, and what is
    /// wrong in it (each message names its object). Only the services the
    /// changes reach are built again; with no change (or none that shows),
    /// the same `Arc`; otherwise a new one that records what changed.
    pub fn build(&mut self) -> (Arc<ClusterState>, Vec<String>) {
        let mut next: Option<ClusterState> = None;
        let mut changes = ClusterChanges { after: Arc::downgrade(&self.state), services_or_network: false, endpoints: BTreeSet::new() };
        if std::mem::take(&mut self.namespaces_changed) {
            // The cluster's network: the istio-system namespace's label (Istio's rule), else any namespace's.
            let ns_network = |ns: &Arc<Namespace>| ns.metadata.labels.as_ref().and_then(|l| l.get(NETWORK_LABEL)).cloned();
            let network = self
                .namespaces
                .get("istio-system")
                .and_then(ns_network)
                .or_else(|| self.namespaces.values().find_map(ns_network))
                .unwrap_or_default();
            let names: BTreeSet<String> = self
                .namespaces
                .iter()
                .filter(|(_, ns)| ns.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating"))
                .map(|(name, _)| name.clone())
                .collect();
            let network_changed = network != self.state.network;
            if network_changed {
                // The network is an input of every endpoint.
                self.dirty.extend(self.services.keys().cloned());
            }
            changes.services_or_network |= network_changed;
            if network_changed || names != self.state.namespaces {
                let state = next.get_or_insert_with(|| (*self.state).clone());
                state.network = network;
                state.namespaces = names;
            }
        }
        if !self.dirty.is_empty() || !self.dirty_slices.is_empty() {
            // The last state's maps are copied (keys and `Arc`s, no service or
            // endpoint), then only the marked services are built into them.
            let state = next.get_or_insert_with(|| (*self.state).clone());
            let dirty = std::mem::take(&mut self.dirty);
            let mut slices = std::mem::take(&mut self.dirty_slices);
            for key in &dirty {
                let (service, endpoints) = (state.services.get(key).cloned(), state.endpoints.get(key).cloned());
                self.build_service(key, state);
                changes.services_or_network |= !same(service.as_ref(), state.services.get(key));
                if !same(endpoints.as_ref(), state.endpoints.get(key)) {
                    changes.endpoints.insert(key.clone());
                }
                // A Service that came or went changes its slices' messages.
                if let Some(names) = self.slices_of.get(key) {
                    slices.extend(names.iter().map(|n| (key.0.clone(), n.clone())));
                }
            }
            for key in &slices {
                self.check_slice(key);
            }
        }
        // (Services built again to no effect: the same state.)
        let unchanged = !changes.services_or_network && changes.endpoints.is_empty();
        if let Some(mut state) = next.filter(|s| !(unchanged && s.namespaces == self.state.namespaces)) {
            state.built_after = BuiltAfter::new(changes);
            self.state = Arc::new(state);
        }
        (self.state.clone(), self.errors())
    }

    /// Every message, in a stable order: objects without a name, then per
    /// Service, then per EndpointSlice.
    fn errors(&self) -> Vec<String> {
        let unnamed = self.unnamed.iter().map(|(kind, n)| format!("cluster {}: {n} {kind:?}(s) without metadata.name; ignored", self.name));
        unnamed.chain(self.service_errors.values().flatten().cloned()).chain(self.slice_errors.values().cloned()).collect()
    }

    /// Builds one service's entry and endpoints into `state`.
    fn build_service(&mut self, key: &ObjectKey, state: &mut ClusterState) {
        let Some((_, converted)) = self.services.get(key) else {
            state.services.remove(key);
            state.endpoints.remove(key);
            self.service_errors.remove(key);
            self.set_missing(key, Vec::new());
            return;
        };
        let Some(service) = &converted.service else { return };
        let mut errors = converted.errors.clone();
        let notes = self.excluded_ports(key, service);
        let service = if notes.is_empty() {
            service.clone()
        } else {
            // Only a Service with ports left out is copied: the conversion stays as parsed.
            let (ns, name) = key;
            errors.extend(notes.iter().map(|(_, n)| format!("Service {ns}/{name} in cluster {}: {n}", self.name)));
            let mut copy = (**service).clone();
            copy.ports.retain(|p| !notes.iter().any(|(port, _)| *port == p.port));
            copy.excluded_ports = notes.into_iter().map(|(_, n)| n).collect();
            Arc::new(copy)
        };
        match state.services.get(key) {
            Some(kept) if unchanged(kept, &service) => {}
            _ => {
                state.services.insert(key.clone(), service);
            }
        }
        if errors.is_empty() {
            self.service_errors.remove(key);
        } else {
            self.service_errors.insert(key.clone(), errors);
        }

        let endpoints = if self.slices_of.contains_key(key) {
            self.endpoints_from_slices(key, &state.network)
        } else {
            self.set_missing(key, Vec::new());
            self.endpoints_from_pods(key, &state.network)
        };
        match state.endpoints.get(key) {
            _ if endpoints.is_empty() => {
                state.endpoints.remove(key);
            }
            Some(kept) if **kept == endpoints => {}
            _ => {
                state.endpoints.insert(key.clone(), Arc::new(endpoints));
            }
        }
    }

    /// The ports a sidecar cannot serve, each with why: a port in the
    /// sidecar's own range, and a ClusterIP and port two Services claim
    /// (which one a connection meant cannot be told). East-west gateway
    /// Services (15021, 15443, …) are not called by sidecars and keep theirs.
    fn excluded_ports(&self, key: &ObjectKey, service: &MeshService) -> Vec<(u16, String)> {
        if service.labels.contains_key(NETWORK_LABEL) {
            return Vec::new();
        }
        service
            .ports
            .iter()
            .filter_map(|p| {
                let why = if SIDECAR_PORTS.contains(&p.port) {
                    Some(format!("port {} collides with the sidecar's own ports (15000-15090)", p.port))
                } else {
                    let ip = service.cluster_ip.as_ref()?;
                    let owners = self.claims.get(&(ip.clone(), p.port))?;
                    (owners.len() > 1).then(|| {
                        let others: Vec<String> = owners.iter().filter(|o| *o != key).map(|(n, s)| format!("{n}/{s}")).collect();
                        format!("port {} on ClusterIP {ip} is also claimed by Service {}", p.port, others.join(", "))
                    })
                };
                why.map(|why| (p.port, format!("{why}; left out of sidecars")))
            })
            .collect()
    }

    /// A service's endpoints from its routable slices (by name), each with
    /// the facts of the Pod its `targetRef` names; each named Pod notes the
    /// service as a user.
    fn endpoints_from_slices(&mut self, key: &ObjectKey, network: &str) -> Vec<Endpoint> {
        let namespace = key.0.as_str();
        let mut eps = Vec::new();
        let mut named: Vec<ObjectKey> = Vec::new();
        for slice_name in self.slices_of.get(key).into_iter().flatten() {
            let Some(slice) = self.slices.get(&(key.0.clone(), slice_name.clone())) else { continue };
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue; // FQDN slices are not routable by address
            }
            let ports: Arc<BTreeMap<String, u16>> = Arc::new(
                slice.ports.iter().flatten().filter_map(|p| Some((p.name.clone().unwrap_or_default(), u16::try_from(p.port?).ok()?))).collect(),
            );
            for ep in &slice.endpoints {
                let Some(address) = ep.addresses.first().cloned() else { continue };
                let pod_ref = ep
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref().unwrap_or("Pod") == "Pod")
                    .and_then(|r| Some((r.namespace.as_deref().unwrap_or(namespace), r.name.as_deref()?)));
                let pod = pod_ref.and_then(|(ns, name)| self.pods.get(ns)?.get(name));
                if let Some((ns, name)) = pod_ref {
                    named.push((ns.to_string(), name.to_string()));
                }
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                let locality = Locality { region: String::new(), zone: ep.zone.clone().unwrap_or_default() };
                eps.push(endpoint(address, ports.clone(), pod.map(|p| &**p), ready, locality, network));
            }
        }
        let mut missing = Vec::new();
        for pod in named {
            if self.pods.get(&pod.0).is_some_and(|names| names.contains_key(&pod.1)) {
                let users = self.pod_users.entry(pod).or_default();
                if !users.contains(key) {
                    users.push(key.clone());
                }
            } else if !missing.contains(&pod) {
                missing.push(pod);
            }
        }
        self.set_missing(key, missing);
        sort_endpoints(&mut eps);
        eps
    }

    /// The Pods that do not exist which `service`'s endpoints now name.
    fn set_missing(&mut self, service: &ObjectKey, missing: Vec<ObjectKey>) {
        let old = if missing.is_empty() { self.missing_named.remove(service) } else { self.missing_named.insert(service.clone(), missing.clone()) };
        for pod in old.into_iter().flatten() {
            if let Some(users) = self.missing_users.get_mut(&pod) {
                users.retain(|u| u != service);
                if users.is_empty() {
                    self.missing_users.remove(&pod);
                }
            }
        }
        for pod in missing {
            self.missing_users.entry(pod).or_default().push(service.clone());
        }
    }

    /// A service without slices: endpoints from the Pods its selector
    /// matches, the way the endpointslice controller would write them.
    fn endpoints_from_pods(&self, key: &ObjectKey, network: &str) -> Vec<Endpoint> {
        let Some((_, converted)) = self.services.get(key) else { return Vec::new() };
        let Some(selector) = &converted.selector else { return Vec::new() };
        let mut eps = Vec::new();
        for pod in self.pods.get(&key.0).into_iter().flat_map(|names| names.values()) {
            if !selects(selector, pod) {
                continue;
            }
            let Some(address) = pod.pod_ip.clone() else { continue };
            // As the endpointslice controller writes it: a terminating Pod is
            // not ready, even while its Ready condition still says so.
            let ready = pod.ready.unwrap_or(true) && !pod.terminating;
            let mut ports = BTreeMap::new();
            for (sp, target) in &converted.targets {
                let port = match target {
                    None => Some(sp.port),
                    Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                    Some(IntOrString::String(n)) => {
                        pod.container_ports.iter().find(|(cn, _)| cn.as_deref() == Some(n.as_str())).and_then(|(_, p)| u16::try_from(*p).ok())
                    }
                };
                if let Some(port) = port {
                    ports.insert(sp.name.clone(), port);
                }
            }
            eps.push(endpoint(address, Arc::new(ports), Some(pod), ready, Locality::default(), network));
        }
        sort_endpoints(&mut eps);
        eps
    }

    /// Sets or clears one EndpointSlice's message: no service label, or a
    /// Service that does not exist.
    fn check_slice(&mut self, key: &ObjectKey) {
        let message = self.slices.get(key).and_then(|slice| {
            let (ns, name) = key;
            let cluster = &self.name;
            match slice_service(key, slice) {
                None => Some(format!("EndpointSlice {ns}/{name} in cluster {cluster}: metadata.labels has no {SERVICE_NAME_LABEL}; ignored")),
                Some(service) if !self.services.contains_key(&service) => {
                    Some(format!("EndpointSlice {ns}/{name} in cluster {cluster}: Service {ns}/{} does not exist; ignored", service.1))
                }
                Some(_) => None,
            }
        });
        match message {
            Some(m) => {
                self.slice_errors.insert(key.clone(), m);
            }
            None => {
                self.slice_errors.remove(key);
            }
        }
    }
}

/// One endpoint, with the facts of the Pod behind it (labels, service
/// account, name; its network label over the cluster's).
fn endpoint(
    address: String,
    ports: Arc<BTreeMap<String, u16>>,
    pod: Option<&PodSummary>,
    ready: bool,
    locality: Locality,
    network: &str,
) -> Endpoint {
    let (labels, service_account, pod_name) = match pod {
        Some(p) => (p.labels.clone(), p.service_account.clone().unwrap_or_else(|| "default".into()), p.name.clone()),
        None => (Arc::new(BTreeMap::new()), "default".into(), None),
    };
    let network = labels.get(NETWORK_LABEL).cloned().unwrap_or_else(|| network.to_string());
    let mesh_tls = labels.get(TLS_MODE_LABEL).is_some_and(|m| m == "istio");
    Endpoint { address, ports, labels, ready, locality, network, mesh_tls, service_account, pod: pod_name }
}

/// Builds a cluster's services and endpoints from all its objects at once;
/// problems (a slice for an unknown service, a Service without ports) are
/// returned as messages naming the object.
pub fn cluster_state(name: &str, objects: &ClusterObjects) -> (ClusterState, Vec<String>) {
    let mut builder = ClusterBuilder::new(name);
    builder.replace_all(objects);
    let (state, errors) = builder.build();
    drop(builder);
    (Arc::try_unwrap(state).unwrap_or_else(|shared| (*shared).clone()), errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn key(name: &str) -> ObjectKey {
        ("default".to_string(), name.to_string())
    }

    fn service(name: &str) -> Arc<Service> {
        Arc::new(parse(&format!(
            "metadata: {{name: {name}, namespace: default}}\nspec: {{selector: {{app: {name}}}, ports: [{{name: http, port: 9080}}]}}"
        )))
    }

    fn with_ip(name: &str, ip: &str) -> Arc<Service> {
        Arc::new(parse(&format!("metadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 9080}}]}}")))
    }

    fn slice(service: &str, address: &str, pod: &str) -> Arc<EndpointSlice> {
        Arc::new(parse(&format!(
            "metadata: {{name: {service}-1, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 9080}}]\nendpoints:\n- addresses: [{address}]\n  targetRef: {{kind: Pod, name: {pod}}}"
        )))
    }

    fn pod(name: &str, app: &str, account: &str) -> Arc<PodSummary> {
        Arc::new(PodSummary::from(parse::<Pod>(&format!(
            "metadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}\nspec: {{serviceAccountName: {account}, containers: [{{name: c}}]}}\nstatus: {{podIP: 10.1.0.1}}"
        ))))
    }

    fn network(name: &str) -> Arc<Namespace> {
        Arc::new(parse(&format!("metadata: {{name: istio-system, labels: {{topology.istio.io/network: {name}}}}}")))
    }

    #[test]
    fn a_change_builds_only_the_services_it_reaches() {
        let mut builder = ClusterBuilder::new("c1");
        builder.replace_all(&ClusterObjects {
            services: vec![service("a"), service("b"), service("c")],
            endpoint_slices: vec![slice("a", "10.0.0.1", "a-1"), slice("b", "10.0.0.2", "b-1"), slice("c", "10.0.0.3", "c-1")],
            pods: vec![pod("a-1", "a", "sa-a"), pod("b-1", "b", "sa-b"), pod("c-1", "c", "sa-c")],
            namespaces: Vec::new(),
        });
        let (first, errors) = builder.build();
        assert!(errors.is_empty(), "{errors:?}");
        // Nothing changed: the same state.
        assert!(Arc::ptr_eq(&first, &builder.build().0));
        // a's slice is rewritten (a new address); c's pod changes its service account.
        builder.apply_slice(slice("a", "10.0.0.9", "a-1"));
        builder.apply_pod(pod("c-1", "c", "sa-c2"));
        assert_eq!(builder.dirty, HashSet::from([key("a"), key("c")]), "only the services the objects feed");
        let (second, errors) = builder.build();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(second.endpoints[&key("a")][0].address, "10.0.0.9");
        assert_eq!(second.endpoints[&key("c")][0].service_account, "sa-c2");
        assert!(!Arc::ptr_eq(&first.endpoints[&key("a")], &second.endpoints[&key("a")]));
        assert!(Arc::ptr_eq(&first.endpoints[&key("b")], &second.endpoints[&key("b")]), "b was not reached: its list is kept");
        assert!(Arc::ptr_eq(&first.services[&key("a")], &second.services[&key("a")]), "the Service did not change: its entry is kept");
        // The same objects listed again (new `Arc`s, equal values): nothing to build.
        builder.replace_all(&ClusterObjects {
            services: vec![service("a"), service("b"), service("c")],
            endpoint_slices: vec![slice("a", "10.0.0.9", "a-1"), slice("b", "10.0.0.2", "b-1"), slice("c", "10.0.0.3", "c-1")],
            pods: vec![pod("a-1", "a", "sa-a"), pod("b-1", "b", "sa-b"), pod("c-1", "c", "sa-c2")],
            namespaces: Vec::new(),
        });
        assert!(builder.dirty.is_empty() && builder.dirty_slices.is_empty());
        assert!(Arc::ptr_eq(&second, &builder.build().0));
        // The network is an input of every endpoint: a new one rebuilds all.
        builder.apply_namespace(network("net2"));
        let (third, _) = builder.build();
        assert!(third.endpoints.values().all(|eps| eps[0].network == "net2"));
        // A slice removed: its service falls back to the Pods its selector matches.
        builder.remove_slice(&key("b-1"));
        let (fourth, _) = builder.build();
        assert_eq!(fourth.endpoints[&key("b")][0].address, "10.1.0.1");
        assert!(Arc::ptr_eq(&third.endpoints[&key("a")], &fourth.endpoints[&key("a")]));
    }

    #[test]
    fn a_colliding_clusterip_port_is_left_out_of_both_services_until_one_moves() {
        let mut builder = ClusterBuilder::new("c1");
        builder.replace_all(&ClusterObjects {
            services: vec![with_ip("a", "10.96.0.1"), with_ip("b", "10.96.0.2"), with_ip("c", "10.96.0.3")],
            ..Default::default()
        });
        let (first, _) = builder.build();
        // b now claims c's ClusterIP and port: both leave the port out, each a copy of its own...
        builder.apply_service(with_ip("b", "10.96.0.3"));
        let (second, errors) = builder.build();
        assert!(Arc::ptr_eq(&first.services[&key("a")], &second.services[&key("a")]), "a was not reached");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("Service default/b") && errors[0].contains("also claimed by Service default/c"), "{errors:?}");
        assert!(second.services[&key("c")].ports.is_empty() && !second.services[&key("c")].excluded_ports.is_empty());
        // ...and the kept conversion is untouched: once b moves away, c serves its port again.
        builder.apply_service(with_ip("b", "10.96.0.2"));
        let (third, errors) = builder.build();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(third.services[&key("c")].ports.len(), 1);
        assert!(third.services[&key("c")].excluded_ports.is_empty());
        assert!(Arc::ptr_eq(&first.services[&key("c")], &third.services[&key("c")]));
        // A Service removed leaves the state, and so do its claims.
        builder.remove_service(&key("a"));
        let (fourth, _) = builder.build();
        assert!(!fourth.services.contains_key(&key("a")));
        assert!(!builder.claims.contains_key(&("10.96.0.1".to_string(), 9080)));
    }

    #[test]
    fn a_slice_waits_for_its_service_and_a_pod_for_its_slice() {
        let mut builder = ClusterBuilder::new("c1");
        builder.apply_slice(slice("a", "10.0.0.1", "a-1"));
        let (_, errors) = builder.build();
        assert!(errors.len() == 1 && errors[0].contains("Service default/a does not exist"), "{errors:?}");
        builder.apply_service(service("a"));
        let (state, errors) = builder.build();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(state.endpoints[&key("a")][0].service_account, "default", "its Pod is not there yet");
        builder.apply_pod(pod("a-1", "a", "sa-a"));
        let (state, _) = builder.build();
        assert_eq!(state.endpoints[&key("a")][0].service_account, "sa-a");
        builder.remove_service(&key("a"));
        let (state, errors) = builder.build();
        assert!(state.services.is_empty() && state.endpoints.is_empty());
        assert!(errors.len() == 1 && errors[0].contains("does not exist"), "{errors:?}");
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

    /// A small deterministic generator (xorshift), so a failure replays.
    struct Steps(u64);
    impl Steps {
        fn next(&mut self, below: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % below
        }
    }

    #[test]
    fn built_change_by_change_is_what_a_build_from_scratch_makes() {
        // Two namespaces; Services with and without slices, shared ClusterIPs,
        // the sidecar's ports, a gateway; slices naming Pods of the other
        // namespace or Pods that come later, unlabelled and FQDN slices; Pods
        // moving between services and networks; the network's namespace
        // coming, going and terminating.
        let ns = |i: u64| if i.is_multiple_of(2) { "default" } else { "other" };
        let svc = |i: u64, variant: u64| -> Arc<Service> {
            let ip = if variant.is_multiple_of(3) { format!("clusterIP: 10.96.0.{}, ", i % 3) } else { String::new() };
            let port = if variant.is_multiple_of(5) { 15001 } else { 9080 };
            let gateway = if variant.is_multiple_of(11) { ", labels: {topology.istio.io/network: far}" } else { "" };
            Arc::new(parse(&format!(
                "metadata: {{name: s{i}, namespace: {}{gateway}}}\nspec: {{{ip}selector: {{app: a{}}}, ports: [{{name: http, port: {port}, targetPort: {}}}, {{name: dns, port: 53, protocol: UDP}}]}}",
                ns(i),
                (i + variant) % 4,
                8000 + variant
            )))
        };
        let slice = |i: u64, variant: u64| -> Arc<EndpointSlice> {
            let label =
                if variant.is_multiple_of(7) { String::new() } else { format!("labels: {{kubernetes.io/service-name: s{}}}, ", (i + variant) % 6) };
            let address_type = if variant.is_multiple_of(9) { "FQDN" } else { "IPv4" };
            Arc::new(parse(&format!(
                "metadata: {{name: e{i}, namespace: {}, {label}}}\naddressType: {address_type}\nports: [{{name: http, port: 9080}}]\nendpoints:\n- addresses: [10.0.{i}.{variant}]\n  targetRef: {{kind: Pod, name: p{}, namespace: {}}}\n- addresses: [10.0.{i}.200]\n  conditions: {{ready: false}}",
                ns(i),
                (i * variant) % 8,
                ns(variant)
            )))
        };
        let pod = |i: u64, variant: u64| -> Arc<PodSummary> {
            let network = if variant.is_multiple_of(4) { ", topology.istio.io/network: far" } else { "" };
            Arc::new(PodSummary::from(parse::<Pod>(&format!(
                "metadata: {{name: p{i}, namespace: {}, labels: {{app: a{}{network}}}}}\nspec: {{serviceAccountName: sa{variant}, containers: [{{name: c, ports: [{{containerPort: 8080}}]}}]}}\nstatus: {{podIP: 10.1.0.{i}}}",
                ns(i),
                variant % 4
            ))))
        };
        let namespace = |i: u64, variant: u64| -> Arc<Namespace> {
            let name = if i == 0 { "istio-system" } else { "other" };
            let phase = if variant.is_multiple_of(3) { "Terminating" } else { "Active" };
            Arc::new(parse(&format!(
                "metadata: {{name: {name}, labels: {{topology.istio.io/network: net{}}}}}\nstatus: {{phase: {phase}}}",
                variant % 2
            )))
        };
        let mut steps = Steps(0x9e37_79b9_7f4a_7c15);
        let mut builder = ClusterBuilder::new("c1");
        let mut objects: BTreeMap<(u64, u64), Option<u64>> = BTreeMap::new(); // (kind, index) → variant
        let mut previous = builder.build().0;
        for round in 0..600 {
            let (kind, i, variant) = (steps.next(4), steps.next(8), steps.next(30));
            let i = if kind == 3 { i % 2 } else { i }; // two Namespaces
            let present = steps.next(5) != 0;
            objects.insert((kind, i), present.then_some(variant));
            let key = (ns(i).to_string(), format!("{}{i}", ["s", "e", "p", "n"][kind as usize]));
            match (kind, present) {
                (0, true) => drop(builder.apply_service(svc(i, variant))),
                (0, false) => builder.remove_service(&key),
                (1, true) => drop(builder.apply_slice(slice(i, variant))),
                (1, false) => builder.remove_slice(&key),
                (2, true) => drop(builder.apply_pod(pod(i, variant))),
                (2, false) => builder.remove_pod(&key),
                (_, true) => drop(builder.apply_namespace(namespace(i, variant))),
                (_, false) => builder.remove_namespace(if i == 0 { "istio-system" } else { "other" }),
            }
            // Build every few changes, as a debounced source does.
            if steps.next(3) == 0 || round == 599 {
                let (state, mut errors) = builder.build();
                let all = |k: u64| objects.iter().filter(move |((kind, _), v)| *kind == k && v.is_some()).map(|((_, i), v)| (*i, v.unwrap()));
                let from_scratch = ClusterObjects {
                    services: all(0).map(|(i, v)| svc(i, v)).collect(),
                    endpoint_slices: all(1).map(|(i, v)| slice(i, v)).collect(),
                    pods: all(2).map(|(i, v)| pod(i, v)).collect(),
                    namespaces: all(3).map(|(i, v)| namespace(i, v)).collect(),
                };
                let (expected, mut expected_errors) = cluster_state("c1", &from_scratch);
                assert_eq!(*state, expected, "round {round}");
                // What the build says it changed is what comparing the two states finds.
                if !Arc::ptr_eq(&state, &previous) {
                    let changes = state.built_after.since(&previous).expect("built right after the previous state");
                    let services_or_network = previous.services != state.services || previous.network != state.network;
                    assert_eq!(changes.services_or_network, services_or_network, "round {round}");
                    let keys: BTreeSet<&ObjectKey> = previous.endpoints.keys().chain(state.endpoints.keys()).collect();
                    let endpoints: BTreeSet<ObjectKey> =
                        keys.into_iter().filter(|k| previous.endpoints.get(*k) != state.endpoints.get(*k)).cloned().collect();
                    assert_eq!(changes.endpoints, endpoints, "round {round}");
                    assert!(ClusterState::clone(&state).built_after.since(&previous).is_none(), "a copy records nothing");
                }
                previous = state.clone();
                errors.sort();
                expected_errors.sort();
                assert_eq!(errors, expected_errors, "round {round}");
                // Only Pods that some service's endpoints name and that do not exist are kept as missing.
                for (pod, users) in &builder.missing_users {
                    assert!(!builder.pods.get(&pod.0).is_some_and(|names| names.contains_key(&pod.1)), "round {round}: {pod:?} exists");
                    assert!(users.iter().all(|u| builder.missing_named[u].contains(pod)), "round {round}");
                }
            }
        }
    }

    #[test]
    fn a_pod_that_went_is_forgotten_once_no_slice_names_it() {
        let mut builder = ClusterBuilder::new("c1");
        builder.replace_all(&ClusterObjects {
            services: vec![service("a")],
            endpoint_slices: vec![slice("a", "10.0.0.1", "a-1")],
            pods: vec![pod("a-1", "a", "sa-a")],
            namespaces: Vec::new(),
        });
        builder.build();
        assert_eq!(builder.pod_users.len(), 1);
        // The Pod goes before the slice stops naming it (a rollout), then a new one takes its place.
        builder.remove_pod(&key("a-1"));
        builder.build();
        assert!(builder.pod_users.is_empty() && builder.missing_users.contains_key(&key("a-1")));
        builder.apply_pod(pod("a-2", "a", "sa-a"));
        builder.apply_slice(slice("a", "10.0.0.2", "a-2"));
        let (state, _) = builder.build();
        assert_eq!(state.endpoints[&key("a")][0].pod.as_deref(), Some("a-2"));
        assert!(builder.missing_users.is_empty() && builder.missing_named.is_empty(), "a name no slice uses is not kept");
        assert_eq!(builder.pod_users.keys().collect::<Vec<_>>(), [&key("a-2")]);
    }

    #[test]
    fn a_port_number_a_service_lists_twice_is_not_a_collision() {
        // kube-dns: 53/UDP (not proxied) and 53/TCP on one ClusterIP.
        let dns: Arc<Service> = Arc::new(parse(
            "metadata: {name: kube-dns, namespace: kube-system}\nspec: {clusterIP: 10.96.0.10, ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]}",
        ));
        let (state, errors) = cluster_state("c1", &ClusterObjects { services: vec![dns], ..Default::default() });
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(state.services[&("kube-system".to_string(), "kube-dns".to_string())].ports.len(), 2);
    }
}
