//! The incremental (delta) xDS stream state machine (sans-IO).
//!
//! Per type it tracks the client's subscriptions (wildcard and explicit names)
//! and the version of every resource the client holds, and answers with what
//! differs: changed resources, and `removed_resources` for deleted ones or
//! subscribed names that do not exist.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::rpc::Status;

use super::resources::{Resource, ResourceSet, ResourceType};
use super::sotw::{ProtocolError, Step, StreamEvent};
use super::status::{Reply, TypeLedger, TypeStatus};
use super::view::{EntryKind, NameSet, ResourceView, delta_entries, intern_names, intern_request_names};
use super::wire::DeltaResponse;

/// A `DeltaDiscoveryRequest` as the server reads it: the same wire format,
/// with the subscribed and unsubscribed names left as slices of the received
/// bytes. A proxy's first EDS request subscribes to every cluster (3,100 in
/// the scale fixture): decoded as `String`s and inserted into a new set per
/// stream, that had been a fifth of the control plane's CPU during a fleet
/// sync, although a fleet's proxies of one scope name the same set.
/// (`resource_locators_*`, fields 8 and 9, are not read: meshpilot does not
/// serve xdstp.)
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaRequest {
    #[prost(message, optional, tag = "1")]
    pub node: Option<Node>,
    #[prost(string, tag = "2")]
    pub type_url: String,
    #[prost(bytes = "bytes", repeated, tag = "3")]
    pub resource_names_subscribe: Vec<Bytes>,
    #[prost(bytes = "bytes", repeated, tag = "4")]
    pub resource_names_unsubscribe: Vec<Bytes>,
    #[prost(btree_map = "string, string", tag = "5")]
    pub initial_resource_versions: BTreeMap<String, String>,
    #[prost(string, tag = "6")]
    pub response_nonce: String,
    #[prost(message, optional, tag = "7")]
    pub error_detail: Option<Status>,
}

/// A name from a request (names are UTF-8 on the wire; anything else cannot
/// match a resource and is kept as its lossy form).
fn name_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[derive(Debug, Clone)]
struct DeltaWatch {
    wildcard: bool,
    /// Explicitly subscribed names, interned (shared by streams naming the same set).
    explicit: NameSet,
    /// What the client holds after our last response (a view shared by every
    /// stream of the same scope and subscription).
    held: Arc<ResourceView>,
    /// Versions the client said it holds when it (re)connected, until the first response.
    reported: Option<BTreeMap<String, String>>,
    /// Explicitly subscribed names we already reported as absent.
    told_absent: BTreeSet<String>,
    ledger: TypeLedger,
    /// A config change not sent yet because the client has not answered our
    /// last response of this type: when the first such change happened.
    pending: Option<Instant>,
}

impl Default for DeltaWatch {
    fn default() -> Self {
        DeltaWatch {
            wildcard: false,
            explicit: intern_names(BTreeSet::new()),
            held: ResourceView::empty(),
            reported: None,
            told_absent: BTreeSet::new(),
            ledger: TypeLedger::default(),
            pending: None,
        }
    }
}

impl DeltaWatch {
    /// Forgets that the client holds `names` (they will be sent again if wanted).
    fn forget(&mut self, names: &BTreeSet<String>) {
        if names.is_empty() {
            return;
        }
        if names.iter().any(|n| self.held.get(n).is_some()) {
            let kept = self.held.resources.iter().filter(|r| !names.contains(&r.name)).cloned().collect();
            self.held = Arc::new(ResourceView::new(kept));
        }
        if let Some(reported) = &mut self.reported {
            reported.retain(|n, _| !names.contains(n));
        }
        self.told_absent.retain(|n| !names.contains(n));
    }
}

/// One delta stream (ADS or single-type).
#[derive(Debug)]
pub struct DeltaStream {
    /// Boxed: a map node has room for 11 entries, and unboxed it had been
    /// 3.5 KB of every stream for its five or six.
    watches: BTreeMap<ResourceType, Box<DeltaWatch>>,
    only_type: Option<ResourceType>,
    nonce_counter: u64,
    /// How long a push waits for the reply to the last response of its type.
    reply_wait_limit: std::time::Duration,
}

