//! RDS: one RouteConfiguration per port, a virtual host per service on it,
//! routes from the TrafficPolicies that apply to this client.

use super::proto::{any, pb_duration};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, RuntimeFractionalPercent, header_value_option::HeaderAppendAction};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, Vhds, VirtualHost,
    WeightedCluster,
    header_matcher::HeaderMatchSpecifier,
    query_parameter_matcher::QueryParameterMatchSpecifier,
    route::Action,
    route_action::{ClusterSpecifier, RequestMirrorPolicy},
    route_match::PathSpecifier,
    weighted_cluster::ClusterWeight,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{FaultDelay, fault_delay::FaultDelaySecifier};
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::CorsPolicy;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{FaultAbort, HttpFault, fault_abort::ErrorType};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy;
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent::DenominatorType};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};

use super::built::{BuiltVirtualHost, vhds_resource};
use super::memo::{Memo, VirtualHostKey};
use super::{ClusterTarget, ProxyScope, ServiceView, names};
use crate::model::MeshSnapshot;
use crate::model::api::HttpMatcher;
use crate::model::policy::{self, Actions, Fault};
use crate::xds::resources::Resource;

pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
pub const CORS_FILTER: &str = "envoy.filters.http.cors";
/// Istio's default retry conditions.
const RETRY_ON: &str = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

fn exact(s: &str) -> StringMatcher {
    StringMatcher { match_pattern: Some(MatchPattern::Exact(s.to_string())), ..Default::default() }
}

fn regex(s: &str) -> StringMatcher {
    StringMatcher { match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher { regex: s.to_string(), ..Default::default() })), ..Default::default() }
}

fn million(pct: f64) -> FractionalPercent {
    FractionalPercent { numerator: (pct * 10_000.0).round() as u32, denominator: DenominatorType::Million as i32 }
}

fn route_match(m: &HttpMatcher) -> RouteMatch {
    let path = if let Some(e) = &m.exact {
        PathSpecifier::Path(e.clone())
    } else if let Some(r) = &m.regex {
        PathSpecifier::SafeRegex(RegexMatcher { regex: r.clone(), ..Default::default() })
    } else {
        PathSpecifier::Prefix(m.prefix.clone().unwrap_or_else(|| "/".into()))
    };
    let mut headers: Vec<HeaderMatcher> = m
        .headers
        .iter()
        .map(|h| HeaderMatcher {
            name: h.name.clone(),
            invert_match: h.invert_match,
            header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(if h.regex { regex(&h.value) } else { exact(&h.value) })),
            ..Default::default()
        })
        .collect();
    if let Some(method) = &m.method {
        headers.push(HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(exact(&method.method))),
            ..Default::default()
        });
    }
    let query_parameters = m
        .query_parameters
        .iter()
        .map(|q| QueryParameterMatcher {
            name: q.name.clone(),
            query_parameter_match_specifier: Some(QueryParameterMatchSpecifier::StringMatch(if q.regex { regex(&q.value) } else { exact(&q.value) })),
        })
        .collect();
    RouteMatch { path_specifier: Some(path), headers, query_parameters, ..Default::default() }
}

fn header_options(headers: &BTreeMap<String, String>) -> Vec<HeaderValueOption> {
    headers
        .iter()
        .map(|(k, v)| HeaderValueOption {
            header: Some(HeaderValue { key: k.clone(), value: v.clone(), ..Default::default() }),
            append_action: HeaderAppendAction::AppendIfExistsOrAdd as i32,
            ..Default::default()
        })
        .collect()
}

fn fault_config(f: &policy::FaultInjection) -> HttpFault {
    let pct = Some(million(f.percentage));
    match f.fault {
        Fault::Delay(d) => HttpFault {
            delay: Some(FaultDelay { percentage: pct, fault_delay_secifier: Some(FaultDelaySecifier::FixedDelay(pb_duration(d))) }),
            ..Default::default()
        },
        Fault::Abort(status) => HttpFault {
            abort: Some(FaultAbort { percentage: pct, error_type: Some(ErrorType::HttpStatus(status)), ..Default::default() }),
            ..Default::default()
        },
    }
}

