//! Envoy's RBAC filters from what a workload's port allows
//! ([`crate::model::access::InboundAccess`]): an ALLOW list of the policies
//! that grant the port, each with its callers (the verified peer
//! certificate's URI SAN) and, on HTTP, its paths and methods. No grant: the
//! list is empty, and Envoy denies every request (HTTP 403 "RBAC: access
//! denied") or connection.
//!
//! As Istio: the HTTP filter runs first in the inbound connection manager,
//! the network one before `tcp_proxy` (stat prefix `tcp.`), and a policy is
//! named `ns[<namespace>]-policy[<name>]-rule[0]`.

use std::sync::Arc;

use envoy_types::pb::envoy::config::listener::v3::{Filter, filter::ConfigType};
use envoy_types::pb::envoy::config::rbac::v3::{Permission, Policy, Principal, Rbac, permission, principal, rbac::Action};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher::HeaderMatchSpecifier};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpFilter, http_filter};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{PathMatcher, StringMatcher, path_matcher, string_matcher::MatchPattern};

use super::any;
use crate::model::access::{AccessGrant, PathMatch, PrincipalMatch};

pub const HTTP_RBAC_FILTER: &str = "envoy.filters.http.rbac";
pub const NETWORK_RBAC_FILTER: &str = "envoy.filters.network.rbac";
/// Istio's stat prefix of the network RBAC filter (`tcp.rbac.denied`).
pub const NETWORK_RBAC_STAT_PREFIX: &str = "tcp.";

fn string_matcher(pattern: MatchPattern) -> StringMatcher {
    StringMatcher { match_pattern: Some(pattern), ..Default::default() }
}

fn or_permissions(rules: Vec<Permission>) -> Permission {
    Permission { rule: Some(permission::Rule::OrRules(permission::Set { rules })) }
}

fn principal(m: &PrincipalMatch) -> Principal {
    let name = match m {
        PrincipalMatch::Exact(id) => MatchPattern::Exact(id.clone()),
        PrincipalMatch::Prefix(prefix) => MatchPattern::Prefix(prefix.clone()),
    };
    Principal { identifier: Some(principal::Identifier::Authenticated(principal::Authenticated { principal_name: Some(string_matcher(name)) })) }
}

fn path(m: &PathMatch) -> Permission {
    let pattern = match m {
        PathMatch::Any => return Permission { rule: Some(permission::Rule::Any(true)) },
        PathMatch::Exact(p) => MatchPattern::Exact(p.clone()),
        PathMatch::Prefix(p) => MatchPattern::Prefix(p.clone()),
        PathMatch::Suffix(p) => MatchPattern::Suffix(p.clone()),
    };
    Permission { rule: Some(permission::Rule::UrlPath(PathMatcher { rule: Some(path_matcher::Rule::Path(string_matcher(pattern))) })) }
}

fn method(m: &str) -> Permission {
    Permission {
        rule: Some(permission::Rule::Header(HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(string_matcher(MatchPattern::Exact(m.to_string())))),
            ..Default::default()
        })),
    }
}

/// Istio's policy name for a grant.
fn policy_name(grant: &AccessGrant) -> String {
    let (namespace, name) = grant.policy.split_once('/').unwrap_or(("", &grant.policy));
    format!("ns[{namespace}]-policy[{name}]-rule[0]")
}

/// Whether `grant` allows anything on an HTTP (`http`) or a TCP port: on a
/// TCP port a grant that names paths or methods allows nothing (they cannot
/// be checked there).
pub fn applies(grant: &AccessGrant, http: bool) -> bool {
    http || !grant.http_only()
}

/// The ALLOW rules of `grants` (those that [`applies`]).
pub fn rules(grants: &[Arc<AccessGrant>], http: bool) -> Rbac {
    let mut policies = std::collections::HashMap::new();
    for grant in grants.iter().filter(|g| applies(g, http)) {
        let mut permissions = Vec::new();
        if http && !grant.paths.is_empty() {
            permissions.push(or_permissions(grant.paths.iter().map(path).collect()));
        }
        if http && !grant.methods.is_empty() {
            permissions.push(or_permissions(grant.methods.iter().map(|m| method(m)).collect()));
        }
        let permission = match permissions.len() {
            0 => Permission { rule: Some(permission::Rule::Any(true)) },
            _ => Permission { rule: Some(permission::Rule::AndRules(permission::Set { rules: permissions })) },
        };
        // Any mesh identity when the policy names no source.
        let principals = if grant.principals.is_empty() {
            vec![principal(&PrincipalMatch::Prefix("spiffe://".into()))]
        } else {
            grant.principals.iter().map(principal).collect()
        };
        policies.insert(policy_name(grant), Policy { permissions: vec![permission], principals, ..Default::default() });
    }
    Rbac { action: Action::Allow as i32, policies, ..Default::default() }
}

/// The HTTP RBAC filter, first in an inbound connection manager.
pub fn http_filter(grants: &[Arc<AccessGrant>]) -> HttpFilter {
    let config = HttpRbac { rules: Some(rules(grants, true)), ..Default::default() };
    HttpFilter { name: HTTP_RBAC_FILTER.into(), config_type: Some(http_filter::ConfigType::TypedConfig(any(&config))), ..Default::default() }
}

/// The network RBAC filter, before `tcp_proxy`.
pub fn network_filter(grants: &[Arc<AccessGrant>]) -> Filter {
    let config = NetworkRbac { rules: Some(rules(grants, false)), stat_prefix: NETWORK_RBAC_STAT_PREFIX.into(), ..Default::default() };
    Filter { name: NETWORK_RBAC_FILTER.into(), config_type: Some(ConfigType::TypedConfig(any(&config))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(principals: Vec<PrincipalMatch>, paths: Vec<PathMatch>, methods: &[&str]) -> Arc<AccessGrant> {
        Arc::new(AccessGrant {
            policy: "service-mesh-hub/reviews".into(),
            principals,
            paths,
            methods: methods.iter().map(|m| m.to_string()).collect(),
        })
    }

    #[test]
    fn a_grant_is_an_allow_policy_of_its_callers_paths_and_methods() {
        let id = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
        let g = grant(vec![PrincipalMatch::Exact(id.into())], vec![PathMatch::Prefix("/reviews".into())], &["GET"]);
        let r = rules(std::slice::from_ref(&g), true);
        assert_eq!(r.action, Action::Allow as i32);
        let p = &r.policies["ns[service-mesh-hub]-policy[reviews]-rule[0]"];
        let Some(principal::Identifier::Authenticated(a)) = &p.principals[0].identifier else { panic!("{p:?}") };
        assert_eq!(a.principal_name.as_ref().unwrap().match_pattern, Some(MatchPattern::Exact(id.into())));
        let Some(permission::Rule::AndRules(set)) = &p.permissions[0].rule else { panic!("{p:?}") };
        assert_eq!(set.rules.len(), 2, "paths and methods, both required");
        // On a TCP port a grant that names paths or methods allows nothing; one that does not allows its callers.
        assert!(rules(&[g], false).policies.is_empty());
        let tcp = rules(&[grant(vec![PrincipalMatch::Prefix("spiffe://cluster.local/ns/default/sa/".into())], vec![], &[])], false);
        assert_eq!(tcp.policies.values().next().unwrap().permissions[0].rule, Some(permission::Rule::Any(true)));
    }

    #[test]
    fn no_grant_is_an_empty_allow_list_which_denies_everyone() {
        let r = rules(&[], true);
        assert_eq!((r.action, r.policies.len()), (Action::Allow as i32, 0));
    }
}
