//! What meshpilot reads from an Envoy `Node`: identity and scope.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use serde::Serialize;

pub use crate::model::proxy::{InterceptionMode, ProxyRole};

/// A connected proxy's identity and the scope its configuration depends on.
///
/// Metadata keys follow Istio's injected sidecars (`CLUSTER_ID`, `NAMESPACE`,
/// `LABELS`, `NETWORK`), so an Istio sidecar can be pointed at meshpilot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ProxyNode {
    pub id: String,
    /// The Kubernetes cluster the proxy runs in (`CLUSTER_ID`, else `node.cluster`).
    pub cluster: String,
    pub namespace: String,
    pub network: String,
    pub role: ProxyRole,
    /// Shared with the stream's scope (`cache::scope_of`): a map of two
    /// labels is a 540-byte tree node, and every stream had two.
    pub labels: Arc<BTreeMap<String, String>>,
    /// Where outbound listeners bind (`OUTBOUND_BIND` metadata; loopback by default).
    pub outbound_bind: Option<String>,
    /// `INTERCEPTION_MODE`; without it, `NONE` when `OUTBOUND_BIND` is set, else `REDIRECT` (Istio's default).
    pub interception: InterceptionMode,
    /// The workload's service account (`SERVICE_ACCOUNT`; "default").
    pub service_account: String,
    /// The workload's addresses (`INSTANCE_IPS`, comma-separated): inbound listeners bind here.
    pub instance_ips: Vec<String>,
    /// Where the application itself listens, for inbound traffic (`APP_ADDRESS`; 127.0.0.1).
    pub app_address: Option<String>,
    /// Envoy's build version as it reports it (`user_agent_build_version`), for display.
    pub envoy_version: String,
    /// Set by the server, not the node: the stream is delta ADS, so its route
    /// configurations can take their virtual hosts over VHDS.
    pub delta_ads: bool,
    /// `ISTIO_VERSION`: the proxy runs Istio's agent, which serves its SDS.
    pub istio_version: Option<String>,
    /// Set by the server, not the node: what the stream proved (see `auth`).
    pub identity: StreamIdentity,
}

/// An identity a stream proved.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ProvenIdentity {
    /// The registered cluster that vouched for it.
    pub cluster: String,
    pub namespace: String,
    pub service_account: String,
    /// How: `token` (a TokenReview).
    pub proof: &'static str,
}

/// Who a stream is, as far as secrets go.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamIdentity {
    /// No proof (plaintext, or no token): routing configuration only.
    #[default]
    Unproven,
    /// Proven, and the node metadata agrees.
    Proven(ProvenIdentity),
    /// Taken from the node metadata because `serve` was told to
    /// (`--insecure-self-asserted-identities`, local demos only).
    SelfAsserted,
}

impl StreamIdentity {
    /// Whether this stream may be sent its workload's certificate and key.
    pub fn may_receive_secrets(&self) -> bool {
        !matches!(self, StreamIdentity::Unproven)
    }

    /// For `proxy-status`.
    pub fn describe(&self) -> String {
        match self {
            StreamIdentity::Unproven => "unproven".into(),
            StreamIdentity::Proven(p) => format!("{}/{} ({} in {})", p.namespace, p.service_account, p.proof, p.cluster),
            StreamIdentity::SelfAsserted => "self-asserted".into(),
        }
    }
}

/// The cluster name Istio uses when a pod names none (istiod's `--clusterID`
/// default); `serve --cluster-alias Kubernetes=<cluster>` maps it.
pub const ISTIO_DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// Why a node was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NodeError {
    #[error("the first request on a stream must carry a node")]
    Missing,
    #[error("node.id is empty")]
    EmptyId,
    #[error("node {id:?}: metadata field {field} must be {expected}")]
    BadMetadata { id: String, field: &'static str, expected: &'static str },
}

