//! `meshpilot validate DIR` and `meshpilot describe service NAME.NS.CLUSTER`:
//! the policy checks `serve` makes, offline or against a running meshpilot.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::http;
use crate::model::MeshSnapshot;
use crate::model::describe::{ServiceDescription, describe_service, parse_service_arg, render};
use crate::model::policy::{LastGood, PolicyState};
use crate::sources::file::{SourceMemory, load_config_dir};

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// A config dir: DIR/<cluster>/*.yaml (Kubernetes manifests) and DIR/mesh/*.yaml (mesh objects).
    pub dir: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
pub enum DescribeWhat {
    /// Which policies apply to a service and the traffic split that results.
    Service(DescribeServiceArgs),
}

#[derive(Debug, clap::Args)]
pub struct DescribeServiceArgs {
    /// The service as NAME.NAMESPACE.CLUSTER (like `meshctl describe service`).
    pub service: String,
    /// Read this config dir instead of asking a running meshpilot.
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
    /// A running meshpilot's admin address.
    #[arg(long, default_value = "127.0.0.1:15014", env = "MESHPILOT_ADMIN_ADDR")]
    pub admin_addr: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Loads a config dir into a snapshot the way `serve` does on its first load.
pub fn offline_snapshot(dir: &Path) -> anyhow::Result<MeshSnapshot> {
    let inputs = load_config_dir(dir, &mut SourceMemory::default())?;
    Ok(MeshSnapshot::build(inputs, &mut LastGood::default()))
}

/// The report `validate` prints, and whether everything was accepted.
pub fn validation_report(snapshot: &MeshSnapshot) -> (String, bool) {
    let mut out = String::new();
    let mut ok = true;
    for e in &snapshot.input_errors {
        out.push_str(&format!("error: {e}\n"));
        ok = false;
    }
    for (id, st) in &snapshot.policy_status {
        let services = if st.services.is_empty() { String::new() } else { format!(" -> {}", st.services.join(", ")) };
        out.push_str(&format!("TrafficPolicy {id} ({}): {}{services}\n", st.origin, st.state));
        for m in &st.messages {
            out.push_str(&format!("  {m}\n"));
        }
        ok &= st.state == PolicyState::Accepted;
    }
    // VirtualMeshes and AccessControlPolicies are listed when they are not
    // accepted; Sidecars always (they change what proxies are configured for).
    for (id, st) in &snapshot.mesh_object_status {
        if id.kind != "Sidecar" && st.state == PolicyState::Accepted {
            continue;
        }
        out.push_str(&format!("{id}: {}\n", st.state));
        for m in st.messages.iter().chain(&st.not_yet_supported) {
            out.push_str(&format!("  {m}\n"));
        }
        ok &= st.state == PolicyState::Accepted;
    }
    let clusters: Vec<String> = snapshot
        .clusters
        .values()
        .map(|c| format!("{} ({} services, {} endpoints)", c.name, c.services.len(), c.endpoints.values().map(|eps| eps.len()).sum::<usize>()))
        .collect();
    out.push_str(&format!("clusters: {}\n", if clusters.is_empty() { "none".into() } else { clusters.join(", ") }));
    (out, ok)
}

pub fn validate(args: ValidateArgs) -> anyhow::Result<bool> {
    let snapshot = offline_snapshot(&args.dir)?;
    let (report, ok) = validation_report(&snapshot);
    print!("{report}");
    if !ok {
        eprintln!("validate: {} has problems (see above)", args.dir.display());
    }
    Ok(ok)
}

pub async fn describe(what: DescribeWhat) -> anyhow::Result<()> {
    let DescribeWhat::Service(args) = what;
    let key = parse_service_arg(&args.service)
        .with_context(|| format!("{:?} is not NAME.NAMESPACE.CLUSTER (e.g. reviews.default.management-plane)", args.service))?;
    let description: ServiceDescription = match &args.config_dir {
        Some(dir) => describe_service(&offline_snapshot(dir)?, &key),
        None => {
            let (status, body) = http::get(&args.admin_addr, &format!("/debug/describe?service={}", args.service))
                .await
                .with_context(|| format!("asking meshpilot at {} (is it running? or pass --config-dir)", args.admin_addr))?;
            anyhow::ensure!(status == 200, "meshpilot answered {status}: {}", body.trim());
            serde_json::from_str(&body).context("reading meshpilot's answer")?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&description)?);
    } else {
        print!("{}", render(&description));
    }
    anyhow::ensure!(description.exists, "service {} not found", description.service);
    Ok(())
}
