//! A sidecar's inbound side, for every port its workload serves (the
//! endpoints at the proxy's `INSTANCE_IPS`).
//!
//! Captured (Istio's layout): iptables sends every inbound connection to
//! 15006, where `virtualInbound` (original-destination listener filter) has
//! one filter chain per served port — mTLS required when the workload's
//! VirtualMesh has a CA, plaintext otherwise — leading to `inbound|<port>||`,
//! which connects to the application at the original destination from
//! 127.0.0.6 (so Istio's iptables rules let it through). Ports no Service
//! declares pass through to the application the same way.
//!
//! Explicit (mTLS only): a listener on each (address, port) that forwards to
//! the application at `APP_ADDRESS`.
//!
//! HTTP ports terminate HTTP and tell the application who called
//! (`x-forwarded-client-cert` with the caller's SPIFFE URI); other ports are
//! `tcp_proxy`.

use super::any;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster::ClusterDiscoveryType, cluster::DiscoveryType};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, FilterChainMatch, Listener, filter::ConfigType};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter,
    http_connection_manager::{ForwardClientCertDetails, RouteSpecifier, SetCurrentClientCertDetails},
    http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier as TcpTo;
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};

use super::clusters::{BLACKHOLE_CLUSTER, INBOUND_PASSTHROUGH_CLUSTER, INBOUND_SOURCE_ADDRESS, original_dst_cluster, with_http2};
use super::listeners::{HCM_FILTER, ROUTER_FILTER, tcp_proxy};
use super::outbound::{ANY_ADDRESS, listener_filter};
use super::proto::pb_duration;
use super::proto::socket_address;
use super::{ProxyScope, rbac, tls};
use crate::model::MeshSnapshot;
use crate::model::access::{AccessGrant, InboundAccess};
use crate::model::protocol::{Layout, Protocol};

/// Istio's inbound capture listener and its port (`ProxyInboundListenPort`).
pub const VIRTUAL_INBOUND: &str = "virtualInbound";
pub const VIRTUAL_INBOUND_PORT: u16 = 15006;
pub const ORIGINAL_DST_FILTER: &str = "envoy.filters.listener.original_dst";

/// Istio's inbound cluster name.
pub fn inbound_cluster_name(port: u16) -> String {
    format!("inbound|{port}||")
}

/// The (address, port) pairs the proxy's workload serves in its cluster.
pub fn served_ports(snapshot: &MeshSnapshot, scope: &ProxyScope) -> BTreeSet<(String, u16)> {
    let mut out = BTreeSet::new();
    let Some(state) = snapshot.clusters.get(&scope.cluster) else { return out };
    for ep in state.endpoints.values().flat_map(|eps| eps.iter()) {
        if scope.instance_ips.contains(&ep.address) {
            out.extend(ep.ports.values().map(|p| (ep.address.clone(), *p)));
        }
    }
    out
}

/// The ports the proxy's workload serves and the protocol of the Service port
/// each serves: the endpoint ports at its `INSTANCE_IPS`, or, for a scope
/// whose addresses were resolved already (`ProxyScope::served`), those.
pub fn served_protocols(snapshot: &MeshSnapshot, scope: &ProxyScope) -> BTreeMap<u16, Protocol> {
    if scope.instance_ips.is_empty() {
        return scope.served.clone();
    }
    let mut out = BTreeMap::new();
    let Some(by_address) = snapshot.workload_ports(&scope.cluster) else { return out };
    for ports in scope.instance_ips.iter().filter_map(|ip| by_address.get(ip)) {
        for (port, protocol) in ports {
            out.entry(*port).or_insert(*protocol);
        }
    }
    out
}

/// What the proxy's workload allows when its cluster enforces access
/// control: from its `INSTANCE_IPS`, or, for a scope whose addresses were
/// resolved already ([`ProxyScope::access`]), that.
pub fn served_access(snapshot: &MeshSnapshot, scope: &ProxyScope) -> Option<Arc<InboundAccess>> {
    if scope.instance_ips.is_empty() {
        return scope.access.clone();
    }
    crate::model::access::inbound_access(snapshot, &scope.cluster, &scope.instance_ips)
}

/// The grants of `port` when access control is enforced (`access`): none is an empty list.
pub fn port_grants(access: Option<&InboundAccess>, port: u16) -> Option<&[Arc<AccessGrant>]> {
    access.map(|a| a.ports.get(&port).map(Vec::as_slice).unwrap_or_default())
}

/// A TCP chain's filters: with access control, the network RBAC filter first,
/// and a port nobody may use goes to the BlackHole (closed even to a server
/// that speaks first, which the RBAC filter, deciding on the caller's first
/// bytes, would let greet).
fn inbound_tcp_filters(cluster: &str, grants: Option<&[Arc<AccessGrant>]>) -> Vec<Filter> {
    match grants {
        None => vec![tcp_proxy(cluster.to_string(), TcpTo::Cluster(cluster.to_string()))],
        Some(grants) => {
            let open = grants.iter().any(|g| rbac::applies(g, false));
            let to = if open { cluster } else { BLACKHOLE_CLUSTER };
            vec![rbac::network_filter(grants), tcp_proxy(to.to_string(), TcpTo::Cluster(to.to_string()))]
        }
    }
}

