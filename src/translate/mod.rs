//! Pure translation: an immutable [`MeshSnapshot`] and a proxy's scope in,
//! Envoy resources out. No IO, no clocks, no locks; golden-file tests live in
//! `tests/translate_golden.rs`.
//!
//! For a sidecar in cluster C, every service of every cluster in C's virtual
//! mesh is reachable:
//! - C's own services under their Kubernetes names (short, `name.ns`,
//!   `name.ns.svc`, `name.ns.svc.cluster.local`, the ClusterIP);
//! - another cluster's services as `name.ns.svc.<cluster>.global`, and under
//!   the Kubernetes names too when C has no service of that name (the first
//!   such cluster by name);
//! - narrowed, when a Sidecar applies to the proxy, to the services its
//!   egress hosts import (plus whatever their policies route to);
//! - one loopback listener per port (explicit mode), RDS named by port, a
//!   virtual host per service and port, an EDS cluster per service port and
//!   per subset a policy names. TrafficPolicies on a service shape its routes
//!   for every client in every cluster that reaches it.

pub mod clusters;
pub mod endpoints;
pub mod gateway;
pub mod inbound;
pub mod listeners;
pub mod names;
pub mod routes;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::model::policy::Outlier;
use crate::model::{MeshSnapshot, MeshTrust, Service, ServiceKey};
use crate::xds::node::{ProxyNode, ProxyRole};
use crate::xds::resources::{Resource, ResourceSet, ResourceType};

/// A message as a protobuf `Any` (typed configs inside resources).
pub(crate) fn any<M: prost::Message + prost::Name>(m: &M) -> envoy_types::pb::google::protobuf::Any {
    envoy_types::pb::google::protobuf::Any { type_url: M::type_url(), value: m.encode_to_vec() }
}

/// The loopback address outbound listeners bind to unless the proxy says otherwise.
pub const DEFAULT_OUTBOUND_BIND: &str = "127.0.0.1";

/// Everything about a proxy that its configuration depends on. Proxies with
/// equal scopes get identical resources (and share one translation).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ProxyScope {
    pub role: ProxyRole,
    pub cluster: String,
    pub namespace: String,
    pub network: String,
    pub labels: BTreeMap<String, String>,
    /// Address the outbound listeners bind to (`OUTBOUND_BIND` metadata).
    pub outbound_bind: String,
    /// The workload's identity and addresses, and where its application listens (inbound, mTLS).
    pub service_account: String,
    pub instance_ips: Vec<String>,
    pub app_address: String,
}

impl ProxyScope {
    pub fn of(node: &ProxyNode) -> ProxyScope {
        ProxyScope {
            role: node.role,
            cluster: node.cluster.clone(),
            namespace: node.namespace.clone(),
            network: node.network.clone(),
            labels: node.labels.clone(),
            outbound_bind: node.outbound_bind.clone().unwrap_or_else(|| DEFAULT_OUTBOUND_BIND.to_string()),
            service_account: node.service_account.clone(),
            instance_ips: node.instance_ips.clone(),
            app_address: node.app_address.clone().unwrap_or_else(|| DEFAULT_APP_ADDRESS.to_string()),
        }
    }

    pub fn sidecar(cluster: &str, namespace: &str, labels: &[(&str, &str)]) -> ProxyScope {
        ProxyScope {
            role: ProxyRole::Sidecar,
            cluster: cluster.into(),
            namespace: namespace.into(),
            network: String::new(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            outbound_bind: DEFAULT_OUTBOUND_BIND.into(),
            service_account: "default".into(),
            instance_ips: Vec::new(),
            app_address: DEFAULT_APP_ADDRESS.into(),
        }
    }
}

/// Where the application listens for traffic its sidecar accepted, unless the proxy says otherwise.
pub const DEFAULT_APP_ADDRESS: &str = "127.0.0.1";

/// The proxy's network: its own (`NETWORK` metadata), else its cluster's.
pub fn client_network<'a>(snapshot: &'a MeshSnapshot, scope: &'a ProxyScope) -> &'a str {
    if !scope.network.is_empty() {
        return &scope.network;
    }
    snapshot.clusters.get(&scope.cluster).map(|c| c.network.as_str()).unwrap_or("")
}

/// The trust shared by a client's cluster and a service's cluster: mTLS
/// between them is on when both belong to one VirtualMesh with a CA.
pub fn mtls_between<'a>(snapshot: &'a MeshSnapshot, client_cluster: &str, service_cluster: &str) -> Option<&'a MeshTrust> {
    let a = snapshot.trust.get(client_cluster)?;
    let b = snapshot.trust.get(service_cluster)?;
    (a == b).then_some(a)
}

