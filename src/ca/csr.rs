//! Signing a workload's certificate signing request for the identity it
//! proved, as Istio's CA does for `pilot-agent`: the key stays with the
//! workload, and the certificate names exactly one identity, the caller's.
//! Pure: the CA, the CSR, the proven identity and the clock come in; a
//! certificate chain or the reason for refusing goes out.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateSigningRequestParams, DistinguishedName, IsCa, KeyUsagePurpose, SanType};

use super::CertificateAuthority;

/// The longest workload certificate signed on request (istiod's
/// `MAX_WORKLOAD_CERT_TTL` default, 90 days); a longer request is refused.
pub const MAX_REQUESTED_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// Why a CSR was not signed; each message says what was asked and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is not a PEM-encoded PKCS #10 request with a valid signature ({0})")]
    Malformed(String),
    #[error("the CSR names {found} subject alternative names ({names}); exactly one is signed, the caller's SPIFFE id {expected}")]
    SanCount { found: usize, names: String, expected: String },
    #[error("the CSR asks for {requested}, but the caller proved {expected}")]
    WrongIdentity { requested: String, expected: String },
    #[error("the CSR asks for a CA certificate; workloads get leaf certificates only")]
    WantsCa,
    #[error("validity_duration {requested_secs}s is over the {max_secs}s allowed")]
    TtlTooLong { requested_secs: i64, max_secs: u64 },
    #[error("signing failed: {0}")]
    Signing(String),
}

/// A signed workload certificate: the chain the caller gets (leaf first,
/// the root last, as Istio's agent reads it) and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedChain {
    pub chain: Vec<String>,
    pub expires_at: SystemTime,
}

/// Signs `csr_pem` for `spiffe_id` when the CSR asks for exactly that one
/// identity. `requested_secs` is the request's `validity_duration` (0 or
/// less: `default_ttl`); over [`MAX_REQUESTED_TTL`] is refused.
pub fn sign_csr(
    ca: &CertificateAuthority,
    csr_pem: &str,
    spiffe_id: &str,
    requested_secs: i64,
    default_ttl: Duration,
    now: SystemTime,
) -> Result<SignedChain, CsrError> {
    let ttl = match requested_secs {
        s if s <= 0 => default_ttl,
        s if s as u64 > MAX_REQUESTED_TTL.as_secs() => {
            return Err(CsrError::TtlTooLong { requested_secs: s, max_secs: MAX_REQUESTED_TTL.as_secs() });
        }
        s => Duration::from_secs(s as u64),
    };
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CsrError::Malformed(e.to_string()))?;
    let names: Vec<String> = csr.params.subject_alt_names.iter().map(san_text).collect();
    if names.len() != 1 {
        return Err(CsrError::SanCount { found: names.len(), names: names.join(", "), expected: spiffe_id.to_string() });
    }
    if names[0] != spiffe_id {
        return Err(CsrError::WrongIdentity { requested: names[0].clone(), expected: spiffe_id.to_string() });
    }
    if matches!(csr.params.is_ca, IsCa::Ca(_)) {
        return Err(CsrError::WantsCa);
    }
    // The certificate's contents are the CA's choice; only the key and the
    // (checked) identity come from the request.
    let params = &mut csr.params;
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().map_err(|e: rcgen::Error| CsrError::Signing(e.to_string()))?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(60));
    params.not_after = time::OffsetDateTime::from(now + ttl);
    let cert = ca.sign_request(&csr).map_err(|e| CsrError::Signing(e.to_string()))?;
    Ok(SignedChain { chain: std::iter::once(cert).chain(ca.chain_after_leaf()).collect(), expires_at: now + ttl })
}

/// A CSR naming `uris` (URI SANs) for a P-256 key made for it and thrown
/// away: for the load generator, benchmarks and tests, which never use the
/// certificate (a workload keeps its key).
pub fn throwaway_request(uris: &[&str]) -> Result<String, rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = uris.iter().map(|u| Ok(SanType::URI((*u).try_into()?))).collect::<Result<_, rcgen::Error>>()?;
    params.serialize_request(&key)?.pem()
}

