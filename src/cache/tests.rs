use super::*;
use crate::model::ServiceKey;
use crate::model::policy::PolicyState;
use crate::sources::file::{SourceMemory, load_config_dir};

/// The bookinfo example, loaded once (policy ages are first-seen times, so a reload would age them).
fn inputs() -> MeshInputs {
    static LOADED: std::sync::OnceLock<MeshInputs> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bookinfo");
            load_config_dir(&dir, &mut SourceMemory::default()).unwrap()
        })
        .clone()
}

/// A mesh cache with the bookinfo example loaded, its first change notice
/// taken, and the channel of the ones to come.
fn loaded() -> (MeshResources, tokio::sync::mpsc::UnboundedReceiver<std::time::Instant>) {
    let (notifier, mut changes) = ChangeNotifier::channel();
    let mesh = MeshResources::new(notifier);
    mesh.update(inputs());
    let _ = changes.try_recv();
    (mesh, changes)
}

fn node(cluster: &str, app: &str) -> ProxyNode {
    ProxyNode {
        id: format!("{app}-1"),
        cluster: cluster.into(),
        namespace: "default".into(),
        network: String::new(),
        role: crate::xds::node::ProxyRole::Sidecar,
        labels: Arc::new([("app".to_string(), app.to_string())].into()),
        outbound_bind: None,
        interception: crate::xds::node::InterceptionMode::None,
        service_account: "default".into(),
        instance_ips: Vec::new(),
        app_address: None,
        envoy_version: String::new(),
        delta_ads: false,
        istio_version: None,
        identity: crate::xds::node::StreamIdentity::SelfAsserted,
    }
}

#[test]
fn an_endpoint_change_patches_eds_exactly_as_a_full_translation_would() {
    let (notifier, mut changes) = ChangeNotifier::channel();
    let mesh = MeshResources::new(notifier);
    mesh.update(inputs());
    assert!(mesh.is_ready() && changes.try_recv().is_ok());
    let nodes = [node("management-plane", "productpage"), node("remote-cluster", "ratings")];
    let before: Vec<_> = nodes.iter().map(|n| mesh.resources_for(n)).collect();
    assert!(Arc::ptr_eq(&before[0], &mesh.resources_for(&nodes[0])), "one translation per scope");

    // reviews-v3 gets a second endpoint in remote-cluster; v1 becomes unready.
    let mut next = inputs();
    let remote = Arc::make_mut(next.clusters.get_mut("remote-cluster").unwrap());
    let eps = Arc::make_mut(remote.endpoints.get_mut(&("default".to_string(), "reviews".to_string())).unwrap());
    let mut extra = eps[0].clone();
    extra.address = "127.0.20.24".into();
    eps.push(extra);
    let local = Arc::make_mut(next.clusters.get_mut("management-plane").unwrap());
    Arc::make_mut(local.endpoints.get_mut(&("default".to_string(), "reviews".to_string())).unwrap())[0].ready = false;
    let snapshot_before = mesh.snapshot();
    let expected = MeshSnapshot::build(next.clone(), &mut LastGood::default());
    assert_eq!(
        classify_change(&snapshot_before, &expected),
        SnapshotChange::Endpoints(
            [ServiceKey::new("management-plane", "default", "reviews"), ServiceKey::new("remote-cluster", "default", "reviews")].into()
        )
    );
    mesh.update(next);
    assert!(changes.try_recv().is_ok(), "an endpoint change is pushed");
    for (i, n) in nodes.iter().enumerate() {
        let patched = mesh.resources_for(n);
        let full = translate::translate(&mesh.snapshot(), &scope_of(n));
        assert_eq!(*patched, full, "patched EDS equals a full translation for {}", n.id);
        assert_ne!(*patched, *before[i]);
        for ty in [ResourceType::Cluster, ResourceType::Listener, ResourceType::Route] {
            for (name, r) in patched.of_type(ty) {
                assert!(Arc::ptr_eq(r, &before[i].of_type(ty)[name]), "{ty} {name} is shared, not rebuilt");
            }
        }
    }
}

