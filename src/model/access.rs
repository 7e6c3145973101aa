//! Access control: `VirtualMesh.spec.enforceAccessControl` and
//! `AccessControlPolicy`, validated against the mesh and resolved into what
//! each workload's inbound side allows.
//!
//! When a VirtualMesh enforces access control, every workload of its
//! clusters denies by default; each AccessControlPolicy allows callers
//! (identities: SPIFFE principals from verified peer certificates) to reach
//! the services it selects, on the ports, paths and methods it names. The
//! policies are a union (allow only). An INVALID policy keeps its last
//! accepted version serving; one never accepted allows nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::Serialize;

use super::api::{self, AccessControlPolicySpec};
use super::policy::{METHODS, check_registered, known_clusters, select_services};
use super::state::{PolicyState, last_accepted_keeps_serving};
use super::{MeshObjectId, MeshObjectStatus, MeshSnapshot, PolicyObject, ServiceKey, TRUST_DOMAIN, object_status, spiffe_id};

/// Who may call: a verified peer certificate's URI SAN, exactly or by prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PrincipalMatch {
    Exact(String),
    Prefix(String),
}

/// An `allowedPaths` entry: `/exact`, `/prefix*`, `*suffix`, or `*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl PathMatch {
    /// Parses an `allowedPaths` entry; the error says what is wrong with it.
    pub fn parse(path: &str) -> Result<PathMatch, String> {
        if path.is_empty() {
            return Err("is empty".into());
        }
        if path == "*" {
            return Ok(PathMatch::Any);
        }
        if path.contains(['?', '#']) || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{path:?} is not a path (no query, fragment or whitespace)"));
        }
        let (starred_front, starred_back) = (path.starts_with('*'), path.ends_with('*'));
        let inner = path.trim_start_matches('*').trim_end_matches('*');
        if inner.contains('*') || (starred_front && starred_back) || path.starts_with("**") || path.ends_with("**") {
            return Err(format!("{path:?}: `*` may only start (suffix match) or end (prefix match) a path, once"));
        }
        if starred_front {
            return Ok(PathMatch::Suffix(inner.to_string()));
        }
        if !path.starts_with('/') {
            return Err(format!("{path:?} is not a path (it must start with `/`, or `*` for a suffix match)"));
        }
        Ok(if starred_back { PathMatch::Prefix(inner.to_string()) } else { PathMatch::Exact(path.to_string()) })
    }
}

/// What one policy allows at one service: who, and (HTTP only) which paths
/// and methods; empty lists allow any.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct AccessGrant {
    /// `namespace/name` of the policy.
    pub policy: String,
    pub principals: Vec<PrincipalMatch>,
    pub paths: Vec<PathMatch>,
    pub methods: Vec<String>,
}

impl AccessGrant {
    /// Whether it says anything only HTTP can check.
    pub fn http_only(&self) -> bool {
        !self.paths.is_empty() || !self.methods.is_empty()
    }
}

/// One service a policy selects: the grant, on these service ports (empty: all).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccessRule {
    pub service: ServiceKey,
    pub ports: BTreeSet<u16>,
    pub grant: Arc<AccessGrant>,
}

/// An accepted AccessControlPolicy, resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccessPolicy {
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    pub rules: Vec<AccessRule>,
}

/// What a workload's inbound side allows, per port it serves (the target
/// port): the grants of every policy that selects a service it backs on
/// that port. A port not listed allows nobody.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct InboundAccess {
    pub ports: BTreeMap<u16, Vec<Arc<AccessGrant>>>,
}

impl InboundAccess {
    /// Adds `grant` on `port` (each grant once, in order).
    fn allow(&mut self, port: u16, grant: &Arc<AccessGrant>) {
        let grants = self.ports.entry(port).or_default();
        if let Err(at) = grants.binary_search(grant) {
            grants.insert(at, grant.clone());
        }
    }
}

/// Each policy's last accepted version, across snapshots.
#[derive(Debug, Default, Clone)]
pub struct LastGoodAccess {
    accepted: HashMap<(String, String), Arc<AccessPolicy>>,
    /// Each VirtualMesh's last readable `enforceAccessControl`.
    enforcement: HashMap<(String, String), bool>,
}

