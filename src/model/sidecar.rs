//! Istio's `Sidecar` egress scoping: which services a proxy is configured for.
//!
//! Without a Sidecar a proxy sees every service of its virtual mesh (at 1,000
//! services × 3 clusters that is ≈2.4 MB of xDS per proxy). A Sidecar's
//! `egress[].hosts` (`namespace/dnsName`) narrow it the way Istio does:
//! `./*` the proxy's own namespace, `*/reviews.default.svc.cluster.local`
//! one host in any namespace, `ns/*.example.com` a suffix, `~/*` nothing; a
//! namespace named explicitly is matched by its own entries only, not by the
//! `*/…` ones (Istio's rule); no egress at all imports `*/*`.
//! What a proxy picks, as in Istio: a Sidecar in its namespace whose
//! `workloadSelector` matches its labels, else its namespace's Sidecar
//! without a selector, else the mesh-wide one (no selector, in
//! [`ROOT_NAMESPACE`]); the oldest wins where several qualify.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use super::api::SidecarSpec;
use super::state::{PolicyState, last_accepted_keeps_serving};
use super::{MeshObjectId, MeshObjectStatus, PolicyObject};

/// Istio's default root namespace: a Sidecar there without a selector is the mesh-wide default.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// The namespace half of an egress host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum NamespaceMatch {
    /// `*`
    Any,
    /// `.`: the namespace of the proxy being configured (for a Sidecar in
    /// the proxy's namespace, its own; for the mesh-wide one, each proxy's).
    Own,
    Named(String),
    /// `~`: imports nothing.
    Nothing,
}

/// The DNS half of an egress host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum HostMatch {
    /// `*`
    Any,
    /// `*.suffix`: the stored value keeps the leading dot.
    Suffix(String),
    Exact(String),
}

/// One `namespace/dnsName` entry of `egress[].hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImportedHost {
    pub namespace: NamespaceMatch,
    pub host: HostMatch,
}

impl ImportedHost {
    /// The namespace this entry names, for a proxy in `proxy_namespace`
    /// (`None` for `*` and `~`).
    fn names_namespace<'a>(&'a self, proxy_namespace: &'a str) -> Option<&'a str> {
        match &self.namespace {
            NamespaceMatch::Own => Some(proxy_namespace),
            NamespaceMatch::Named(n) => Some(n),
            NamespaceMatch::Any | NamespaceMatch::Nothing => None,
        }
    }

    fn matches_host(&self, hosts: &[&str]) -> bool {
        hosts.iter().any(|h| match &self.host {
            HostMatch::Any => true,
            HostMatch::Suffix(s) => h.len() > s.len() && h.ends_with(s.as_str()),
            HostMatch::Exact(e) => e == h,
        })
    }
}

/// A Sidecar in effect.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SidecarScope {
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    pub created_ms: i64,
    /// `workloadSelector.labels`; `None` for the namespace-wide Sidecar.
    pub selector: Option<BTreeMap<String, String>>,
    pub imports: Vec<ImportedHost>,
    /// `outboundTrafficPolicy.mode: REGISTRY_ONLY`: a captured proxy refuses
    /// destinations outside what it imports (Istio's default is `ALLOW_ANY`).
    pub registry_only: bool,
}

impl SidecarScope {
    /// Whether a proxy in `proxy_namespace` imports a service in
    /// `service_namespace` called by any of `hosts`. Entries naming the
    /// service's namespace decide alone; only without one do `*/…` entries.
    pub fn imports(&self, proxy_namespace: &str, service_namespace: &str, hosts: &[&str]) -> bool {
        let mut named = self.imports.iter().filter(|i| i.names_namespace(proxy_namespace) == Some(service_namespace)).peekable();
        if named.peek().is_some() {
            return named.any(|i| i.matches_host(hosts));
        }
        self.imports.iter().filter(|i| i.namespace == NamespaceMatch::Any).any(|i| i.matches_host(hosts))
    }
}

