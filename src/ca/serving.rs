//! The xDS TLS listener's own certificate, from the mesh CA (as istiod's
//! `istiod.istio-system.svc` certificate is), so the root a pod already
//! trusts (`istio-ca-root-cert`) verifies the control plane too. It is
//! swapped in place when it is due or the CA changes; handshakes in progress
//! keep the one they started with.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::{CaError, CertificateAuthority, IssuedCertificate};

/// The names a control plane answers to: meshpilot's own Service, and
/// istiod's, so a user can point the `istiod` Service at meshpilot instead of
/// editing every pod's `discoveryAddress`.
pub fn default_names(extra: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    for (service, ns) in [("meshpilot", "service-mesh-hub"), ("istiod", "istio-system")] {
        names.extend([service.to_string(), format!("{service}.{ns}"), format!("{service}.{ns}.svc"), format!("{service}.{ns}.svc.cluster.local")]);
    }
    names.push("localhost".into());
    names.extend(extra.iter().cloned());
    names
}

struct Current {
    key: Arc<CertifiedKey>,
    issued: IssuedCertificate,
    root_pem: String,
}

/// The listener's certificate; none until a mesh CA exists (handshakes fail meanwhile).
pub struct ServingCertificate {
    names: Vec<String>,
    ttl: Duration,
    current: RwLock<Option<Current>>,
}

impl std::fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCertificate").field("names", &self.names).finish_non_exhaustive()
    }
}

impl ServingCertificate {
    pub fn new(names: Vec<String>, ttl: Duration) -> Self {
        ServingCertificate { names, ttl, current: RwLock::new(None) }
    }

    /// Issues a new certificate from `ca` when there is none, the CA's root
    /// changed, or two thirds of its life have passed. True if it did.
    pub fn refresh(&self, ca: &CertificateAuthority, now: SystemTime) -> Result<bool, CaError> {
        if let Some(c) = self.current.read().expect("serving lock").as_ref()
            && c.root_pem == ca.root_pem
            && !c.issued.due(now)
        {
            return Ok(false);
        }
        let issued = ca.issue_server(&self.names, self.ttl, now)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| CaError::Layout(format!("the serving certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).map_err(|e| CaError::Layout(format!("the serving key: {e}")))?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| CaError::Layout(format!("the serving key: {e}")))?;
        let key = Arc::new(CertifiedKey::new(chain, signing));
        *self.current.write().expect("serving lock") = Some(Current { key, issued, root_pem: ca.root_pem.clone() });
        tracing::info!(names = ?self.names, "issued the xDS TLS listener's certificate");
        Ok(true)
    }

    /// A rustls server configuration presenting this certificate, HTTP/2 only.
    pub fn server_config(self: &Arc<Self>) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        config
    }
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = self.current.read().expect("serving lock").as_ref().map(|c| c.key.clone());
        if key.is_none() {
            tracing::warn!("a TLS xDS handshake before any mesh CA exists: refused (no VirtualMesh with a certificateAuthority yet?)");
        }
        key
    }
}