impl DeltaStream {
    pub fn new_ads() -> Self {
        DeltaStream { watches: BTreeMap::new(), only_type: None, nonce_counter: 0, reply_wait_limit: super::status::REPLY_WAIT_LIMIT }
    }

    pub fn new_single(ty: ResourceType) -> Self {
        DeltaStream { watches: BTreeMap::new(), only_type: Some(ty), nonce_counter: 0, reply_wait_limit: super::status::REPLY_WAIT_LIMIT }
    }

    /// Delta ADS (every type on one stream), where VHDS can ride along.
    pub fn is_aggregated(&self) -> bool {
        self.only_type.is_none()
    }

    /// How long a push waits for the reply to the last response of its type
    /// (`REPLY_WAIT_LIMIT` unless set).
    pub fn with_reply_wait_limit(mut self, limit: std::time::Duration) -> Self {
        self.reply_wait_limit = limit;
        self
    }

    pub fn on_request(&mut self, req: &DeltaRequest, resources: &ResourceSet, now: Instant) -> Result<Step<DeltaResponse>, ProtocolError> {
        let ty = ResourceType::from_type_url(&req.type_url).ok_or_else(|| ProtocolError::UnknownType(req.type_url.clone()))?;
        if let Some(only) = self.only_type
            && only != ty
        {
            return Err(ProtocolError::WrongType { got: ty, only });
        }
        let mut step = Step::default();
        let first = !self.watches.contains_key(&ty);
        let watch = self.watches.entry(ty).or_default();
        let error = req.error_detail.as_ref().map(|e| e.message.as_str());
        match watch.ledger.on_reply(&req.response_nonce, error, now) {
            Reply::Stale => step.events.push(StreamEvent::StaleNonce { ty, nonce: req.response_nonce.clone() }),
            Reply::Nack { message } => step.events.push(StreamEvent::Nacked { ty, message }),
            Reply::Ack { latency } => step.events.push(StreamEvent::Acked { ty, latency }),
            Reply::Initial => {}
        }
        // Subscription changes are honoured even with a stale nonce.
        let changed_subscription = !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty();
        if first {
            if !req.initial_resource_versions.is_empty() {
                watch.reported = Some(req.initial_resource_versions.iter().map(|(n, v)| (n.clone(), v.clone())).collect());
            }
            // Legacy wildcard: the first request names nothing.
            if req.resource_names_subscribe.is_empty() {
                watch.wildcard = true;
            }
        }
        let first_names_only = first && req.resource_names_unsubscribe.is_empty() && !req.resource_names_subscribe.iter().any(|n| &n[..] == b"*");
        if changed_subscription && first_names_only {
            // A stream's first subscription to names only: the interned set
            // another stream of the fleet already named, when there is one.
            watch.explicit = intern_request_names(&req.resource_names_subscribe);
        } else if changed_subscription {
            let mut explicit = (*watch.explicit).clone();
            let mut forget = BTreeSet::new();
            for name in &req.resource_names_subscribe {
                if &name[..] == b"*" {
                    watch.wildcard = true;
                } else {
                    explicit.insert(name_of(name));
                    // A re-subscription must be answered with the resource again.
                    if !first {
                        forget.insert(name_of(name));
                    }
                }
            }
            for name in &req.resource_names_unsubscribe {
                if &name[..] == b"*" {
                    watch.wildcard = false;
                } else {
                    let name = name_of(name);
                    explicit.remove(&name);
                    // Still covered by the wildcard: must be answered (resent); otherwise dropped.
                    forget.insert(name);
                }
            }
            if !watch.wildcard {
                // What is no longer subscribed is no longer held (and not reported removed).
                forget.extend(watch.held.resources.iter().filter(|r| !ty.subscription_covers(&explicit, &r.name)).map(|r| r.name.clone()));
            }
            watch.explicit = intern_names(explicit);
            watch.forget(&forget);
        }
        if (first || changed_subscription)
            && let Some(resp) = self.respond(ty, resources, now, None, first)
        {
            let cds = ty == ResourceType::Cluster && resp.resource_count > 0;
            step.responses.push(resp);
            if cds {
                self.rewarm_endpoints(now);
                if let Some(eds) = self.respond(ResourceType::Endpoint, resources, now, None, false) {
                    step.responses.push(eds);
                }
            }
        }
        step.responses.extend(self.send_pending(resources, now));
        Ok(step)
    }

