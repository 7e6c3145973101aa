//! Translation cost at fleet scale: 1,000 services × 3 clusters × 10 endpoints
//! (100 TrafficPolicies), for one sidecar: a full translation (explicit
//! loopback layout and Istio's captured one), and the incremental cost of one
//! endpoint change (EDS-only patch of a cached set). Prints each layout's
//! per-proxy size by type.
//!
//! `cargo bench --bench translate`; numbers and the machine go in docs/performance.md.

use std::collections::BTreeSet;

use criterion::{Criterion, criterion_group, criterion_main};
use meshpilot::fixtures::{ScaleSpec, churn_endpoint, cluster_name, scale_inputs, service_name};
use meshpilot::mesh_provider::patch_endpoints;
use meshpilot::model::policy::LastGood;
use meshpilot::model::{MeshSnapshot, ServiceKey};
use meshpilot::translate::{ProxyScope, translate};
use meshpilot::xds::resources::{ResourceSet, ResourceType};

/// `CDS 1,234 KiB (3,001) …`: encoded bytes and resources per type.
fn sizes(set: &ResourceSet) -> String {
    let mut total = 0;
    let mut parts = Vec::new();
    for ty in ResourceType::PUSH_ORDER {
        let of = set.of_type(ty);
        let bytes: usize = of.values().map(|r| r.encoded_any().len()).sum();
        total += bytes;
        if !of.is_empty() {
            parts.push(format!("{} {:.0} KiB ({})", ty.short_name(), bytes as f64 / 1024.0, of.len()));
        }
    }
    format!("{:.0} KiB: {}", total as f64 / 1024.0, parts.join(", "))
}

fn bench(c: &mut Criterion) {
    let spec = ScaleSpec { services: 1000, clusters: 3, endpoints: 10, policies: 100, sidecars: false };
    let inputs = scale_inputs(spec);
    let snapshot = MeshSnapshot::build(inputs.clone(), &mut LastGood::default());
    let scope = ProxyScope::sidecar(&cluster_name(0), "ns-0", &[("app", "client")]);
    let full = translate(&snapshot, &scope);
    let captured_scope = ProxyScope::captured_sidecar(&cluster_name(0), "ns-0", &[("app", "client")], "default", "10.0.0.1");
    let captured = translate(&snapshot, &captured_scope);
    eprintln!("one sidecar's config, explicit layout: {}", sizes(&full));
    eprintln!("one sidecar's config, captured layout: {}", sizes(&captured));

    let mut g = c.benchmark_group("translate_1000svc_3clusters_10eps");
    g.sample_size(10);
    g.bench_function("snapshot_build_and_validate", |b| b.iter(|| MeshSnapshot::build(inputs.clone(), &mut LastGood::default())));
    g.bench_function("full_sidecar", |b| b.iter(|| translate(&snapshot, &scope)));
    g.bench_function("full_captured_sidecar", |b| b.iter(|| translate(&snapshot, &captured_scope)));
    let mut changed_inputs = inputs.clone();
    churn_endpoint(&mut changed_inputs, 1, 0, 1);
    let changed = MeshSnapshot::build(changed_inputs, &mut LastGood::default());
    let keys: BTreeSet<ServiceKey> = [ServiceKey::new(&cluster_name(1), "ns-0", &service_name(0))].into();
    g.bench_function("endpoint_change_eds_patch", |b| b.iter(|| patch_endpoints(&changed, &scope, &full, &keys)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