fn string_field(meta: &Struct, key: &str) -> Option<String> {
    match meta.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn has_non_string(meta: &Struct, key: &str) -> bool {
    matches!(meta.fields.get(key), Some(Value { kind: Some(k) }) if !matches!(k, Kind::StringValue(_)))
}

impl ProxyNode {
    pub fn from_node(node: Option<&Node>) -> Result<Self, NodeError> {
        let node = node.ok_or(NodeError::Missing)?;
        if node.id.trim().is_empty() {
            return Err(NodeError::EmptyId);
        }
        let empty = Struct::default();
        let meta = node.metadata.as_ref().unwrap_or(&empty);
        let bad = |field, expected| NodeError::BadMetadata { id: node.id.clone(), field, expected };
        for key in
            ["CLUSTER_ID", "NAMESPACE", "NETWORK", "ROLE", "OUTBOUND_BIND", "SERVICE_ACCOUNT", "INSTANCE_IPS", "APP_ADDRESS", "INTERCEPTION_MODE"]
        {
            if has_non_string(meta, key) {
                return Err(bad(
                    match key {
                        "CLUSTER_ID" => "CLUSTER_ID",
                        "NAMESPACE" => "NAMESPACE",
                        "NETWORK" => "NETWORK",
                        "OUTBOUND_BIND" => "OUTBOUND_BIND",
                        "SERVICE_ACCOUNT" => "SERVICE_ACCOUNT",
                        "INSTANCE_IPS" => "INSTANCE_IPS",
                        "APP_ADDRESS" => "APP_ADDRESS",
                        "INTERCEPTION_MODE" => "INTERCEPTION_MODE",
                        _ => "ROLE",
                    },
                    "a string",
                ));
            }
        }
        let mut labels = BTreeMap::new();
        match meta.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
            None => {}
            Some(Kind::StructValue(s)) => {
                for (k, v) in &s.fields {
                    match &v.kind {
                        Some(Kind::StringValue(sv)) => {
                            labels.insert(k.clone(), sv.clone());
                        }
                        _ => return Err(bad("LABELS", "a map of strings")),
                    }
                }
            }
            Some(_) => return Err(bad("LABELS", "a map of strings")),
        }
        // Istio's node ids look like `router~ip~pod.ns~ns.svc.cluster.local` for gateways.
        let role = match string_field(meta, "ROLE").as_deref() {
            Some("gateway") | Some("router") => ProxyRole::Gateway,
            Some("sidecar") => ProxyRole::Sidecar,
            Some(_) => return Err(bad("ROLE", "\"sidecar\" or \"gateway\"")),
            None if node.id.starts_with("router~") => ProxyRole::Gateway,
            None => ProxyRole::Sidecar,
        };
        let namespace = string_field(meta, "NAMESPACE")
            .or_else(|| {
                // Istio's `type~ip~pod.ns~domain` form carries the namespace too.
                let mut parts = node.id.split('~');
                let pod_ns = parts.nth(2)?;
                pod_ns.split_once('.').map(|(_, ns)| ns.to_string())
            })
            .unwrap_or_else(|| "default".to_string());
        let envoy_version = match &node.user_agent_version_type {
            Some(envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentBuildVersion(b)) => {
                b.version.as_ref().map(|v| format!("{}.{}.{}", v.major_number, v.minor_number, v.patch)).unwrap_or_default()
            }
            Some(envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(v)) => v.clone(),
            None => String::new(),
        };
        let outbound_bind = string_field(meta, "OUTBOUND_BIND").filter(|s| !s.is_empty());
        let interception = match string_field(meta, "INTERCEPTION_MODE").as_deref() {
            Some("REDIRECT") => InterceptionMode::Redirect,
            Some("TPROXY") => InterceptionMode::Tproxy,
            Some("NONE") => InterceptionMode::None,
            Some(_) => return Err(bad("INTERCEPTION_MODE", "\"REDIRECT\", \"TPROXY\" or \"NONE\"")),
            None if outbound_bind.is_some() => InterceptionMode::None,
            None => InterceptionMode::Redirect,
        };
        let istio_version = string_field(meta, "ISTIO_VERSION").filter(|s| !s.is_empty());
        // Istio's agent leaves CLUSTER_ID out unless the pod sets one, and its
        // `node.cluster` is the workload's service name: istiod then takes
        // its own default, `Kubernetes`.
        let cluster = match string_field(meta, "CLUSTER_ID").filter(|c| !c.is_empty()) {
            Some(c) => c,
            None if istio_version.is_some() => ISTIO_DEFAULT_CLUSTER_ID.to_string(),
            None => node.cluster.clone(),
        };
        Ok(ProxyNode {
            id: node.id.clone(),
            cluster,
            namespace,
            network: string_field(meta, "NETWORK").unwrap_or_default(),
            role,
            labels: Arc::new(labels),
            outbound_bind,
            interception,
            service_account: string_field(meta, "SERVICE_ACCOUNT").filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into()),
            instance_ips: string_field(meta, "INSTANCE_IPS")
                .map(|s| s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
                .unwrap_or_default(),
            app_address: string_field(meta, "APP_ADDRESS").filter(|s| !s.is_empty()),
            envoy_version,
            delta_ads: false,
            istio_version,
            identity: StreamIdentity::Unproven,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value { kind: Some(Kind::StringValue(v.into())) }
    }

    #[test]
    fn reads_istio_metadata() {
        let mut labels = Struct::default();
        labels.fields.insert("app".into(), s("productpage"));
        let mut meta = Struct::default();
        meta.fields.insert("CLUSTER_ID".into(), s("management-plane"));
        meta.fields.insert("NAMESPACE".into(), s("default"));
        meta.fields.insert("NETWORK".into(), s("net1"));
        meta.fields.insert("LABELS".into(), Value { kind: Some(Kind::StructValue(labels)) });
        let node = Node { id: "productpage-1".into(), metadata: Some(meta), ..Default::default() };
        let p = ProxyNode::from_node(Some(&node)).unwrap();
        assert_eq!(p.cluster, "management-plane");
        assert_eq!(p.network, "net1");
        assert_eq!(p.labels["app"], "productpage");
        assert_eq!(p.role, ProxyRole::Sidecar);
    }

    #[test]
    fn interception_is_istios_redirect_unless_the_proxy_binds_explicitly_or_says_otherwise() {
        let node = |pairs: &[(&str, &str)]| {
            let mut meta = Struct::default();
            for (k, v) in pairs {
                meta.fields.insert(k.to_string(), s(v));
            }
            ProxyNode::from_node(Some(&Node { id: "p".into(), metadata: Some(meta), ..Default::default() }))
        };
        assert_eq!(node(&[]).unwrap().interception, InterceptionMode::Redirect);
        assert_eq!(node(&[("OUTBOUND_BIND", "127.0.0.2")]).unwrap().interception, InterceptionMode::None);
        assert_eq!(node(&[("INTERCEPTION_MODE", "TPROXY")]).unwrap().interception, InterceptionMode::Tproxy);
        assert_eq!(node(&[("INTERCEPTION_MODE", "NONE")]).unwrap().interception, InterceptionMode::None);
        let err = node(&[("INTERCEPTION_MODE", "iptables")]).unwrap_err().to_string();
        assert!(err.contains("INTERCEPTION_MODE"), "{err}");
    }

    #[test]
    fn an_istio_agent_without_a_cluster_id_is_in_istios_default_cluster() {
        let mut meta = Struct::default();
        meta.fields.insert("ISTIO_VERSION".into(), s("1.31-dev"));
        let node = Node {
            id: "sidecar~10.20.0.23~reviews-v3.default~default.svc.cluster.local".into(),
            cluster: "reviews.default".into(),
            metadata: Some(meta.clone()),
            ..Default::default()
        };
        let p = ProxyNode::from_node(Some(&node)).unwrap();
        assert_eq!((p.cluster.as_str(), p.istio_version.as_deref()), ("Kubernetes", Some("1.31-dev")));
        meta.fields.insert("CLUSTER_ID".into(), s("remote-cluster"));
        let p = ProxyNode::from_node(Some(&Node { metadata: Some(meta), ..node.clone() })).unwrap();
        assert_eq!(p.cluster, "remote-cluster");
        // Not Istio's agent: node.cluster, as Envoy's bootstrap gives it.
        assert_eq!(ProxyNode::from_node(Some(&Node { metadata: None, ..node })).unwrap().cluster, "reviews.default");
    }

    #[test]
    fn istio_style_ids_give_role_and_namespace() {
        let node = Node { id: "router~10.0.0.1~gw-1.istio-system~istio-system.svc.cluster.local".into(), ..Default::default() };
        let p = ProxyNode::from_node(Some(&node)).unwrap();
        assert_eq!(p.role, ProxyRole::Gateway);
        assert_eq!(p.namespace, "istio-system");
    }

    #[test]
    fn malformed_nodes_are_refused_with_the_field() {
        assert_eq!(ProxyNode::from_node(None), Err(NodeError::Missing));
        let empty = Node::default();
        assert_eq!(ProxyNode::from_node(Some(&empty)), Err(NodeError::EmptyId));
        let mut meta = Struct::default();
        meta.fields.insert("LABELS".into(), s("app=x"));
        let node = Node { id: "a".into(), metadata: Some(meta), ..Default::default() };
        let err = ProxyNode::from_node(Some(&node)).unwrap_err().to_string();
        assert!(err.contains("LABELS") && err.contains("\"a\""), "{err}");
    }
}
