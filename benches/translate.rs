//! Translation cost at fleet scale: 1,000 services × 3 clusters × 10 endpoints
//! (100 TrafficPolicies), for one sidecar: a full translation, and the
//! incremental cost of one endpoint change (EDS-only patch of a cached set).
//!
//! `cargo bench --bench translate`; numbers and the machine go in docs/performance.md.

use std::collections::BTreeSet;

use criterion::{Criterion, criterion_group, criterion_main};
use meshpilot::fixtures::{ScaleSpec, churn_endpoint, cluster_name, scale_inputs, service_name};
use meshpilot::mesh_provider::patch_endpoints;
use meshpilot::model::policy::LastGood;
use meshpilot::model::{MeshSnapshot, ServiceKey};
use meshpilot::translate::{ProxyScope, translate};

fn bench(c: &mut Criterion) {
    let spec = ScaleSpec { services: 1000, clusters: 3, endpoints: 10, policies: 100, sidecars: false };
    let inputs = scale_inputs(spec);
    let snapshot = MeshSnapshot::build(inputs.clone(), &mut LastGood::default());
    let scope = ProxyScope::sidecar(&cluster_name(0), "ns-0", &[("app", "client")]);
    let full = translate(&snapshot, &scope);
    eprintln!("one sidecar's config: {} resources", full.len());

    let mut g = c.benchmark_group("translate_1000svc_3clusters_10eps");
    g.sample_size(10);
    g.bench_function("snapshot_build_and_validate", |b| b.iter(|| MeshSnapshot::build(inputs.clone(), &mut LastGood::default())));
    g.bench_function("full_sidecar", |b| b.iter(|| translate(&snapshot, &scope)));
    let mut changed_inputs = inputs.clone();
    churn_endpoint(&mut changed_inputs, 1, 0, 1);
    let changed = MeshSnapshot::build(changed_inputs, &mut LastGood::default());
    let keys: BTreeSet<ServiceKey> = [ServiceKey::new(&cluster_name(1), "ns-0", &service_name(0))].into();
    g.bench_function("endpoint_change_eds_patch", |b| b.iter(|| patch_endpoints(&changed, &scope, &full, &keys)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