fn cors_config(c: &policy::Cors) -> CorsPolicy {
    let origins = c
        .policy
        .allow_origins
        .iter()
        .map(|o| match (&o.exact, &o.prefix, &o.regex) {
            (Some(e), _, _) => exact(e),
            (_, Some(p), _) => StringMatcher { match_pattern: Some(MatchPattern::Prefix(p.clone())), ..Default::default() },
            (_, _, Some(r)) => regex(r),
            _ => exact(""),
        })
        .collect();
    CorsPolicy {
        allow_origin_string_match: origins,
        allow_methods: c.policy.allow_methods.join(","),
        allow_headers: c.policy.allow_headers.join(","),
        expose_headers: c.policy.expose_headers.join(","),
        max_age: c.max_age.map(|d| d.as_secs().to_string()).unwrap_or_default(),
        allow_credentials: c.policy.allow_credentials.map(|value| BoolValue { value }),
        ..Default::default()
    }
}

/// The route action and Envoy clusters for a set of merged actions on one listener port.
fn build_route(
    snapshot: &MeshSnapshot,
    scope: &ProxyScope,
    view: &ServiceView<'_>,
    port: u16,
    route_match: RouteMatch,
    actions: &Actions,
    targets: &mut BTreeMap<String, ClusterTarget>,
) -> Route {
    let client = &scope.cluster;
    let mut target = |service: &crate::model::ServiceKey, dport: u16, subset: &BTreeMap<String, String>| {
        let t = ClusterTarget::new(client, service, dport, subset);
        let name = t.name.clone();
        targets.entry(name.clone()).or_insert(t);
        name
    };
    let cluster_specifier = match &actions.traffic_shift {
        Some(dests) => {
            let mut weighted: Vec<ClusterWeight> = Vec::new();
            for d in dests.iter().filter(|d| d.weight > 0) {
                let Some(dport) = policy::destination_port(snapshot, &d.service, d.port, port) else { continue };
                let name = target(&d.service, dport, &d.subset);
                match weighted.iter_mut().find(|w| w.name == name) {
                    Some(w) => w.weight = Some(UInt32Value { value: w.weight.map_or(0, |x| x.value) + d.weight }),
                    None => weighted.push(ClusterWeight { name, weight: Some(UInt32Value { value: d.weight }), ..Default::default() }),
                }
            }
            match weighted.len() {
                0 => ClusterSpecifier::Cluster(target(&view.service.key, port, &BTreeMap::new())),
                1 => ClusterSpecifier::Cluster(weighted.remove(0).name),
                _ => ClusterSpecifier::WeightedClusters(WeightedCluster { clusters: weighted, ..Default::default() }),
            }
        }
        None => ClusterSpecifier::Cluster(target(&view.service.key, port, &BTreeMap::new())),
    };
    let retry_policy = match &actions.retries {
        Some(r) if r.attempts == 0 => None,
        Some(r) => Some(RetryPolicy {
            retry_on: RETRY_ON.into(),
            num_retries: Some(UInt32Value { value: r.attempts }),
            per_try_timeout: r.per_try_timeout.map(pb_duration),
            retriable_status_codes: vec![503],
            ..Default::default()
        }),
        // Istio's default: two retries on connection-level failures.
        None => Some(RetryPolicy {
            retry_on: RETRY_ON.into(),
            num_retries: Some(UInt32Value { value: 2 }),
            retriable_status_codes: vec![503],
            host_selection_retry_max_attempts: 5,
            ..Default::default()
        }),
    };
    let request_mirror_policies = actions
        .mirror
        .iter()
        .filter_map(|m| {
            let dport = policy::destination_port(snapshot, &m.service, m.port, port)?;
            Some(RequestMirrorPolicy {
                cluster: target(&m.service, dport, &BTreeMap::new()),
                runtime_fraction: Some(RuntimeFractionalPercent { default_value: Some(million(m.percentage)), ..Default::default() }),
                ..Default::default()
            })
        })
        .collect();
    let action = RouteAction {
        cluster_specifier: Some(cluster_specifier),
        timeout: Some(pb_duration(actions.request_timeout.unwrap_or_default())),
        retry_policy,
        request_mirror_policies,
        ..Default::default()
    };
    let mut route = Route { r#match: Some(route_match), action: Some(Action::Route(action)), ..Default::default() };
    if let Some(h) = &actions.header_manipulation {
        route.request_headers_to_add = header_options(&h.append_request_headers);
        route.request_headers_to_remove = h.remove_request_headers.clone();
        route.response_headers_to_add = header_options(&h.append_response_headers);
        route.response_headers_to_remove = h.remove_response_headers.clone();
    }
    if let Some(f) = &actions.fault_injection {
        route.typed_per_filter_config.insert(FAULT_FILTER.into(), any(&fault_config(f)));
    }
    if let Some(c) = &actions.cors_policy {
        route.typed_per_filter_config.insert(CORS_FILTER.into(), any(&cors_config(c)));
    }
    route
}

/// The routes of one virtual host from its rule `groups`: policy routes with
/// request matchers first (oldest policy first), then the catch-all.
fn vhost_routes(
    snapshot: &MeshSnapshot,
    scope: &ProxyScope,
    view: &ServiceView<'_>,
    port: u16,
    groups: Vec<(Vec<HttpMatcher>, Actions)>,
    targets: &mut BTreeMap<String, ClusterTarget>,
) -> Vec<Route> {
    let (mut specific, catch_all): (Vec<_>, Vec<_>) = groups.into_iter().partition(|(m, _)| !m.is_empty());
    let default_actions = catch_all.into_iter().next().map(|(_, a)| a).unwrap_or_default();
    let mut routes = Vec::new();
    for (matchers, actions) in specific.drain(..) {
        for m in &matchers {
            routes.push(build_route(snapshot, scope, view, port, route_match(m), &actions, targets));
        }
    }
    let all = RouteMatch { path_specifier: Some(PathSpecifier::Prefix("/".into())), ..Default::default() };
    routes.push(build_route(snapshot, scope, view, port, all, &default_actions, targets));
    routes
}

/// Where a captured sidecar sends what no service matches (Istio's `outboundTrafficPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// `ALLOW_ANY`: on to the original destination (`PassthroughCluster`).
    AllowAny,
    /// `REGISTRY_ONLY`: refused (`BlackHoleCluster`; HTTP gets a 502).
    RegistryOnly,
}

