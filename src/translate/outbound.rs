//! A captured sidecar's outbound side, in Istio's layout and names. iptables
//! sends every outbound TCP connection of the pod to 15001; there
//! `virtualOutbound` (`use_original_dst`) hands it to the listener of its
//! original destination, which never binds a socket of its own
//! (`bind_to_port: false`):
//! - `0.0.0.0_<port>`: a port's HTTP services, routed by Host over RDS `"<port>"`;
//! - `<ClusterIP>_<port>`: a TCP service (`tcp_proxy`, weighted when a policy
//!   shifts it), a TLS service (chosen by SNI, passed through untouched) or an
//!   undeclared one (Envoy's HTTP inspector: HTTP routes, else `tcp_proxy`);
//!   a headless service gets one per pod address;
//! - nothing matched: `virtualOutbound`'s own chain, to `PassthroughCluster`
//!   (`ALLOW_ANY`) or `BlackHoleCluster` (`REGISTRY_ONLY`).

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::listener::v3::{FilterChain, FilterChainMatch, Listener, ListenerFilter, listener_filter};
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier;
use envoy_types::pb::google::protobuf::BoolValue;

use super::clusters::{BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER};
use super::listeners::{http_connection_manager, tcp_proxy};
use super::proto::socket_address;
use super::routes::{Unmatched, tcp_destination};
use super::{ClusterTarget, ProxyScope, ServiceView, any, names};
use crate::model::MeshSnapshot;
use crate::model::protocol::Layout;

/// Istio's outbound capture listener and its port (`ProxyListenPort`).
pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
pub const VIRTUAL_OUTBOUND_PORT: u16 = 15001;
pub const ANY_ADDRESS: &str = "0.0.0.0";

pub const HTTP_INSPECTOR: &str = "envoy.filters.listener.http_inspector";
pub const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
/// What Envoy's HTTP inspector reports for HTTP/1.x and cleartext HTTP/2.
const HTTP_APPLICATION_PROTOCOLS: [&str; 3] = ["http/1.0", "http/1.1", "h2c"];

pub(crate) fn listener_filter(name: &str, config: envoy_types::pb::google::protobuf::Any) -> ListenerFilter {
    ListenerFilter { name: name.into(), config_type: Some(listener_filter::ConfigType::TypedConfig(config)), ..Default::default() }
}

fn unmatched_cluster(unmatched: Unmatched) -> &'static str {
    match unmatched {
        Unmatched::AllowAny => PASSTHROUGH_CLUSTER,
        Unmatched::RegistryOnly => BLACKHOLE_CLUSTER,
    }
}

/// The chain for connections no service claims.
fn unmatched_chain(unmatched: Unmatched) -> FilterChain {
    let cluster = unmatched_cluster(unmatched);
    FilterChain {
        name: format!("{cluster}FilterChain"),
        filters: vec![tcp_proxy(cluster.into(), ClusterSpecifier::Cluster(cluster.into()))],
        ..Default::default()
    }
}

/// `virtualOutbound` on 0.0.0.0:15001: hands each connection to its original
/// destination's listener; what none takes goes by `unmatched`.
pub fn virtual_outbound(unmatched: Unmatched) -> Listener {
    Listener {
        name: VIRTUAL_OUTBOUND.into(),
        address: Some(socket_address(ANY_ADDRESS, VIRTUAL_OUTBOUND_PORT)),
        use_original_dst: Some(BoolValue { value: true }),
        filter_chains: vec![unmatched_chain(unmatched)],
        traffic_direction: envoy_types::pb::envoy::config::core::v3::TrafficDirection::Outbound as i32,
        ..Default::default()
    }
}

/// A listener that only receives connections `virtualOutbound` hands over.
fn handed_over(address: &str, port: u16, filter_chains: Vec<FilterChain>, listener_filters: Vec<ListenerFilter>) -> Listener {
    Listener {
        name: names::listener_name(address, port),
        address: Some(socket_address(address, port)),
        bind_to_port: Some(BoolValue { value: false }),
        filter_chains,
        listener_filters,
        traffic_direction: envoy_types::pb::envoy::config::core::v3::TrafficDirection::Outbound as i32,
        ..Default::default()
    }
}

/// `0.0.0.0_<port>`: every HTTP service on the port, by Host (RDS `"<port>"`).
pub fn http_port_listener(port: u16) -> Listener {
    let chain = FilterChain { filters: vec![http_connection_manager(format!("outbound_0.0.0.0_{port}"), port)], ..Default::default() };
    handed_over(ANY_ADDRESS, port, vec![chain], Vec::new())
}

