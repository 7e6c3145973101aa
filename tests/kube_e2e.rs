//! meshpilot against two real Kubernetes clusters (kube-apiserver + etcd +
//! the endpointslice controller, built from the Kubernetes Go modules by
//! e2e/build.sh), driven with kubectl like a user would:
//!
//! install with `kubectl apply -k deploy/`, register both clusters with
//! `meshpilot cluster register`, create bookinfo, apply the seed guide's
//! TrafficPolicy verbatim, and check status, what a real Envoy sidecar
//! receives, endpoint changes, invalid policies, and a remote API server that
//! dies and comes back.

mod support;

use base64::Engine as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use support::kube::{KubeCluster, KubeMeshpilot, kubeenv_or_skip, register, seed_policy};
use support::{Envoy, envoy_or_skip, meshpilot_bin, random_loopback_prefix, wait_for};

fn policy_state(mgmt: &KubeCluster, name: &str) -> (String, String, String) {
    let out = mgmt
        .kubectl_stdin(
            &[
                "get",
                "trafficpolicy",
                name,
                "-n",
                "service-mesh-hub",
                "-o",
                "jsonpath={.status.translationStatus.state}|{.status.observedGeneration}|{.status.translationStatus.message}",
            ],
            None,
        )
        .unwrap_or_default();
    let mut parts = out.splitn(3, '|');
    (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string())
}

/// The weighted clusters on the reviews route in Envoy's own config dump.
async fn envoy_reviews_weights(envoy: &Envoy) -> Vec<(String, u64)> {
    let dump: serde_json::Value = serde_json::from_str(&envoy.admin_get("/config_dump?resource=dynamic_route_configs").await).unwrap_or_default();
    let mut out = Vec::new();
    for cfg in dump["configs"].as_array().into_iter().flatten() {
        for vh in cfg["route_config"]["virtual_hosts"].as_array().into_iter().flatten() {
            if !vh["name"].as_str().unwrap_or("").starts_with("reviews.default.svc.cluster.local") {
                continue;
            }
            for route in vh["routes"].as_array().into_iter().flatten() {
                for c in route["route"]["weighted_clusters"]["clusters"].as_array().into_iter().flatten() {
                    out.push((c["name"].as_str().unwrap_or("").to_string(), c["weight"].as_u64().unwrap_or(0)));
                }
            }
        }
    }
    out.sort();
    out
}

/// The mesh root an Envoy got over SDS (`ROOTCA`), as PEM; empty if none yet.
async fn envoy_root(envoy: &Envoy) -> String {
    let dump: serde_json::Value = serde_json::from_str(&envoy.admin_get("/config_dump?resource=dynamic_active_secrets").await).unwrap_or_default();
    let secrets = dump["configs"].as_array().cloned().unwrap_or_default();
    let root = secrets.iter().find(|s| s["name"] == "ROOTCA");
    let inline = root.and_then(|s| s["secret"]["validation_context"]["trusted_ca"]["inline_bytes"].as_str()).unwrap_or_default();
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(inline).unwrap_or_default()).unwrap_or_default()
}