/// A service as one proxy sees it.
#[derive(Debug, Clone)]
pub struct ServiceView<'a> {
    pub service: &'a Service,
    /// `name.ns.svc.cluster.local` or `name.ns.svc.<cluster>.global`.
    pub host: String,
    /// Whether the Kubernetes names (short, `name.ns`, …) lead here.
    pub aliases: bool,
}

/// An east-west gateway's own Service (labelled with its network): reached
/// by other networks' sidecars as EDS endpoints, not as a service to call.
pub fn is_network_gateway(svc: &Service) -> bool {
    svc.labels.get(crate::model::k8s::NETWORK_LABEL).is_some_and(|n| !n.is_empty())
}

/// The services a proxy in `scope.cluster` can reach, its own cluster first:
/// every service of its virtual mesh, or what its Sidecar imports. (A
/// policy's destinations outside that come with the routes that use them.)
pub fn reachable_services<'a>(snapshot: &'a MeshSnapshot, scope: &ProxyScope) -> Vec<ServiceView<'a>> {
    let mut views = mesh_services(snapshot, scope);
    if let Some(sidecar) = crate::model::sidecar::sidecar_for(&snapshot.sidecars, &scope.namespace, &scope.labels) {
        views.retain(|v| {
            // Its host as this proxy sees it, its `.global` host (the same
            // from every cluster: one Sidecar serves proxies in all of them),
            // and its Kubernetes name when that name leads here.
            let global = names::global_host(&v.service.key);
            let kubernetes_name = v.aliases.then(|| names::kubernetes_host(&v.service.key));
            let hosts: Vec<&str> = [Some(v.host.as_str()), Some(global.as_str()), kubernetes_name.as_deref()].into_iter().flatten().collect();
            sidecar.imports(&scope.namespace, &v.service.key.namespace, &hosts)
        });
    }
    views
}

/// Every service of the proxy's virtual mesh, its own cluster first.
fn mesh_services<'a>(snapshot: &'a MeshSnapshot, scope: &ProxyScope) -> Vec<ServiceView<'a>> {
    let peers = snapshot.peers_of(&scope.cluster);
    let mut views = Vec::new();
    let mut aliased: BTreeSet<(String, String)> = BTreeSet::new();
    if let Some(own) = snapshot.clusters.get(&scope.cluster) {
        for svc in own.services.values().filter(|s| !is_network_gateway(s)) {
            aliased.insert((svc.key.namespace.clone(), svc.key.name.clone()));
            views.push(ServiceView { service: svc, host: names::host(&scope.cluster, &svc.key), aliases: true });
        }
    }
    for peer in peers.iter().filter(|p| **p != scope.cluster) {
        let Some(state) = snapshot.clusters.get(peer) else { continue };
        for svc in state.services.values().filter(|s| !is_network_gateway(s)) {
            let aliases = aliased.insert((svc.key.namespace.clone(), svc.key.name.clone()));
            views.push(ServiceView { service: svc, host: names::host(&scope.cluster, &svc.key), aliases });
        }
    }
    views
}

/// One Envoy cluster a proxy needs: a service port, optionally narrowed to a subset.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClusterTarget {
    pub name: String,
    pub service: ServiceKey,
    pub port: u16,
    pub subset: BTreeMap<String, String>,
}

impl ClusterTarget {
    pub fn new(client_cluster: &str, service: &ServiceKey, port: u16, subset: &BTreeMap<String, String>) -> ClusterTarget {
        let name = names::outbound_cluster(port, &names::subset_name(subset), &names::host(client_cluster, service));
        ClusterTarget { name, service: service.clone(), port, subset: subset.clone() }
    }
}

