//! An east-west gateway (`ROLE: gateway`): one listener on the gateway port
//! (15443) with the TLS inspector and, per exported service port and subset
//! of its own cluster, a filter chain matched on the SNI
//! `outbound_.<port>_.<subset>_.<host>` that passes the TLS stream through
//! (`tcp_proxy`, no termination) to a cluster of the same name holding that
//! subset's local endpoints. It holds no certificate and sees no plaintext.

use super::any;
use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter::ConfigType, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy::ClusterSpecifier};

use super::endpoints::gateway_load_assignment;
use super::proto::socket_address;
use super::{ClusterTarget, ProxyScope, clusters, names};
use crate::model::{DEFAULT_GATEWAY_PORT, MeshSnapshot, ServiceKey};
use crate::xds::resources::{Resource, ResourceSet, ResourceType};

/// What the gateway of `cluster` exports: every service port with no subset,
/// and every (service port, subset) a policy shifts traffic to.
pub fn exported(snapshot: &MeshSnapshot, cluster: &str) -> BTreeMap<String, ClusterTarget> {
    let mut out = BTreeMap::new();
    let Some(state) = snapshot.clusters.get(cluster) else { return out };
    let mut subsets: BTreeMap<ServiceKey, BTreeSet<BTreeMap<String, String>>> = BTreeMap::new();
    for d in snapshot.applied.iter().flat_map(|p| p.rules.iter()).filter_map(|r| r.actions.traffic_shift.as_ref()).flatten() {
        if d.service.cluster == cluster {
            subsets.entry(d.service.clone()).or_default().insert(d.subset.clone());
        }
    }
    for svc in state.services.values().filter(|s| !super::is_network_gateway(s)) {
        let host = names::host(cluster, &svc.key);
        let mut wanted: BTreeSet<BTreeMap<String, String>> = [BTreeMap::new()].into();
        wanted.extend(subsets.get(&svc.key).cloned().unwrap_or_default());
        for p in &svc.ports {
            for subset in &wanted {
                let sni = names::outbound_sni(p.port, &names::subset_name(subset), &host);
                out.insert(sni.clone(), ClusterTarget { name: sni, service: svc.key.clone(), port: p.port, subset: subset.clone() });
            }
        }
    }
    out
}

/// The gateway port: its own Service's `networking.istio.io/gatewayPort`, else 15443.
pub fn gateway_port(snapshot: &MeshSnapshot, cluster: &str) -> u16 {
    snapshot.gateways.values().flatten().find(|g| g.service.cluster == cluster).map(|g| g.port).unwrap_or(DEFAULT_GATEWAY_PORT)
}

pub fn translate_gateway(snapshot: &MeshSnapshot, scope: &ProxyScope) -> ResourceSet {
    let mut set = ResourceSet::new();
    let targets = exported(snapshot, &scope.cluster);
    let port = gateway_port(snapshot, &scope.cluster);
    let bind = scope.instance_ips.first().map(String::as_str).unwrap_or("0.0.0.0");
    let mut chains = Vec::new();
    for (sni, target) in &targets {
        let cluster = clusters::eds_cluster(sni, None, None);
        set.insert(ResourceType::Cluster, Resource::from_message(sni.clone(), &cluster));
        set.insert(ResourceType::Endpoint, Resource::from_message(sni.clone(), &gateway_load_assignment(snapshot, sni, target)));
        let tcp = TcpProxy { stat_prefix: sni.clone(), cluster_specifier: Some(ClusterSpecifier::Cluster(sni.clone())), ..Default::default() };
        chains.push(FilterChain {
            name: sni.clone(),
            filter_chain_match: Some(FilterChainMatch { server_names: vec![sni.clone()], ..Default::default() }),
            filters: vec![Filter { name: "envoy.filters.network.tcp_proxy".into(), config_type: Some(ConfigType::TypedConfig(any(&tcp))) }],
            ..Default::default()
        });
    }
    if chains.is_empty() {
        return set;
    }
    let listener = Listener {
        name: format!("{bind}_{port}"),
        address: Some(socket_address(bind, port)),
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(any(&TlsInspector::default()))),
            ..Default::default()
        }],
        filter_chains: chains,
        ..Default::default()
    };
    set.insert(ResourceType::Listener, Resource::from_message(listener.name.clone(), &listener));
    set
}