    /// A push to a stream none of whose types may be sent now (each waits
    /// for the reply to its last response): the change is noted as
    /// [`on_push`](Self::on_push) notes it, and goes out with the replies.
    /// Returns false, noting nothing, when some type could be sent: then
    /// `on_push` with the resources. (Under churn at 10,000 proxies most
    /// streams wait for their reply when a push comes; looking their sets up
    /// for nothing had been a part of every push's cost.)
    pub fn defer_push(&mut self, change_at: Instant, now: Instant) -> bool {
        if !self.watches.values().all(|w| w.ledger.awaiting_reply(now, self.reply_wait_limit)) {
            return false;
        }
        self.note_change(change_at);
        true
    }

    /// Every watched type has a change to send, the oldest not sent yet at `change_at` or before.
    fn note_change(&mut self, change_at: Instant) {
        for watch in self.watches.values_mut() {
            watch.pending.get_or_insert(change_at);
        }
    }

    /// A config change: the differences for every watched type, in push order.
    /// A type whose last response the client has not answered yet waits (see
    /// `TypeLedger::awaiting_reply`), and gets this change merged with any
    /// later ones when the client does.
    pub fn on_push(&mut self, resources: &ResourceSet, change_at: Instant, now: Instant) -> Step<DeltaResponse> {
        self.note_change(change_at);
        Step { responses: self.send_pending(resources, now), events: Vec::new() }
    }

    /// Sends, in push order, the differences of every type with a change not
    /// sent yet whose last response was answered. A type that must wait holds
    /// back the types after it (make-before-break).
    fn send_pending(&mut self, resources: &ResourceSet, now: Instant) -> Vec<DeltaResponse> {
        let mut responses = Vec::new();
        let mut held_back = false;
        for ty in ResourceType::PUSH_ORDER {
            let Some(watch) = self.watches.get(&ty) else {
                continue;
            };
            let Some(change_at) = watch.pending else {
                continue;
            };
            if held_back || watch.ledger.awaiting_reply(now, self.reply_wait_limit) {
                // Only a real difference holds the later types back.
                held_back |= watch.held.version != resources.view(ty, (!watch.wildcard).then_some(&watch.explicit)).version;
                continue;
            }
            if let Some(resp) = self.respond(ty, resources, now, Some(change_at), false) {
                if ty == ResourceType::Cluster && resp.resource_count > 0 {
                    self.rewarm_endpoints(change_at);
                }
                responses.push(resp);
            }
        }
        responses
    }

    /// After clusters change, Envoy re-creates them and waits for their endpoints
    /// (cluster warming), so every subscribed endpoint set is sent again.
    fn rewarm_endpoints(&mut self, change_at: Instant) {
        if let Some(eds) = self.watches.get_mut(&ResourceType::Endpoint) {
            eds.held = ResourceView::empty();
            eds.reported = None;
            eds.pending.get_or_insert(change_at);
        }
    }