#[test]
fn a_captured_proxys_own_endpoint_appearing_gives_it_its_inbound_side() {
    let (notifier, mut changes) = ChangeNotifier::channel();
    let mesh = MeshResources::new(notifier);
    // productpage's sidecar connects before its pod is an endpoint (not ready yet).
    let mut starting = inputs();
    let local = Arc::make_mut(starting.clusters.get_mut("management-plane").unwrap());
    let ip = local.endpoints[&("default".to_string(), "productpage".to_string())][0].address.clone();
    local.endpoints.remove(&("default".to_string(), "productpage".to_string()));
    mesh.update(starting);
    let _ = changes.try_recv();
    let proxy =
        ProxyNode { interception: crate::xds::node::InterceptionMode::Redirect, instance_ips: vec![ip], ..node("management-plane", "productpage") };
    assert!(mesh.resources_for(&proxy).get(ResourceType::Cluster, "inbound|9080||").is_none());
    mesh.update(inputs());
    assert!(changes.try_recv().is_ok());
    let after = mesh.resources_for(&proxy);
    assert!(after.get(ResourceType::Cluster, "inbound|9080||").is_some(), "the pod's port is served once it is an endpoint");
    assert_eq!(*after, translate::translate(&mesh.snapshot(), &scope_of(&proxy)));
}

#[test]
fn captured_replicas_at_different_addresses_share_one_translation() {
    let (notifier, _changes) = ChangeNotifier::channel();
    let mesh = MeshResources::new(notifier);
    mesh.update(inputs());
    let snapshot = mesh.snapshot();
    let reviews = &snapshot.clusters["management-plane"].endpoints[&("default".to_string(), "reviews".to_string())];
    let replica = |i: usize| ProxyNode {
        id: format!("reviews-{i}"),
        interception: crate::xds::node::InterceptionMode::Redirect,
        instance_ips: vec![reviews[i].address.clone()],
        ..node("management-plane", "reviews")
    };
    let (a, b) = (mesh.resources_for(&replica(0)), mesh.resources_for(&replica(1)));
    assert!(Arc::ptr_eq(&a, &b), "one translation for both replicas");
    assert!(a.get(ResourceType::Cluster, "inbound|9080||").is_some(), "each serves 9080");
    assert_eq!(*a, translate::translate(&snapshot, &scope_of(&replica(0))), "the same resources as translating its own addresses");
    // A proxy at an address that serves nothing is another scope (no inbound port).
    let idle = ProxyNode { instance_ips: vec!["10.255.0.1".into()], ..replica(0) };
    let other = mesh.resources_for(&idle);
    assert!(!Arc::ptr_eq(&a, &other) && other.get(ResourceType::Cluster, "inbound|9080||").is_none());
}

#[test]
fn unchanged_inputs_do_not_push_and_policy_changes_retranslate() {
    let (mesh, mut changes) = loaded();
    let n = node("management-plane", "productpage");
    let first = mesh.resources_for(&n);
    mesh.update(inputs());
    assert!(changes.try_recv().is_err(), "nothing changed, nothing pushed");
    assert!(Arc::ptr_eq(&first, &mesh.resources_for(&n)));
    let mut no_policy = inputs();
    no_policy.traffic_policies.clear();
    mesh.update(no_policy);
    assert!(changes.try_recv().is_ok());
    let after = mesh.resources_for(&n);
    assert!(after.get(ResourceType::Cluster, "outbound|9080|version-v1|reviews.default.svc.cluster.local").is_none());
    assert!(first.get(ResourceType::Cluster, "outbound|9080|version-v1|reviews.default.svc.cluster.local").is_some());
}

