//! The mesh in meshpilot's own types: services, endpoints and policies per
//! cluster, grouped into virtual meshes. Sources fill [`MeshInputs`];
//! [`MeshSnapshot::build`] validates policies and produces the immutable
//! snapshot translation reads.

pub mod access;
pub mod api;
pub mod cluster_build;
pub mod crd;
pub mod describe;
pub mod diff;
pub mod k8s;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod sidecar;
pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

pub use policy::{AppliedPolicy, PolicyId, PolicyState, PolicyStatus};

/// A subset's name from its labels: sorted `key-value` pairs joined by `_`
/// (the seed's DestinationRule subset names), restricted to characters that
/// are safe in cluster names and SNI.
pub fn subset_name(labels: &BTreeMap<String, String>) -> String {
    let raw: Vec<String> = labels.iter().map(|(k, v)| format!("{k}-{v}")).collect();
    raw.join("_").chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '-' }).collect()
}

/// A service in one cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceKey {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(cluster: &str, namespace: &str, name: &str) -> Self {
        ServiceKey { cluster: cluster.into(), namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ServiceKey {
    /// `name.namespace.cluster`, as `meshctl describe service` takes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.name, self.namespace, self.cluster)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// The port's name ("" when the Service has a single unnamed port).
    pub name: String,
    pub port: u16,
    /// Istio's rules: `appProtocol`, else the name's prefix, else detected.
    pub protocol: protocol::Protocol,
    /// Why it got that protocol (for `describe service`).
    pub protocol_reason: String,
}

impl ServicePort {
    /// A port named `name`, its protocol by Istio's rules.
    pub fn named(name: &str, port: u16) -> ServicePort {
        let (protocol, protocol_reason) = protocol::port_protocol(name, None, None);
        ServicePort { name: name.into(), port, protocol, protocol_reason }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub key: ServiceKey,
    pub ports: Vec<ServicePort>,
    pub labels: BTreeMap<String, String>,
    pub cluster_ip: Option<String>,
    /// `clusterIP: None`: clients reach its pods by their own addresses.
    pub headless: bool,
    /// Ports left out of sidecars' configuration, and why (for `describe service`).
    pub excluded_ports: Vec<String>,
    /// Addresses reachable from outside the cluster (`spec.externalIPs`,
    /// `status.loadBalancer.ingress[].ip`): an east-west gateway's addresses.
    pub external_addresses: Vec<String>,
}

/// Istio's default port of the east-west gateway's mTLS passthrough listener.
pub const DEFAULT_GATEWAY_PORT: u16 = 15443;
/// Istio's label (on the gateway Service) overriding that port.
pub const GATEWAY_PORT_LABEL: &str = "networking.istio.io/gatewayPort";

/// An east-west gateway of a network: an address other networks can reach.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct GatewayAddress {
    pub address: String,
    pub port: u16,
    /// The gateway Service it came from.
    pub service: ServiceKey,
}

/// Where a cluster's workload identities come from (its VirtualMesh's CA).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct MeshTrust {
    /// The VirtualMesh (`namespace/name`) whose CA signs the identities.
    pub virtual_mesh: String,
    pub trust_domain: String,
    /// Where the VirtualMesh's CA comes from.
    pub ca: CaSource,
}

/// A workload's identity: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// `certificateAuthority` of a VirtualMesh.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum CaSource {
    /// `builtin`: a root meshpilot generates once and keeps (Kubernetes mode:
    /// in the Secret [`builtin_ca_secret_name`] beside the VirtualMesh).
    Builtin,
    /// `provided.certificate`: a Secret in Istio's `cacerts` layout.
    Provided { namespace: String, name: String },
}

/// The management-cluster Secret (in the VirtualMesh's namespace) that keeps
/// a builtin root, so every replica and restart signs with the same one.
pub fn builtin_ca_secret_name(virtual_mesh_name: &str) -> String {
    format!("meshpilot-ca-{virtual_mesh_name}")
}

impl MeshTrust {
    /// A workload's identity in this trust: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        spiffe_id(&self.trust_domain, namespace, service_account)
    }
}

impl Service {
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
}

