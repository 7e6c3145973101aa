//! `meshpilot demo --multi-network`: the seed scenario with each cluster on
//! its own network (examples/bookinfo-multinet). As root, the two networks
//! are Linux network namespaces joined only by the remote cluster's
//! east-west gateway; otherwise every address moves to loopback (the
//! networks are then logical only: traffic still goes through the gateway
//! because that is what meshpilot tells the sidecars). Every pod gets a real
//! Envoy sidecar with an mTLS identity from the VirtualMesh's CA, the gateway
//! a real Envoy, every application a `meshpilot echo`; the client's calls are
//! counted per destination, with the identity each backend saw and the
//! gateway's connection count.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use super::demo::DemoArgs;
use super::demo_support::{Children, Window, copy_dir, is_synced, report_traffic, share_line, start_proxy, start_serving, tempfile_dir, wait_until};
use super::http;
use super::mesh::{offline_snapshot, validation_report};
use crate::admin::SyncStatus;
use crate::netns::{self, Topology};
use crate::xds::resource::ResourceType;

/// Where each process runs: a network namespace, or the host (loopback mode).
#[derive(Clone)]
enum Place {
    Namespace(String),
    Host,
}

impl Place {
    fn command(&self, program: &Path) -> Command {
        match self {
            Place::Namespace(ns) => Topology::command(ns, program),
            Place::Host => Command::new(program),
        }
    }
}

/// Loopback mode: 10.a.b.c → 127.a.b.c (every pod and the gateway stay distinct).
fn to_loopback(text: &str) -> String {
    text.replace("10.10.0.", "127.10.0.").replace("10.20.0.", "127.20.0.").replace("10.99.0.", "127.99.0.")
}