#[test]
fn a_sidecar_change_retranslates_the_proxies_it_scopes() {
    let (mesh, mut changes) = loaded();
    let n = node("management-plane", "productpage");
    let ratings = "outbound|9080||ratings.default.svc.cluster.local";
    assert!(mesh.resources_for(&n).get(ResourceType::Cluster, ratings).is_some());
    let mut scoped = inputs();
    let selector: &[(&str, &str)] = &[("app", "productpage")];
    scoped.sidecars.push(crate::model::sidecar::sidecar_object(
        "default",
        "productpage",
        "test",
        Some(selector),
        &["./reviews.default.svc.cluster.local"],
    ));
    let details = node("management-plane", "details");
    let _ = mesh.resources_for(&details);
    mesh.update(scoped);
    assert!(changes.try_recv().is_ok(), "a Sidecar change pushes");
    // The selector reads a label no policy read before: productpage and
    // details (one scope until now) are translated apart, before the push.
    let generation = mesh.current.read().unwrap().generation;
    for (proxy, scoped) in [(&n, true), (&details, false)] {
        let scope = scope_of(proxy).resolved(&mesh.snapshot());
        let cached = mesh.cache.get(&scope).map(|e| (e.0, e.1.clone())).expect("translated in update");
        assert_eq!(cached.0, generation);
        let set = mesh.resources_for(proxy);
        assert!(Arc::ptr_eq(&set, &cached.1), "the push is a cache hit");
        assert_eq!(set.get(ResourceType::Cluster, ratings).is_none(), scoped);
    }
    let after = mesh.resources_for(&n);
    assert!(after.get(ResourceType::Cluster, "outbound|9080||reviews.default.svc.cluster.local").is_some());
}

#[test]
fn a_full_change_translates_the_served_scopes_before_it_is_published() {
    let (mesh, mut changes) = loaded();
    let served = node("management-plane", "productpage");
    let other = node("remote-cluster", "reviews");
    let first = mesh.resources_for(&served);
    let mut no_policy = inputs();
    no_policy.traffic_policies.clear();
    mesh.update(no_policy.clone());
    assert!(changes.try_recv().is_ok());
    // Already translated for the new snapshot when the push is announced.
    let generation = mesh.current.read().unwrap().generation;
    let scope = scope_of(&served).resolved(&mesh.snapshot());
    let cached = mesh.cache.get(&scope).map(|e| (e.0, e.1.clone())).expect("translated in update");
    assert_eq!(cached.0, generation);
    assert!(!Arc::ptr_eq(&cached.1, &first));
    assert!(cached.1.get(ResourceType::Cluster, "outbound|9080|version-v1|reviews.default.svc.cluster.local").is_none());
    assert!(Arc::ptr_eq(&cached.1, &mesh.resources_for(&served)), "the push is a cache hit");
    // As a lazy translation would have made it.
    let lazy = MeshResources::new(ChangeNotifier::channel().0);
    lazy.update(no_policy);
    let lazy_set = lazy.resources_for(&served);
    for ty in ResourceType::PUSH_ORDER.into_iter().filter(|t| *t != ResourceType::Secret) {
        assert_eq!(lazy_set.view(ty, None).version, cached.1.view(ty, None).version, "{ty}");
    }
    // A scope no proxy asked for is not translated.
    assert_eq!(mesh.cache.len(), 1);
    let _ = mesh.resources_for(&other);
    assert_eq!(mesh.cache.len(), 2);
}

/// Syncs a delta ADS stream as Envoy does (CDS and LDS wildcard, EDS and
/// RDS by name, VHDS by route configuration name), ACKing every response.
fn synced_delta_stream(res: &ResourceSet, now: std::time::Instant) -> crate::xds::delta::DeltaStream {
    use crate::xds::delta::{DeltaRequest, DeltaStream};
    let mut stream = DeltaStream::new_ads();
    let names = |ty: ResourceType| res.of_type(ty).keys().map(|n| bytes::Bytes::copy_from_slice(n.as_bytes())).collect::<Vec<_>>();
    for (ty, subscribe) in [
        (ResourceType::Cluster, Vec::new()),
        (ResourceType::Endpoint, names(ResourceType::Endpoint)),
        (ResourceType::Listener, Vec::new()),
        (ResourceType::Route, names(ResourceType::Route)),
        (ResourceType::VirtualHost, names(ResourceType::Route)),
    ] {
        let request = DeltaRequest { type_url: ty.type_url().into(), resource_names_subscribe: subscribe, ..Default::default() };
        for response in stream.on_request(&request, res, now).unwrap().responses {
            let ack = DeltaRequest { type_url: response.type_url.into(), response_nonce: response.nonce.clone(), ..Default::default() };
            assert!(stream.on_request(&ack, res, now).unwrap().responses.is_empty());
        }
    }
    stream
}

