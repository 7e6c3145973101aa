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
//! - captured (Istio's `REDIRECT`/`TPROXY`, the default): `virtualOutbound`
//!   on 15001, `0.0.0.0_<port>` HTTP listeners, per-destination TCP/TLS
//!   listeners, Passthrough/BlackHole, `virtualInbound` on 15006 (`outbound.rs`,
//!   `inbound.rs`); explicit (`NONE`): one loopback HTTP listener per port;
//! - RDS named by port, a virtual host per HTTP service and port, an EDS
//!   cluster per service port and per subset a policy names (a headless
//!   service of the proxy's own cluster: its original destination).
//!   TrafficPolicies on a service shape its routes (or its `tcp_proxy`) for
//!   every client in every cluster that reaches it.

pub mod built;
pub mod clusters;
pub mod endpoints;
pub mod gateway;
pub mod inbound;
pub mod listeners;
pub mod memo;
pub mod names;
pub mod outbound;
pub mod patch;
pub mod proto;
pub mod rbac;
pub mod routes;
pub mod tls;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Serialize;

use crate::model::policy::Outlier;
use crate::model::proxy::{InterceptionMode, ProxyRole};
use crate::model::{MeshSnapshot, MeshTrust, Service, ServiceKey};
use crate::xds::resources::{Resource, ResourceSet, ResourceType};
pub(crate) use proto::any;

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
    /// The proxy's labels (shared with its `ProxyNode` until resolution
    /// narrows them).
    pub labels: Arc<BTreeMap<String, String>>,
    /// How its traffic reaches it: captured by iptables, or sent to `outbound_bind`.
    pub interception: InterceptionMode,
    /// Address the outbound listeners bind to (`OUTBOUND_BIND` metadata; explicit layout only).
    pub outbound_bind: String,
    /// The workload's identity and addresses, and where its application listens (inbound, mTLS).
    pub service_account: String,
    pub instance_ips: Vec<String>,
    pub app_address: String,
    /// A captured sidecar's served ports and protocols, resolved from its
    /// `INSTANCE_IPS` by [`ProxyScope::resolved`] (which then drops the
    /// addresses): replicas serving the same ports share one translation.
    pub served: BTreeMap<u16, crate::model::protocol::Protocol>,
    /// Its stream is delta ADS: each route configuration's virtual hosts go
    /// as VHDS resources of their own, so a change to one service's routes
    /// sends that service's virtual host, not the port's whole configuration.
    pub vhds: bool,
    /// Where its Envoy gets its SDS secrets (Istio's agent, or ADS).
    pub secret_source: tls::SecretSource,
    /// Whether the provider adds its certificate and key (ADS, a proven stream).
    pub send_secrets: bool,
    /// What a captured sidecar's inbound side allows when its cluster enforces
    /// access control, resolved from its `INSTANCE_IPS` with `served`.
    pub access: Option<Arc<crate::model::access::InboundAccess>>,
}