/// Outlier detection per service, from policies that apply to every client.
fn outlier_by_service(snapshot: &MeshSnapshot) -> BTreeMap<ServiceKey, Outlier> {
    let mut out = BTreeMap::new();
    for p in &snapshot.applied {
        for r in &p.rules {
            if let Some(o) = &r.actions.outlier_detection {
                out.entry(r.service.clone()).or_insert_with(|| o.clone());
            }
        }
    }
    out
}

/// Translates everything a proxy needs except its certificates (SDS, added
/// by the provider): a sidecar's outbound side and, with mTLS, its inbound
/// side; a gateway's SNI passthrough.
pub fn translate(snapshot: &MeshSnapshot, scope: &ProxyScope) -> ResourceSet {
    if scope.role == ProxyRole::Gateway {
        return gateway::translate_gateway(snapshot, scope);
    }
    let mut set = ResourceSet::new();
    let views = reachable_services(snapshot, scope);
    let (route_configs, mut targets) = routes::route_configurations(snapshot, scope, &views);
    for v in &views {
        for p in &v.service.ports {
            let t = ClusterTarget::new(&scope.cluster, &v.service.key, p.port, &BTreeMap::new());
            targets.insert(t.name.clone(), t);
        }
    }
    let outliers = outlier_by_service(snapshot);
    for t in targets.values() {
        let trust = mtls_between(snapshot, &scope.cluster, &t.service.cluster);
        let sni = trust.map(|_| names::outbound_sni(t.port, &names::subset_name(&t.subset), &names::host(&t.service.cluster, &t.service)));
        let mtls = trust.zip(sni.as_deref()).map(|(tr, sni)| (sni, tr.trust_domain.as_str()));
        let cluster = clusters::eds_cluster(&t.name, outliers.get(&t.service), mtls);
        set.insert(ResourceType::Cluster, Resource::from_message(t.name.clone(), &cluster));
        let cla = endpoints::load_assignment(snapshot, t, scope);
        set.insert(ResourceType::Endpoint, Resource::from_message(t.name.clone(), &cla));
    }
    if snapshot.trust.contains_key(&scope.cluster) {
        for (address, port) in inbound::served_ports(snapshot, scope) {
            let l = inbound::inbound_listener(&address, port);
            set.insert(ResourceType::Listener, Resource::from_message(l.name.clone(), &l));
            let c = inbound::inbound_cluster(&scope.app_address, port);
            set.insert(ResourceType::Cluster, Resource::from_message(c.name.clone(), &c));
        }
    }
    let ports: BTreeSet<u16> = views.iter().flat_map(|v| v.service.ports.iter().map(|p| p.port)).collect();
    for port in ports {
        let l = listeners::outbound_http_listener(&scope.outbound_bind, port);
        set.insert(ResourceType::Listener, Resource::from_message(l.name.clone(), &l));
    }
    for rc in route_configs {
        set.insert(ResourceType::Route, Resource::from_message(rc.name.clone(), &rc));
    }
    set
}

/// Parses a cluster name this module produced back into its target, for a proxy in `client_cluster`.
pub fn parse_cluster_name(snapshot: &MeshSnapshot, client_cluster: &str, name: &str) -> Option<ClusterTarget> {
    let mut parts = name.splitn(4, '|');
    let (dir, port, subset, host) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if dir != "outbound" {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    let (name_ns, cluster) = if let Some(rest) = host.strip_suffix(".svc.cluster.local") {
        (rest, client_cluster.to_string())
    } else {
        let rest = host.strip_suffix(".global")?;
        let (name_ns, cluster) = rest.split_once(".svc.")?;
        (name_ns, cluster.to_string())
    };
    let (svc, ns) = name_ns.split_once('.')?;
    let service = ServiceKey::new(&cluster, ns, svc);
    // The subset's labels: find them among the policies (names are derived, not reversible in general).
    let subset_labels = if subset.is_empty() {
        BTreeMap::new()
    } else {
        snapshot
            .applied
            .iter()
            .flat_map(|p| p.rules.iter())
            .filter_map(|r| r.actions.traffic_shift.as_ref())
            .flatten()
            .find(|d| d.service == service && names::subset_name(&d.subset) == subset)
            .map(|d| d.subset.clone())?
    };
    Some(ClusterTarget { name: name.to_string(), service, port, subset: subset_labels })
}
