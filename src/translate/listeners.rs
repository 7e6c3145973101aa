//! LDS building blocks (the HTTP connection manager over RDS, `tcp_proxy`)
//! and the explicit layout (`INTERCEPTION_MODE: NONE`): one outbound HTTP
//! listener per port, bound on the proxy's loopback address, which the
//! application calls. The captured layout is in `outbound.rs`.

use super::any;
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter::ConfigType};
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::Cors;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager::RouteSpecifier, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::google::protobuf::Any;

use super::names;
use super::proto::ads_config_source;
use super::proto::socket_address;
use super::routes::{CORS_FILTER, FAULT_FILTER};

pub const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
pub const ROUTER_FILTER: &str = "envoy.filters.http.router";

fn http_filter(name: &str, config: Any) -> HttpFilter {
    HttpFilter { name: name.to_string(), config_type: Some(http_filter::ConfigType::TypedConfig(config)), ..Default::default() }
}

pub const TCP_PROXY_FILTER: &str = "envoy.filters.network.tcp_proxy";

/// An HTTP connection manager whose routes come over RDS as `"<port>"`;
/// fault and CORS filters are present (inert unless a route configures them).
pub fn http_connection_manager(stat_prefix: String, port: u16) -> Filter {
    let hcm = HttpConnectionManager {
        stat_prefix,
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads_config_source()),
            route_config_name: names::route_config_name(port),
        })),
        http_filters: vec![
            http_filter(FAULT_FILTER, any(&HttpFault::default())),
            http_filter(CORS_FILTER, any(&Cors::default())),
            http_filter(ROUTER_FILTER, any(&Router::default())),
        ],
        ..Default::default()
    };
    Filter { name: HCM_FILTER.into(), config_type: Some(ConfigType::TypedConfig(any(&hcm))) }
}

/// A `tcp_proxy` to one cluster or weighted clusters (stats under `stat_prefix`).
pub fn tcp_proxy(stat_prefix: String, to: tcp_proxy::ClusterSpecifier) -> Filter {
    let proxy = TcpProxy { stat_prefix, cluster_specifier: Some(to), ..Default::default() };
    Filter { name: TCP_PROXY_FILTER.into(), config_type: Some(ConfigType::TypedConfig(any(&proxy))) }
}

/// `<bind>_<port>` (explicit layout): the port's HTTP routes on the proxy's loopback address.
pub fn outbound_http_listener(bind: &str, port: u16) -> Listener {
    Listener {
        name: names::listener_name(bind, port),
        address: Some(socket_address(bind, port)),
        filter_chains: vec![FilterChain { filters: vec![http_connection_manager(format!("outbound_{bind}_{port}"), port)], ..Default::default() }],
        ..Default::default()
    }
}
