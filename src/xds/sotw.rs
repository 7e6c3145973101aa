//! The state-of-the-world stream state machine (sans-IO).
//!
//! It takes discovery requests and config pushes, and says which responses to
//! send. It never touches a socket or a clock: the caller passes `now`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::rpc::Status;

use super::resources::{Resource, ResourceSet, ResourceType};
use super::status::{Reply, TypeLedger, TypeStatus};
use super::view::{EntryKind, NameSet, ResourceView, intern_request_names, same_names};
use super::wire::SotwResponse;

/// A SotW `DiscoveryRequest` as the server reads it: the same wire format,
/// with the resource names left as slices of the received bytes. Every SotW
/// EDS request repeats every cluster's name (3,100 in the scale fixture,
/// ≈220 KB) on each ACK: decoded as `String`s, that was 3,100 allocations per
/// proxy per endpoint push, and an unchanged list (nearly always) needs none.
/// (`resource_locators`, field 7, is not read: meshpilot does not serve xdstp.)
#[derive(Clone, PartialEq, prost::Message)]
pub struct SotwRequest {
    #[prost(string, tag = "1")]
    pub version_info: String,
    #[prost(message, optional, tag = "2")]
    pub node: Option<Node>,
    #[prost(bytes = "bytes", repeated, tag = "3")]
    pub resource_names: Vec<Bytes>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub response_nonce: String,
    #[prost(message, optional, tag = "6")]
    pub error_detail: Option<Status>,
}

/// What a client asked for, for one type (SotW semantics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    /// First request had no names: everything (legacy wildcard).
    LegacyWildcard,
    /// `"*"` was named (plus possibly other names): everything.
    Wildcard,
    /// Exactly these names (possibly none: unsubscribed), interned: streams
    /// that name the same resources share one set.
    Explicit(NameSet),
}

impl Subscription {
    fn names(&self) -> Option<&NameSet> {
        match self {
            Subscription::Explicit(names) => Some(names),
            _ => None,
        }
    }

    /// The next subscription after a request naming `names`. Every SotW request
    /// repeats the whole list: an unchanged list keeps the same set.
    fn next(current: Option<&Subscription>, names: &[Bytes]) -> Subscription {
        if names.iter().any(|n| &n[..] == b"*") {
            return Subscription::Wildcard;
        }
        match (current, names.is_empty()) {
            (None, true) | (Some(Subscription::LegacyWildcard), true) => Subscription::LegacyWildcard,
            (Some(Subscription::Explicit(cur)), _) if same_names(cur, names) => Subscription::Explicit(cur.clone()),
            (_, _) => Subscription::Explicit(intern_request_names(names)),
        }
    }

    /// True when `next` covers a name this one did not.
    fn added_by(&self, next: &Subscription) -> bool {
        match (self, next) {
            (Subscription::Explicit(_), Subscription::LegacyWildcard | Subscription::Wildcard) => true,
            (Subscription::Explicit(old), Subscription::Explicit(new)) => !Arc::ptr_eq(old, new) && !new.is_subset(old),
            _ => false,
        }
    }
}

/// Something the IO layer should know about (for logs and metrics).
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Acked { ty: ResourceType, latency: Option<std::time::Duration> },
    Nacked { ty: ResourceType, message: String },
    StaleNonce { ty: ResourceType, nonce: String },
}

/// The result of one input: responses to send, in order, and events.
#[derive(Debug)]
pub struct Step<R> {
    pub responses: Vec<R>,
    pub events: Vec<StreamEvent>,
}

impl<R> Default for Step<R> {
    fn default() -> Self {
        Step { responses: Vec::new(), events: Vec::new() }
    }
}

/// Errors that end the request (the stream itself may continue).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    #[error("unknown type URL {0:?}")]
    UnknownType(String),
    #[error("type {got} requested on a stream that serves only {only}")]
    WrongType { got: ResourceType, only: ResourceType },
}

#[derive(Debug, Clone)]
struct SotwWatch {
    subscription: Subscription,
    ledger: TypeLedger,
    /// What the client holds after our last response (shared with every
    /// stream of the same scope and subscription).
    sent: Arc<ResourceView>,
    /// Respond to the next request even if it is a plain ACK (Envoy's cluster warming).
    always_respond: bool,
    /// A config change not sent yet because the client has not answered our
    /// last response of this type: when the first such change happened.
    pending: Option<Instant>,
}

