//! Who is on the other end of a stream. A proxy's node metadata says who it
//! is; only proof counts: a ServiceAccount token (or, later, a client
//! certificate) checked by a [`StreamAuthenticator`], over TLS. The server
//! compares the proof with the metadata and ends a stream whose metadata
//! claims someone else; a stream without proof gets routing configuration
//! but never a certificate or key.
//!
//! This is the seam, like `provider`: the server knows it, `ca` implements it.

use std::future::Future;
use std::pin::Pin;

use tonic::Status;

use super::node::ProxyNode;
pub use super::node::{ProvenIdentity, StreamIdentity};

/// What a stream's transport and request headers show about its caller.
#[derive(Debug, Clone, Default)]
pub struct StreamCredentials {
    /// The stream arrived over TLS (the `--xds-tls-addr` listener).
    pub tls: bool,
    /// `authorization: Bearer <token>`.
    pub bearer: Option<String>,
    /// The `clusterid` header (Istio's agent sends its `ISTIO_META_CLUSTER_ID`).
    pub cluster: Option<String>,
}

impl StreamCredentials {
    /// Reads the bearer token and the `clusterid` header.
    pub fn from_headers(tls: bool, headers: &tonic::codegen::http::HeaderMap) -> StreamCredentials {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty()).map(String::from);
        let bearer = text("authorization")
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).map(|t| t.trim().to_string()))
            .filter(|t| !t.is_empty());
        StreamCredentials { tls, bearer, cluster: text("clusterid") }
    }

    /// The registered cluster the token is to be reviewed in: the
    /// `clusterid` header, else `default`, through `aliases`.
    pub fn token_cluster(&self, default: &str, aliases: &std::collections::BTreeMap<String, String>) -> String {
        let named = self.cluster.as_deref().unwrap_or(default);
        aliases.get(named).map_or(named, String::as_str).to_string()
    }
}

/// What an authentication takes, later.
pub type Authentication<'a> = Pin<Box<dyn Future<Output = Result<Option<ProvenIdentity>, Status>> + Send + 'a>>;

/// Proves stream identities (tokens reviewed by the registered clusters).
pub trait StreamAuthenticator: Send + Sync + 'static {
    /// `Ok(None)`: the credentials hold no proof. `Err`: they hold a proof
    /// that failed (the stream is refused with that status).
    fn authenticate<'a>(&'a self, credentials: &'a StreamCredentials) -> Authentication<'a>;
}

/// How the server decides a stream's identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum IdentityPolicy {
    /// Proof over TLS only (the default).
    #[default]
    RequireProof,
    /// Streams without proof are taken at their metadata's word (local demos).
    TrustSelfAsserted,
}

/// The stream's identity from its proof (or its absence) and its node;
/// PermissionDenied when the node claims another identity than the proven one.
pub fn decide(
    policy: &IdentityPolicy,
    credentials: &StreamCredentials,
    proven: Option<ProvenIdentity>,
    node: &ProxyNode,
) -> Result<StreamIdentity, Status> {
    match proven {
        Some(_) if !credentials.tls => {
            // A token sent in clear text proves nothing worth a key (and may have been seen by anyone).
            tracing::debug!(proxy = %node.id, "a token over plaintext: the stream stays unproven");
            Ok(fallback(policy))
        }
        Some(p) => {
            if p.namespace != node.namespace || p.service_account != node.service_account || p.cluster != node.cluster {
                return Err(Status::permission_denied(format!(
                    "node {} claims service account {}/{} in cluster {}, but its token proves {}/{} in cluster {}",
                    node.id, node.namespace, node.service_account, node.cluster, p.namespace, p.service_account, p.cluster
                )));
            }
            Ok(StreamIdentity::Proven(p))
        }
        None => Ok(fallback(policy)),
    }
}

fn fallback(policy: &IdentityPolicy) -> StreamIdentity {
    match policy {
        IdentityPolicy::RequireProof => StreamIdentity::Unproven,
        IdentityPolicy::TrustSelfAsserted => StreamIdentity::SelfAsserted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

    fn node(ns: &str, sa: &str, cluster: &str) -> ProxyNode {
        let mut meta = Struct::default();
        for (k, v) in [("NAMESPACE", ns), ("SERVICE_ACCOUNT", sa), ("CLUSTER_ID", cluster)] {
            meta.fields.insert(k.into(), Value { kind: Some(Kind::StringValue(v.into())) });
        }
        ProxyNode::from_node(Some(&Node { id: "p".into(), metadata: Some(meta), ..Default::default() })).unwrap()
    }

    fn proven(ns: &str, sa: &str) -> Option<ProvenIdentity> {
        Some(ProvenIdentity { cluster: "c1".into(), namespace: ns.into(), service_account: sa.into(), proof: "token" })
    }

    #[test]
    fn a_token_over_tls_that_matches_the_metadata_proves_the_stream() {
        let tls = StreamCredentials { tls: true, ..Default::default() };
        let got = decide(&IdentityPolicy::RequireProof, &tls, proven("default", "productpage"), &node("default", "productpage", "c1")).unwrap();
        assert!(matches!(&got, StreamIdentity::Proven(p) if p.service_account == "productpage"));
        assert!(got.may_receive_secrets());
    }

    #[test]
    fn metadata_claiming_another_identity_is_denied() {
        let tls = StreamCredentials { tls: true, ..Default::default() };
        for claimed in [node("default", "reviews", "c1"), node("other", "productpage", "c1"), node("default", "productpage", "c2")] {
            let err = decide(&IdentityPolicy::RequireProof, &tls, proven("default", "productpage"), &claimed).unwrap_err();
            assert_eq!(err.code(), tonic::Code::PermissionDenied);
            assert!(err.message().contains("but its token proves default/productpage in cluster c1"), "{}", err.message());
        }
    }

    #[test]
    fn no_proof_or_plaintext_gets_no_secrets_unless_serve_trusts_metadata() {
        let plain = StreamCredentials::default();
        let n = node("default", "productpage", "c1");
        assert_eq!(decide(&IdentityPolicy::RequireProof, &plain, None, &n).unwrap(), StreamIdentity::Unproven);
        assert_eq!(decide(&IdentityPolicy::RequireProof, &plain, proven("default", "productpage"), &n).unwrap(), StreamIdentity::Unproven);
        assert!(!StreamIdentity::Unproven.may_receive_secrets());
        assert_eq!(decide(&IdentityPolicy::TrustSelfAsserted, &plain, None, &n).unwrap(), StreamIdentity::SelfAsserted);
    }

    #[test]
    fn headers_give_the_bearer_token_and_cluster() {
        let mut h = tonic::codegen::http::HeaderMap::new();
        h.insert("authorization", "Bearer abc.def".parse().unwrap());
        h.insert("clusterid", "Kubernetes".parse().unwrap());
        let c = StreamCredentials::from_headers(true, &h);
        assert_eq!((c.bearer.as_deref(), c.cluster.as_deref(), c.tls), (Some("abc.def"), Some("Kubernetes"), true));
        assert_eq!(StreamCredentials::from_headers(false, &Default::default()).bearer, None);
        let aliases = [("Kubernetes".to_string(), "cluster-1".to_string())].into();
        assert_eq!(c.token_cluster("elsewhere", &aliases), "cluster-1", "the header, through the aliases");
        assert_eq!(StreamCredentials::default().token_cluster("c2", &aliases), "c2", "no header: the default");
    }
}