/// One workload instance behind a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub address: String,
    /// Service port name → the port on this endpoint (shared by the
    /// endpoints of one EndpointSlice).
    pub ports: Arc<BTreeMap<String, u16>>,
    /// The labels of the Pod behind it (subsets select on these), shared
    /// with the source's copy of the Pod.
    pub labels: Arc<BTreeMap<String, String>>,
    pub ready: bool,
    pub locality: Locality,
    pub network: String,
    pub service_account: String,
    pub pod: Option<String>,
    /// The pod runs a sidecar that accepts mTLS (Istio's `security.istio.io/tlsMode: istio` label).
    pub mesh_tls: bool,
}

impl Endpoint {
    pub fn has_labels(&self, subset: &BTreeMap<String, String>) -> bool {
        subset.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// One cluster's services and their endpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClusterState {
    pub name: String,
    /// The cluster's default network (istio-system's `topology.istio.io/network`), "" if unset.
    pub network: String,
    /// Shared: a rebuild keeps an unchanged Service's conversion (the same `Arc`).
    pub services: BTreeMap<(String, String), Arc<Service>>,
    /// Each service's endpoints, shared: a rebuild that did not touch a
    /// service keeps its list (the same `Arc`), so comparing two states skips it.
    pub endpoints: BTreeMap<(String, String), Arc<Vec<Endpoint>>>,
    /// The cluster's namespaces (Kubernetes mode), where the mesh root is published.
    pub namespaces: BTreeSet<String>,
    /// What the build that made this state changed since the one before it
    /// (not part of its value: two equal states compare equal).
    #[serde(skip)]
    pub built_after: BuiltAfter,
}

/// What one build of a cluster's state changed since the state it was built
/// after ([`cluster_build::ClusterBuilder`] records it): the snapshot diff
/// reads it instead of comparing every service, when it compares the state
/// with that one.
///
/// A copy of a state records nothing (`Clone` gives the default): a copy
/// changed afterwards (`Arc::make_mut`) was not built from that state alone.
#[derive(Debug, Default)]
pub struct BuiltAfter(Option<Arc<ClusterChanges>>);

impl Clone for BuiltAfter {
    fn clone(&self) -> Self {
        BuiltAfter(None)
    }
}

/// See [`BuiltAfter`].
#[derive(Debug)]
pub struct ClusterChanges {
    /// The state this build started from (held weakly: its allocation, so
    /// its address, stays while this is kept; its value may be gone).
    pub after: std::sync::Weak<ClusterState>,
    /// The network or a service's entry changed (the diff then says Full).
    pub services_or_network: bool,
    /// The services whose endpoints changed.
    pub endpoints: BTreeSet<(String, String)>,
}

impl BuiltAfter {
    pub fn new(changes: ClusterChanges) -> Self {
        BuiltAfter(Some(Arc::new(changes)))
    }