impl ProxyScope {
    /// A sidecar of the explicit layout (`INTERCEPTION_MODE: NONE`, loopback listeners).
    pub fn sidecar(cluster: &str, namespace: &str, labels: &[(&str, &str)]) -> ProxyScope {
        ProxyScope {
            role: ProxyRole::Sidecar,
            cluster: cluster.into(),
            namespace: namespace.into(),
            network: String::new(),
            labels: Arc::new(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            interception: InterceptionMode::None,
            outbound_bind: DEFAULT_OUTBOUND_BIND.into(),
            service_account: "default".into(),
            instance_ips: Vec::new(),
            app_address: DEFAULT_APP_ADDRESS.into(),
            served: BTreeMap::new(),
            vhds: false,
            secret_source: tls::SecretSource::Ads,
            send_secrets: true,
            access: None,
        }
    }

    /// The scope with what decides its resources only: labels narrowed to the
    /// (key, value) pairs some policy or Sidecar selects on, and — for a captured sidecar, whose
    /// inbound side depends on the ports its workload serves, not on where —
    /// its addresses replaced by those ports. (Each Istio-style proxy's own
    /// `INSTANCE_IPS` had made it a scope of its own: a full translation per
    /// proxy at sync and on every change.)
    pub fn resolved(mut self, snapshot: &MeshSnapshot) -> ProxyScope {
        let selected = |k: &String, v: &String| snapshot.source_labels.get(k).is_some_and(|values| values.contains(v));
        // (Copied only when some label goes: usually the proxy's own map is kept, shared.)
        if !self.labels.iter().all(|(k, v)| selected(k, v)) {
            Arc::make_mut(&mut self.labels).retain(|k, v| selected(k, v));
        }
        if self.role == ProxyRole::Sidecar && self.interception.captured() && !self.instance_ips.is_empty() {
            self.served = inbound::served_protocols(snapshot, &self);
            self.access = inbound::served_access(snapshot, &self);
            self.instance_ips.clear();
        }
        self
    }
}

impl ProxyScope {
    /// A sidecar of an Istio-injected pod (iptables `REDIRECT`) at `instance_ip`.
    pub fn captured_sidecar(cluster: &str, namespace: &str, labels: &[(&str, &str)], service_account: &str, instance_ip: &str) -> ProxyScope {
        ProxyScope {
            interception: InterceptionMode::Redirect,
            service_account: service_account.into(),
            instance_ips: vec![instance_ip.into()],
            ..ProxyScope::sidecar(cluster, namespace, labels)
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

/// The service cluster's trust, when it shares one with the client's:
/// mTLS between them is on when both belong to one VirtualMesh with a CA
/// (their trust domains may differ; the service's names its identities).
pub fn mtls_between<'a>(snapshot: &'a MeshSnapshot, client_cluster: &str, service_cluster: &str) -> Option<&'a MeshTrust> {
    let a = snapshot.trust.get(client_cluster)?;
    let b = snapshot.trust.get(service_cluster)?;
    (a.virtual_mesh == b.virtual_mesh && a.ca == b.ca).then_some(b)
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
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

/// What a captured proxy does with destinations outside the mesh: its Sidecar's
/// `outboundTrafficPolicy.mode`, Istio's `ALLOW_ANY` by default.
pub fn unmatched_policy(snapshot: &MeshSnapshot, scope: &ProxyScope) -> routes::Unmatched {
    match crate::model::sidecar::sidecar_for(&snapshot.sidecars, &scope.namespace, &scope.labels) {
        Some(s) if s.registry_only => routes::Unmatched::RegistryOnly,
        _ => routes::Unmatched::AllowAny,
    }
}

/// The Envoy cluster of one target: EDS (mTLS to `tlsMode: istio`
/// endpoints when client and service share a CA), or, for a headless
/// service of the client's own cluster, its original destination (a client
/// dials the pod it means); HTTP/2 kept for `http2`/`grpc` ports.
fn target_cluster(snapshot: &MeshSnapshot, scope: &ProxyScope, key: &memo::ClusterKey) -> envoy_types::pb::envoy::config::cluster::v3::Cluster {
    let t = &key.target;
    let service = snapshot.service(&t.service);
    let trust = mtls_between(snapshot, &scope.cluster, &t.service.cluster);
    let sni = trust.map(|_| names::outbound_sni(t.port, &names::subset_name(&t.subset), &names::host(&t.service.cluster, &t.service)));
    let identities = key.identities.as_ref().map(|ids| ids.as_slice()).unwrap_or_default();
    let mtls = trust.zip(sni.as_deref()).map(|(tr, sni)| tls::OutboundMtls {
        sni,
        trust_domain: &tr.trust_domain,
        identities,
        secrets: scope.secret_source,
    });
    let headless_here = service.is_some_and(|s| s.headless) && t.service.cluster == scope.cluster && scope.interception.captured();
    let cluster = if headless_here {
        let mut c = clusters::original_dst_cluster(&t.name, None);
        // No endpoint metadata to match on: the pods of a mesh with a CA get mTLS outright.
        if let Some(mtls) = mtls {
            c.transport_socket = tls::outbound_socket_matches(mtls).into_iter().next().and_then(|m| m.transport_socket);
        }
        c
    } else {
        clusters::eds_cluster(&t.name, key.outlier.as_ref(), mtls)
    };
    let http2 = service.and_then(|s| s.port(t.port)).is_some_and(|p| p.protocol.http2_upstream());
    if http2 { clusters::with_http2(cluster) } else { cluster }
}

/// Translates everything a proxy needs except its certificates (SDS, added
/// by the provider): a sidecar's outbound side and its inbound side
/// (captured: always; explicit: with mTLS); a gateway's SNI passthrough.
pub fn translate(snapshot: &MeshSnapshot, scope: &ProxyScope) -> ResourceSet {
    translate_with(snapshot, scope, &memo::Memo::none())
}

/// [`translate`], taking the virtual hosts, clusters and endpoint
/// assignments built alike before from `memo` (the same resources, fewer built).
pub fn translate_with(snapshot: &MeshSnapshot, scope: &ProxyScope, memo: &memo::Memo<'_>) -> ResourceSet {
    if scope.role == ProxyRole::Gateway {
        return gateway::translate_gateway(snapshot, scope);
    }
    let mut set = ResourceSet::new();
    let captured = scope.interception.captured();
    let unmatched = unmatched_policy(snapshot, scope);
    let views = reachable_services(snapshot, scope);
    let (route_configs, mut targets) = routes::route_configurations(snapshot, scope, &views, captured.then_some(unmatched), memo);
    for t in own_targets(scope, &views) {
        targets.insert(t.name.clone(), t);
    }
    let mut listeners = Vec::new();
    if captured {
        listeners = outbound::captured_listeners(snapshot, scope, &views, unmatched, &mut targets);
        for c in [
            clusters::original_dst_cluster(clusters::PASSTHROUGH_CLUSTER, None),
            clusters::blackhole_cluster(),
            inbound::inbound_passthrough_cluster(),
        ] {
            set.insert(ResourceType::Cluster, Resource::from_message(c.name.clone(), &c));
        }
        let served = inbound::served_protocols(snapshot, scope);
        let mtls = snapshot.trust.contains_key(&scope.cluster).then_some(scope.secret_source);
        let access = inbound::served_access(snapshot, scope);
        listeners.push(inbound::virtual_inbound(&served, mtls, scope.interception == InterceptionMode::Tproxy, access.as_deref()));
        for (port, protocol) in served.iter().filter(|(_, p)| p.layout() != crate::model::protocol::Layout::None) {
            let c = inbound::captured_inbound_cluster(*port, *protocol);
            set.insert(ResourceType::Cluster, Resource::from_message(c.name.clone(), &c));
        }
    } else {
        // Explicit: a loopback listener per HTTP port (TCP needs capture: no destination address to tell services apart).
        let ports: BTreeSet<u16> = route_configs.iter().map(|r| r.port).collect();
        listeners.extend(ports.into_iter().map(|port| listeners::outbound_http_listener(&scope.outbound_bind, port)));
        if snapshot.trust.contains_key(&scope.cluster) {
            for (address, port) in inbound::served_ports(snapshot, scope) {
                let access = crate::model::access::inbound_access(snapshot, &scope.cluster, std::slice::from_ref(&address));
                let grants = inbound::port_grants(access.as_deref(), port);
                listeners.push(inbound::inbound_listener(&address, port, scope.secret_source, grants));
                let c = inbound::inbound_cluster(&scope.app_address, port);
                set.insert(ResourceType::Cluster, Resource::from_message(c.name.clone(), &c));
            }
        }
    }
    let outliers = outlier_by_service(snapshot);
    let seed = memo.endpoint_seed(&scope.cluster, client_network(snapshot, scope));
    for t in targets.into_values() {
        insert_target(&mut set, snapshot, scope, t, &outliers, (memo, seed));
    }
    for l in listeners {
        set.insert(ResourceType::Listener, Resource::from_message(l.name.clone(), &l));
    }
    for routes in route_configs {
        let rc = routes.configuration(scope.vhds);
        set.insert(ResourceType::Route, Resource::from_message(rc.name.clone(), &rc));
        if scope.vhds {
            for vh in routes.virtual_host_resources() {
                set.insert_shared(ResourceType::VirtualHost, vh);
            }
        }
    }
    set
}

/// Every seen service port's own cluster (`outbound|<port>||<host>`), whatever routes there.
fn own_targets<'a>(scope: &'a ProxyScope, views: &'a [ServiceView<'_>]) -> impl Iterator<Item = ClusterTarget> + 'a {
    views.iter().flat_map(move |v| {
        let ports = v.service.ports.iter().filter(|p| p.protocol.layout() != crate::model::protocol::Layout::None);
        ports.map(move |p| ClusterTarget::new(&scope.cluster, &v.service.key, p.port, &BTreeMap::new()))
    })
}

