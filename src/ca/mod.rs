//! Workload identities from a VirtualMesh's certificate authority, and
//! workload certificates with the SPIFFE id `spiffe://<trust
//! domain>/ns/<ns>/sa/<sa>` as their only URI SAN, issued on demand and
//! re-issued when two thirds of their lifetime have passed.
//!
//! Where a CA comes from: in Kubernetes mode from a Secret in the management
//! cluster (`kube_roots`: the builtin root is created there once and read by
//! every replica; `certificateAuthority.provided` names a Secret in Istio's
//! `cacerts` layout), installed here with [`WorkloadCertificates::install`];
//! in local mode generated, or read from `--ca-dir DIR/<namespace>.<name>/`.
//!
//! `csr` signs a workload's own key for the identity it proved; `token`
//! proves identities with Kubernetes TokenReviews; `service` is Istio's
//! certificate API (`istio.v1.auth.IstioCertificateService`) over both.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub mod clusters;
pub mod csr;
pub mod kube_roots;
pub mod service;
pub mod serving;
pub mod stream_auth;
pub mod token;

use crate::model::{CaSource, MeshTrust};

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Layout(String),
    #[error("the CA of VirtualMesh {0} is not loaded yet")]
    NotLoaded(String),
    #[error(
        "VirtualMesh {virtual_mesh}: spec.certificateAuthority.provided names Secret {secret}, which local mode does not read; give the CA with serve --ca-dir (DIR/{dir}/ca.crt, ca.key)"
    )]
    ProvidedNotGiven { virtual_mesh: String, secret: String, dir: String },
}

/// One mesh's root of trust, and the certificate that signs for it: the
/// root itself, or an intermediate whose chain up to the root is `chain_pem`.
pub struct CertificateAuthority {
    pub root_pem: String,
    /// The signing certificate and any certificates between it and the root
    /// (the root excluded); empty when the root signs.
    pub chain_pem: Vec<String>,
    issuer: Issuer<'static, KeyPair>,
}

