//! Typed xDS resources as the server hands them out: name, stable version and
//! encoded body, grouped per resource type.

use std::collections::BTreeMap;
use std::sync::Arc;

pub use super::resource::{Resource, ResourceType, aggregate_version, namespace_of};
use super::view::{NameSet, ResourceView, ViewCache, ViewKey};

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
            if inner.take_equal_map(set, ty, &key) {
                continue;
            }
            let current = &set.by_type[i].by_name;
            let shared: Vec<Arc<Resource>> = current.values().map(|r| inner.intern(ty, r)).collect();
            // Rebuilt only when some resource became another set's copy (an
            // EDS patch's maps usually hold shared copies already).
            if shared.iter().zip(current.values()).any(|(s, r)| !Arc::ptr_eq(s, r)) {
                let by_name = current.keys().cloned().zip(shared).collect();
                set.by_type[i] = Arc::new(TypeMap { by_name, views: ViewCache::default() });
            }
            inner.maps.insert(key, Arc::downgrade(&set.by_type[i]));
        }
        inner.sweep();
    }

    /// [`ResourceInterner::share_types`] of `ty` for a set whose map of it
    /// is a shared one with only the resources named `patched` replaced (an
    /// endpoint change's patch): only those are looked up, the others being
    /// the shared copies already. (Looking up all 3,100 assignments of the
    /// 1,000-service fixture had been a quarter of each reload under churn.)
    /// The map itself is not registered: the scopes that shared it before
    /// share the patch already (the cache patches a shared map once), and
    /// hashing every name and version for its aggregate version had been
    /// 7% of a reload at 10,000 proxies; a scope translated whole later
    /// shares its resources, in a map of its own.
    pub fn share_patched<'a>(&self, set: &mut ResourceSet, ty: ResourceType, patched: impl IntoIterator<Item = &'a str>) {
        let mut inner = self.inner.lock().expect("shared resources lock");
        for name in patched {
            let Some(r) = set.get(ty, name) else { continue };
            let shared = inner.intern(ty, r);
            if !Arc::ptr_eq(&shared, r) {
                set.insert_shared(ty, shared);
            }
        }
        inner.sweep();
    }
}

impl InternerInner {
    /// The shared copy of `r`: one equal to it (same type, name and version)
    /// that some set holds already, else `r`, remembered as that copy.
    fn intern(&mut self, ty: ResourceType, r: &Arc<Resource>) -> Arc<Resource> {
        let id = (ty, u64::from_str_radix(&r.version, 16).unwrap_or_default());
        match self.resources.get(&id).and_then(std::sync::Weak::upgrade) {
            Some(s) if s.name == r.name && s.version == r.version => s,
            _ => {
                self.resources.insert(id, Arc::downgrade(r));
                r.clone()
            }
        }
    }

    /// Gives `set` the live map registered under `key` if it holds the same
    /// names and versions as `set`'s own map of `ty`.
    fn take_equal_map(&self, set: &mut ResourceSet, ty: ResourceType, key: &(ResourceType, String)) -> bool {
        let i = ty.index();
        match self.maps.get(key).and_then(std::sync::Weak::upgrade) {
            Some(map)
                if map.by_name.len() == set.by_type[i].by_name.len()
                    && map.by_name.iter().zip(set.by_type[i].by_name.iter()).all(|((n1, r1), (n2, r2))| n1 == n2 && r1.version == r2.version) =>
            {
                set.by_type[i] = map;
                true
            }
            _ => false,
        }
    }

    /// Drops the entries no set holds any more, once the maps have doubled since the last sweep.
    fn sweep(&mut self) {
        let (resources, maps) = (self.resources.len(), self.maps.len());
        if resources > 2 * self.swept_at.0.max(1024) || maps > 2 * self.swept_at.1.max(64) {
            self.resources.retain(|_, w| w.strong_count() > 0);
            self.maps.retain(|_, w| w.strong_count() > 0);
            self.swept_at = (self.resources.len(), self.maps.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use prost::Name;

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
        // What it hashes: each name and version, zero-terminated, then the count.
        use sha2::Digest;
        let set = [Arc::new(a), Arc::new(Resource::from_message("b", &c2))];
        let mut hasher = sha2::Sha256::new();
        for r in &set {
            hasher.update(format!("{}\0{}\0", r.name, r.version));
        }
        hasher.update(2u64.to_le_bytes());
        assert_eq!(aggregate_version(&set), crate::xds::codec::short_hex(&hasher.finalize()));
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

    #[test]
    fn a_patched_map_shares_what_a_whole_one_would() {
        let shared = ResourceInterner::default();
        let (mut a, mut b) = (set_of(&[("x", 1), ("y", 1)]), set_of(&[("w", 1), ("x", 1), ("y", 1)]));
        shared.share(&mut a);
        shared.share(&mut b);
        // Both patched with an equal new "y", each its own copy: the second takes the first's.
        let patch = |set: &mut ResourceSet| {
            set.insert(ResourceType::Cluster, cluster("y", 2));
            shared.share_patched(set, ResourceType::Cluster, ["y"]);
        };
        let (mut a2, mut b2) = (a.clone(), b.clone());
        patch(&mut a2);
        patch(&mut b2);
        let y = |set: &ResourceSet| set.get(ResourceType::Cluster, "y").unwrap().clone();
        assert!(Arc::ptr_eq(&y(&a2), &y(&b2)));
        assert!(Arc::ptr_eq(a2.get(ResourceType::Cluster, "x").unwrap(), a.get(ResourceType::Cluster, "x").unwrap()));
        assert_eq!(a2, set_of(&[("x", 1), ("y", 2)]));
        // A set translated whole later shares the patched resources.
        let mut whole = set_of(&[("x", 1), ("y", 2)]);
        shared.share(&mut whole);
        assert!(Arc::ptr_eq(&y(&whole), &y(&a2)));
        assert!(Arc::ptr_eq(whole.get(ResourceType::Cluster, "x").unwrap(), a.get(ResourceType::Cluster, "x").unwrap()));
    }
}
