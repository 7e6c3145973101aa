//! `meshpilot demo`: the seed scenario on one machine. Copies an example
//! folder (DIR/<cluster>/, DIR/mesh/) to a scratch directory, starts
//! `meshpilot serve --config-dir` on it, a `meshpilot echo` process for every
//! pod at its pod IP (loopback addresses), a real Envoy sidecar for the client
//! workload bound to its pod IP, then sends traffic through the sidecar and
//! prints the live distribution per destination. Edit the copied policy while
//! it runs and watch the split move.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::demo_support::{Children, copy_dir, is_synced, share_line, tempfile_dir, wait_until};
use super::http;
use super::mesh::{offline_snapshot, validation_report};
use crate::admin::SyncStatus;
use crate::model::describe::{ServiceDescription, render};
use crate::xds::resource::ResourceType;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The example folder: DIR/<cluster>/*.yaml and DIR/mesh/*.yaml.
    #[arg(long, default_value = "examples/bookinfo")]
    pub example: PathBuf,
    /// The Envoy binary.
    #[arg(long, env = "ENVOY_BIN", default_value = "envoy")]
    pub envoy: PathBuf,
    /// How long to send traffic; 0s runs until Ctrl-C.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// The client workload (pods labelled app=<this>) whose sidecar sends the traffic.
    #[arg(long, default_value = "productpage")]
    pub client_app: String,
    /// The service the client calls, by its short name.
    #[arg(long, default_value = "reviews")]
    pub target: String,
    /// Requests per second through the sidecar.
    #[arg(long, default_value_t = 200)]
    pub rate: usize,
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub xds_addr: String,
    #[arg(long, default_value = "127.0.0.1:15014")]
    pub admin_addr: String,
    /// Keep the scratch directory (config copy and every process's log) after exiting.
    #[arg(long)]
    pub keep: bool,
    /// Port of the sidecar's Envoy admin page (on 127.0.0.1).
    #[arg(long, default_value_t = 15000)]
    pub envoy_admin_port: u16,
    /// Each cluster on its own network (examples/bookinfo-multinet): mTLS from the VirtualMesh's
    /// CA, remote calls through the east-west gateway; network namespaces when run as root,
    /// loopback addresses otherwise.
    #[arg(long)]
    pub multi_network: bool,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("finding the meshpilot binary")?;
    let work = tempfile_dir()?;
    let config = work.join("config");
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    copy_dir(&args.example, &config)?;
    let snapshot = offline_snapshot(&config)?;
    let (report, _) = validation_report(&snapshot);
    println!("== {} (copied to {})\n{report}", args.example.display(), config.display());

    // Workloads: one echo process per pod address; the client pod gets the sidecar instead.
    let mut children = Children(Vec::new());
    let mut client = None;
    let mut backends = BTreeSet::new();
    for (cluster, state) in &snapshot.clusters {
        for (svc, eps) in &state.endpoints {
            for ep in eps.iter() {
                let pod = ep.pod.clone().unwrap_or_else(|| format!("{}-{}", svc.1, ep.address));
                if ep.labels.get("app") == Some(&args.client_app) {
                    client.get_or_insert((cluster.clone(), svc.0.clone(), ep.clone(), pod));
                    continue;
                }
                for port in ep.ports.values() {
                    let addr = format!("{}:{port}", ep.address);
                    if backends.insert(addr.clone()) {
                        children.spawn(&format!("echo-{pod}"), Command::new(&me).args(["echo", "--listen", &addr, "--name", &pod]), &logs)?;
                    }
                }
            }
        }
    }
    let (client_cluster, client_ns, client_ep, client_pod) =
        client.with_context(|| format!("no pod labelled app={} in {}", args.client_app, args.example.display()))?;
    println!("started {} workload processes (meshpilot echo at each pod IP)", backends.len());

    children.spawn(
        "meshpilot",
        Command::new(&me)
            .args(["serve", "--config-dir"])
            .arg(&config)
            .args(["--xds-addr", &args.xds_addr, "--admin-addr", &args.admin_addr])
            // The local demo's sidecars prove nothing; their metadata names their identity.
            .arg("--insecure-self-asserted-identities"),
        &logs,
    )?;
    let node_id = format!("{client_pod}.{client_ns}");
    let labels: Vec<String> = client_ep.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let bootstrap = work.join("sidecar-bootstrap.json");
    let status = Command::new(&me)
        .args(["bootstrap", "--node-id", &node_id, "--cluster", &client_cluster, "--namespace", &client_ns])
        .args(["--labels", &labels.join(","), "--outbound-bind", &client_ep.address, "--xds-addr", &args.xds_addr])
        .args(["--admin-port", &args.envoy_admin_port.to_string(), "-o"])
        .arg(&bootstrap)
        .status()?;
    anyhow::ensure!(status.success(), "meshpilot bootstrap failed");
    children.spawn(
        "envoy",
        Command::new(&args.envoy).arg("-c").arg(&bootstrap).args(super::demo_support::SIDECAR_ENVOY_ARGS).args(["-l", "warning"]),
        &logs,
    )?;

    for addr in &backends {
        wait_until(&format!("backend {addr}"), Duration::from_secs(20), &mut children, || async {
            matches!(http::get(addr, "/").await, Ok((200, _)))
        })
        .await?;
    }
    let admin = args.admin_addr.clone();
    let synced = |proxy: String| {
        let admin = admin.clone();
        async move { is_synced(&admin, &proxy, &ResourceType::STATUS_COLUMNS).await }
    };
    wait_until("the sidecar to be SYNCED", Duration::from_secs(30), &mut children, || synced(node_id.clone())).await?;
    if let Ok((200, body)) = http::get(&args.admin_addr, "/debug/syncz").await {
        let rows: Vec<SyncStatus> = serde_json::from_str(&body).unwrap_or_default();
        println!("\n$ meshpilot proxy-status\n{}", super::status::render_status_table(&rows));
    }

    let target_key = format!("{}.{client_ns}.{client_cluster}", args.target);
    let sidecar = format!(
        "{}:{}",
        client_ep.address,
        snapshot
            .service(&crate::model::ServiceKey::new(&client_cluster, &client_ns, &args.target))
            .and_then(|s| s.ports.first())
            .map_or(9080, |p| p.port)
    );
    println!(
        "\n{}'s calls: GET http://{}/ through its sidecar at {sidecar}.\nEdit {} while this runs to move the split (Envoy admin: http://127.0.0.1:{}/).\n",
        args.client_app,
        args.target,
        config.join("mesh").display(),
        args.envoy_admin_port
    );
    let mut last_policy = String::new();
    let mut totals: BTreeMap<String, usize> = BTreeMap::new();
    let started = Instant::now();
    let window = Duration::from_secs(2);
    let per_window = (args.rate * 2).max(1);
    loop {
        if let Ok((200, body)) = http::get(&args.admin_addr, &format!("/debug/describe?service={target_key}")).await
            && let Ok(d) = serde_json::from_str::<ServiceDescription>(&body)
        {
            let text = render(&d);
            if text != last_policy {
                println!("$ meshpilot describe service {target_key}\n{text}");
                last_policy = text;
            }
        }
        let tick = Instant::now();
        let counts = tokio::select! {
            c = http::count_answers(&sidecar, &args.target, "/", per_window, 8) => c,
            _ = tokio::signal::ctrl_c() => break,
        };
        for (k, v) in &counts {
            *totals.entry(k.clone()).or_default() += v;
        }
        println!("[{:>4.0}s] {:>4} requests  {}", started.elapsed().as_secs_f64(), per_window, share_line(&counts));
        children.check_alive()?;
        if !args.duration.is_zero() && started.elapsed() >= args.duration {
            break;
        }
        if let Some(rest) = window.checked_sub(tick.elapsed()) {
            tokio::select! {
                _ = tokio::time::sleep(rest) => {}
                _ = tokio::signal::ctrl_c() => break,
            }
        }
    }
    println!("\ntotal {} requests: {}", totals.values().sum::<usize>(), share_line(&totals));
    drop(children);
    if args.keep {
        println!("logs: {}", logs.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}