/// One SotW stream (ADS or a single-type stream).
#[derive(Debug)]
pub struct SotwStream {
    /// Boxed, as `DeltaStream`'s: a map node has room for 11 entries.
    watches: BTreeMap<ResourceType, Box<SotwWatch>>,
    only_type: Option<ResourceType>,
    nonce_counter: u64,
    /// How long a push waits for the reply to the last response of its type.
    reply_wait_limit: std::time::Duration,
}

/// Types whose SotW responses may carry only the resources that changed
/// (the others carry the full state: an absent listener or cluster is deleted).
/// Envoy applies an EDS response to the clusters it names and leaves the rest.
fn incremental_in_sotw(ty: ResourceType) -> bool {
    ty == ResourceType::Endpoint
}

impl SotwStream {
    /// An ADS stream (every type).
    pub fn new_ads() -> Self {
        SotwStream { watches: BTreeMap::new(), only_type: None, nonce_counter: 0, reply_wait_limit: super::status::REPLY_WAIT_LIMIT }
    }

    /// A single-type stream (`StreamClusters`, `StreamEndpoints`, ...).
    pub fn new_single(ty: ResourceType) -> Self {
        SotwStream { watches: BTreeMap::new(), only_type: Some(ty), nonce_counter: 0, reply_wait_limit: super::status::REPLY_WAIT_LIMIT }
    }

    /// How long a push waits for the reply to the last response of its type
    /// (`REPLY_WAIT_LIMIT` unless set).
    pub fn with_reply_wait_limit(mut self, limit: std::time::Duration) -> Self {
        self.reply_wait_limit = limit;
        self
    }

    fn check_type(&self, type_url: &str) -> Result<ResourceType, ProtocolError> {
        let ty = ResourceType::from_type_url(type_url).ok_or_else(|| ProtocolError::UnknownType(type_url.to_string()))?;
        match self.only_type {
            Some(only) if only != ty => Err(ProtocolError::WrongType { got: ty, only }),
            _ => Ok(ty),
        }
    }

    /// Handles one request from the client against the current resources.
    pub fn on_request(&mut self, req: &SotwRequest, resources: &ResourceSet, now: Instant) -> Result<Step<SotwResponse>, ProtocolError> {
        let ty = self.check_type(&req.type_url)?;
        let mut step = Step::default();
        let error = req.error_detail.as_ref().map(|e| e.message.as_str());
        let watch = self.watches.get_mut(&ty);
        let reply = match watch {
            Some(w) => w.ledger.on_reply(&req.response_nonce, error, now),
            None if req.response_nonce.is_empty() => Reply::Initial,
            None => Reply::Stale,
        };
        match reply {
            Reply::Stale => {
                step.events.push(StreamEvent::StaleNonce { ty, nonce: req.response_nonce.clone() });
                return Ok(step);
            }
            Reply::Nack { message } => {
                // Envoy keeps its last good config; we answer nothing until config
                // changes (or a change held back for this reply is due).
                step.events.push(StreamEvent::Nacked { ty, message });
                step.responses = self.send_pending(resources, now);
                return Ok(step);
            }
            Reply::Ack { latency } => step.events.push(StreamEvent::Acked { ty, latency }),
            Reply::Initial => {}
        }
        let previous = self.watches.get(&ty).map(|w| w.subscription.clone());
        let next = Subscription::next(previous.as_ref(), &req.resource_names);
        let added = previous.as_ref().is_some_and(|p| p.added_by(&next));
        let narrowed = previous.as_ref() != Some(&next);
        let watch = self.watches.entry(ty).or_insert_with(|| {
            Box::new(SotwWatch {
                subscription: next.clone(),
                ledger: TypeLedger::default(),
                sent: ResourceView::empty(),
                always_respond: false,
                pending: None,
            })
        });
        watch.subscription = next;
        let respond = matches!(reply, Reply::Initial) || added || watch.always_respond;
        if respond {
            let mut types = vec![ty];
            if ty == ResourceType::Cluster && self.watches.contains_key(&ResourceType::Endpoint) {
                types.push(ResourceType::Endpoint);
            }
            for t in types {
                step.responses.push(self.respond(t, resources, now, None, false));
            }
        } else if narrowed
            && let Some(w) = self.watches.get_mut(&ty)
            && let Subscription::Explicit(names) = &w.subscription
        {
            // Names dropped from an explicit subscription: forget them so a later
            // re-subscription is answered.
            let kept = w.sent.resources.iter().filter(|r| names.contains(&r.name)).cloned().collect();
            w.sent = Arc::new(ResourceView::new(kept));
        }
        step.responses.extend(self.send_pending(resources, now));
        Ok(step)
    }

