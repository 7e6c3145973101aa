//! mTLS the Istio way: workload certificates and the root arrive over SDS as
//! `default` and `ROOTCA`; outbound mesh clusters originate mTLS (with the
//! gateway SNI `outbound_.<port>_.<subset>_.<host>`) to endpoints marked
//! `tlsMode: istio`; inbound listeners require a client certificate.

use super::any;
use envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch;
use envoy_types::pb::envoy::config::core::v3::{DataSource, Metadata, TransportSocket, data_source, transport_socket};
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret, SubjectAltNameMatcher, TlsCertificate,
    UpstreamTlsContext, common_tls_context::CombinedCertificateValidationContext, common_tls_context::ValidationContextType, secret,
    subject_alt_name_matcher::SanType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::{BoolValue, Struct, Value, value::Kind};

use super::proto::ads_config_source;

/// Istio's SDS name of the workload certificate.
pub const WORKLOAD_SECRET: &str = "default";
/// Istio's SDS name of the root certificate.
pub const ROOT_SECRET: &str = "ROOTCA";
pub const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
/// The endpoint metadata namespace transport socket matches read.
pub const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

/// Where a sidecar's Envoy asks for its secrets `default` and `ROOTCA`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum SecretSource {
    /// From meshpilot over ADS (plain Envoy; sent only to a proven stream).
    #[default]
    Ads,
    /// From Istio's agent beside it (its bootstrap's `sds-grpc` cluster, the
    /// agent's SDS socket): the agent makes the key and has meshpilot sign it,
    /// so meshpilot never holds the workload's key.
    IstioAgent,
}

/// The cluster Istio's sidecar bootstrap names for its agent's SDS socket.
pub const ISTIO_AGENT_SDS_CLUSTER: &str = "sds-grpc";

fn sds(name: &str, source: SecretSource) -> SdsSecretConfig {
    let sds_config = match source {
        SecretSource::Ads => ads_config_source(),
        SecretSource::IstioAgent => super::proto::grpc_config_source(ISTIO_AGENT_SDS_CLUSTER),
    };
    SdsSecretConfig { name: name.to_string(), sds_config: Some(sds_config) }
}

/// An outbound cluster's mTLS: the SNI it sends, the trust domain its peers
/// must be in, and where its secrets come from.
#[derive(Debug, Clone, Copy)]
pub struct OutboundMtls<'a> {
    pub sni: &'a str,
    pub trust_domain: &'a str,
    /// The SPIFFE ids the destination's workloads have; the only ones its
    /// certificate may carry. Empty (no known workload yet): any identity of
    /// the trust domain.
    pub identities: &'a [String],
    pub secrets: SecretSource,
}

fn uri_san(pattern: MatchPattern) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: SanType::Uri as i32,
        matcher: Some(StringMatcher { match_pattern: Some(pattern), ..Default::default() }),
        ..Default::default()
    }
}

