//! The mesh as a [`ResourceProvider`]: the cache between the snapshot and
//! the xDS streams. It holds the current [`MeshSnapshot`], translates it once
//! per proxy scope (proxies with the same scope share one `Arc<ResourceSet>`),
//! and keeps what a change did not touch:
//!
//! - `scopes`: translating or patching the served scopes on all cores before a snapshot is published;
//! - `endpoints`: an endpoint-only change patches the EDS maps of the cached sets;
//! - `secrets`: a sidecar's SDS certificates, issued with the clock;
//! - `rollback`: a route that Envoy rejects rolls back the policy that made it;
//! - `status_log`: what changed in the policies' status, logged.

mod endpoints;
mod rollback;
mod scopes;
mod secrets;
mod status_log;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dashmap::DashMap;

use crate::ca::WorkloadCertificates;
use crate::metrics::TranslationCounters;
use crate::model::diff::{SnapshotChange, changed_workload_addresses, classify_change, services_with_changed_rules};
use crate::model::policy::{AppliedPolicy, LastGood};
use crate::model::{MeshInputs, MeshSnapshot};
use crate::translate::memo::{Memo, TranslationMemo};
use crate::translate::patch::EndpointMemo;
use crate::translate::{self, ProxyScope};
use crate::xds::node::ProxyNode;
use crate::xds::provider::{ChangeNotifier, ResourceProvider, StreamMemo};
use crate::xds::resources::{ResourceInterner, ResourceSet, ResourceType};

use endpoints::PatchedMaps;
use scopes::Patch;

/// What streams read together: a generation, its snapshot, and the memo
/// valid for that snapshot's services (a translation of one snapshot must
/// never add to another's memo).
struct Published {
    generation: u64,
    snapshot: Arc<MeshSnapshot>,
    memo: Arc<TranslationMemo>,
}

/// The snapshot, the cached translations of every scope served, and what
/// updates them: the sources' loads and Envoy's rejections.
pub struct MeshResources {
    current: RwLock<Published>,
    cache: DashMap<ProxyScope, (u64, Arc<ResourceSet>)>,
    /// One translation per scope at a time: the streams of a scope that miss
    /// the cache together wait for the first one's result instead of each
    /// translating the same thing.
    translating: DashMap<ProxyScope, Arc<Mutex<()>>>,
    /// Scopes served since the last full change, with all their labels: a
    /// full change translates them again (resolved against its selectors) before
    /// it is published (see `update`).
    served: DashMap<Arc<ProxyScope>, ()>,
    /// Moves on whenever `served` is cleared or the cache is dropped without
    /// a new generation: a stream's memo of its set ([`StreamScope`]) is good
    /// for one (generation, epoch).
    epoch: AtomicU64,
    /// Equal resources (and whole equal maps, with their encodings) of
    /// different scopes are one copy.
    interner: ResourceInterner,
    last_good: Mutex<LastGood>,
    ready: AtomicBool,
    notifier: ChangeNotifier,
    certs: Arc<WorkloadCertificates>,
    /// Whole-scope translations, patches (`translate::patch`) and rollbacks so far (exported when serving).
    counters: TranslationCounters,
    /// One update at a time: the sources' and those Envoy's rejections start.
    updating: Mutex<()>,
    /// The last update's inputs, applied again when Envoy rejects a policy's routes.
    last_inputs: Mutex<Option<MeshInputs>>,
    /// The policies the last config change added or changed (none after a
    /// full change): when it is one, a rejection that names none is that one's.
    last_changed: Mutex<Vec<Arc<AppliedPolicy>>>,
    /// This provider, once shared ([`MeshResources::shared`]): a rejection's
    /// update runs on a thread of its own, not on the stream that reported it.
    me: std::sync::OnceLock<std::sync::Weak<MeshResources>>,
}

/// The scope a connected proxy's node describes (before it is resolved against a snapshot).
pub fn scope_of(node: &ProxyNode) -> ProxyScope {
    let secret_source = if node.istio_version.is_some() { translate::tls::SecretSource::IstioAgent } else { translate::tls::SecretSource::Ads };
    ProxyScope {
        role: node.role,
        cluster: node.cluster.clone(),
        namespace: node.namespace.clone(),
        network: node.network.clone(),
        labels: node.labels.clone(),
        interception: node.interception,
        outbound_bind: node.outbound_bind.clone().unwrap_or_else(|| translate::DEFAULT_OUTBOUND_BIND.to_string()),
        service_account: node.service_account.clone(),
        instance_ips: node.instance_ips.clone(),
        app_address: node.app_address.clone().unwrap_or_else(|| translate::DEFAULT_APP_ADDRESS.to_string()),
        served: std::collections::BTreeMap::new(),
        vhds: node.delta_ads,
        secret_source,
        send_secrets: secret_source == translate::tls::SecretSource::Ads && node.identity.may_receive_secrets(),
        access: None,
    }
}

