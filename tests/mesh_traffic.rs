//! The seed scenario through real Envoys (one network: every endpoint is
//! reachable directly): meshpilot serves the bookinfo example folder, real
//! `meshpilot echo` processes play the reviews pods at their pod IPs, and
//! requests go through productpage's Envoy sidecar to `reviews`. The split is
//! checked with a chi-square test (p > 0.001) over thousands of requests, then
//! moved, broken and deleted by editing the policy file while everything runs.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{Envoy, Meshpilot, assert_split, envoy_or_skip, random_loopback_prefix, sample, spawn_echo, wait_for};

/// Copies examples/bookinfo into `dest`, moving its pod IPs (127.0.10.x and
/// 127.0.20.x) to a random loopback prefix. Returns (management-plane, remote) prefixes.
fn copy_example(dest: &Path) -> (String, String) {
    let (a, b) = random_loopback_prefix();
    let mp = format!("127.{a}.{b}.");
    let rc = format!("127.{a}.{}.", b.wrapping_add(1));
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/bookinfo");
    for sub in ["management-plane", "remote-cluster", "mesh"] {
        std::fs::create_dir_all(dest.join(sub)).unwrap();
        for f in std::fs::read_dir(src.join(sub)).unwrap() {
            let f = f.unwrap().path();
            let text = std::fs::read_to_string(&f).unwrap().replace("127.0.10.", &mp).replace("127.0.20.", &rc);
            std::fs::write(dest.join(sub).join(f.file_name().unwrap()), text).unwrap();
        }
    }
    (mp, rc)
}

/// The ACKed version of `ty` in one proxy's sync status, when SYNCED.
fn synced_version(status: &meshpilot::admin::SyncStatus, ty: &str) -> Option<String> {
    let t = status.types.get(ty)?;
    (t.state == "SYNCED").then(|| t.acked_version.clone()).flatten()
}

/// The ACKed version of `ty` at `proxy`, when SYNCED.
async fn acked_version(mp: &Meshpilot, proxy: &str, ty: &str) -> Option<String> {
    synced_version(&mp.syncz().await.into_iter().find(|s| s.proxy == proxy)?, ty)
}

/// The proxy's routes as ACKed: RDS, and over delta ADS its virtual hosts (VHDS) too (one read of its status).
async fn rds_version(mp: &Meshpilot, proxy: &str) -> Option<String> {
    let status = mp.syncz().await.into_iter().find(|s| s.proxy == proxy)?;
    let rds = synced_version(&status, "RDS")?;
    if status.types.contains_key("VHDS") { Some(format!("{rds}+{}", synced_version(&status, "VHDS")?)) } else { Some(rds) }
}

/// Waits until `proxy` has ACKed a route configuration other than `old`.
async fn wait_new_routes(mp: &Meshpilot, proxy: &str, old: &str) -> String {
    wait_for(&format!("{proxy} to ACK new routes"), Duration::from_secs(20), || async { rds_version(mp, proxy).await.filter(|v| v != old) }).await
}

/// meshpilot's Prometheus lines for its scopes and rollbacks.
async fn metric_lines(mp: &Meshpilot) -> Vec<String> {
    let (_, body) = meshpilot::cli::http::get(&mp.admin_addr(), "/metrics").await.unwrap();
    body.lines().filter(|l| l.starts_with("meshpilot_scope_") || l.starts_with("meshpilot_policy_rollbacks")).map(String::from).collect()
}

/// What the sidecar counted per reviews cluster (`cluster.<name>.upstream_rq_total` and `_retry`).
async fn reviews_counters(via: &Envoy) -> BTreeMap<String, u64> {
    let stats = via.admin_get("/stats?filter=upstream_rq_(total|retry)$").await;
    stats
        .lines()
        .filter(|l| l.contains("reviews"))
        .filter_map(|l| {
            let (name, n) = l.rsplit_once(": ")?;
            Some((name.to_string(), n.trim().parse().ok()?))
        })
        .collect()
}

