//! Typed xDS resources as the server hands them out: name, stable version and
//! encoded body, grouped per resource type.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use serde::Serialize;
use sha2::{Digest, Sha256};

use bytes::Bytes;

use super::codec;
use super::view::{NameSet, ResourceView, ViewCache, ViewKey};

/// The xDS resource types meshpilot serves, in make-before-break push order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ResourceType {
    Cluster,
    Endpoint,
    Listener,
    Route,
    /// VHDS: a route configuration's virtual hosts one by one, named
    /// `<route configuration>/<host>`, over delta ADS only (Envoy subscribes
    /// by the route configuration's name and gets every host under it).
    VirtualHost,
    Secret,
}

impl ResourceType {
    /// CDS → EDS → LDS → RDS → VHDS → SDS: the order of every push on ADS.
    pub const PUSH_ORDER: [ResourceType; 6] =
        [ResourceType::Cluster, ResourceType::Endpoint, ResourceType::Listener, ResourceType::Route, ResourceType::VirtualHost, ResourceType::Secret];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoint => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            ResourceType::VirtualHost => "type.googleapis.com/envoy.config.route.v3.VirtualHost",
            ResourceType::Secret => "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::PUSH_ORDER.into_iter().find(|t| t.type_url() == url)
    }

    /// The short name operators know from `istioctl proxy-status`.
    pub fn short_name(self) -> &'static str {
        match self {
            ResourceType::Cluster => "CDS",
            ResourceType::Endpoint => "EDS",
            ResourceType::Listener => "LDS",
            ResourceType::Route => "RDS",
            ResourceType::VirtualHost => "VHDS",
            ResourceType::Secret => "SDS",
        }
    }

    /// LDS and CDS responses carry the full state in SotW: an absent resource is deleted.
    pub fn requires_full_state(self) -> bool {
        matches!(self, ResourceType::Cluster | ResourceType::Listener)
    }

    /// Subscribed to by namespace (Envoy's `use_namespace_matching`): the
    /// name `X` stands for every resource named `X/<anything>`.
    pub fn namespaced(self) -> bool {
        self == ResourceType::VirtualHost
    }

    /// True when an explicit subscription to `names` covers the resource
    /// `name`: by its name, or for a namespaced type by its namespace.
    pub fn subscription_covers(self, names: &std::collections::BTreeSet<String>, name: &str) -> bool {
        names.contains(name) || (self.namespaced() && names.contains(namespace_of(name)))
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for ResourceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.short_name())
    }
}

/// One named resource, encoded once and shared (`Arc`) by every proxy that gets it.
#[derive(Clone, PartialEq)]
pub struct Resource {
    pub name: String,
    /// Content hash, stable across restarts (see [`codec::canonical_hash`]).
    pub version: String,
    /// The `google.protobuf.Any` holding the resource, encoded (what goes on the wire).
    encoded: Bytes,
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resource").field("name", &self.name).field("version", &self.version).field("bytes", &self.encoded.len()).finish()
    }
}

impl Resource {
    pub fn from_any(name: impl Into<String>, body: Any) -> Self {
        let version = codec::canonical_hash(&body);
        Resource { name: name.into(), version, encoded: Bytes::from(body.encode_to_vec()) }
    }

    pub fn from_message<M: Message + Name>(name: impl Into<String>, msg: &M) -> Self {
        Self::from_any(name, Any { type_url: M::type_url(), value: msg.encode_to_vec() })
    }

    /// The resource as an `Any` (decoded from its encoding: for dumps and tests, not the hot path).
    pub fn body(&self) -> Any {
        Any::decode(self.encoded.clone()).expect("a resource's encoding is an Any we encoded")
    }

    /// The encoded `Any`, shared.
    pub fn encoded_any(&self) -> &Bytes {
        &self.encoded
    }
}

type ByName = BTreeMap<String, Arc<Resource>>;

