//! TrafficPolicy validation, conflict resolution and status, following the
//! seed (Service Mesh Hub v0.5 `preprocess/validator.go` and `merger.go`):
//!
//! - every reference must resolve (services, subsets, ports), weights must
//!   add up to more than 0, durations and percentages must be in range;
//! - policies are taken oldest first; a policy that sets an action field on a
//!   service, for the same sources and request matchers, to a value other than
//!   an older policy's is CONFLICT and none of it applies (the older one wins);
//! - an INVALID policy that was accepted before keeps serving its last accepted
//!   version ([`LastGood`]), so a bad edit never costs the running config.
//!
//! Messages name the field (`spec.trafficShift.destinations[1].subset`) and
//! the reason; status and `meshpilot validate` prefix them with the policy.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::api::{self, HttpMatcher, TrafficPolicySpec, WorkloadSelector};
pub use super::state::{PolicyState, last_accepted_keeps_serving};
use super::{MeshSnapshot, PolicyObject, ServiceKey};

/// A TrafficPolicy's identity: `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PolicyId {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What `/debug/policyz`, `meshpilot validate` and (with Kubernetes) the
/// object's `status` say about one policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    pub state: PolicyState,
    pub observed_generation: Option<i64>,
    /// The generation whose config is in effect (the last accepted one when
    /// the current one is INVALID); `None` when nothing of it applies.
    pub serving_generation: Option<i64>,
    /// Field-level reasons for INVALID or CONFLICT.
    pub messages: Vec<String>,
    /// The services the policy applies to.
    pub services: Vec<String>,
    pub origin: String,
}

/// The sources a rule applies to (`sourceSelector`); empty means every workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SourceMatch {
    pub labels: BTreeMap<String, String>,
    pub namespaces: Vec<String>,
}

impl SourceMatch {
    fn from_selector(sel: Option<&WorkloadSelector>) -> Self {
        let Some(sel) = sel else { return SourceMatch::default() };
        let mut namespaces = sel.namespaces.clone();
        namespaces.sort();
        namespaces.dedup();
        SourceMatch { labels: sel.labels.clone(), namespaces }
    }

    pub fn is_everyone(&self) -> bool {
        self.labels.is_empty() && self.namespaces.is_empty()
    }

    pub fn matches(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == namespace)) && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A destination with its references resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResolvedDestination {
    pub service: ServiceKey,
    pub subset: BTreeMap<String, String>,
    /// The destination port if the policy names one; otherwise the listener's
    /// port when the destination has it, else its only port.
    pub port: Option<u16>,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Fault {
    Delay(Duration),
    Abort(u32),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultInjection {
    pub fault: Fault,
    /// 0–100.
    pub percentage: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retries {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MirrorTo {
    pub service: ServiceKey,
    pub port: Option<u16>,
    /// 0–100.
    pub percentage: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Outlier {
    pub consecutive_errors: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cors {
    pub policy: api::CorsPolicy,
    pub max_age: Option<Duration>,
}

/// The actions of one policy on one service, validated and resolved.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Actions {
    pub traffic_shift: Option<Vec<ResolvedDestination>>,
    pub fault_injection: Option<FaultInjection>,
    pub request_timeout: Option<Duration>,
    pub retries: Option<Retries>,
    pub cors_policy: Option<Cors>,
    pub mirror: Option<MirrorTo>,
    pub header_manipulation: Option<api::HeaderManipulation>,
    pub outlier_detection: Option<Outlier>,
}

impl Actions {
    /// The fields set in both `self` and `other` whose values differ, by spec name.
    fn conflicting_fields(&self, other: &Actions) -> Vec<&'static str> {
        macro_rules! check {
            ($out:ident, $($field:ident => $name:literal),*) => {
                $( if let (Some(a), Some(b)) = (&self.$field, &other.$field) { if a != b { $out.push($name); } } )*
            };
        }
        let mut out = Vec::new();
        check!(out,
            traffic_shift => "trafficShift", fault_injection => "faultInjection",
            request_timeout => "requestTimeout", retries => "retries", cors_policy => "corsPolicy",
            mirror => "mirror", header_manipulation => "headerManipulation",
            outlier_detection => "outlierDetection");
        out
    }

    /// Fills every field `self` lacks from `other` (fields both set are equal after conflict checks).
    pub fn merge_from(&mut self, other: &Actions) {
        macro_rules! fill {
            ($($field:ident),*) => { $( if self.$field.is_none() { self.$field = other.$field.clone(); } )* };
        }
        fill!(traffic_shift, fault_injection, request_timeout, retries, cors_policy, mirror, header_manipulation, outlier_detection);
    }
}

/// One policy's effect on one service for some sources and requests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceRule {
    pub service: ServiceKey,
    pub source: SourceMatch,
    /// ORed; empty means every request.
    pub matchers: Vec<HttpMatcher>,
    pub actions: Actions,
}

impl ServiceRule {
    fn same_target(&self, other: &ServiceRule) -> bool {
        self.service == other.service && self.source == other.source && self.matchers == other.matchers
    }
}

/// A policy that is in effect.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AppliedPolicy {
    pub id: PolicyId,
    pub generation: Option<i64>,
    pub created_ms: i64,
    pub rules: Vec<ServiceRule>,
}

impl AppliedPolicy {
    /// The regular expressions it hands Envoy (path, header and query
    /// matchers, CORS origins): what an RE2 rejection quotes.
    pub fn regexes(&self) -> Vec<&str> {
        let mut out = Vec::new();
        for r in &self.rules {
            for m in &r.matchers {
                out.extend(m.regex.as_deref());
                out.extend(m.headers.iter().filter(|h| h.regex).map(|h| h.value.as_str()));
                out.extend(m.query_parameters.iter().filter(|q| q.regex).map(|q| q.value.as_str()));
            }
            if let Some(c) = &r.actions.cors_policy {
                out.extend(c.policy.allow_origins.iter().filter_map(|o| o.regex.as_deref()));
            }
        }
        out.retain(|re| !re.is_empty());
        out
    }

    /// Whether Envoy's rejection `message` names one of its regexes: quotes
    /// it whole, or ends with the piece RE2 refused (`…: invalid perl operator: (?x`).
    pub fn named_in(&self, message: &str) -> bool {
        let piece = message.rsplit(": ").next().unwrap_or("").trim();
        self.regexes().iter().any(|re| (re.len() >= 4 && message.contains(re)) || (piece.len() >= 2 && re.contains(piece)))
    }
}

/// The last accepted version of each policy, kept across snapshots, and the
/// versions Envoy rejected after meshpilot had accepted them.
#[derive(Debug, Default, Clone)]
pub struct LastGood {
    accepted: HashMap<PolicyId, Arc<AppliedPolicy>>,
    /// The version accepted before the current one (what a rejection falls back to).
    previous: HashMap<PolicyId, Arc<AppliedPolicy>>,
    /// Versions Envoy refused, with its message: INVALID until the policy changes.
    rejected: HashMap<PolicyId, (Arc<AppliedPolicy>, String)>,
    pub(crate) sidecars: super::sidecar::LastGoodSidecars,
    pub(crate) access: super::access::LastGoodAccess,
    /// (VirtualMesh `namespace/name`, cluster) → its last accepted `trustDomains` entry.
    pub(crate) trust_domains: HashMap<(String, String), String>,
}

impl LastGood {
    /// Envoy refused what `policy` (as applied) produced, saying `message`:
    /// the version accepted before it serves again (or none), and `policy`
    /// stays INVALID with that message until it changes. False if this
    /// version was already rejected.
    pub fn reject(&mut self, policy: &Arc<AppliedPolicy>, message: &str) -> bool {
        if self.rejected.get(&policy.id).is_some_and(|(p, _)| p == policy) {
            return false;
        }
        self.rejected.insert(policy.id.clone(), (policy.clone(), message.to_string()));
        if self.accepted.get(&policy.id) == Some(policy) {
            match self.previous.remove(&policy.id) {
                Some(before) => self.accepted.insert(policy.id.clone(), before),
                None => self.accepted.remove(&policy.id),
            };
        }
        true
    }

    fn accept(&mut self, policy: &Arc<AppliedPolicy>) {
        if let Some(old) = self.accepted.insert(policy.id.clone(), policy.clone())
            && old != *policy
        {
            self.previous.insert(policy.id.clone(), old);
        }
    }
}

/// The message of a version Envoy rejected.
fn rejected_by_envoy(generation: Option<i64>, message: &str) -> String {
    let version = generation.map_or_else(|| "this version".to_string(), |g| format!("generation {g}"));
    format!("Envoy rejected the routes {version} produces (NACK): {}", envoy_reason(message))
}

/// Envoy's reason, without its dump of the rejected resource: a proto
/// validation message is `<resource dump>: Proto constraint validation
/// failed (<reason>)`, cut at 4 KiB when it reaches the control plane, so a
/// large resource's reason may be lost. At most 600 characters.
pub fn envoy_reason(message: &str) -> String {
    const MAX: usize = 600;
    let reason = match message.find("Proto constraint validation failed") {
        Some(i) => &message[i..],
        None if message.starts_with("goo.gle/debugproto") => {
            return "(Envoy sent its dump of the rejected resource, cut off before the reason; its log has the whole message)".into();
        }
        None => message,
    };
    match reason.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &reason[..i]),
        None => reason.to_string(),
    }
}

