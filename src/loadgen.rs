//! A simulated Envoy for load tests (sans-IO): the ADS client side of the
//! protocol, SotW or delta. It subscribes like Envoy does — CDS (wildcard),
//! then EDS for the EDS clusters it got, then LDS (wildcard), then RDS for
//! the route configurations its listeners name — ACKs every response, or
//! NACKs its first listener response when told to.

use std::collections::BTreeSet;
use std::time::Instant;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter::ConfigType};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc::Status;
use prost::Message;

pub mod scan;
pub use scan::ScannedResponse;

use crate::xds::resources::ResourceType;
// Proxies of one scope get equal name sets: one copy (the load generator
// shares the machine; per-proxy copies of 3,100 names were gigabytes at 10,000).
use crate::xds::view::{NameSet, intern_names};

const TYPES: [ResourceType; 5] =
    [ResourceType::Cluster, ResourceType::Endpoint, ResourceType::Listener, ResourceType::Route, ResourceType::VirtualHost];

fn index(ty: ResourceType) -> Option<usize> {
    TYPES.iter().position(|t| *t == ty)
}

/// The EDS cluster names of a CDS response, interned. Proxies of one scope
/// receive the same clusters: the set is built once per distinct list (found
/// by a hash of the list's bytes) and shared. Building 3,100 names into a
/// fresh set per proxy had been a fifth of the load generator's CPU during a
/// sync — CPU taken from the control plane it measures on the same cores.
pub fn eds_cluster_names_of(names: &scan::EdsClusterNames) -> NameSet {
    use std::hash::Hasher;
    static SEEN: Recent<(u64, usize, usize), NameSet> = std::sync::OnceLock::new();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hasher.write(names.as_bytes());
    let key = (hasher.finish(), names.len(), names.as_bytes().len());
    recall(&SEEN, key, || intern_names(names.iter().map(|n| n.into_owned()).collect()))
}

/// Values the load generator's proxies share, by key, kept for the most recent keys.
type Recent<K, V> = std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<K, V>>>;

/// The value kept for `key`, else `make`'s, kept (at most 256: then all are dropped and kept afresh).
fn recall<K: std::hash::Hash + Eq, V: Clone>(recent: &Recent<K, V>, key: K, make: impl FnOnce() -> V) -> V {
    const KEPT: usize = 256;
    let recent = recent.get_or_init(Default::default);
    if let Some(value) = recent.lock().expect("recent values lock").get(&key) {
        return value.clone();
    }
    let value = make();
    let mut recent = recent.lock().expect("recent values lock");
    if recent.len() >= KEPT {
        recent.clear();
    }
    recent.insert(key, value.clone());
    value
}

/// Route configuration names the listeners' HTTP connection managers ask for over RDS.
pub fn rds_names<'a>(payloads: impl Iterator<Item = &'a [u8]>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for l in payloads.filter_map(|p| Listener::decode(p).ok()) {
        for f in l.filter_chains.iter().flat_map(|c| c.filters.iter()) {
            if let Some(ConfigType::TypedConfig(any)) = &f.config_type
                && let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice())
                && let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier
            {
                out.insert(rds.route_config_name);
            }
        }
    }
    out
}

/// A request to send. A subscription to a shared name set carries that set's
/// names encoded once for every proxy that subscribes to it, sent after the
/// message's own fields (a repeated field's entries may come anywhere in a
/// message). Cloning 3,100 names into every proxy's EDS subscription — and
/// into every SotW EDS ACK — and encoding them had been a tenth of the load
/// generator's CPU.
#[derive(Debug, Clone)]
pub struct Outgoing<M> {
    pub message: M,
    pub shared_names: Option<Bytes>,
}

impl<M: Message + Default> Outgoing<M> {
    pub fn own(message: M) -> Self {
        Outgoing { message, shared_names: None }
    }

    /// `message` and the names of `set` as its repeated string field `field`.
    fn naming(message: M, set: &NameSet, field: u32) -> Self {
        Outgoing { message, shared_names: (!set.is_empty()).then(|| encoded_names(set, field)) }
    }

