//! EDS: the ready endpoints of a service port, narrowed to a subset by pod
//! labels, grouped by locality. Endpoints on the client's own network are
//! direct; those on another network become that network's east-west gateway
//! addresses, weighted by how many endpoints each stands for (Istio's
//! multi-network EDS), and reached with mTLS.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::Locality;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier};
use envoy_types::pb::google::protobuf::UInt32Value;

use super::proto::socket_address;
use super::{ClusterTarget, ProxyScope, tls};
use crate::model::{Endpoint as MeshEndpoint, Locality as MeshLocality, MeshSnapshot};

fn lb_endpoint(ip: &str, port: u16, weight: u32, metadata: Option<envoy_types::pb::envoy::config::core::v3::Metadata>) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(Endpoint { address: Some(socket_address(ip, port)), ..Default::default() })),
        // Envoy's default weight is 1: only other weights (a gateway standing
        // for several endpoints) are sent — 4 bytes less per endpoint.
        load_balancing_weight: (weight != 1).then_some(UInt32Value { value: weight }),
        metadata,
        ..Default::default()
    }
}

/// The ready endpoints of `target` (subset applied) with the port each serves it on.
pub fn target_endpoints<'a>(snapshot: &'a MeshSnapshot, target: &ClusterTarget) -> Vec<(&'a MeshEndpoint, u16)> {
    let Some(port_name) = snapshot.service(&target.service).and_then(|s| s.port(target.port)).map(|p| p.name.as_str()) else {
        return Vec::new();
    };
    snapshot
        .endpoints(&target.service)
        .iter()
        .filter(|e| e.ready && e.has_labels(&target.subset))
        .filter_map(|e| Some((e, *e.ports.get(port_name)?)))
        .collect()
}

fn assignment(name: &str, by_locality: BTreeMap<MeshLocality, Vec<LbEndpoint>>) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: by_locality
            .into_iter()
            .map(|(loc, lb_endpoints)| LocalityLbEndpoints {
                locality: (loc.region.len() + loc.zone.len() > 0).then(|| Locality {
                    region: loc.region.clone(),
                    zone: loc.zone.clone(),
                    ..Default::default()
                }),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The ClusterLoadAssignment of one target as `scope`'s proxy sees it. A
/// service that no longer exists, or a subset that matches nothing, gives an
/// empty assignment (Envoy answers 503). Another network's endpoints need
/// mTLS (the gateway routes on the TLS SNI) and a gateway address; without
/// either they are left out.
pub fn load_assignment(snapshot: &MeshSnapshot, target: &ClusterTarget, scope: &ProxyScope) -> ClusterLoadAssignment {
    let client_network = super::client_network(snapshot, scope);
    let mtls = super::mtls_between(snapshot, &scope.cluster, &target.service.cluster).is_some();
    let mut by_locality: BTreeMap<MeshLocality, Vec<LbEndpoint>> = BTreeMap::new();
    let mut other_networks: BTreeMap<&str, u32> = BTreeMap::new();
    for (ep, port) in target_endpoints(snapshot, target) {
        if !client_network.is_empty() && !ep.network.is_empty() && ep.network != client_network {
            *other_networks.entry(ep.network.as_str()).or_default() += 1;
            continue;
        }
        let metadata = (mtls && ep.mesh_tls).then(|| tls::mtls_endpoint_metadata(&ep.network));
        by_locality.entry(ep.locality.clone()).or_default().push(lb_endpoint(&ep.address, port, 1, metadata));
    }
    if mtls {
        for (network, count) in other_networks {
            for gw in snapshot.gateways.get(network).into_iter().flatten() {
                by_locality.entry(MeshLocality::default()).or_default().push(lb_endpoint(
                    &gw.address,
                    gw.port,
                    count,
                    Some(tls::mtls_endpoint_metadata(network)),
                ));
            }
        }
    }
    assignment(&target.name, by_locality)
}

/// A gateway's cluster for one SNI: the subset's local endpoints, direct
/// (the TLS stream passes through to the workload's sidecar untouched).
pub fn gateway_load_assignment(snapshot: &MeshSnapshot, name: &str, target: &ClusterTarget) -> ClusterLoadAssignment {
    let mut by_locality: BTreeMap<MeshLocality, Vec<LbEndpoint>> = BTreeMap::new();
    for (ep, port) in target_endpoints(snapshot, target) {
        by_locality.entry(ep.locality.clone()).or_default().push(lb_endpoint(&ep.address, port, 1, None));
    }
    assignment(name, by_locality)
}
