//! The `meshpilot` command line: one binary, one subcommand per job.

pub mod cluster;
#[cfg(feature = "testkit")]
pub mod demo;
#[cfg(feature = "testkit")]
pub mod demo_captured;
#[cfg(feature = "testkit")]
pub mod demo_multinet;
#[cfg(feature = "testkit")]
pub mod demo_support;
#[cfg(feature = "testkit")]
pub mod echo;
pub mod http;
#[cfg(feature = "testkit")]
pub mod load;
pub mod mesh;
pub mod serve;
pub mod status;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::bootstrap::{BootstrapOptions, XdsTls, bootstrap};
use crate::xds::node::{InterceptionMode, ProxyRole};

#[derive(Debug, Parser)]
#[command(name = "meshpilot", version, about = "An Envoy xDS control plane for cross-cluster routing")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane: ADS (SotW and delta), per-type xDS and CSDS on --xds-addr; health,
    /// metrics and debug endpoints on --admin-addr.
    Serve(serve::ServeArgs),
    /// Write an Envoy v3 bootstrap that connects a proxy to meshpilot over ADS.
    Bootstrap(BootstrapArgs),
    /// Show every connected proxy and whether each xDS type is SYNCED (like `istioctl proxy-status`).
    ProxyStatus(status::AdminArgs),
    /// Print what meshpilot last sent one proxy, as JSON.
    ConfigDump(status::ConfigDumpArgs),
    /// Check a config dir offline: every TrafficPolicy's state and messages; exits non-zero on problems.
    Validate(mesh::ValidateArgs),
    /// Show how meshpilot routes to something (`describe service reviews.default.management-plane`).
    #[command(subcommand)]
    Describe(mesh::DescribeWhat),
    #[cfg(feature = "testkit")]
    /// Run the seed scenario locally: control plane, workloads, a real Envoy sidecar, live traffic split.
    Demo(demo::DemoArgs),
    #[cfg(feature = "testkit")]
    /// A tiny HTTP backend that answers every request with its own name (for demos and tests).
    Echo(echo::EchoArgs),
    /// Register a cluster with the management cluster (least-privilege reader identity + KubernetesCluster).
    Cluster(cluster::ClusterArgs),
    /// Send requests through a proxy and count who answered (and, from `meshpilot echo`, the caller identity each saw).
    Sample(SampleArgs),
    #[cfg(feature = "testkit")]
    /// Simulate N Envoys against an xDS server and report sync time, change-to-delivery latency,
    /// bytes sent, and the control plane's RSS and CPU.
    Load(load::LoadArgs),
    #[cfg(feature = "testkit")]
    /// Write a synthetic config dir: S services x C clusters x E endpoints, T TrafficPolicies.
    Fixtures(FixturesArgs),
    /// Print meshpilot's CustomResourceDefinitions (or write them, one file each, with --out-dir).
    Crds(CrdsArgs),
}

#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// Where to send the requests (the application's side of a sidecar), HOST:PORT.
    #[arg(long)]
    pub to: String,
    /// The Host header (the service called); default: what --to names, as a pod's client sends it.
    #[arg(long)]
    pub host: Option<String>,
    /// http (HTTP/1.1), h2c (cleartext HTTP/2), grpc (unary calls) or tcp (connections).
    #[arg(long, value_enum, default_value = "http")]
    pub protocol: http::SampleProtocol,
    #[arg(long, default_value = "/")]
    pub path: String,
    /// The HTTP method (http and h2c).
    #[arg(long, default_value = "GET")]
    pub method: String,
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Stop sending after this long (each request also has 10 s); what was not sent counts as an error.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub within: std::time::Duration,
    /// Print JSON: {"answers": {answer: count}, "peers": {answer: [caller identities]}}.
    #[arg(long)]
    pub json: bool,
}