/// The Sidecar that applies to a proxy in `namespace` with `labels`, if any.
pub fn sidecar_for<'a>(sidecars: &'a [Arc<SidecarScope>], namespace: &str, labels: &BTreeMap<String, String>) -> Option<&'a SidecarScope> {
    let selects = |s: &SidecarScope| s.selector.as_ref().is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
    // `sidecars` is oldest first.
    let in_ns = || sidecars.iter().filter(|s| s.namespace == namespace);
    in_ns()
        .find(|s| selects(s))
        .or_else(|| in_ns().find(|s| s.selector.is_none()))
        .or_else(|| sidecars.iter().find(|s| s.namespace == ROOT_NAMESPACE && s.selector.is_none()))
        .map(|s| s.as_ref())
}

/// A Sidecar object as a source gives it (generation 1): one egress entry
/// with `hosts`, selecting `selector`'s labels if any. For fixtures and tests.
pub fn sidecar_object(namespace: &str, name: &str, origin: &str, selector: Option<&[(&str, &str)]>, hosts: &[&str]) -> PolicyObject<SidecarSpec> {
    use super::api::{SidecarEgress, SidecarWorkloadSelector};
    PolicyObject {
        namespace: namespace.into(),
        name: name.into(),
        generation: Some(1),
        created_ms: 0,
        origin: origin.into(),
        spec: SidecarSpec {
            workload_selector: selector.map(|l| SidecarWorkloadSelector { labels: l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }),
            egress: vec![SidecarEgress { hosts: hosts.iter().map(|h| h.to_string()).collect(), ..Default::default() }],
            ..Default::default()
        },
        parse_errors: Vec::new(),
    }
}

/// Parses one `egress[].hosts` entry.
fn imported_host(raw: &str) -> Result<ImportedHost, String> {
    let Some((ns, dns)) = raw.split_once('/') else {
        return Err(format!("{raw:?} is not namespace/dnsName (for example \"./*\", \"istio-system/*\" or \"*/reviews.default.svc.cluster.local\")"));
    };
    let namespace = match ns {
        "*" => NamespaceMatch::Any,
        "." => NamespaceMatch::Own,
        "~" => NamespaceMatch::Nothing,
        "" => return Err(format!("{raw:?}: the namespace before '/' is empty (use \"*\", \".\", \"~\" or a namespace)")),
        n if n.contains('*') => return Err(format!("{raw:?}: a namespace is \"*\" or a name, not a pattern")),
        n => NamespaceMatch::Named(n.to_string()),
    };
    let host = match dns {
        "*" => HostMatch::Any,
        "" => return Err(format!("{raw:?}: the dnsName after '/' is empty (use \"*\" for every host)")),
        d if d.starts_with("*.") && !d[1..].contains('*') => HostMatch::Suffix(d[1..].to_string()),
        d if d.contains('*') || d.contains('/') => {
            return Err(format!("{raw:?}: a wildcard may only be the whole dnsName (\"*\") or its first label (\"*.example.com\")"));
        }
        d => HostMatch::Exact(d.to_string()),
    };
    Ok(ImportedHost { namespace, host })
}

