//! Envoy v3 bootstrap for a proxy managed by meshpilot (pure: options in, JSON out).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Value, json};

use crate::xds::node::{InterceptionMode, ProxyRole};

/// Name of the static cluster that reaches meshpilot.
pub const XDS_CLUSTER: &str = "meshpilot-xds";

#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    pub node_id: String,
    /// The Kubernetes cluster the proxy runs in.
    pub cluster: String,
    pub namespace: String,
    pub role: ProxyRole,
    pub labels: BTreeMap<String, String>,
    pub network: Option<String>,
    pub xds_host: String,
    pub xds_port: u16,
    pub admin_port: u16,
    /// Incremental (delta) xDS instead of state of the world.
    pub delta: bool,
    /// Where outbound listeners bind (`OUTBOUND_BIND` metadata).
    pub outbound_bind: Option<String>,
    /// `INTERCEPTION_MODE` (unset: meshpilot's default, `NONE` with an outbound bind, else `REDIRECT`).
    pub interception: Option<InterceptionMode>,
    /// The workload's identity (`SERVICE_ACCOUNT`), addresses (`INSTANCE_IPS`)
    /// and where the application listens (`APP_ADDRESS`).
    pub service_account: Option<String>,
    pub instance_ips: Vec<String>,
    pub app_address: Option<String>,
    /// Reach meshpilot over this Unix socket instead of xds_host:xds_port
    /// (crosses network namespaces).
    pub xds_pipe: Option<String>,
    /// Serve Envoy's admin page on this Unix socket instead of 127.0.0.1:admin_port.
    pub admin_pipe: Option<String>,
    /// Reach meshpilot's TLS listener, verifying its certificate.
    pub xds_tls: Option<XdsTls>,
    /// The workload's ServiceAccount token (audience `istio-ca`), sent on the
    /// xDS stream as `authorization: Bearer …` with the `clusterid` header:
    /// how a proxy without Istio's agent proves its identity.
    pub token: Option<String>,
}

/// TLS to meshpilot's xDS listener.
#[derive(Debug, Clone)]
pub struct XdsTls {
    /// The mesh root that signed meshpilot's certificate (the
    /// `istio-ca-root-cert` ConfigMap's `root-cert.pem`), as a file path.
    pub root_cert_path: String,
    /// The name meshpilot's certificate must carry (and the SNI sent).
    pub server_name: String,
}