/// Istio's last virtual host of a captured sidecar's route configurations:
/// `allow_any` (`*` → PassthroughCluster) or `block_all` (`*` → 502).
fn unmatched_vhost(unmatched: Unmatched) -> VirtualHost {
    let all = RouteMatch { path_specifier: Some(PathSpecifier::Prefix("/".into())), ..Default::default() };
    let (name, action) = match unmatched {
        Unmatched::AllowAny => (
            "allow_any",
            Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(super::clusters::PASSTHROUGH_CLUSTER.into())),
                timeout: Some(pb_duration(Duration::ZERO)),
                ..Default::default()
            }),
        ),
        Unmatched::RegistryOnly => ("block_all", Action::DirectResponse(DirectResponseAction { status: 502, ..Default::default() })),
    };
    VirtualHost {
        name: name.into(),
        domains: vec!["*".into()],
        routes: vec![Route { name: name.into(), r#match: Some(all), action: Some(action), ..Default::default() }],
        ..Default::default()
    }
}

/// The `tcp_proxy` destination of a TCP (or TLS, or undetected) service port
/// for this client: a policy's `trafficShift` as weighted clusters (request
/// matchers and HTTP actions do not apply to TCP), else the service itself.
pub fn tcp_destination(
    snapshot: &MeshSnapshot,
    scope: &ProxyScope,
    view: &ServiceView<'_>,
    port: u16,
    targets: &mut BTreeMap<String, ClusterTarget>,
) -> tcp_proxy::ClusterSpecifier {
    let rules = snapshot.rules_for(&view.service.key);
    let shift = rules
        .iter()
        .filter(|(_, r)| r.matchers.is_empty() && r.source.matches(&scope.namespace, &scope.labels))
        .find_map(|(_, r)| r.actions.traffic_shift.as_ref());
    let mut target = |service: &crate::model::ServiceKey, dport: u16, subset: &BTreeMap<String, String>| {
        let t = ClusterTarget::new(&scope.cluster, service, dport, subset);
        let name = t.name.clone();
        targets.entry(name.clone()).or_insert(t);
        name
    };
    let mut weighted: Vec<tcp_proxy::weighted_cluster::ClusterWeight> = Vec::new();
    for d in shift.into_iter().flatten().filter(|d| d.weight > 0) {
        let Some(dport) = policy::destination_port(snapshot, &d.service, d.port, port) else { continue };
        let name = target(&d.service, dport, &d.subset);
        match weighted.iter_mut().find(|w| w.name == name) {
            Some(w) => w.weight += d.weight,
            None => weighted.push(tcp_proxy::weighted_cluster::ClusterWeight { name, weight: d.weight, ..Default::default() }),
        }
    }
    match weighted.len() {
        0 => tcp_proxy::ClusterSpecifier::Cluster(target(&view.service.key, port, &BTreeMap::new())),
        1 => tcp_proxy::ClusterSpecifier::Cluster(weighted.remove(0).name),
        _ => tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster { clusters: weighted }),
    }
}