/// Where a destination's traffic goes on a listener port (see [`ResolvedDestination::port`]).
pub fn destination_port(snapshot: &MeshSnapshot, service: &ServiceKey, explicit: Option<u16>, listener_port: u16) -> Option<u16> {
    if explicit.is_some() {
        return explicit;
    }
    match snapshot.service(service) {
        None => Some(listener_port),
        Some(svc) if svc.port(listener_port).is_some() => Some(listener_port),
        Some(svc) if svc.ports.len() == 1 => Some(svc.ports[0].port),
        Some(_) => None,
    }
}

/// The longest duration a protobuf `Duration` (so Envoy) takes: 10,000 years.
const MAX_PROTOBUF_DURATION: Duration = Duration::from_secs(315_576_000_000);

fn parse_min_duration(s: &str, field: &str, errors: &mut Vec<String>) -> Option<Duration> {
    match api::parse_duration(s) {
        Some(d) if d > MAX_PROTOBUF_DURATION => {
            errors.push(format!("{field}: {s:?} is longer than Envoy takes (315576000000s, 10,000 years)"));
            None
        }
        Some(d) if d >= Duration::from_millis(1) => Some(d),
        Some(_) => {
            errors.push(format!("{field}: {s:?} is shorter than 1ms"));
            None
        }
        None => {
            errors.push(format!("{field}: {s:?} is not a duration (e.g. \"1.5s\", \"100ms\")"));
            None
        }
    }
}

fn check_percentage(p: f64, field: &str, errors: &mut Vec<String>) {
    if !(0.0..=100.0).contains(&p) || !p.is_finite() {
        errors.push(format!("{field}: {p} is not between 0 and 100"));
    }
}

fn check_regex(re: &str, field: &str, errors: &mut Vec<String>) {
    if let Err(e) = regex::Regex::new(re) {
        let first = e.to_string().lines().last().unwrap_or_default().trim().to_string();
        errors.push(format!("{field}: {re:?} is not a valid regular expression ({first})"));
        return;
    }
    for why in re2_refuses(re) {
        errors.push(format!("{field}: {re:?} is not RE2 syntax, which Envoy requires ({why})"));
    }
}