/// Istio's `cacerts` Secret keys.
pub const CA_CERT_KEY: &str = "ca-cert.pem";
pub const CA_KEY_KEY: &str = "ca-key.pem";
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
pub const CERT_CHAIN_KEY: &str = "cert-chain.pem";

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
        Ok(CertificateAuthority { root_pem: cert.pem(), chain_pem: Vec::new(), issuer: Issuer::new(params, key) })
    }

    /// A root from PEM (certificate and its private key).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertificateAuthority, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(CertificateAuthority { root_pem: cert_pem.to_string(), chain_pem: Vec::new(), issuer })
    }

    /// A CA from Istio's `cacerts` layout: `ca-cert.pem` signs with
    /// `ca-key.pem`; `root-cert.pem` is the root (the signing certificate
    /// itself when absent); `cert-chain.pem`, when present, is the chain from
    /// the signing certificate up to the root. Errors name the missing or bad key.
    pub fn from_cacerts(files: &std::collections::BTreeMap<String, String>) -> Result<CertificateAuthority, CaError> {
        let get = |k: &str| files.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let cert = get(CA_CERT_KEY).ok_or_else(|| CaError::Layout(format!("no {CA_CERT_KEY}")))?;
        let key = get(CA_KEY_KEY).ok_or_else(|| CaError::Layout(format!("no {CA_KEY_KEY}")))?;
        let key = KeyPair::from_pem(key).map_err(|e| CaError::Layout(format!("{CA_KEY_KEY}: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(cert, key).map_err(|e| CaError::Layout(format!("{CA_CERT_KEY}: {e}")))?;
        let root = get(ROOT_CERT_KEY).unwrap_or(cert);
        let root_pem = format!("{root}\n");
        let mut chain_pem: Vec<String> = match get(CERT_CHAIN_KEY) {
            Some(chain) => split_pem(chain).map_err(|e| CaError::Layout(format!("{CERT_CHAIN_KEY}: {e}")))?,
            None => vec![format!("{cert}\n")],
        };
        // The root goes last in every chain handed out, once.
        chain_pem.retain(|c| c.trim() != root.trim());
        Ok(CertificateAuthority { root_pem, chain_pem, issuer })
    }

    /// This CA in Istio's `cacerts` layout (a builtin root: the root signs).
    pub fn to_cacerts(&self) -> std::collections::BTreeMap<String, String> {
        let signing = self.chain_pem.first().unwrap_or(&self.root_pem).clone();
        let mut chain = self.chain_pem.concat();
        chain.push_str(&self.root_pem);
        [(CA_CERT_KEY, signing), (CA_KEY_KEY, self.key_pem()), (ROOT_CERT_KEY, self.root_pem.clone()), (CERT_CHAIN_KEY, chain)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    /// What follows a leaf in a chain handed out: the intermediates, then the root.
    pub fn chain_after_leaf(&self) -> Vec<String> {
        let mut out = self.chain_pem.clone();
        out.push(self.root_pem.clone());
        out
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
        let cert_pem = std::iter::once(cert.pem()).chain(self.chain_pem.iter().cloned()).collect();
        Ok(IssuedCertificate { cert_pem, key_pem: key.serialize_pem(), issued_at: now, expires_at: now + ttl })
    }
}

impl CertificateAuthority {
    /// A server certificate for `names` (DNS names, or IP addresses), valid
    /// from now for `ttl`: the TLS xDS listener's.
    pub fn issue_server(&self, names: &[String], ttl: Duration, now: SystemTime) -> Result<IssuedCertificate, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.as_str().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = to_offset(now - Duration::from_secs(60));
        params.not_after = to_offset(now + ttl);
        let cert = params.signed_by(&key, &self.issuer)?;
        let cert_pem = std::iter::once(cert.pem()).chain(self.chain_pem.iter().cloned()).collect();
        Ok(IssuedCertificate { cert_pem, key_pem: key.serialize_pem(), issued_at: now, expires_at: now + ttl })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// The leaf, then any intermediates (not the root).
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
    origin: CaOrigin,
    cas: Mutex<HashMap<String, Arc<CertificateAuthority>>>,
    issued: Mutex<HashMap<(String, String), IssuedCertificate>>,
}

/// Where a VirtualMesh's CA comes from when it is first needed.
enum CaOrigin {
    /// Local mode: generated (and kept in the folder, if any), or read from it.
    Local { ca_dir: Option<PathBuf> },
    /// Kubernetes mode: only what [`WorkloadCertificates::install`] put here
    /// (from the management cluster's Secrets, shared by every replica); a
    /// replica never makes a root of its own.
    Installed,
}

impl WorkloadCertificates {
    /// Local mode's CAs: generated on first use, kept in `ca_dir` if given.
    pub fn new(ttl: Duration, ca_dir: Option<PathBuf>) -> Self {
        WorkloadCertificates { ttl, origin: CaOrigin::Local { ca_dir }, cas: Mutex::default(), issued: Mutex::default() }
    }

    /// Kubernetes mode's CAs: only those installed.
    pub fn installed_only(ttl: Duration) -> Self {
        WorkloadCertificates { ttl, origin: CaOrigin::Installed, cas: Mutex::default(), issued: Mutex::default() }
    }

    /// Installs (or replaces) a VirtualMesh's CA; certificates issued by the
    /// one it replaces are issued again on next use. True if it changed.
    pub fn install(&self, virtual_mesh: &str, ca: CertificateAuthority) -> bool {
        let mut cas = self.cas.lock().expect("ca lock");
        if cas.get(virtual_mesh).is_some_and(|old| old.root_pem == ca.root_pem && old.chain_pem == ca.chain_pem) {
            return false;
        }
        cas.insert(virtual_mesh.to_string(), Arc::new(ca));
        self.issued.lock().expect("issued lock").retain(|(vm, _), _| vm != virtual_mesh);
        true
    }

    /// The installed CA of a VirtualMesh, if any (never generates one).
    pub fn installed(&self, virtual_mesh: &str) -> Option<Arc<CertificateAuthority>> {
        self.cas.lock().expect("ca lock").get(virtual_mesh).cloned()
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The CA of a trust's VirtualMesh: the installed one; in local mode,
    /// from `--ca-dir` if there is one there, else generated (and kept
    /// there, with `--ca-dir`) unless the VirtualMesh says it is provided.
    pub fn authority(&self, trust: &MeshTrust) -> Result<Arc<CertificateAuthority>, CaError> {
        let virtual_mesh = trust.virtual_mesh.as_str();
        let mut cas = self.cas.lock().expect("ca lock");
        if let Some(ca) = cas.get(virtual_mesh) {
            return Ok(ca.clone());
        }
        let ca_dir = match &self.origin {
            CaOrigin::Installed => return Err(CaError::NotLoaded(virtual_mesh.to_string())),
            CaOrigin::Local { ca_dir } => ca_dir,
        };
        let dir = ca_dir.as_ref().map(|d| d.join(virtual_mesh.replace('/', ".")));
        let io = |path: &PathBuf, source| CaError::Io { path: path.display().to_string(), source };
        let ca = match &dir {
            Some(d) if d.join("ca.crt").exists() => {
                let (c, k) = (d.join("ca.crt"), d.join("ca.key"));
                let cert = std::fs::read_to_string(&c).map_err(|e| io(&c, e))?;
                let key = std::fs::read_to_string(&k).map_err(|e| io(&k, e))?;
                tracing::info!(virtual_mesh, dir = %d.display(), "using the provided CA");
                CertificateAuthority::from_pem(&cert, &key)?
            }
            _ if matches!(trust.ca, CaSource::Provided { .. }) => {
                let CaSource::Provided { namespace, name } = &trust.ca else { unreachable!() };
                return Err(CaError::ProvidedNotGiven {
                    virtual_mesh: virtual_mesh.into(),
                    secret: format!("{namespace}/{name}"),
                    dir: virtual_mesh.replace('/', "."),
                });
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

    /// The current certificate for `spiffe_id` in `trust`'s VirtualMesh, and the root.
    pub fn certificate(&self, trust: &MeshTrust, spiffe_id: &str, now: SystemTime) -> Result<(IssuedCertificate, String), CaError> {
        let ca = self.authority(trust)?;
        let mut issued = self.issued.lock().expect("issued lock");
        let key = (trust.virtual_mesh.clone(), spiffe_id.to_string());
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

/// The certificates of a PEM bundle, each as its own PEM block.
pub fn split_pem(bundle: &str) -> Result<Vec<String>, String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = bundle;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else { return Err("a certificate has no END line".into()) };
        out.push(format!("{}\n", &rest[start..start + len + END.len()]));
        rest = &rest[start + len + END.len()..];
    }
    if out.is_empty() {
        return Err("no PEM certificate".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_spiffe_certificates_and_rotates_them() {
        let certs = WorkloadCertificates::new(Duration::from_secs(3600), None);
        let t0 = SystemTime::now();
        let id = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
        let vm = trust("service-mesh-hub/vm");
        let (a, root) = certs.certificate(&vm, id, t0).unwrap();
        assert!(a.cert_pem.starts_with("-----BEGIN CERTIFICATE-----") && root.starts_with("-----BEGIN CERTIFICATE-----"));
        let (der, _) = (pem_der(&a.cert_pem), ());
        assert!(der.windows(id.len()).any(|w| w == id.as_bytes()), "the SPIFFE id is in the certificate");
        let (same, _) = certs.certificate(&vm, id, t0 + Duration::from_secs(60)).unwrap();
        assert_eq!(same, a, "not due yet: the same certificate");
        assert!(!certs.rotation_due(t0 + Duration::from_secs(2000)));
        assert!(certs.rotation_due(t0 + Duration::from_secs(2401)));
        let (next, root2) = certs.certificate(&vm, id, t0 + Duration::from_secs(2401)).unwrap();
        assert_ne!(next.cert_pem, a.cert_pem, "re-issued after two thirds of its life");
        assert_eq!(root, root2, "same root");
    }

    #[test]
    fn a_kept_ca_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = WorkloadCertificates::new(Duration::from_secs(60), Some(dir.path().into())).authority(&trust("ns/vm")).unwrap();
        let again = WorkloadCertificates::new(Duration::from_secs(60), Some(dir.path().into())).authority(&trust("ns/vm")).unwrap();
        assert_eq!(first.root_pem, again.root_pem);
        again.issue("spiffe://cluster.local/ns/a/sa/b", Duration::from_secs(60), SystemTime::now()).unwrap();
    }

    fn trust(vm: &str) -> MeshTrust {
        MeshTrust { virtual_mesh: vm.into(), trust_domain: "cluster.local".into(), ca: CaSource::Builtin }
    }

    #[test]
    fn kubernetes_mode_signs_only_with_an_installed_ca_and_a_new_one_replaces_old_certificates() {
        let certs = WorkloadCertificates::installed_only(Duration::from_secs(3600));
        let vm = trust("ns/vm");
        let id = "spiffe://cluster.local/ns/a/sa/b";
        assert!(matches!(certs.certificate(&vm, id, SystemTime::now()), Err(CaError::NotLoaded(_))), "no root of its own");
        assert!(certs.install("ns/vm", CertificateAuthority::generate("one").unwrap()));
        let (first, root) = certs.certificate(&vm, id, SystemTime::now()).unwrap();
        let same = CertificateAuthority::from_cacerts(&certs.installed("ns/vm").unwrap().to_cacerts()).unwrap();
        assert!(!certs.install("ns/vm", same), "the same CA read again changes nothing");
        assert!(certs.install("ns/vm", CertificateAuthority::generate("two").unwrap()));
        let (second, root2) = certs.certificate(&vm, id, SystemTime::now()).unwrap();
        assert_ne!(root, root2);
        assert_ne!(first.cert_pem, second.cert_pem, "issued again by the new CA");
    }

    #[test]
    fn a_provided_intermediate_signs_and_chains_up_to_its_root() {
        let root = CertificateAuthority::generate("root").unwrap();
        // An intermediate CA signed by the root, in Istio's cacerts layout.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let inter = params.signed_by(&key, &root.issuer).unwrap().pem();
        let files: std::collections::BTreeMap<String, String> = [
            (CA_CERT_KEY, inter.clone()),
            (CA_KEY_KEY, key.serialize_pem()),
            (ROOT_CERT_KEY, root.root_pem.clone()),
            (CERT_CHAIN_KEY, format!("{inter}{}", root.root_pem)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let ca = CertificateAuthority::from_cacerts(&files).unwrap();
        assert_eq!(ca.root_pem.trim(), root.root_pem.trim());
        assert_eq!(ca.chain_after_leaf().len(), 2, "intermediate, then root");
        let issued = ca.issue("spiffe://cluster.local/ns/a/sa/b", Duration::from_secs(60), SystemTime::now()).unwrap();
        assert_eq!(split_pem(&issued.cert_pem).unwrap().len(), 2, "leaf and intermediate");
        let mut missing = files.clone();
        missing.remove(CA_KEY_KEY);
        assert_eq!(CertificateAuthority::from_cacerts(&missing).unwrap_err().to_string(), "no ca-key.pem");
    }

    #[test]
    fn local_mode_does_not_invent_a_provided_ca() {
        let certs = WorkloadCertificates::new(Duration::from_secs(60), None);
        let vm = MeshTrust { ca: CaSource::Provided { namespace: "istio-system".into(), name: "cacerts".into() }, ..trust("ns/vm") };
        let err = certs.authority(&vm).unwrap_err().to_string();
        assert!(err.contains("Secret istio-system/cacerts") && err.contains("--ca-dir"), "{err}");
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).unwrap()
    }
}
