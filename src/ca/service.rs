//! Istio's certificate API, `istio.v1.auth.IstioCertificateService/CreateCertificate`
//! (wire shape in `proto/istio/ca.proto`), as `pilot-agent` calls it: the
//! agent sends a CSR for its own key with its ServiceAccount token
//! (`authorization: Bearer …`) and its cluster (`clusterid`); it gets the
//! certificate and the root (`cert_chain`, root last) only for the identity
//! the token proves, from the CA of the VirtualMesh its cluster belongs to.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use tonic::codegen::{BoxFuture, StdError, http};
use tonic::{Code, Status};

use super::WorkloadCertificates;
use super::csr::{CsrError, sign_csr};
use super::token::{TokenError, TokenReviewer};
use crate::model::MeshTrust;
use crate::xds::auth::StreamCredentials;

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded PKCS #10 certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime in seconds (0: the server's default).
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Optional request metadata (Istio's agent may send a cluster id or an impersonated identity; not honoured).
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<envoy_types::pb::google::protobuf::Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates: the workload's first, the root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

pub const SERVICE_NAME: &str = "istio.v1.auth.IstioCertificateService";
const CREATE_CERTIFICATE_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// Which VirtualMesh's CA and trust domain a registered cluster's workloads get.
pub trait TrustLookup: Send + Sync {
    fn trust_of(&self, cluster: &str) -> Option<MeshTrust>;
}

/// The certificate API over a token reviewer, the meshes' trust and their CAs.
#[derive(Clone)]
pub struct CertificateService {
    reviewer: Arc<dyn TokenReviewer>,
    trust: Arc<dyn TrustLookup>,
    certs: Arc<WorkloadCertificates>,
    /// `clusterid` header values → registered cluster names (Istio's default is `Kubernetes`).
    aliases: std::collections::BTreeMap<String, String>,
}

impl CertificateService {
    pub fn new(reviewer: Arc<dyn TokenReviewer>, trust: Arc<dyn TrustLookup>, certs: Arc<WorkloadCertificates>) -> Self {
        CertificateService { reviewer, trust, certs, aliases: Default::default() }
    }

    /// Maps `clusterid` headers (such as Istio's default `Kubernetes`) to registered cluster names.
    pub fn with_cluster_aliases(mut self, aliases: std::collections::BTreeMap<String, String>) -> Self {
        self.aliases = aliases;
        self
    }

    /// Handles one request: the caller's token proves an identity in the
    /// cluster its `clusterid` header names; the CSR must ask for exactly that identity.
    pub async fn create_certificate(&self, request: tonic::Request<IstioCertificateRequest>) -> Result<IstioCertificateResponse, Status> {
        let result = self.sign(&request).await;
        match &result {
            Ok(_) => {}
            Err(status) => tracing::warn!(code = ?status.code(), reason = status.message(), "certificate request refused"),
        }
        result
    }

    async fn sign(&self, request: &tonic::Request<IstioCertificateRequest>) -> Result<IstioCertificateResponse, Status> {
        let credentials = StreamCredentials::from_headers(true, request.metadata().as_ref());
        let token = credentials.bearer.as_deref().ok_or_else(|| {
            Status::unauthenticated(
                "no bearer token: send the workload's ServiceAccount token (audience istio-ca) as `authorization: Bearer <token>`",
            )
        })?;
        // Istio's agent sends no header when its pod names no cluster: Istio's default.
        let cluster = credentials.token_cluster(crate::xds::node::ISTIO_DEFAULT_CLUSTER_ID, &self.aliases);
        let identity = self.reviewer.review(&cluster, token).await.map_err(token_status)?;
        let trust = self.trust.trust_of(&identity.cluster).ok_or_else(|| {
            Status::failed_precondition(format!(
                "cluster {} is in no VirtualMesh with a certificateAuthority: there is no CA to sign for it",
                identity.cluster
            ))
        })?;
        let spiffe_id = trust.spiffe_id(&identity.namespace, &identity.service_account);
        let ca = self.certs.authority(&trust).map_err(|e| match e {
            super::CaError::NotLoaded(_) => Status::unavailable(format!("{e}; retry shortly")),
            e => Status::internal(format!("the CA of {}: {e}", trust.virtual_mesh)),
        })?;
        let req = request.get_ref();
        let signed = sign_csr(&ca, &req.csr, &spiffe_id, req.validity_duration, self.certs.ttl(), SystemTime::now()).map_err(csr_status)?;
        tracing::info!(%spiffe_id, cluster = %identity.cluster, "signed a workload certificate for its own key");
        Ok(IstioCertificateResponse { cert_chain: signed.chain })
    }
}

pub(crate) fn token_status(e: TokenError) -> Status {
    let code = match e {
        TokenError::Timeout { .. } | TokenError::Api { .. } => Code::Unavailable,
        _ => Code::Unauthenticated,
    };
    Status::new(code, e.to_string())
}

fn csr_status(e: CsrError) -> Status {
    let code = match e {
        CsrError::WrongIdentity { .. } => Code::PermissionDenied,
        CsrError::Signing(_) => Code::Internal,
        _ => Code::InvalidArgument,
    };
    Status::new(code, e.to_string())
}

/// The gRPC service (one unary method) for tonic's router.
#[derive(Clone)]
pub struct CertificateServer(Arc<CertificateService>);

impl CertificateServer {
    pub fn new(service: CertificateService) -> Self {
        CertificateServer(Arc::new(service))
    }
}

impl tonic::server::NamedService for CertificateServer {
    const NAME: &'static str = SERVICE_NAME;
}

struct CreateCertificate(Arc<CertificateService>);

impl tonic::server::UnaryService<IstioCertificateRequest> for CreateCertificate {
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<tonic::Response<IstioCertificateResponse>, Status>;
    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.create_certificate(request).await.map(tonic::Response::new) })
    }
}