/// Samples `n` answers through `via`'s listener at `addr` and asserts the
/// split (p > 0.001), with one second chance. CI has seen rare single misses
/// with one stable, ACKed configuration and no NACK (3 in about 12 runs, each
/// of the plain-ADS test, never reproduced in dozens of runs here, loaded or
/// not): a miss is reported on the terminal with what the sidecar counted per
/// cluster during it and the routes it holds, and a second, independent
/// sample must match. A real misroute misses both.
async fn sampled_split(via: &Envoy, addr: &str, host: &str, n: usize, expected: &[(&str, f64)]) -> (BTreeMap<String, usize>, f64) {
    let before = reviews_counters(via).await;
    let counts = sample(addr, host, n).await;
    let miss = match support::split_matches(&counts, expected) {
        Ok(stat) => return (counts, stat),
        Err(miss) => miss,
    };
    let after = reviews_counters(via).await;
    let counted: BTreeMap<&String, u64> = after.iter().map(|(k, v)| (k, v - before.get(k).copied().unwrap_or(0))).filter(|(_, d)| *d > 0).collect();
    let dump: serde_json::Value = serde_json::from_str(&via.admin_get("/config_dump?resource=dynamic_route_configs").await).unwrap_or_default();
    let routes: Vec<String> =
        dump["configs"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| {
                let version = c["version_info"].as_str().unwrap_or("").to_string();
                c["route_config"]["virtual_hosts"].as_array().cloned().unwrap_or_default().into_iter().filter_map(move |vh| {
                    vh["name"].as_str().is_some_and(|n| n.starts_with("reviews")).then(|| format!("{version} {}", vh["routes"]))
                })
            })
            .collect();
    support::tell_terminal(&format!(
        "\nSPLIT MISS via {} to {host}: {miss}; the sidecar counted meanwhile: {counted:?}; \
         its reviews routes: {routes:?}\nsampling once more\n",
        via.node_id
    ));
    let counts = sample(addr, host, n).await;
    let stat = assert_split(&counts, expected);
    (counts, stat)
}

async fn policyz(mp: &Meshpilot) -> serde_json::Value {
    let (_, body) = meshpilot::cli::http::get(&mp.admin_addr(), "/debug/policyz").await.unwrap();
    serde_json::from_str(&body).unwrap()
}

const V1: &str = "reviews-v1-5b96";
const V2: &str = "reviews-v2-68c4";
const V3: &str = "reviews-v3-7d99";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_split_through_real_envoy_moves_with_the_policy_file() {
    seed_split("seed_split_through_real_envoy_moves_with_the_policy_file", false).await;
}

/// The same over delta ADS, where each port's virtual hosts come over VHDS:
/// an edit of one service's policy sends that virtual host, and the route
/// configurations themselves stay as Envoy ACKed them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_split_over_delta_ads_and_vhds_moves_with_the_policy_file() {
    seed_split("seed_split_over_delta_ads_and_vhds_moves_with_the_policy_file", true).await;
}

