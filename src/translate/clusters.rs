//! CDS: one EDS cluster per service port and subset, fed over ADS; for a
//! captured sidecar also Istio's `PassthroughCluster` (the original
//! destination), `BlackHoleCluster` (nothing) and `InboundPassthroughCluster`.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    Cluster, OutlierDetection,
    cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy},
};
use envoy_types::pb::envoy::config::core::v3::{BindConfig, Http2ProtocolOptions, SocketAddress, socket_address::PortSpecifier};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options::ExplicitHttpConfig, http_protocol_options::UpstreamProtocolOptions,
    http_protocol_options::explicit_http_config::ProtocolConfig,
};
use envoy_types::pb::google::protobuf::UInt32Value;

use super::proto::{ads_config_source, pb_duration};
use crate::model::policy::Outlier;

/// Istio's cluster for traffic to an address outside the mesh (`ALLOW_ANY`): its original destination.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// Istio's cluster that has no endpoints (`REGISTRY_ONLY`): the connection is closed.
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";
/// Istio's cluster for inbound traffic to a port no Service declares: the application, from 127.0.0.6.
pub const INBOUND_PASSTHROUGH_CLUSTER: &str = "InboundPassthroughCluster";
/// The source address inbound clusters connect from: Istio's iptables rules
/// let it through unredirected (`-o lo -s 127.0.0.6/32 -j RETURN`), so the
/// sidecar's connection to its own application does not loop back into it.
pub const INBOUND_SOURCE_ADDRESS: &str = "127.0.0.6";

fn connect_timeout() -> Option<envoy_types::pb::google::protobuf::Duration> {
    Some(pb_duration(Duration::from_secs(10)))
}

/// An ORIGINAL_DST cluster: each connection goes where it was first sent
/// (the listener handed over by `use_original_dst`, or restored by the
/// original-destination listener filter), optionally from `source`.
pub fn original_dst_cluster(name: &str, source: Option<&str>) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::OriginalDst as i32)),
        lb_policy: LbPolicy::ClusterProvided as i32,
        connect_timeout: connect_timeout(),
        upstream_bind_config: source.map(|ip| BindConfig {
            source_address: Some(SocketAddress { address: ip.to_string(), port_specifier: Some(PortSpecifier::PortValue(0)), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `BlackHoleCluster`: static, no endpoints.
pub fn blackhole_cluster() -> Cluster {
    Cluster {
        name: BLACKHOLE_CLUSTER.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: connect_timeout(),
        ..Default::default()
    }
}

/// Keeps HTTP/2 to the upstream (Istio does for `http2` and `grpc` ports; without it a gRPC call becomes HTTP/1.1).
pub fn with_http2(mut cluster: Cluster) -> Cluster {
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())),
        })),
        ..Default::default()
    };
    cluster.typed_extension_protocol_options.insert("envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(), super::any(&options));
    cluster
}

/// An EDS cluster named `name` (no EDS service name: Envoy then asks EDS for
/// the cluster's own name, and each of a fleet's thousands of clusters per
/// proxy is ≈60 bytes smaller than with the name repeated); with
/// `mtls`, mTLS to endpoints marked `tlsMode: istio`; with
/// Istio's 10 s connect timeout, least-request balancing and, if a policy asks,
/// outlier detection (`consecutiveErrors` → consecutive 5xx).
pub fn eds_cluster(name: &str, outlier: Option<&Outlier>, mtls: Option<super::tls::OutboundMtls<'_>>) -> Cluster {
    Cluster {
        transport_socket_matches: mtls.map(super::tls::outbound_socket_matches).unwrap_or_default(),
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig { eds_config: Some(ads_config_source()), service_name: String::new() }),
        connect_timeout: connect_timeout(),
        lb_policy: LbPolicy::LeastRequest as i32,
        outlier_detection: outlier.map(|o| OutlierDetection {
            consecutive_5xx: Some(UInt32Value { value: o.consecutive_errors }),
            interval: Some(pb_duration(o.interval)),
            base_ejection_time: Some(pb_duration(o.base_ejection_time)),
            ..Default::default()
        }),
        ..Default::default()
    }
}