/// Adds target `t`'s Envoy cluster, and its endpoint assignment when it reads EDS.
fn insert_target(
    set: &mut ResourceSet,
    snapshot: &MeshSnapshot,
    scope: &ProxyScope,
    t: ClusterTarget,
    outliers: &BTreeMap<ServiceKey, Outlier>,
    (memo, seed): (&memo::Memo<'_>, Option<&std::collections::HashMap<String, std::sync::Arc<Resource>>>),
) {
    let captured = scope.interception.captured();
    let key = memo::ClusterKey {
        client_cluster: scope.cluster.clone(),
        captured,
        secrets: scope.secret_source,
        outlier: outliers.get(&t.service).cloned(),
        identities: snapshot.service_identities(&t.service).cloned(),
        target: t,
    };
    let (cluster, eds) = memo.cluster(&key, || {
        let cluster = target_cluster(snapshot, scope, &key);
        (std::sync::Arc::new(Resource::from_message(key.target.name.clone(), &cluster)), cluster.eds_cluster_config.is_some())
    });
    let t = key.target;
    if eds {
        let cla = memo.endpoints(seed, &t, || Resource::from_message(t.name.clone(), &endpoints::load_assignment(snapshot, &t, scope)));
        set.insert_shared(ResourceType::Endpoint, cla);
    }
    set.insert_shared(ResourceType::Cluster, cluster);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_keeps_only_the_label_values_some_selector_asks_for() {
        let mut snapshot = MeshSnapshot::default();
        snapshot.source_labels.insert("app".into(), ["productpage".to_string()].into());
        let resolved = |app: &str| ProxyScope::sidecar("c", "default", &[("app", app), ("version", "v1")]).resolved(&snapshot).labels;
        assert_eq!(*resolved("productpage"), BTreeMap::from([("app".to_string(), "productpage".to_string())]));
        // Any other app matches no selector either way: one scope for all of them.
        assert!(resolved("details").is_empty() && resolved("svc-0999").is_empty());
        // Nothing to drop: the proxy's own map is kept, not copied.
        let scope = ProxyScope::sidecar("c", "default", &[("app", "productpage")]);
        let labels = scope.labels.clone();
        assert!(Arc::ptr_eq(&scope.resolved(&snapshot).labels, &labels));
    }
}
