//! The CA's side of Istio's certificate API, without the TokenReview round
//! trip: signing one workload CSR (Istio's agent sends RSA 2048 by default;
//! ECDSA P-256 when configured) with a P-256 root, and the TLS xDS
//! listener's own certificate. With the round trip to a real kube-apiserver:
//! `meshpilot load --certificate-requests` (docs/performance.md).
//!
//! `cargo bench --bench ca`.

use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use meshpilot::ca::CertificateAuthority;
use meshpilot::ca::csr::sign_csr;

const ID: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";

fn bench(c: &mut Criterion) {
    let ca = CertificateAuthority::generate("bench").unwrap();
    let ecdsa = meshpilot::ca::csr::throwaway_request(&[ID]).unwrap();
    let rsa = include_str!("../src/ca/testdata/rsa2048-productpage.csr");
    let ttl = Duration::from_secs(86400);
    c.bench_function("sign_csr ECDSA P-256", |b| b.iter(|| sign_csr(&ca, &ecdsa, ID, 0, ttl, SystemTime::now()).unwrap()));
    c.bench_function("sign_csr RSA 2048 (Istio's default)", |b| b.iter(|| sign_csr(&ca, rsa, ID, 0, ttl, SystemTime::now()).unwrap()));
    let names = meshpilot::ca::serving::default_names(&[]);
    c.bench_function("issue the TLS listener's certificate", |b| b.iter(|| ca.issue_server(&names, ttl, SystemTime::now()).unwrap()));
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