/// Envoy's healthy endpoint addresses of one cluster, from its /clusters page.
async fn envoy_endpoints(envoy: &Envoy, cluster: &str) -> Vec<String> {
    let page = envoy.admin_get("/clusters").await;
    let prefix = format!("{cluster}::");
    let mut out: Vec<String> = page
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| rest.split_once("::cx_active").map(|(addr, _)| addr.to_string()))
        .collect();
    out.sort();
    out.dedup();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_against_two_real_clusters() {
    let Some(kubeenv) = kubeenv_or_skip("seed_scenario_against_two_real_clusters") else { return };
    let Some(envoy_bin) = envoy_or_skip("seed_scenario_against_two_real_clusters") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Pod IPs: EndpointSlice validation refuses loopback addresses, so the pods
    // get addresses from the documentation ranges (RFC 5737). This test checks
    // what meshpilot serves and sends no request to them; traffic through real
    // workloads is tested in network namespaces (e2e/netns) and in tests/mesh_traffic.rs.
    let mp_prefix = "192.0.2".to_string();
    let rc_prefix = "198.51.100".to_string();
    let (a, b) = random_loopback_prefix();
    let outbound_bind = format!("127.{a}.{b}.10");

    let (mgmt, remote) = tokio::join!(KubeCluster::start(&kubeenv, "management-plane", root), KubeCluster::start(&kubeenv, "remote-cluster", root));
    let mut remote = remote;

    // Install meshpilot's manifests (CRDs, RBAC, Deployment, Service): proves they are valid.
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    mgmt.install_meshpilot();
    let deployment = mgmt.kubectl(&[
        "get",
        "deployment",
        "meshpilot",
        "-n",
        "service-mesh-hub",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].readinessProbe.httpGet.path}",
    ]);
    assert_eq!(deployment, "/readyz");

    // Register both clusters, least privilege.
    register(&mgmt, &mgmt);
    register(&mgmt, &remote);
    let reader = "system:serviceaccount:service-mesh-hub:meshpilot-reader";
    assert_eq!(remote.kubectl(&["auth", "can-i", "watch", "endpointslices.discovery.k8s.io", "--as", reader]).trim(), "yes");
    let secrets = remote.kubectl_stdin(&["auth", "can-i", "list", "secrets", "--as", reader], None);
    assert!(matches!(&secrets, Err(e) if e.contains("no")), "the reader must not read Secrets: {secrets:?}");

    // bookinfo in both clusters.
    let manifest = |f: &str, prefix: &str| std::fs::read_to_string(repo.join("e2e/manifests").join(f)).unwrap().replace("POD_PREFIX", prefix);
    mgmt.kubectl_stdin(&["apply", "-f", "-"], Some(&manifest("management-plane.yaml", &mp_prefix))).unwrap();
    remote.kubectl_stdin(&["apply", "-f", "-"], Some(&manifest("remote-cluster.yaml", &rc_prefix))).unwrap();
    remote.kubectl_stdin(&["apply", "-f", "-"], Some(&manifest("reviews-v3.yaml", &rc_prefix))).unwrap();
    // Identities are proven with the registered clusters' TokenReviews
    // (issue 19): the reader may create them, and nothing broader.
    assert_eq!(remote.kubectl(&["auth", "can-i", "create", "tokenreviews.authentication.k8s.io", "--as", reader]).trim(), "yes");
    certificate_api_with_real_tokens(&mgmt, &remote).await;

    // The two clusters are on separate networks, in one virtual mesh with a builtin CA.
    mgmt.kubectl(&["apply", "-f", repo.join("examples/bookinfo-multinet/mesh/virtual-mesh.yaml").to_str().unwrap()]);

    let meshpilot = KubeMeshpilot::start(root, &mgmt, "replica-a").await;
    // The sidecar proves its identity as an injected pod would: a TokenRequest
    // token (audience istio-ca) over TLS, verified with the root meshpilot
    // published into its namespace.
    let root_file = root.join("root-cert.pem");
    let published = wait_for("istio-ca-root-cert in default", Duration::from_secs(30), || async {
        mgmt.kubectl_stdin(&["get", "configmap", "istio-ca-root-cert", "-n", "default", "-o", "jsonpath={.data.root-cert\\.pem}"], None)
            .ok()
            .filter(|r| r.contains("BEGIN CERTIFICATE"))
    })
    .await;
    std::fs::write(&root_file, published).unwrap();
    let token_file = root.join("productpage.token");
    std::fs::write(&token_file, mgmt.kubectl(&["create", "token", "bookinfo-productpage", "-n", "default", "--audience", "istio-ca"])).unwrap();
    let proving = |bind: &str, sa: &str| -> Vec<String> {
        ["--labels", "app=productpage,version=v1", "--outbound-bind", bind, "--service-account", sa, "--xds-root-cert"]
            .iter()
            .map(|s| s.to_string())
            .chain([root_file.display().to_string(), "--token-file".into(), token_file.display().to_string()])
            .collect()
    };
    let args = proving(&outbound_bind, "bookinfo-productpage");
    let envoy = Envoy::start_in(
        &envoy_bin,
        root,
        "productpage-v1.default",
        "management-plane",
        meshpilot.tls_port,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    // The seed's TrafficPolicy, verbatim, with kubectl.
    mgmt.kubectl_stdin(&["apply", "-f", "-"], Some(&seed_policy())).unwrap();
    let (state, generation, message) = wait_for("TrafficPolicy simple ACCEPTED", Duration::from_secs(30), || async {
        let s = policy_state(&mgmt, "simple");
        (s.0 == "ACCEPTED").then_some(s)
    })
    .await;
    assert_eq!((state.as_str(), generation.as_str()), ("ACCEPTED", "1"), "{message}");

    let weights = wait_for("Envoy to receive 75/15/10", Duration::from_secs(30), || async {
        let w = envoy_reviews_weights(&envoy).await;
        (w.len() == 3).then_some(w)
    })
    .await;
    let mut by_weight: Vec<u64> = weights.iter().map(|(_, w)| *w).collect();
    by_weight.sort();
    assert_eq!(by_weight, vec![10, 15, 75], "{weights:?}");
    let v3_cluster = weights.iter().find(|(_, w)| *w == 75).unwrap().0.clone();
    assert!(v3_cluster.contains("remote-cluster"), "{v3_cluster}");
    // v3 is on the other network: the sidecar reaches it at the remote cluster's east-west gateway.
    let v3_addr = format!("{rc_prefix}.99:15443");
    wait_for("v3 behind the remote gateway in Envoy", Duration::from_secs(20), || async {
        envoy_endpoints(&envoy, &v3_cluster).await.contains(&v3_addr).then_some(())
    })
    .await;

    // Scale reviews-v3 to zero and back: each change reaches Envoy within a second.
    let t = Instant::now();
    remote.kubectl(&["delete", "pod", "reviews-v3", "-n", "default", "--wait=false"]);
    wait_for("v3's endpoint gone from Envoy", Duration::from_secs(10), || async {
        envoy_endpoints(&envoy, &v3_cluster).await.is_empty().then_some(())
    })
    .await;
    let removal = t.elapsed();
    let t = Instant::now();
    remote.kubectl_stdin(&["apply", "-f", "-"], Some(&manifest("reviews-v3.yaml", &rc_prefix))).unwrap();
    wait_for("v3's endpoint back in Envoy", Duration::from_secs(10), || async {
        envoy_endpoints(&envoy, &v3_cluster).await.contains(&v3_addr).then_some(())
    })
    .await;
    let addition = t.elapsed();
    eprintln!("endpoint change to Envoy: removal {removal:?}, addition {addition:?}");
    assert!(removal < Duration::from_secs(1) && addition < Duration::from_secs(1), "removal {removal:?}, addition {addition:?}");

    // Bad input: CRD validation rejects a misspelt field outright...
    let typo = seed_policy().replace("weight: 75", "wieght: 75");
    let err = mgmt.kubectl_stdin(&["apply", "-f", "-"], Some(&typo)).unwrap_err();
    assert!(err.contains("wieght"), "{err}");
    // ...and a policy that parses but points nowhere is INVALID, naming the field, while the last good config serves.
    let bad = seed_policy().replace("cluster: remote-cluster", "cluster: no-such-cluster");
    mgmt.kubectl_stdin(&["apply", "-f", "-"], Some(&bad)).unwrap();
    let (_, generation, message) = wait_for("TrafficPolicy simple INVALID", Duration::from_secs(30), || async {
        let s = policy_state(&mgmt, "simple");
        (s.0 == "INVALID").then_some(s)
    })
    .await;
    assert_eq!(generation, "2");
    assert!(message.contains("spec.trafficShift.destinations[0]"), "{message}");
    let serving = mgmt.kubectl(&["get", "trafficpolicy", "simple", "-n", "service-mesh-hub", "-o", "jsonpath={.status.servingGeneration}"]);
    assert_eq!(serving, "1");
    assert_eq!(envoy_reviews_weights(&envoy).await, weights, "the last good config keeps serving");
    mgmt.kubectl_stdin(&["apply", "-f", "-"], Some(&seed_policy())).unwrap();
    wait_for("TrafficPolicy simple ACCEPTED again", Duration::from_secs(30), || async {
        let s = policy_state(&mgmt, "simple");
        (s.0 == "ACCEPTED" && s.1 == "3").then_some(())
    })
    .await;

    // Fields read but not yet in effect are reported, never silently ignored.
    let vm = mgmt.kubectl(&[
        "get",
        "virtualmesh",
        "virtual-mesh",
        "-n",
        "service-mesh-hub",
        "-o",
        "jsonpath={.status.translationStatus.state} {.status.notYetSupported}",
    ]);
    assert!(
        vm.starts_with("ACCEPTED ") && vm.contains("spec.certificateAuthority.builtin.{ttlDays,rsaKeySizeBytes,orgName}: not yet supported"),
        "{vm}"
    );
    // Istio's Sidecar narrows what productpage is configured for: only reviews
    // (and the remote v3 its policy shifts to), not details or ratings.
    let sidecar = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: productpage, namespace: default}\nspec:\n  workloadSelector: {labels: {app: productpage}}\n  egress:\n  - hosts: [\"./reviews.default.svc.cluster.local\"]\n";
    mgmt.kubectl_stdin(&["apply", "-f", "-"], Some(sidecar)).unwrap();
    let sidecar_state = || {
        mgmt.kubectl(&[
            "get",
            "sidecars.networking.istio.io",
            "productpage",
            "-n",
            "default",
            "-o",
            "jsonpath={.status.translationStatus.state} {.status.observedGeneration} {.status.translationStatus.message}",
        ])
    };
    wait_for("Sidecar productpage ACCEPTED", Duration::from_secs(30), || async { sidecar_state().starts_with("ACCEPTED 1").then_some(()) }).await;
    let envoy_clusters = || async { envoy.admin_get("/config_dump?resource=dynamic_active_clusters").await };
    wait_for("ratings and details gone from productpage's Envoy", Duration::from_secs(30), || async {
        let c = envoy_clusters().await;
        (!c.contains("ratings.default") && !c.contains("details.default")).then_some(())
    })
    .await;
    assert_eq!(envoy_reviews_weights(&envoy).await, weights, "the split is untouched by scoping");
    assert!(envoy_endpoints(&envoy, &v3_cluster).await.contains(&v3_addr));
    // A host that is not namespace/dnsName: INVALID, naming the field; the last good scope keeps serving.
    mgmt.kubectl_stdin(&["apply", "-f", "-"], Some(&sidecar.replace("./reviews.default.svc.cluster.local", "reviews"))).unwrap();
    let state = wait_for("Sidecar productpage INVALID", Duration::from_secs(30), || async {
        let s = sidecar_state();
        s.starts_with("INVALID 2").then_some(s)
    })
    .await;
    assert!(state.contains("spec.egress[0].hosts[0]") && state.contains("keeps serving"), "{state}");
    // A later change reaching Envoy is the barrier: anything the INVALID
    // Sidecar had pushed would have arrived before it.
    remote.kubectl(&["delete", "pod", "reviews-v3", "-n", "default", "--wait=false"]);
    wait_for("v3's endpoint gone again", Duration::from_secs(10), || async { envoy_endpoints(&envoy, &v3_cluster).await.is_empty().then_some(()) })
        .await;
    remote.kubectl_stdin(&["apply", "-f", "-"], Some(&manifest("reviews-v3.yaml", &rc_prefix))).unwrap();
    wait_for("v3's endpoint back again", Duration::from_secs(10), || async {
        envoy_endpoints(&envoy, &v3_cluster).await.contains(&v3_addr).then_some(())
    })
    .await;
    assert!(!envoy_clusters().await.contains("ratings.default"), "the last good Sidecar keeps serving");
    mgmt.kubectl(&["delete", "sidecars.networking.istio.io", "productpage", "-n", "default"]);
    wait_for("ratings back in productpage's Envoy", Duration::from_secs(30), || async {
        envoy_clusters().await.contains("ratings.default").then_some(())
    })
    .await;

    // mTLS: the sidecar got its SPIFFE certificate and the mesh root over SDS.
    let secrets = envoy.admin_get("/config_dump?resource=dynamic_active_secrets").await;
    assert!(secrets.contains("\"name\": \"default\"") && secrets.contains("\"name\": \"ROOTCA\""), "{secrets}");
    // The stream proved its identity with the token.
    let syncz = meshpilot.get_json("/debug/syncz").await.to_string();
    assert!(syncz.contains("default/bookinfo-productpage (token in management-plane)"), "{syncz}");

    // A plaintext stream gets routing configuration but never a key.
    let plain = Envoy::start_in(
        &envoy_bin,
        root,
        "productpage-plain.default",
        "management-plane",
        meshpilot.xds_port,
        &["--labels", "app=productpage,version=v1", "--outbound-bind", &format!("127.{a}.{b}.12"), "--service-account", "bookinfo-productpage"],
    );
    // (Its mTLS clusters wait for secrets that never come, so Envoy asks for
    // no listeners: what it got is its clusters, ACKed, and no secret.)
    let row = wait_for("the plaintext sidecar's clusters ACKed", Duration::from_secs(30), || async {
        let rows = meshpilot.get_json("/debug/syncz").await;
        let row = rows.as_array()?.iter().find(|r| r["proxy"] == "productpage-plain.default")?.clone();
        (row["types"]["CDS"]["state"] == "SYNCED").then_some(row)
    })
    .await;
    assert_eq!(row["identity"], "unproven");
    assert!(row["types"]["SDS"]["resource_count"].as_u64().unwrap_or(0) == 0, "{row}");
    let plain_secrets = plain.admin_get("/config_dump?resource=dynamic_active_secrets").await;
    assert!(!plain_secrets.contains("\"name\": \"default\"") && envoy_root(&plain).await.is_empty(), "{plain_secrets}");
    drop(plain);
    // Metadata claiming another service account than the token proves: the stream is ended.
    let denied = "meshpilot_xds_stream_errors_total{reason=\"permission_denied\"}";
    let before = meshpilot.counter(denied).await;
    let args = proving(&format!("127.{a}.{b}.13"), "bookinfo-reviews");
    let liar = Envoy::start_in(
        &envoy_bin,
        root,
        "liar.default",
        "management-plane",
        meshpilot.tls_port,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    wait_for("the lying stream refused", Duration::from_secs(30), || async { (meshpilot.counter(denied).await > before).then_some(()) }).await;
    assert!(envoy_root(&liar).await.is_empty());
    drop(liar);

    // The root is the management cluster's Secret (created once, for every
    // replica), published as istio-ca-root-cert in every namespace of both clusters.
    let stored_root =
        mgmt.kubectl(&["get", "secret", "meshpilot-ca-virtual-mesh", "-n", "service-mesh-hub", "-o", "jsonpath={.data.root-cert\\.pem}"]);
    let stored_root = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(stored_root.trim()).unwrap()).unwrap();
    assert_eq!(envoy_root(&envoy).await.trim(), stored_root.trim(), "the sidecar's ROOTCA is the stored root");
    for (cluster, ns) in [(&mgmt, "default"), (&mgmt, "service-mesh-hub"), (&remote, "default"), (&remote, "kube-system")] {
        let published = wait_for("istio-ca-root-cert published", Duration::from_secs(20), || async {
            let got = cluster.kubectl_stdin(&["get", "configmap", "istio-ca-root-cert", "-n", ns, "-o", "jsonpath={.data.root-cert\\.pem}"], None);
            got.ok().filter(|r| !r.trim().is_empty())
        })
        .await;
        assert_eq!(published.trim(), stored_root.trim(), "{}/{ns}", cluster.name);
    }

    // The status writer holds the Lease.
    let holder = mgmt.kubectl(&["get", "lease", "meshpilot-status-writer", "-n", "service-mesh-hub", "-o", "jsonpath={.spec.holderIdentity}"]);
    assert_eq!(holder, "replica-a");

    // Faults: the remote API server dies; its endpoints keep serving, marked stale.
    let pushes_before = meshpilot.counter("meshpilot_xds_pushes_total").await;
    assert!(pushes_before > 0.0, "the push counter counts (the sidecar got its config)");
    remote.kill();
    wait_for("remote-cluster marked stale", Duration::from_secs(30), || async {
        (meshpilot.cluster_health("remote-cluster").await["stale"] == true).then_some(())
    })
    .await;
    assert!(envoy_endpoints(&envoy, &v3_cluster).await.contains(&v3_addr), "nothing is wiped while the cluster is away");
    assert_eq!(envoy_reviews_weights(&envoy).await, weights);
    // It comes back: meshpilot re-lists (its watches' resourceVersions are too old: 410 Gone) and converges.
    let lists_before = meshpilot.cluster_health("remote-cluster").await["lists"].as_u64().unwrap_or(0);
    remote.run().await;
    wait_for("remote-cluster re-listed and fresh", Duration::from_secs(60), || async {
        let h = meshpilot.cluster_health("remote-cluster").await;
        (h["stale"] == false && h["lists"].as_u64().unwrap_or(0) >= lists_before + 4).then_some(())
    })
    .await;
    assert!(envoy_endpoints(&envoy, &v3_cluster).await.contains(&v3_addr));
    let pushes_after = meshpilot.counter("meshpilot_xds_pushes_total").await;
    eprintln!("pushes caused by the remote cluster's death, return and re-list: {}", pushes_after - pushes_before);
    assert_eq!(pushes_after, pushes_before, "re-listing unchanged objects pushed");

    // The registration's Secret rotated (its resourceVersion changes; the
    // label is the KubernetesCluster event that has it read again): the
    // watches restart against the same API server. The cluster's objects
    // serve until every kind has listed again, and unchanged objects change nothing.
    let health = meshpilot.cluster_health("remote-cluster").await;
    let (lists_before, state_changes) = (health["lists"].as_u64().unwrap_or(0), health["stateChanges"].clone());
    assert!(state_changes.as_u64().is_some_and(|n| n > 0), "{health}");
    let registration = ["-n", "service-mesh-hub"];
    let secret =
        mgmt.kubectl(&["get", "kubernetescluster", "remote-cluster", registration[0], registration[1], "-o", "jsonpath={.spec.secretRef.name}"]);
    mgmt.kubectl(&["annotate", "secret", secret.trim(), registration[0], registration[1], "meshpilot.test/rotated=1"]);
    mgmt.kubectl(&["label", "kubernetescluster", "remote-cluster", registration[0], registration[1], "meshpilot.test/rotated=1"]);
    // (A restart counts the cluster's lists from zero again.)
    wait_for("remote-cluster's watches restarted and re-listed", Duration::from_secs(60), || async {
        let h = meshpilot.cluster_health("remote-cluster").await;
        let lists = h["lists"].as_u64().unwrap_or(0);
        (h["synced"] == true && (4..lists_before).contains(&lists)).then_some(())
    })
    .await;
    // (Counted with `synced`: every build of the restarted watches' lists is in it.)
    let health = meshpilot.cluster_health("remote-cluster").await;
    assert_eq!(health["stateChanges"], state_changes, "restarting the watches changed the served state: {health}");
    assert!(envoy_endpoints(&envoy, &v3_cluster).await.contains(&v3_addr));
    assert_eq!(meshpilot.counter("meshpilot_xds_pushes_total").await, pushes_before, "restarting the watches pushed");

    // A second replica serves xDS without the Lease; when the holder dies it takes over status writing.
    let replica_b = KubeMeshpilot::start(root, &mgmt, "replica-b").await;
    assert_eq!(replica_b.cluster_health("remote-cluster").await["synced"], true);
    // ... and signs with the same root: its sidecars and replica-a's trust each other.
    let args = proving(&format!("127.{a}.{b}.11"), "bookinfo-productpage");
    let envoy_b = Envoy::start_in(
        &envoy_bin,
        root,
        "productpage-v1-b.default",
        "management-plane",
        replica_b.tls_port,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let root_b = wait_for("replica-b's sidecar to get its ROOTCA", Duration::from_secs(30), || async {
        Some(envoy_root(&envoy_b).await).filter(|r| !r.is_empty())
    })
    .await;
    assert_eq!(root_b.trim(), stored_root.trim(), "one root for every replica");
    drop(envoy_b);
    drop(meshpilot);
    let edited = seed_policy().replace("weight: 75", "weight: 70");
    mgmt.kubectl_stdin(&["apply", "-f", "-"], Some(&edited)).unwrap();
    wait_for("replica-b to write generation 4's status", Duration::from_secs(30), || async {
        let s = policy_state(&mgmt, "simple");
        (s.0 == "ACCEPTED" && s.1 == "4").then_some(())
    })
    .await;
    let holder = mgmt.kubectl(&["get", "lease", "meshpilot-status-writer", "-n", "service-mesh-hub", "-o", "jsonpath={.spec.holderIdentity}"]);
    assert_eq!(holder, "replica-b");

    // Deregistering a cluster stops its watches; policies that point there say so.
    let out = Command::new(meshpilot_bin())
        .args(["cluster", "deregister", "--kubeconfig"])
        .arg(mgmt.kubeconfig())
        .args(["--context", &mgmt.context(), "--remote-cluster-name", "remote-cluster"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("remote-cluster gone from /debug/clusterz", Duration::from_secs(20), || async {
        replica_b.cluster_health("remote-cluster").await.is_null().then_some(())
    })
    .await;
    let (_, _, message) = wait_for("TrafficPolicy simple INVALID after deregistration", Duration::from_secs(30), || async {
        let s = policy_state(&mgmt, "simple");
        (s.0 == "INVALID").then_some(s)
    })
    .await;
    assert!(message.contains("\"remote-cluster\" is not registered"), "{message}");
    drop(mgmt);
}

/// Istio's certificate API over the real remote API server: the reader
/// identity stored by `cluster register` reviews tokens that kubectl made
/// with the TokenRequest API; a CSR is signed only for the identity its token proves.
async fn certificate_api_with_real_tokens(mgmt: &KubeCluster, remote: &KubeCluster) {
    use meshpilot::ca::WorkloadCertificates;
    use meshpilot::ca::service::{CertificateService, IstioCertificateRequest, TrustLookup};
    use meshpilot::ca::token::{KubeTokenReviewer, TokenError, TokenReviewer};
    use meshpilot::model::MeshTrust;

    struct RemoteMesh;
    impl TrustLookup for RemoteMesh {
        fn trust_of(&self, cluster: &str) -> Option<MeshTrust> {
            (cluster == "remote-cluster").then(|| MeshTrust {
                virtual_mesh: "service-mesh-hub/e2e".into(),
                trust_domain: "cluster.local".into(),
                ca: meshpilot::model::CaSource::Builtin,
            })
        }
    }

    let stored = mgmt.kubectl(&["get", "secret", &remote.name, "-n", "service-mesh-hub", "-o", "jsonpath={.data.kubeconfig}"]);
    let yaml = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(stored.trim()).unwrap()).unwrap();
    let (client, _) = meshpilot::sources::kubernetes::client_from_kubeconfig_yaml(&yaml, None).await.unwrap();
    let clusters = std::sync::Arc::new(meshpilot::ca::clusters::ClusterClients::default());
    clusters.set(&remote.name, client);
    let reviewer = std::sync::Arc::new(KubeTokenReviewer::new(clusters));

    remote.kubectl(&["create", "serviceaccount", "ca-e2e", "-n", "default"]);
    let token = remote.kubectl(&["create", "token", "ca-e2e", "-n", "default", "--audience", "istio-ca"]).trim().to_string();
    let id = reviewer.review(&remote.name, &token).await.expect("a TokenRequest token for istio-ca is accepted");
    assert_eq!((id.namespace.as_str(), id.service_account.as_str()), ("default", "ca-e2e"));
    // A token for the API server's own audience, a forged one, an unregistered cluster.
    let api_token = remote.kubectl(&["create", "token", "ca-e2e", "-n", "default"]).trim().to_string();
    assert!(matches!(reviewer.review(&remote.name, &api_token).await, Err(TokenError::Rejected { .. })));
    // One signature character changed, mid-signature (the last one may be padding bits only).
    let mut forged = token.clone().into_bytes();
    let at = token.len() - 20;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    assert!(matches!(reviewer.review(&remote.name, &forged).await, Err(TokenError::Rejected { .. })));
    assert!(matches!(reviewer.review("nowhere", &token).await, Err(TokenError::UnknownCluster { .. })));

    let service = CertificateService::new(
        reviewer,
        std::sync::Arc::new(RemoteMesh),
        std::sync::Arc::new(WorkloadCertificates::new(Duration::from_secs(3600), None)),
    );
    let request = |sa: &str| {
        let id = meshpilot::model::spiffe_id(meshpilot::model::TRUST_DOMAIN, "default", sa);
        let csr = meshpilot::ca::csr::throwaway_request(&[&id]).unwrap();
        let mut r = tonic::Request::new(IstioCertificateRequest { csr, ..Default::default() });
        r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        r.metadata_mut().insert("clusterid", remote.name.parse().unwrap());
        r
    };
    let chain = service.create_certificate(request("ca-e2e")).await.expect("its own identity is signed").cert_chain;
    assert_eq!(chain.len(), 2);
    let refused = service.create_certificate(request("bookinfo-reviews")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
}
