//! The small protobuf pieces every builder uses: typed `Any`s, durations,
//! socket addresses and the ADS config source. (Kept apart so the per-type
//! builders import this floor, not each other.)

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, SocketAddress, address, config_source::ConfigSourceSpecifier,
    socket_address::PortSpecifier,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};

/// A message as a protobuf `Any` (typed configs inside resources).
pub fn any<M: prost::Message + prost::Name>(m: &M) -> Any {
    Any { type_url: M::type_url(), value: m.encode_to_vec() }
}

pub fn pb_duration(d: Duration) -> PbDuration {
    PbDuration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

pub fn socket_address(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// `{ads: {}}`, V3, no initial fetch timeout (Istio's EDS config source).
/// A gRPC config source on the bootstrap cluster `cluster` (as Istio's
/// sidecars get SDS from their agent), the node sent on the first message only.
pub fn grpc_config_source(cluster: &str) -> ConfigSource {
    use envoy_types::pb::envoy::config::core::v3::{ApiConfigSource, GrpcService, api_config_source::ApiType, grpc_service};
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::ApiConfigSource(ApiConfigSource {
            api_type: ApiType::Grpc as i32,
            transport_api_version: ApiVersion::V3 as i32,
            grpc_services: vec![GrpcService {
                target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(grpc_service::EnvoyGrpc {
                    cluster_name: cluster.to_string(),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            set_node_on_first_message_only: true,
            ..Default::default()
        })),
        resource_api_version: ApiVersion::V3 as i32,
        initial_fetch_timeout: Some(pb_duration(Duration::ZERO)),
        ..Default::default()
    }
}

pub fn ads_config_source() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        initial_fetch_timeout: Some(pb_duration(Duration::ZERO)),
        ..Default::default()
    }
}