/// `virtualInbound` on 0.0.0.0:15006: a chain per served port (mTLS when
/// `mtls`), and what no Service declares on to the application as it came.
/// With access control (`access`), each chain allows only what its port's
/// grants allow, and the passthrough chain nothing.
pub fn virtual_inbound(
    ports: &BTreeMap<u16, Protocol>,
    mtls: Option<tls::SecretSource>,
    transparent: bool,
    access: Option<&InboundAccess>,
) -> Listener {
    let mut filter_chains: Vec<FilterChain> = ports
        .iter()
        .filter(|(_, p)| p.layout() != Layout::None)
        .map(|(port, protocol)| {
            let grants = port_grants(access, *port);
            let filters = if protocol.layout() == Layout::Http {
                vec![inbound_http_filter(&format!("inbound_0.0.0.0_{port}"), *port, grants)]
            } else {
                inbound_tcp_filters(&inbound_cluster_name(*port), grants)
            };
            FilterChain {
                name: format!("{ANY_ADDRESS}_{port}"),
                filter_chain_match: Some(FilterChainMatch { destination_port: Some(UInt32Value { value: u32::from(*port) }), ..Default::default() }),
                filters,
                transport_socket: mtls.map(tls::inbound_transport_socket),
                ..Default::default()
            }
        })
        .collect();
    filter_chains.push(FilterChain {
        name: "InboundPassthroughFilterChain".into(),
        filters: inbound_tcp_filters(INBOUND_PASSTHROUGH_CLUSTER, access.map(|_| &[][..])),
        ..Default::default()
    });
    Listener {
        name: VIRTUAL_INBOUND.into(),
        address: Some(socket_address(ANY_ADDRESS, VIRTUAL_INBOUND_PORT)),
        listener_filters: vec![listener_filter(ORIGINAL_DST_FILTER, any(&OriginalDst::default()))],
        filter_chains,
        transparent: transparent.then_some(BoolValue { value: true }),
        traffic_direction: envoy_types::pb::envoy::config::core::v3::TrafficDirection::Inbound as i32,
        ..Default::default()
    }
}

/// `inbound|<port>||` of a captured sidecar: the application at the
/// connection's original destination, connected from 127.0.0.6; HTTP/2 kept
/// for `http2`/`grpc` ports.
pub fn captured_inbound_cluster(port: u16, protocol: Protocol) -> Cluster {
    let c = original_dst_cluster(&inbound_cluster_name(port), Some(INBOUND_SOURCE_ADDRESS));
    if protocol.http2_upstream() { with_http2(c) } else { c }
}

/// `InboundPassthroughCluster`: a port no Service declares, as it came, from 127.0.0.6.
pub fn inbound_passthrough_cluster() -> Cluster {
    original_dst_cluster(INBOUND_PASSTHROUGH_CLUSTER, Some(INBOUND_SOURCE_ADDRESS))
}

pub fn inbound_listener(address: &str, port: u16, secrets: tls::SecretSource, grants: Option<&[Arc<AccessGrant>]>) -> Listener {
    Listener {
        name: format!("{address}_{port}"),
        address: Some(socket_address(address, port)),
        filter_chains: vec![FilterChain {
            filters: vec![inbound_http_filter(&format!("inbound_{address}_{port}"), port, grants)],
            transport_socket: Some(tls::inbound_transport_socket(secrets)),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The inbound HTTP connection manager: every request to `inbound|<port>||`,
/// the caller's certificate URI in `x-forwarded-client-cert`; with access
/// control (`grants`), the RBAC filter first, on normalized paths (so
/// `//reviews` or `/./reviews` cannot pass by a prefix rule).
fn inbound_http_filter(stat_prefix: &str, port: u16, grants: Option<&[Arc<AccessGrant>]>) -> Filter {
    let route_config = RouteConfiguration {
        name: format!("inbound|{port}"),
        virtual_hosts: vec![VirtualHost {
            name: format!("inbound|http|{port}"),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch { path_specifier: Some(PathSpecifier::Prefix("/".into())), ..Default::default() }),
                action: Some(Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::Cluster(inbound_cluster_name(port))),
                    timeout: Some(pb_duration(Duration::ZERO)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        route_specifier: Some(RouteSpecifier::RouteConfig(route_config)),
        http_filters: grants
            .map(rbac::http_filter)
            .into_iter()
            .chain([HttpFilter {
                name: ROUTER_FILTER.into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(any(&Router::default()))),
                ..Default::default()
            }])
            .collect(),
        normalize_path: grants.is_some().then_some(BoolValue { value: true }),
        merge_slashes: grants.is_some(),
        forward_client_cert_details: ForwardClientCertDetails::SanitizeSet as i32,
        set_current_client_cert_details: Some(SetCurrentClientCertDetails { uri: true, ..Default::default() }),
        ..Default::default()
    };
    Filter { name: HCM_FILTER.into(), config_type: Some(ConfigType::TypedConfig(any(&hcm))) }
}

/// `inbound|<port>||`: the application itself.
pub fn inbound_cluster(app_address: &str, port: u16) -> Cluster {
    let name = inbound_cluster_name(port);
    Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(pb_duration(Duration::from_secs(10))),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name,
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket_address(app_address, port)),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}