impl MeshResources {
    pub fn new(notifier: ChangeNotifier) -> Self {
        Self::with_certificates(notifier, Arc::new(WorkloadCertificates::new(std::time::Duration::from_secs(86400), None)))
    }

    pub fn with_certificates(notifier: ChangeNotifier, certs: Arc<WorkloadCertificates>) -> Self {
        MeshResources {
            certs,
            current: RwLock::new(Published { generation: 0, snapshot: Arc::new(MeshSnapshot::default()), memo: Default::default() }),
            cache: DashMap::new(),
            translating: DashMap::new(),
            served: DashMap::new(),
            epoch: AtomicU64::new(0),
            interner: ResourceInterner::default(),
            last_good: Mutex::new(LastGood::default()),
            ready: AtomicBool::new(false),
            notifier,
            counters: TranslationCounters::default(),
            updating: Mutex::new(()),
            last_inputs: Mutex::new(None),
            last_changed: Mutex::new(Vec::new()),
            me: std::sync::OnceLock::new(),
        }
    }

    /// Counts into `counters` (the served metrics') instead of its own.
    pub fn counting(mut self, counters: &TranslationCounters) -> Self {
        self.counters = counters.clone();
        self
    }

    /// The provider behind an `Arc`, as the server holds it.
    pub fn shared(self) -> Arc<MeshResources> {
        let me = Arc::new(self);
        let _ = me.me.set(Arc::downgrade(&me));
        me
    }

    /// Drops every cached translation and pushes (certificates were rotated).
    pub fn rotate_certificates(&self) {
        self.cache.clear();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.notifier.changed();
    }

    pub fn certificates(&self) -> &Arc<WorkloadCertificates> {
        &self.certs
    }

    pub fn snapshot(&self) -> Arc<MeshSnapshot> {
        self.current.read().expect("snapshot lock").snapshot.clone()
    }

    /// The published generation, snapshot and memo, read together.
    fn published(&self) -> (u64, Arc<MeshSnapshot>, Arc<TranslationMemo>) {
        let cur = self.current.read().expect("snapshot lock");
        (cur.generation, cur.snapshot.clone(), cur.memo.clone())
    }

    /// Takes a new load from the sources: validates, swaps the snapshot, and
    /// tells the xDS server if anything a proxy sees may have changed.
    pub fn update(&self, inputs: MeshInputs) {
        let _one_at_a_time = self.updating.lock().expect("update lock");
        *self.last_inputs.lock().expect("inputs lock") = Some(inputs.clone());
        self.apply(inputs);
    }

