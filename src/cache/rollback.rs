//! Envoy rejected routes: the policies that made them become INVALID and
//! their last accepted versions serve again.

use std::sync::Arc;

use super::MeshResources;
use crate::model::policy::AppliedPolicy;
use crate::xds::node::ProxyNode;
use crate::xds::resources::ResourceType;

impl MeshResources {
    /// Applies the last inputs again (after a rejection changed what is accepted).
    pub(super) fn reapply(&self) {
        let _one_at_a_time = self.updating.lock().expect("update lock");
        let inputs = self.last_inputs.lock().expect("inputs lock").clone();
        if let Some(inputs) = inputs {
            self.apply(inputs);
        }
    }

    /// A route rejection is blamed on the policies whose regexes it names,
    /// else on the one policy the last change added or changed (if it
    /// changed one), and only ever on policies with a rule that reaches the
    /// proxy that rejected (a proxy cannot reject routes it was never sent):
    /// that version becomes INVALID with Envoy's message, its last accepted
    /// version (or nothing) serves again, for every proxy, and the other
    /// policies are untouched. A rejection neither explains is only reported.
    pub(super) fn roll_back_rejected(&self, proxy: &ProxyNode, ty: ResourceType, message: &str) {
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