/// Everything one proxy should have, per type, by name. Each type's map is
/// shared between copies until one of them changes it, and the views streams
/// take of it ([`ResourceSet::view`]) are computed once per set.
#[derive(Debug, Default, Clone)]
pub struct ResourceSet {
    by_type: [Arc<TypeMap>; 6],
}

/// One type's resources by name, and the views taken of them. Sets whose
/// maps are equal can share one `TypeMap` ([`ResourceInterner`]), and so share
/// the views (and their encodings) too.
#[derive(Debug, Default, Clone)]
struct TypeMap {
    by_name: ByName,
    /// Emptied when the map changes (a clone starts empty).
    views: ViewCache,
}

impl PartialEq for ResourceSet {
    fn eq(&self, other: &Self) -> bool {
        self.by_type.iter().zip(&other.by_type).all(|(a, b)| Arc::ptr_eq(a, b) || a.by_name == b.by_name)
    }
}

impl ResourceSet {
    pub fn new() -> Self {
        Self::default()
    }

    fn of_type_mut(&mut self, ty: ResourceType) -> &mut ByName {
        let map = Arc::make_mut(&mut self.by_type[ty.index()]);
        map.views = ViewCache::default();
        &mut map.by_name
    }

    pub fn insert(&mut self, ty: ResourceType, resource: Resource) {
        self.insert_shared(ty, Arc::new(resource));
    }

    pub fn insert_shared(&mut self, ty: ResourceType, resource: Arc<Resource>) {
        self.of_type_mut(ty).insert(resource.name.clone(), resource);
    }

    pub fn remove(&mut self, ty: ResourceType, name: &str) -> Option<Arc<Resource>> {
        self.of_type_mut(ty).remove(name)
    }

    pub fn of_type(&self, ty: ResourceType) -> &BTreeMap<String, Arc<Resource>> {
        &self.by_type[ty.index()].by_name
    }

    /// True when both sets hold the very same map of `ty` (shared by the
    /// [`ResourceInterner`], or one set was cloned from the other).
    pub fn shares_type(&self, other: &ResourceSet, ty: ResourceType) -> bool {
        Arc::ptr_eq(&self.by_type[ty.index()], &other.by_type[ty.index()])
    }

    /// Takes `from`'s map of `ty` (shared, with its views).
    pub fn share_type_from(&mut self, from: &ResourceSet, ty: ResourceType) {
        self.by_type[ty.index()] = from.by_type[ty.index()].clone();
    }

    pub fn get(&self, ty: ResourceType, name: &str) -> Option<&Arc<Resource>> {
        self.by_type[ty.index()].by_name.get(name)
    }