    /// The gRPC message as HTTP/2 data: its 5-byte prefix and own fields, then the shared names (not copied).
    pub fn frames(&self) -> impl Iterator<Item = Bytes> + use<M> {
        use bytes::BufMut;
        let shared = self.shared_names.clone().unwrap_or_default();
        let own = self.message.encoded_len();
        let mut head = bytes::BytesMut::with_capacity(5 + own);
        head.put_u8(0);
        head.put_u32((own + shared.len()) as u32);
        self.message.encode(&mut head).expect("capacity reserved");
        [head.freeze(), shared].into_iter().filter(|b| !b.is_empty())
    }

    /// The message as the server reads it (own fields and shared names).
    pub fn to_message(&self) -> M {
        let bytes: Vec<u8> = self.frames().flat_map(|b| b.to_vec()).skip(5).collect();
        M::decode(bytes.as_slice()).expect("a request we encoded")
    }
}

/// The names of `set` encoded as the repeated string field `field`, once per
/// set and field (kept for the most recent sets).
fn encoded_names(set: &NameSet, field: u32) -> Bytes {
    static ENCODED: Recent<(usize, u32), (NameSet, Bytes)> = std::sync::OnceLock::new();
    // (The set is kept with its encoding, so its address is not reused while the entry lives.)
    let key = (std::sync::Arc::as_ptr(set) as usize, field);
    let (_, bytes) = recall(&ENCODED, key, || {
        let mut buf = Vec::new();
        for name in set.iter() {
            prost::encoding::string::encode(field, name, &mut buf);
        }
        (set.clone(), Bytes::from(buf))
    });
    bytes
}

/// `DiscoveryRequest.resource_names`.
const SOTW_RESOURCE_NAMES: u32 = 3;
/// `DeltaDiscoveryRequest.resource_names_subscribe`.
const DELTA_SUBSCRIBE: u32 = 3;

/// What one simulated proxy knows.
#[derive(Debug)]
pub struct SimulatedProxy {
    pub node: Node,
    /// NACK the first listener response (then ACK later ones).
    pub nack_listeners: bool,
    /// Per type of `TYPES`; VHDS counts as ACKed until a delta stream subscribes to it.
    acked: [bool; 5],
    nacked_once: bool,
    requested: [bool; 5],
    eds_names: NameSet,
    rds_names: NameSet,
    pub synced_at: Option<Instant>,
    pub responses: u64,
    pub bytes: u64,
    pub rejects: u64,
}

impl SimulatedProxy {
    pub fn new(node: Node, nack_listeners: bool) -> Self {
        SimulatedProxy {
            node,
            nack_listeners,
            acked: [false, false, false, false, true],
            nacked_once: false,
            requested: [false; 5],
            eds_names: Default::default(),
            rds_names: Default::default(),
            synced_at: None,
            responses: 0,
            bytes: 0,
            rejects: 0,
        }
    }

    pub fn synced(&self) -> bool {
        self.acked.iter().all(|a| *a)
    }

    fn note(&mut self, ty: ResourceType, acked: bool, now: Instant) {
        if let Some(i) = index(ty) {
            self.acked[i] |= acked;
        }
        if self.synced_at.is_none() && self.synced() {
            self.synced_at = Some(now);
        }
    }

    /// Counts a response and decides its ACK or NACK; `None` for a type it does not know.
    fn receive(&mut self, type_url: &str, len: usize, now: Instant) -> Option<(ResourceType, bool)> {
        self.responses += 1;
        self.bytes += len as u64;
        let ty = ResourceType::from_type_url(type_url)?;
        let nack = ty == ResourceType::Listener && self.nack_listeners && !self.nacked_once;
        if nack {
            self.nacked_once = true;
            self.rejects += 1;
        }
        self.note(ty, !nack, now);
        Some((ty, nack))
    }

    // ---- state of the world ----

    /// The first request on the stream.
    pub fn sotw_start(&mut self) -> DiscoveryRequest {
        self.requested[0] = true;
        DiscoveryRequest { node: Some(self.node.clone()), type_url: ResourceType::Cluster.type_url().into(), ..Default::default() }
    }

