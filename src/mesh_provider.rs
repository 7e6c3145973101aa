//! The mesh as a [`ResourceProvider`]: holds the current [`MeshSnapshot`],
//! translates it once per proxy scope on demand (proxies with the same scope
//! share one `Arc<ResourceSet>`), and on an endpoint-only change patches just
//! the affected EDS resources of every cached scope instead of translating again.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dashmap::DashMap;

use crate::ca::WorkloadCertificates;
use crate::metrics::TranslationCounters;
use crate::model::diff::{SnapshotChange, changed_workload_addresses, classify_change, services_with_changed_rules};
use crate::model::policy::{AppliedPolicy, LastGood, PolicyState};
use crate::model::{MeshInputs, MeshSnapshot, ServiceKey};
use crate::translate::memo::{EndpointSeed, Memo, TranslationMemo, VirtualHostKey};
use crate::translate::patch::{ChangedHosts, EndpointMemo, patch_endpoints_shared};
use crate::translate::{self, ProxyScope};
use crate::xds::node::ProxyNode;
use crate::xds::provider::{ChangeNotifier, ResourceProvider};
use crate::xds::resources::{ResourceInterner, ResourceSet, ResourceType};

/// What streams read together: a generation, its snapshot, and the memo
/// valid for that snapshot's services (a translation of one snapshot must
/// never add to another's memo).
struct Published {
    generation: u64,
    snapshot: Arc<MeshSnapshot>,
    memo: Arc<TranslationMemo>,
}

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
    served: DashMap<ProxyScope, ()>,
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
    }
}

/// A scope's new set, and, when it was patched, the memo's virtual hosts the patch replaced.
type ScopeSet = (Arc<ResourceSet>, Option<Vec<VirtualHostKey>>);

/// What a patch of the served scopes' sets starts from: the snapshot and
/// generation they were translated from, and the services whose rules changed.
#[derive(Clone, Copy)]
struct Patch<'a> {
    old: &'a MeshSnapshot,
    generation: u64,
    changed: &'a BTreeSet<ServiceKey>,
}

/// Endpoint maps already patched during one update: scopes whose EDS maps
/// were one shared map before the change (and that have the same cluster
/// and network) get one shared patched map, patched and interned once.
#[derive(Default)]
struct PatchedMaps {
    /// (cluster, network) → (set before, set after) for each map patched.
    done: std::collections::HashMap<(String, String), Vec<(ResourceSet, ResourceSet)>>,
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

    /// Applies the last inputs again (after a rejection changed what is accepted).
    fn reapply(&self) {
        let _one_at_a_time = self.updating.lock().expect("update lock");
        let inputs = self.last_inputs.lock().expect("inputs lock").clone();
        if let Some(inputs) = inputs {
            self.apply(inputs);
        }
    }

    /// Drops every cached translation and pushes (certificates were rotated).
    pub fn rotate_certificates(&self) {
        self.cache.clear();
        self.notifier.changed();
    }

    pub fn certificates(&self) -> &Arc<WorkloadCertificates> {
        &self.certs
    }

