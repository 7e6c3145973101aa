//! The captured layout for real: examples/bookinfo-captured as Istio-injected
//! pods, one Linux network namespace each, with the nat rules Istio's
//! `istio-iptables` writes for REDIRECT mode, Envoy 1.40 as uid 1337 and
//! the application (`meshpilot echo`) on 0.0.0.0:<port> as another user.
//! Applications call services by name, as pods do (`reviews:9080` resolves
//! to reviews' ClusterIP through the pod's hosts file); only the east-west
//! gateway crosses between the two networks.
//!
//! Checked, with chi-square bounds over 2,000 requests where a share is claimed:
//! - the seed's 75/15/10 split of `reviews`, remote v3 through the gateway,
//!   mTLS, every backend seeing productpage's SPIFFE id (inbound through 15006);
//! - a raw TCP service shifted 50/50 across the two clusters;
//! - gRPC through the sidecar with HTTP/2 end to end, HTTP/1.1 on another port;
//! - an undeclared port detected as HTTP by Envoy's HTTP inspector;
//! - a remote service by its `.global` name;
//! - an address outside the mesh reached under ALLOW_ANY, refused under REGISTRY_ONLY;
//! - the iptables counters: traffic really was captured, out and in.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use meshpilot::cli::demo_captured::{CapturedMesh, Sampled};
use meshpilot::netns::pods::{self, PodNetwork};
use support::{Proc, Watchdog, assert_split, envoy_or_skip, free_port, meshpilot_bin, require_e2e, wait_for};

const PRODUCTPAGE_ID: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";

fn only(answers: &BTreeMap<String, usize>) -> Vec<&str> {
    answers.keys().map(String::as_str).collect()
}