/// The application and outbound-listener addresses of a pod at `ip` (loopback, unique per pod).
fn side_addresses(ip: &str) -> (String, String) {
    let o: Vec<&str> = ip.split('.').collect();
    let (z, w) = (o.get(2).copied().unwrap_or("0"), o.get(3).copied().unwrap_or("1"));
    (format!("127.1.{z}.{w}"), format!("127.2.{z}.{w}"))
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if crate::netns::pods::available() {
        return super::demo_captured::run(args).await;
    }
    let me = std::env::current_exe().context("finding the meshpilot binary")?;
    let example = if args.example == Path::new("examples/bookinfo") { PathBuf::from("examples/bookinfo-multinet") } else { args.example.clone() };
    let work = tempfile_dir()?;
    let config = work.join("config");
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    copy_dir(&example, &config)?;

    let namespaces = netns::available();
    let topology = if namespaces {
        let id = format!("{}", std::process::id() % 100000);
        Some(Topology::create(&id).context("creating the network namespaces")?)
    } else {
        for f in walk(&config)? {
            let text = std::fs::read_to_string(&f)?;
            std::fs::write(&f, to_loopback(&text))?;
        }
        None
    };
    match &topology {
        Some(t) => println!(
            "== two networks as Linux network namespaces: {} (management-plane) and {} (remote-cluster), joined only by the gateway's link",
            t.management, t.remote
        ),
        None => println!("== not root: no network namespaces; every address is on loopback and the two networks are logical only"),
    }
    let snapshot = offline_snapshot(&config)?;
    let (report, _) = validation_report(&snapshot);
    println!("== {} (copied to {})\n{report}", example.display(), config.display());
    let place_of = |cluster: &str| match &topology {
        Some(t) if cluster == "management-plane" => Place::Namespace(t.management.clone()),
        Some(t) => Place::Namespace(t.remote.clone()),
        None => Place::Host,
    };

    let mut children = Children(Vec::new());
    let xds_socket = work.join("xds.sock");
    let addrs = (args.xds_addr.as_str(), args.admin_addr.as_str());
    start_serving(&mut children, &me, &config, &xds_socket, addrs, &["--debounce-after", "20ms"], &logs).await?;

    // One sidecar per pod (the client's sends the traffic), one echo per backend, one gateway per network.
    let mut proxies = Vec::new();
    let mut client = None;
    let mut gateway_admin = None;
    let start_envoy = |children: &mut Children, place: &Place, node: &str, cluster: &str, ns: &str, extra: Vec<String>| -> anyhow::Result<PathBuf> {
        let admin = work.join(format!("{node}.admin"));
        let bootstrap = work.join(format!("{node}.json"));
        let mut bootstrap_args: Vec<String> = ["--cluster", cluster, "--namespace", ns].map(String::from).into();
        bootstrap_args.extend(["--xds-addr".to_string(), format!("unix:{}", xds_socket.display())]);
        bootstrap_args.extend(extra);
        start_proxy(children, &me, place.command(&args.envoy), node, &bootstrap_args, (&bootstrap, &admin), &logs)?;
        Ok(admin)
    };
    for (cluster, state) in &snapshot.clusters {
        let place = place_of(cluster);
        for (svc, eps) in &state.endpoints {
            for ep in eps.iter().filter(|e| e.mesh_tls) {
                let pod = ep.pod.clone().unwrap_or_else(|| format!("{}-{}", svc.1, ep.address));
                let (app, outbound) = side_addresses(&ep.address);
                let labels: Vec<String> = ep.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let node = format!("{pod}.{}", svc.0);
                let extra = vec![
                    "--labels".into(),
                    labels.join(","),
                    "--service-account".into(),
                    ep.service_account.clone(),
                    "--instance-ip".into(),
                    ep.address.clone(),
                    "--outbound-bind".into(),
                    outbound.clone(),
                    "--app-address".into(),
                    app.clone(),
                ];
                start_envoy(&mut children, &place, &node, cluster, &svc.0, extra)?;
                proxies.push(node);
                if ep.labels.get("app") == Some(&args.client_app) {
                    client.get_or_insert((place.clone(), outbound, svc.0.clone(), cluster.clone()));
                    continue;
                }
                for port in ep.ports.values() {
                    children.spawn(
                        &format!("echo-{pod}"),
                        place.command(&me).args(["echo", "--listen", &format!("{app}:{port}"), "--name", &pod]),
                        &logs,
                    )?;
                }
            }
        }
        for gw in snapshot.gateways.values().flatten().filter(|g| g.service.cluster == *cluster) {
            let node = format!("{}.{}", gw.service.name, gw.service.namespace);
            let admin = start_envoy(
                &mut children,
                &place,
                &node,
                cluster,
                &gw.service.namespace,
                vec![
                    "--role".into(),
                    "gateway".into(),
                    "--instance-ip".into(),
                    gw.address.clone(),
                    "--labels".into(),
                    format!("app={}", gw.service.name),
                ],
            )?;
            proxies.push(node);
            gateway_admin.get_or_insert(admin);
        }
    }
    let (client_place, client_addr, client_ns, client_cluster) =
        client.with_context(|| format!("no pod labelled app={} with a sidecar in {}", args.client_app, example.display()))?;
    let admin = args.admin_addr.clone();
    for proxy in &proxies {
        let admin = admin.clone();
        wait_until(&format!("{proxy} to be SYNCED"), Duration::from_secs(30), &mut children, || {
            let admin = admin.clone();
            let proxy = proxy.clone();
            async move { is_synced(&admin, &proxy, &[ResourceType::Cluster, ResourceType::Listener]).await }
        })
        .await?;
    }
    if let Ok((200, body)) = http::get(&args.admin_addr, "/debug/syncz").await {
        let rows: Vec<SyncStatus> = serde_json::from_str(&body).unwrap_or_default();
        println!("\n$ meshpilot proxy-status\n{}", super::status::render_status_table(&rows));
    }

    let port = snapshot
        .service(&crate::model::ServiceKey::new(&client_cluster, &client_ns, &args.target))
        .and_then(|s| s.ports.first())
        .map_or(9080, |p| p.port);
    let sidecar = format!("{client_addr}:{port}");
    println!(
        "\n{}'s calls: GET http://{}/ through its sidecar at {sidecar}; every hop mTLS, remote calls through the east-west gateway.\nEdit {} while this runs to move the split.\n",
        args.client_app,
        args.target,
        config.join("mesh").display()
    );
    let sample = |n: usize| -> anyhow::Result<Window> {
        let out = client_place
            .command(&me)
            .args(["sample", "--to", &sidecar, "--host", &args.target, "--count", &n.to_string(), "--concurrency", "8", "--json"])
            .output()?;
        anyhow::ensure!(out.status.success(), "meshpilot sample failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok((serde_json::from_value(v["answers"].clone())?, serde_json::from_value(v["peers"].clone())?))
    };
    let totals = report_traffic((args.duration, args.rate), sample, gateway_admin.as_deref(), || children.check_alive()).await?;
    println!("\ntotal {} requests: {}", totals.values().sum::<usize>(), share_line(&totals));
    drop(children);
    drop(topology);
    if args.keep {
        println!("logs: {}", logs.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push(p);
        }
    }
    Ok(out)
}