impl<B> tower::Service<http::Request<B>> for CertificateServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != CREATE_CERTIFICATE_PATH {
            let path = request.uri().path().to_string();
            return Box::pin(async move { Ok(Status::unimplemented(format!("{path}: {SERVICE_NAME} has only CreateCertificate")).into_http()) });
        }
        let method = CreateCertificate(self.0.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(method, request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::token::{Review, ServiceAccountIdentity};
    use std::time::Duration;

    /// Tokens are "<namespace>/<service account>" in cluster "c1"; anything else is rejected.
    struct NamedTokens;

    impl TokenReviewer for NamedTokens {
        fn review<'a>(&'a self, cluster: &'a str, token: &'a str) -> Review<'a> {
            Box::pin(async move {
                if cluster != "c1" {
                    return Err(TokenError::UnknownCluster { cluster: cluster.into(), registered: "c1".into() });
                }
                let (ns, sa) = token.split_once('/').ok_or(TokenError::Rejected { cluster: cluster.into(), reason: "bad token".into() })?;
                Ok(ServiceAccountIdentity { cluster: cluster.into(), namespace: ns.into(), service_account: sa.into() })
            })
        }
    }

    struct OneMesh;

    impl TrustLookup for OneMesh {
        fn trust_of(&self, cluster: &str) -> Option<MeshTrust> {
            (cluster == "c1").then(|| MeshTrust {
                virtual_mesh: "service-mesh-hub/vm".into(),
                trust_domain: "cluster.local".into(),
                ca: crate::model::CaSource::Builtin,
            })
        }
    }

    fn service() -> CertificateService {
        CertificateService::new(Arc::new(NamedTokens), Arc::new(OneMesh), Arc::new(WorkloadCertificates::new(Duration::from_secs(3600), None)))
    }

    fn csr_for(id: &str) -> String {
        crate::ca::csr::throwaway_request(&[id]).unwrap()
    }

    fn request(token: Option<&str>, cluster: Option<&str>, csr: String) -> tonic::Request<IstioCertificateRequest> {
        let mut r = tonic::Request::new(IstioCertificateRequest { csr, validity_duration: 0, metadata: None });
        if let Some(t) = token {
            r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        if let Some(c) = cluster {
            r.metadata_mut().insert("clusterid", c.parse().unwrap());
        }
        r
    }

    #[tokio::test]
    async fn the_proven_identity_gets_its_certificate_and_the_root_last() {
        let id = "spiffe://cluster.local/ns/default/sa/productpage";
        let svc = service();
        let resp = svc.create_certificate(request(Some("default/productpage"), Some("c1"), csr_for(id))).await.unwrap();
        assert_eq!(resp.cert_chain.len(), 2);
        assert_eq!(resp.cert_chain[1], svc.certs.authority(&OneMesh.trust_of("c1").unwrap()).unwrap().root_pem);
    }

    #[tokio::test]
    async fn every_refusal_has_a_status_that_says_why() {
        let svc = service();
        let id = "spiffe://cluster.local/ns/default/sa/productpage";
        let refused = |r| async { svc.create_certificate(r).await.unwrap_err() };
        let s = refused(request(None, Some("c1"), csr_for(id))).await;
        assert_eq!(s.code(), Code::Unauthenticated);
        assert!(s.message().contains("no bearer token"), "{s:?}");
        let s = refused(request(Some("default/productpage"), None, csr_for(id))).await;
        assert!(s.code() == Code::Unauthenticated && s.message().contains("clusterid"), "{s:?}");
        let s = refused(request(Some("default/productpage"), Some("elsewhere"), csr_for(id))).await;
        assert!(s.code() == Code::Unauthenticated && s.message().contains("not a registered cluster"), "{s:?}");
        // A token for reviews asking for productpage's certificate.
        let s = refused(request(Some("default/reviews"), Some("c1"), csr_for(id))).await;
        assert_eq!(s.code(), Code::PermissionDenied);
        assert!(s.message().contains("but the caller proved spiffe://cluster.local/ns/default/sa/reviews"), "{s:?}");
        let s = refused(request(Some("default/productpage"), Some("c1"), "garbage".into())).await;
        assert_eq!(s.code(), Code::InvalidArgument);
    }
}