    /// The changes since `previous`, when this state was built right after it.
    pub fn since(&self, previous: &Arc<ClusterState>) -> Option<&ClusterChanges> {
        self.0.as_deref().filter(|c| std::ptr::eq(c.after.as_ptr(), Arc::as_ptr(previous)))
    }
}

impl PartialEq for BuiltAfter {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// A policy object as sources give it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyObject<S> {
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    /// Age for conflict resolution: creationTimestamp in ms, else what the
    /// source knows (a file's modification time).
    pub created_ms: i64,
    /// Where it came from, for messages (a file path, or a cluster).
    pub origin: String,
    pub spec: S,
    /// Why the object's spec could not be read (it is then INVALID and its last
    /// accepted version, if any, keeps serving).
    pub parse_errors: Vec<String>,
}

/// Everything sources read, not yet validated.
#[derive(Debug, Clone, Default)]
pub struct MeshInputs {
    pub clusters: BTreeMap<String, Arc<ClusterState>>,
    pub traffic_policies: Vec<PolicyObject<api::TrafficPolicySpec>>,
    pub virtual_meshes: Vec<PolicyObject<api::VirtualMeshSpec>>,
    pub access_policies: Vec<PolicyObject<api::AccessControlPolicySpec>>,
    pub sidecars: Vec<PolicyObject<api::SidecarSpec>>,
    /// Objects that could not be read (file, document, field, reason).
    pub errors: Vec<String>,
}

/// The immutable, validated mesh that translation reads.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MeshSnapshot {
    pub clusters: BTreeMap<String, Arc<ClusterState>>,
    /// Cluster → the clusters it shares a virtual mesh with (itself included).
    pub mesh_peers: BTreeMap<String, BTreeSet<String>>,
    /// Policies that apply, oldest first.
    pub applied: Vec<Arc<AppliedPolicy>>,
    /// Sidecars in effect (egress scoping), oldest first.
    pub sidecars: Vec<Arc<sidecar::SidecarScope>>,
    /// The workload labels translation reads, key → the values some selector
    /// asks for (applied policies' source selectors and Sidecars' workload
    /// selectors, all equality matches): a proxy label outside these changes
    /// no match, so proxies that differ only there share one translation.
    pub source_labels: BTreeMap<String, BTreeSet<String>>,
    /// The services some applied policy has rules for (most have none: they
    /// skip the walk over every policy, per service and scope).
    #[serde(skip)]
    pub ruled_services: std::collections::HashSet<ServiceKey>,
    /// Network → its east-west gateways' addresses (Services labelled
    /// `topology.istio.io/network` with an external address).
    pub gateways: BTreeMap<String, Vec<GatewayAddress>>,
    /// Cluster → the trust its workloads get (clusters of a VirtualMesh with a
    /// certificateAuthority); clusters not listed have no mTLS.
    pub trust: BTreeMap<String, MeshTrust>,
    pub policy_status: BTreeMap<PolicyId, PolicyStatus>,
    /// Cluster → workload address → the ports it serves and each one's
    /// protocol (from the Service port it backs; the first by service name).
    /// A captured sidecar's inbound side depends on this, not on its address.
    /// Made when first read ([`MeshSnapshot::workload_ports`]; most builds
    /// under endpoint churn are read by no captured sidecar's translation,
    /// and making it had been most of each build), and shared per cluster:
    /// a build after a change that kept a cluster's state keeps its map.
    #[serde(skip)]
    workload_ports: BTreeMap<String, Arc<std::sync::OnceLock<WorkloadPorts>>>,
    /// Cluster → service → the SPIFFE ids of its mesh workloads (the service
    /// accounts of its `tlsMode: istio` endpoints whose Pod is known, in its
    /// cluster's trust domain), sorted: what a client's upstream TLS accepts
    /// from it, as Istio's subject-alt-name match. Clusters without trust
    /// have none. Shared per cluster as `workload_ports`; read with
    /// [`MeshSnapshot::service_identities`].
    #[serde(skip)]
    pub service_identities: BTreeMap<String, Arc<ServiceIdentities>>,
    /// The clusters whose VirtualMesh enforces access control: their
    /// workloads deny every caller no AccessControlPolicy allows.
    pub access_enforced: BTreeSet<String>,
    /// AccessControlPolicies that serve (accepted, or their last accepted version).
    pub access_policies: Vec<Arc<access::AccessPolicy>>,
    /// Enforcing cluster → workload address → what its inbound side allows.
    #[serde(skip)]
    pub workload_access: BTreeMap<String, std::collections::HashMap<String, Arc<access::InboundAccess>>>,
    /// VirtualMeshes, AccessControlPolicies and Sidecars: read, and what of them is not yet in effect.
    pub mesh_object_status: BTreeMap<MeshObjectId, MeshObjectStatus>,
    pub input_errors: Vec<String>,
}

/// One cluster's workload addresses → the ports each serves and their protocols.
pub type WorkloadPorts = std::collections::HashMap<String, BTreeMap<u16, protocol::Protocol>>;

/// One cluster's services → the SPIFFE ids of their mesh workloads.
pub type ServiceIdentities = std::collections::HashMap<ServiceKey, Arc<Vec<String>>>;

/// A VirtualMesh, AccessControlPolicy or Sidecar: `kind namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct MeshObjectId {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for MeshObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshObjectStatus {
    pub state: PolicyState,
    pub observed_generation: Option<i64>,
    /// Why it is INVALID.
    pub messages: Vec<String>,
    /// Fields accepted but not yet in effect, never silently ignored.
    pub not_yet_supported: Vec<String>,
    /// The generation whose rules are in effect (an INVALID one's last
    /// accepted), where meshpilot keeps one (AccessControlPolicies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving_generation: Option<i64>,
}