async fn answering(mesh: &CapturedMesh, from: &str, to: &str, protocol: &str, want: &[&str]) -> Sampled {
    let pod = mesh.pod(from).unwrap().clone();
    wait_for(&format!("{want:?} answering {to} ({protocol}) from {from}"), Duration::from_secs(30), || {
        let pod = pod.clone();
        async move {
            let s = mesh.sample(&pod, to, protocol, 60).ok()?;
            (want.iter().all(|w| s.answers.contains_key(*w)) && s.answers.keys().all(|k| want.contains(&k.as_str()))).then_some(s)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_injected_pods_captured_by_iptables() {
    if !pods::available() {
        assert!(!require_e2e(), "this test needs root, ip, iptables and setpriv here (scripts/setup.sh installs iptables)");
        eprintln!("istio_injected_pods_captured_by_iptables: skipped (needs root, iptables and setpriv)");
        return;
    }
    let Some(envoy) = envoy_or_skip("istio_injected_pods_captured_by_iptables") else { return };
    let tmp = tempfile::Builder::new().prefix("mpc").tempdir_in("/tmp").unwrap();
    let work = tmp.path().join("mesh");
    let _watchdog = Watchdog::arm("istio_injected_pods_captured_by_iptables", Duration::from_secs(600), &work.join("logs"));
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/bookinfo-captured");
    let admin = format!("127.0.0.1:{}", free_port());
    let xds = format!("127.0.0.1:{}", free_port());
    let mut mesh = CapturedMesh::start(&meshpilot_bin(), &example, &envoy, &work, &xds, &admin, &["--debounce-after", "20ms"])
        .await
        .unwrap_or_else(|e| panic!("starting the captured mesh (logs in {}): {e:#}", work.join("logs").display()));
    let productpage = mesh.pod("productpage").unwrap().clone();

    // The seed split, called as `http://reviews:9080/`.
    answering(&mesh, "productpage", "reviews:9080", "http", &["reviews-v1", "reviews-v2", "reviews-v3"]).await;
    let split = mesh.sample(&productpage, "reviews:9080", "http", 2000).unwrap();
    let stat = assert_split(&split.answers, &[("reviews-v3", 0.75), ("reviews-v1", 0.15), ("reviews-v2", 0.10)]);
    eprintln!("captured seed split: {:?}, chi-square {stat:.2}", split.answers);
    for backend in ["reviews-v1", "reviews-v2", "reviews-v3"] {
        assert_eq!(split.peers[backend], BTreeSet::from([PRODUCTPAGE_ID.to_string()]), "{backend}: the caller's identity arrives through 15006");
    }
    // The packets really took the iptables path: out of productpage to 15001, into reviews-v1 to 15006.
    let out = PodNetwork::nat_counters(&productpage.netns).unwrap();
    assert!(pods::jump_packets(&out, "ISTIO_OUTPUT", "ISTIO_REDIRECT") > 0, "productpage's outbound was not captured:\n{out}");
    let reviews_v1 = mesh.pods.iter().find(|p| p.name == "reviews-v1").unwrap();
    let inbound = PodNetwork::nat_counters(&reviews_v1.netns).unwrap();
    assert!(pods::jump_packets(&inbound, "ISTIO_INBOUND", "ISTIO_IN_REDIRECT") > 0, "reviews-v1's inbound was not captured:\n{inbound}");
    // The remote reviews by its .global name: only v3.
    let global = answering(&mesh, "productpage", "reviews.default.svc.remote-cluster.global:9080", "http", &["reviews-v3"]).await;
    assert_eq!(only(&global.answers), ["reviews-v3"]);

    // Raw TCP, shifted 50/50 across the clusters by tcp_proxy weighted clusters.
    answering(&mesh, "productpage", "tcp-echo:9000", "tcp", &["tcp-echo-v1", "tcp-echo-v2"]).await;
    let tcp = mesh.sample(&productpage, "tcp-echo:9000", "tcp", 2000).unwrap();
    let stat = assert_split(&tcp.answers, &[("tcp-echo-v1", 0.5), ("tcp-echo-v2", 0.5)]);
    eprintln!("captured TCP split: {:?}, chi-square {stat:.2}", tcp.answers);

    // gRPC: HTTP/2 all the way to the backend; the HTTP/1.1 port next to it stays HTTP/1.1.
    answering(&mesh, "productpage", "greeter:7070", "grpc", &["greeter-v1"]).await;
    let grpc = mesh.sample(&productpage, "greeter:7070", "grpc", 200).unwrap();
    assert_eq!(grpc.answers, BTreeMap::from([("greeter-v1".to_string(), 200)]), "every gRPC call answered with grpc-status 0");
    assert_eq!(grpc.versions["greeter-v1"], BTreeSet::from(["HTTP/2.0".to_string()]));
    let http1 = mesh.sample(&productpage, "greeter:8080", "http", 200).unwrap();
    assert_eq!(http1.answers, BTreeMap::from([("greeter-v1".to_string(), 200)]));
    assert_eq!(http1.versions["greeter-v1"], BTreeSet::from(["HTTP/1.1".to_string()]));

    // An undeclared port: the HTTP inspector sees HTTP and routes it (through legacy's sidecar, mTLS).
    let detected = answering(&mesh, "productpage", "legacy:7000", "http", &["legacy-v1"]).await;
    assert_eq!(detected.peers["legacy-v1"], BTreeSet::from([String::new()]), "inbound on a detected port is tcp_proxy: no XFCC");
    let (pp_admin, listener) = (productpage.admin.clone(), "10.96.0.50_7000");
    let stats = meshpilot::cli::http::get_unix(&pp_admin, "/stats?filter=outbound_10.96.0.50_7000.downstream_rq_total").await.unwrap_or_default();
    let routed: u64 = stats.lines().filter_map(|l| l.rsplit(": ").next()?.trim().parse::<u64>().ok()).sum();
    assert!(routed > 0, "{listener}'s HTTP chain (HTTP detected) counted no request: {stats}");

    // Outside the mesh: a server on network A's router, which no Service names.
    let (outside_ns, outside_ip) = mesh.outside(&productpage.address).unwrap();
    let mut cmd = PodNetwork::command(&outside_ns, None, meshpilot_bin());
    cmd.args(["echo", "--listen", &format!("{outside_ip}:7777"), "--name", "outside"]);
    let _outside = Proc::spawn("outside", cmd, &work.join("logs"));
    let outside_addr = format!("{outside_ip}:7777");
    let allowed = answering(&mesh, "productpage", &outside_addr, "http", &["outside"]).await;
    assert_eq!(only(&allowed.answers), ["outside"], "ALLOW_ANY: the original destination is reached");

    // REGISTRY_ONLY: the same call is refused; the mesh keeps working.
    let before = lds_version(&mesh, &productpage.node).await;
    support::write_atomically(
        &mesh.config.join("mesh/sidecar.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: default}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
    );
    wait_for("productpage to ACK the REGISTRY_ONLY listeners", Duration::from_secs(20), || async {
        lds_version(&mesh, &productpage.node).await.filter(|v| Some(v) != before.as_ref())
    })
    .await;
    let refused = mesh.sample(&productpage, &outside_addr, "http", 20).unwrap();
    assert!(refused.answers.keys().all(|k| k.starts_with("error")), "REGISTRY_ONLY must refuse {outside_addr}: {:?}", refused.answers);
    let still = mesh.sample(&productpage, "reviews:9080", "http", 100).unwrap();
    assert!(still.answers.keys().all(|k| k.starts_with("reviews-v")), "the mesh still answers: {:?}", still.answers);

    access_control(&mesh).await;
    servers_are_checked_for_their_exact_identity(&mesh).await;
    mesh.check_alive().unwrap();
}

/// A client accepts from a destination only the identities of its
/// workloads: when management-plane's reviews pods are declared to run as
/// another service account, their sidecars (still holding certificates for
/// `bookinfo-reviews`) are refused by productpage's sidecar (Envoy's
/// `ssl.fail_verify_san`), while the remote reviews-v3 keeps answering.
async fn servers_are_checked_for_their_exact_identity(mesh: &CapturedMesh) {
    let pods = mesh.config.join("management-plane/bookinfo.yaml");
    let text = std::fs::read_to_string(&pods).unwrap();
    assert_eq!(text.matches("serviceAccountName: bookinfo-reviews\n").count(), 2, "reviews-v1 and reviews-v2");
    support::write_atomically(&pods, &text.replace("serviceAccountName: bookinfo-reviews\n", "serviceAccountName: bookinfo-reviews-next\n"));
    let productpage = mesh.pod("productpage").unwrap();
    let refused = answers_become(mesh, "productpage", "reviews:9080", ("GET", "/"), &["reviews-v3", "HTTP 503"]).await;
    eprintln!("reviews' sidecars with a certificate for another service account: {:?}", refused.answers);
    let v1 = "cluster.outbound|9080|version-v1|reviews.default.svc.cluster.local.ssl.fail_verify_san";
    assert!(envoy_stat(productpage, v1).await > 0, "productpage's sidecar refused reviews-v1's certificate by its SAN");
}

/// What `pod`'s Envoy counted for stats named `name` (summed).
async fn envoy_stat(pod: &meshpilot::cli::demo_captured::Pod, name: &str) -> u64 {
    let stats = meshpilot::cli::http::get_unix(&pod.admin, &format!("/stats?filter={name}")).await.unwrap_or_default();
    stats.lines().filter_map(|l| l.split_once(": ")).filter(|(n, _)| *n == name).filter_map(|(_, v)| v.trim().parse::<u64>().ok()).sum()
}

/// Waits until `count` requests from `from` give exactly the answers `want`.
async fn answers_become(mesh: &CapturedMesh, from: &str, to: &str, (method, path): (&str, &str), want: &[&str]) -> Sampled {
    let pod = mesh.pod(from).unwrap().clone();
    wait_for(&format!("{method} {to}{path} from {from} answered by exactly {want:?}"), Duration::from_secs(30), || {
        let pod = pod.clone();
        async move {
            let s = mesh.sample_request(&pod, to, (method, path), 40).ok()?;
            (want.iter().all(|w| s.answers.contains_key(*w)) && s.answers.keys().all(|k| want.contains(&k.as_str()))).then_some(s)
        }
    })
    .await
}

/// Access control, enforced by the destination's sidecar in both clusters:
/// denied by default, exactly what an AccessControlPolicy allows let
/// through (its caller, method, paths and ports), denied again when the
/// policy goes, allowed to all when enforcement is off.
async fn access_control(mesh: &CapturedMesh) {
    let virtual_mesh = mesh.config.join("mesh/virtual-mesh.yaml");
    let original = std::fs::read_to_string(&virtual_mesh).unwrap();
    let enforce = |value: &str| support::write_atomically(&virtual_mesh, &format!("{original}  enforceAccessControl: {value}\n"));
    let reviews = ["reviews-v1", "reviews-v2", "reviews-v3"];
    let pod = |name: &str| mesh.pods.iter().find(|p| p.name == name).unwrap().clone();
    let (v1, v3) = (pod("reviews-v1"), pod("reviews-v3"));
    let denied = "http.inbound_0.0.0.0_9080.rbac.denied";

    // Enforced, no policy: every reviews replica, local and remote, answers 403 from its sidecar's RBAC.
    enforce("ENABLED");
    answers_become(mesh, "productpage", "reviews:9080", ("GET", "/reviews/1"), &["HTTP 403"]).await;
    let (denied_v1, denied_v3) = (envoy_stat(&v1, denied).await, envoy_stat(&v3, denied).await);
    eprintln!("access control enforced: {denied} {denied_v1} on reviews-v1 (network A), {denied_v3} on reviews-v3 (network B)");
    assert!(denied_v1 > 0 && denied_v3 > 0, "RBAC denials counted in both clusters");
    let productpage = mesh.pod("productpage").unwrap();
    let closed = mesh.sample(productpage, "tcp-echo:9000", "tcp", 20).unwrap();
    assert_eq!(only(&closed.answers), ["error: closed without an answer"], "TCP is denied too");

    // productpage may GET /reviews* on 9080, in both clusters; nothing else is allowed.
    let policy = "apiVersion: networking.zephyr.solo.io/v1alpha1\nkind: AccessControlPolicy\nmetadata: {namespace: service-mesh-hub, name: productpage-reads-reviews}\nspec:\n  sourceSelector:\n    serviceAccountRefs:\n      serviceAccounts: [{name: bookinfo-productpage, namespace: default, cluster: management-plane}]\n  destinationSelector:\n    matcher: {namespaces: [default]}\n  allowedPaths: [\"/reviews*\"]\n  allowedMethods: [GET]\n  allowedPorts: [9080]\n";
    let access = mesh.config.join("mesh/access.yaml");
    support::write_atomically(&access, policy);
    let allowed = answers_become(mesh, "productpage", "reviews:9080", ("GET", "/reviews/1"), &reviews).await;
    for backend in reviews {
        assert_eq!(allowed.peers[backend], BTreeSet::from([PRODUCTPAGE_ID.to_string()]), "{backend}");
    }
    assert!(envoy_stat(&v3, "http.inbound_0.0.0.0_9080.rbac.allowed").await > 0, "allowed by the remote sidecar's RBAC");
    let others = [
        ("productpage", ("POST", "/reviews/1"), "another method"),
        ("productpage", ("GET", "/ratings/1"), "another path"),
        ("greeter", ("GET", "/reviews/1"), "another service account"),
    ];
    // (A connection the caller's sidecar pooled before the policy may carry
    // one last request under the rules it was opened with: Envoy closes it
    // after that (`SIDECAR_ENVOY_ARGS`, as pilot-agent runs it). So each is
    // sampled until refused, and must be refused within the wait.)
    for (from, (method, path), what) in others {
        eprintln!("{what}: {method} {path} from {from}");
        answers_become(mesh, from, "reviews:9080", (method, path), &["HTTP 403"]).await;
    }
    // tcp-echo is selected, but its port is not in allowedPorts: the connection is closed.
    let closed = mesh.sample(productpage, "tcp-echo:9000", "tcp", 20).unwrap();
    assert_eq!(only(&closed.answers), ["error: closed without an answer"], "a TCP port not allowed");

    // The policy gone: denied again. Enforcement off: everyone is allowed.
    std::fs::remove_file(&access).unwrap();
    answers_become(mesh, "productpage", "reviews:9080", ("GET", "/reviews/1"), &["HTTP 403"]).await;
    enforce("DISABLED");
    answers_become(mesh, "greeter", "reviews:9080", ("POST", "/anything"), &reviews).await;
    answering(mesh, "productpage", "tcp-echo:9000", "tcp", &["tcp-echo-v1", "tcp-echo-v2"]).await;
}

async fn lds_version(mesh: &CapturedMesh, proxy: &str) -> Option<String> {
    let s = mesh.syncz().await.into_iter().find(|s| s.proxy == proxy)?;
    let lds = s.types.get("LDS")?;
    (lds.state == "SYNCED").then(|| lds.acked_version.clone()).flatten()
}
