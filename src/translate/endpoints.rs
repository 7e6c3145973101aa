//! EDS: the ready endpoints of a service port, narrowed to a subset by pod
//! labels, grouped by locality.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{Address, Locality, SocketAddress, address, socket_address::PortSpecifier};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier};

use super::ClusterTarget;
use crate::model::{Locality as MeshLocality, MeshSnapshot};

pub fn socket_address(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// The ClusterLoadAssignment of one target. A service that no longer exists,
/// or a subset that matches nothing, gives an empty assignment (Envoy answers 503).
pub fn load_assignment(snapshot: &MeshSnapshot, target: &ClusterTarget) -> ClusterLoadAssignment {
    let mut by_locality: BTreeMap<&MeshLocality, Vec<LbEndpoint>> = BTreeMap::new();
    if let Some(port_name) = snapshot.service(&target.service).and_then(|s| s.port(target.port)).map(|p| p.name.as_str()) {
        for ep in snapshot.endpoints(&target.service).iter().filter(|e| e.ready && e.has_labels(&target.subset)) {
            let Some(port) = ep.ports.get(port_name) else { continue };
            by_locality.entry(&ep.locality).or_default().push(LbEndpoint {
                host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                    address: Some(socket_address(&ep.address, *port)),
                    ..Default::default()
                })),
                ..Default::default()
            });
        }
    }
    ClusterLoadAssignment {
        cluster_name: target.name.clone(),
        endpoints: by_locality
            .into_iter()
            .map(|(loc, lb_endpoints)| LocalityLbEndpoints {
                locality: (loc.region.len() + loc.zone.len() > 0)
                    .then(|| Locality { region: loc.region.clone(), zone: loc.zone.clone(), ..Default::default() }),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}