fn san_text(san: &SanType) -> String {
    match san {
        SanType::URI(uri) => uri.as_str().to_string(),
        SanType::DnsName(name) => format!("DNS:{}", name.as_str()),
        SanType::Rfc822Name(name) => format!("email:{}", name.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";

    fn csr(sans: &[&str]) -> String {
        throwaway_request(sans).unwrap()
    }

    fn ca() -> CertificateAuthority {
        CertificateAuthority::generate("test").unwrap()
    }

    #[test]
    fn a_csr_for_the_proven_identity_is_signed_leaf_first_root_last() {
        let ca = ca();
        let now = SystemTime::now();
        let signed = sign_csr(&ca, &csr(&[ID]), ID, 3600, Duration::from_secs(86400), now).unwrap();
        assert_eq!(signed.chain.len(), 2);
        assert_eq!(signed.chain[1], ca.root_pem);
        assert_eq!(signed.expires_at, now + Duration::from_secs(3600));
        let leaf = x509_parser::pem::parse_x509_pem(signed.chain[0].as_bytes()).unwrap().1;
        let cert = leaf.parse_x509().unwrap();
        let sans: Vec<String> = cert.subject_alternative_name().unwrap().unwrap().value.general_names.iter().map(|n| n.to_string()).collect();
        assert_eq!(sans, [format!("URI({ID})")]);
        assert!(!cert.is_ca());
        let root = x509_parser::pem::parse_x509_pem(ca.root_pem.as_bytes()).unwrap().1;
        cert.verify_signature(Some(root.parse_x509().unwrap().public_key())).expect("signed by the root");
        // No validity asked: the default.
        let signed = sign_csr(&ca, &csr(&[ID]), ID, 0, Duration::from_secs(86400), now).unwrap();
        assert_eq!(signed.expires_at, now + Duration::from_secs(86400));
    }

    #[test]
    fn another_identity_two_identities_garbage_and_a_long_life_are_refused_with_the_reason() {
        let ca = ca();
        let now = SystemTime::now();
        let ttl = Duration::from_secs(86400);
        let other = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews";
        assert_eq!(sign_csr(&ca, &csr(&[other]), ID, 0, ttl, now), Err(CsrError::WrongIdentity { requested: other.into(), expected: ID.into() }));
        let two = sign_csr(&ca, &csr(&[ID, other]), ID, 0, ttl, now).unwrap_err();
        assert!(matches!(two, CsrError::SanCount { found: 2, .. }), "{two}");
        assert!(two.to_string().contains(other) && two.to_string().contains("exactly one"), "{two}");
        assert!(matches!(sign_csr(&ca, &csr(&[]), ID, 0, ttl, now), Err(CsrError::SanCount { found: 0, .. })));
        assert!(matches!(
            sign_csr(&ca, "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", ID, 0, ttl, now),
            Err(CsrError::Malformed(_))
        ));
        assert!(matches!(sign_csr(&ca, "not a csr", ID, 0, ttl, now), Err(CsrError::Malformed(_))));
        let long = sign_csr(&ca, &csr(&[ID]), ID, 91 * 86400, ttl, now).unwrap_err();
        assert!(long.to_string().contains("7862400s is over the 7776000s allowed"), "{long}");
    }

    #[test]
    fn an_rsa_2048_csr_as_istios_agent_makes_by_default_is_signed() {
        // `openssl req -new -newkey rsa:2048 -subj /O=Istio -addext subjectAltName=URI:<ID>` (the key was thrown away).
        let pem = include_str!("testdata/rsa2048-productpage.csr");
        let signed = sign_csr(&ca(), pem, ID, 0, Duration::from_secs(3600), SystemTime::now()).unwrap();
        let leaf = x509_parser::pem::parse_x509_pem(signed.chain[0].as_bytes()).unwrap().1;
        assert_eq!(leaf.parse_x509().unwrap().public_key().algorithm.algorithm.to_id_string(), "1.2.840.113549.1.1.1", "an RSA key");
    }

    #[test]
    fn a_csr_whose_signature_does_not_match_its_key_is_refused() {
        let pem = csr(&[ID]);
        // Flip one byte inside the signature (the end of the DER).
        let der = pem::parse(&pem).unwrap();
        let mut bytes = der.contents().to_vec();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x01;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", bytes));
        let err = sign_csr(&ca(), &tampered, ID, 0, Duration::from_secs(60), SystemTime::now()).unwrap_err();
        assert!(matches!(err, CsrError::Malformed(_)), "{err}");
    }
}