#[test]
fn a_weight_change_sends_a_delta_ads_proxy_only_the_changed_virtual_host() {
    use crate::fixtures::{ScaleSpec, scale_inputs};
    let mesh = MeshResources::new(ChangeNotifier::channel().0);
    let mut inputs = scale_inputs(ScaleSpec { services: 1000, clusters: 3, endpoints: 2, policies: 20, sidecars: false });
    mesh.update(inputs.clone());
    let now = std::time::Instant::now();
    let mut sent_for_one_change = Vec::new();
    for cluster in ["cluster-0", "cluster-1"] {
        let proxy = ProxyNode { delta_ads: true, interception: crate::xds::node::InterceptionMode::Redirect, ..node(cluster, "svc-00001") };
        let before = mesh.resources_for(&proxy);
        assert_eq!(before.of_type(ResourceType::VirtualHost).len(), 3000 + 1, "every service's virtual host, and allow_any");
        assert!(before.of_type(ResourceType::Route).values().all(|r| r.encoded_any().len() < 200), "route configurations carry no hosts");
        sent_for_one_change.push((proxy, synced_delta_stream(&before, now)));
    }
    // shift-0 (svc-00000 of cluster-0): 50/50 becomes 70/50.
    let shift = inputs.traffic_policies[0].spec.traffic_shift.as_mut().unwrap();
    shift.destinations[0].weight = 70;
    mesh.update(inputs);
    for (proxy, mut stream) in sent_for_one_change {
        let after = mesh.resources_for(&proxy);
        let pushed = stream.on_push(&after, now, now).responses;
        let sent: Vec<_> = pushed.iter().flat_map(|r| r.to_message().resources).map(|r| r.name).collect();
        let host = if proxy.cluster == "cluster-0" { "svc-00000.ns-0.svc.cluster.local" } else { "svc-00000.ns-0.svc.cluster-0.global" };
        assert_eq!(sent, [format!("9080/{host}:9080")], "{}: only the changed virtual host", proxy.cluster);
        assert!(pushed.iter().all(|r| r.type_url == ResourceType::VirtualHost.type_url() && r.removed_resources.is_empty()));
        let bytes: usize = pushed.iter().map(|r| r.resources.len()).sum();
        let whole_port: usize = after.of_type(ResourceType::VirtualHost).values().map(|r| r.encoded_any().len()).sum();
        assert!(bytes < 2048, "{}: {bytes} bytes sent for one weight (the port's hosts: {whole_port})", proxy.cluster);
    }
}

