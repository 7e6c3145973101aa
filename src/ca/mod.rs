//! Workload identities from a VirtualMesh's certificate authority: a root
//! generated and kept by meshpilot (`certificateAuthority.builtin`) or
//! provided (`--ca-dir DIR/<namespace>.<name>/ca.crt` + `ca.key`), and
//! workload certificates with the SPIFFE id `spiffe://<trust
//! domain>/ns/<ns>/sa/<sa>` as their only URI SAN, issued on demand and
//! re-issued when two thirds of their lifetime have passed.
//!
//! `csr` signs a workload's own key for the identity it proved; `token`
//! proves identities with Kubernetes TokenReviews; `service` is Istio's
//! certificate API (`istio.v1.auth.IstioCertificateService`) over both.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub mod csr;
pub mod service;
pub mod token;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// One mesh's root of trust.
pub struct CertificateAuthority {
    pub root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").finish_non_exhaustive()
    }
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

impl CertificateAuthority {
    /// A new self-signed root (ECDSA P-256, ten years).
    pub fn generate(org: &str) -> Result<CertificateAuthority, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, org);
        dn.push(DnType::CommonName, format!("{org} root CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = to_offset(now - Duration::from_secs(3600));
        params.not_after = to_offset(now + Duration::from_secs(10 * 365 * 86400));
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority { root_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// A root from PEM (certificate and its private key).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertificateAuthority, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(CertificateAuthority { root_pem: cert_pem.to_string(), issuer })
    }

    /// Signs a parsed request as it stands (its contents are the caller's to
    /// check: `csr::sign_csr`), as PEM.
    pub(crate) fn sign_request(&self, request: &rcgen::CertificateSigningRequestParams) -> Result<String, CaError> {
        Ok(request.signed_by(&self.issuer)?.pem())
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A workload certificate for `spiffe_id`, valid from now for `ttl`.
    pub fn issue(&self, spiffe_id: &str, ttl: Duration, now: SystemTime) -> Result<IssuedCertificate, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = to_offset(now - Duration::from_secs(60));
        params.not_after = to_offset(now + ttl);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate { cert_pem: cert.pem(), key_pem: key.serialize_pem(), issued_at: now, expires_at: now + ttl })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub cert_pem: String,
    pub key_pem: String,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
}

impl IssuedCertificate {
    /// Re-issue once two thirds of the lifetime have passed (Istio rotates at ~80%; earlier is safer).
    pub fn due(&self, now: SystemTime) -> bool {
        let life = self.expires_at.duration_since(self.issued_at).unwrap_or_default();
        now >= self.issued_at + life * 2 / 3
    }
}

/// The CAs of every VirtualMesh and the certificates issued from them.
pub struct WorkloadCertificates {
    ttl: Duration,
    ca_dir: Option<PathBuf>,
    cas: Mutex<HashMap<String, Arc<CertificateAuthority>>>,
    issued: Mutex<HashMap<(String, String), IssuedCertificate>>,
}

impl WorkloadCertificates {
    pub fn new(ttl: Duration, ca_dir: Option<PathBuf>) -> Self {
        WorkloadCertificates { ttl, ca_dir, cas: Mutex::default(), issued: Mutex::default() }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The CA of a VirtualMesh (`namespace/name`): from `--ca-dir` if there is
    /// one there, else generated (and kept there, with `--ca-dir`).
    pub fn authority(&self, virtual_mesh: &str) -> Result<Arc<CertificateAuthority>, CaError> {
        let mut cas = self.cas.lock().expect("ca lock");
        if let Some(ca) = cas.get(virtual_mesh) {
            return Ok(ca.clone());
        }
        let dir = self.ca_dir.as_ref().map(|d| d.join(virtual_mesh.replace('/', ".")));
        let io = |path: &PathBuf, source| CaError::Io { path: path.display().to_string(), source };
        let ca = match &dir {
            Some(d) if d.join("ca.crt").exists() => {
                let (c, k) = (d.join("ca.crt"), d.join("ca.key"));
                let cert = std::fs::read_to_string(&c).map_err(|e| io(&c, e))?;
                let key = std::fs::read_to_string(&k).map_err(|e| io(&k, e))?;
                tracing::info!(virtual_mesh, dir = %d.display(), "using the provided CA");
                CertificateAuthority::from_pem(&cert, &key)?
            }
            _ => {
                let ca = CertificateAuthority::generate(&format!("meshpilot {virtual_mesh}"))?;
                if let Some(d) = &dir {
                    std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
                    let (c, k) = (d.join("ca.crt"), d.join("ca.key"));
                    std::fs::write(&c, &ca.root_pem).map_err(|e| io(&c, e))?;
                    std::fs::write(&k, ca.key_pem()).map_err(|e| io(&k, e))?;
                }
                tracing::info!(virtual_mesh, "generated a root CA");
                ca
            }
        };
        let ca = Arc::new(ca);
        cas.insert(virtual_mesh.to_string(), ca.clone());
        Ok(ca)
    }

    /// The current certificate for `spiffe_id` in `virtual_mesh`'s trust, and the root.
    pub fn certificate(&self, virtual_mesh: &str, spiffe_id: &str, now: SystemTime) -> Result<(IssuedCertificate, String), CaError> {
        let ca = self.authority(virtual_mesh)?;
        let mut issued = self.issued.lock().expect("issued lock");
        let key = (virtual_mesh.to_string(), spiffe_id.to_string());
        if let Some(c) = issued.get(&key).filter(|c| !c.due(now)) {
            return Ok((c.clone(), ca.root_pem.clone()));
        }
        let c = ca.issue(spiffe_id, self.ttl, now)?;
        tracing::debug!(spiffe_id, "issued a workload certificate");
        issued.insert(key, c.clone());
        Ok((c, ca.root_pem.clone()))
    }

    /// Whether any issued certificate is due for rotation.
    pub fn rotation_due(&self, now: SystemTime) -> bool {
        self.issued.lock().expect("issued lock").values().any(|c| c.due(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_spiffe_certificates_and_rotates_them() {
        let certs = WorkloadCertificates::new(Duration::from_secs(3600), None);
        let t0 = SystemTime::now();
        let id = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
        let (a, root) = certs.certificate("service-mesh-hub/vm", id, t0).unwrap();
        assert!(a.cert_pem.starts_with("-----BEGIN CERTIFICATE-----") && root.starts_with("-----BEGIN CERTIFICATE-----"));
        let (der, _) = (pem_der(&a.cert_pem), ());
        assert!(der.windows(id.len()).any(|w| w == id.as_bytes()), "the SPIFFE id is in the certificate");
        let (same, _) = certs.certificate("service-mesh-hub/vm", id, t0 + Duration::from_secs(60)).unwrap();
        assert_eq!(same, a, "not due yet: the same certificate");
        assert!(!certs.rotation_due(t0 + Duration::from_secs(2000)));
        assert!(certs.rotation_due(t0 + Duration::from_secs(2401)));
        let (next, root2) = certs.certificate("service-mesh-hub/vm", id, t0 + Duration::from_secs(2401)).unwrap();
        assert_ne!(next.cert_pem, a.cert_pem, "re-issued after two thirds of its life");
        assert_eq!(root, root2, "same root");
    }

    #[test]
    fn a_kept_ca_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = WorkloadCertificates::new(Duration::from_secs(60), Some(dir.path().into())).authority("ns/vm").unwrap();
        let again = WorkloadCertificates::new(Duration::from_secs(60), Some(dir.path().into())).authority("ns/vm").unwrap();
        assert_eq!(first.root_pem, again.root_pem);
        again.issue("spiffe://cluster.local/ns/a/sa/b", Duration::from_secs(60), SystemTime::now()).unwrap();
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).unwrap()
    }
}