    fn apply(&self, inputs: MeshInputs) {
        let started = std::time::Instant::now();
        // (Updates run one at a time, under `updating`: nothing publishes in between.)
        let (old_generation, old, old_memo) = self.published();
        let snapshot = {
            let mut last_good = self.last_good.lock().expect("last-good lock");
            Arc::new(MeshSnapshot::build_after(inputs, &mut last_good, Some(&old)))
        };
        let built = started.elapsed();
        status_log::log_policy_changes(&old, &snapshot);
        let change = classify_change(&old, &snapshot);
        let classified = started.elapsed();
        // A full change (a policy, a service) invalidates every translation.
        // The scopes proxies use are translated again here, on all cores,
        // before the new snapshot is published: until then proxies keep the
        // old config, and the push finds every set ready. (Translating in the
        // streams on a miss had run the scopes one after another on runtime
        // workers, blocking them: ≈4–5 s at 1,000 proxies for 30 scopes.)
        // When only policies or Sidecars changed, the virtual hosts and
        // clusters they did not touch come from the memo, and endpoint
        // assignments from the cached sets, instead of being built again.
        // (Updates run one at a time, under `updating`: this is the generation published below.)
        let generation = old_generation + 1;
        let memo = match change {
            SnapshotChange::Full => Arc::new(TranslationMemo::default()),
            _ => old_memo,
        };
        // (Only a config change names changed policies: after a full one, at
        // start-up say, every policy is new, and one of them is no suspect.)
        if change.retranslates() {
            let changed = match change {
                SnapshotChange::Config(_) => snapshot.applied.iter().filter(|p| !old.applied.contains(p)).cloned().collect(),
                _ => Vec::new(),
            };
            *self.last_changed.lock().expect("changed policies lock") = changed;
        }
        let retranslated = change.retranslates().then(|| {
            // Served scopes are kept with all their labels and narrowed to the
            // new snapshot's keys here: a policy or Sidecar that reads a new
            // label key splits them as the streams' lookups will.
            let scopes: BTreeSet<ProxyScope> = self.served.iter().map(|e| (**e.key()).clone().resolved(&snapshot)).collect();
            let scopes: Vec<ProxyScope> = scopes.into_iter().collect();
            self.served.clear();
            self.epoch.fetch_add(1, Ordering::AcqRel);
            let seed = match &change {
                SnapshotChange::Config(changed) => Some(self.endpoint_seed((old_generation, &old), changed)),
                _ => None,
            };
            // Only some services' rules changed (no Sidecar, selector or
            // endpoint did): a scope's cached set is patched, not walked.
            let patchable = match &change {
                SnapshotChange::Config(endpoints)
                    if endpoints.is_empty()
                        && old.sidecars == snapshot.sidecars
                        && old.source_labels == snapshot.source_labels
                        && old.access_enforced == snapshot.access_enforced
                        && old.workload_access == snapshot.workload_access =>
                {
                    Some(services_with_changed_rules(&old, &snapshot))
                }
                _ => None,
            };
            let patch = patchable.as_ref().map(|changed| Patch { old: &old, generation: old_generation, changed });
            self.translate_scopes(&snapshot, &scopes, &Memo { endpoints: seed.as_ref(), ..Memo::of(&memo, generation) }, patch)
        });
        // An endpoint change patches the cached sets, also before publishing.
        let patched: Vec<(ProxyScope, Arc<ResourceSet>)> = match &change {
            SnapshotChange::Endpoints(changed) => {
                let mut memo_eds = EndpointMemo::new();
                let mut maps = PatchedMaps::default();
                let moved = changed_workload_addresses(&old, &snapshot, changed);
                let memo = Memo::of(&memo, generation);
                self.cache
                    .iter()
                    .map(|e| {
                        let scope = e.key();
                        // The workload behind this proxy changed: its inbound listeners and clusters did too.
                        let set = if scope.instance_ips.iter().any(|ip| moved.contains(ip)) {
                            self.build_set(&snapshot, scope, &memo)
                        } else {
                            Arc::new(self.patch_endpoints_once(&snapshot, scope, &e.value().1, changed, &mut memo_eds, &mut maps))
                        };
                        (scope.clone(), set)
                    })
                    .collect()
            }
            SnapshotChange::Full | SnapshotChange::Config(_) => retranslated.unwrap_or_default(),
            SnapshotChange::None => Vec::new(),
        };
        // The new generation and its sets appear together (under the snapshot
        // lock): a stream that reads the new generation finds its set ready.
        // (Publishing the generation first had let the requests that came in
        // between, ACKs under churn, miss and translate whole scopes again.)
        {
            let mut cur = self.current.write().expect("snapshot lock");
            cur.generation = generation;
            cur.snapshot = snapshot.clone();
            cur.memo = memo;
            if change == SnapshotChange::None {
                for mut e in self.cache.iter_mut() {
                    e.value_mut().0 = generation;
                }
            }
            for (scope, set) in patched {
                self.cache.insert(scope, (generation, set));
            }
            if change.retranslates() {
                self.cache.retain(|_, e| e.0 == generation);
            }
        }
        tracing::debug!(build = ?built, classify = ?(classified - built), cache = ?(started.elapsed() - classified), "snapshot updated");
        let was_ready = self.ready.swap(true, Ordering::AcqRel);
        if change != SnapshotChange::None || !was_ready {
            tracing::debug!(?change, generation, "mesh snapshot updated");
            self.notifier.changed();
        }
    }
}