async fn seed_split(test: &str, delta: bool) {
    let Some(envoy) = envoy_or_skip(test) else { return };
    let transport: &[&str] = if delta { &["--delta"] } else { &[] };
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path();
    // A failure shows meshpilot's and the Envoys' last log lines.
    let _watchdog = support::Watchdog::arm(test, Duration::from_secs(300), logs);
    let config = logs.join("config");
    let (mp_net, rc_net) = copy_example(&config);

    let _backends = [
        spawn_echo(logs, V1, &format!("{mp_net}21:9080")).await,
        spawn_echo(logs, V2, &format!("{mp_net}22:9080")).await,
        spawn_echo(logs, V3, &format!("{rc_net}23:9080")).await,
    ];
    let mp = Meshpilot::start_config_dir(logs, &config).await;
    // productpage's sidecar (management-plane) and ratings' sidecar (remote-cluster), each on its pod's address.
    let pp_bind = format!("{mp_net}11");
    let ratings_bind = format!("{rc_net}13");
    let productpage = Envoy::start_in(
        &envoy,
        logs,
        "productpage-v1-7f9d.default",
        "management-plane",
        mp.xds_port,
        &[&["--labels", "app=productpage,version=v1", "--outbound-bind", &pp_bind], transport].concat(),
    );
    let ratings = Envoy::start_in(
        &envoy,
        logs,
        "ratings-v1-8b4f.default",
        "remote-cluster",
        mp.xds_port,
        &[&["--labels", "app=ratings,version=v1", "--outbound-bind", &ratings_bind], transport].concat(),
    );
    mp.wait_synced(&productpage.node_id).await;
    mp.wait_synced(&ratings.node_id).await;
    let pp_addr = format!("{pp_bind}:9080");

    // 1. The seed's policy, verbatim: 75% remote v3, 15% local v1, 10% local v2.
    let (counts, stat) = sampled_split(&productpage, &pp_addr, "reviews:9080", 3000, &[(V3, 75.0), (V1, 15.0), (V2, 10.0)]).await;
    eprintln!("seed split from productpage: {counts:?} chi-square {stat:.2}");

    // The policy reaches clients in the other cluster too: ratings (in remote-cluster) calling
    // management-plane's reviews by its .global name gets the same split.
    let (counts, stat) = sampled_split(
        &ratings,
        &format!("{ratings_bind}:9080"),
        "reviews.default.svc.management-plane.global",
        2000,
        &[(V3, 75.0), (V1, 15.0), (V2, 10.0)],
    )
    .await;
    eprintln!("seed split from remote-cluster: {counts:?} chi-square {stat:.2}");
    // ...while its own short name stays in its own cluster.
    let counts = sample(&format!("{ratings_bind}:9080"), "reviews", 50).await;
    assert_eq!(counts.get(V3), Some(&50), "{counts:?}");

    // 2. Edit the policy file: 50/50 between the local versions, nothing remote.
    let policy_file = config.join("mesh/traffic-policy.yaml");
    let seed_text = std::fs::read_to_string(&policy_file).unwrap();
    let before = rds_version(&mp, &productpage.node_id).await.unwrap();
    let rds_before = acked_version(&mp, &productpage.node_id, "RDS").await.unwrap();
    support::write_atomically(
        &policy_file,
        &seed_text.replace("weight: 75", "weight: 0").replace("weight: 15", "weight: 50").replace("weight: 10", "weight: 50"),
    );
    let half_half = wait_new_routes(&mp, &productpage.node_id, &before).await;
    if delta {
        // Only the virtual host moved: the route configurations are the ones Envoy had.
        assert_eq!(acked_version(&mp, &productpage.node_id, "RDS").await.unwrap(), rds_before, "RDS unchanged over VHDS");
        let dump = productpage.admin_get("/config_dump").await;
        assert!(dump.contains("\"vhds\""), "Envoy holds route configurations with VHDS");
    }
    let (counts, stat) = sampled_split(&productpage, &pp_addr, "reviews:9080", 2000, &[(V1, 50.0), (V2, 50.0)]).await;
    eprintln!("after the edit: {counts:?} chi-square {stat:.2}");
    let metrics = metric_lines(&mp).await;
    let patches = metrics.iter().find_map(|l| l.strip_prefix("meshpilot_scope_patches_total ")?.parse::<u64>().ok());
    assert!(patches.is_some_and(|n| n > 0), "the edit patched the served scopes: {metrics:?}");

    // 3. A bad edit is INVALID in /debug/policyz, names the field, and the last good split keeps serving.
    support::write_atomically(
        &policy_file,
        &seed_text.replace("weight: 75", "weight: 0").replace("weight: 15", "weight: 0").replace("weight: 10", "weight: 0"),
    );
    let status = wait_for("the bad edit to show INVALID", Duration::from_secs(20), || async {
        let p = policyz(&mp).await;
        let st = p["policies"]["service-mesh-hub/simple"].clone();
        (st["state"] == "INVALID").then_some(st)
    })
    .await;
    let messages = status["messages"].to_string();
    assert!(messages.contains("spec.trafficShift.destinations: the weights add up to 0"), "{messages}");
    assert!(messages.contains("the last accepted version (generation 2) keeps serving"), "{messages}");
    assert_eq!(rds_version(&mp, &productpage.node_id).await.as_deref(), Some(half_half.as_str()), "no push for a rejected edit");
    sampled_split(&productpage, &pp_addr, "reviews:9080", 1000, &[(V1, 50.0), (V2, 50.0)]).await;
    let proxies = mp.syncz().await;
    assert!(proxies.iter().all(|p| p.types.values().all(|t| t.last_error.is_none())), "no NACKs: {proxies:?}");

    // 3b. A policy meshpilot accepts but Envoy refuses (a header value over
    // the 16 KiB Envoy's proto rules allow, which meshpilot does not check):
    // its NACK marks that policy INVALID with Envoy's message, the routes
    // without it are sent again and ACKed, and the other policy keeps serving.
    let regex_file = config.join("mesh/big-header-policy.yaml");
    support::write_atomically(
        &regex_file,
        &format!(
            "apiVersion: networking.zephyr.solo.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{namespace: service-mesh-hub, name: big-header}}\nspec:\n  destinationSelector: {{serviceRefs: {{services: [{{cluster: management-plane, name: reviews, namespace: default}}]}}}}\n  httpRequestMatchers: [{{prefix: /big}}]\n  headerManipulation: {{appendRequestHeaders: {{x-big: {}}}}}\n",
            "a".repeat(17_000)
        ),
    );
    let rejected = wait_for("Envoy's rejection to mark big-header INVALID", Duration::from_secs(30), || async {
        let st = policyz(&mp).await["policies"]["service-mesh-hub/big-header"].clone();
        (st["state"] == "INVALID").then_some(st)
    })
    .await;
    let messages = rejected["messages"].to_string();
    assert!(metric_lines(&mp).await.iter().any(|l| l == "meshpilot_policy_rollbacks_total 1"), "one rollback counted");
    // (Envoy cuts its message at 4 KiB, and starts it with a dump of the resource: the reason may not arrive.)
    assert!(messages.contains("Envoy rejected the routes generation 1 produces (NACK)"), "{messages}");
    assert_eq!(policyz(&mp).await["policies"]["service-mesh-hub/simple"]["state"], "INVALID", "simple is as it was (its bad edit)");
    // The routes without it are ACKed again: every type SYNCED, and the split is the one before.
    wait_for("productpage to ACK the routes without big-header", Duration::from_secs(20), || async {
        let status = mp.syncz().await.into_iter().find(|s| s.proxy == productpage.node_id)?;
        status.types.values().all(|t| t.state == "SYNCED").then_some(())
    })
    .await;
    sampled_split(&productpage, &pp_addr, "reviews:9080", 1000, &[(V1, 50.0), (V2, 50.0)]).await;
    sampled_split(&ratings, &format!("{ratings_bind}:9080"), "reviews.default.svc.management-plane.global", 500, &[(V1, 50.0), (V2, 50.0)]).await;
    std::fs::remove_file(&regex_file).unwrap();

    // 4. Delete the policy: reviews is the local service again, nothing goes to the remote cluster.
    std::fs::remove_file(&policy_file).unwrap();
    wait_new_routes(&mp, &productpage.node_id, &half_half).await;
    let counts = sample(&pp_addr, "reviews:9080", 1000).await;
    assert_eq!(counts.get(V3), None, "{counts:?}");
    assert!(counts.get(V1).is_some_and(|n| *n > 300) && counts.get(V2).is_some_and(|n| *n > 300), "both local versions serve: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 1000, "every request answered: {counts:?}");
    assert!(policyz(&mp).await["policies"].as_object().unwrap().is_empty());
}

#[tokio::test]
async fn validate_exits_non_zero_with_the_policy_field_and_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config");
    copy_example(&config);
    let policy = config.join("mesh/traffic-policy.yaml");
    let ok = std::process::Command::new(support::meshpilot_bin()).arg("validate").arg(&config).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("TrafficPolicy service-mesh-hub/simple"));
    let text = std::fs::read_to_string(&policy).unwrap().replace("version: v2", "version: v7");
    std::fs::write(&policy, text).unwrap();
    let bad = std::process::Command::new(support::meshpilot_bin()).arg("validate").arg(&config).output().unwrap();
    let out = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{out}");
    assert!(out.contains("service-mesh-hub/simple") && out.contains("INVALID"), "{out}");
    assert!(out.contains("spec.trafficShift.destinations[2].subset: {version=v7} matches no pod of reviews.default.management-plane"), "{out}");
    // An Istio Sidecar whose host is not namespace/dnsName: named by field.
    let sidecar = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: productpage, namespace: default}\nspec:\n  egress:\n  - hosts: [\"./*\", \"reviews\"]\n";
    std::fs::write(config.join("mesh/sidecar.yaml"), sidecar).unwrap();
    let bad = std::process::Command::new(support::meshpilot_bin()).arg("validate").arg(&config).output().unwrap();
    let out = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{out}");
    assert!(out.contains("Sidecar default/productpage: INVALID"), "{out}");
    assert!(out.contains("spec.egress[0].hosts[1]: \"reviews\" is not namespace/dnsName"), "{out}");
}