#[test]
fn a_policy_change_builds_only_the_pieces_it_touched_and_the_same_resources_as_a_fresh_translation() {
    use crate::fixtures::{ScaleSpec, churn_endpoint, scale_inputs};
    use crate::xds::node::InterceptionMode;
    let mesh = MeshResources::new(ChangeNotifier::channel().0);
    let mut inputs = scale_inputs(ScaleSpec { services: 300, clusters: 3, endpoints: 2, policies: 20, sidecars: false });
    mesh.update(inputs.clone());
    // SotW and delta ADS, explicit and captured, in two clusters and namespaces.
    let proxies: Vec<ProxyNode> = [("cluster-0", "svc-00001", false), ("cluster-1", "svc-00002", true), ("cluster-2", "svc-00003", true)]
        .into_iter()
        .flat_map(|(cluster, app, delta)| {
            let explicit = ProxyNode { delta_ads: delta, ..node(cluster, app) };
            let captured = ProxyNode { interception: InterceptionMode::Redirect, namespace: "ns-3".into(), ..explicit.clone() };
            [explicit, captured]
        })
        .collect();
    for p in &proxies {
        let _ = mesh.resources_for(p);
    }
    // One weight, and in the same update one endpoint of another service.
    inputs.traffic_policies[0].spec.traffic_shift.as_mut().unwrap().destinations[0].weight = 70;
    churn_endpoint(&mut inputs, 1, 7, 1);
    let (old, expected) = (mesh.snapshot(), MeshSnapshot::build(inputs.clone(), &mut LastGood::default()));
    assert_eq!(classify_change(&old, &expected), SnapshotChange::Config([ServiceKey::new("cluster-1", "ns-7", "svc-00007")].into()));
    let memo = mesh.current.read().unwrap().memo.clone();
    let before = memo.built().read();
    mesh.update(inputs.clone());
    assert!(Arc::ptr_eq(&memo, &mesh.current.read().unwrap().memo), "the memo outlives a policy change");
    let after = memo.built().read();
    let (hosts, clusters, endpoints) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    let fresh = MeshResources::new(ChangeNotifier::channel().0);
    fresh.update(inputs.clone());
    // Per scope: the shifted service's virtual host; the assignments of
    // the changed endpoints and of subsets (built again: a subset's name
    // does not name its labels); nothing else.
    let scopes = proxies.len() as u64;
    assert!(hosts <= scopes, "{hosts} virtual hosts built for one weight across {scopes} scopes");
    assert_eq!(clusters, 0, "no cluster changed");
    let rebuilt = |p: &ProxyNode| {
        let set = fresh.resources_for(p);
        let names = set.of_type(ResourceType::Endpoint).keys();
        names
            .filter(|n| !n.contains("||") || n.ends_with("|svc-00007.ns-7.svc.cluster-1.global") || n.ends_with("|svc-00007.ns-7.svc.cluster.local"))
            .count()
    };
    let at_most: usize = proxies.iter().map(rebuilt).sum();
    assert!(endpoints as usize <= at_most, "{endpoints} endpoint assignments built, {at_most} expected at most");
    let whole: usize = proxies.iter().map(|p| fresh.resources_for(p).of_type(ResourceType::Endpoint).len()).sum();
    assert!(endpoints as usize * 10 < whole, "{endpoints} of {whole} assignments built");
    let same_as_fresh = |mesh: &MeshResources, fresh: &MeshResources| {
        for p in &proxies {
            let (incremental, whole) = (mesh.resources_for(p), fresh.resources_for(p));
            for ty in ResourceType::PUSH_ORDER.into_iter().filter(|t| *t != ResourceType::Secret) {
                assert_eq!(incremental.of_type(ty), whole.of_type(ty), "{} {}: {ty}", p.cluster, p.id);
            }
        }
    };
    same_as_fresh(&mesh, &fresh);

    // Policies alone: a weight, and another policy's subset (its old
    // subset's cluster goes, the new one comes). Every scope is patched,
    // not walked, and still gets what a fresh provider gives.
    let patches = mesh.counters.scope_patches.get();
    inputs.traffic_policies[0].spec.traffic_shift.as_mut().unwrap().destinations[0].weight = 30;
    inputs.traffic_policies[3].spec.traffic_shift.as_mut().unwrap().destinations[0].subset = [("version".to_string(), "v2".to_string())].into();
    mesh.update(inputs.clone());
    let scopes: BTreeSet<ProxyScope> = proxies.iter().map(|p| scope_of(p).resolved(&mesh.snapshot())).collect();
    assert_eq!(mesh.counters.scope_patches.get() - patches, scopes.len() as u64, "every scope patched, SotW and delta");
    let fresh = MeshResources::new(ChangeNotifier::channel().0);
    fresh.update(inputs);
    same_as_fresh(&mesh, &fresh);
    let moved = proxies.iter().map(|p| mesh.resources_for(p));
    let subset = |set: &ResourceSet, v: &str| set.of_type(ResourceType::Cluster).keys().any(|n| n.contains(&format!("|version-{v}|svc-00003.")));
    assert!(moved.into_iter().all(|set| subset(&set, "v2") && !subset(&set, "v1")), "the subset moved in the patched sets");
}