/// Reads `enforceAccessControl`: the v0.5 enum (`MESH_DEFAULT` = off, as for
/// Istio in the seed's era, `ENABLED`, `DISABLED`, or their numbers 0–2) or
/// the v0.4 bool.
pub fn enforcement(value: Option<&serde_json::Value>) -> Result<bool, String> {
    use serde_json::Value;
    match value {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "ENABLED" => Ok(true),
        Some(Value::String(s)) if s == "DISABLED" || s == "MESH_DEFAULT" => Ok(false),
        Some(Value::Number(n)) if n.as_u64() == Some(1) => Ok(true),
        Some(Value::Number(n)) if matches!(n.as_u64(), Some(0 | 2)) => Ok(false),
        Some(other) => Err(format!("spec.enforceAccessControl: {other} is not one of MESH_DEFAULT, ENABLED, DISABLED (or true/false)")),
    }
}

/// The clusters whose VirtualMesh enforces access control, and the message
/// of each VirtualMesh whose `enforceAccessControl` does not read (it keeps
/// its last readable value; off if it never had one).
pub fn enforced_clusters(
    virtual_meshes: &[PolicyObject<api::VirtualMeshSpec>],
    clusters_of: impl Fn(&api::VirtualMeshSpec) -> Vec<String>,
    last_good: &mut LastGoodAccess,
) -> (BTreeSet<String>, BTreeMap<(String, String), String>) {
    let (mut enforced, mut errors) = (BTreeSet::new(), BTreeMap::new());
    let mut live = std::collections::HashSet::new();
    for vm in virtual_meshes.iter().filter(|vm| vm.parse_errors.is_empty()) {
        let key = (vm.namespace.clone(), vm.name.clone());
        live.insert(key.clone());
        let on = match enforcement(vm.spec.enforce_access_control.as_ref()) {
            Ok(on) => {
                last_good.enforcement.insert(key, on);
                on
            }
            Err(e) => {
                let last = last_good.enforcement.get(&key).copied();
                let kept = match last {
                    Some(true) => "enforcement stays ENABLED, its last accepted value",
                    Some(false) => "enforcement stays DISABLED, its last accepted value",
                    None => "access control is not enforced",
                };
                errors.insert(key, format!("{e}; {kept}"));
                last.unwrap_or(false)
            }
        };
        if on {
            enforced.extend(clusters_of(&vm.spec));
        }
    }
    last_good.enforcement.retain(|k, _| live.contains(k));
    (enforced, errors)
}

/// The trust domain of a cluster's identities.
fn trust_domain<'a>(snapshot: &'a MeshSnapshot, cluster: &str) -> &'a str {
    snapshot.trust.get(cluster).map_or(TRUST_DOMAIN, |t| t.trust_domain.as_str())
}

/// The service accounts workloads (with a known Pod) run as, per (cluster,
/// namespace), read when a policy first names that namespace.
#[derive(Default)]
struct ServiceAccounts(std::cell::RefCell<HashMap<(String, String), std::collections::HashSet<String>>>);

impl ServiceAccounts {
    fn exists(&self, snapshot: &MeshSnapshot, cluster: &str, namespace: &str, service_account: &str) -> bool {
        let mut known = self.0.borrow_mut();
        let accounts = known.entry((cluster.to_string(), namespace.to_string())).or_insert_with(|| {
            let Some(state) = snapshot.clusters.get(cluster) else { return Default::default() };
            let from = (namespace.to_string(), String::new());
            state
                .endpoints
                .range(from..)
                .take_while(|((ns, _), _)| ns == namespace)
                .flat_map(|(_, eps)| eps.iter().filter(|e| e.pod.is_some()).map(|e| e.service_account.clone()))
                .collect()
        });
        accounts.contains(service_account)
    }
}

