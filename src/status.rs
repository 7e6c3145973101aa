//! Writes each TrafficPolicy's `status` (ACCEPTED / INVALID / CONFLICT, with
//! messages and `observedGeneration`) into the management cluster. Only the
//! replica that holds the Lease writes; every replica serves xDS.
//!
//! The Lease loop is the usual one (client-go's leaderelection without
//! fencing): take the Lease when it is free or its holder has not renewed for
//! `lease_duration`, renew every third of it, and write with optimistic
//! concurrency (resourceVersion) so two replicas cannot both win one round.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use tokio::sync::watch;

use crate::cache::MeshResources;
use crate::model::api::{
    AccessControlPolicy, ApprovalStatus, ConflictError, NETWORKING_GROUP_VERSION, PolicyObjectStatus, Sidecar, TrafficPolicy, VirtualMesh,
};
use crate::model::{MeshObjectId, MeshObjectStatus, PolicyId, PolicyState, PolicyStatus};

pub const FIELD_MANAGER: &str = "meshpilot";

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

/// The `status` meshpilot writes for one TrafficPolicy (the seed's v0.5/v0.6
/// shape: translationStatus, validationStatus, conflictErrors,
/// observedGeneration; plus the generation actually serving).
pub fn status_json(status: &PolicyStatus) -> Value {
    let message = status.messages.join("; ");
    let invalid = status.state == PolicyState::Invalid;
    let typed = PolicyObjectStatus {
        observed_generation: status.observed_generation,
        translation_status: Some(ApprovalStatus { state: status.state.to_string(), message: message.clone() }),
        validation_status: Some(ApprovalStatus {
            state: if invalid { "INVALID" } else { "ACCEPTED" }.into(),
            message: if invalid { message } else { String::new() },
        }),
        conflict_errors: if status.state == PolicyState::Conflict {
            status.messages.iter().map(|m| ConflictError { configuration_target: None, error_message: m.clone() }).collect()
        } else {
            Vec::new()
        },
        serving_generation: status.serving_generation,
        services: status.services.clone(),
        not_yet_supported: Vec::new(),
    };
    serde_json::to_value(typed).expect("status serializes")
}

/// The `status` of a VirtualMesh or AccessControlPolicy.
pub fn mesh_object_status_json(status: &MeshObjectStatus) -> Value {
    let typed = PolicyObjectStatus {
        observed_generation: status.observed_generation,
        translation_status: Some(ApprovalStatus { state: status.state.to_string(), message: status.messages.join("; ") }),
        not_yet_supported: status.not_yet_supported.clone(),
        serving_generation: status.serving_generation,
        ..Default::default()
    };
    serde_json::to_value(typed).expect("status serializes")
}

