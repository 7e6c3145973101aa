//! What a source pays for one endpoint change on the 1,000-service ×
//! 3-cluster × 10-endpoint fixture: the config-dir reload after one service's
//! file is rewritten (the file's parse, the folder's stamps, and the cluster's
//! state rebuilt from its objects with the last build's memo), and the same
//! rebuild of one cluster's state from objects alone (the part the Kubernetes
//! source shares).
//!
//! `cargo bench --bench sources`; numbers and the machine go in docs/performance.md.

use criterion::{Criterion, criterion_group, criterion_main};
use meshpilot::fixtures::{ScaleSpec, cluster_name, service_name, service_yaml};
use meshpilot::sources::file::{Changed, SourceMemory, load_config_dir, load_config_dir_changed};

fn bench(c: &mut Criterion) {
    let spec = ScaleSpec { services: 1000, clusters: 3, endpoints: 10, policies: 100, sidecars: false };
    let dir = tempfile::tempdir().expect("temp dir");
    meshpilot::fixtures::write_config_dir(dir.path(), spec).expect("fixture written");
    let mut memory = SourceMemory::default();
    load_config_dir(dir.path(), &mut memory).expect("first load");

    let mut g = c.benchmark_group("sources_1000svc_3clusters_10eps");
    g.sample_size(20);
    let mut step = 0;
    // As the watcher reloads (the event names the file), and with every file looked at.
    for (name, hinted) in [("config_dir_reload_one_endpoint_change", true), ("config_dir_reload_one_endpoint_change_unhinted", false)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                step += 1;
                let (cluster, service) = (step % 3, (step * 7919) % 1000);
                let path = dir.path().join(cluster_name(cluster)).join(format!("{}.yaml", service_name(service)));
                std::fs::write(&path, service_yaml(cluster, service, 10, step)).expect("rewritten");
                let changed = if hinted { Changed::of_paths(dir.path(), [path.as_path()]) } else { Changed::Everything };
                load_config_dir_changed(dir.path(), &mut memory, &changed).expect("reload")
            })
        });
    }
    g.bench_function("config_dir_reload_nothing_changed", |b| b.iter(|| load_config_dir(dir.path(), &mut memory).expect("reload")));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
