//! xDS streams prove their identity as certificate requests do: the
//! ServiceAccount token in `authorization`, reviewed by the registered
//! cluster the `clusterid` header names (the `xds::auth` seam).

use std::sync::Arc;

use super::service::token_status;
use super::token::TokenReviewer;
use crate::xds::auth::{Authentication, ProvenIdentity, StreamAuthenticator, StreamCredentials};

/// Proves a stream's token with the registered clusters' TokenReviews.
pub struct TokenAuthenticator(pub Arc<dyn TokenReviewer>);

impl StreamAuthenticator for TokenAuthenticator {
    fn authenticate<'a>(&'a self, credentials: &'a StreamCredentials) -> Authentication<'a> {
        Box::pin(async move {
            let (Some(token), Some(cluster)) = (credentials.bearer.as_deref(), credentials.cluster.as_deref()) else { return Ok(None) };
            let id = self.0.review(cluster, token).await.map_err(token_status)?;
            Ok(Some(ProvenIdentity { cluster: id.cluster, namespace: id.namespace, service_account: id.service_account, proof: "token" }))
        })
    }
}