/// One HTTP port's routing: its services' virtual hosts (by name), and for
/// a captured sidecar the last one, for everything else.
pub struct PortRoutes {
    pub port: u16,
    pub hosts: Vec<Arc<BuiltVirtualHost>>,
    pub unmatched: Option<Unmatched>,
}

impl PortRoutes {
    pub fn name(&self) -> String {
        names::route_config_name(self.port)
    }

    /// The port's RouteConfiguration: with every virtual host, or, over VHDS,
    /// with none (Envoy subscribes to them by the configuration's name, delta ADS).
    pub fn configuration(&self, vhds: bool) -> RouteConfiguration {
        let mut rc = RouteConfiguration {
            name: self.name(),
            validate_clusters: Some(BoolValue { value: false }),
            ignore_port_in_host_matching: true,
            ..Default::default()
        };
        if vhds {
            rc.vhds = Some(Vhds { config_source: Some(super::proto::ads_config_source()) });
        } else {
            rc.virtual_hosts = self.hosts.iter().map(|h| h.vhost.clone()).chain(self.unmatched.map(unmatched_vhost)).collect();
        }
        rc
    }

    /// Its virtual hosts as VHDS resources.
    pub fn virtual_host_resources(&self) -> Vec<Arc<Resource>> {
        let name = self.name();
        let mut out: Vec<Arc<Resource>> = self.hosts.iter().map(|h| h.vhds_resource(&name)).collect();
        out.extend(self.unmatched.map(|u| Arc::new(vhds_resource(&name, unmatched_vhost(u)))));
        out
    }
}

/// The merged policy rules that reach `view` from this client, per matcher
/// list in order of first appearance.
pub fn rule_groups(snapshot: &MeshSnapshot, scope: &ProxyScope, view: &ServiceView<'_>) -> Vec<(Vec<HttpMatcher>, Actions)> {
    let rules = snapshot.rules_for(&view.service.key);
    let mut groups: Vec<(Vec<HttpMatcher>, Actions)> = Vec::new();
    for (_, r) in rules.iter().filter(|(_, r)| r.source.matches(&scope.namespace, &scope.labels)) {
        match groups.iter_mut().find(|(m, _)| *m == r.matchers) {
            Some((_, a)) => a.merge_from(&r.actions),
            None => groups.push((r.matchers.clone(), r.actions.clone())),
        }
    }
    groups
}