    /// The requests a response causes: its ACK (or NACK), then new subscriptions.
    pub fn sotw_on_response(&mut self, r: &ScannedResponse, now: Instant) -> Vec<Outgoing<DiscoveryRequest>> {
        let Some((ty, nack)) = self.receive(&r.type_url, r.encoded_len, now) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let names = match ty {
            ResourceType::Endpoint => Some(&self.eds_names),
            ResourceType::Route => Some(&self.rds_names),
            _ => None,
        };
        let ack = DiscoveryRequest {
            version_info: if nack { String::new() } else { r.version_info.clone() },
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: nack.then(|| Status { code: 3, message: "simulated rejection".into(), ..Default::default() }),
            ..Default::default()
        };
        let naming = |message: DiscoveryRequest, names: Option<&NameSet>| match names {
            Some(names) => Outgoing::naming(message, names, SOTW_RESOURCE_NAMES),
            None => Outgoing::own(message),
        };
        out.push(naming(ack, names));
        let subscribe =
            |ty: ResourceType, names: Option<&NameSet>| naming(DiscoveryRequest { type_url: ty.type_url().into(), ..Default::default() }, names);
        match ty {
            ResourceType::Cluster => {
                let eds = eds_cluster_names_of(&r.eds_clusters);
                if !std::sync::Arc::ptr_eq(&self.eds_names, &eds) || !self.requested[1] {
                    self.eds_names = eds;
                    self.requested[1] = true;
                    out.push(subscribe(ResourceType::Endpoint, Some(&self.eds_names)));
                }
            }
            ResourceType::Endpoint if !self.requested[2] => {
                self.requested[2] = true;
                out.push(subscribe(ResourceType::Listener, None));
            }
            ResourceType::Listener => {
                let rds = rds_names(r.listeners.iter().map(|p| &p[..]));
                if *self.rds_names != rds || !self.requested[3] {
                    self.rds_names = intern_names(rds);
                    self.requested[3] = true;
                    out.push(subscribe(ResourceType::Route, Some(&self.rds_names)));
                }
            }
            _ => {}
        }
        out
    }

    // ---- delta ----

    pub fn delta_start(&mut self) -> DeltaDiscoveryRequest {
        self.requested[0] = true;
        DeltaDiscoveryRequest { node: Some(self.node.clone()), type_url: ResourceType::Cluster.type_url().into(), ..Default::default() }
    }

