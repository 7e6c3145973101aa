//! Translating the served scopes: whole, or patched where only some
//! services' rules changed, on as many threads as there are cores.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::MeshResources;
use crate::model::{MeshSnapshot, ServiceKey};
use crate::translate::memo::{Memo, TranslationMemo, VirtualHostKey};
use crate::translate::{self, ProxyScope};
use crate::xds::resources::{ResourceSet, ResourceType};

/// A scope's new set, and, when it was patched, the memo's virtual hosts the patch replaced.
pub(super) type ScopeSet = (Arc<ResourceSet>, Option<Vec<VirtualHostKey>>);

/// What a patch of the served scopes' sets starts from: the snapshot and
/// generation they were translated from, and the services whose rules changed.
#[derive(Clone, Copy)]
pub(super) struct Patch<'a> {
    pub(super) old: &'a MeshSnapshot,
    pub(super) generation: u64,
    pub(super) changed: &'a BTreeSet<ServiceKey>,
}

impl MeshResources {
    /// One scope's resources: translation, its secrets, shared with equal ones.
    pub(super) fn build_set(&self, snapshot: &MeshSnapshot, scope: &ProxyScope, memo: &Memo<'_>) -> Arc<ResourceSet> {
        self.counters.scope_translations.inc();
        let mut set = translate::translate_with(snapshot, scope, memo);
        self.add_secrets(snapshot, scope, &mut set);
        self.interner.share(&mut set);
        Arc::new(set)
    }

    /// A served scope's set, patched when `patch` allows and the cache holds
    /// its set of that generation (with the virtual hosts the patch replaced).
    pub(super) fn patched_or_built(&self, snapshot: &MeshSnapshot, scope: &ProxyScope, memo: &Memo<'_>, patch: Option<Patch<'_>>) -> ScopeSet {
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
    pub(super) fn translate_scopes(
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

    pub(super) fn translate_once(
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
