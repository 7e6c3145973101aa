//! LDS: one outbound HTTP listener per port, bound on the proxy's loopback
//! address (explicit mode: the application sends to it; iptables capture and
//! the 15001 original-destination listener come later).

use super::any;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter::ConfigType};
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::Cors;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager::RouteSpecifier, http_filter,
};

use super::clusters::ads_config_source;
use super::endpoints::socket_address;
use super::names;
use super::routes::{CORS_FILTER, FAULT_FILTER};

pub const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
pub const ROUTER_FILTER: &str = "envoy.filters.http.router";

fn http_filter(name: &str, config: Any) -> HttpFilter {
    HttpFilter { name: name.to_string(), config_type: Some(http_filter::ConfigType::TypedConfig(config)), ..Default::default() }
}

/// `<bind>_<port>`: an HTTP connection manager whose routes come over RDS as `"<port>"`;
/// fault and CORS filters are present (inert unless a route configures them).
pub fn outbound_http_listener(bind: &str, port: u16) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: format!("outbound_{bind}_{port}"),
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
    Listener {
        name: names::listener_name(bind, port),
        address: Some(socket_address(bind, port)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter { name: HCM_FILTER.into(), config_type: Some(ConfigType::TypedConfig(any(&hcm))) }],
            ..Default::default()
        }],
        ..Default::default()
    }
}