    fn respond(&mut self, ty: ResourceType, resources: &ResourceSet, now: Instant, change_at: Option<Instant>, force: bool) -> Option<DeltaResponse> {
        let watch = self.watches.get_mut(&ty)?;
        let current = resources.view(ty, (!watch.wildcard).then_some(&watch.explicit));
        let from_held = watch.reported.is_none();
        let changes = from_held.then(|| current.changes_since(&watch.held));
        let (updated, mut removed): (Vec<&Arc<Resource>>, Vec<String>) = match watch.reported.take() {
            // Reconnected: the client holds what it reported.
            Some(reported) => (
                current.resources.iter().filter(|r| reported.get(&r.name) != Some(&r.version)).collect(),
                reported.keys().filter(|n| current.get(n).is_none()).cloned().collect(),
            ),
            None => {
                let changes = changes.as_ref().expect("from the held view");
                (changes.updated.iter().collect(), changes.removed.clone())
            }
        };
        // Explicit names that do not exist are reported removed (once). Without
        // the wildcard the view has one resource per existing explicit name.
        // A namespaced subscription (VHDS) names a namespace, never a resource.
        let some_absent = if ty.namespaced() {
            false
        } else if watch.wildcard {
            !watch.explicit.is_empty()
        } else {
            current.len() < watch.explicit.len()
        };
        if some_absent {
            for name in watch.explicit.iter() {
                if current.get(name).is_none() && watch.held.get(name).is_none() && !watch.told_absent.contains(name) {
                    removed.push(name.clone());
                }
            }
        }
        removed.sort();
        removed.dedup();
        let change_at = change_at.or(watch.pending.take());
        if updated.is_empty() && removed.is_empty() && !force {
            watch.held = current;
            return None;
        }
        if !watch.told_absent.is_empty() {
            for r in &updated {
                watch.told_absent.remove(&r.name);
            }
        }
        for name in &removed {
            if watch.explicit.contains(name) {
                watch.told_absent.insert(name.clone());
            }
        }
        let entries = if let Some(changes) = &changes {
            current.change_entries(changes, EntryKind::Delta)
        } else if updated.len() == current.len() {
            current.delta_entries()
        } else {
            delta_entries(updated.iter().copied())
        };
        let count = updated.len();
        self.nonce_counter += 1;
        let nonce = self.nonce_counter.to_string();
        let system_version = current.version.clone();
        watch.ledger.record_sent(nonce.clone(), system_version.clone(), now, change_at);
        watch.held = current;
        Some(DeltaResponse {
            system_version_info: system_version,
            resources: entries,
            resource_count: count,
            type_url: ty.type_url(),
            removed_resources: removed,
            nonce,
        })
    }

    pub fn status(&self, now: Instant) -> Vec<TypeStatus> {
        self.watches.iter().map(|(ty, w)| w.ledger.view(*ty, w.held.len(), now)).collect()
    }