/// The fields of a VirtualMesh that meshpilot reads but does not act on yet.
fn virtual_mesh_unsupported(spec: &api::VirtualMeshSpec) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(b) = spec.certificate_authority.as_ref().and_then(|ca| ca.builtin.as_ref())
        && (b.ttl_days.is_some() || b.rsa_key_size_bytes.is_some() || b.org_name.is_some())
    {
        out.push("spec.certificateAuthority.builtin.{ttlDays,rsaKeySizeBytes,orgName}: not yet supported (the builtin root is ECDSA P-256, valid 10 years; workload certificates follow serve --cert-ttl)".to_string());
    }
    if spec.federation.is_some() {
        out.push("spec.federation: not yet supported (every service of the virtual mesh is reachable from all its clusters)".to_string());
    }
    if spec.limited.is_some() {
        out.push("spec.limited: not yet supported (trust is shared)".to_string());
    }
    out
}

fn object_status<S>(kind: &str, p: &PolicyObject<S>, unsupported: Vec<String>) -> (MeshObjectId, MeshObjectStatus) {
    let id = MeshObjectId { kind: kind.into(), namespace: p.namespace.clone(), name: p.name.clone() };
    let invalid = !p.parse_errors.is_empty();
    let status = MeshObjectStatus {
        state: if invalid { PolicyState::Invalid } else { PolicyState::Accepted },
        observed_generation: p.generation,
        messages: p.parse_errors.clone(),
        not_yet_supported: if invalid { Vec::new() } else { unsupported },
        serving_generation: None,
    };
    (id, status)
}

impl MeshSnapshot {
    /// Validates the inputs' policies (keeping each policy's last accepted spec
    /// in `last_good` across calls) and builds the snapshot.
    pub fn build(inputs: MeshInputs, last_good: &mut policy::LastGood) -> MeshSnapshot {
        Self::build_after(inputs, last_good, None)
    }

    /// [`MeshSnapshot::build`], keeping what `previous` derived from a cluster
    /// whose state (the same `Arc`) and trust are unchanged: under endpoint
    /// churn one cluster changes at a time, and deriving every cluster's
    /// workload maps again had been a third of each build.
    pub fn build_after(inputs: MeshInputs, last_good: &mut policy::LastGood, previous: Option<&MeshSnapshot>) -> MeshSnapshot {
        let mesh_peers = mesh_peers(&inputs);
        let mut mesh_object_status: BTreeMap<MeshObjectId, MeshObjectStatus> =
            inputs.virtual_meshes.iter().map(|vm| object_status("VirtualMesh", vm, virtual_mesh_unsupported(&vm.spec))).collect();
        let members = |spec: &api::VirtualMeshSpec| virtual_mesh_members(spec, &inputs.clusters);
        let (access_enforced, enforcement_errors) = access::enforced_clusters(&inputs.virtual_meshes, members, &mut last_good.access);
        let (trust, trust_errors) = mesh_trust(&inputs, &mut last_good.trust_domains);
        // VirtualMeshes read but wrong in a field: INVALID, the field's last accepted value serving.
        for ((namespace, name), error) in enforcement_errors.into_iter().map(|(vm, e)| (vm, vec![e])).chain(trust_errors) {
            let id = MeshObjectId { kind: "VirtualMesh".into(), namespace, name };
            if let Some(status) = mesh_object_status.get_mut(&id) {
                status.state = PolicyState::Invalid;
                status.messages.extend(error);
            }
        }
        let (sidecars, sidecar_status) = sidecar::resolve(&inputs.sidecars, &mut last_good.sidecars);
        mesh_object_status.extend(sidecar_status);
        let gateways = network_gateways(&inputs.clusters);
        let workload_ports = per_cluster(&inputs.clusters, previous, |p| &p.workload_ports, |_| true, |_, _| Some(Default::default()));
        let mut snapshot = MeshSnapshot {
            clusters: inputs.clusters,
            mesh_peers,
            gateways,
            trust,
            applied: Vec::new(),
            sidecars,
            source_labels: BTreeMap::new(),
            ruled_services: Default::default(),
            policy_status: BTreeMap::new(),
            workload_ports,
            service_identities: Default::default(),
            access_enforced,
            access_policies: Vec::new(),
            workload_access: BTreeMap::new(),
            mesh_object_status,
            input_errors: inputs.errors,
        };
        let (applied, status) = policy::resolve(&snapshot, &inputs.traffic_policies, last_good);
        let selected = applied.iter().flat_map(|p| p.rules.iter()).flat_map(|r| r.source.labels.iter());
        for (k, v) in selected.chain(snapshot.sidecars.iter().flat_map(|s| s.selector.iter().flatten())) {
            snapshot.source_labels.entry(k.clone()).or_default().insert(v.clone());
        }
        snapshot.ruled_services = applied.iter().flat_map(|p| p.rules.iter().map(|r| r.service.clone())).collect();
        snapshot.applied = applied;
        snapshot.policy_status = status;
        snapshot.service_identities = per_cluster(
            &snapshot.clusters,
            previous,
            |p| &p.service_identities,
            |name| previous.is_some_and(|p| p.trust.get(name) == snapshot.trust.get(name)),
            |name, state| Some(service_identities(name, state, snapshot.trust.get(name)?)).filter(|ids| !ids.is_empty()),
        );
        let (access_policies, access_status) = access::resolve(&snapshot, &inputs.access_policies, &mut last_good.access);
        snapshot.access_policies = access_policies;
        snapshot.mesh_object_status.extend(access_status);
        snapshot.workload_access = access::workload_access(&snapshot);
        snapshot
    }

