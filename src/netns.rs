//! Two cluster networks as Linux network namespaces, joined only by the
//! remote cluster's east-west gateway (for the multi-network e2e test and
//! `meshpilot demo --multi-network`; needs root and `ip`).
//!
//! ```text
//!  netns <A> (management-plane, network-mp)        netns <B> (remote-cluster, network-rc)
//!   pods: 10.10.0.10 / .21 / .22 (on lo)             pods: 10.20.0.23 (on lo)
//!   10.99.0.1/24 ──────────── veth ─────────────── 10.99.0.2/24  = the east-west gateway
//! ```
//! A has no route to 10.20.0.0/24 and B none to 10.10.0.0/24: the only way
//! across is the gateway's address. The control plane stays in the root
//! namespace and is reached over a Unix socket.

pub mod pods;

use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("running ip: {0}")]
    Spawn(#[from] std::io::Error),
}

/// The two namespaces; deleted when dropped.
#[derive(Debug)]
pub struct Topology {
    pub management: String,
    pub remote: String,
}

pub const GATEWAY_ADDRESS: &str = "10.99.0.2";
pub const MANAGEMENT_PODS: [&str; 3] = ["10.10.0.10", "10.10.0.21", "10.10.0.22"];
pub const REMOTE_PODS: [&str; 1] = ["10.20.0.23"];

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetnsError::Ip { args: args.join(" "), stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

/// Whether this process may create network namespaces (root with `ip`).
pub fn available() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false);
    root && Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success())
}

impl Topology {
    /// Creates `mp-<id>` and `rc-<id>` and their links (`id`: a few alphanumerics).
    pub fn create(id: &str) -> Result<Topology, NetnsError> {
        let t = Topology { management: format!("mp-{id}"), remote: format!("rc-{id}") };
        let (a, b) = (t.management.as_str(), t.remote.as_str());
        let (va, vb) = (format!("va{id}"), format!("vb{id}"));
        ip(&["netns", "add", a])?;
        ip(&["netns", "add", b])?;
        for ns in [a, b] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["link", "add", &va, "netns", a, "type", "veth", "peer", "name", &vb, "netns", b])?;
        ip(&["-n", a, "addr", "add", "10.99.0.1/24", "dev", &va])?;
        ip(&["-n", b, "addr", "add", &format!("{GATEWAY_ADDRESS}/24"), "dev", &vb])?;
        ip(&["-n", a, "link", "set", &va, "up"])?;
        ip(&["-n", b, "link", "set", &vb, "up"])?;
        for pod in MANAGEMENT_PODS {
            ip(&["-n", a, "addr", "add", &format!("{pod}/32"), "dev", "lo"])?;
        }
        for pod in REMOTE_PODS {
            ip(&["-n", b, "addr", "add", &format!("{pod}/32"), "dev", "lo"])?;
        }
        Ok(t)
    }

    /// `program args…` run inside namespace `ns`.
    pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.management, &self.remote] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