/// `<ip>_<port>` for a TCP service: `tcp_proxy` to `to`.
pub fn tcp_listener(ip: &str, port: u16, stat_prefix: &str, to: ClusterSpecifier) -> Listener {
    let chain = FilterChain { filters: vec![tcp_proxy(stat_prefix.into(), to)], ..Default::default() };
    handed_over(ip, port, vec![chain], Vec::new())
}

/// `<ip>_<port>` for a TLS service: the application's TLS passes through
/// untouched to `to` when its SNI names the service; other SNIs go by `unmatched`.
pub fn tls_listener(ip: &str, port: u16, server_names: Vec<String>, stat_prefix: &str, to: ClusterSpecifier, unmatched: Unmatched) -> Listener {
    let by_sni = FilterChain {
        filter_chain_match: Some(FilterChainMatch { server_names, ..Default::default() }),
        filters: vec![tcp_proxy(stat_prefix.into(), to)],
        ..Default::default()
    };
    handed_over(ip, port, vec![by_sni, unmatched_chain(unmatched)], vec![listener_filter(TLS_INSPECTOR, any(&TlsInspector::default()))])
}

/// `<ip>_<port>` for an undeclared port: HTTP (as the HTTP inspector sees it)
/// is routed over RDS `"<port>"`, anything else goes to `to` over `tcp_proxy`.
pub fn detected_listener(ip: &str, port: u16, stat_prefix: &str, to: ClusterSpecifier) -> Listener {
    let http = FilterChain {
        filter_chain_match: Some(FilterChainMatch {
            application_protocols: HTTP_APPLICATION_PROTOCOLS.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        filters: vec![http_connection_manager(format!("outbound_{ip}_{port}"), port)],
        ..Default::default()
    };
    let tcp = FilterChain { filters: vec![tcp_proxy(stat_prefix.into(), to)], ..Default::default() };
    handed_over(ip, port, vec![http, tcp], vec![listener_filter(HTTP_INSPECTOR, any(&HttpInspector::default()))])
}

/// The addresses a client dials for a service port in its own cluster: the
/// ClusterIP, or a headless service's ready pod addresses (with their ports).
fn dialed_addresses(snapshot: &MeshSnapshot, view: &ServiceView<'_>, port: u16) -> Vec<(String, u16)> {
    let svc = view.service;
    if !svc.headless {
        return svc.cluster_ip.iter().map(|ip| (ip.clone(), port)).collect();
    }
    let Some(name) = svc.port(port).map(|p| p.name.as_str()) else { return Vec::new() };
    snapshot.endpoints(&svc.key).iter().filter(|e| e.ready).filter_map(|e| Some((e.address.clone(), *e.ports.get(name)?))).collect()
}

/// Every outbound listener of a captured sidecar, and the clusters their `tcp_proxy`s use.
pub fn captured_listeners(
    snapshot: &MeshSnapshot,
    scope: &ProxyScope,
    views: &[ServiceView<'_>],
    unmatched: Unmatched,
    targets: &mut BTreeMap<String, ClusterTarget>,
) -> Vec<Listener> {
    let mut out = vec![virtual_outbound(unmatched)];
    let http_ports: BTreeSet<u16> =
        views.iter().flat_map(|v| v.service.ports.iter().filter(|p| p.protocol.has_http_routes()).map(|p| p.port)).collect();
    out.extend(http_ports.into_iter().map(http_port_listener));
    // Per destination: only this cluster's services have addresses a client here dials.
    let mut by_address: BTreeMap<(String, u16), Listener> = BTreeMap::new();
    for v in views.iter().filter(|v| v.service.key.cluster == scope.cluster) {
        for p in &v.service.ports {
            let layout = p.protocol.layout();
            if matches!(layout, Layout::Http | Layout::None) {
                continue;
            }
            let stat = names::outbound_cluster(p.port, "", &v.host);
            // One destination per service port, however many pod addresses a headless service has.
            let mut destination = None;
            for (ip, port) in dialed_addresses(snapshot, v, p.port) {
                let key = (ip.clone(), port);
                if by_address.contains_key(&key) {
                    continue;
                }
                let to = destination.get_or_insert_with(|| tcp_destination(snapshot, scope, v, p.port, targets)).clone();
                let listener = match layout {
                    Layout::Tcp => tcp_listener(&ip, port, &stat, to),
                    Layout::Tls => {
                        let server_names = names::domains(&v.service.key, &v.host, v.aliases, &scope.namespace, None);
                        tls_listener(&ip, port, server_names, &stat, to, unmatched)
                    }
                    _ => detected_listener(&ip, port, &stat, to),
                };
                by_address.insert(key, listener);
            }
        }
    }
    out.extend(by_address.into_values());
    out
}
