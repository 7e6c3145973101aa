//! What translations of one mesh build alike, built once.
//!
//! A virtual host or an Envoy cluster depends on a few inputs only: the
//! client's cluster (and namespace, through its domains), the service, and
//! the policy rules that reach it from this client. Keyed by exactly those,
//! the scopes of one snapshot share them, and so do successive snapshots
//! that differ only in policies or Sidecars: a weight change builds the
//! virtual hosts of the services whose rules changed, and finds every other
//! piece ready (issue 18, item 1).
//!
//! A memo is valid for one set of services, networks and meshes (its pieces
//! do not read endpoints): the provider starts an empty one when any of those
//! change, and keeps it across policy and Sidecar changes. After one, it
//! forgets the virtual hosts patches replaced, or, when every scope was
//! translated whole, whatever those translations did not use.
//! Results never depend on what a memo holds; `translate` without one builds
//! every piece (the golden tests), and `tests` check that the two agree.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use super::ClusterTarget;
use super::built::BuiltVirtualHost;
use crate::model::ServiceKey;
use crate::xds::resources::Resource;

/// What one virtual host depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VirtualHostKey {
    pub client_cluster: String,
    pub service: ServiceKey,
    pub host: String,
    pub port: u16,
    /// The domains it answers (its aliases, the client's namespace, and what other hosts on the port took first).
    pub domains: Vec<String>,
    /// The policy rules that reach it from this client, merged, as canonical JSON ("" when none).
    pub rules: String,
}

/// What one Envoy cluster depends on (besides services and meshes, which a memo is valid for).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterKey {
    pub client_cluster: String,
    /// Captured proxies dial a headless service of their own cluster directly.
    pub captured: bool,
    /// Where the cluster's TLS context reads its secrets.
    pub secrets: super::tls::SecretSource,
    pub target: ClusterTarget,
    pub outlier: Option<crate::model::policy::Outlier>,
    /// The destination's workload identities its TLS context accepts.
    pub identities: Option<Arc<Vec<String>>>,
}

/// An Envoy cluster and whether it reads EDS.
pub type BuiltCluster = (Arc<Resource>, bool);

/// Endpoint assignments of unchanged endpoints, by (client cluster, client network), then cluster name.
pub type EndpointSeed = HashMap<(String, String), HashMap<String, Arc<Resource>>>;

/// The pieces built so far for one set of services and meshes, each with the
/// generation that last used it.
#[derive(Default)]
pub struct TranslationMemo {
    virtual_hosts: DashMap<VirtualHostKey, (Arc<BuiltVirtualHost>, AtomicU64)>,
    clusters: DashMap<ClusterKey, (BuiltCluster, AtomicU64)>,
    built: BuiltCounts,
}

/// How many pieces translations with a memo had to build (found nowhere), so far.
#[derive(Debug, Default)]
pub struct BuiltCounts {
    pub virtual_hosts: AtomicU64,
    pub clusters: AtomicU64,
    pub endpoints: AtomicU64,
}

impl BuiltCounts {
    /// (virtual hosts, clusters, endpoint assignments).
    pub fn read(&self) -> (u64, u64, u64) {
        (self.virtual_hosts.load(Ordering::Relaxed), self.clusters.load(Ordering::Relaxed), self.endpoints.load(Ordering::Relaxed))
    }
}

impl TranslationMemo {
    pub fn built(&self) -> &BuiltCounts {
        &self.built
    }

    /// Drops what no translation of `generation` or later used (what a
    /// policy change replaced).
    pub fn sweep(&self, generation: u64) {
        self.virtual_hosts.retain(|_, (_, used)| used.load(Ordering::Relaxed) >= generation);
        self.clusters.retain(|_, (_, used)| used.load(Ordering::Relaxed) >= generation);
    }
}

/// How a translation finds pieces: in `memo` (adding what it builds, and
/// marking what it uses with `generation`), and unchanged endpoint
/// assignments in `endpoints`.
#[derive(Clone, Copy, Default)]
pub struct Memo<'a> {
    pub memo: Option<&'a TranslationMemo>,
    pub generation: u64,
    pub endpoints: Option<&'a EndpointSeed>,
}

fn find_or_build<K: Hash + Eq + Clone, V: Clone>(map: Option<&DashMap<K, (V, AtomicU64)>>, generation: u64, key: &K, build: impl FnOnce() -> V) -> V {
    let Some(map) = map else { return build() };
    if let Some(e) = map.get(key) {
        e.1.fetch_max(generation, Ordering::Relaxed);
        return e.0.clone();
    }
    let v = build();
    map.entry(key.clone()).or_insert((v, AtomicU64::new(generation))).0.clone()
}

impl Memo<'_> {
    /// No memo: every piece is built.
    pub fn none() -> Memo<'static> {
        Memo::default()
    }

    /// `memo` for translations of `generation`.
    pub fn of(memo: &TranslationMemo, generation: u64) -> Memo<'_> {
        Memo { memo: Some(memo), generation, endpoints: None }
    }

    fn count(&self, counter: impl Fn(&BuiltCounts) -> &AtomicU64) {
        if let Some(m) = self.memo {
            counter(&m.built).fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn virtual_host(&self, key: &VirtualHostKey, build: impl FnOnce() -> BuiltVirtualHost) -> Arc<BuiltVirtualHost> {
        find_or_build(self.memo.map(|m| &m.virtual_hosts), self.generation, key, || {
            self.count(|c| &c.virtual_hosts);
            Arc::new(build())
        })
    }

    /// A virtual host built before, if the memo has it (marked used).
    pub fn built_virtual_host(&self, key: &VirtualHostKey) -> Option<Arc<BuiltVirtualHost>> {
        let e = self.memo?.virtual_hosts.get(key)?;
        e.1.fetch_max(self.generation, Ordering::Relaxed);
        Some(e.0.clone())
    }

    /// Drops what a patch replaced (an old weight's virtual host).
    pub fn forget_virtual_hosts(&self, keys: &[VirtualHostKey]) {
        if let Some(m) = self.memo {
            for k in keys {
                m.virtual_hosts.remove(k);
            }
        }
    }

    pub fn cluster(&self, key: &ClusterKey, build: impl FnOnce() -> BuiltCluster) -> BuiltCluster {
        find_or_build(self.memo.map(|m| &m.clusters), self.generation, key, || {
            self.count(|c| &c.clusters);
            build()
        })
    }
    /// The seed's assignments for clients in `client_cluster` on `network`.
    pub fn endpoint_seed(&self, client_cluster: &str, network: &str) -> Option<&HashMap<String, Arc<Resource>>> {
        self.endpoints?.get(&(client_cluster.to_string(), network.to_string()))
    }

    /// A target's endpoint assignment: `seed`'s when its endpoints did not
    /// change and it is a whole service port (subset names are not unique to
    /// their labels), else `build`'s.
    pub fn endpoints(
        &self,
        seed: Option<&HashMap<String, Arc<Resource>>>,
        target: &ClusterTarget,
        build: impl FnOnce() -> Resource,
    ) -> Arc<Resource> {
        if let Some(r) = seed.filter(|_| target.subset.is_empty()).and_then(|seed| seed.get(&target.name)) {
            return r.clone();
        }
        self.count(|c| &c.endpoints);
        Arc::new(build())
    }
}