fn principals(
    snapshot: &MeshSnapshot,
    selector: Option<&api::IdentitySelector>,
    accounts: &ServiceAccounts,
    errors: &mut Vec<String>,
) -> Vec<PrincipalMatch> {
    let sel = selector.cloned().unwrap_or_default();
    let mut out = BTreeSet::new();
    match (&sel.matcher, &sel.service_account_refs) {
        (Some(_), Some(_)) => errors.push("spec.sourceSelector: set either matcher or serviceAccountRefs, not both".into()),
        (None, Some(refs)) => {
            if refs.service_accounts.is_empty() {
                errors.push("spec.sourceSelector.serviceAccountRefs.serviceAccounts: must name at least one service account".into());
            }
            for (i, r) in refs.service_accounts.iter().enumerate() {
                let field = format!("spec.sourceSelector.serviceAccountRefs.serviceAccounts[{i}]");
                let missing: Vec<&str> = [("name", &r.name), ("namespace", &r.namespace), ("cluster", &r.cluster)]
                    .iter()
                    .filter(|(_, v)| v.is_empty())
                    .map(|(w, _)| *w)
                    .collect();
                if !missing.is_empty() {
                    errors.push(format!("{field}: {} required", missing.join(", ")));
                } else if !snapshot.clusters.contains_key(&r.cluster) {
                    errors.push(format!("{field}.cluster: cluster {:?} is not registered (known: {})", r.cluster, known_clusters(snapshot)));
                } else if !accounts.exists(snapshot, &r.cluster, &r.namespace, &r.name) {
                    errors.push(format!("{field}: no workload in cluster {} runs as service account {}/{}", r.cluster, r.namespace, r.name));
                } else {
                    out.insert(PrincipalMatch::Exact(spiffe_id(trust_domain(snapshot, &r.cluster), &r.namespace, &r.name)));
                }
            }
        }
        (m, None) => {
            let m = m.clone().unwrap_or_default();
            check_registered(snapshot, &m.clusters, "spec.sourceSelector.matcher.clusters", errors);
            for (i, ns) in m.namespaces.iter().enumerate() {
                if ns.is_empty() {
                    errors.push(format!("spec.sourceSelector.matcher.namespaces[{i}]: is empty"));
                }
            }
            let clusters: Vec<&String> = if m.clusters.is_empty() { snapshot.clusters.keys().collect() } else { m.clusters.iter().collect() };
            for cluster in clusters {
                let td = trust_domain(snapshot, cluster);
                if m.namespaces.is_empty() {
                    out.insert(PrincipalMatch::Prefix(format!("spiffe://{td}/")));
                }
                for ns in m.namespaces.iter().filter(|ns| !ns.is_empty()) {
                    out.insert(PrincipalMatch::Prefix(format!("spiffe://{td}/ns/{ns}/sa/")));
                }
            }
        }
    }
    out.into_iter().collect()
}

