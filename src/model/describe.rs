//! What `meshpilot describe service` and `/debug/policyz` show: which
//! policies apply to a service and the traffic split that results.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::policy::{self, PolicyId, PolicyStatus, ResolvedDestination};
use super::{MeshSnapshot, ServiceKey};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceDescription {
    pub service: String,
    pub exists: bool,
    pub ports: Vec<u16>,
    /// Per port: its protocol and why (Istio's rules), or why it is left out.
    #[serde(default)]
    pub port_protocols: Vec<String>,
    pub endpoints: usize,
    pub ready_endpoints: usize,
    /// Policies naming this service, with their state.
    pub policies: Vec<PolicyLine>,
    /// The effective routes, most specific first; the last one catches the rest.
    pub routes: Vec<RouteLine>,
    /// Who may call it: not enforced, or each AccessControlPolicy's grant.
    #[serde(default)]
    pub access: Vec<String>,
}

/// Who may call `key`, in words.
fn access_lines(snapshot: &MeshSnapshot, key: &ServiceKey) -> Vec<String> {
    use super::access::{PathMatch, PrincipalMatch};
    if !snapshot.access_enforced.contains(&key.cluster) {
        return vec![format!("not enforced in cluster {}: every caller is allowed", key.cluster)];
    }
    let mut out = Vec::new();
    let has_port = |p: &u16| snapshot.service(key).is_some_and(|s| s.port(*p).is_some());
    let rules = snapshot.access_policies.iter().flat_map(|p| p.rules.iter());
    // (A rule whose ports this service does not have opens nothing here.)
    for rule in rules.filter(|r| &r.service == key && (r.ports.is_empty() || r.ports.iter().any(has_port))) {
        let g = &rule.grant;
        let who: Vec<String> = g
            .principals
            .iter()
            .map(|p| match p {
                PrincipalMatch::Exact(id) => id.clone(),
                PrincipalMatch::Prefix(prefix) => format!("{prefix}*"),
            })
            .collect();
        let who = if who.is_empty() { "every mesh identity".to_string() } else { who.join(", ") };
        let methods = if g.methods.is_empty() { "any method".to_string() } else { g.methods.join("|") };
        let paths: Vec<String> = g
            .paths
            .iter()
            .map(|p| match p {
                PathMatch::Exact(x) => x.clone(),
                PathMatch::Prefix(x) => format!("{x}*"),
                PathMatch::Suffix(x) => format!("*{x}"),
                PathMatch::Any => "*".into(),
            })
            .collect();
        let paths = if paths.is_empty() { "any path".to_string() } else { paths.join(" ") };
        let ports =
            if rule.ports.is_empty() { "every port".to_string() } else { rule.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",") };
        out.push(format!("AccessControlPolicy {} allows {who}: {methods} {paths} on {ports}", g.policy));
    }
    if out.is_empty() {
        out.push(format!("enforced in cluster {}: no AccessControlPolicy allows anyone, every caller is refused", key.cluster));
    }
    out
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyLine {
    pub policy: String,
    pub state: String,
    pub messages: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteLine {
    pub from_policies: Vec<String>,
    /// "every workload" or the source selector.
    pub sources: String,
    /// "every request" or the matchers, ORed.
    pub requests: String,
    pub destinations: Vec<DestinationLine>,
    /// Other actions (timeouts, retries, …) in words.
    pub actions: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DestinationLine {
    pub destination: String,
    pub subset: String,
    pub weight: u32,
    pub percent: f64,
}

fn dest_lines(dests: &[ResolvedDestination]) -> Vec<DestinationLine> {
    let total: u64 = dests.iter().map(|d| u64::from(d.weight)).sum();
    dests
        .iter()
        .map(|d| DestinationLine {
            destination: d.service.to_string() + &d.port.map(|p| format!(":{p}")).unwrap_or_default(),
            subset: super::subset_name(&d.subset),
            weight: d.weight,
            percent: if total == 0 { 0.0 } else { (d.weight as f64) * 100.0 / total as f64 },
        })
        .collect()
}

pub fn describe_service(snapshot: &MeshSnapshot, key: &ServiceKey) -> ServiceDescription {
    let svc = snapshot.service(key);
    let eps = snapshot.endpoints(key);
    let shown = key.to_string();
    let policies = snapshot
        .policy_status
        .iter()
        .filter(|(_, st)| st.services.contains(&shown))
        .map(|(id, st)| PolicyLine { policy: id.to_string(), state: st.state.to_string(), messages: st.messages.clone() })
        .collect();
    let mut routes = Vec::new();
    let rules = policy::rules_for(&snapshot.applied, key);
    let (specific, catch_all): (Vec<_>, Vec<_>) = rules.into_iter().partition(|(_, r)| !r.matchers.is_empty());
    for (ids, rule) in specific.into_iter().chain(catch_all) {
        let a = &rule.actions;
        let destinations = match &a.traffic_shift {
            Some(d) => dest_lines(d),
            None => vec![DestinationLine { destination: shown.clone(), subset: String::new(), weight: 1, percent: 100.0 }],
        };
        let mut actions = Vec::new();
        if let Some(t) = a.request_timeout {
            actions.push(format!("timeout {t:?}"));
        }
        if let Some(r) = &a.retries {
            actions.push(format!("retries {}{}", r.attempts, r.per_try_timeout.map(|t| format!(" (per try {t:?})")).unwrap_or_default()));
        }
        if let Some(f) = &a.fault_injection {
            actions.push(format!("fault {:?} for {}% of requests", f.fault, f.percentage));
        }
        if let Some(m) = &a.mirror {
            actions.push(format!("mirror {}% to {}", m.percentage, m.service));
        }
        if a.header_manipulation.is_some() {
            actions.push("header changes".into());
        }
        if a.cors_policy.is_some() {
            actions.push("CORS".into());
        }
        if let Some(o) = &a.outlier_detection {
            actions.push(format!("outlier detection after {} errors", o.consecutive_errors));
        }
        let sources = if rule.source.is_everyone() {
            "every workload".to_string()
        } else {
            format!("namespaces {:?} labels {:?}", rule.source.namespaces, rule.source.labels)
        };
        let requests = if rule.matchers.is_empty() {
            "every request".to_string()
        } else {
            rule.matchers.iter().map(|m| serde_json::to_string(m).unwrap_or_default()).collect::<Vec<_>>().join(" OR ")
        };
        routes.push(RouteLine { from_policies: ids.iter().map(|i| i.to_string()).collect(), sources, requests, destinations, actions });
    }
    if routes.is_empty() && svc.is_some() {
        routes.push(RouteLine {
            from_policies: vec![],
            sources: "every workload".into(),
            requests: "every request".into(),
            destinations: vec![DestinationLine { destination: shown.clone(), subset: String::new(), weight: 1, percent: 100.0 }],
            actions: vec![],
        });
    }
    ServiceDescription {
        service: shown,
        exists: svc.is_some(),
        ports: svc.map(|s| s.ports.iter().map(|p| p.port).collect()).unwrap_or_default(),
        port_protocols: svc
            .map(|s| {
                let served = s.ports.iter().map(|p| format!("{}: {} ({})", p.port, p.protocol.as_str(), p.protocol_reason));
                let headless = s.headless.then(|| "headless: clients reach its pods at their own addresses".to_string());
                served.chain(headless).chain(s.excluded_ports.iter().cloned()).collect()
            })
            .unwrap_or_default(),
        endpoints: eps.len(),
        ready_endpoints: eps.iter().filter(|e| e.ready).count(),
        policies,
        routes,
        access: access_lines(snapshot, key),
    }
}

/// Plain text for the terminal.
pub fn render(d: &ServiceDescription) -> String {
    let mut out = String::new();
    if !d.exists {
        let _ = writeln!(out, "service {}: not found", d.service);
        return out;
    }
    let ports: Vec<String> = d.ports.iter().map(u16::to_string).collect();
    let _ = writeln!(out, "service {}  ports {}  endpoints {} ({} ready)", d.service, ports.join(","), d.endpoints, d.ready_endpoints);
    for p in &d.port_protocols {
        let _ = writeln!(out, "  port {p}");
    }
    let _ = writeln!(out, "\npolicies:");
    if d.policies.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for p in &d.policies {
        let _ = writeln!(out, "  TrafficPolicy {}  {}", p.policy, p.state);
        for m in &p.messages {
            let _ = writeln!(out, "    {m}");
        }
    }
    if !d.access.is_empty() {
        let _ = writeln!(out, "\naccess:");
        for line in &d.access {
            let _ = writeln!(out, "  {line}");
        }
    }
    let _ = writeln!(out, "\nroutes (first match wins):");
    for r in &d.routes {
        let from = if r.from_policies.is_empty() { "default".to_string() } else { r.from_policies.join(", ") };
        let actions = if r.actions.is_empty() { String::new() } else { format!(", {}", r.actions.join("; ")) };
        let _ = writeln!(out, "  from {}, for {}{actions}  [{from}]", r.sources, r.requests);
        for dl in &r.destinations {
            let subset = if dl.subset.is_empty() { String::new() } else { format!(" subset {}", dl.subset) };
            let _ = writeln!(out, "    {:>6.2}%  {}{}  (weight {})", dl.percent, dl.destination, subset, dl.weight);
        }
    }
    out
}

/// `/debug/policyz`: every policy's status and the inputs that could not be read.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyReport<'a> {
    pub policies: BTreeMap<String, &'a PolicyStatus>,
    /// VirtualMeshes and AccessControlPolicies.
    pub mesh_objects: BTreeMap<String, &'a super::MeshObjectStatus>,
    pub input_errors: &'a [String],
}

pub fn policy_report(snapshot: &MeshSnapshot) -> PolicyReport<'_> {
    PolicyReport {
        policies: snapshot.policy_status.iter().map(|(id, st): (&PolicyId, _)| (id.to_string(), st)).collect(),
        mesh_objects: snapshot.mesh_object_status.iter().map(|(id, st)| (id.to_string(), st)).collect(),
        input_errors: &snapshot.input_errors,
    }
}

/// Parses `name.namespace.cluster` (cluster names may contain dots; name and namespace may not).
pub fn parse_service_arg(s: &str) -> Option<ServiceKey> {
    let mut parts = s.splitn(3, '.');
    let (name, ns, cluster) = (parts.next()?, parts.next()?, parts.next()?);
    (!name.is_empty() && !ns.is_empty() && !cluster.is_empty()).then(|| ServiceKey::new(cluster, ns, name))
}