/// One round of the Lease: returns whether this replica holds it now.
pub async fn try_acquire_or_renew(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    let now = k8s_openapi::jiff::Timestamp::now();
    let secs = cfg.duration.as_secs().max(1) as i32;
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(cfg.name.clone()), namespace: Some(cfg.namespace.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            let mine = spec.holder_identity.as_deref() == Some(cfg.identity.as_str());
            let renewed = spec.renew_time.as_ref().map(|t| t.0).unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
            let duration = spec.lease_duration_seconds.unwrap_or(secs) as i64;
            let expired = now.as_second() - renewed.as_second() > duration;
            if !mine && !expired {
                return Ok(false);
            }
            if !mine {
                spec.holder_identity = Some(cfg.identity.clone());
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(secs);
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Runs until the process ends: holds or waits for the Lease, and while
/// holding it writes every policy's status whenever the snapshot changes.
pub async fn run_status_writer(client: Client, cfg: LeaseConfig, resources: Arc<MeshResources>, mut snapshots: watch::Receiver<u64>) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let renew_every = cfg.duration / 3;
    let mut leader = false;
    let mut written: HashMap<PolicyId, Value> = HashMap::new();
    let mut written_objects: HashMap<MeshObjectId, Value> = HashMap::new();
    let mut renew = tokio::time::interval(renew_every);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = renew.tick() => {
                let was = leader;
                leader = match try_acquire_or_renew(&leases, &cfg).await {
                    Ok(held) => held,
                    Err(e) => {
                        tracing::warn!(error = %e, "lease round failed");
                        false
                    }
                };
                if leader != was {
                    tracing::info!(identity = %cfg.identity, leader, "status-writer lease changed hands");
                    written.clear();
                    written_objects.clear();
                }
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        if !leader {
            continue;
        }
        let snapshot = resources.snapshot();
        for (id, status) in &snapshot.policy_status {
            let body = status_json(status);
            if written.get(id) == Some(&body) {
                continue;
            }
            let api: Api<TrafficPolicy> = Api::namespaced(client.clone(), &id.namespace);
            let patch = json!({ "apiVersion": NETWORKING_GROUP_VERSION, "kind": "TrafficPolicy", "status": body });
            match api.patch_status(&id.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await {
                Ok(_) => {
                    tracing::info!(policy = %id, state = %status.state, "wrote TrafficPolicy status");
                    written.insert(id.clone(), body);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => tracing::warn!(policy = %id, error = %e, "writing TrafficPolicy status failed; retrying on the next round"),
            }
        }
        written.retain(|id, _| snapshot.policy_status.contains_key(id));
        for (id, status) in &snapshot.mesh_object_status {
            let body = mesh_object_status_json(status);
            if written_objects.get(id) == Some(&body) {
                continue;
            }
            let ar = match id.kind.as_str() {
                "VirtualMesh" => ApiResource::erase::<VirtualMesh>(&()),
                "Sidecar" => ApiResource::erase::<Sidecar>(&()),
                _ => ApiResource::erase::<AccessControlPolicy>(&()),
            };
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &id.namespace, &ar);
            let patch = json!({ "apiVersion": ar.api_version, "kind": id.kind, "status": body });
            match api.patch_status(&id.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await {
                Ok(_) => {
                    written_objects.insert(id.clone(), body);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => tracing::warn!(object = %id, error = %e, "writing status failed; retrying on the next round"),
            }
        }
        written_objects.retain(|id, _| snapshot.mesh_object_status.contains_key(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: PolicyState, messages: &[&str]) -> PolicyStatus {
        PolicyStatus {
            state,
            observed_generation: Some(3),
            serving_generation: Some(2),
            messages: messages.iter().map(|m| m.to_string()).collect(),
            services: vec!["reviews.default.management-plane".into()],
            origin: "cluster management-plane".into(),
        }
    }

    #[test]
    fn invalid_status_names_the_field_and_the_serving_generation() {
        let v = status_json(&status(PolicyState::Invalid, &["spec.trafficShift.destinations[0].destination: unknown"]));
        assert_eq!(v["translationStatus"]["state"], "INVALID");
        assert_eq!(v["validationStatus"]["state"], "INVALID");
        assert_eq!(v["validationStatus"]["message"], "spec.trafficShift.destinations[0].destination: unknown");
        assert_eq!(v["observedGeneration"], 3);
        assert_eq!(v["servingGeneration"], 2);
        assert!(v.get("conflictErrors").is_none());
    }

    #[test]
    fn conflict_status_lists_conflict_errors() {
        let v = status_json(&status(PolicyState::Conflict, &["a", "b"]));
        assert_eq!(v["translationStatus"]["state"], "CONFLICT");
        assert_eq!(v["validationStatus"]["state"], "ACCEPTED");
        assert_eq!(v["conflictErrors"][1]["errorMessage"], "b");
    }

    #[test]
    fn mesh_objects_report_what_is_not_yet_supported() {
        let v = mesh_object_status_json(&MeshObjectStatus {
            state: PolicyState::Accepted,
            observed_generation: Some(1),
            messages: vec![],
            not_yet_supported: vec!["spec.federation: not yet supported".into()],
            serving_generation: None,
        });
        assert_eq!(v["translationStatus"]["state"], "ACCEPTED");
        assert_eq!(v["notYetSupported"][0], "spec.federation: not yet supported");
    }
}