/// Validates one policy against the mesh and resolves it; errors are `field: reason`.
fn resolve_policy(
    snapshot: &MeshSnapshot,
    p: &PolicyObject<AccessControlPolicySpec>,
    accounts: &ServiceAccounts,
) -> Result<AccessPolicy, Vec<String>> {
    let mut errors = p.parse_errors.clone();
    if !errors.is_empty() {
        return Err(errors);
    }
    let spec = &p.spec;
    let principals = principals(snapshot, spec.source_selector.as_ref(), accounts, &mut errors);
    let services = select_services(snapshot, spec.destination_selector.as_ref(), &mut errors);
    let mut paths = Vec::new();
    for (i, path) in spec.allowed_paths.iter().enumerate() {
        match PathMatch::parse(path) {
            Ok(m) => paths.push(m),
            Err(e) => errors.push(format!("spec.allowedPaths[{i}]: {e}")),
        }
    }
    for (i, method) in spec.allowed_methods.iter().enumerate() {
        if !METHODS.contains(&method.as_str()) {
            errors.push(format!("spec.allowedMethods[{i}]: {method:?} is not one of {}", METHODS.join(", ")));
        }
    }
    let mut ports = BTreeSet::new();
    for (i, port) in spec.allowed_ports.iter().enumerate() {
        let served = |p: u16| services.iter().any(|s| snapshot.service(s).is_some_and(|svc| svc.port(p).is_some()));
        match u16::try_from(*port).ok().filter(|p| served(*p)) {
            Some(p) => {
                ports.insert(p);
            }
            None => {
                let known: BTreeSet<u16> =
                    services.iter().filter_map(|s| snapshot.service(s)).flat_map(|svc| svc.ports.iter().map(|p| p.port)).collect();
                let known: Vec<String> = known.iter().map(u16::to_string).collect();
                errors.push(format!("spec.allowedPorts[{i}]: no selected service has port {port} (their ports: {})", known.join(", ")));
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let grant = Arc::new(AccessGrant { policy: format!("{}/{}", p.namespace, p.name), principals, paths, methods: spec.allowed_methods.clone() });
    let rules = services.into_iter().map(|service| AccessRule { service, ports: ports.clone(), grant: grant.clone() }).collect();
    Ok(AccessPolicy { namespace: p.namespace.clone(), name: p.name.clone(), generation: p.generation, rules })
}

/// Resolves every policy: those that serve (accepted now, or their last
/// accepted version) and each one's status.
pub fn resolve(
    snapshot: &MeshSnapshot,
    policies: &[PolicyObject<AccessControlPolicySpec>],
    last_good: &mut LastGoodAccess,
) -> (Vec<Arc<AccessPolicy>>, BTreeMap<MeshObjectId, MeshObjectStatus>) {
    let mut serving = Vec::new();
    let mut status = BTreeMap::new();
    let mut live = std::collections::HashSet::new();
    let accounts = ServiceAccounts::default();
    for p in policies {
        let key = (p.namespace.clone(), p.name.clone());
        live.insert(key.clone());
        let (id, mut s) = object_status("AccessControlPolicy", p, Vec::new());
        match resolve_policy(snapshot, p, &accounts) {
            Ok(resolved) => {
                let resolved = Arc::new(resolved);
                s.serving_generation = resolved.generation;
                last_good.accepted.insert(key, resolved.clone());
                serving.push(resolved);
            }
            Err(errors) => {
                s.state = PolicyState::Invalid;
                s.messages = errors;
                if let Some(last) = last_good.accepted.get(&key) {
                    s.messages.push(last_accepted_keeps_serving(last.generation));
                    s.serving_generation = last.generation;
                    serving.push(last.clone());
                }
            }
        }
        status.insert(id, s);
    }
    last_good.accepted.retain(|k, _| live.contains(k));
    (serving, status)
}

/// Cluster → workload address → what its inbound side allows, for the
/// clusters that enforce access control. Only addresses some policy grants
/// something are listed: any other workload of an enforcing cluster allows
/// nobody ([`inbound_access`]).
pub fn workload_access(snapshot: &MeshSnapshot) -> BTreeMap<String, HashMap<String, Arc<InboundAccess>>> {
    let mut by_service: BTreeMap<&ServiceKey, Vec<&AccessRule>> = BTreeMap::new();
    for rule in snapshot.access_policies.iter().flat_map(|p| p.rules.iter()) {
        if snapshot.access_enforced.contains(&rule.service.cluster) {
            by_service.entry(&rule.service).or_default().push(rule);
        }
    }
    let mut building: BTreeMap<&str, HashMap<&str, InboundAccess>> = BTreeMap::new();
    for (key, rules) in by_service {
        let Some(svc) = snapshot.service(key) else { continue };
        let by_address = building.entry(key.cluster.as_str()).or_default();
        for ep in snapshot.endpoints(key) {
            let access = by_address.entry(ep.address.as_str()).or_default();
            for sp in &svc.ports {
                let Some(target) = ep.ports.get(&sp.name) else { continue };
                for rule in rules.iter().filter(|r| r.ports.is_empty() || r.ports.contains(&sp.port)) {
                    access.allow(*target, &rule.grant);
                }
            }
        }
    }
    let mut out: BTreeMap<String, HashMap<String, Arc<InboundAccess>>> =
        snapshot.access_enforced.iter().map(|c| (c.clone(), HashMap::new())).collect();
    for (cluster, by_address) in building {
        let into = out.entry(cluster.to_string()).or_default();
        for (address, access) in by_address {
            if !access.ports.is_empty() {
                into.insert(address.to_string(), Arc::new(access));
            }
        }
    }
    out
}

/// What a workload at `addresses` in `cluster` allows: None when its cluster
/// does not enforce access control.
pub fn inbound_access(snapshot: &MeshSnapshot, cluster: &str, addresses: &[String]) -> Option<Arc<InboundAccess>> {
    let by_address = snapshot.workload_access.get(cluster)?;
    let mut found = addresses.iter().filter_map(|a| by_address.get(a));
    let Some(first) = found.next() else { return Some(Arc::new(InboundAccess::default())) };
    let rest: Vec<&Arc<InboundAccess>> = found.collect();
    if rest.is_empty() {
        return Some(first.clone());
    }
    let mut merged = (**first).clone();
    for (port, grant) in rest.iter().flat_map(|a| a.ports.iter()).flat_map(|(port, grants)| grants.iter().map(move |g| (*port, g))) {
        merged.allow(port, grant);
    }
    Some(Arc::new(merged))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_paths_parse_as_the_seed_spells_them() {
        assert_eq!(PathMatch::parse("/reviews*"), Ok(PathMatch::Prefix("/reviews".into())));
        assert_eq!(PathMatch::parse("/reviews/1"), Ok(PathMatch::Exact("/reviews/1".into())));
        assert_eq!(PathMatch::parse("*.json"), Ok(PathMatch::Suffix(".json".into())));
        assert_eq!(PathMatch::parse("/helloworld.Greeter/SayHello"), Ok(PathMatch::Exact("/helloworld.Greeter/SayHello".into())));
        assert_eq!(PathMatch::parse("*"), Ok(PathMatch::Any));
        for bad in ["", "reviews", "/a*b", "*a*", "/a?x=1", "/a b", "/a**"] {
            assert!(PathMatch::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_invalid_edit_keeps_the_last_accepted_rules_serving() {
        use crate::sources::file::{SourceMemory, load_config_dir};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bookinfo-captured");
        let mut inputs = load_config_dir(&dir, &mut SourceMemory::default()).unwrap();
        inputs.virtual_meshes[0].spec.enforce_access_control = Some(serde_json::json!("ENABLED"));
        let policy = |paths: serde_json::Value, generation| PolicyObject {
            namespace: "service-mesh-hub".into(),
            name: "p".into(),
            generation: Some(generation),
            created_ms: 0,
            origin: "test".into(),
            spec: serde_json::from_value(serde_json::json!({
                "sourceSelector": {"matcher": {"namespaces": ["default"]}},
                "destinationSelector": {"serviceRefs": {"services": [{"name": "reviews", "namespace": "default", "cluster": "management-plane"}]}},
                "allowedPaths": paths,
            }))
            .unwrap(),
            parse_errors: vec![],
        };
        let mut last_good = crate::model::policy::LastGood::default();
        inputs.access_policies = vec![policy(serde_json::json!(["/reviews*"]), 1)];
        let good = MeshSnapshot::build(inputs.clone(), &mut last_good);
        assert_eq!(good.access_policies.len(), 1);
        inputs.access_policies = vec![policy(serde_json::json!([""]), 2)];
        let bad = MeshSnapshot::build(inputs.clone(), &mut last_good);
        let status = bad.mesh_object_status.values().find(|s| s.observed_generation == Some(2)).unwrap();
        assert_eq!(status.state, PolicyState::Invalid);
        assert_eq!(status.messages, ["spec.allowedPaths[0]: is empty", "the last accepted version (generation 1) keeps serving"]);
        assert_eq!(bad.access_policies, good.access_policies, "neither allow-all nor deny-all by accident");
        assert_eq!(status.serving_generation, Some(1));
        assert_eq!(bad.workload_access, good.workload_access);
    }

    #[test]
    fn enforcement_reads_the_enum_its_numbers_and_the_old_bool() {
        use serde_json::json;
        for (v, on) in [
            (json!("ENABLED"), true),
            (json!("DISABLED"), false),
            (json!("MESH_DEFAULT"), false),
            (json!(true), true),
            (json!(false), false),
            (json!(1), true),
            (json!(0), false),
            (json!(2), false),
        ] {
            assert_eq!(enforcement(Some(&v)), Ok(on), "{v}");
        }
        assert_eq!(enforcement(None), Ok(false));
        let err = enforcement(Some(&json!("YES"))).unwrap_err();
        assert!(err.starts_with("spec.enforceAccessControl: \"YES\" is not one of"), "{err}");
    }
}
