//! An endpoint-only change: the EDS maps of the cached sets are patched
//! (once per shared map), and a config change's translation is seeded
//! with the assignments it did not touch.

use std::collections::BTreeSet;

use super::MeshResources;
use crate::model::{MeshSnapshot, ServiceKey};
use crate::translate::memo::EndpointSeed;
use crate::translate::patch::{ChangedHosts, EndpointMemo, PatchedEndpoints, patch_endpoints_shared};
use crate::translate::{self, ProxyScope};
use crate::xds::resources::{ResourceSet, ResourceType};

/// Endpoint maps already patched during one update: scopes whose EDS maps
/// were one shared map before the change (and that have the same cluster
/// and network) get one shared patched map, patched and interned once.
#[derive(Default)]
pub(super) struct PatchedMaps {
    /// (cluster, network) → (set before, set after) for each map patched.
    pub(super) done: std::collections::HashMap<(String, String), Vec<(ResourceSet, ResourceSet)>>,
}

impl MeshResources {
    /// [`patch_endpoints_shared`] and interning, done once per shared EDS map:
    /// the other scopes that held the same map take the patched one. (Per
    /// scope, patching and interning 3,100 assignments had cost 2–3 ms: 60–100 ms
    /// per endpoint change at 30 scopes, before the push.)
    pub(super) fn patch_endpoints_once(
        &self,
        snapshot: &MeshSnapshot,
        scope: &ProxyScope,
        set: &ResourceSet,
        changed: &BTreeSet<ServiceKey>,
        memo: &mut EndpointMemo,
        maps: &mut PatchedMaps,
    ) -> ResourceSet {
        let gateway = scope.role == crate::xds::node::ProxyRole::Gateway;
        let key = (scope.cluster.clone(), translate::client_network(snapshot, scope).to_string());
        if !gateway
            && let Some((_, after)) = maps.done.get(&key).and_then(|d| d.iter().find(|(before, _)| before.shares_type(set, ResourceType::Endpoint)))
        {
            let mut next = set.clone();
            next.share_type_from(after, ResourceType::Endpoint);
            return next;
        }
        let PatchedEndpoints { set: mut patched, replaced } = patch_endpoints_shared(snapshot, scope, set, changed, memo);
        match replaced {
            Some(names) => self.interner.share_patched(&mut patched, ResourceType::Endpoint, names.iter().map(String::as_str)),
            None => self.interner.share_types(&mut patched, &[ResourceType::Endpoint]),
        }
        if !gateway {
            maps.done.entry(key).or_default().push((set.clone(), patched.clone()));
        }
        patched
    }

    /// The endpoint assignments of the cached sets of generation `old` (a
    /// late translation of an older one may be cached too, and is skipped)
    /// whose services' endpoints are not in `changed`: still exact for a
    /// snapshot that changed only policies or Sidecars. Scopes sharing a map
    /// are read once.
    pub(super) fn endpoint_seed(&self, (generation, old): (u64, &MeshSnapshot), changed: &BTreeSet<ServiceKey>) -> EndpointSeed {
        let mut seed = EndpointSeed::new();
        let mut read: std::collections::HashSet<(String, String, usize)> = std::collections::HashSet::new();
        for e in self.cache.iter() {
            let scope = e.key();
            if scope.role == crate::xds::node::ProxyRole::Gateway || e.value().0 != generation {
                continue;
            }
            let network = translate::client_network(old, scope).to_string();
            let map = e.value().1.of_type(ResourceType::Endpoint);
            if !read.insert((scope.cluster.clone(), network.clone(), std::ptr::from_ref(map) as usize)) {
                continue;
            }
            let hosts = ChangedHosts::new(&scope.cluster, changed);
            let of_client = seed.entry((scope.cluster.clone(), network)).or_default();
            for (name, r) in map.iter().filter(|(name, _)| !hosts.name(name)) {
                of_client.entry(name.clone()).or_insert_with(|| r.clone());
            }
        }
        seed
    }
}