/// One stream's memo (its [`StreamMemo`]): its node's scope, made once, and
/// the set it was last given, good while the generation and epoch are those
/// it was looked up at. A stream asks on every push and every reply (the
/// reply mostly at the push's generation): making the scope from the node and
/// hashing and comparing it in the maps had been a tenth of the server's
/// CPU in an endpoint push to 10,000 proxies.
struct StreamScope {
    /// Shared with `served` (a scope per proxy when each names its
    /// `INSTANCE_IPS`: one copy, not two).
    full: Arc<ProxyScope>,
    generation: u64,
    epoch: u64,
    set: Option<Arc<ResourceSet>>,
    /// The epoch in which `full` was last noted among the served scopes.
    noted_in: Option<u64>,
}

impl MeshResources {
    /// The set of the proxy whose full scope is `full`, at the published
    /// generation (returned with it).
    fn lookup(&self, full: &Arc<ProxyScope>) -> (u64, Arc<ResourceSet>) {
        self.note_served(full);
        self.lookup_noted(full)
    }

    /// Remembers `full` among the scopes served (a full change translates them before it is published).
    fn note_served(&self, full: &Arc<ProxyScope>) {
        if !self.served.contains_key(&**full) {
            self.served.insert(full.clone(), ());
        }
    }

    /// [`lookup`](Self::lookup) of a scope already noted as served.
    fn lookup_noted(&self, full: &ProxyScope) -> (u64, Arc<ResourceSet>) {
        let (generation, snapshot, memo) = self.published();
        let scope = full.clone().resolved(&snapshot);
        // (An entry newer than the generation read above is as good.)
        if let Some(e) = self.cache.get(&scope)
            && e.0 >= generation
        {
            return (generation, e.1.clone());
        }
        let gate = self.translating.entry(scope.clone()).or_default().clone();
        // (Not moved off the runtime with block_in_place: the extra threads it
        // starts cost more memory than the waiting costs time; measured.)
        (generation, self.translate_once(&gate, scope, generation, &snapshot, &memo))
    }
}

impl ResourceProvider for MeshResources {
    fn resources_for(&self, proxy: &ProxyNode) -> Arc<ResourceSet> {
        self.lookup(&Arc::new(scope_of(proxy))).1
    }

    fn resources_for_stream(&self, proxy: &ProxyNode, memo: &mut StreamMemo) -> Arc<ResourceSet> {
        if !memo.as_ref().is_some_and(|m| m.is::<StreamScope>()) {
            *memo = Some(Box::new(StreamScope { full: Arc::new(scope_of(proxy)), generation: 0, epoch: 0, set: None, noted_in: None }));
        }
        let mine = memo.as_mut().and_then(|m| m.downcast_mut::<StreamScope>()).expect("set above");
        // (The epoch is read before the generation: a change that moves both
        // in between leaves a memo that the next call finds stale.)
        let epoch = self.epoch.load(Ordering::Acquire);
        let generation = self.current.read().expect("snapshot lock").generation;
        if let Some(set) = &mine.set
            && (mine.generation, mine.epoch) == (generation, epoch)
        {
            return set.clone();
        }
        // Noted once per epoch (`served` is cleared only with a new one):
        // hashing and comparing the whole scope in `served` on every push had
        // been half of a lookup's cost in an endpoint push to 1,000 proxies.
        if mine.noted_in != Some(epoch) {
            self.note_served(&mine.full);
            mine.noted_in = Some(epoch);
        }
        let (generation, set) = self.lookup_noted(&mine.full);
        (mine.generation, mine.epoch, mine.set) = (generation, epoch, Some(set.clone()));
        set
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// See [`MeshResources::roll_back_rejected`].
    fn on_rejected(&self, proxy: &ProxyNode, ty: ResourceType, message: &str) {
        self.roll_back_rejected(proxy, ty, message);
    }

    fn warnings_for(&self, proxy: &ProxyNode) -> Vec<String> {
        let snapshot = self.snapshot();
        if !self.is_ready() || snapshot.clusters.contains_key(&proxy.cluster) {
            return Vec::new();
        }
        let registered: Vec<&str> = snapshot.clusters.keys().map(String::as_str).collect();
        vec![format!(
            "cluster {:?} (the proxy's CLUSTER_ID) is not a registered cluster (registered: {}): the proxy gets no services of its own cluster, no inbound side and no certificate; register it, or map the name with serve --cluster-alias {}=<cluster>",
            proxy.cluster,
            registered.join(", "),
            proxy.cluster
        )]
    }
}