#[test]
fn a_rejection_only_blames_policies_that_reach_the_proxy_that_rejected() {
    let mesh = MeshResources::new(ChangeNotifier::channel().0);
    let re = "^/(a|b)+$";
    let spec = format!(
        "sourceSelector: {{labels: {{app: productpage}}}}\ndestinationSelector: {{serviceRefs: {{services: [{{cluster: management-plane, name: reviews, namespace: default}}]}}}}\nhttpRequestMatchers: [{{regex: '{re}'}}]\nrequestTimeout: 2s\n"
    );
    let mut inputs = inputs();
    inputs.traffic_policies.push(crate::model::PolicyObject {
        namespace: "service-mesh-hub".into(),
        name: "from-productpage".into(),
        generation: Some(1),
        created_ms: 1,
        origin: "test".into(),
        spec: serde_yaml_ng::from_str(&spec).unwrap(),
        parse_errors: vec![],
    });
    mesh.update(inputs);
    let state = |mesh: &MeshResources| mesh.snapshot().policy_status.iter().find(|(id, _)| id.name == "from-productpage").map(|(_, st)| st.state);
    assert_eq!(state(&mesh), Some(PolicyState::Accepted));
    let message = format!("regex '{re}' refused");
    // details is no client of that policy: its rejection names the regex, and blames nothing.
    mesh.on_rejected(&node("management-plane", "details"), ResourceType::Route, &message);
    assert_eq!(state(&mesh), Some(PolicyState::Accepted));
    assert_eq!(mesh.counters.policy_rollbacks.get(), 0);
    mesh.on_rejected(&node("management-plane", "productpage"), ResourceType::Route, &message);
    assert_eq!(state(&mesh), Some(PolicyState::Invalid));
    assert_eq!(mesh.counters.policy_rollbacks.get(), 1);
}

#[test]
fn streams_reading_during_endpoint_changes_never_translate() {
    use crate::fixtures::{ScaleSpec, churn_endpoint, scale_inputs};
    let mesh = MeshResources::new(ChangeNotifier::channel().0);
    let mut inputs = scale_inputs(ScaleSpec { services: 300, clusters: 2, endpoints: 5, policies: 10, sidecars: false });
    mesh.update(inputs.clone());
    let proxy = ProxyNode { namespace: "ns-1".into(), ..node("cluster-0", "svc-00001") };
    let first = mesh.resources_for(&proxy);
    assert_eq!(mesh.counters.scope_translations.get(), 1);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // A stream answering requests (ACKs) while the changes land.
        let reader = s.spawn(|| {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = mesh.resources_for(&proxy);
                reads += 1;
            }
            reads
        });
        for step in 0..30 {
            churn_endpoint(&mut inputs, step % 2, step, step);
            mesh.update(inputs.clone());
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    });
    // Every change was an EDS patch, published with its sets: no stream
    // ever found the new generation without its set and translated.
    assert_eq!(mesh.counters.scope_translations.get(), 1);
    let last = mesh.resources_for(&proxy);
    assert!(!Arc::ptr_eq(&first, &last));
    assert!(last.of_type(ResourceType::Endpoint).values().any(|r| r.body().value.windows(10).any(|w| w == b"10.200.0.3")));
}

#[test]
fn a_proxy_of_an_unregistered_cluster_is_warned_about_not_silently_served_nothing() {
    let (notifier, _changes) = ChangeNotifier::channel();
    let mesh = MeshResources::new(notifier);
    mesh.update(inputs());
    assert!(mesh.warnings_for(&node("management-plane", "productpage")).is_empty());
    let warnings = mesh.warnings_for(&node("Kubernetes", "productpage"));
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("\"Kubernetes\"") && warnings[0].contains("--cluster-alias Kubernetes=<cluster>"), "{warnings:?}");
    assert!(warnings[0].contains("management-plane, remote-cluster"), "{warnings:?}");
}