async fn run_sample(args: SampleArgs) -> anyhow::Result<()> {
    anyhow::ensure!(crate::model::policy::METHODS.contains(&args.method.as_str()), "--method {:?} is not an HTTP method", args.method);
    let target = (args.host.as_deref(), args.method.as_str(), args.path.as_str());
    let answers = http::sample(&args.to, target, (args.count, args.concurrency), args.protocol, args.within).await;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut peers: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    let mut versions: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for a in answers {
        *counts.entry(a.answer.clone()).or_default() += 1;
        // x-forwarded-client-cert: `By=…;Hash=…;URI=spiffe://…` — keep the caller's URI.
        let uri = a.peer.split(';').find_map(|kv| kv.strip_prefix("URI=")).unwrap_or("").to_string();
        peers.entry(a.answer.clone()).or_default().insert(uri);
        versions.entry(a.answer).or_default().insert(a.version);
    }
    if args.json {
        println!("{}", serde_json::json!({ "answers": counts, "peers": peers, "versions": versions }));
    } else {
        let total: usize = counts.values().sum();
        for (answer, n) in &counts {
            let who: Vec<&String> = peers[answer].iter().filter(|p| !p.is_empty()).collect();
            println!(
                "{answer:<24} {n:>6}  {:>5.1}%  {}",
                100.0 * *n as f64 / total.max(1) as f64,
                if who.is_empty() {
                    "(no client certificate seen)".to_string()
                } else {
                    format!("caller {}", who.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))
                }
            );
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
#[cfg(feature = "testkit")]
pub struct FixturesArgs {
    /// The folder to write (DIR/cluster-<i>/svc-<n>.yaml, DIR/mesh/).
    #[arg(long, required_unless_present = "kubeconfig")]
    pub out: Option<PathBuf>,
    /// Instead: create the mesh in this cluster through its API (one cluster: Services,
    /// ServiceAccounts and Pods whose EndpointSlices the cluster's controller writes, and the
    /// TrafficPolicies), for `serve --kubernetes` and istiod to watch the same objects.
    #[arg(long, conflicts_with = "out")]
    pub kubeconfig: Option<PathBuf>,
    #[arg(long, requires = "kubeconfig")]
    pub context: Option<String>,
    /// The registered name of that cluster (what the TrafficPolicies name).
    #[arg(long, default_value = "management-plane")]
    pub cluster_name: String,
    /// Also each TrafficPolicy's Istio equivalent (a VirtualService and a DestinationRule).
    #[arg(long, requires = "kubeconfig")]
    pub istio: bool,
    #[arg(long, default_value_t = 1000)]
    pub services: usize,
    #[arg(long, default_value_t = 3)]
    pub clusters: usize,
    #[arg(long, default_value_t = 10)]
    pub endpoints: usize,
    #[arg(long, default_value_t = 100)]
    pub policies: usize,
    /// Also write one Istio Sidecar per namespace importing only that
    /// namespace's services (`./*`): every proxy sees a tenth of the mesh.
    #[arg(long)]
    pub sidecars: bool,
    /// Give the VirtualMesh a builtin CA: mTLS between every workload, and a
    /// certificate for serve's --xds-tls-addr (kept with serve --ca-dir).
    #[arg(long)]
    pub mtls: bool,
}

#[derive(Debug, clap::Args)]
pub struct CrdsArgs {
    /// Write one YAML file per CRD into this folder (deploy/crds).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

fn run_crds(args: CrdsArgs) -> anyhow::Result<()> {
    for (file, crd) in crate::model::crd::all_crds() {
        let text = crate::model::crd::render(&crd);
        match &args.out_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                let path = dir.join(file);
                std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            None => print!("---\n{text}"),
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Sidecar,
    Gateway,
}

#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    /// The proxy's node id (unique per proxy).
    #[arg(long)]
    pub node_id: String,
    /// The Kubernetes cluster the proxy runs in.
    #[arg(long)]
    pub cluster: String,
    #[arg(long, default_value = "default")]
    pub namespace: String,
    #[arg(long, value_enum, default_value = "sidecar")]
    pub role: RoleArg,
    /// Workload labels, as k=v,k2=v2.
    #[arg(long, default_value = "")]
    pub labels: String,
    /// The network the proxy is on (Istio's topology.istio.io/network).
    #[arg(long)]
    pub network: Option<String>,
    /// meshpilot's xDS address, HOST:PORT, or unix:PATH (a Unix socket: reaches meshpilot
    /// from another network namespace).
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub xds_addr: String,
    /// Port of Envoy's own admin page (bound on 127.0.0.1).
    #[arg(long, default_value_t = 15000)]
    pub admin_port: u16,
    /// Serve Envoy's admin page on this Unix socket instead.
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// The workload's service account (its mTLS identity: spiffe://<trust domain>/ns/<ns>/sa/<sa>).
    #[arg(long)]
    pub service_account: Option<String>,
    /// The workload's (pod's) IP; repeat for several. Inbound mTLS listeners bind here.
    #[arg(long = "instance-ip")]
    pub instance_ips: Vec<String>,
    /// Where the application listens for traffic the sidecar accepted (default 127.0.0.1).
    #[arg(long)]
    pub app_address: Option<String>,
    /// Address the proxy's outbound listeners bind to (explicit mode; default 127.0.0.1).
    /// Give each proxy on one machine its own loopback address.
    #[arg(long)]
    pub outbound_bind: Option<String>,
    /// How the pod's traffic reaches the sidecar (Istio's INTERCEPTION_MODE): `redirect`
    /// (iptables capture to 15001/15006, Istio's layout) or `none` (explicit loopback
    /// listeners the application calls). Default: none with --outbound-bind, else redirect.
    #[arg(long, value_enum)]
    pub interception: Option<InterceptionArg>,
    /// Use incremental (delta) xDS.
    #[arg(long)]
    pub delta: bool,
    /// Reach meshpilot over TLS (its --xds-tls-addr), trusting this root (the
    /// `istio-ca-root-cert` ConfigMap's root-cert.pem).
    #[arg(long)]
    pub xds_root_cert: Option<PathBuf>,
    /// The name meshpilot's TLS certificate is checked for.
    #[arg(long, default_value = "meshpilot.service-mesh-hub.svc", requires = "xds_root_cert")]
    pub xds_server_name: String,
    /// A file holding the workload's ServiceAccount token (audience istio-ca, e.g.
    /// `kubectl create token SA --audience istio-ca`): sent on the xDS stream so the proxy
    /// proves its identity and gets its certificate. Read once, when the bootstrap is written:
    /// write the bootstrap again before the token expires. Needs --xds-root-cert (never sent in clear).
    #[arg(long, requires = "xds_root_cert")]
    pub token_file: Option<PathBuf>,
    /// Write here instead of stdout.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum InterceptionArg {
    Redirect,
    Tproxy,
    None,
}

/// Parses `k=v,k2=v2` labels.
pub fn parse_labels(s: &str) -> anyhow::Result<BTreeMap<String, String>> {
    s.split(',')
        .map(str::trim)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').with_context(|| format!("label {kv:?} is not key=value"))?;
            anyhow::ensure!(!k.is_empty(), "label {kv:?} has an empty key");
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

fn split_host_port(addr: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = addr.rsplit_once(':').with_context(|| format!("--xds-addr {addr:?} is not HOST:PORT"))?;
    let port = port.parse().with_context(|| format!("--xds-addr {addr:?}: bad port"))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
}

fn run_bootstrap(args: BootstrapArgs) -> anyhow::Result<()> {
    let (xds_pipe, (xds_host, xds_port)) = match args.xds_addr.strip_prefix("unix:") {
        Some(path) => (Some(path.to_string()), (String::new(), 0)),
        None => (None, split_host_port(&args.xds_addr)?),
    };
    let opts = BootstrapOptions {
        node_id: args.node_id,
        cluster: args.cluster,
        namespace: args.namespace,
        role: match args.role {
            RoleArg::Sidecar => ProxyRole::Sidecar,
            RoleArg::Gateway => ProxyRole::Gateway,
        },
        labels: parse_labels(&args.labels)?,
        network: args.network,
        xds_host,
        xds_port,
        admin_port: args.admin_port,
        delta: args.delta,
        outbound_bind: args.outbound_bind,
        interception: args.interception.map(|i| match i {
            InterceptionArg::Redirect => InterceptionMode::Redirect,
            InterceptionArg::Tproxy => InterceptionMode::Tproxy,
            InterceptionArg::None => InterceptionMode::None,
        }),
        service_account: args.service_account,
        instance_ips: args.instance_ips,
        app_address: args.app_address,
        xds_pipe,
        admin_pipe: args.admin_socket.map(|p| p.display().to_string()),
        xds_tls: match &args.xds_root_cert {
            Some(root) => Some(XdsTls {
                root_cert_path: std::path::absolute(root).unwrap_or_else(|_| root.clone()).display().to_string(),
                server_name: args.xds_server_name.clone(),
            }),
            None => None,
        },
        token: match &args.token_file {
            Some(path) => Some(std::fs::read_to_string(path).with_context(|| format!("reading --token-file {}", path.display()))?),
            None => None,
        },
    };
    let text = serde_json::to_string_pretty(&bootstrap(&opts))? + "\n";
    match args.output {
        Some(path) => std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(())
}

pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MESHPILOT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

#[cfg(feature = "testkit")]
fn run_fixtures(a: FixturesArgs) -> anyhow::Result<()> {
    if let Some(kubeconfig) = &a.kubeconfig {
        anyhow::ensure!(a.clusters == 1, "--kubeconfig loads one cluster: give --clusters 1");
        let spec = crate::fixtures::kube::KubeMeshSpec {
            services: a.services,
            endpoints: a.endpoints,
            policies: a.policies,
            cluster: a.cluster_name.clone(),
            istio: a.istio,
            policy_namespace: "service-mesh-hub".into(),
            concurrency: 64,
        };
        let runtime = tokio::runtime::Runtime::new()?;
        return runtime.block_on(async {
            let client = serve::kube_client(Some(kubeconfig), a.context.clone()).await?;
            let started = std::time::Instant::now();
            let (created, existing) = crate::fixtures::kube::load(&client, &spec).await?;
            println!(
                "loaded {} services x {} pods and {} policies{} into {}: {created} objects created, {existing} already there, in {:.1}s",
                a.services,
                a.endpoints,
                a.policies.min(a.services),
                if a.istio { " (and their VirtualServices and DestinationRules)" } else { "" },
                kubeconfig.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        });
    }
    let out = a.out.clone().context("--out")?;
    let spec =
        crate::fixtures::ScaleSpec { services: a.services, clusters: a.clusters, endpoints: a.endpoints, policies: a.policies, sidecars: a.sidecars };
    crate::fixtures::write_config_dir(&out, spec).with_context(|| format!("writing {}", out.display()))?;
    if a.mtls {
        use std::io::Write as _;
        let vm = out.join("mesh/virtual-mesh.yaml");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&vm)
            .and_then(|mut f| f.write_all(b"  certificateAuthority: {builtin: {}}\n"))
            .with_context(|| format!("writing {}", vm.display()))?;
    }
    println!(
        "wrote {}: {} services x {} clusters x {} endpoints, {} TrafficPolicies",
        out.display(),
        a.services,
        a.clusters,
        a.endpoints,
        a.policies.min(a.services)
    );
    Ok(())
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bootstrap(args) => run_bootstrap(args),
        Command::Crds(args) => run_crds(args),
        #[cfg(feature = "testkit")]
        Command::Fixtures(args) => run_fixtures(args),
        Command::Validate(args) => {
            if mesh::validate(args)? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        command => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.enable_all();
            if matches!(command, Command::Serve(_)) {
                // The control plane hands back what it freed once idle; the
                // other commands (the load generator among them) keep mimalloc's default.
                builder.on_thread_park(crate::allocator::release_freed_memory);
            }
            let runtime = builder.build()?;
            runtime.block_on(async move {
                match command {
                    Command::Serve(args) => {
                        init_tracing();
                        serve::run(args).await
                    }
                    Command::ProxyStatus(args) => status::proxy_status(args).await,
                    Command::ConfigDump(args) => status::config_dump(args).await,
                    Command::Describe(what) => mesh::describe(what).await,
                    #[cfg(feature = "testkit")]
                    Command::Demo(args) if args.multi_network => demo_multinet::run(args).await,
                    #[cfg(feature = "testkit")]
                    Command::Demo(args) => demo::run(args).await,
                    #[cfg(feature = "testkit")]
                    Command::Echo(args) => {
                        init_tracing();
                        echo::run(args).await
                    }
                    Command::Sample(args) => run_sample(args).await,
                    #[cfg(feature = "testkit")]
                    Command::Load(args) => {
                        // Its report is its output; logs only when asked for (`MESHPILOT_LOG`).
                        if std::env::var_os("MESHPILOT_LOG").is_some() {
                            init_tracing();
                        }
                        load::run(args).await
                    }
                    Command::Cluster(args) => match args.command {
                        cluster::ClusterCommand::Register(a) => cluster::register(a).await,
                        cluster::ClusterCommand::Deregister(a) => cluster::deregister(a).await,
                    },
                    Command::Bootstrap(_) | Command::Validate(_) | Command::Crds(_) => unreachable!("handled above"),
                    #[cfg(feature = "testkit")]
                    Command::Fixtures(_) => unreachable!("handled above"),
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_errors_name_the_label() {
        let l = parse_labels("app=reviews, version=v1").unwrap();
        assert_eq!(l["version"], "v1");
        assert!(parse_labels("").unwrap().is_empty());
        assert!(parse_labels("app").unwrap_err().to_string().contains("\"app\""));
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