    /// [`policy::rules_for`] `service` among the applied policies.
    pub fn rules_for(&self, service: &ServiceKey) -> Vec<(Vec<&PolicyId>, policy::ServiceRule)> {
        if !self.ruled_services.contains(service) {
            return Vec::new();
        }
        policy::rules_for(&self.applied, service)
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&Service> {
        self.clusters.get(&key.cluster)?.services.get(&(key.namespace.clone(), key.name.clone())).map(|s| &**s)
    }

    /// `cluster`'s workload addresses → the ports each serves and their
    /// protocols (see the field), made on the first call.
    pub fn workload_ports(&self, cluster: &str) -> Option<&WorkloadPorts> {
        let (cell, state) = (self.workload_ports.get(cluster)?, self.clusters.get(cluster)?);
        Some(cell.get_or_init(|| workload_ports(state)))
    }

    /// The SPIFFE ids of `key`'s mesh workloads, if it has any (see `service_identities`).
    pub fn service_identities(&self, key: &ServiceKey) -> Option<&Arc<Vec<String>>> {
        self.service_identities.get(&key.cluster)?.get(key)
    }

    pub fn endpoints(&self, key: &ServiceKey) -> &[Endpoint] {
        self.clusters
            .get(&key.cluster)
            .and_then(|c| c.endpoints.get(&(key.namespace.clone(), key.name.clone())))
            .map(|eps| eps.as_slice())
            .unwrap_or_default()
    }

    /// The clusters a proxy in `cluster` can reach (its virtual mesh).
    pub fn peers_of(&self, cluster: &str) -> BTreeSet<String> {
        self.mesh_peers.get(cluster).cloned().unwrap_or_else(|| [cluster.to_string()].into())
    }

    pub fn all_services(&self) -> impl Iterator<Item = &Service> {
        self.clusters.values().flat_map(|c| c.services.values()).map(|s| &**s)
    }
}

/// The clusters a VirtualMesh's `meshes[]` name.
fn virtual_mesh_members(spec: &api::VirtualMeshSpec, clusters: &BTreeMap<String, Arc<ClusterState>>) -> Vec<String> {
    spec.meshes.iter().filter_map(|m| mesh_ref_to_cluster(&m.name, clusters)).collect()
}

/// A VirtualMesh's `meshes[]` name clusters directly, or by Service Mesh Hub's
/// discovered-mesh names (`istio-istio-system-<cluster>`).
fn mesh_ref_to_cluster(name: &str, clusters: &BTreeMap<String, Arc<ClusterState>>) -> Option<String> {
    if clusters.contains_key(name) {
        return Some(name.to_string());
    }
    clusters.keys().find(|c| name.ends_with(&format!("-{c}"))).cloned()
}

/// Istio's default trust domain.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Messages by object (`namespace`, `name`).
type ObjectErrors = BTreeMap<(String, String), Vec<String>>;

/// Istio's rule for a trust domain: DNS-like, lowercase letters, digits, `.`, `-`, `_`.
fn trust_domain_error(domain: &str) -> Option<String> {
    let ok = !domain.is_empty()
        && domain.len() <= 255
        && domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && !domain.starts_with('.')
        && !domain.ends_with('.');
    (!ok).then(|| format!("{domain:?} is not a trust domain (lowercase letters, digits, '.', '-' and '_')"))
}

/// Each cluster's trust (its VirtualMesh with a CA, and its trust domain),
/// and the messages of VirtualMeshes whose `trustDomains` are wrong: a wrong
/// entry keeps its cluster's last accepted domain (`last_domains`), so
/// identities never change by a typo.
fn mesh_trust(
    inputs: &MeshInputs,
    last_domains: &mut std::collections::HashMap<(String, String), String>,
) -> (BTreeMap<String, MeshTrust>, ObjectErrors) {
    let mut out = BTreeMap::new();
    let mut errors = ObjectErrors::new();
    // A domain no VirtualMesh names any more is forgotten.
    let named: std::collections::HashSet<(String, String)> = inputs
        .virtual_meshes
        .iter()
        .flat_map(|vm| vm.spec.trust_domains.keys().map(move |c| (format!("{}/{}", vm.namespace, vm.name), c.clone())))
        .collect();
    last_domains.retain(|k, _| named.contains(k));
    for vm in &inputs.virtual_meshes {
        if !vm.parse_errors.is_empty() {
            continue;
        }
        let members = virtual_mesh_members(&vm.spec, &inputs.clusters);
        for (cluster, domain) in &vm.spec.trust_domains {
            let problem = if !members.contains(cluster) {
                Some(format!("cluster {cluster:?} is not a member of this virtual mesh (members: {})", members.join(", ")))
            } else {
                trust_domain_error(domain)
            };
            match problem {
                Some(p) => errors.entry((vm.namespace.clone(), vm.name.clone())).or_default().push(format!("spec.trustDomains[{cluster:?}]: {p}")),
                None => {
                    last_domains.insert((format!("{}/{}", vm.namespace, vm.name), cluster.clone()), domain.clone());
                }
            }
        }
        if vm.spec.certificate_authority.is_none() {
            continue;
        }
        let ca = match vm.spec.certificate_authority.as_ref().and_then(|ca| ca.provided.as_ref()) {
            Some(provided) if vm.spec.certificate_authority.as_ref().is_some_and(|ca| ca.builtin.is_none()) => {
                let secret = provided.certificate.clone().unwrap_or_default();
                let namespace = if secret.namespace.is_empty() { vm.namespace.clone() } else { secret.namespace };
                CaSource::Provided { namespace, name: secret.name }
            }
            _ => CaSource::Builtin,
        };
        let virtual_mesh = format!("{}/{}", vm.namespace, vm.name);
        for cluster in members {
            let trust_domain = last_domains.get(&(virtual_mesh.clone(), cluster.clone())).cloned().unwrap_or_else(|| TRUST_DOMAIN.to_string());
            out.entry(cluster).or_insert_with(|| MeshTrust { virtual_mesh: virtual_mesh.clone(), trust_domain, ca: ca.clone() });
        }
    }
    (out, errors)
}

/// One derived value per cluster: the one in `previous`'s `field` where the
/// cluster's state is the same `Arc` and `others_unchanged(cluster)` (the
/// value's other inputs are those it was made from), else `derive`'s
/// (`None`: the cluster has none).
fn per_cluster<T>(
    clusters: &BTreeMap<String, Arc<ClusterState>>,
    previous: Option<&MeshSnapshot>,
    field: impl Fn(&MeshSnapshot) -> &BTreeMap<String, Arc<T>>,
    others_unchanged: impl Fn(&str) -> bool,
    mut derive: impl FnMut(&str, &ClusterState) -> Option<T>,
) -> BTreeMap<String, Arc<T>> {
    let mut out = BTreeMap::new();
    for (name, state) in clusters {
        let kept = previous
            .filter(|p| p.clusters.get(name).is_some_and(|s| Arc::ptr_eq(s, state)) && others_unchanged(name))
            .map(|p| field(p).get(name).cloned());
        let value = match kept {
            Some(kept) => kept,
            None => derive(name, state).map(Arc::new),
        };
        if let Some(value) = value {
            out.insert(name.clone(), value);
        }
    }
    out
}

fn service_identities(name: &str, state: &ClusterState, trust: &MeshTrust) -> ServiceIdentities {
    let mut out = ServiceIdentities::new();
    for ((namespace, service), eps) in &state.endpoints {
        let accounts: BTreeSet<&str> = eps.iter().filter(|e| e.mesh_tls && e.pod.is_some()).map(|e| e.service_account.as_str()).collect();
        if !accounts.is_empty() {
            let ids = accounts.into_iter().map(|sa| trust.spiffe_id(namespace, sa)).collect();
            out.insert(ServiceKey::new(name, namespace, service), Arc::new(ids));
        }
    }
    out
}

fn workload_ports(state: &ClusterState) -> WorkloadPorts {
    let mut by_address = WorkloadPorts::new();
    for (key, eps) in &state.endpoints {
        let Some(svc) = state.services.get(key) else { continue };
        for ep in eps.iter() {
            let ports = by_address.entry(ep.address.clone()).or_default();
            for sp in &svc.ports {
                if let Some(port) = ep.ports.get(&sp.name) {
                    ports.entry(*port).or_insert(sp.protocol);
                }
            }
        }
    }
    by_address
}

fn network_gateways(clusters: &BTreeMap<String, Arc<ClusterState>>) -> BTreeMap<String, Vec<GatewayAddress>> {
    let mut out: BTreeMap<String, Vec<GatewayAddress>> = BTreeMap::new();
    for svc in clusters.values().flat_map(|c| c.services.values()) {
        let Some(network) = svc.labels.get(k8s::NETWORK_LABEL).filter(|n| !n.is_empty()) else { continue };
        let port = svc.labels.get(GATEWAY_PORT_LABEL).and_then(|p| p.parse().ok()).unwrap_or(DEFAULT_GATEWAY_PORT);
        for address in &svc.external_addresses {
            out.entry(network.clone()).or_default().push(GatewayAddress { address: address.clone(), port, service: svc.key.clone() });
        }
    }
    for v in out.values_mut() {
        v.sort();
        v.dedup();
    }
    out
}

fn mesh_peers(inputs: &MeshInputs) -> BTreeMap<String, BTreeSet<String>> {
    let mut peers: BTreeMap<String, BTreeSet<String>> = inputs.clusters.keys().map(|c| (c.clone(), [c.clone()].into())).collect();
    for vm in &inputs.virtual_meshes {
        let members = virtual_mesh_members(&vm.spec, &inputs.clusters);
        for m in &members {
            peers.entry(m.clone()).or_default().extend(members.iter().cloned());
        }
    }
    peers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_trust_domain_keeps_the_clusters_last_accepted_one() {
        let mut inputs =
            crate::fixtures::scale_inputs(crate::fixtures::ScaleSpec { services: 2, clusters: 2, endpoints: 1, policies: 0, sidecars: false });
        let vm = &mut inputs.virtual_meshes[0].spec;
        vm.certificate_authority = Some(api::CertificateAuthority { builtin: Some(Default::default()), ..Default::default() });
        vm.trust_domains = [("cluster-1".to_string(), "one.example".to_string())].into();
        let mut last_good = policy::LastGood::default();
        assert_eq!(MeshSnapshot::build(inputs.clone(), &mut last_good).trust["cluster-1"].trust_domain, "one.example");
        inputs.virtual_meshes[0].spec.trust_domains = [("cluster-1".to_string(), "One Example".to_string())].into();
        let s = MeshSnapshot::build(inputs.clone(), &mut last_good);
        assert_eq!(s.trust["cluster-1"].trust_domain, "one.example", "a typo does not change identities");
        assert!(s.mesh_object_status.values().any(|st| st.state == PolicyState::Invalid));
        inputs.virtual_meshes[0].spec.trust_domains.clear();
        assert_eq!(MeshSnapshot::build(inputs, &mut last_good).trust["cluster-1"].trust_domain, TRUST_DOMAIN, "removed: the default");
    }

    #[test]
    fn a_build_after_a_change_keeps_the_workload_maps_of_the_clusters_it_did_not_touch() {
        let mut inputs =
            crate::fixtures::scale_inputs(crate::fixtures::ScaleSpec { services: 3, clusters: 2, endpoints: 2, policies: 0, sidecars: false });
        inputs.virtual_meshes[0].spec.certificate_authority =
            Some(api::CertificateAuthority { builtin: Some(Default::default()), ..Default::default() });
        for state in inputs.clusters.values_mut() {
            for eps in Arc::make_mut(state).endpoints.values_mut() {
                Arc::make_mut(eps).iter_mut().for_each(|e| e.mesh_tls = true);
            }
        }
        let mut last_good = policy::LastGood::default();
        let first = MeshSnapshot::build(inputs.clone(), &mut last_good);
        assert!(first.workload_ports.values().all(|cell| cell.get().is_none()), "made when first read");
        assert!(first.workload_ports("cluster-0").unwrap().contains_key("10.0.0.1"));
        let key = ServiceKey::new("cluster-0", "ns-0", "svc-00000");
        assert_eq!(first.service_identities(&key).map(|ids| ids.as_slice()), Some(&["spiffe://cluster.local/ns/ns-0/sa/svc-00000".to_string()][..]));

        // cluster-1's state changes (an endpoint moves); cluster-0's is the same `Arc`.
        let c1 = Arc::make_mut(inputs.clusters.get_mut("cluster-1").unwrap());
        let eps = c1.endpoints.values_mut().next().unwrap();
        Arc::make_mut(eps)[0].address = "10.9.9.9".into();
        Arc::make_mut(eps)[0].service_account = "moved".into();
        let after = MeshSnapshot::build_after(inputs.clone(), &mut last_good, Some(&first));
        assert!(Arc::ptr_eq(&after.workload_ports["cluster-0"], &first.workload_ports["cluster-0"]));
        assert!(Arc::ptr_eq(&after.service_identities["cluster-0"], &first.service_identities["cluster-0"]));
        assert!(after.workload_ports["cluster-0"].get().is_some(), "read before the change");
        assert!(after.workload_ports("cluster-1").unwrap().contains_key("10.9.9.9"));
        assert!(!Arc::ptr_eq(&after.service_identities["cluster-1"], &first.service_identities["cluster-1"]));
        let scratch = MeshSnapshot::build(inputs.clone(), &mut policy::LastGood::default());
        for cluster in ["cluster-0", "cluster-1"] {
            assert_eq!(after.workload_ports(cluster), scratch.workload_ports(cluster));
        }
        assert_eq!(after.service_identities, scratch.service_identities);

        // A new trust domain for cluster-0 changes its identities though its state is the same.
        inputs.virtual_meshes[0].spec.trust_domains = [("cluster-0".to_string(), "zero.example".to_string())].into();
        let retrusted = MeshSnapshot::build_after(inputs.clone(), &mut last_good, Some(&after));
        assert!(Arc::ptr_eq(&retrusted.workload_ports["cluster-0"], &first.workload_ports["cluster-0"]));
        assert_eq!(retrusted.service_identities(&key).map(|ids| ids[0].as_str()), Some("spiffe://zero.example/ns/ns-0/sa/svc-00000"));
        let scratch = MeshSnapshot::build(inputs, &mut policy::LastGood::default());
        assert_eq!(retrusted.service_identities, scratch.service_identities);
    }

    #[test]
    fn a_workload_identity_is_its_trust_domains_spiffe_id() {
        let trust = MeshTrust { virtual_mesh: "service-mesh-hub/vm".into(), trust_domain: "cluster.local".into(), ca: CaSource::Builtin };
        assert_eq!(trust.spiffe_id("default", "bookinfo-productpage"), "spiffe://cluster.local/ns/default/sa/bookinfo-productpage");
    }
}