    /// What the client should hold now, per type.
    pub fn sent(&self) -> BTreeMap<ResourceType, (String, Vec<Arc<Resource>>)> {
        self.watches
            .iter()
            .filter_map(|(ty, w)| {
                let version = w.ledger.sent.as_ref()?.version.clone();
                Some((*ty, (version, w.held.resources.clone())))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::status::SyncState;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::google::rpc::Status;

    fn set(clusters: &[(&str, i32)], endpoints: &[(&str, u32)]) -> ResourceSet {
        let mut s = ResourceSet::new();
        for (c, v) in clusters {
            let cl = Cluster {
                name: c.to_string(),
                per_connection_buffer_limit_bytes: Some(envoy_types::pb::google::protobuf::UInt32Value { value: *v as u32 }),
                ..Default::default()
            };
            s.insert(ResourceType::Cluster, Resource::from_message(*c, &cl));
        }
        for (e, v) in endpoints {
            let cla = ClusterLoadAssignment { cluster_name: format!("{e}-{v}"), ..Default::default() };
            s.insert(ResourceType::Endpoint, Resource::from_message(*e, &cla));
        }
        s
    }

    fn req(ty: ResourceType, sub: &[&str], unsub: &[&str], nonce: &str) -> DeltaRequest {
        DeltaRequest {
            type_url: ty.type_url().into(),
            resource_names_subscribe: sub.iter().map(|s| Bytes::copy_from_slice(s.as_bytes())).collect(),
            resource_names_unsubscribe: unsub.iter().map(|s| Bytes::copy_from_slice(s.as_bytes())).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn nack(ty: ResourceType, nonce: &str, message: &str) -> DeltaRequest {
        DeltaRequest { error_detail: Some(Status { code: 3, message: message.into(), details: vec![] }), ..req(ty, &[], &[], nonce) }
    }

    fn names(r: &DeltaResponse) -> Vec<String> {
        r.to_message().resources.iter().map(|r| r.name.clone()).collect()
    }

    #[test]
    fn streams_subscribing_to_the_same_names_share_one_set_and_get_them_all() {
        let now = Instant::now();
        let res = set(&[("a", 1), ("b", 1)], &[("a", 1), ("b", 1), ("c", 1)]);
        let mut streams = [DeltaStream::new_ads(), DeltaStream::new_ads()];
        let lists: [&[&str]; 2] = [&["a", "b", "c"], &["c", "a", "b", "a"]];
        for (s, list) in streams.iter_mut().zip(lists) {
            let step = s.on_request(&req(ResourceType::Endpoint, list, &[], ""), &res, now).unwrap();
            assert_eq!(names(&step.responses[0]), ["a", "b", "c"]);
        }
        let explicit = |s: &DeltaStream| s.watches[&ResourceType::Endpoint].explicit.clone();
        assert!(Arc::ptr_eq(&explicit(&streams[0]), &explicit(&streams[1])), "unsorted and repeated: the same set");
        // A later subscription change still adds to the stream's own set.
        streams[1].on_request(&req(ResourceType::Endpoint, &["d"], &["a"], ""), &res, now).unwrap();
        assert_eq!(explicit(&streams[1]).iter().map(String::as_str).collect::<Vec<_>>(), ["b", "c", "d"]);
        assert_eq!(explicit(&streams[0]).len(), 3);
    }

    #[test]
    fn wildcard_initial_ack_and_change_sends_only_the_difference() {
        let now = Instant::now();
        let mut s = DeltaStream::new_ads();
        let r = s.on_request(&req(ResourceType::Cluster, &[], &[], ""), &set(&[("a", 1), ("b", 1)], &[]), now).unwrap().responses.remove(0);
        assert_eq!(names(&r), ["a", "b"]);
        let ack = s.on_request(&req(ResourceType::Cluster, &[], &[], &r.nonce), &set(&[("a", 1), ("b", 1)], &[]), now).unwrap();
        assert!(ack.responses.is_empty());
        assert_eq!(s.status(now)[0].state, SyncState::Synced);
        // b changes, a is deleted, c is added.
        let push = s.on_push(&set(&[("b", 2), ("c", 1)], &[]), now, now).responses;
        assert_eq!(push.len(), 1);
        assert_eq!(names(&push[0]), ["b", "c"]);
        assert_eq!(push[0].removed_resources, ["a"]);
        // Nothing changed: nothing sent.
        assert!(s.on_push(&set(&[("b", 2), ("c", 1)], &[]), now, now).responses.is_empty());
    }

    #[test]
    fn reconnect_with_initial_versions_sends_only_what_differs() {
        let now = Instant::now();
        let res = set(&[("a", 1), ("b", 1)], &[]);
        let mut s = DeltaStream::new_ads();
        let first = s.on_request(&req(ResourceType::Cluster, &[], &[], ""), &res, now).unwrap().responses.remove(0);
        let version_a = first.to_message().resources[0].version.clone();
        let mut s2 = DeltaStream::new_ads();
        let mut r = req(ResourceType::Cluster, &[], &[], "");
        r.initial_resource_versions.insert("a".into(), version_a);
        r.initial_resource_versions.insert("gone".into(), "x".into());
        let resp = s2.on_request(&r, &res, now).unwrap().responses.remove(0);
        assert_eq!(names(&resp), ["b"], "a is already current");
        assert_eq!(resp.removed_resources, ["gone"]);
        assert_eq!(resp.system_version_info, first.system_version_info, "the client holds the same set as before");
        assert_eq!(s2.status(now)[0].resource_count, 2);
    }

    #[test]
    fn explicit_subscription_missing_then_present_and_resubscribe() {
        let now = Instant::now();
        let mut s = DeltaStream::new_ads();
        let res = set(&[], &[("a", 1)]);
        let r = s.on_request(&req(ResourceType::Endpoint, &["a", "b"], &[], ""), &res, now).unwrap().responses.remove(0);
        assert_eq!(names(&r), ["a"]);
        assert_eq!(r.removed_resources, ["b"], "a subscribed name that does not exist is reported removed");
        s.on_request(&req(ResourceType::Endpoint, &[], &[], &r.nonce), &res, now).unwrap();
        // b appears.
        let res2 = set(&[], &[("a", 1), ("b", 1)]);
        let push = s.on_push(&res2, now, now).responses;
        assert_eq!(names(&push[0]), ["b"]);
        assert!(push[0].removed_resources.is_empty());
        // Re-subscribing to a held name resends it, even with a stale nonce.
        let step = s.on_request(&req(ResourceType::Endpoint, &["a"], &[], "stale"), &res2, now).unwrap();
        assert!(matches!(step.events[0], StreamEvent::StaleNonce { .. }));
        assert_eq!(names(&step.responses[0]), ["a"]);
        // Unsubscribing stops updates for it.
        let step = s.on_request(&req(ResourceType::Endpoint, &[], &["a"], ""), &res2, now).unwrap();
        assert!(step.responses.is_empty());
        assert!(s.on_push(&set(&[], &[("a", 9), ("b", 1)]), now, now).responses.is_empty());
    }

    #[test]
    fn wildcard_plus_explicit_unsubscribe_resends() {
        let now = Instant::now();
        let mut s = DeltaStream::new_ads();
        let res = set(&[("a", 1)], &[]);
        s.on_request(&req(ResourceType::Cluster, &["*", "a"], &[], ""), &res, now).unwrap();
        let step = s.on_request(&req(ResourceType::Cluster, &[], &["a"], ""), &res, now).unwrap();
        assert_eq!(names(&step.responses[0]), ["a"], "still covered by the wildcard: answered");
        // Leaving the wildcard removes what is no longer subscribed.
        let step = s.on_request(&req(ResourceType::Cluster, &[], &["*"], ""), &res, now).unwrap();
        assert!(step.responses.is_empty());
        assert!(s.on_push(&set(&[("a", 2)], &[]), now, now).responses.is_empty());
    }

    fn virtual_hosts(hosts: &[(&str, u32)]) -> ResourceSet {
        let mut s = ResourceSet::new();
        for (name, v) in hosts {
            let vh = envoy_types::pb::envoy::config::route::v3::VirtualHost {
                name: name.to_string(),
                domains: vec![format!("d{v}")],
                ..Default::default()
            };
            s.insert(ResourceType::VirtualHost, Resource::from_message(*name, &vh));
        }
        s
    }

    #[test]
    fn vhds_subscribes_by_route_configuration_name_and_gets_its_hosts() {
        let now = Instant::now();
        let mut s = DeltaStream::new_ads();
        let res = virtual_hosts(&[("9080/a:9080", 1), ("9080/b:9080", 1), ("80/c:80", 1)]);
        let r = s.on_request(&req(ResourceType::VirtualHost, &["9080"], &[], ""), &res, now).unwrap().responses.remove(0);
        assert_eq!(names(&r), ["9080/a:9080", "9080/b:9080"], "the namespace's hosts, not another port's");
        assert!(r.removed_resources.is_empty(), "the namespace itself is never reported absent");
        s.on_request(&req(ResourceType::VirtualHost, &[], &[], &r.nonce), &res, now).unwrap();
        // One host changes, one goes: only those.
        let changed = virtual_hosts(&[("9080/a:9080", 2), ("80/c:80", 2)]);
        let pushed = s.on_push(&changed, now, now).responses.remove(0);
        assert_eq!(names(&pushed), ["9080/a:9080"]);
        assert_eq!(pushed.removed_resources, ["9080/b:9080"]);
        s.on_request(&req(ResourceType::VirtualHost, &[], &[], &pushed.nonce), &changed, now).unwrap();
        // Leaving the namespace: nothing more is sent for it.
        assert!(s.on_request(&req(ResourceType::VirtualHost, &[], &["9080"], ""), &changed, now).unwrap().responses.is_empty());
        assert!(s.on_push(&virtual_hosts(&[("9080/a:9080", 3)]), now, now).responses.is_empty());
    }

    #[test]
    fn nack_is_recorded() {
        let now = Instant::now();
        let mut s = DeltaStream::new_ads();
        let res = set(&[("a", 1)], &[]);
        let r = s.on_request(&req(ResourceType::Cluster, &[], &[], ""), &res, now).unwrap().responses.remove(0);
        let mut n = req(ResourceType::Cluster, &[], &[], &r.nonce);
        n.error_detail = Some(Status { code: 3, message: "bad".into(), details: vec![] });
        let step = s.on_request(&n, &res, now).unwrap();
        assert!(step.responses.is_empty());
        assert_eq!(s.status(now)[0].state, SyncState::Error);
        assert_eq!(s.status(now)[0].last_error.as_deref(), Some("bad"));
    }

    #[test]
    fn cluster_change_resends_endpoints_after_it() {
        let now = Instant::now();
        let res = set(&[("a", 1)], &[("a", 1)]);
        let mut s = synced_to_clusters_and_endpoints_of_a(&res, now);
        let push = s.on_push(&set(&[("a", 2)], &[("a", 1)]), now, now).responses;
        let types: Vec<_> = push.iter().map(|r| ResourceType::from_type_url(r.type_url).unwrap()).collect();
        assert_eq!(types, [ResourceType::Cluster, ResourceType::Endpoint]);
        assert_eq!(names(&push[1]), ["a"]);
    }

    /// An ADS stream subscribed to every cluster and to the endpoints of "a",
    /// with both responses ACKed.
    fn synced_to_clusters_and_endpoints_of_a(res: &ResourceSet, now: Instant) -> DeltaStream {
        let mut s = DeltaStream::new_ads();
        for (ty, names) in [(ResourceType::Cluster, &[][..]), (ResourceType::Endpoint, &["a"][..])] {
            ack_all(&mut s, res, now, |s| s.on_request(&req(ty, names, &[], ""), res, now).unwrap().responses);
        }
        s
    }

    /// Sends what `f` returns back as ACKs (and the ACKs' answers, until none).
    fn ack_all(s: &mut DeltaStream, res: &ResourceSet, now: Instant, f: impl FnOnce(&mut DeltaStream) -> Vec<DeltaResponse>) {
        let mut todo = f(s);
        while let Some(r) = todo.pop() {
            let ty = ResourceType::from_type_url(r.type_url).unwrap();
            todo.extend(s.on_request(&req(ty, &[], &[], &r.nonce), res, now).unwrap().responses);
        }
    }

    /// An ADS stream subscribed to endpoints a and b (version 1 each), every response ACKed.
    fn subscribed_to_endpoints_a_and_b(now: Instant) -> DeltaStream {
        let mut s = DeltaStream::new_ads();
        let res = set(&[("a", 1), ("b", 1)], &[("a", 1), ("b", 1)]);
        ack_all(&mut s, &res, now, |s| s.on_request(&req(ResourceType::Endpoint, &["a", "b"], &[], ""), &res, now).unwrap().responses);
        s
    }

    #[test]
    fn a_push_waits_for_the_reply_to_the_last_response_and_merges() {
        let t0 = Instant::now();
        let ms = |n| t0 + std::time::Duration::from_millis(n);
        let mut s = subscribed_to_endpoints_a_and_b(t0);
        // First change: sent at once.
        let one = set(&[("a", 1), ("b", 1)], &[("a", 2), ("b", 1)]);
        let first = s.on_push(&one, ms(10), ms(10)).responses;
        assert_eq!(first.len(), 1);
        assert_eq!(names(&first[0]), ["a"]);
        // Two more changes before the client answers: nothing is queued behind it.
        let two = set(&[("a", 1), ("b", 1)], &[("a", 3), ("b", 1)]);
        assert!(s.on_push(&two, ms(20), ms(20)).responses.is_empty());
        let three = set(&[("a", 1), ("b", 1)], &[("a", 3), ("b", 2)]);
        assert!(s.on_push(&three, ms(30), ms(30)).responses.is_empty());
        assert_eq!(s.status(ms(30))[0].state, SyncState::Stale);
        // A stale nonce is not the answer.
        let stale = s.on_request(&req(ResourceType::Endpoint, &[], &[], "0"), &three, ms(35)).unwrap();
        assert!(stale.responses.is_empty());
        // The ACK: one response with both later changes, timed from the first of them.
        let step = s.on_request(&req(ResourceType::Endpoint, &[], &[], &first[0].nonce), &three, ms(40)).unwrap();
        assert_eq!(step.responses.len(), 1);
        assert_eq!(names(&step.responses[0]), ["a", "b"]);
        assert_eq!(s.watches[&ResourceType::Endpoint].ledger.sent.as_ref().unwrap().change_at, Some(ms(20)));
        // A NACK also answers: the next change goes out at once.
        s.on_request(&nack(ResourceType::Endpoint, &step.responses[0].nonce, "no"), &three, ms(50)).unwrap();
        let four = set(&[("a", 1), ("b", 1)], &[("a", 4), ("b", 2)]);
        assert_eq!(s.on_push(&four, ms(60), ms(60)).responses.len(), 1);
        // A client that never answers still gets the next change after the limit.
        let five = set(&[("a", 1), ("b", 1)], &[("a", 5), ("b", 2)]);
        assert!(s.on_push(&five, ms(70), ms(70)).responses.is_empty());
        let late = ms(60) + crate::xds::status::REPLY_WAIT_LIMIT;
        assert_eq!(s.on_push(&five, ms(70), late).responses.len(), 1);
    }

    #[test]
    fn a_deferred_push_is_the_same_as_a_push_that_had_to_wait() {
        let t0 = Instant::now();
        let ms = |n| t0 + std::time::Duration::from_millis(n);
        let mut s = subscribed_to_endpoints_a_and_b(t0);
        // Nothing awaits a reply: not deferred, nothing noted.
        assert!(!s.defer_push(ms(5), ms(5)));
        assert_eq!(s.watches[&ResourceType::Endpoint].pending, None);
        let one = set(&[("a", 1), ("b", 1)], &[("a", 2), ("b", 1)]);
        let first = s.on_push(&one, ms(10), ms(10)).responses;
        // Every type awaits its reply: deferred without the resources, and
        // the reply sends the change, timed from it.
        let two = set(&[("a", 1), ("b", 1)], &[("a", 2), ("b", 2)]);
        assert!(s.defer_push(ms(20), ms(20)));
        assert_eq!(s.status(ms(20))[0].state, SyncState::Stale);
        let step = s.on_request(&req(ResourceType::Endpoint, &[], &[], &first[0].nonce), &two, ms(30)).unwrap();
        assert_eq!(step.responses.len(), 1);
        assert_eq!(names(&step.responses[0]), ["b"]);
        assert_eq!(s.watches[&ResourceType::Endpoint].ledger.sent.as_ref().unwrap().change_at, Some(ms(20)));
        // A client that never answers is not deferred past the limit.
        let late = ms(30) + crate::xds::status::REPLY_WAIT_LIMIT;
        assert!(!s.defer_push(late, late));
    }

    #[test]
    fn clusters_waiting_for_their_ack_hold_back_endpoints_then_rewarm_them() {
        let now = Instant::now();
        let res = set(&[("a", 1)], &[("a", 1)]);
        let mut s = synced_to_clusters_and_endpoints_of_a(&res, now);
        let cds = s.on_push(&set(&[("a", 2)], &[("a", 1)]), now, now).responses;
        assert_eq!(cds.len(), 2, "clusters, then endpoints for warming");
        let eds_nonce = cds[1].nonce.clone();
        s.on_request(&req(ResourceType::Endpoint, &[], &[], &eds_nonce), &res, now).unwrap();
        // Clusters and endpoints change while the CDS response is unanswered:
        // endpoints wait behind clusters.
        let next = set(&[("a", 3)], &[("a", 2)]);
        assert!(s.on_push(&next, now, now).responses.is_empty());
        let step = s.on_request(&req(ResourceType::Cluster, &[], &[], &cds[0].nonce), &next, now).unwrap();
        let types: Vec<_> = step.responses.iter().map(|r| ResourceType::from_type_url(r.type_url).unwrap()).collect();
        assert_eq!(types, [ResourceType::Cluster, ResourceType::Endpoint]);
        assert_eq!(names(&step.responses[1]), ["a"]);
    }
}