    /// Handles a config change: responds for every watched type whose view
    /// changed, unless the client has not answered our last response of that
    /// type yet (see `TypeLedger::awaiting_reply`): then the change is sent,
    /// merged with any later ones, when it does.
    /// `change_at` is when the change behind this push first happened.
    pub fn on_push(&mut self, resources: &ResourceSet, change_at: Instant, now: Instant) -> Step<SotwResponse> {
        for ty in ResourceType::PUSH_ORDER {
            let Some(watch) = self.watches.get_mut(&ty) else {
                continue;
            };
            let view = resources.view(ty, watch.subscription.names());
            if watch.sent.version != view.version || watch.ledger.sent.is_none() {
                watch.pending.get_or_insert(change_at);
            }
        }
        Step { responses: self.send_pending(resources, now), events: Vec::new() }
    }

    /// Sends, in push order, every type with a change not sent yet whose last
    /// response was answered. A type that must wait holds back the types after
    /// it (make-before-break: clusters before the listeners that use them).
    /// After clusters, endpoints are sent too (Envoy's cluster warming).
    fn send_pending(&mut self, resources: &ResourceSet, now: Instant) -> Vec<SotwResponse> {
        let mut responses = Vec::new();
        let (mut clusters_sent, mut held_back) = (false, false);
        for ty in ResourceType::PUSH_ORDER {
            let Some(watch) = self.watches.get_mut(&ty) else {
                continue;
            };
            let warm = ty == ResourceType::Endpoint && clusters_sent;
            if watch.pending.is_some() && !warm && watch.ledger.sent.is_some() {
                let view = resources.view(ty, watch.subscription.names());
                if view.version == watch.sent.version {
                    // Changed and changed back while it waited.
                    watch.pending = None;
                }
            }
            if watch.pending.is_none() && !warm {
                continue;
            }
            if held_back || watch.ledger.awaiting_reply(now, self.reply_wait_limit) {
                held_back = true;
                continue;
            }
            let change_at = watch.pending;
            responses.push(self.respond(ty, resources, now, change_at, !warm));
            clusters_sent |= ty == ResourceType::Cluster;
        }
        responses
    }

    /// Sends the view of `ty`; with `only_changes`, a type that allows it gets
    /// only the resources that differ from what the client holds.
    fn respond(&mut self, ty: ResourceType, resources: &ResourceSet, now: Instant, change_at: Option<Instant>, only_changes: bool) -> SotwResponse {
        self.nonce_counter += 1;
        let nonce = self.nonce_counter.to_string();
        let watch = self.watches.get_mut(&ty).expect("respond only for watched types");
        let view = resources.view(ty, watch.subscription.names());
        let mut body = None;
        if only_changes && incremental_in_sotw(ty) && watch.ledger.sent.is_some() && watch.ledger.error.is_none() {
            let changes = view.changes_since(&watch.sent);
            // Nothing can say "removed" in SotW EDS: removals send everything.
            if changes.removed.is_empty() {
                let entries = view.change_entries(&changes, EntryKind::Sotw);
                body = Some((entries, changes.updated.len()));
            }
        }
        let (entries, count) = body.unwrap_or_else(|| (view.sotw_entries(), view.len()));
        let response = SotwResponse {
            version_info: view.version.clone(),
            resources: entries,
            resource_count: count,
            type_url: ty.type_url(),
            nonce: nonce.clone(),
        };
        let change_at = change_at.or(watch.pending);
        watch.ledger.record_sent(nonce, view.version.clone(), now, change_at);
        watch.sent = view;
        watch.always_respond = false;
        watch.pending = None;
        if ty == ResourceType::Cluster
            && let Some(eds) = self.watches.get_mut(&ResourceType::Endpoint)
        {
            eds.always_respond = true;
        }
        response
    }

    /// The sync status of every type this stream has requested.
    pub fn status(&self, now: Instant) -> Vec<TypeStatus> {
        self.watches.iter().map(|(ty, w)| w.ledger.view(*ty, w.sent.len(), now)).collect()
    }