#[test]
fn access_control_changes_retranslate_the_workloads_they_reach() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bookinfo-captured");
    let mut captured = load_config_dir(&dir, &mut SourceMemory::default()).unwrap();
    captured.virtual_meshes[0].spec.enforce_access_control = Some(serde_json::json!("ENABLED"));
    let policy = |path: &str| {
        crate::model::PolicyObject {
        namespace: "service-mesh-hub".into(),
        name: "productpage-reads-reviews".into(),
        generation: Some(1),
        created_ms: 0,
        origin: "test".into(),
        spec: serde_json::from_value(serde_json::json!({
            "sourceSelector": {"serviceAccountRefs": {"serviceAccounts": [{"name": "bookinfo-productpage", "namespace": "default", "cluster": "management-plane"}]}},
            "destinationSelector": {"serviceRefs": {"services": [{"name": "reviews", "namespace": "default", "cluster": "management-plane"}]}},
            "allowedPaths": [path],
        }))
        .unwrap(),
        parse_errors: vec![],
    }
    };
    let (notifier, mut changes) = ChangeNotifier::channel();
    let mesh = MeshResources::new(notifier);
    mesh.update(captured.clone());
    let _ = changes.try_recv();
    let reviews = ProxyNode {
        interception: crate::xds::node::InterceptionMode::Redirect,
        instance_ips: vec!["10.10.0.21".into()],
        service_account: "bookinfo-reviews".into(),
        ..node("management-plane", "reviews")
    };
    let inbound = |set: &ResourceSet| String::from_utf8_lossy(&set.get(ResourceType::Listener, "virtualInbound").unwrap().body().value).to_string();
    let denied = mesh.resources_for(&reviews);
    assert!(!inbound(&denied).contains("productpage-reads-reviews"));
    for path in ["/reviews*", "/ratings*"] {
        let mut with_policy = captured.clone();
        with_policy.access_policies = vec![policy(path)];
        mesh.update(with_policy);
        assert!(changes.try_recv().is_ok(), "{path}: pushed");
        let after = mesh.resources_for(&reviews);
        assert!(inbound(&after).contains(path.trim_end_matches('*')), "{path}");
        // The same as a fresh translation (which leaves the certificates to the provider).
        let fresh = translate::translate(&mesh.snapshot(), &scope_of(&reviews));
        for ty in [ResourceType::Cluster, ResourceType::Endpoint, ResourceType::Listener, ResourceType::Route] {
            let versions = |set: &ResourceSet| set.of_type(ty).iter().map(|(n, r)| (n.clone(), r.version.clone())).collect::<Vec<_>>();
            assert_eq!(versions(&after), versions(&fresh), "{path}: {ty}");
        }
    }
}

#[test]
fn a_streams_memo_gives_its_set_until_the_generation_or_the_certificates_move() {
    let (mesh, _changes) = loaded();
    let proxy = node("management-plane", "productpage");
    let mut memo: StreamMemo = None;
    let first = mesh.resources_for_stream(&proxy, &mut memo);
    assert!(Arc::ptr_eq(&first, &mesh.resources_for(&proxy)), "the set every proxy of the scope gets");
    assert!(Arc::ptr_eq(&first, &mesh.resources_for_stream(&proxy, &mut memo)));
    // A new generation: the new set, and the scope registered again for the next full change.
    let mut no_policy = inputs();
    no_policy.traffic_policies.clear();
    mesh.update(no_policy.clone());
    assert!(mesh.served.is_empty(), "a full change starts the served scopes afresh");
    let second = mesh.resources_for_stream(&proxy, &mut memo);
    assert!(!Arc::ptr_eq(&first, &second));
    assert!(Arc::ptr_eq(&second, &mesh.resources_for(&proxy)));
    assert_eq!(mesh.served.len(), 1);
    // Rotated certificates drop the cache without a new generation: the memo is stale too.
    mesh.rotate_certificates();
    let third = mesh.resources_for_stream(&proxy, &mut memo);
    assert!(!Arc::ptr_eq(&second, &third), "translated again after the rotation");
    assert!(Arc::ptr_eq(&third, &mesh.resources_for_stream(&proxy, &mut memo)));
    // A memo some other provider left is replaced, not misread.
    let mut foreign: StreamMemo = Some(Box::new(7u32));
    assert!(Arc::ptr_eq(&third, &mesh.resources_for_stream(&proxy, &mut foreign)));
}
