//! A policy change patched into a translated set instead of translated again.
//!
//! Over VHDS each service's virtual host is a resource of its own, and a
//! virtual host depends on the services' rules and on its domains, which no
//! policy changes. So when only some services' rules changed, a delta ADS
//! scope's set needs exactly: those services' virtual hosts built again
//! (from the memo when built alike before), the clusters their routes now
//! use added, and the ones only their old routes used dropped. Everything
//! else is the same `Arc`. Without VHDS (SotW) a port's virtual hosts are
//! in its one route configuration, which is decoded, patched and encoded
//! again (its other hosts untouched). `patch_routes` declines (the caller
//! translates the scope whole) whenever that is not the whole story: a gateway, a changed service with a TCP,
//! TLS or detected port (its listener reads the rules), a changed outlier
//! detection (clusters change), or a virtual host the memo no longer has.
//! `cache`'s tests check the result equals a full translation.
//!
//! An endpoint change is patched the same way (`patch_endpoints`): only the
//! changed services' assignments are built again.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use prost::Message;

use super::memo::{Memo, VirtualHostKey};
use super::{ClusterTarget, ProxyScope, ServiceView, names, routes};
use crate::model::protocol::Layout;
use crate::model::proxy::ProxyRole;
use crate::model::{MeshSnapshot, ServiceKey};
use crate::xds::resources::{ResourceSet, ResourceType};

/// A patched set, and the memo's virtual hosts it replaced (for the caller
/// to forget once every scope is done: other scopes may still look them up).
pub struct Patched {
    pub set: ResourceSet,
    pub replaced: Vec<VirtualHostKey>,
}

/// `set` (translated from `old` for `scope`) as a translation of `new` would
/// be, where only the rules of `changed` services differ; None to translate whole.
pub fn patch_routes(
    (old, new): (&MeshSnapshot, &MeshSnapshot),
    scope: &ProxyScope,
    set: &ResourceSet,
    changed: &BTreeSet<ServiceKey>,
    memo: &Memo<'_>,
) -> Option<Patched> {
    if scope.role == ProxyRole::Gateway {
        return None;
    }
    // SotW (or per-type delta): a port's virtual hosts live in its one route
    // configuration, decoded once, patched, and encoded again.
    let mut configurations: BTreeMap<String, RouteConfiguration> = BTreeMap::new();
    let (old_outliers, new_outliers) = (super::outlier_by_service(old), super::outlier_by_service(new));
    let mut next = set.clone();
    let mut old_targets: BTreeMap<String, ClusterTarget> = BTreeMap::new();
    let mut new_targets: BTreeMap<String, ClusterTarget> = BTreeMap::new();
    let mut replaced = Vec::new();
    for key in changed {
        let Some(service) = new.service(key) else { continue };
        if service.ports.iter().any(|p| !matches!(p.protocol.layout(), Layout::Http | Layout::None)) || old_outliers.get(key) != new_outliers.get(key)
        {
            return None;
        }
        let view = ServiceView { service, host: names::host(&scope.cluster, key), aliases: false };
        let (old_groups, new_groups) = (routes::rule_groups(old, scope, &view), routes::rule_groups(new, scope, &view));
        for p in service.ports.iter().filter(|p| p.protocol.has_http_routes()) {
            let configuration = names::route_config_name(p.port);
            let name = format!("{}:{}", view.host, p.port);
            // Not there: this scope does not see the service (its Sidecar), or another host took its domains.
            // Over VHDS it is a resource of its own; otherwise the index of the host in its configuration.
            let (domains, in_configuration) = if scope.vhds {
                let Some(sent) = set.get(ResourceType::VirtualHost, &format!("{configuration}/{name}")) else { continue };
                (VirtualHost::decode(sent.body().value.as_slice()).ok()?.domains, None)
            } else {
                if !configurations.contains_key(&configuration) {
                    let Some(sent) = set.get(ResourceType::Route, &configuration) else { continue };
                    configurations.insert(configuration.clone(), RouteConfiguration::decode(sent.body().value.as_slice()).ok()?);
                }
                let hosts = &configurations.get(&configuration)?.virtual_hosts;
                let Some(i) = hosts.iter().position(|vh| vh.name == name) else { continue };
                (hosts[i].domains.clone(), Some(i))
            };
            let before_key = routes::virtual_host_key(scope, &view, p.port, domains.clone(), &old_groups);
            let before = memo.built_virtual_host(&before_key)?;
            let after = routes::virtual_host(new, scope, &view, p.port, domains, &new_groups, memo);
            if old_groups != new_groups {
                replaced.push(before_key);
            }
            match in_configuration {
                None => next.insert_shared(ResourceType::VirtualHost, after.vhds_resource(&configuration)),
                Some(i) => configurations.get_mut(&configuration)?.virtual_hosts[i] = after.vhost.clone(),
            }
            old_targets.extend(before.targets.iter().map(|t| (t.name.clone(), t.clone())));
            new_targets.extend(after.targets.iter().map(|t| (t.name.clone(), t.clone())));
        }
    }
    for (name, rc) in configurations {
        next.insert(ResourceType::Route, crate::xds::resources::Resource::from_message(name, &rc));
    }
    // Clusters the old routes used and the new ones do not: gone, unless a
    // service this scope sees has it as its own or another rule routes there.
    let dropped: Vec<&String> = old_targets.keys().filter(|n| !new_targets.contains_key(*n)).collect();
    if !dropped.is_empty() {
        let views = super::reachable_services(new, scope);
        let mut kept: HashSet<String> = super::own_targets(scope, &views).map(|t| t.name).collect();
        kept.extend(other_rule_targets(new, scope, changed, set));
        for name in dropped.into_iter().filter(|n| !kept.contains(*n)) {
            next.remove(ResourceType::Cluster, name);
            next.remove(ResourceType::Endpoint, name);
        }
    }
    let seed = memo.endpoint_seed(&scope.cluster, super::client_network(new, scope));
    for (name, t) in new_targets {
        if next.get(ResourceType::Cluster, &name).is_none() {
            super::insert_target(&mut next, new, scope, t, &new_outliers, (memo, seed));
        }
    }
    Some(Patched { set: next, replaced })
}