    /// What was last sent, per type.
    pub fn sent(&self) -> BTreeMap<ResourceType, (String, Vec<Arc<Resource>>)> {
        self.watches
            .iter()
            .filter_map(|(ty, w)| {
                let version = w.ledger.sent.as_ref()?.version.clone();
                Some((*ty, (version, w.sent.resources.clone())))
            })
            .collect()
    }

    pub fn subscription(&self, ty: ResourceType) -> Option<&Subscription> {
        self.watches.get(&ty).map(|w| &w.subscription)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::google::rpc::Status;

    fn set(clusters: &[&str], endpoints: &[(&str, u32)]) -> ResourceSet {
        let mut s = ResourceSet::new();
        for c in clusters {
            s.insert(ResourceType::Cluster, Resource::from_message(*c, &Cluster { name: c.to_string(), ..Default::default() }));
        }
        for (e, port) in endpoints {
            let cla = ClusterLoadAssignment { cluster_name: format!("{e}:{port}"), ..Default::default() };
            s.insert(ResourceType::Endpoint, Resource::from_message(*e, &cla));
        }
        s
    }

    fn req(ty: ResourceType, names: &[&str], nonce: &str, version: &str) -> SotwRequest {
        SotwRequest {
            type_url: ty.type_url().into(),
            resource_names: names.iter().map(|s| Bytes::from(s.to_string())).collect(),
            response_nonce: nonce.into(),
            version_info: version.into(),
            ..Default::default()
        }
    }

    fn nack(ty: ResourceType, nonce: &str, msg: &str) -> SotwRequest {
        SotwRequest { error_detail: Some(Status { code: 3, message: msg.into(), details: vec![] }), ..req(ty, &[], nonce, "") }
    }

    #[test]
    fn sotw_requests_read_what_envoy_sends() {
        use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
        use prost::Message;
        let sent = DiscoveryRequest {
            version_info: "v1".into(),
            node: Some(Node { id: "sidecar~10.0.0.1~p.ns~ns.svc.cluster.local".into(), ..Default::default() }),
            resource_names: vec!["outbound|9080||reviews.default.svc.cluster.local".into(), "b".into()],
            type_url: ResourceType::Endpoint.type_url().into(),
            response_nonce: "7".into(),
            error_detail: Some(Status { code: 3, message: "bad".into(), details: vec![] }),
            ..Default::default()
        };
        let read = SotwRequest::decode(sent.encode_to_vec().as_slice()).unwrap();
        assert_eq!(read.version_info, sent.version_info);
        assert_eq!(read.node, sent.node);
        assert_eq!(read.resource_names, sent.resource_names.iter().map(|n| Bytes::from(n.clone())).collect::<Vec<_>>());
        assert_eq!((read.type_url.as_str(), read.response_nonce.as_str()), (sent.type_url.as_str(), "7"));
        assert_eq!(read.error_detail, sent.error_detail);
    }

    fn names(r: &SotwResponse) -> usize {
        r.resource_count
    }

    #[test]
    fn initial_wildcard_then_ack_then_no_response() {
        let now = Instant::now();
        let res = set(&["a", "b"], &[]);
        let mut s = SotwStream::new_ads();
        let step = s.on_request(&req(ResourceType::Cluster, &[], "", ""), &res, now).unwrap();
        assert_eq!(step.responses.len(), 1);
        let r = &step.responses[0];
        assert_eq!(names(r), 2);
        assert_eq!(s.subscription(ResourceType::Cluster), Some(&Subscription::LegacyWildcard));
        let ack = s.on_request(&req(ResourceType::Cluster, &[], &r.nonce, &r.version_info), &res, now).unwrap();
        assert!(ack.responses.is_empty(), "an ACK is not answered");
        assert!(matches!(ack.events[0], StreamEvent::Acked { ty: ResourceType::Cluster, .. }));
        assert_eq!(s.status(now)[0].state, super::super::status::SyncState::Synced);
    }

    #[test]
    fn nack_is_recorded_and_not_answered() {
        let now = Instant::now();
        let res = set(&["a"], &[]);
        let mut s = SotwStream::new_ads();
        let r = s.on_request(&req(ResourceType::Cluster, &[], "", ""), &res, now).unwrap().responses.remove(0);
        let step = s.on_request(&nack(ResourceType::Cluster, &r.nonce, "invalid cluster a"), &res, now).unwrap();
        assert!(step.responses.is_empty());
        assert_eq!(step.events, vec![StreamEvent::Nacked { ty: ResourceType::Cluster, message: "invalid cluster a".into() }]);
        let st = &s.status(now)[0];
        assert_eq!(st.state, super::super::status::SyncState::Error);
        assert_eq!(st.last_error.as_deref(), Some("invalid cluster a"));
        // A fixed config is pushed and its ACK clears the error.
        let fixed = set(&["a", "b"], &[]);
        let r2 = s.on_push(&fixed, now, now).responses.remove(0);
        s.on_request(&req(ResourceType::Cluster, &[], &r2.nonce, &r2.version_info), &fixed, now).unwrap();
        assert_eq!(s.status(now)[0].state, super::super::status::SyncState::Synced);
    }

    #[test]
    fn stale_nonce_is_ignored() {
        let now = Instant::now();
        let res = set(&["a"], &[]);
        let mut s = SotwStream::new_ads();
        let r1 = s.on_request(&req(ResourceType::Cluster, &[], "", ""), &res, now).unwrap().responses.remove(0);
        // The client has not answered r1: a push waits (at most REPLY_WAIT_LIMIT).
        assert!(s.on_push(&set(&["a", "b"], &[]), now, now).responses.is_empty());
        let later = now + super::super::status::REPLY_WAIT_LIMIT;
        let r2 = s.on_push(&set(&["a", "b"], &[]), now, later).responses.remove(0);
        assert_ne!(r1.nonce, r2.nonce);
        // The ACK of the first response arrives after the second was sent: stale.
        let step = s.on_request(&req(ResourceType::Cluster, &[], &r1.nonce, &r1.version_info), &res, now).unwrap();
        assert!(step.responses.is_empty());
        assert!(matches!(step.events[0], StreamEvent::StaleNonce { .. }));
        assert_eq!(s.status(now)[0].state, super::super::status::SyncState::Stale);
        // A NACK with a stale nonce is not recorded either.
        s.on_request(&nack(ResourceType::Cluster, &r1.nonce, "old"), &res, now).unwrap();
        assert_eq!(s.status(now)[0].last_error, None);
    }

    #[test]
    fn explicit_names_missing_then_present() {
        let now = Instant::now();
        let mut s = SotwStream::new_ads();
        let res = set(&[], &[("a", 1)]);
        let r = s.on_request(&req(ResourceType::Endpoint, &["a", "b"], "", ""), &res, now).unwrap().responses.remove(0);
        assert_eq!(names(&r), 1, "only what exists is sent");
        s.on_request(&req(ResourceType::Endpoint, &["a", "b"], &r.nonce, &r.version_info), &res, now).unwrap();
        // "b" appears later: it is pushed without being asked again.
        let res2 = set(&[], &[("a", 1), ("b", 1)]);
        let push = s.on_push(&res2, now, now);
        assert_eq!(push.responses.len(), 1);
        assert_eq!(names(&push.responses[0]), 1, "an EDS push carries only what changed");
        assert_eq!(push.responses[0].to_message().resources, vec![res2.get(ResourceType::Endpoint, "b").unwrap().body()]);
        // An unrelated resource appearing does not cause a push.
        let r = &push.responses[0];
        s.on_request(&req(ResourceType::Endpoint, &["a", "b"], &r.nonce, &r.version_info), &res2, now).unwrap();
        let res3 = set(&[], &[("a", 1), ("b", 1), ("c", 1)]);
        assert!(s.on_push(&res3, now, now).responses.is_empty());
    }

    #[test]
    fn wildcard_to_explicit_and_unsubscribe() {
        let now = Instant::now();
        let mut s = SotwStream::new_ads();
        let res = set(&[], &[("a", 1), ("b", 1)]);
        let r = s.on_request(&req(ResourceType::Endpoint, &["*"], "", ""), &res, now).unwrap().responses.remove(0);
        assert_eq!(names(&r), 2);
        assert_eq!(s.subscription(ResourceType::Endpoint), Some(&Subscription::Wildcard));
        // Narrowing to explicit names adds nothing: no response needed.
        let step = s.on_request(&req(ResourceType::Endpoint, &["a"], &r.nonce, &r.version_info), &res, now).unwrap();
        assert!(step.responses.is_empty());
        // After an explicit subscription, an empty list means unsubscribe everything.
        s.on_request(&req(ResourceType::Endpoint, &[], &r.nonce, &r.version_info), &res, now).unwrap();
        assert_eq!(s.subscription(ResourceType::Endpoint), Some(&Subscription::Explicit(Arc::new(std::collections::BTreeSet::new()))));
        assert!(s.on_push(&set(&[], &[("a", 2)]), now, now).responses.is_empty());
        // Subscribing again to "a" is answered.
        let step = s.on_request(&req(ResourceType::Endpoint, &["a"], &r.nonce, &r.version_info), &res, now).unwrap();
        assert_eq!(step.responses.len(), 1);
    }

    #[test]
    fn pushes_are_ordered_and_cds_change_resends_eds() {
        let now = Instant::now();
        let mut s = SotwStream::new_ads();
        let res = set(&["a"], &[("a", 1)]);
        for ty in [ResourceType::Listener, ResourceType::Cluster] {
            let r = s.on_request(&req(ty, &[], "", ""), &res, now).unwrap().responses.remove(0);
            s.on_request(&req(ty, &[], &r.nonce, &r.version_info), &res, now).unwrap();
        }
        let r = s.on_request(&req(ResourceType::Endpoint, &["a"], "", ""), &res, now).unwrap().responses.remove(0);
        s.on_request(&req(ResourceType::Endpoint, &["a"], &r.nonce, &r.version_info), &res, now).unwrap();
        // Only the cluster changes: CDS, then EDS for warming, and not LDS.
        let changed = set(&["a", "b"], &[("a", 1)]);
        let push = s.on_push(&changed, now, now);
        let types: Vec<_> = push.responses.iter().map(|r| ResourceType::from_type_url(r.type_url).unwrap()).collect();
        assert_eq!(types, [ResourceType::Cluster, ResourceType::Endpoint]);
        // The EDS request that follows a CDS update is answered even though its names did not change.
        let eds = &push.responses[1];
        let step = s.on_request(&req(ResourceType::Endpoint, &["a"], &eds.nonce, &eds.version_info), &changed, now).unwrap();
        assert!(step.responses.is_empty(), "the warming EDS was already sent in the push");
        let cds_nonce = &push.responses[0].nonce;
        s.on_request(&req(ResourceType::Cluster, &[], cds_nonce, ""), &changed, now).unwrap();
        let cds = s.on_push(&set(&["a", "b", "c"], &[("a", 1)]), now, now).responses;
        assert_eq!(cds.len(), 2);
        // Envoy's EDS re-request after the CDS update, carrying the CDS-era nonce, is stale;
        // after it ACKs, nothing further is owed.
        let last = &cds[1];
        let step = s.on_request(&req(ResourceType::Endpoint, &["a"], &last.nonce, &last.version_info), &changed, now).unwrap();
        assert!(step.responses.is_empty());
        // No change at all: nothing is sent.
        assert!(s.on_push(&set(&["a", "b", "c"], &[("a", 1)]), now, now).responses.is_empty());
    }

    #[test]
    fn eds_after_cds_response_is_always_answered() {
        let now = Instant::now();
        let mut s = SotwStream::new_ads();
        let res = set(&["a"], &[("a", 1)]);
        let r = s.on_request(&req(ResourceType::Endpoint, &["a"], "", ""), &res, now).unwrap().responses.remove(0);
        s.on_request(&req(ResourceType::Endpoint, &["a"], &r.nonce, &r.version_info), &res, now).unwrap();
        // A CDS (re)subscription: CDS answered, and EDS too.
        let step = s.on_request(&req(ResourceType::Cluster, &[], "", ""), &res, now).unwrap();
        assert_eq!(step.responses.len(), 2);
    }

    #[test]
    fn reconnect_gets_everything_again() {
        let now = Instant::now();
        let res = set(&["a"], &[]);
        let mut s = SotwStream::new_ads();
        let r = s.on_request(&req(ResourceType::Cluster, &[], "", ""), &res, now).unwrap().responses.remove(0);
        // A new stream: the client sends its last version and no nonce.
        let mut s2 = SotwStream::new_ads();
        let r2 = s2.on_request(&req(ResourceType::Cluster, &[], "", &r.version_info), &res, now).unwrap().responses.remove(0);
        assert_eq!(r2.version_info, r.version_info, "same config, same version on every stream");
    }

    #[test]
    fn unknown_and_wrong_types_are_errors() {
        let now = Instant::now();
        let res = ResourceSet::new();
        let mut s = SotwStream::new_single(ResourceType::Cluster);
        let mut bad = req(ResourceType::Cluster, &[], "", "");
        bad.type_url = "type.googleapis.com/nope".into();
        assert!(matches!(s.on_request(&bad, &res, now), Err(ProtocolError::UnknownType(_))));
        assert!(matches!(s.on_request(&req(ResourceType::Listener, &[], "", ""), &res, now), Err(ProtocolError::WrongType { .. })));
    }

    #[test]
    fn a_push_waits_for_the_reply_to_the_last_response_and_merges() {
        let t0 = Instant::now();
        let ms = |n| t0 + std::time::Duration::from_millis(n);
        let mut s = SotwStream::new_ads();
        let eds = ResourceType::Endpoint;
        let res = set(&[], &[("a", 1), ("b", 1)]);
        let r = s.on_request(&req(eds, &["a", "b"], "", ""), &res, t0).unwrap().responses;
        s.on_request(&req(eds, &["a", "b"], &r[0].nonce, &r[0].version_info), &res, t0).unwrap();
        // First change: sent at once, only the changed assignment.
        let first = s.on_push(&set(&[], &[("a", 2), ("b", 1)]), ms(10), ms(10)).responses;
        assert_eq!(first.iter().map(names).collect::<Vec<_>>(), [1]);
        // Two more before the client answers: nothing queues behind the first.
        assert!(s.on_push(&set(&[], &[("a", 3), ("b", 1)]), ms(20), ms(20)).responses.is_empty());
        let three = set(&[], &[("a", 3), ("b", 2)]);
        assert!(s.on_push(&three, ms(30), ms(30)).responses.is_empty());
        // The ACK: one response carrying both, timed from the first of them.
        let step = s.on_request(&req(eds, &["a", "b"], &first[0].nonce, &first[0].version_info), &three, ms(40)).unwrap();
        assert_eq!(step.responses.iter().map(names).collect::<Vec<_>>(), [2]);
        assert_eq!(step.responses[0].version_info, three.view(eds, None).version);
        assert_eq!(s.watches[&eds].ledger.sent.as_ref().unwrap().change_at, Some(ms(20)));
        // Changed and changed back while waiting: nothing owed after the ACK.
        let four = set(&[], &[("a", 4), ("b", 2)]);
        assert!(s.on_push(&four, ms(50), ms(50)).responses.is_empty());
        let step = s.on_request(&req(eds, &["a", "b"], &step.responses[0].nonce, ""), &three, ms(60)).unwrap();
        assert!(step.responses.is_empty());
        // A NACK answers too: a change waiting for it is sent, in full.
        let sent = s.on_push(&four, ms(70), ms(70)).responses;
        assert_eq!(sent.len(), 1);
        let five = set(&[], &[("a", 5), ("b", 2)]);
        assert!(s.on_push(&five, ms(80), ms(80)).responses.is_empty());
        let step = s.on_request(&nack(eds, &sent[0].nonce, "bad"), &five, ms(90)).unwrap();
        assert_eq!(step.responses.iter().map(names).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn clusters_waiting_for_their_ack_hold_back_the_types_after_them() {
        let now = Instant::now();
        let mut s = SotwStream::new_ads();
        let res = set(&["a"], &[("a", 1)]);
        for (ty, names) in [(ResourceType::Cluster, &[][..]), (ResourceType::Endpoint, &["a"][..]), (ResourceType::Listener, &[][..])] {
            let r = s.on_request(&req(ty, names, "", ""), &res, now).unwrap().responses;
            s.on_request(&req(ty, names, &r[0].nonce, ""), &res, now).unwrap();
        }
        let cds = s.on_push(&set(&["a", "b"], &[("a", 1)]), now, now).responses;
        assert_eq!(cds.len(), 2, "clusters, then endpoints for warming");
        s.on_request(&req(ResourceType::Endpoint, &["a"], &cds[1].nonce, ""), &res, now).unwrap();
        // Clusters and endpoints change while the CDS response is unanswered.
        let next = set(&["a", "b", "c"], &[("a", 2)]);
        assert!(s.on_push(&next, now, now).responses.is_empty());
        let step = s.on_request(&req(ResourceType::Cluster, &[], &cds[0].nonce, ""), &next, now).unwrap();
        let types: Vec<_> = step.responses.iter().map(|r| ResourceType::from_type_url(r.type_url).unwrap()).collect();
        assert_eq!(types, [ResourceType::Cluster, ResourceType::Endpoint]);
    }
}
