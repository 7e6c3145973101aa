//! What changed in the policies' and mesh objects' status, and new input
//! errors, in the log.

use std::collections::BTreeSet;

use crate::model::MeshSnapshot;
use crate::model::policy::PolicyState;

pub(super) fn log_policy_changes(old: &MeshSnapshot, new: &MeshSnapshot) {
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