    pub fn len(&self) -> usize {
        self.by_type.iter().map(|m| m.by_name.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every resource of `ty` (`names: None`) or those of `names` that exist,
    /// computed once per set and subscription and shared by every stream that asks.
    pub fn view(&self, ty: ResourceType, names: Option<&NameSet>) -> Arc<ResourceView> {
        let all = self.of_type(ty);
        let views = &self.by_type[ty.index()].views;
        match names {
            None => views.get_or_compute(ViewKey::All(ty), || ResourceView::new(all.values().cloned().collect())),
            Some(names) if ty.namespaced() => views.get_or_compute(ViewKey::Names(ty, names.clone()), || {
                let picked = all.iter().filter(|(n, _)| ty.subscription_covers(names, n)).map(|(_, r)| r.clone()).collect();
                ResourceView::new(picked)
            }),
            Some(names) => views.get_or_compute(ViewKey::Names(ty, names.clone()), || {
                let picked = if names.len() * 4 < all.len() {
                    names.iter().filter_map(|n| all.get(n)).cloned().collect()
                } else {
                    all.iter().filter(|(n, _)| names.contains(*n)).map(|(_, r)| r.clone()).collect()
                };
                ResourceView::new(picked)
            }),
        }
    }
}

/// The namespace of a namespaced resource name: what precedes its last `/`.
pub fn namespace_of(name: &str) -> &str {
    name.rsplit_once('/').map_or("", |(ns, _)| ns)
}

/// Makes equal resources of different sets one shared copy. Proxies of
/// different scopes (namespaces of one cluster, say) get mostly the same
/// clusters and endpoints; each scope's translation builds its own. After
/// [`ResourceInterner::share`], a resource equal (same type, name and
/// version) to one another set already holds is that one, and a whole type's
/// map equal to another set's is that map, with its views and their wire
/// encodings. Entries are weak: what no set holds any more goes.
#[derive(Default)]
pub struct ResourceInterner {
    inner: std::sync::Mutex<InternerInner>,
}

#[derive(Default)]
struct InternerInner {
    /// (type, version as a number) → the resource.
    resources: std::collections::HashMap<(ResourceType, u64), std::sync::Weak<Resource>>,
    /// (type, aggregate version) → the map.
    maps: std::collections::HashMap<(ResourceType, String), std::sync::Weak<TypeMap>>,
    /// Sizes after the last sweep of dead entries.
    swept_at: (usize, usize),
}

impl ResourceInterner {
    pub fn share(&self, set: &mut ResourceSet) {
        self.share_types(set, &ResourceType::PUSH_ORDER)
    }

    /// [`ResourceInterner::share`] for the maps of `types` only (the others did not change).
    pub fn share_types(&self, set: &mut ResourceSet, types: &[ResourceType]) {
        let mut inner = self.inner.lock().expect("shared resources lock");
        for &ty in types {
            let i = ty.index();
            let key = (ty, aggregate_version(set.by_type[i].by_name.values()));
            if let Some(map) = inner.maps.get(&key).and_then(std::sync::Weak::upgrade)
                && map.by_name.len() == set.by_type[i].by_name.len()
                && map.by_name.iter().zip(set.by_type[i].by_name.iter()).all(|((n1, r1), (n2, r2))| n1 == n2 && r1.version == r2.version)
            {
                set.by_type[i] = map;
                continue;
            }
            let current = &set.by_type[i].by_name;
            let shared: Vec<Arc<Resource>> = current
                .values()
                .map(|r| {
                    let id = (ty, u64::from_str_radix(&r.version, 16).unwrap_or_default());
                    match inner.resources.get(&id).and_then(std::sync::Weak::upgrade) {
                        Some(s) if s.name == r.name && s.version == r.version => s,
                        _ => {
                            inner.resources.insert(id, Arc::downgrade(r));
                            r.clone()
                        }
                    }
                })
                .collect();
            // Rebuilt only when some resource became another set's copy (an
            // EDS patch's maps usually hold shared copies already).
            if shared.iter().zip(current.values()).any(|(s, r)| !Arc::ptr_eq(s, r)) {
                let by_name = current.keys().cloned().zip(shared).collect();
                set.by_type[i] = Arc::new(TypeMap { by_name, views: ViewCache::default() });
            }
            inner.maps.insert(key, Arc::downgrade(&set.by_type[i]));
        }
        let (resources, maps) = (inner.resources.len(), inner.maps.len());
        if resources > 2 * inner.swept_at.0.max(1024) || maps > 2 * inner.swept_at.1.max(64) {
            inner.resources.retain(|_, w| w.strong_count() > 0);
            inner.maps.retain(|_, w| w.strong_count() > 0);
            inner.swept_at = (inner.resources.len(), inner.maps.len());
        }
    }
}

/// The version of a set of resources: a hash of their sorted names and versions.
/// Used as the SotW `version_info` and the delta `system_version_info`.
pub fn aggregate_version<'a>(resources: impl IntoIterator<Item = &'a Arc<Resource>>) -> String {
    let mut hasher = Sha256::new();
    let mut count = 0u64;
    for r in resources {
        hasher.update(r.name.as_bytes());
        hasher.update([0]);
        hasher.update(r.version.as_bytes());
        hasher.update([0]);
        count += 1;
    }
    hasher.update(count.to_le_bytes());
    let digest = hasher.finalize();
    codec::short_hex(&digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;

    #[test]
    fn type_urls_round_trip_and_order_is_make_before_break() {
        for ty in ResourceType::PUSH_ORDER {
            assert_eq!(ResourceType::from_type_url(ty.type_url()), Some(ty));
        }
        assert_eq!(ResourceType::from_type_url("type.googleapis.com/nope"), None);
        let names: Vec<_> = ResourceType::PUSH_ORDER.iter().map(|t| t.short_name()).collect();
        assert_eq!(names, ["CDS", "EDS", "LDS", "RDS", "VHDS", "SDS"]);
        assert_eq!(ResourceType::Cluster.type_url(), <Cluster as Name>::type_url(), "our type URL matches envoy-types'");
    }

    #[test]
    fn same_content_same_version() {
        let c = Cluster { name: "a".into(), ..Default::default() };
        let a = Resource::from_message("a", &c);
        let b = Resource::from_message("a", &c.clone());
        assert_eq!(a.version, b.version);
        let c2 = Cluster { name: "b".into(), ..Default::default() };
        assert_ne!(a.version, Resource::from_message("a", &c2).version);
        let set1 = [Arc::new(a.clone())];
        let set2 = [Arc::new(b)];
        assert_eq!(aggregate_version(&set1), aggregate_version(&set2));
        assert_ne!(aggregate_version(&set1), aggregate_version(&[]));
    }

    fn cluster(name: &str, timeout_s: i64) -> Resource {
        Resource::from_message(
            name,
            &Cluster {
                name: name.into(),
                connect_timeout: Some(envoy_types::pb::google::protobuf::Duration { seconds: timeout_s, nanos: 0 }),
                ..Default::default()
            },
        )
    }

    fn set_of(clusters: &[(&str, i64)]) -> ResourceSet {
        let mut set = ResourceSet::new();
        for (name, t) in clusters {
            set.insert(ResourceType::Cluster, cluster(name, *t));
        }
        set
    }

    #[test]
    fn equal_resources_of_different_sets_become_one_copy() {
        let shared = ResourceInterner::default();
        let mut a = set_of(&[("x", 1), ("y", 1)]);
        let mut b = set_of(&[("x", 1), ("y", 1)]);
        let mut c = set_of(&[("x", 1), ("y", 2)]);
        for set in [&mut a, &mut b, &mut c] {
            shared.share(set);
        }
        // Equal maps: one map, so one view (and one encoding) for both sets.
        assert!(Arc::ptr_eq(&a.by_type[0], &b.by_type[0]));
        assert!(Arc::ptr_eq(&a.view(ResourceType::Cluster, None), &b.view(ResourceType::Cluster, None)));
        // A map that differs in one resource keeps its own map but shares the equal resource.
        assert!(!Arc::ptr_eq(&a.by_type[0], &c.by_type[0]));
        assert!(Arc::ptr_eq(a.get(ResourceType::Cluster, "x").unwrap(), c.get(ResourceType::Cluster, "x").unwrap()));
        assert!(!Arc::ptr_eq(a.get(ResourceType::Cluster, "y").unwrap(), c.get(ResourceType::Cluster, "y").unwrap()));
        assert_eq!(c, set_of(&[("x", 1), ("y", 2)]), "sharing never changes what a set holds");
        // A shared map that then changes is copied; its views start over.
        let before = a.view(ResourceType::Cluster, None);
        a.insert(ResourceType::Cluster, cluster("z", 1));
        assert_eq!(b.of_type(ResourceType::Cluster).len(), 2);
        assert_eq!(a.view(ResourceType::Cluster, None).len(), 3);
        assert_eq!(before.len(), 2);
        // What no set holds any more is not kept alive.
        let weak = Arc::downgrade(c.get(ResourceType::Cluster, "y").unwrap());
        drop(c);
        assert!(weak.upgrade().is_none());
    }
}
