//! A sidecar's SDS secrets, issued by the VirtualMesh CA for the identity
//! its scope names, at the time of translation.

use super::MeshResources;
use crate::model::MeshSnapshot;
use crate::translate::{self, ProxyScope};
use crate::xds::resources::{ResourceSet, ResourceType};

impl MeshResources {
    /// A sidecar's SDS secrets (`default`, `ROOTCA`) when its cluster has mTLS
    /// and its stream proved the identity (or `serve` trusts metadata).
    pub(super) fn add_secrets(&self, snapshot: &MeshSnapshot, scope: &ProxyScope, set: &mut ResourceSet) {
        // Istio's agent makes its own key and serves SDS; an unproven stream gets no key.
        if scope.role != crate::xds::node::ProxyRole::Sidecar || !scope.send_secrets {
            return;
        }
        let Some(trust) = snapshot.trust.get(&scope.cluster) else { return };
        let id = trust.spiffe_id(&scope.namespace, &scope.service_account);
        match self.certs.certificate(trust, &id, std::time::SystemTime::now()) {
            Ok((cert, root)) => {
                let w = translate::tls::workload_secret(&cert.cert_pem, &cert.key_pem);
                set.insert(ResourceType::Secret, crate::xds::resources::Resource::from_message(w.name.clone(), &w));
                let r = translate::tls::root_secret(&root);
                set.insert(ResourceType::Secret, crate::xds::resources::Resource::from_message(r.name.clone(), &r));
            }
            // Kubernetes mode before the management cluster's CA Secret is read:
            // the secrets follow once it is (the CA task re-translates).
            Err(e @ crate::ca::CaError::NotLoaded(_)) => tracing::debug!(spiffe_id = %id, error = %e, "no workload certificate yet"),
            Err(e) => tracing::error!(spiffe_id = %id, error = %e, "cannot issue a workload certificate"),
        }
    }
}

/// The certificate API signs for a cluster with the CA of the VirtualMesh the
/// published snapshot puts it in.
impl crate::ca::service::TrustLookup for MeshResources {
    fn trust_of(&self, cluster: &str) -> Option<crate::model::MeshTrust> {
        self.snapshot().trust.get(cluster).cloned()
    }
}