/// Validates one Sidecar: what it imports, or every problem with the field it is in.
pub fn validate(object: &PolicyObject<SidecarSpec>) -> Result<SidecarScope, Vec<String>> {
    let mut errors = object.parse_errors.clone();
    let spec = &object.spec;
    if spec.workload_selector.as_ref().is_some_and(|s| s.labels.is_empty()) {
        errors.push("spec.workloadSelector.labels: must not be empty (leave workloadSelector out for a namespace-wide Sidecar)".to_string());
    }
    let mut imports = Vec::new();
    if spec.egress.is_empty() {
        // Istio's default egress.
        imports.push(ImportedHost { namespace: NamespaceMatch::Any, host: HostMatch::Any });
    }
    for (i, egress) in spec.egress.iter().enumerate() {
        if egress.hosts.is_empty() {
            errors.push(format!("spec.egress[{i}].hosts: at least one namespace/dnsName is required"));
        }
        for (j, raw) in egress.hosts.iter().enumerate() {
            match imported_host(raw) {
                Ok(h) => imports.push(h),
                Err(e) => errors.push(format!("spec.egress[{i}].hosts[{j}]: {e}")),
            }
        }
    }
    let registry_only = match spec.outbound_traffic_policy.as_ref().map(|p| p.get("mode")) {
        None | Some(None) => false,
        Some(Some(mode)) => match mode.as_str() {
            Some("ALLOW_ANY") => false,
            Some("REGISTRY_ONLY") => true,
            _ => {
                errors.push(format!("spec.outboundTrafficPolicy.mode: {mode} is not ALLOW_ANY or REGISTRY_ONLY"));
                false
            }
        },
    };
    if let Some(other) =
        spec.outbound_traffic_policy.as_ref().and_then(|p| p.as_object()).and_then(|o| o.keys().find(|k| *k != "mode" && *k != "egressProxy"))
    {
        errors.push(format!("spec.outboundTrafficPolicy.{other}: unknown field (Istio's are mode and egressProxy)"));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(SidecarScope {
        registry_only,
        namespace: object.namespace.clone(),
        name: object.name.clone(),
        generation: object.generation,
        created_ms: object.created_ms,
        selector: spec.workload_selector.as_ref().map(|s| s.labels.clone()),
        imports,
    })
}

/// Fields of a Sidecar that meshpilot accepts but does not act on.
fn not_yet_supported(spec: &SidecarSpec) -> Vec<String> {
    let mut out = Vec::new();
    let note = |field: &str| format!("{field}: not yet supported (meshpilot reads workloadSelector, egress[].hosts and outboundTrafficPolicy.mode)");
    if spec.ingress.is_some() {
        out.push(note("spec.ingress"));
    }
    if spec.outbound_traffic_policy.as_ref().is_some_and(|p| p.get("egressProxy").is_some()) {
        out.push(note("spec.outboundTrafficPolicy.egressProxy"));
    }
    if spec.inbound_connection_pool.is_some() {
        out.push(note("spec.inboundConnectionPool"));
    }
    for (i, e) in spec.egress.iter().enumerate() {
        for (set, field) in [(e.port.is_some(), "port"), (e.bind.is_some(), "bind"), (e.capture_mode.is_some(), "captureMode")] {
            if set {
                out.push(note(&format!("spec.egress[{i}].{field}")));
            }
        }
    }
    out
}

/// The last accepted version of each Sidecar, kept across snapshots.
pub type LastGoodSidecars = HashMap<(String, String), Arc<SidecarScope>>;

/// Validates every Sidecar (oldest first): those in effect, and each one's status.
/// An invalid Sidecar keeps its last accepted version in effect.
pub fn resolve(
    objects: &[PolicyObject<SidecarSpec>],
    last_good: &mut LastGoodSidecars,
) -> (Vec<Arc<SidecarScope>>, Vec<(MeshObjectId, MeshObjectStatus)>) {
    let mut order: Vec<&PolicyObject<SidecarSpec>> = objects.iter().collect();
    order.sort_by(|a, b| (a.created_ms, &a.namespace, &a.name).cmp(&(b.created_ms, &b.namespace, &b.name)));
    let mut in_effect = Vec::new();
    let mut statuses = Vec::new();
    let mut seen = HashSet::new();
    for object in order {
        let key = (object.namespace.clone(), object.name.clone());
        let id = MeshObjectId { kind: "Sidecar".into(), namespace: key.0.clone(), name: key.1.clone() };
        let status = match validate(object) {
            Ok(scope) => {
                let scope = Arc::new(scope);
                last_good.insert(key.clone(), scope.clone());
                in_effect.push(scope);
                MeshObjectStatus {
                    state: PolicyState::Accepted,
                    observed_generation: object.generation,
                    messages: Vec::new(),
                    not_yet_supported: not_yet_supported(&object.spec),
                    serving_generation: None,
                }
            }
            Err(mut messages) => {
                if let Some(kept) = last_good.get(&key) {
                    messages.push(last_accepted_keeps_serving(kept.generation));
                    in_effect.push(kept.clone());
                }
                MeshObjectStatus {
                    state: PolicyState::Invalid,
                    observed_generation: object.generation,
                    messages,
                    not_yet_supported: Vec::new(),
                    serving_generation: None,
                }
            }
        };
        seen.insert(key);
        statuses.push((id, status));
    }
    last_good.retain(|k, _| seen.contains(k));
    (in_effect, statuses)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::api::{SidecarEgress, SidecarWorkloadSelector};

    fn sidecar(ns: &str, name: &str, created_ms: i64, selector: Option<&[(&str, &str)]>, hosts: &[&str]) -> PolicyObject<SidecarSpec> {
        PolicyObject { created_ms, ..sidecar_object(ns, name, "test", selector, hosts) }
    }

    fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
        l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn hosts_match_like_istio() {
        let s = validate(&sidecar("default", "s", 0, None, &["./*", "*/ratings.other.svc.cluster.local", "shared/*.svc.cluster-2.global", "~/*"]))
            .unwrap();
        let imports = |ns: &str, hosts: &[&str]| s.imports("default", ns, hosts);
        assert!(imports("default", &["reviews.default.svc.cluster.local"]));
        assert!(!imports("other", &["reviews.other.svc.cluster.local"]));
        assert!(imports("other", &["ratings.other.svc.cluster.local"]));
        assert!(imports("shared", &["db.shared.svc.cluster-2.global"]));
        assert!(!imports("shared", &["db.shared.svc.cluster.local"]));
        // A Kubernetes alias of a remote-only service imports it under its local name too.
        assert!(imports("other", &["ratings.other.svc.cluster-2.global", "ratings.other.svc.cluster.local"]));
    }

    #[test]
    fn a_namespace_named_explicitly_is_decided_by_its_own_entries_only() {
        // Istio: `*/…` entries do not apply to a namespace that has entries of its own.
        let s = validate(&sidecar("default", "s", 0, None, &["*/*", "payments/ledger.payments.svc.cluster.local"])).unwrap();
        assert!(s.imports("default", "shop", &["cart.shop.svc.cluster.local"]));
        assert!(s.imports("default", "payments", &["ledger.payments.svc.cluster.local"]));
        assert!(!s.imports("default", "payments", &["cards.payments.svc.cluster.local"]));
    }

    #[test]
    fn the_mesh_wide_dot_means_each_proxys_own_namespace() {
        let objects = [sidecar(ROOT_NAMESPACE, "default", 0, None, &["./*", "istio-system/*"])];
        let (in_effect, _) = resolve(&objects, &mut LastGoodSidecars::new());
        let s = sidecar_for(&in_effect, "shop", &BTreeMap::new()).expect("the mesh-wide Sidecar");
        assert!(s.imports("shop", "shop", &["cart.shop.svc.cluster.local"]));
        assert!(s.imports("shop", ROOT_NAMESPACE, &["istiod.istio-system.svc.cluster.local"]));
        assert!(!s.imports("shop", "payments", &["ledger.payments.svc.cluster.local"]));
        assert!(s.imports("payments", "payments", &["ledger.payments.svc.cluster.local"]));
    }

    #[test]
    fn no_egress_imports_everything_and_an_empty_selector_is_refused() {
        let mut s = sidecar("default", "s", 0, None, &[]);
        s.spec.egress.clear();
        let scope = validate(&s).unwrap();
        assert!(scope.imports("default", "anywhere", &["x.anywhere.svc.cluster.local"]));
        s.spec.workload_selector = Some(SidecarWorkloadSelector::default());
        let errors = validate(&s).unwrap_err();
        assert!(errors.iter().any(|e| e.starts_with("spec.workloadSelector.labels: must not be empty")), "{errors:?}");
    }

    #[test]
    fn a_proxy_gets_its_selected_then_its_namespace_then_the_mesh_wide_sidecar() {
        let objects = [
            sidecar(ROOT_NAMESPACE, "mesh", 1, None, &["*/*"]),
            sidecar("default", "ns-wide", 2, None, &["./*"]),
            sidecar("default", "for-reviews", 3, Some(&[("app", "reviews")]), &["./ratings.default.svc.cluster.local"]),
            sidecar("default", "later-ns-wide", 4, None, &["~/*"]),
        ];
        let (in_effect, statuses) = resolve(&objects, &mut LastGoodSidecars::new());
        assert!(statuses.iter().all(|(_, s)| s.state == PolicyState::Accepted), "{statuses:?}");
        let name = |ns: &str, l: &[(&str, &str)]| sidecar_for(&in_effect, ns, &labels(l)).map(|s| s.name.clone());
        assert_eq!(name("default", &[("app", "reviews"), ("version", "v1")]).as_deref(), Some("for-reviews"));
        assert_eq!(name("default", &[("app", "productpage")]).as_deref(), Some("ns-wide"));
        assert_eq!(name("elsewhere", &[("app", "reviews")]).as_deref(), Some("mesh"));
        assert_eq!(sidecar_for(&in_effect[1..], "elsewhere", &BTreeMap::new()), None);
    }

    #[test]
    fn bad_hosts_are_named_by_field_and_the_last_accepted_version_keeps_serving() {
        let mut last_good = LastGoodSidecars::new();
        let good = sidecar("default", "s", 1, None, &["./*"]);
        let (in_effect, _) = resolve(std::slice::from_ref(&good), &mut last_good);
        assert_eq!(in_effect.len(), 1);

        let mut bad = sidecar("default", "s", 1, None, &["./*", "reviews", "*/re*ws.default"]);
        bad.generation = Some(2);
        bad.spec.egress.push(SidecarEgress::default());
        let (in_effect, statuses) = resolve(std::slice::from_ref(&bad), &mut last_good);
        let (id, status) = &statuses[0];
        assert_eq!(id.to_string(), "Sidecar default/s");
        assert_eq!(status.state, PolicyState::Invalid);
        let text = status.messages.join("\n");
        assert!(text.contains("spec.egress[0].hosts[1]: \"reviews\" is not namespace/dnsName"), "{text}");
        assert!(text.contains("spec.egress[0].hosts[2]: \"*/re*ws.default\": a wildcard may only be"), "{text}");
        assert!(text.contains("spec.egress[1].hosts: at least one"), "{text}");
        assert!(text.contains("the last accepted version (generation 1) keeps serving"), "{text}");
        assert_eq!(in_effect.len(), 1);
        assert_eq!(in_effect[0].generation, Some(1));

        // Deleted: forgotten.
        let (in_effect, _) = resolve(&[], &mut last_good);
        assert!(in_effect.is_empty() && last_good.is_empty());
    }

    #[test]
    fn an_unknown_outbound_traffic_policy_mode_is_named() {
        let mut s = sidecar("default", "s", 1, None, &["./*"]);
        s.spec.outbound_traffic_policy = Some(serde_json::json!({"mode": "DENY"}));
        let errors = validate(&s).unwrap_err();
        assert!(errors.iter().any(|e| e == "spec.outboundTrafficPolicy.mode: \"DENY\" is not ALLOW_ANY or REGISTRY_ONLY"), "{errors:?}");
        s.spec.outbound_traffic_policy = Some(serde_json::json!({"mode": "ALLOW_ANY"}));
        assert!(!validate(&s).unwrap().registry_only);
    }

    #[test]
    fn fields_meshpilot_does_not_act_on_are_reported() {
        let mut s = sidecar("default", "s", 1, None, &["./*"]);
        s.spec.egress[0].port = Some(serde_json::json!({"number": 9080}));
        s.spec.outbound_traffic_policy = Some(serde_json::json!({"mode": "REGISTRY_ONLY", "egressProxy": {"host": "egress"}}));
        let (in_effect, statuses) = resolve(std::slice::from_ref(&s), &mut LastGoodSidecars::new());
        assert!(in_effect[0].registry_only);
        let notes = &statuses[0].1.not_yet_supported;
        assert!(notes.iter().any(|n| n.starts_with("spec.outboundTrafficPolicy.egressProxy: not yet supported")), "{notes:?}");
        assert!(notes.iter().any(|n| n.starts_with("spec.egress[0].port: not yet supported")), "{notes:?}");
    }
}