/// The README's main job: `meshpilot demo` brings up the seed scenario and prints the live split.
#[tokio::test]
async fn demo_runs_the_seed_scenario_and_prints_the_split() {
    let Some(envoy) = envoy_or_skip("demo_runs_the_seed_scenario_and_prints_the_split") else { return };
    let ports = [support::free_port(), support::free_port(), support::free_port()];
    let out = tokio::process::Command::new(support::meshpilot_bin())
        .args(["demo", "--duration", "1s", "--rate", "500"])
        .arg("--envoy")
        .arg(&envoy)
        .arg("--example")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/bookinfo"))
        .args(["--xds-addr", &format!("127.0.0.1:{}", ports[0]), "--admin-addr", &format!("127.0.0.1:{}", ports[1])])
        .args(["--envoy-admin-port", &ports[2].to_string()])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let total = stdout.lines().find(|l| l.starts_with("total ")).unwrap_or_else(|| panic!("no total line:\n{stdout}"));
    let share = |pod: &str| -> f64 {
        let rest = &total[total.find(pod).unwrap_or_else(|| panic!("{pod} missing: {total}")) + pod.len()..];
        rest.trim_start().split('%').next().unwrap().trim().parse().unwrap()
    };
    // 1,000 requests (one 2 s window at 500/s): each share within 5 points of the policy's.
    for (pod, want) in [(V3, 75.0), (V1, 15.0), (V2, 10.0)] {
        let got = share(pod);
        assert!((got - want).abs() < 5.0, "{pod}: {got}% vs {want}%\n{stdout}");
    }
    assert!(stdout.contains("SYNCED") && stdout.contains("75.00%  reviews.default.remote-cluster"), "{stdout}");
}