/// The memo's key for `view`'s virtual host on `port` answering `domains`, reached by rule `groups`.
pub fn virtual_host_key(
    scope: &ProxyScope,
    view: &ServiceView<'_>,
    port: u16,
    domains: Vec<String>,
    groups: &[(Vec<HttpMatcher>, Actions)],
) -> VirtualHostKey {
    VirtualHostKey {
        client_cluster: scope.cluster.clone(),
        service: view.service.key.clone(),
        host: view.host.clone(),
        port,
        domains,
        rules: if groups.is_empty() { String::new() } else { serde_json::to_string(groups).unwrap_or_default() },
    }
}

/// `view`'s virtual host on `port` for this client: from `memo` when built alike before.
pub fn virtual_host(
    snapshot: &MeshSnapshot,
    scope: &ProxyScope,
    view: &ServiceView<'_>,
    port: u16,
    domains: Vec<String>,
    groups: &[(Vec<HttpMatcher>, Actions)],
    memo: &Memo<'_>,
) -> Arc<BuiltVirtualHost> {
    let key = virtual_host_key(scope, view, port, domains, groups);
    memo.virtual_host(&key, || {
        let mut used_targets = BTreeMap::new();
        let routes = vhost_routes(snapshot, scope, view, port, groups.to_vec(), &mut used_targets);
        let vhost = VirtualHost { name: format!("{}:{}", view.host, port), domains: key.domains.clone(), routes, ..Default::default() };
        BuiltVirtualHost::new(vhost, used_targets.into_values().collect())
    })
}

/// Every HTTP port's routes (ports whose services speak HTTP or are
/// detected), and the clusters they use; a captured sidecar's end with the
/// virtual host for everything else (`unmatched`). Virtual hosts come from
/// `memo` when built alike before.
pub fn route_configurations(
    snapshot: &MeshSnapshot,
    scope: &ProxyScope,
    views: &[ServiceView<'_>],
    unmatched: Option<Unmatched>,
    memo: &Memo<'_>,
) -> (Vec<PortRoutes>, BTreeMap<String, ClusterTarget>) {
    let mut targets = BTreeMap::new();
    let mut by_port: BTreeMap<u16, Vec<Arc<BuiltVirtualHost>>> = BTreeMap::new();
    let mut used: BTreeMap<u16, HashSet<String>> = BTreeMap::new();
    for v in views {
        let mut groups = None;
        for p in v.service.ports.iter().filter(|p| p.protocol.has_http_routes()) {
            let used = used.entry(p.port).or_default();
            let cluster_ip = if v.service.key.cluster == scope.cluster { v.service.cluster_ip.as_deref() } else { None };
            let domains: Vec<String> = names::domains(&v.service.key, &v.host, v.aliases, &scope.namespace, cluster_ip)
                .into_iter()
                .filter(|d| used.insert(d.clone()))
                .collect();
            if domains.is_empty() {
                continue;
            }
            let groups = groups.get_or_insert_with(|| rule_groups(snapshot, scope, v));
            let built = virtual_host(snapshot, scope, v, p.port, domains, groups, memo);
            for t in &built.targets {
                targets.entry(t.name.clone()).or_insert_with(|| t.clone());
            }
            by_port.entry(p.port).or_default().push(built);
        }
    }
    let configs = by_port
        .into_iter()
        .map(|(port, mut hosts)| {
            hosts.sort_by(|a, b| a.vhost.name.cmp(&b.vhost.name));
            PortRoutes { port, hosts, unmatched }
        })
        .collect();
    (configs, targets)
}