/// Where the rules of services other than `changed` (that this scope sees,
/// and that reach it) may route: every shift and mirror destination, on
/// every port of the service (a superset of what their routes use).
fn other_rule_targets(snapshot: &MeshSnapshot, scope: &ProxyScope, changed: &BTreeSet<ServiceKey>, set: &ResourceSet) -> HashSet<String> {
    let mut out = HashSet::new();
    for policy in &snapshot.applied {
        for rule in policy.rules.iter().filter(|r| !changed.contains(&r.service) && r.source.matches(&scope.namespace, &scope.labels)) {
            let Some(service) = snapshot.service(&rule.service) else { continue };
            for p in &service.ports {
                let own = ClusterTarget::new(&scope.cluster, &rule.service, p.port, &BTreeMap::new()).name;
                if set.get(ResourceType::Cluster, &own).is_none() {
                    continue;
                }
                let shifts = rule.actions.traffic_shift.iter().flatten().map(|d| (&d.service, d.port, &d.subset));
                let empty = BTreeMap::new();
                let mirror = rule.actions.mirror.iter().map(|m| (&m.service, m.port, &empty));
                for (to, port, subset) in shifts.chain(mirror) {
                    if let Some(dport) = crate::model::policy::destination_port(snapshot, to, port, p.port) {
                        out.insert(ClusterTarget::new(&scope.cluster, to, dport, subset).name);
                    }
                }
            }
        }
    }
    out
}

/// Endpoint resources already built during one update, shared by every scope
/// that needs the same one: a `ClusterLoadAssignment` depends on the proxy only
/// through its cluster and network, so (cluster, network, name) names it.
pub type EndpointMemo = std::collections::HashMap<(String, String, String), std::sync::Arc<crate::xds::resources::Resource>>;

/// Replaces the EDS resources of `changed` services in `set`.
pub fn patch_endpoints(snapshot: &MeshSnapshot, scope: &ProxyScope, set: &ResourceSet, changed: &BTreeSet<ServiceKey>) -> ResourceSet {
    patch_endpoints_shared(snapshot, scope, set, changed, &mut EndpointMemo::new()).set
}

/// A patched set, and the names of the assignments the patch put in it
/// (`None`: the set was translated again whole).
pub struct PatchedEndpoints {
    pub set: ResourceSet,
    pub replaced: Option<Vec<String>>,
}

/// [`patch_endpoints`], reusing (and adding to) `memo`'s resources.
pub fn patch_endpoints_shared(
    snapshot: &MeshSnapshot,
    scope: &ProxyScope,
    set: &ResourceSet,
    changed: &BTreeSet<ServiceKey>,
    memo: &mut EndpointMemo,
) -> PatchedEndpoints {
    if scope.role == ProxyRole::Gateway {
        // Gateways are few and their clusters are SNI-named: translate them again.
        return PatchedEndpoints { set: super::translate(snapshot, scope), replaced: None };
    }
    // Only names whose host is a changed service's are parsed.
    let hosts = ChangedHosts::new(&scope.cluster, changed);
    let targets: Vec<ClusterTarget> = set
        .of_type(ResourceType::Endpoint)
        .keys()
        .filter(|name| hosts.name(name))
        .filter_map(|name| super::parse_cluster_name(snapshot, &scope.cluster, name))
        .filter(|t| changed.contains(&t.service))
        .collect();
    let mut next = set.clone();
    let network = super::client_network(snapshot, scope).to_string();
    for t in &targets {
        let key = (scope.cluster.clone(), network.clone(), t.name.clone());
        let resource = memo
            .entry(key)
            .or_insert_with(|| {
                std::sync::Arc::new(crate::xds::resources::Resource::from_message(
                    t.name.clone(),
                    &super::endpoints::load_assignment(snapshot, t, scope),
                ))
            })
            .clone();
        next.insert_shared(ResourceType::Endpoint, resource);
    }
    PatchedEndpoints { set: next, replaced: Some(targets.into_iter().map(|t| t.name).collect()) }
}

/// The hosts of some services as a client in one cluster names them, to
/// tell which of its cluster names (`outbound|<port>|<subset>|<host>`) are theirs.
pub struct ChangedHosts(HashSet<String>);

impl ChangedHosts {
    pub fn new(client_cluster: &str, services: &BTreeSet<ServiceKey>) -> ChangedHosts {
        ChangedHosts(services.iter().map(|k| names::host(client_cluster, k)).collect())
    }

    /// Whether the Envoy cluster (or assignment) `name` is one of these services'.
    pub fn name(&self, name: &str) -> bool {
        name.rsplit('|').next().is_some_and(|h| self.0.contains(h))
    }
}