    pub fn delta_on_response(&mut self, r: &ScannedResponse, now: Instant) -> Vec<Outgoing<DeltaDiscoveryRequest>> {
        // Route configurations with `vhds` (meshpilot's over delta ADS): Envoy
        // subscribes to their virtual hosts, and is not synced until they come.
        // Without (istiod's), there is no VHDS to wait for.
        if r.routes_with_vhds && !self.requested[4] && ResourceType::from_type_url(&r.type_url) == Some(ResourceType::Route) {
            self.acked[4] = false;
        }
        let Some((ty, nack)) = self.receive(&r.type_url, r.encoded_len, now) else {
            return Vec::new();
        };
        let mut out = vec![Outgoing::own(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: nack.then(|| Status { code: 3, message: "simulated rejection".into(), ..Default::default() }),
            ..Default::default()
        })];
        match ty {
            ResourceType::Cluster if self.eds_names.is_empty() && !self.requested[1] => {
                // The first clusters (the usual case): the shared set as it
                // is, and its shared encoding.
                self.eds_names = eds_cluster_names_of(&r.eds_clusters);
                self.requested[1] = true;
                let message = DeltaDiscoveryRequest { type_url: ResourceType::Endpoint.type_url().into(), ..Default::default() };
                out.push(Outgoing::naming(message, &self.eds_names, DELTA_SUBSCRIBE));
            }
            ResourceType::Cluster => {
                let eds = eds_cluster_names_of(&r.eds_clusters);
                let new: Vec<String> = if std::sync::Arc::ptr_eq(&self.eds_names, &eds) {
                    Vec::new()
                } else {
                    eds.iter().filter(|n| !self.eds_names.contains(*n)).cloned().collect()
                };
                let gone: Vec<String> = r.removed_resources.iter().filter(|n| self.eds_names.contains(*n)).cloned().collect();
                if self.eds_names.is_empty() && gone.is_empty() {
                    self.eds_names = eds;
                } else if !new.is_empty() || !gone.is_empty() {
                    let mut names = (*self.eds_names).clone();
                    for n in &gone {
                        names.remove(n);
                    }
                    names.extend(new.iter().cloned());
                    self.eds_names = intern_names(names);
                }
                if !new.is_empty() || !gone.is_empty() || !self.requested[1] {
                    self.requested[1] = true;
                    out.push(Outgoing::own(DeltaDiscoveryRequest {
                        type_url: ResourceType::Endpoint.type_url().into(),
                        resource_names_subscribe: new,
                        resource_names_unsubscribe: gone,
                        ..Default::default()
                    }));
                }
            }
            ResourceType::Endpoint if !self.requested[2] => {
                self.requested[2] = true;
                out.push(Outgoing::own(DeltaDiscoveryRequest { type_url: ResourceType::Listener.type_url().into(), ..Default::default() }));
            }
            ResourceType::Listener => {
                let new: Vec<String> = rds_names(r.listeners.iter().map(|p| &p[..])).into_iter().filter(|n| !self.rds_names.contains(n)).collect();
                if !new.is_empty() {
                    let mut names = (*self.rds_names).clone();
                    names.extend(new.iter().cloned());
                    self.rds_names = intern_names(names);
                }
                if !new.is_empty() || !self.requested[3] {
                    self.requested[3] = true;
                    out.push(Outgoing::own(DeltaDiscoveryRequest {
                        type_url: ResourceType::Route.type_url().into(),
                        resource_names_subscribe: new.clone(),
                        ..Default::default()
                    }));
                }
                if self.requested[4] && !new.is_empty() {
                    out.push(Outgoing::own(DeltaDiscoveryRequest {
                        type_url: ResourceType::VirtualHost.type_url().into(),
                        resource_names_subscribe: new,
                        ..Default::default()
                    }));
                }
            }
            ResourceType::Route if !self.requested[4] && r.routes_with_vhds => {
                // Envoy subscribes to a `vhds` configuration's virtual hosts by its name.
                self.requested[4] = true;
                out.push(Outgoing::own(DeltaDiscoveryRequest {
                    type_url: ResourceType::VirtualHost.type_url().into(),
                    resource_names_subscribe: self.rds_names.iter().cloned().collect(),
                    ..Default::default()
                }));
            }
            _ => {}
        }
        out
    }
}