    /// A sidecar's SDS secrets (`default`, `ROOTCA`) when its cluster has mTLS.
    fn add_secrets(&self, snapshot: &MeshSnapshot, scope: &ProxyScope, set: &mut ResourceSet) {
        if scope.role != crate::xds::node::ProxyRole::Sidecar {
            return;
        }
        let Some(trust) = snapshot.trust.get(&scope.cluster) else { return };
        let id = translate::tls::spiffe_id(&trust.trust_domain, &scope.namespace, &scope.service_account);
        match self.certs.certificate(&trust.virtual_mesh, &id, std::time::SystemTime::now()) {
            Ok((cert, root)) => {
                let w = translate::tls::workload_secret(&cert.cert_pem, &cert.key_pem);
                set.insert(ResourceType::Secret, crate::xds::resources::Resource::from_message(w.name.clone(), &w));
                let r = translate::tls::root_secret(&root);
                set.insert(ResourceType::Secret, crate::xds::resources::Resource::from_message(r.name.clone(), &r));
            }
            Err(e) => tracing::error!(spiffe_id = %id, error = %e, "cannot issue a workload certificate"),
        }
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
        let snapshot = {
            let mut last_good = self.last_good.lock().expect("last-good lock");
            Arc::new(MeshSnapshot::build(inputs, &mut last_good))
        };
        let built = started.elapsed();
        let (old_generation, old, old_memo) = self.published();
        log_policy_changes(&old, &snapshot);
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
            let scopes: BTreeSet<ProxyScope> = self.served.iter().map(|e| e.key().clone().resolved(&snapshot)).collect();
            let scopes: Vec<ProxyScope> = scopes.into_iter().collect();
            self.served.clear();
            let seed = match &change {
                SnapshotChange::Config(changed) => Some(self.endpoint_seed((old_generation, &old), changed)),
                _ => None,
            };
            // Only some services' rules changed (no Sidecar, selector or
            // endpoint did): a scope's cached set is patched, not walked.
            let patchable = match &change {
                SnapshotChange::Config(endpoints)
                    if endpoints.is_empty() && old.sidecars == snapshot.sidecars && old.source_labels == snapshot.source_labels =>
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

fn log_policy_changes(old: &MeshSnapshot, new: &MeshSnapshot) {
    for (id, st) in &new.policy_status {
        if old.policy_status.get(id) == Some(st) {
            continue;
        }
        match st.state {
            PolicyState::Accepted => tracing::info!(policy = %id, generation = ?st.observed_generation, "TrafficPolicy accepted"),
            _ => tracing::warn!(policy = %id, state = %st.state, messages = ?st.messages, "TrafficPolicy not applied as written"),
        }
    }
    for (id, st) in &new.mesh_object_status {
        if old.mesh_object_status.get(id) == Some(st) {
            continue;
        }
        match st.state {
            PolicyState::Accepted => {
                tracing::info!(object = %id, generation = ?st.observed_generation, not_yet_supported = ?st.not_yet_supported, "accepted")
            }
            _ => tracing::warn!(object = %id, state = %st.state, messages = ?st.messages, "not applied as written"),
        }
    }
    let old_errors: BTreeSet<&String> = old.input_errors.iter().collect();
    for e in new.input_errors.iter().filter(|e| !old_errors.contains(e)) {
        tracing::error!(error = %e, "bad input");
    }
}

impl ResourceProvider for MeshResources {
    fn resources_for(&self, proxy: &ProxyNode) -> Arc<ResourceSet> {
        let (generation, snapshot, memo) = self.published();
        let full = scope_of(proxy);
        if !self.served.contains_key(&full) {
            self.served.insert(full.clone(), ());
        }
        let scope = full.resolved(&snapshot);
        // (An entry newer than the generation read above is as good.)
        if let Some(e) = self.cache.get(&scope)
            && e.0 >= generation
        {
            return e.1.clone();
        }
        let gate = self.translating.entry(scope.clone()).or_default().clone();
        // (Not moved off the runtime with block_in_place: the extra threads it
        // starts cost more memory than the waiting costs time; measured.)
        self.translate_once(&gate, scope, generation, &snapshot, &memo)
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// A route rejection is blamed on the policies whose regexes it names,
    /// else on the one policy the last change added or changed (if it
    /// changed one), and only ever on policies with a rule that reaches the
    /// proxy that rejected (a proxy cannot reject routes it was never sent):
    /// that version becomes INVALID with Envoy's message, its last accepted
    /// version (or nothing) serves again, for every proxy, and the other
    /// policies are untouched. A rejection neither explains is only reported.
    fn on_rejected(&self, proxy: &ProxyNode, ty: ResourceType, message: &str) {
        if !matches!(ty, ResourceType::Route | ResourceType::VirtualHost) {
            return;
        }
        let snapshot = self.snapshot();
        let reaches = |p: &AppliedPolicy| p.rules.iter().any(|r| r.source.matches(&proxy.namespace, &proxy.labels));
        let mut culprits: Vec<Arc<AppliedPolicy>> = snapshot.applied.iter().filter(|p| reaches(p) && p.named_in(message)).cloned().collect();
        if culprits.is_empty() {
            let last = self.last_changed.lock().expect("changed policies lock");
            if let [only] = last.as_slice()
                && reaches(only)
                && snapshot.applied.contains(only)
            {
                culprits.push(only.clone());
            }
        }
        if culprits.is_empty() {
            tracing::warn!(proxy = %proxy.id, r#type = %ty, "the rejection names no policy and follows no single policy change: nothing rolled back");
            return;
        }
        let rejected: Vec<String> = {
            let mut last_good = self.last_good.lock().expect("last-good lock");
            culprits.iter().filter(|p| last_good.reject(p, message)).map(|p| p.id.to_string()).collect()
        };
        if rejected.is_empty() {
            return;
        }
        self.counters.policy_rollbacks.inc_by(rejected.len() as u64);
        tracing::warn!(proxy = %proxy.id, policies = ?rejected, error = %message, "Envoy rejected these policies' routes: INVALID, their last accepted versions serve");
        match self.me.get().and_then(std::sync::Weak::upgrade) {
            Some(me) => {
                let spawned = std::thread::Builder::new().name("policy-rollback".into()).spawn(move || me.reapply());
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start the rollback");
                }
            }
            None => self.reapply(),
        }
    }
}

impl MeshResources {
    /// [`patch_endpoints_shared`] and interning, done once per shared EDS map:
    /// the other scopes that held the same map take the patched one. (Per
    /// scope, patching and interning 3,100 assignments had cost 2–3 ms: 60–100 ms
    /// per endpoint change at 30 scopes, before the push.)
    fn patch_endpoints_once(
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
        let mut patched = patch_endpoints_shared(snapshot, scope, set, changed, memo);
        self.interner.share_types(&mut patched, &[ResourceType::Endpoint]);
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
    fn endpoint_seed(&self, (generation, old): (u64, &MeshSnapshot), changed: &BTreeSet<ServiceKey>) -> EndpointSeed {
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

    /// One scope's resources: translation, its secrets, shared with equal ones.
    fn build_set(&self, snapshot: &MeshSnapshot, scope: &ProxyScope, memo: &Memo<'_>) -> Arc<ResourceSet> {
        self.counters.scope_translations.inc();
        let mut set = translate::translate_with(snapshot, scope, memo);
        self.add_secrets(snapshot, scope, &mut set);
        self.interner.share(&mut set);
        Arc::new(set)
    }

    /// A served scope's set, patched when `patch` allows and the cache holds
    /// its set of that generation (with the virtual hosts the patch replaced).
    fn patched_or_built(&self, snapshot: &MeshSnapshot, scope: &ProxyScope, memo: &Memo<'_>, patch: Option<Patch<'_>>) -> ScopeSet {
        let cached = patch.and_then(|p| self.cache.get(scope).filter(|e| e.0 == p.generation).map(|e| (p, e.1.clone())));
        if let Some((p, set)) = cached
            && let Some(mut patched) = translate::patch::patch_routes((p.old, snapshot), scope, &set, p.changed, memo)
        {
            self.counters.scope_patches.inc();
            self.interner.share_types(&mut patched.set, &[ResourceType::Cluster, ResourceType::Endpoint, ResourceType::VirtualHost]);
            return (Arc::new(patched.set), Some(patched.replaced));
        }
        (self.build_set(snapshot, scope, memo), None)
    }

    /// Translates (or patches) `scopes` on as many threads as there are cores.
    /// Afterwards the memo forgets what patches replaced, and, when every
    /// scope was translated whole, whatever none of them used.
    fn translate_scopes(
        &self,
        snapshot: &MeshSnapshot,
        scopes: &[ProxyScope],
        memo: &Memo<'_>,
        patch: Option<Patch<'_>>,
    ) -> Vec<(ProxyScope, Arc<ResourceSet>)> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(scopes.len());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done: Vec<(ProxyScope, ScopeSet)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        while let Some(scope) = scopes.get(next.fetch_add(1, Ordering::Relaxed)) {
                            out.push((scope.clone(), self.patched_or_built(snapshot, scope, memo, patch)));
                        }
                        out
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().expect("translation thread")).collect()
        });
        let mut patched = false;
        let sets = done
            .into_iter()
            .map(|(scope, (set, replaced))| {
                if let Some(replaced) = replaced {
                    patched = true;
                    memo.forget_virtual_hosts(&replaced);
                }
                (scope, set)
            })
            .collect();
        // (A patched set's unchanged pieces were not looked up: a sweep now would drop them.)
        if !patched && let Some(m) = memo.memo {
            m.sweep(memo.generation);
        }
        sets
    }

    fn translate_once(
        &self,
        gate: &Mutex<()>,
        scope: ProxyScope,
        generation: u64,
        snapshot: &MeshSnapshot,
        memo: &TranslationMemo,
    ) -> Arc<ResourceSet> {
        let _translating = gate.lock().expect("translation gate");
        if let Some(e) = self.cache.get(&scope)
            && e.0 >= generation
        {
            return e.1.clone();
        }
        let set = self.build_set(snapshot, &scope, &Memo::of(memo, generation));
        // A newer snapshot may have landed meanwhile; never overwrite a newer entry.
        let mut entry = self.cache.entry(scope).or_insert((generation, set.clone()));
        if entry.0 <= generation {
            *entry = (generation, set.clone());
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::file::{SourceMemory, load_config_dir};

    /// The bookinfo example, loaded once (policy ages are first-seen times, so a reload would age them).
    fn inputs() -> MeshInputs {
        static LOADED: std::sync::OnceLock<MeshInputs> = std::sync::OnceLock::new();
        LOADED
            .get_or_init(|| {
                let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bookinfo");
                load_config_dir(&dir, &mut SourceMemory::default()).unwrap()
            })
            .clone()
    }

    fn node(cluster: &str, app: &str) -> ProxyNode {
        ProxyNode {
            id: format!("{app}-1"),
            cluster: cluster.into(),
            namespace: "default".into(),
            network: String::new(),
            role: crate::xds::node::ProxyRole::Sidecar,
            labels: [("app".to_string(), app.to_string())].into(),
            outbound_bind: None,
            interception: crate::xds::node::InterceptionMode::None,
            service_account: "default".into(),
            instance_ips: Vec::new(),
            app_address: None,
            envoy_version: String::new(),
            delta_ads: false,
        }
    }

    #[test]
    fn an_endpoint_change_patches_eds_exactly_as_a_full_translation_would() {
        let (notifier, mut changes) = ChangeNotifier::channel();
        let mesh = MeshResources::new(notifier);
        mesh.update(inputs());
        assert!(mesh.is_ready() && changes.try_recv().is_ok());
        let nodes = [node("management-plane", "productpage"), node("remote-cluster", "ratings")];
        let before: Vec<_> = nodes.iter().map(|n| mesh.resources_for(n)).collect();
        assert!(Arc::ptr_eq(&before[0], &mesh.resources_for(&nodes[0])), "one translation per scope");

        // reviews-v3 gets a second endpoint in remote-cluster; v1 becomes unready.
        let mut next = inputs();
        let remote = Arc::make_mut(next.clusters.get_mut("remote-cluster").unwrap());
        let eps = remote.endpoints.get_mut(&("default".to_string(), "reviews".to_string())).unwrap();
        let mut extra = eps[0].clone();
        extra.address = "127.0.20.24".into();
        eps.push(extra);
        let local = Arc::make_mut(next.clusters.get_mut("management-plane").unwrap());
        local.endpoints.get_mut(&("default".to_string(), "reviews".to_string())).unwrap()[0].ready = false;
        let snapshot_before = mesh.snapshot();
        let expected = MeshSnapshot::build(next.clone(), &mut LastGood::default());
        assert_eq!(
            classify_change(&snapshot_before, &expected),
            SnapshotChange::Endpoints(
                [ServiceKey::new("management-plane", "default", "reviews"), ServiceKey::new("remote-cluster", "default", "reviews")].into()
            )
        );
        mesh.update(next);
        assert!(changes.try_recv().is_ok(), "an endpoint change is pushed");
        for (i, n) in nodes.iter().enumerate() {
            let patched = mesh.resources_for(n);
            let full = translate::translate(&mesh.snapshot(), &scope_of(n));
            assert_eq!(*patched, full, "patched EDS equals a full translation for {}", n.id);
            assert_ne!(*patched, *before[i]);
            for ty in [ResourceType::Cluster, ResourceType::Listener, ResourceType::Route] {
                for (name, r) in patched.of_type(ty) {
                    assert!(Arc::ptr_eq(r, &before[i].of_type(ty)[name]), "{ty} {name} is shared, not rebuilt");
                }
            }
        }
    }

    #[test]
    fn a_captured_proxys_own_endpoint_appearing_gives_it_its_inbound_side() {
        let (notifier, mut changes) = ChangeNotifier::channel();
        let mesh = MeshResources::new(notifier);
        // productpage's sidecar connects before its pod is an endpoint (not ready yet).
        let mut starting = inputs();
        let local = Arc::make_mut(starting.clusters.get_mut("management-plane").unwrap());
        let ip = local.endpoints[&("default".to_string(), "productpage".to_string())][0].address.clone();
        local.endpoints.remove(&("default".to_string(), "productpage".to_string()));
        mesh.update(starting);
        let _ = changes.try_recv();
        let proxy = ProxyNode {
            interception: crate::xds::node::InterceptionMode::Redirect,
            instance_ips: vec![ip],
            ..node("management-plane", "productpage")
        };
        assert!(mesh.resources_for(&proxy).get(ResourceType::Cluster, "inbound|9080||").is_none());
        mesh.update(inputs());
        assert!(changes.try_recv().is_ok());
        let after = mesh.resources_for(&proxy);
        assert!(after.get(ResourceType::Cluster, "inbound|9080||").is_some(), "the pod's port is served once it is an endpoint");
        assert_eq!(*after, translate::translate(&mesh.snapshot(), &scope_of(&proxy)));
    }

    #[test]
    fn captured_replicas_at_different_addresses_share_one_translation() {
        let (notifier, _changes) = ChangeNotifier::channel();
        let mesh = MeshResources::new(notifier);
        mesh.update(inputs());
        let snapshot = mesh.snapshot();
        let reviews = &snapshot.clusters["management-plane"].endpoints[&("default".to_string(), "reviews".to_string())];
        let replica = |i: usize| ProxyNode {
            id: format!("reviews-{i}"),
            interception: crate::xds::node::InterceptionMode::Redirect,
            instance_ips: vec![reviews[i].address.clone()],
            ..node("management-plane", "reviews")
        };
        let (a, b) = (mesh.resources_for(&replica(0)), mesh.resources_for(&replica(1)));
        assert!(Arc::ptr_eq(&a, &b), "one translation for both replicas");
        assert!(a.get(ResourceType::Cluster, "inbound|9080||").is_some(), "each serves 9080");
        assert_eq!(*a, translate::translate(&snapshot, &scope_of(&replica(0))), "the same resources as translating its own addresses");
        // A proxy at an address that serves nothing is another scope (no inbound port).
        let idle = ProxyNode { instance_ips: vec!["10.255.0.1".into()], ..replica(0) };
        let other = mesh.resources_for(&idle);
        assert!(!Arc::ptr_eq(&a, &other) && other.get(ResourceType::Cluster, "inbound|9080||").is_none());
    }

    #[test]
    fn unchanged_inputs_do_not_push_and_policy_changes_retranslate() {
        let (notifier, mut changes) = ChangeNotifier::channel();
        let mesh = MeshResources::new(notifier);
        mesh.update(inputs());
        let _ = changes.try_recv();
        let n = node("management-plane", "productpage");
        let first = mesh.resources_for(&n);
        mesh.update(inputs());
        assert!(changes.try_recv().is_err(), "nothing changed, nothing pushed");
        assert!(Arc::ptr_eq(&first, &mesh.resources_for(&n)));
        let mut no_policy = inputs();
        no_policy.traffic_policies.clear();
        mesh.update(no_policy);
        assert!(changes.try_recv().is_ok());
        let after = mesh.resources_for(&n);
        assert!(after.get(ResourceType::Cluster, "outbound|9080|version-v1|reviews.default.svc.cluster.local").is_none());
        assert!(first.get(ResourceType::Cluster, "outbound|9080|version-v1|reviews.default.svc.cluster.local").is_some());
    }

    #[test]
    fn a_sidecar_change_retranslates_the_proxies_it_scopes() {
        let (notifier, mut changes) = ChangeNotifier::channel();
        let mesh = MeshResources::new(notifier);
        mesh.update(inputs());
        let _ = changes.try_recv();
        let n = node("management-plane", "productpage");
        let ratings = "outbound|9080||ratings.default.svc.cluster.local";
        assert!(mesh.resources_for(&n).get(ResourceType::Cluster, ratings).is_some());
        let mut scoped = inputs();
        let selector: &[(&str, &str)] = &[("app", "productpage")];
        scoped.sidecars.push(crate::model::sidecar::sidecar_object(
            "default",
            "productpage",
            "test",
            Some(selector),
            &["./reviews.default.svc.cluster.local"],
        ));
        let details = node("management-plane", "details");
        let _ = mesh.resources_for(&details);
        mesh.update(scoped);
        assert!(changes.try_recv().is_ok(), "a Sidecar change pushes");
        // The selector reads a label no policy read before: productpage and
        // details (one scope until now) are translated apart, before the push.
        let generation = mesh.current.read().unwrap().generation;
        for (proxy, scoped) in [(&n, true), (&details, false)] {
            let scope = scope_of(proxy).resolved(&mesh.snapshot());
            let cached = mesh.cache.get(&scope).map(|e| (e.0, e.1.clone())).expect("translated in update");
            assert_eq!(cached.0, generation);
            let set = mesh.resources_for(proxy);
            assert!(Arc::ptr_eq(&set, &cached.1), "the push is a cache hit");
            assert_eq!(set.get(ResourceType::Cluster, ratings).is_none(), scoped);
        }
        let after = mesh.resources_for(&n);
        assert!(after.get(ResourceType::Cluster, "outbound|9080||reviews.default.svc.cluster.local").is_some());
    }

    #[test]
    fn a_full_change_translates_the_served_scopes_before_it_is_published() {
        let (notifier, mut changes) = ChangeNotifier::channel();
        let mesh = MeshResources::new(notifier);
        mesh.update(inputs());
        let _ = changes.try_recv();
        let served = node("management-plane", "productpage");
        let other = node("remote-cluster", "reviews");
        let first = mesh.resources_for(&served);
        let mut no_policy = inputs();
        no_policy.traffic_policies.clear();
        mesh.update(no_policy.clone());
        assert!(changes.try_recv().is_ok());
        // Already translated for the new snapshot when the push is announced.
        let generation = mesh.current.read().unwrap().generation;
        let scope = scope_of(&served).resolved(&mesh.snapshot());
        let cached = mesh.cache.get(&scope).map(|e| (e.0, e.1.clone())).expect("translated in update");
        assert_eq!(cached.0, generation);
        assert!(!Arc::ptr_eq(&cached.1, &first));
        assert!(cached.1.get(ResourceType::Cluster, "outbound|9080|version-v1|reviews.default.svc.cluster.local").is_none());
        assert!(Arc::ptr_eq(&cached.1, &mesh.resources_for(&served)), "the push is a cache hit");
        // As a lazy translation would have made it.
        let lazy = MeshResources::new(ChangeNotifier::channel().0);
        lazy.update(no_policy);
        let lazy_set = lazy.resources_for(&served);
        for ty in ResourceType::PUSH_ORDER.into_iter().filter(|t| *t != ResourceType::Secret) {
            assert_eq!(lazy_set.view(ty, None).version, cached.1.view(ty, None).version, "{ty}");
        }
        // A scope no proxy asked for is not translated.
        assert_eq!(mesh.cache.len(), 1);
        let _ = mesh.resources_for(&other);
        assert_eq!(mesh.cache.len(), 2);
    }

    /// Syncs a delta ADS stream as Envoy does (CDS and LDS wildcard, EDS and
    /// RDS by name, VHDS by route configuration name), ACKing every response.
    fn synced_delta_stream(res: &ResourceSet, now: std::time::Instant) -> crate::xds::delta::DeltaStream {
        use crate::xds::delta::{DeltaRequest, DeltaStream};
        let mut stream = DeltaStream::new_ads();
        let names = |ty: ResourceType| res.of_type(ty).keys().map(|n| bytes::Bytes::copy_from_slice(n.as_bytes())).collect::<Vec<_>>();
        for (ty, subscribe) in [
            (ResourceType::Cluster, Vec::new()),
            (ResourceType::Endpoint, names(ResourceType::Endpoint)),
            (ResourceType::Listener, Vec::new()),
            (ResourceType::Route, names(ResourceType::Route)),
            (ResourceType::VirtualHost, names(ResourceType::Route)),
        ] {
            let request = DeltaRequest { type_url: ty.type_url().into(), resource_names_subscribe: subscribe, ..Default::default() };
            for response in stream.on_request(&request, res, now).unwrap().responses {
                let ack = DeltaRequest { type_url: response.type_url.into(), response_nonce: response.nonce.clone(), ..Default::default() };
                assert!(stream.on_request(&ack, res, now).unwrap().responses.is_empty());
            }
        }
        stream
    }

    #[test]
    fn a_weight_change_sends_a_delta_ads_proxy_only_the_changed_virtual_host() {
        use crate::fixtures::{ScaleSpec, scale_inputs};
        let mesh = MeshResources::new(ChangeNotifier::channel().0);
        let mut inputs = scale_inputs(ScaleSpec { services: 1000, clusters: 3, endpoints: 2, policies: 20, sidecars: false });
        mesh.update(inputs.clone());
        let now = std::time::Instant::now();
        let mut sent_for_one_change = Vec::new();
        for cluster in ["cluster-0", "cluster-1"] {
            let proxy = ProxyNode { delta_ads: true, interception: crate::xds::node::InterceptionMode::Redirect, ..node(cluster, "svc-00001") };
            let before = mesh.resources_for(&proxy);
            assert_eq!(before.of_type(ResourceType::VirtualHost).len(), 3000 + 1, "every service's virtual host, and allow_any");
            assert!(before.of_type(ResourceType::Route).values().all(|r| r.encoded_any().len() < 200), "route configurations carry no hosts");
            sent_for_one_change.push((proxy, synced_delta_stream(&before, now)));
        }
        // shift-0 (svc-00000 of cluster-0): 50/50 becomes 70/50.
        let shift = inputs.traffic_policies[0].spec.traffic_shift.as_mut().unwrap();
        shift.destinations[0].weight = 70;
        mesh.update(inputs);
        for (proxy, mut stream) in sent_for_one_change {
            let after = mesh.resources_for(&proxy);
            let pushed = stream.on_push(&after, now, now).responses;
            let sent: Vec<_> = pushed.iter().flat_map(|r| r.to_message().resources).map(|r| r.name).collect();
            let host = if proxy.cluster == "cluster-0" { "svc-00000.ns-0.svc.cluster.local" } else { "svc-00000.ns-0.svc.cluster-0.global" };
            assert_eq!(sent, [format!("9080/{host}:9080")], "{}: only the changed virtual host", proxy.cluster);
            assert!(pushed.iter().all(|r| r.type_url == ResourceType::VirtualHost.type_url() && r.removed_resources.is_empty()));
            let bytes: usize = pushed.iter().map(|r| r.resources.len()).sum();
            let whole_port: usize = after.of_type(ResourceType::VirtualHost).values().map(|r| r.encoded_any().len()).sum();
            assert!(bytes < 2048, "{}: {bytes} bytes sent for one weight (the port's hosts: {whole_port})", proxy.cluster);
        }
    }

    #[test]
    fn a_policy_change_builds_only_the_pieces_it_touched_and_the_same_resources_as_a_fresh_translation() {
        use crate::fixtures::{ScaleSpec, churn_endpoint, scale_inputs};
        use crate::xds::node::InterceptionMode;
        let mesh = MeshResources::new(ChangeNotifier::channel().0);
        let mut inputs = scale_inputs(ScaleSpec { services: 300, clusters: 3, endpoints: 2, policies: 20, sidecars: false });
        mesh.update(inputs.clone());
        // SotW and delta ADS, explicit and captured, in two clusters and namespaces.
        let proxies: Vec<ProxyNode> = [("cluster-0", "svc-00001", false), ("cluster-1", "svc-00002", true), ("cluster-2", "svc-00003", true)]
            .into_iter()
            .flat_map(|(cluster, app, delta)| {
                let explicit = ProxyNode { delta_ads: delta, ..node(cluster, app) };
                let captured = ProxyNode { interception: InterceptionMode::Redirect, namespace: "ns-3".into(), ..explicit.clone() };
                [explicit, captured]
            })
            .collect();
        for p in &proxies {
            let _ = mesh.resources_for(p);
        }
        // One weight, and in the same update one endpoint of another service.
        inputs.traffic_policies[0].spec.traffic_shift.as_mut().unwrap().destinations[0].weight = 70;
        churn_endpoint(&mut inputs, 1, 7, 1);
        let (old, expected) = (mesh.snapshot(), MeshSnapshot::build(inputs.clone(), &mut LastGood::default()));
        assert_eq!(classify_change(&old, &expected), SnapshotChange::Config([ServiceKey::new("cluster-1", "ns-7", "svc-00007")].into()));
        let memo = mesh.current.read().unwrap().memo.clone();
        let before = memo.built().read();
        mesh.update(inputs.clone());
        assert!(Arc::ptr_eq(&memo, &mesh.current.read().unwrap().memo), "the memo outlives a policy change");
        let after = memo.built().read();
        let (hosts, clusters, endpoints) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
        let fresh = MeshResources::new(ChangeNotifier::channel().0);
        fresh.update(inputs.clone());
        // Per scope: the shifted service's virtual host; the assignments of
        // the changed endpoints and of subsets (built again: a subset's name
        // does not name its labels); nothing else.
        let scopes = proxies.len() as u64;
        assert!(hosts <= scopes, "{hosts} virtual hosts built for one weight across {scopes} scopes");
        assert_eq!(clusters, 0, "no cluster changed");
        let rebuilt = |p: &ProxyNode| {
            let set = fresh.resources_for(p);
            let names = set.of_type(ResourceType::Endpoint).keys();
            names
                .filter(|n| {
                    !n.contains("||") || n.ends_with("|svc-00007.ns-7.svc.cluster-1.global") || n.ends_with("|svc-00007.ns-7.svc.cluster.local")
                })
                .count()
        };
        let at_most: usize = proxies.iter().map(rebuilt).sum();
        assert!(endpoints as usize <= at_most, "{endpoints} endpoint assignments built, {at_most} expected at most");
        let whole: usize = proxies.iter().map(|p| fresh.resources_for(p).of_type(ResourceType::Endpoint).len()).sum();
        assert!(endpoints as usize * 10 < whole, "{endpoints} of {whole} assignments built");
        let same_as_fresh = |mesh: &MeshResources, fresh: &MeshResources| {
            for p in &proxies {
                let (incremental, whole) = (mesh.resources_for(p), fresh.resources_for(p));
                for ty in ResourceType::PUSH_ORDER.into_iter().filter(|t| *t != ResourceType::Secret) {
                    assert_eq!(incremental.of_type(ty), whole.of_type(ty), "{} {}: {ty}", p.cluster, p.id);
                }
            }
        };
        same_as_fresh(&mesh, &fresh);

        // Policies alone: a weight, and another policy's subset (its old
        // subset's cluster goes, the new one comes). Every scope is patched,
        // not walked, and still gets what a fresh provider gives.
        let patches = mesh.counters.scope_patches.get();
        inputs.traffic_policies[0].spec.traffic_shift.as_mut().unwrap().destinations[0].weight = 30;
        inputs.traffic_policies[3].spec.traffic_shift.as_mut().unwrap().destinations[0].subset = [("version".to_string(), "v2".to_string())].into();
        mesh.update(inputs.clone());
        let scopes: BTreeSet<ProxyScope> = proxies.iter().map(|p| scope_of(p).resolved(&mesh.snapshot())).collect();
        assert_eq!(mesh.counters.scope_patches.get() - patches, scopes.len() as u64, "every scope patched, SotW and delta");
        let fresh = MeshResources::new(ChangeNotifier::channel().0);
        fresh.update(inputs);
        same_as_fresh(&mesh, &fresh);
        let moved = proxies.iter().map(|p| mesh.resources_for(p));
        let subset = |set: &ResourceSet, v: &str| set.of_type(ResourceType::Cluster).keys().any(|n| n.contains(&format!("|version-{v}|svc-00003.")));
        assert!(moved.into_iter().all(|set| subset(&set, "v2") && !subset(&set, "v1")), "the subset moved in the patched sets");
    }

    #[test]
    fn a_rejection_only_blames_policies_that_reach_the_proxy_that_rejected() {
        let mesh = MeshResources::new(ChangeNotifier::channel().0);
        let re = "^/(a|b)+$";
        let spec = format!(
            "sourceSelector: {{labels: {{app: productpage}}}}\ndestinationSelector: {{serviceRefs: {{services: [{{cluster: management-plane, name: reviews, namespace: default}}]}}}}\nhttpRequestMatchers: [{{regex: '{re}'}}]\nrequestTimeout: 2s\n"
        );
        let mut inputs = inputs();
        inputs.traffic_policies.push(crate::model::PolicyObject {
            namespace: "service-mesh-hub".into(),
            name: "from-productpage".into(),
            generation: Some(1),
            created_ms: 1,
            origin: "test".into(),
            spec: serde_yaml_ng::from_str(&spec).unwrap(),
            parse_errors: vec![],
        });
        mesh.update(inputs);
        let state = |mesh: &MeshResources| mesh.snapshot().policy_status.iter().find(|(id, _)| id.name == "from-productpage").map(|(_, st)| st.state);
        assert_eq!(state(&mesh), Some(PolicyState::Accepted));
        let message = format!("regex '{re}' refused");
        // details is no client of that policy: its rejection names the regex, and blames nothing.
        mesh.on_rejected(&node("management-plane", "details"), ResourceType::Route, &message);
        assert_eq!(state(&mesh), Some(PolicyState::Accepted));
        assert_eq!(mesh.counters.policy_rollbacks.get(), 0);
        mesh.on_rejected(&node("management-plane", "productpage"), ResourceType::Route, &message);
        assert_eq!(state(&mesh), Some(PolicyState::Invalid));
        assert_eq!(mesh.counters.policy_rollbacks.get(), 1);
    }

    #[test]
    fn streams_reading_during_endpoint_changes_never_translate() {
        use crate::fixtures::{ScaleSpec, churn_endpoint, scale_inputs};
        let mesh = MeshResources::new(ChangeNotifier::channel().0);
        let mut inputs = scale_inputs(ScaleSpec { services: 300, clusters: 2, endpoints: 5, policies: 10, sidecars: false });
        mesh.update(inputs.clone());
        let proxy = ProxyNode { namespace: "ns-1".into(), ..node("cluster-0", "svc-00001") };
        let first = mesh.resources_for(&proxy);
        assert_eq!(mesh.counters.scope_translations.get(), 1);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            // A stream answering requests (ACKs) while the changes land.
            let reader = s.spawn(|| {
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let _ = mesh.resources_for(&proxy);
                    reads += 1;
                }
                reads
            });
            for step in 0..30 {
                churn_endpoint(&mut inputs, step % 2, step, step);
                mesh.update(inputs.clone());
            }
            stop.store(true, Ordering::Relaxed);
            assert!(reader.join().unwrap() > 0);
        });
        // Every change was an EDS patch, published with its sets: no stream
        // ever found the new generation without its set and translated.
        assert_eq!(mesh.counters.scope_translations.get(), 1);
        let last = mesh.resources_for(&proxy);
        assert!(!Arc::ptr_eq(&first, &last));
        assert!(last.of_type(ResourceType::Endpoint).values().any(|r| r.body().value.windows(10).any(|w| w == b"10.200.0.3")));
    }
}
