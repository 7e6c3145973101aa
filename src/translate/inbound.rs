//! A sidecar's inbound side (mTLS mode): for every port its workload serves
//! (the endpoints at the proxy's `INSTANCE_IPS`), a listener on that address
//! and port that terminates mTLS, requires a client certificate from the
//! mesh's root, tells the application who called (`x-forwarded-client-cert`
//! with the caller's SPIFFE URI) and forwards to the application at
//! `APP_ADDRESS` (explicit mode: the application listens there).

use super::any;
use std::collections::BTreeSet;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster::ClusterDiscoveryType, cluster::DiscoveryType};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter::ConfigType};
use envoy_types::pb::envoy::config::route::v3::{Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager::{ForwardClientCertDetails, RouteSpecifier, SetCurrentClientCertDetails}, http_filter,
};
use envoy_types::pb::google::protobuf::BoolValue;

use super::endpoints::socket_address;
use super::listeners::{HCM_FILTER, ROUTER_FILTER};
use super::routes::pb_duration;
use super::{ProxyScope, tls};
use crate::model::MeshSnapshot;

/// Istio's inbound cluster name.
pub fn inbound_cluster_name(port: u16) -> String {
    format!("inbound|{port}||")
}

/// The (address, port) pairs the proxy's workload serves in its cluster.
pub fn served_ports(snapshot: &MeshSnapshot, scope: &ProxyScope) -> BTreeSet<(String, u16)> {
    let mut out = BTreeSet::new();
    let Some(state) = snapshot.clusters.get(&scope.cluster) else { return out };
    for ep in state.endpoints.values().flatten() {
        if scope.instance_ips.iter().any(|ip| *ip == ep.address) {
            out.extend(ep.ports.values().map(|p| (ep.address.clone(), *p)));
        }
    }
    out
}

pub fn inbound_listener(address: &str, port: u16) -> Listener {
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
        stat_prefix: format!("inbound_{address}_{port}"),
        route_specifier: Some(RouteSpecifier::RouteConfig(route_config)),
        http_filters: vec![HttpFilter {
            name: ROUTER_FILTER.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any(&Router::default()))),
            ..Default::default()
        }],
        forward_client_cert_details: ForwardClientCertDetails::SanitizeSet as i32,
        set_current_client_cert_details: Some(SetCurrentClientCertDetails { uri: true, ..Default::default() }),
        ..Default::default()
    };
    Listener {
        name: format!("{address}_{port}"),
        address: Some(socket_address(address, port)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter { name: HCM_FILTER.into(), config_type: Some(ConfigType::TypedConfig(any(&hcm))) }],
            transport_socket: Some(tls::inbound_transport_socket()),
            ..Default::default()
        }],
        ..Default::default()
    }
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
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint { address: Some(socket_address(app_address, port)), ..Default::default() })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}
