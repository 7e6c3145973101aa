//! Translation cost at fleet scale: 1,000 services × 3 clusters × 10 endpoints
//! (100 TrafficPolicies), for one sidecar: a full translation (explicit
//! loopback layout and Istio's captured one), and the incremental cost of one
//! endpoint change (EDS-only patch of a cached set) and of one weight change
//! (a translation that finds the pieces it did not touch in the last
//! snapshot's memo). Prints each layout's per-proxy size by type.
//!
//! `cargo bench --bench translate`; numbers and the machine go in docs/performance.md.

use std::collections::BTreeSet;

use criterion::{Criterion, criterion_group, criterion_main};
use meshpilot::fixtures::{ScaleSpec, churn_endpoint, cluster_name, scale_inputs, service_name};
use meshpilot::model::policy::LastGood;
use meshpilot::model::{MeshSnapshot, ServiceKey};
use meshpilot::translate::memo::{EndpointSeed, Memo, TranslationMemo};
use meshpilot::translate::patch::{patch_endpoints, patch_routes};
use meshpilot::translate::{ProxyScope, client_network, translate, translate_with};
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

    // One weight: what the provider does per scope on a policy change.
    let mut shifted_inputs = inputs.clone();
    shifted_inputs.traffic_policies[0].spec.traffic_shift.as_mut().expect("a shift").destinations[0].weight += 20;
    let shifted = MeshSnapshot::build(shifted_inputs, &mut LastGood::default());
    let vhds_scope = ProxyScope { vhds: true, ..captured_scope.clone() };
    // Per scope, as the provider does it: the memo the last snapshot's
    // translations filled (the same one, kept across policy changes) and
    // the assignments of the cached set.
    for (name, scope) in [("weight_change_with_memo", &scope), ("weight_change_with_memo_captured_vhds", &vhds_scope)] {
        let memo = TranslationMemo::default();
        let before = translate_with(&snapshot, scope, &Memo::of(&memo, 1));
        let network = client_network(&snapshot, scope).to_string();
        let seed: EndpointSeed = [((scope.cluster.clone(), network), before.of_type(ResourceType::Endpoint).clone().into_iter().collect())].into();
        g.bench_function(name, |b| b.iter(|| translate_with(&shifted, scope, &Memo { endpoints: Some(&seed), ..Memo::of(&memo, 2) })));
        // The provider's path when only rules changed: the cached set patched.
        let changed = meshpilot::model::diff::services_with_changed_rules(&snapshot, &shifted);
        let patched = name.replace("with_memo", "patched");
        g.bench_function(patched, |b| {
            b.iter(|| patch_routes((&snapshot, &shifted), scope, &before, &changed, &Memo::of(&memo, 2)).expect("patchable"))
        });
    }
    g.bench_function("weight_change_captured_vhds_without_memo", |b| b.iter(|| translate(&shifted, &vhds_scope)));

    // Access control: enforced, 100 AccessControlPolicies, against none; a
    // captured sidecar of svc-00000 (which one policy lets svc-00001 call).
    let mut enforced_inputs = inputs.clone();
    meshpilot::fixtures::with_access_control(&mut enforced_inputs, spec, 100);
    let enforced = MeshSnapshot::build(enforced_inputs.clone(), &mut LastGood::default());
    assert_eq!(enforced.access_policies.len(), 100, "{:?}", enforced.mesh_object_status.values().find(|s| !s.messages.is_empty()));
    let workload =
        ProxyScope::captured_sidecar(&cluster_name(0), "ns-0", &[("app", "svc-00000")], "svc-00000", &meshpilot::fixtures::endpoint_address(0, 0, 0));
    let lds_bytes = |set: &ResourceSet| set.of_type(ResourceType::Listener).values().map(|r| r.encoded_any().len()).sum::<usize>();
    for (what, s) in [("no access control", &snapshot), ("100 AccessControlPolicies enforced", &enforced)] {
        let set = translate(s, &workload);
        eprintln!("svc-00000's sidecar, {what}: {} (LDS {} bytes)", sizes(&set), lds_bytes(&set));
    }
    g.bench_function("snapshot_build_and_validate_100_access_policies", |b| {
        b.iter(|| MeshSnapshot::build(enforced_inputs.clone(), &mut LastGood::default()))
    });
    g.bench_function("full_captured_sidecar_of_a_workload", |b| b.iter(|| translate(&snapshot, &workload)));
    g.bench_function("full_captured_sidecar_of_a_workload_100_access_policies", |b| b.iter(|| translate(&enforced, &workload)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