fn common(peer_sans: Vec<SubjectAltNameMatcher>, source: SecretSource) -> CommonTlsContext {
    let default_validation_context = CertificateValidationContext { match_typed_subject_alt_names: peer_sans, ..Default::default() };
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(WORKLOAD_SECRET, source)],
        validation_context_type: Some(ValidationContextType::CombinedValidationContext(CombinedCertificateValidationContext {
            default_validation_context: Some(default_validation_context),
            validation_context_sds_secret_config: Some(sds(ROOT_SECRET, source)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// What a destination's certificate must say: one of its workloads' exact
/// SPIFFE ids (a server with another service account's certificate is
/// refused), or, before any is known, the trust domain.
fn peer_sans(mtls: &OutboundMtls<'_>) -> Vec<SubjectAltNameMatcher> {
    if mtls.identities.is_empty() {
        return vec![uri_san(MatchPattern::Prefix(format!("spiffe://{}/", mtls.trust_domain)))];
    }
    mtls.identities.iter().map(|id| uri_san(MatchPattern::Exact(id.clone()))).collect()
}

/// The transport socket matches of an outbound mesh cluster: mTLS with `sni`
/// to endpoints marked `tlsMode: istio`, plain TCP to the rest.
pub fn outbound_socket_matches(mtls: OutboundMtls<'_>) -> Vec<TransportSocketMatch> {
    let tls =
        UpstreamTlsContext { common_tls_context: Some(common(peer_sans(&mtls), mtls.secrets)), sni: mtls.sni.to_string(), ..Default::default() };
    vec![
        TransportSocketMatch {
            name: "tlsMode-istio".into(),
            r#match: Some(string_struct(&[("tlsMode", "istio")])),
            transport_socket: Some(TransportSocket {
                name: TLS_SOCKET.into(),
                config_type: Some(transport_socket::ConfigType::TypedConfig(any(&tls))),
            }),
        },
        TransportSocketMatch {
            name: "tlsMode-disabled".into(),
            r#match: Some(Struct::default()),
            transport_socket: Some(TransportSocket {
                name: "envoy.transport_sockets.raw_buffer".into(),
                config_type: Some(transport_socket::ConfigType::TypedConfig(any(&RawBuffer::default()))),
            }),
        },
    ]
}

/// The inbound side: present the workload certificate, require and verify the peer's.
pub fn inbound_transport_socket(secrets: SecretSource) -> TransportSocket {
    let tls = DownstreamTlsContext {
        common_tls_context: Some(common(Vec::new(), secrets)),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    TransportSocket { name: TLS_SOCKET.into(), config_type: Some(transport_socket::ConfigType::TypedConfig(any(&tls))) }
}

pub fn string_struct(pairs: &[(&str, &str)]) -> Struct {
    Struct { fields: pairs.iter().map(|(k, v)| (k.to_string(), Value { kind: Some(Kind::StringValue(v.to_string())) })).collect() }
}

/// Endpoint metadata that selects the mTLS transport socket.
pub fn mtls_endpoint_metadata(network: &str) -> Metadata {
    let mut m = Metadata::default();
    m.filter_metadata.insert(TRANSPORT_SOCKET_MATCH.into(), string_struct(&[("tlsMode", "istio")]));
    if !network.is_empty() {
        m.filter_metadata.insert("istio".into(), string_struct(&[("network", network)]));
    }
    m
}

/// SDS `default`: the workload's certificate chain and key (PEM).
pub fn workload_secret(cert_chain_pem: &str, key_pem: &str) -> Secret {
    let inline = |s: &str| DataSource { specifier: Some(data_source::Specifier::InlineBytes(s.as_bytes().to_vec())), ..Default::default() };
    Secret {
        name: WORKLOAD_SECRET.into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(cert_chain_pem)),
            private_key: Some(inline(key_pem)),
            ..Default::default()
        })),
    }
}

/// SDS `ROOTCA`: the mesh's root certificate (PEM).
pub fn root_secret(root_pem: &str) -> Secret {
    Secret {
        name: ROOT_SECRET.into(),
        r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: Some(DataSource { specifier: Some(data_source::Specifier::InlineBytes(root_pem.as_bytes().to_vec())), ..Default::default() }),
            ..Default::default()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_tls_accepts_exactly_the_destinations_identities() {
        let ids =
            ["spiffe://cluster.local/ns/default/sa/bookinfo-reviews".to_string(), "spiffe://cluster.local/ns/default/sa/reviews-canary".to_string()];
        let mtls = OutboundMtls {
            sni: "outbound_.9080_._.reviews.default.svc.cluster.local",
            trust_domain: "cluster.local",
            identities: &ids,
            secrets: SecretSource::Ads,
        };
        let patterns = |mtls: &OutboundMtls<'_>| peer_sans(mtls).into_iter().map(|m| m.matcher.unwrap().match_pattern.unwrap()).collect::<Vec<_>>();
        assert_eq!(patterns(&mtls), ids.iter().map(|id| MatchPattern::Exact(id.clone())).collect::<Vec<_>>());
        // No known workload yet (nothing to dial): the trust domain, until the first one is a config change.
        let none = OutboundMtls { identities: &[], ..mtls };
        assert_eq!(patterns(&none), [MatchPattern::Prefix("spiffe://cluster.local/".into())]);
    }
}
