//! Proving a workload's identity from its Kubernetes ServiceAccount token,
//! as istiod does: a TokenReview (audience `istio-ca`, Istio's default) in
//! the cluster the caller names, which must be a registered cluster. What a
//! proxy says about itself (node metadata) never counts.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};

use super::clusters::ClusterClients;

/// The audience Istio's agent asks its token for (`istio-ca`).
pub const ISTIO_CA_AUDIENCE: &str = "istio-ca";

/// How long one TokenReview may take before the caller is told to retry.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Who a token proved the caller to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountIdentity {
    /// The registered cluster whose API server vouched for the token.
    pub cluster: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "cluster {cluster:?} (the clusterid header, or the proxy's CLUSTER_ID) is not a registered cluster; registered: {registered} (map a name to one with serve --cluster-alias NAME=<cluster>)"
    )]
    UnknownCluster { cluster: String, registered: String },
    #[error("cluster {cluster}'s API server did not accept the token: {reason}")]
    Rejected { cluster: String, reason: String },
    #[error("the token is not for the audience {ISTIO_CA_AUDIENCE} (cluster {cluster} says it is for {audiences})")]
    WrongAudience { cluster: String, audiences: String },
    #[error("the token is {user}'s, not a ServiceAccount's")]
    NotServiceAccount { user: String },
    #[error("cluster {cluster}'s TokenReview did not answer within {timeout:?}")]
    Timeout { cluster: String, timeout: Duration },
    #[error("cluster {cluster}'s TokenReview failed: {error}")]
    Api { cluster: String, error: String },
}

/// What a review returns, later.
pub type Review<'a> = Pin<Box<dyn Future<Output = Result<ServiceAccountIdentity, TokenError>> + Send + 'a>>;

/// Reviews bearer tokens; the certificate API and the xDS stream
/// authentication ask it, and never the proxy's metadata.
pub trait TokenReviewer: Send + Sync {
    fn review<'a>(&'a self, cluster: &'a str, token: &'a str) -> Review<'a>;
}

/// The identity a TokenReview's status proves, or why it proves none.
pub fn identity_of(cluster: &str, status: &TokenReviewStatus) -> Result<ServiceAccountIdentity, TokenError> {
    if status.authenticated != Some(true) {
        let reason = status.error.clone().filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".into());
        return Err(TokenError::Rejected { cluster: cluster.into(), reason });
    }
    let audiences = status.audiences.clone().unwrap_or_default();
    if !audiences.iter().any(|a| a == ISTIO_CA_AUDIENCE) {
        return Err(TokenError::WrongAudience { cluster: cluster.into(), audiences: format!("{audiences:?}") });
    }
    let user = status.user.as_ref().and_then(|u| u.username.clone()).unwrap_or_default();
    let mut parts = user.strip_prefix("system:serviceaccount:").map(|rest| rest.splitn(2, ':'));
    match parts.as_mut().and_then(|p| Some((p.next()?, p.next()?))) {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains(':') => {
            Ok(ServiceAccountIdentity { cluster: cluster.into(), namespace: ns.into(), service_account: sa.into() })
        }
        _ => Err(TokenError::NotServiceAccount { user: if user.is_empty() { "an anonymous user".into() } else { user } }),
    }
}

/// TokenReviews against the registered clusters' API servers.
pub struct KubeTokenReviewer {
    clusters: Arc<ClusterClients>,
    timeout: Option<Duration>,
}

impl KubeTokenReviewer {
    pub fn new(clusters: Arc<ClusterClients>) -> Self {
        KubeTokenReviewer { clusters, timeout: None }
    }

    /// A TokenReview slower than `timeout` is answered with [`TokenError::Timeout`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(&'a self, cluster: &'a str, token: &'a str) -> Review<'a> {
        Box::pin(async move {
            let Some(client) = self.clusters.get(cluster) else {
                return Err(TokenError::UnknownCluster { cluster: cluster.into(), registered: self.clusters.names() });
            };
            let review = TokenReview {
                spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![ISTIO_CA_AUDIENCE.into()]) },
                ..Default::default()
            };
            let timeout = self.timeout.unwrap_or(REVIEW_TIMEOUT);
            let api: Api<TokenReview> = Api::all(client);
            let answer = tokio::time::timeout(timeout, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| TokenError::Timeout { cluster: cluster.into(), timeout })?
                .map_err(|e| TokenError::Api { cluster: cluster.into(), error: e.to_string() })?;
            identity_of(cluster, &answer.status.unwrap_or_default())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn status(authenticated: bool, user: &str, audiences: &[&str]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            user: Some(UserInfo { username: Some(user.into()), ..Default::default() }),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            error: None,
        }
    }

    #[test]
    fn a_service_account_token_for_istio_ca_proves_its_namespace_and_account() {
        let id = identity_of("c1", &status(true, "system:serviceaccount:default:bookinfo-productpage", &["istio-ca"])).unwrap();
        assert_eq!(id, ServiceAccountIdentity { cluster: "c1".into(), namespace: "default".into(), service_account: "bookinfo-productpage".into() });
    }

    #[test]
    fn unauthenticated_other_audiences_and_users_that_are_no_service_account_prove_nothing() {
        let mut rejected = status(false, "", &[]);
        rejected.error = Some("token has expired".into());
        assert_eq!(identity_of("c1", &rejected), Err(TokenError::Rejected { cluster: "c1".into(), reason: "token has expired".into() }));
        let wrong = identity_of("c1", &status(true, "system:serviceaccount:default:a", &["https://kubernetes.default.svc"])).unwrap_err();
        assert!(wrong.to_string().contains("not for the audience istio-ca"), "{wrong}");
        assert_eq!(identity_of("c1", &status(true, "alice", &["istio-ca"])), Err(TokenError::NotServiceAccount { user: "alice".into() }));
        assert!(matches!(
            identity_of("c1", &status(true, "system:serviceaccount:default", &["istio-ca"])),
            Err(TokenError::NotServiceAccount { .. })
        ));
    }

    #[tokio::test]
    async fn a_review_that_hangs_times_out_without_holding_up_another_cluster() {
        // An API server that accepts connections and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((conn, _)) = silent.accept().await {
                open.push(conn);
            }
        });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let clusters = Arc::new(ClusterClients::default());
        clusters.set("stuck", kube::Client::try_from(config).unwrap());
        let reviewer = KubeTokenReviewer::new(clusters).with_timeout(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let (stuck, unknown) = tokio::join!(reviewer.review("stuck", "t"), async {
            let r = reviewer.review("elsewhere", "t").await;
            (r, started.elapsed())
        });
        assert!(matches!(stuck, Err(TokenError::Timeout { .. })), "{stuck:?}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        // The other caller was answered at once, not after the hung review.
        assert!(matches!(unknown.0, Err(TokenError::UnknownCluster { .. })));
        assert!(unknown.1 < Duration::from_millis(300), "{:?}", unknown.1);
        held.abort();
    }
}