/// The bootstrap Envoy starts from: ADS to meshpilot, with the node metadata
/// meshpilot reads (Istio's keys: CLUSTER_ID, NAMESPACE, LABELS, NETWORK).
pub fn bootstrap(opts: &BootstrapOptions) -> Value {
    let mut metadata = json!({
        "CLUSTER_ID": opts.cluster,
        "NAMESPACE": opts.namespace,
        "LABELS": opts.labels,
        "ROLE": match opts.role { ProxyRole::Sidecar => "sidecar", ProxyRole::Gateway => "gateway" },
    });
    if let Some(network) = &opts.network {
        metadata["NETWORK"] = json!(network);
    }
    if let Some(bind) = &opts.outbound_bind {
        metadata["OUTBOUND_BIND"] = json!(bind);
    }
    if let Some(mode) = opts.interception {
        metadata["INTERCEPTION_MODE"] = json!(match mode {
            InterceptionMode::Redirect => "REDIRECT",
            InterceptionMode::Tproxy => "TPROXY",
            InterceptionMode::None => "NONE",
        });
    }
    if let Some(sa) = &opts.service_account {
        metadata["SERVICE_ACCOUNT"] = json!(sa);
    }
    if !opts.instance_ips.is_empty() {
        metadata["INSTANCE_IPS"] = json!(opts.instance_ips.join(","));
    }
    if let Some(app) = &opts.app_address {
        metadata["APP_ADDRESS"] = json!(app);
    }
    let xds_address = match &opts.xds_pipe {
        Some(path) => json!({"pipe": {"path": path}}),
        None => json!({"socket_address": {"address": opts.xds_host, "port_value": opts.xds_port}}),
    };
    let admin_address = match &opts.admin_pipe {
        Some(path) => json!({"pipe": {"path": path}}),
        None => json!({"socket_address": {"address": "127.0.0.1", "port_value": opts.admin_port}}),
    };
    let discovery_type = if opts.xds_pipe.is_some() || opts.xds_host.parse::<IpAddr>().is_ok() { "STATIC" } else { "STRICT_DNS" };
    let config_source = json!({"ads": {}, "resource_api_version": "V3"});
    let mut xds_service = json!({"envoy_grpc": {"cluster_name": XDS_CLUSTER}});
    if let Some(token) = &opts.token {
        xds_service["initial_metadata"] = json!([
            {"key": "authorization", "value": format!("Bearer {}", token.trim())},
            {"key": "clusterid", "value": opts.cluster},
        ]);
    }
    let mut bootstrap = json!({
        "node": {
            "id": opts.node_id,
            "cluster": opts.cluster,
            "metadata": metadata,
        },
        "admin": {
            "address": admin_address,
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": if opts.delta { "DELTA_GRPC" } else { "GRPC" },
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [xds_service],
            },
            "cds_config": config_source,
            "lds_config": config_source,
        },
        "static_resources": {
            "clusters": [{
                "name": XDS_CLUSTER,
                "type": discovery_type,
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": XDS_CLUSTER,
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": xds_address}}]}],
                },
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {
                            "connection_keepalive": {"interval": "30s", "timeout": "10s"},
                        }},
                    },
                },
            }],
        },
    });
    if let Some(tls) = &opts.xds_tls {
        bootstrap["static_resources"]["clusters"][0]["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": tls.server_name,
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "validation_context": {
                        "trusted_ca": {"filename": tls.root_cert_path},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": tls.server_name}}],
                    },
                },
            },
        });
    }
    bootstrap
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::codec;

    fn opts() -> BootstrapOptions {
        BootstrapOptions {
            node_id: "productpage-v1-1.default".into(),
            cluster: "management-plane".into(),
            namespace: "default".into(),
            role: ProxyRole::Sidecar,
            labels: [("app".to_string(), "productpage".to_string())].into(),
            network: Some("net1".into()),
            xds_host: "127.0.0.1".into(),
            xds_port: 15010,
            admin_port: 15000,
            delta: false,
            outbound_bind: Some("127.0.0.2".into()),
            interception: None,
            service_account: Some("bookinfo-productpage".into()),
            instance_ips: vec!["10.10.0.10".into()],
            app_address: None,
            xds_pipe: None,
            admin_pipe: None,
            xds_tls: None,
            token: None,
        }
    }

    #[test]
    fn is_a_valid_bootstrap_message() {
        for (host, delta) in [("127.0.0.1", false), ("meshpilot.service-mesh-hub.svc", true)] {
            let mut o = opts();
            o.xds_host = host.into();
            o.delta = delta;
            let json = bootstrap(&o);
            codec::json_to_bytes("envoy.config.bootstrap.v3.Bootstrap", &json).expect("parses as a Bootstrap");
        }
        let mut o = opts();
        o.xds_pipe = Some("/tmp/meshpilot-xds.sock".into());
        o.admin_pipe = Some("/tmp/envoy-admin.sock".into());
        let json = bootstrap(&o);
        codec::json_to_bytes("envoy.config.bootstrap.v3.Bootstrap", &json).expect("parses as a Bootstrap");
        assert_eq!(json["admin"]["address"]["pipe"]["path"], "/tmp/envoy-admin.sock");
    }

    #[test]
    fn carries_node_metadata_meshpilot_reads() {
        let json = bootstrap(&opts());
        let meta = &json["node"]["metadata"];
        assert_eq!(meta["CLUSTER_ID"], "management-plane");
        assert_eq!(meta["NETWORK"], "net1");
        assert_eq!(meta["OUTBOUND_BIND"], "127.0.0.2");
        assert_eq!(meta["SERVICE_ACCOUNT"], "bookinfo-productpage");
        assert_eq!(meta["INSTANCE_IPS"], "10.10.0.10");
        assert_eq!(meta["LABELS"]["app"], "productpage");
        assert_eq!(json["dynamic_resources"]["ads_config"]["api_type"], "GRPC");
        assert_eq!(json["static_resources"]["clusters"][0]["type"], "STATIC");
        assert!(json["static_resources"]["clusters"][0].get("transport_socket").is_none(), "plaintext unless asked");
    }

    #[test]
    fn a_proxy_with_a_token_proves_itself_over_verified_tls() {
        let mut o = opts();
        o.xds_tls = Some(XdsTls { root_cert_path: "/var/run/secrets/istio/root-cert.pem".into(), server_name: "istiod.istio-system.svc".into() });
        o.token = Some("eyJhbGciOi.payload.sig\n".into());
        let json = bootstrap(&o);
        codec::json_to_bytes("envoy.config.bootstrap.v3.Bootstrap", &json).expect("parses as a Bootstrap");
        let grpc = &json["dynamic_resources"]["ads_config"]["grpc_services"][0];
        assert_eq!(grpc["initial_metadata"][0]["value"], "Bearer eyJhbGciOi.payload.sig");
        assert_eq!(grpc["initial_metadata"][1], serde_json::json!({"key": "clusterid", "value": "management-plane"}));
        let tls = &json["static_resources"]["clusters"][0]["transport_socket"]["typed_config"];
        assert_eq!(tls["sni"], "istiod.istio-system.svc");
        assert_eq!(tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"], "/var/run/secrets/istio/root-cert.pem");
        assert_eq!(
            tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"][0]["matcher"]["exact"],
            "istiod.istio-system.svc"
        );
    }
}
