//! How two snapshots differ, as translation sees it: nothing, some services'
//! endpoints, policies or Sidecars (with perhaps some endpoints), or more.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{MeshSnapshot, ServiceKey};

/// How two snapshots differ.
#[derive(Debug, PartialEq, Eq)]
pub enum SnapshotChange {
    None,
    /// Only these services' endpoints changed.
    Endpoints(BTreeSet<ServiceKey>),
    /// Policies or Sidecars changed (and these services' endpoints); the
    /// services, networks and meshes did not: every scope is translated
    /// again, from the pieces built for the last snapshot where they still apply.
    Config(BTreeSet<ServiceKey>),
    Full,
}

impl SnapshotChange {
    /// Whether every scope is translated again.
    pub fn retranslates(&self) -> bool {
        matches!(self, SnapshotChange::Config(_) | SnapshotChange::Full)
    }
}

/// Compares what translation reads.
pub fn classify_change(old: &MeshSnapshot, new: &MeshSnapshot) -> SnapshotChange {
    if old.mesh_peers != new.mesh_peers || old.trust != new.trust || old.gateways != new.gateways || old.clusters.len() != new.clusters.len() {
        return SnapshotChange::Full;
    }
    let config = old.applied != new.applied
        || old.sidecars != new.sidecars
        || old.policy_status != new.policy_status
        || old.access_enforced != new.access_enforced
        || old.access_policies != new.access_policies
        || old.workload_access != new.workload_access
        // A new service account behind a service: clients' upstream TLS must accept it.
        || old.service_identities != new.service_identities;
    let mut changed = BTreeSet::new();
    for (name, o) in &old.clusters {
        let Some(n) = new.clusters.get(name) else { return SnapshotChange::Full };
        if Arc::ptr_eq(o, n) {
            // The source kept this cluster's state: nothing in it changed.
            continue;
        }
        if let Some(changes) = n.built_after.since(o) {
            // Built right after `o`: its builder says what changed.
            if changes.services_or_network {
                return SnapshotChange::Full;
            }
            for k in &changes.endpoints {
                if n.services.get(k).is_some_and(|s| s.headless) {
                    return SnapshotChange::Full;
                }
                changed.insert(ServiceKey::new(name, &k.0, &k.1));
            }
            continue;
        }
        if o.services != n.services || o.network != n.network {
            return SnapshotChange::Full;
        }
        let keys: BTreeSet<&(String, String)> = o.endpoints.keys().chain(n.endpoints.keys()).collect();
        for k in keys {
            if o.endpoints.get(k) != n.endpoints.get(k) {
                // A headless service's pods are listeners of their own (`<pod IP>_<port>`), not only EDS.
                if n.services.get(k).is_some_and(|s| s.headless) {
                    return SnapshotChange::Full;
                }
                changed.insert(ServiceKey::new(name, &k.0, &k.1));
            }
        }
    }
    match (config, changed.is_empty()) {
        (true, _) => SnapshotChange::Config(changed),
        (false, true) => SnapshotChange::None,
        (false, false) => SnapshotChange::Endpoints(changed),
    }
}

/// The addresses of the endpoints of `changed` services that differ between
/// `old` and `new` (added, removed, or changed in ports, labels or
/// readiness): a proxy at one of them serves other ports now, so its inbound
/// side changes too, not only EDS.
pub fn changed_workload_addresses(old: &MeshSnapshot, new: &MeshSnapshot, changed: &BTreeSet<ServiceKey>) -> std::collections::HashSet<String> {
    let mut out = std::collections::HashSet::new();
    for key in changed {
        let (before, after) = (old.endpoints(key), new.endpoints(key));
        for e in before.iter().filter(|e| !after.contains(e)).chain(after.iter().filter(|e| !before.contains(e))) {
            out.insert(e.address.clone());
        }
    }
    out
}

/// The services whose effective rules differ between `old` and `new`.
pub fn services_with_changed_rules(old: &MeshSnapshot, new: &MeshSnapshot) -> BTreeSet<ServiceKey> {
    old.ruled_services.iter().chain(new.ruled_services.iter()).filter(|k| old.rules_for(k) != new.rules_for(k)).cloned().collect()
}