/// Percentiles (p50, p90, p99, max) of `values` in place.
pub fn percentiles(values: &mut [f64]) -> Option<(f64, f64, f64, f64)> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| values[((values.len() as f64 - 1.0) * q).round() as usize];
    Some((at(0.50), at(0.90), at(0.99), values[values.len() - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::{ProxyScope, translate};
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use std::sync::Arc;

    fn response(ty: ResourceType, set: &crate::xds::resources::ResourceSet, nonce: &str) -> ScannedResponse {
        view(&DiscoveryResponse {
            version_info: format!("v-{nonce}"),
            resources: set.of_type(ty).values().map(|r| r.body()).collect(),
            type_url: ty.type_url().into(),
            nonce: nonce.into(),
            ..Default::default()
        })
    }

    /// The seed example's productpage sidecar configuration.
    fn productpage_sidecar() -> crate::xds::resources::ResourceSet {
        let snapshot = crate::cli::mesh::offline_snapshot(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/bookinfo"))).unwrap();
        translate(&snapshot, &ProxyScope::sidecar("management-plane", "default", &[("app", "productpage")]))
    }

    /// What the load generator reads from the wire.
    fn view(r: &DiscoveryResponse) -> ScannedResponse {
        scan::scan_all(scan::Flavor::Sotw, b"10.200.", &scan::grpc_framed(r)).unwrap().remove(0)
    }

    #[test]
    fn subscribes_like_envoy_and_acks_everything() {
        let set = productpage_sidecar();
        let now = Instant::now();
        let mut p = SimulatedProxy::new(Node { id: "p".into(), ..Default::default() }, false);
        assert_eq!(p.sotw_start().type_url, ResourceType::Cluster.type_url());
        let reqs = p.sotw_on_response(&response(ResourceType::Cluster, &set, "1"), now);
        assert_eq!(reqs.len(), 2, "ACK + EDS subscription");
        assert_eq!(reqs[0].message.response_nonce, "1");
        assert_eq!(reqs[1].to_message().resource_names.len(), set.of_type(ResourceType::Endpoint).len());
        let reqs = p.sotw_on_response(&response(ResourceType::Endpoint, &set, "2"), now);
        assert_eq!(reqs[1].message.type_url, ResourceType::Listener.type_url(), "LDS after the clusters warmed");
        let reqs = p.sotw_on_response(&response(ResourceType::Listener, &set, "3"), now);
        assert_eq!(reqs[1].to_message().resource_names, ["9080"], "RDS for the listener's route config");
        assert!(!p.synced());
        p.sotw_on_response(&response(ResourceType::Route, &set, "4"), now);
        assert!(p.synced() && p.synced_at == Some(now));
    }

    #[test]
    fn proxies_given_the_same_clusters_share_one_name_set_and_subscribe_to_what_is_new() {
        use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource as DeltaResource};
        let set = productpage_sidecar();
        let clusters: Vec<_> = set.of_type(ResourceType::Cluster).values().collect();
        let delta_response = |clusters: &[&Arc<crate::xds::resources::Resource>], nonce: &str| {
            let r = DeltaDiscoveryResponse {
                resources: clusters
                    .iter()
                    .map(|c| DeltaResource { name: c.name.clone(), version: "1".into(), resource: Some(c.body()), ..Default::default() })
                    .collect(),
                type_url: ResourceType::Cluster.type_url().into(),
                nonce: nonce.into(),
                ..Default::default()
            };
            scan::scan_all(scan::Flavor::Delta, b"10.200.", &scan::grpc_framed(&r)).unwrap().remove(0)
        };
        let now = Instant::now();
        let mut proxies: Vec<SimulatedProxy> =
            (0..2).map(|i| SimulatedProxy::new(Node { id: format!("p{i}"), ..Default::default() }, false)).collect();
        let (last, first) = clusters.split_last().unwrap();
        let mut encoded_names = Vec::new();
        for p in &mut proxies {
            p.delta_start();
            let reqs = p.delta_on_response(&delta_response(first, "1"), now);
            assert_eq!(reqs.len(), 2, "ACK + EDS subscription");
            assert_eq!(reqs[1].to_message().resource_names_subscribe.len(), first.len());
            encoded_names.push(reqs[1].shared_names.clone().unwrap());
        }
        assert!(Arc::ptr_eq(&proxies[0].eds_names, &proxies[1].eds_names), "one shared name set");
        assert_eq!(encoded_names[0].as_ptr(), encoded_names[1].as_ptr(), "its names encoded once");
        let reqs = proxies[0].delta_on_response(&delta_response(&[*last], "2"), now);
        assert_eq!(reqs[1].to_message().resource_names_subscribe, std::slice::from_ref(&last.name), "only the new cluster");
        assert_eq!(proxies[0].eds_names.len(), clusters.len());
        let reqs = proxies[0].delta_on_response(&delta_response(&[*last], "3"), now);
        assert_eq!(reqs.len(), 1, "an update of a known cluster is only ACKed");
    }

    #[test]
    fn a_nacking_proxy_rejects_its_first_listeners() {
        let now = Instant::now();
        let mut p = SimulatedProxy::new(Node { id: "p".into(), ..Default::default() }, true);
        let r = DiscoveryResponse {
            type_url: ResourceType::Listener.type_url().into(),
            nonce: "1".into(),
            version_info: "v1".into(),
            ..Default::default()
        };
        let reqs = p.sotw_on_response(&view(&r), now);
        assert!(reqs[0].message.error_detail.is_some() && reqs[0].message.version_info.is_empty());
        let reqs = p.sotw_on_response(&view(&DiscoveryResponse { nonce: "2".into(), ..r }), now);
        assert!(reqs[0].message.error_detail.is_none());
        assert_eq!(p.rejects, 1);
    }

    #[test]
    fn percentiles_of_latencies() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentiles(&mut v), Some((51.0, 90.0, 99.0, 100.0)));
        assert_eq!(percentiles(&mut []), None);
    }
}