/// What Envoy's RE2 refuses in a pattern Rust's `regex` accepts: flags
/// other than `i`, `m`, `s`, `U`; class set operations (`&&`, `--`, `~~`);
/// counted repetition over 1000. (RE2 may still refuse a pattern for its
/// size; Envoy's rejection then rolls the policy back, see `LastGood::reject`.)
fn re2_refuses(re: &str) -> Vec<String> {
    use regex_syntax::ast::{self, Ast, FlagsItemKind, GroupKind, RepetitionKind, RepetitionRange};
    struct Re2(Vec<String>);
    impl ast::Visitor for Re2 {
        type Output = Vec<String>;
        type Err = ();
        fn finish(self) -> Result<Vec<String>, ()> {
            Ok(self.0)
        }
        fn visit_pre(&mut self, ast: &Ast) -> Result<(), ()> {
            let flags = match ast {
                Ast::Flags(f) => Some(&f.flags),
                Ast::Group(g) => match &g.kind {
                    GroupKind::NonCapturing(f) => Some(f),
                    _ => None,
                },
                _ => None,
            };
            for item in flags.into_iter().flat_map(|f| f.items.iter()) {
                if let FlagsItemKind::Flag(flag) = &item.kind
                    && !matches!(flag, ast::Flag::CaseInsensitive | ast::Flag::MultiLine | ast::Flag::DotMatchesNewLine | ast::Flag::SwapGreed)
                {
                    self.0.push(format!("RE2 has no {flag:?} flag"));
                }
            }
            if let Ast::Repetition(r) = ast
                && let RepetitionKind::Range(range) = &r.op.kind
            {
                let (RepetitionRange::Exactly(n) | RepetitionRange::AtLeast(n) | RepetitionRange::Bounded(_, n)) = *range;
                if n > 1000 {
                    self.0.push(format!("RE2 repeats at most 1000 times, not {n}"));
                }
            }
            Ok(())
        }
        fn visit_class_set_binary_op_pre(&mut self, _op: &ast::ClassSetBinaryOp) -> Result<(), ()> {
            self.0.push("RE2 has no class set operations (&&, --, ~~)".into());
            Ok(())
        }
    }
    match ast::parse::Parser::new().parse(re) {
        Ok(parsed) => ast::visit(&parsed, Re2(Vec::new())).unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// RFC 7230 `tchar`, the characters of an HTTP header name.
fn is_header_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub(crate) const METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

fn check_matcher(m: &HttpMatcher, field: &str, errors: &mut Vec<String>) {
    let paths = [m.prefix.is_some(), m.exact.is_some(), m.regex.is_some()].iter().filter(|b| **b).count();
    if paths > 1 {
        errors.push(format!("{field}: set one of prefix, exact or regex, not {paths}"));
    }
    if let Some(re) = &m.regex {
        check_regex(re, &format!("{field}.regex"), errors);
    }
    for (i, h) in m.headers.iter().enumerate() {
        if h.name.is_empty() {
            errors.push(format!("{field}.headers[{i}].name: must not be empty"));
        }
        if h.regex {
            check_regex(&h.value, &format!("{field}.headers[{i}].value"), errors);
        }
    }
    for (i, q) in m.query_parameters.iter().enumerate() {
        if q.name.is_empty() {
            errors.push(format!("{field}.queryParameters[{i}].name: must not be empty"));
        }
        if q.regex {
            check_regex(&q.value, &format!("{field}.queryParameters[{i}].value"), errors);
        }
    }
    if let Some(method) = &m.method
        && !METHODS.contains(&method.method.as_str())
    {
        errors.push(format!("{field}.method.method: {:?} is not one of {}", method.method, METHODS.join(", ")));
    }
}

/// Resolves a `{name, namespace, cluster}` reference to a service the selected
/// services' clients can reach.
fn resolve_ref(snapshot: &MeshSnapshot, r: &api::ResourceRef, selected: &[ServiceKey], field: &str, errors: &mut Vec<String>) -> Option<ServiceKey> {
    let mut missing = Vec::new();
    for (what, v) in [("name", &r.name), ("namespace", &r.namespace), ("cluster", &r.cluster)] {
        if v.is_empty() {
            missing.push(what);
        }
    }
    if !missing.is_empty() {
        errors.push(format!("{field}: {} required", missing.join(", ") + if missing.len() == 1 { " is" } else { " are" }));
        return None;
    }
    let key = ServiceKey::new(&r.cluster, &r.namespace, &r.name);
    if !snapshot.clusters.contains_key(&key.cluster) {
        errors.push(format!("{field}: cluster {:?} is not registered (known: {})", key.cluster, known_clusters(snapshot)));
        return None;
    }
    if snapshot.service(&key).is_none() {
        errors.push(format!("{field}: service {key} does not exist"));
        return None;
    }
    for s in selected {
        if !snapshot.peers_of(&s.cluster).contains(&key.cluster) {
            errors.push(format!(
                "{field}: service {key} is in cluster {}, which is not in a virtual mesh with {} (the cluster of {s})",
                key.cluster, s.cluster
            ));
            return None;
        }
    }
    Some(key)
}

/// Each of `clusters` (the list at `field`) must be registered.
pub(crate) fn check_registered(snapshot: &MeshSnapshot, clusters: &[String], field: &str, errors: &mut Vec<String>) {
    for (i, c) in clusters.iter().enumerate() {
        if !snapshot.clusters.contains_key(c) {
            errors.push(format!("{field}[{i}]: cluster {c:?} is not registered (known: {})", known_clusters(snapshot)));
        }
    }
}

pub(crate) fn known_clusters(snapshot: &MeshSnapshot) -> String {
    snapshot.clusters.keys().cloned().collect::<Vec<_>>().join(", ")
}

fn check_port(
    snapshot: &MeshSnapshot,
    dest: &ServiceKey,
    port: Option<u32>,
    selected: &[ServiceKey],
    field: &str,
    errors: &mut Vec<String>,
) -> Option<Option<u16>> {
    let svc = snapshot.service(dest)?;
    if let Some(p) = port {
        return match u16::try_from(p).ok().filter(|p| svc.port(*p).is_some()) {
            Some(p) => Some(Some(p)),
            None => {
                let known: Vec<String> = svc.ports.iter().map(|p| p.port.to_string()).collect();
                errors.push(format!("{field}.port: {dest} has no port {p} (ports: {})", known.join(", ")));
                None
            }
        };
    }
    for s in selected {
        for sp in snapshot.service(s).map(|s| s.ports.as_slice()).unwrap_or_default() {
            if destination_port(snapshot, dest, None, sp.port).is_none() {
                let known: Vec<String> = svc.ports.iter().map(|p| p.port.to_string()).collect();
                errors.push(format!(
                    "{field}.port: required, {dest} has several ports ({}) and none is {} (the port of {s})",
                    known.join(", "),
                    sp.port
                ));
                return None;
            }
        }
    }
    Some(None)
}

/// The services a destination selector picks.
pub(crate) fn select_services(snapshot: &MeshSnapshot, selector: Option<&api::ServiceSelector>, errors: &mut Vec<String>) -> Vec<ServiceKey> {
    let sel = selector.cloned().unwrap_or_default();
    match (&sel.matcher, &sel.service_refs) {
        (Some(_), Some(_)) => {
            errors.push("spec.destinationSelector: set either matcher or serviceRefs, not both".into());
            Vec::new()
        }
        (None, Some(refs)) => {
            if refs.services.is_empty() {
                errors.push("spec.destinationSelector.serviceRefs.services: must name at least one service".into());
            }
            let mut out = Vec::new();
            for (i, r) in refs.services.iter().enumerate() {
                let field = format!("spec.destinationSelector.serviceRefs.services[{i}]");
                if let Some(k) = resolve_ref(snapshot, r, &[], &field, errors) {
                    out.push(k);
                }
            }
            out
        }
        (m, None) => {
            let m = m.clone().unwrap_or_default();
            check_registered(snapshot, &m.clusters, "spec.destinationSelector.matcher.clusters", errors);
            let out: Vec<ServiceKey> = snapshot
                .all_services()
                .filter(|s| m.clusters.is_empty() || m.clusters.contains(&s.key.cluster))
                .filter(|s| m.namespaces.is_empty() || m.namespaces.contains(&s.key.namespace))
                .filter(|s| m.labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
                .map(|s| s.key.clone())
                .collect();
            if out.is_empty() && errors.is_empty() {
                errors.push("spec.destinationSelector.matcher: selects no service".into());
            }
            out
        }
    }
}

/// Validates one policy against the mesh and resolves it into rules.
/// Errors are `field: reason` messages.
/// HTTP-only fields on a service none of whose ports is HTTP (by Istio's
/// protocol rules) cannot apply: on TCP only `trafficShift` and
/// `outlierDetection` do. Named per field and service.
fn check_http_only_actions(snapshot: &MeshSnapshot, spec: &TrafficPolicySpec, selected: &[ServiceKey], errors: &mut Vec<String>) {
    let set = [
        ("spec.httpRequestMatchers", !spec.http_request_matchers.is_empty()),
        ("spec.faultInjection", spec.fault_injection.is_some()),
        ("spec.requestTimeout", spec.request_timeout.is_some()),
        ("spec.retries", spec.retries.is_some()),
        ("spec.corsPolicy", spec.cors_policy.is_some()),
        ("spec.mirror", spec.mirror.is_some()),
        ("spec.headerManipulation", spec.header_manipulation.is_some()),
    ];
    for key in selected {
        let Some(svc) = snapshot.service(key) else { continue };
        if svc.ports.is_empty() || svc.ports.iter().any(|p| p.protocol.has_http_routes()) {
            continue;
        }
        let ports: Vec<String> = svc.ports.iter().map(|p| format!("{} ({})", p.port, p.protocol.as_str())).collect();
        for (field, _) in set.iter().filter(|(_, on)| *on) {
            errors.push(format!(
                "{field}: HTTP-only, but {key} serves no HTTP port ({}); on TCP only trafficShift and outlierDetection apply",
                ports.join(", ")
            ));
        }
    }
}

pub fn validate(snapshot: &MeshSnapshot, policy: &PolicyObject<TrafficPolicySpec>) -> Result<AppliedPolicy, Vec<String>> {
    if !policy.parse_errors.is_empty() {
        return Err(policy.parse_errors.clone());
    }
    let spec = &policy.spec;
    let mut errors = Vec::new();
    let mut selected = select_services(snapshot, spec.destination_selector.as_ref(), &mut errors);
    selected.sort();
    selected.dedup();
    for (i, m) in spec.http_request_matchers.iter().enumerate() {
        check_matcher(m, &format!("spec.httpRequestMatchers[{i}]"), &mut errors);
    }
    let mut actions = Actions::default();

    if let Some(shift) = &spec.traffic_shift {
        let mut dests = Vec::new();
        if shift.destinations.is_empty() {
            errors.push("spec.trafficShift.destinations: must list at least one destination".into());
        }
        for (i, d) in shift.destinations.iter().enumerate() {
            let field = format!("spec.trafficShift.destinations[{i}]");
            let Some(key) = resolve_ref(snapshot, &d.destination, &selected, &format!("{field}.destination"), &mut errors) else {
                continue;
            };
            let Some(port) = check_port(snapshot, &key, d.port, &selected, &field, &mut errors) else { continue };
            if !d.subset.is_empty() && !snapshot.endpoints(&key).iter().any(|e| e.has_labels(&d.subset)) {
                let labels: Vec<String> = d.subset.iter().map(|(k, v)| format!("{k}={v}")).collect();
                errors.push(format!("{field}.subset: {{{}}} matches no pod of {key}", labels.join(", ")));
                continue;
            }
            dests.push(ResolvedDestination { service: key, subset: d.subset.clone(), port, weight: d.weight });
        }
        let total: u64 = shift.destinations.iter().map(|d| u64::from(d.weight)).sum();
        if !shift.destinations.is_empty() && total == 0 {
            errors.push("spec.trafficShift.destinations: the weights add up to 0; at least one must be positive".into());
        }
        // Envoy refuses a route whose weighted clusters add up past u32 (and
        // with it the whole route configuration of the port, every service on it).
        if total > u64::from(u32::MAX) {
            errors.push(format!(
                "spec.trafficShift.destinations: the weights add up to {total}, more than Envoy accepts (4294967295); weights are relative, use smaller ones"
            ));
        }
        actions.traffic_shift = Some(dests);
    }

    if let Some(f) = &spec.fault_injection {
        check_percentage(f.percentage, "spec.faultInjection.percentage", &mut errors);
        let fault = match (&f.delay, &f.abort) {
            (Some(_), Some(_)) | (None, None) => {
                errors.push("spec.faultInjection: set exactly one of delay or abort".into());
                None
            }
            (Some(d), None) => match (&d.fixed_delay, &d.exponential_delay) {
                (Some(fd), None) => parse_min_duration(fd, "spec.faultInjection.delay.fixedDelay", &mut errors).map(Fault::Delay),
                (_, Some(_)) => {
                    errors.push("spec.faultInjection.delay.exponentialDelay: not supported (Envoy has fixed delays only); use fixedDelay".into());
                    None
                }
                (None, None) => {
                    errors.push("spec.faultInjection.delay.fixedDelay: required".into());
                    None
                }
            },
            (None, Some(a)) => {
                if (200..=599).contains(&a.http_status) {
                    Some(Fault::Abort(a.http_status as u32))
                } else {
                    errors.push(format!("spec.faultInjection.abort.httpStatus: {} is not an HTTP status (200–599)", a.http_status));
                    None
                }
            }
        };
        actions.fault_injection = fault.map(|fault| FaultInjection { fault, percentage: f.percentage });
    }

    if let Some(t) = &spec.request_timeout {
        actions.request_timeout = parse_min_duration(t, "spec.requestTimeout", &mut errors);
    }

    if let Some(r) = &spec.retries {
        if r.attempts < 0 {
            errors.push(format!("spec.retries.attempts: {} is negative", r.attempts));
        }
        let per_try_timeout = r.per_try_timeout.as_ref().and_then(|t| parse_min_duration(t, "spec.retries.perTryTimeout", &mut errors));
        actions.retries = Some(Retries { attempts: r.attempts.max(0) as u32, per_try_timeout });
    }

    if let Some(c) = &spec.cors_policy {
        for (i, o) in c.allow_origins.iter().enumerate() {
            let n = [o.exact.is_some(), o.prefix.is_some(), o.regex.is_some()].iter().filter(|b| **b).count();
            if n != 1 {
                errors.push(format!("spec.corsPolicy.allowOrigins[{i}]: set exactly one of exact, prefix or regex"));
            }
            if let Some(re) = &o.regex {
                check_regex(re, &format!("spec.corsPolicy.allowOrigins[{i}].regex"), &mut errors);
            }
        }
        let max_age = c.max_age.as_ref().and_then(|m| match api::parse_duration(m) {
            Some(d) => Some(d),
            None => {
                errors.push(format!("spec.corsPolicy.maxAge: {m:?} is not a duration"));
                None
            }
        });
        actions.cors_policy = Some(Cors { policy: c.clone(), max_age });
    }

    if let Some(m) = &spec.mirror {
        let pct = m.percentage.unwrap_or(100.0);
        check_percentage(pct, "spec.mirror.percentage", &mut errors);
        if let Some(key) = resolve_ref(snapshot, &m.destination, &selected, "spec.mirror.destination", &mut errors)
            && let Some(port) = check_port(snapshot, &key, m.port, &selected, "spec.mirror", &mut errors)
        {
            actions.mirror = Some(MirrorTo { service: key, port, percentage: pct });
        }
    }

    if let Some(h) = &spec.header_manipulation {
        let names = h
            .remove_request_headers
            .iter()
            .chain(&h.remove_response_headers)
            .chain(h.append_request_headers.keys())
            .chain(h.append_response_headers.keys());
        for n in names {
            if n.is_empty() || n.starts_with(':') || n.eq_ignore_ascii_case("host") {
                errors.push(format!("spec.headerManipulation: header {n:?} cannot be changed"));
            } else if !n.bytes().all(is_header_name_byte) {
                // Envoy's HTTP_HEADER_NAME rule: RFC 7230 token characters only.
                errors.push(format!("spec.headerManipulation: {n:?} is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only)"));
            }
        }
        for (field, map) in [("appendRequestHeaders", &h.append_request_headers), ("appendResponseHeaders", &h.append_response_headers)] {
            for (k, v) in map.iter().filter(|(_, v)| v.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n'))) {
                errors.push(format!("spec.headerManipulation.{field}[{k:?}]: {v:?} contains a NUL, CR or LF, which Envoy refuses in a header value"));
            }
        }
        actions.header_manipulation = Some(h.clone());
    }

    if let Some(o) = &spec.outlier_detection {
        if spec.source_selector.as_ref().is_some_and(|s| !SourceMatch::from_selector(Some(s)).is_everyone()) {
            errors.push("spec.outlierDetection: requires an empty sourceSelector (it applies to every client)".into());
        }
        let interval =
            o.interval.as_ref().map_or(Some(Duration::from_secs(10)), |s| parse_min_duration(s, "spec.outlierDetection.interval", &mut errors));
        let base = o
            .base_ejection_time
            .as_ref()
            .map_or(Some(Duration::from_secs(30)), |s| parse_min_duration(s, "spec.outlierDetection.baseEjectionTime", &mut errors));
        if o.consecutive_errors == Some(0) {
            errors.push("spec.outlierDetection.consecutiveErrors: must be at least 1".into());
        }
        if let (Some(interval), Some(base_ejection_time)) = (interval, base) {
            actions.outlier_detection = Some(Outlier { consecutive_errors: o.consecutive_errors.unwrap_or(5), interval, base_ejection_time });
        }
    }

    check_http_only_actions(snapshot, spec, &selected, &mut errors);

    if actions == Actions::default() && errors.is_empty() {
        errors.push("spec: sets no action (trafficShift, faultInjection, requestTimeout, retries, corsPolicy, mirror, headerManipulation or outlierDetection)".into());
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let source = SourceMatch::from_selector(spec.source_selector.as_ref());
    let rules = selected
        .into_iter()
        .map(|service| ServiceRule { service, source: source.clone(), matchers: spec.http_request_matchers.clone(), actions: actions.clone() })
        .collect();
    Ok(AppliedPolicy { id: policy.id(), generation: policy.generation, created_ms: policy.created_ms, rules })
}

impl<S> PolicyObject<S> {
    pub fn id(&self) -> PolicyId {
        PolicyId { namespace: self.namespace.clone(), name: self.name.clone() }
    }
}

fn conflicts(candidate: &AppliedPolicy, applied: &[Arc<AppliedPolicy>]) -> Vec<String> {
    let mut out = Vec::new();
    for rule in &candidate.rules {
        for older in applied {
            for other in older.rules.iter().filter(|o| o.same_target(rule)) {
                for field in rule.actions.conflicting_fields(&other.actions) {
                    out.push(format!("spec.{field}: conflicts with TrafficPolicy {} on service {} (the older policy wins)", older.id, rule.service));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Validates every policy, oldest first, and decides what applies.
pub fn resolve(
    snapshot: &MeshSnapshot,
    policies: &[PolicyObject<TrafficPolicySpec>],
    last_good: &mut LastGood,
) -> (Vec<Arc<AppliedPolicy>>, BTreeMap<PolicyId, PolicyStatus>) {
    let mut order: Vec<&PolicyObject<TrafficPolicySpec>> = policies.iter().collect();
    order.sort_by_key(|a| (a.created_ms, a.id()));
    let mut applied: Vec<Arc<AppliedPolicy>> = Vec::new();
    let mut status = BTreeMap::new();
    for p in order {
        let id = p.id();
        let (candidate, mut messages, mut state) = match validate(snapshot, p) {
            Ok(a) => match last_good.rejected.get(&id) {
                Some((bad, message)) if **bad == a => {
                    (last_good.accepted.get(&id).cloned(), vec![rejected_by_envoy(a.generation, message)], PolicyState::Invalid)
                }
                _ => (Some(Arc::new(a)), Vec::new(), PolicyState::Accepted),
            },
            Err(errors) => (last_good.accepted.get(&id).cloned(), errors, PolicyState::Invalid),
        };
        let mut serving = None;
        let mut services: Vec<String> = candidate.iter().flat_map(|c| c.rules.iter().map(|r| r.service.to_string())).collect();
        services.dedup();
        if let Some(c) = candidate {
            let clashes = conflicts(&c, &applied);
            if clashes.is_empty() {
                serving = Some(c.generation);
                if state == PolicyState::Accepted {
                    last_good.accept(&c);
                    last_good.rejected.remove(&id);
                } else {
                    messages.push(last_accepted_keeps_serving(c.generation));
                }
                applied.push(c);
            } else if state == PolicyState::Accepted {
                state = PolicyState::Conflict;
                messages = clashes;
            }
        }
        status.insert(
            id,
            PolicyStatus {
                state,
                observed_generation: p.generation,
                serving_generation: serving.flatten(),
                messages,
                services,
                origin: p.origin.clone(),
            },
        );
    }
    // Forget deleted policies.
    last_good.accepted.retain(|id, _| status.contains_key(id));
    last_good.previous.retain(|id, _| status.contains_key(id));
    last_good.rejected.retain(|id, _| status.contains_key(id));
    (applied, status)
}

/// The effective rules for one service: every applied policy's rules on it,
/// merged per (sources, matchers), in the order policies were applied.
pub fn rules_for<'a>(applied: &'a [Arc<AppliedPolicy>], service: &ServiceKey) -> Vec<(Vec<&'a PolicyId>, ServiceRule)> {
    let mut out: Vec<(Vec<&PolicyId>, ServiceRule)> = Vec::new();
    for p in applied {
        for r in p.rules.iter().filter(|r| &r.service == service) {
            match out.iter_mut().find(|(_, o)| o.same_target(r)) {
                Some((ids, o)) => {
                    o.actions.merge_from(&r.actions);
                    ids.push(&p.id);
                }
                None => out.push((vec![&p.id], r.clone())),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MeshInputs;
    use crate::sources::file::{SourceMemory, load_config_dir};

    fn bookinfo() -> MeshInputs {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bookinfo");
        let mut inputs = load_config_dir(&dir, &mut SourceMemory::default()).unwrap();
        inputs.traffic_policies.clear();
        inputs
    }

    fn policy(name: &str, created_ms: i64, spec_yaml: &str) -> PolicyObject<TrafficPolicySpec> {
        PolicyObject {
            namespace: "service-mesh-hub".into(),
            name: name.into(),
            generation: Some(1),
            created_ms,
            origin: format!("{name}.yaml"),
            spec: serde_yaml_ng::from_str(spec_yaml).unwrap(),
            parse_errors: vec![],
        }
    }

    fn build(policies: Vec<PolicyObject<TrafficPolicySpec>>, last_good: &mut LastGood) -> MeshSnapshot {
        let mut inputs = bookinfo();
        inputs.traffic_policies = policies;
        MeshSnapshot::build(inputs, last_good)
    }

    fn status<'a>(s: &'a MeshSnapshot, name: &str) -> &'a PolicyStatus {
        &s.policy_status[&PolicyId { namespace: "service-mesh-hub".into(), name: name.into() }]
    }

    const SEL: &str = "destinationSelector: {serviceRefs: {services: [{cluster: management-plane, name: reviews, namespace: default}]}}\n";

    fn shift(dests: &str) -> String {
        format!("{SEL}trafficShift: {{destinations: [{dests}]}}")
    }

    #[test]
    fn a_version_envoy_rejects_is_invalid_with_its_message_and_the_one_before_serves_until_it_changes() {
        let mut last_good = LastGood::default();
        let good = policy("p", 1, &format!("{SEL}httpRequestMatchers: [{{prefix: /a}}]\nrequestTimeout: 1s"));
        build(vec![good.clone()], &mut last_good);
        let re = "^/(alpha|bravo)+$";
        let bad =
            PolicyObject { generation: Some(2), ..policy("p", 1, &format!("{SEL}httpRequestMatchers: [{{regex: '{re}'}}]\nrequestTimeout: 1s")) };
        let s = build(vec![bad.clone()], &mut last_good);
        assert_eq!(status(&s, "p").state, PolicyState::Accepted, "meshpilot cannot tell");
        let applied = s.applied[0].clone();
        let message = format!("regex '{re}' RE2 program size of 120 > max program size of 100 set for the error level threshold");
        assert!(applied.named_in(&message) && !applied.named_in("some other rejection: of this"));
        assert!(applied.named_in("invalid regex: missing argument to repetition operator: +$"), "RE2's refused piece");
        assert!(last_good.reject(&applied, &message) && !last_good.reject(&applied, &message), "once per version");
        let s = build(vec![bad.clone()], &mut last_good);
        let st = status(&s, "p");
        assert_eq!(st.state, PolicyState::Invalid);
        assert!(
            st.messages[0].contains("Envoy rejected the routes generation 2 produces (NACK): regex '^/(alpha|bravo)+$' RE2 program size"),
            "{:?}",
            st.messages
        );
        assert!(st.messages.iter().any(|m| m.contains("generation 1")), "the one before serves: {:?}", st.messages);
        assert_eq!(s.applied[0].generation, Some(1));
        assert_eq!(s.applied[0].rules[0].matchers[0].prefix.as_deref(), Some("/a"));
        let dump = format!("goo.gle/debugproto name: \"9080\" {}...(truncated)", "x".repeat(5000));
        assert!(envoy_reason(&dump).starts_with("(Envoy sent its dump of the rejected resource"));
        let reason = envoy_reason(
            "name: \"9080\": Proto constraint validation failed (HeaderValueValidationError.Value: value length must be at most 16384 bytes)",
        );
        assert_eq!(reason, "Proto constraint validation failed (HeaderValueValidationError.Value: value length must be at most 16384 bytes)");
        assert_eq!(envoy_reason(&"y".repeat(700)).chars().count(), 601);
        // A new version is tried again.
        let fixed =
            PolicyObject { generation: Some(3), ..policy("p", 1, &format!("{SEL}httpRequestMatchers: [{{prefix: /b}}]\nrequestTimeout: 1s")) };
        let s = build(vec![fixed], &mut last_good);
        assert_eq!(status(&s, "p").state, PolicyState::Accepted);
        assert_eq!(s.applied[0].generation, Some(3));
        // A new policy Envoy rejects serves nothing.
        let mut fresh = LastGood::default();
        let s = build(vec![bad.clone()], &mut fresh);
        fresh.reject(&s.applied[0], &message);
        let s = build(vec![bad], &mut fresh);
        assert_eq!(status(&s, "p").state, PolicyState::Invalid);
        assert!(s.applied.is_empty());
    }

    #[test]
    fn the_seed_policy_is_accepted_and_resolved() {
        let spec = shift(
            "{destination: {cluster: remote-cluster, name: reviews, namespace: default}, weight: 75},
             {destination: {cluster: management-plane, name: reviews, namespace: default}, weight: 15, subset: {version: v1}},
             {destination: {cluster: management-plane, name: reviews, namespace: default}, weight: 10, subset: {version: v2}}",
        );
        let s = build(vec![policy("simple", 1, &spec)], &mut LastGood::default());
        let st = status(&s, "simple");
        assert_eq!(st.state, PolicyState::Accepted, "{:?}", st.messages);
        assert_eq!(st.services, ["reviews.default.management-plane"]);
        let dests = s.applied[0].rules[0].actions.traffic_shift.clone().unwrap();
        assert_eq!(dests.iter().map(|d| d.weight).collect::<Vec<_>>(), [75, 15, 10]);
        assert_eq!(dests[0].service, ServiceKey::new("remote-cluster", "default", "reviews"));
    }

    #[test]
    fn invalid_policies_name_the_field_and_the_reason() {
        let cases = [
            (
                shift("{destination: {cluster: remote-cluster, name: reviewz, namespace: default}, weight: 1}"),
                "spec.trafficShift.destinations[0].destination: service reviewz.default.remote-cluster does not exist",
            ),
            (
                shift("{destination: {cluster: nowhere, name: reviews, namespace: default}, weight: 1}"),
                "spec.trafficShift.destinations[0].destination: cluster \"nowhere\" is not registered",
            ),
            (
                shift("{destination: {cluster: management-plane, name: reviews, namespace: default}, weight: 1, subset: {version: v9}}"),
                "spec.trafficShift.destinations[0].subset: {version=v9} matches no pod of reviews.default.management-plane",
            ),
            (
                shift("{destination: {cluster: management-plane, name: reviews, namespace: default}, weight: 0}"),
                "spec.trafficShift.destinations: the weights add up to 0",
            ),
            (
                shift("{destination: {cluster: management-plane, name: reviews, namespace: default}, weight: 1, port: 9999}"),
                "spec.trafficShift.destinations[0].port: reviews.default.management-plane has no port 9999",
            ),
            (
                shift("{destination: {name: reviews, namespace: default}, weight: 1}"),
                "spec.trafficShift.destinations[0].destination: cluster is required",
            ),
            (
                "destinationSelector: {serviceRefs: {services: [{cluster: management-plane, name: nope, namespace: default}]}}\nrequestTimeout: 1s"
                    .into(),
                "spec.destinationSelector.serviceRefs.services[0]: service nope.default.management-plane does not exist",
            ),
            (
                "destinationSelector: {matcher: {labels: {app: nope}}}\nrequestTimeout: 1s".into(),
                "spec.destinationSelector.matcher: selects no service",
            ),
            (
                "destinationSelector: {matcher: {}, serviceRefs: {services: []}}\nrequestTimeout: 1s".into(),
                "spec.destinationSelector: set either matcher or serviceRefs, not both",
            ),
            (format!("{SEL}requestTimeout: soon"), "spec.requestTimeout: \"soon\" is not a duration"),
            (format!("{SEL}retries: {{attempts: -1}}"), "spec.retries.attempts: -1 is negative"),
            (
                format!("{SEL}faultInjection: {{abort: {{httpStatus: 99}}, percentage: 50}}"),
                "spec.faultInjection.abort.httpStatus: 99 is not an HTTP status",
            ),
            (
                format!("{SEL}faultInjection: {{delay: {{fixedDelay: 1s}}, percentage: 150}}"),
                "spec.faultInjection.percentage: 150 is not between 0 and 100",
            ),
            (
                format!("{SEL}httpRequestMatchers: [{{regex: '(unclosed'}}]\nrequestTimeout: 1s"),
                "spec.httpRequestMatchers[0].regex: \"(unclosed\" is not a valid regular expression",
            ),
            (
                format!("{SEL}httpRequestMatchers: [{{regex: '(?x)/api  /v1'}}]\nrequestTimeout: 1s"),
                "spec.httpRequestMatchers[0].regex: \"(?x)/api  /v1\" is not RE2 syntax, which Envoy requires (RE2 has no IgnoreWhitespace flag)",
            ),
            (
                format!("{SEL}httpRequestMatchers: [{{headers: [{{name: x, value: '[a-z&&[^aeiou]]', regex: true}}]}}]\nrequestTimeout: 1s"),
                "spec.httpRequestMatchers[0].headers[0].value: \"[a-z&&[^aeiou]]\" is not RE2 syntax, which Envoy requires (RE2 has no class set operations",
            ),
            (
                format!("{SEL}httpRequestMatchers: [{{regex: '/a{{1001}}'}}]\nrequestTimeout: 1s"),
                "spec.httpRequestMatchers[0].regex: \"/a{1001}\" is not RE2 syntax, which Envoy requires (RE2 repeats at most 1000 times, not 1001)",
            ),
            (format!("{SEL}requestTimeout: 400000000000s"), "spec.requestTimeout: \"400000000000s\" is longer than Envoy takes"),
            (format!("{SEL}requestTimeout: 1e30s"), "spec.requestTimeout: \"1e30s\" is not a duration"),
            (
                format!("{SEL}httpRequestMatchers: [{{method: {{method: FETCH}}}}]\nrequestTimeout: 1s"),
                "spec.httpRequestMatchers[0].method.method: \"FETCH\" is not one of",
            ),
            (format!("{SEL}sourceSelector: {{namespaces: [a]}}\noutlierDetection: {{}}"), "spec.outlierDetection: requires an empty sourceSelector"),
            (SEL.to_string(), "spec: sets no action"),
            (
                shift(
                    "{destination: {cluster: management-plane, name: reviews, namespace: default}, weight: 4294967295}, {destination: {cluster: remote-cluster, name: reviews, namespace: default}, weight: 4294967295}",
                ),
                "spec.trafficShift.destinations: the weights add up to 8589934590, more than Envoy accepts (4294967295)",
            ),
            (
                format!("{SEL}headerManipulation: {{appendRequestHeaders: {{'x bad': v}}}}"),
                "spec.headerManipulation: \"x bad\" is not an HTTP header name",
            ),
            (
                format!("{SEL}headerManipulation: {{appendResponseHeaders: {{x-ok: \"a\\nb\"}}}}"),
                "spec.headerManipulation.appendResponseHeaders[\"x-ok\"]: \"a\\nb\" contains a NUL, CR or LF",
            ),
        ];
        for (spec, want) in cases {
            let s = build(vec![policy("bad", 1, &spec)], &mut LastGood::default());
            let st = status(&s, "bad");
            assert_eq!(st.state, PolicyState::Invalid, "{spec}");
            assert!(st.messages.iter().any(|m| m.starts_with(want)), "want {want:?} in {:?}", st.messages);
            assert!(s.applied.is_empty());
        }
    }

    #[test]
    fn a_destination_outside_the_virtual_mesh_is_rejected() {
        let mut inputs = bookinfo();
        inputs.virtual_meshes.clear();
        inputs.traffic_policies =
            vec![policy("p", 1, &shift("{destination: {cluster: remote-cluster, name: reviews, namespace: default}, weight: 1}"))];
        let s = MeshSnapshot::build(inputs, &mut LastGood::default());
        let st = status(&s, "p");
        assert_eq!(st.state, PolicyState::Invalid);
        assert!(st.messages[0].contains("not in a virtual mesh with management-plane"), "{:?}", st.messages);
    }

    #[test]
    fn the_older_policy_wins_a_conflict_and_equal_values_merge() {
        let a = policy("older", 1, &format!("{SEL}retries: {{attempts: 3}}"));
        let b = policy("newer", 2, &format!("{SEL}retries: {{attempts: 5}}\nrequestTimeout: 2s"));
        let c = policy("same", 3, &format!("{SEL}retries: {{attempts: 3}}"));
        // Given in the wrong order: age decides, not position.
        let s = build(vec![b, c, a], &mut LastGood::default());
        assert_eq!(status(&s, "older").state, PolicyState::Accepted);
        let newer = status(&s, "newer");
        assert_eq!(newer.state, PolicyState::Conflict);
        assert_eq!(
            newer.messages,
            ["spec.retries: conflicts with TrafficPolicy service-mesh-hub/older on service reviews.default.management-plane (the older policy wins)"]
        );
        assert_eq!(newer.serving_generation, None, "none of a conflicting policy applies");
        assert_eq!(status(&s, "same").state, PolicyState::Accepted);
        let key = ServiceKey::new("management-plane", "default", "reviews");
        let rules = rules_for(&s.applied, &key);
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].1.actions.request_timeout, None, "the conflicting policy's timeout is not applied either");
        assert_eq!(rules[0].0.len(), 2);
    }

    #[test]
    fn a_bad_edit_keeps_the_last_accepted_version_serving() {
        let mut last_good = LastGood::default();
        let good = shift("{destination: {cluster: management-plane, name: reviews, namespace: default}, weight: 1, subset: {version: v1}}");
        let s1 = build(vec![policy("p", 1, &good)], &mut last_good);
        assert_eq!(status(&s1, "p").state, PolicyState::Accepted);
        let mut bad = policy("p", 1, &shift("{destination: {cluster: management-plane, name: reviews, namespace: default}, weight: 0}"));
        bad.generation = Some(2);
        let s2 = build(vec![bad.clone()], &mut last_good);
        let st = status(&s2, "p");
        assert_eq!((st.state, st.observed_generation, st.serving_generation), (PolicyState::Invalid, Some(2), Some(1)));
        assert!(st.messages.last().unwrap().contains("last accepted version (generation 1) keeps serving"));
        assert_eq!(s2.applied, s1.applied);
        // A spec that did not even parse behaves the same.
        let mut unparsed = bad.clone();
        unparsed.parse_errors = vec!["spec.trafficShift.destinations[0].wieght: unknown field `wieght`".into()];
        let s3 = build(vec![unparsed], &mut last_good);
        assert_eq!(status(&s3, "p").state, PolicyState::Invalid);
        assert_eq!(s3.applied, s1.applied);
        // Deleting the policy forgets it: re-adding a bad version serves nothing.
        let _ = build(vec![], &mut last_good);
        let s4 = build(vec![bad], &mut last_good);
        assert!(s4.applied.is_empty());
    }

    #[test]
    fn source_selectors_match_namespace_and_labels() {
        let m = SourceMatch { labels: [("app".to_string(), "productpage".to_string())].into(), namespaces: vec!["default".into()] };
        let labels: BTreeMap<String, String> = [("app".to_string(), "productpage".to_string()), ("version".to_string(), "v1".to_string())].into();
        assert!(m.matches("default", &labels));
        assert!(!m.matches("other", &labels));
        assert!(!m.matches("default", &BTreeMap::new()));
        assert!(SourceMatch::default().matches("any", &BTreeMap::new()));
    }
}
