//! What the demos and the captured-pod harness share: child processes that
//! die with their owner, readiness polling, starting `meshpilot serve` and a
//! proxy from its bootstrap, and the live traffic report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::http;
use crate::admin::SyncStatus;
use crate::xds::resource::ResourceType;

/// Child processes, killed when dropped (also on errors and Ctrl-C).
pub struct Children(pub Vec<(String, Child)>);

impl Children {
    pub fn spawn(&mut self, name: &str, cmd: &mut Command, logs: &Path) -> anyhow::Result<()> {
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        self.0.push((name.to_string(), child));
        Ok(())
    }

    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("{name} exited ({status}); see its log");
            }
        }
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn copy_dir(src: &Path, dst: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        let to = dst.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to)?;
        } else {
            std::fs::copy(entry.path(), to)?;
        }
    }
    Ok(())
}

/// Polls `check` every 100 ms until it is true (a readiness signal), or fails after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, children: &mut Children, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        children.check_alive()?;
        anyhow::ensure!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether meshpilot at `admin` reports `proxy` connected and SYNCED for every one of `types`.
pub async fn is_synced(admin: &str, proxy: &str, types: &[ResourceType]) -> bool {
    let Ok((200, body)) = http::get(admin, "/debug/syncz").await else { return false };
    let rows: Vec<SyncStatus> = serde_json::from_str(&body).unwrap_or_default();
    rows.iter().any(|r| r.proxy == proxy && types.iter().all(|t| r.types.get(t.short_name()).is_some_and(|s| s.state == "SYNCED")))
}

/// Starts `meshpilot serve` on `config` with xDS also on the Unix socket
/// `xds_socket` (reachable from other network namespaces) and waits for its `/readyz`.
pub async fn start_serving(
    children: &mut Children,
    me: &Path,
    config: &Path,
    xds_socket: &Path,
    (xds_addr, admin_addr): (&str, &str),
    extra: &[&str],
    logs: &Path,
) -> anyhow::Result<()> {
    children.spawn(
        "meshpilot",
        Command::new(me)
            .args(["serve", "--config-dir"])
            .arg(config)
            .arg("--xds-socket")
            .arg(xds_socket)
            .args(["--xds-addr", xds_addr, "--admin-addr", admin_addr])
            // Local demos' sidecars prove nothing; their metadata names their identity.
            .arg("--insecure-self-asserted-identities")
            .args(extra)
            .env("MESHPILOT_LOG", "info,meshpilot=debug"),
        logs,
    )?;
    wait_until("meshpilot to be ready", Duration::from_secs(30), children, || async {
        matches!(http::get(admin_addr, "/readyz").await, Ok((200, _)))
    })
    .await
}

/// How the demos and tests run a sidecar's Envoy (the log level aside): no
/// hot restart, one worker, and drained as Istio's `pilot-agent` has it
/// drained: when a listener or filter chain changes (an access-control
/// change is one), each connection on the old one is closed at its next
/// chance, and all are gone after 45 s. Envoy's own default drains
/// gradually over 600 s, so a pooled connection from before a change could
/// go on serving under the old rules for minutes.
pub const SIDECAR_ENVOY_ARGS: [&str; 7] = ["--disable-hot-restart", "--concurrency", "1", "--drain-strategy", "immediate", "--drain-time-s", "45"];

/// Writes a proxy's bootstrap (`meshpilot bootstrap --node-id <node>
/// <bootstrap_args> --admin-socket <admin> -o <bootstrap>`) and starts
/// `envoy` (an Envoy command, placed where the proxy runs) on it.
pub fn start_proxy(
    children: &mut Children,
    me: &Path,
    mut envoy: Command,
    node: &str,
    bootstrap_args: &[String],
    (bootstrap, admin): (&Path, &Path),
    logs: &Path,
) -> anyhow::Result<()> {
    let status = Command::new(me)
        .args(["bootstrap", "--node-id", node])
        .args(bootstrap_args)
        .arg("--admin-socket")
        .arg(admin)
        .arg("-o")
        .arg(bootstrap)
        .status()?;
    anyhow::ensure!(status.success(), "meshpilot bootstrap failed for {node}");
    children.spawn(&format!("envoy-{node}"), envoy.arg("-c").arg(bootstrap).args(SIDECAR_ENVOY_ARGS).args(["-l", "warning"]), logs)
}

pub fn share_line(counts: &BTreeMap<String, usize>) -> String {
    let total: usize = counts.values().sum();
    counts.iter().map(|(k, v)| format!("{k} {:5.1}%", *v as f64 * 100.0 / total.max(1) as f64)).collect::<Vec<_>>().join("  |  ")
}

/// One sample window: answers counted, and the caller identities each backend saw.
pub type Window = (BTreeMap<String, usize>, BTreeMap<String, Vec<String>>);

/// Samples the client's calls every two seconds for `duration` (or
/// until Ctrl-C) and prints each window's shares, the callers the backends
/// saw and the gateway's connections so far; returns the totals.
pub async fn report_traffic(
    (duration, rate): (Duration, usize),
    mut sample: impl FnMut(usize) -> anyhow::Result<Window>,
    gateway_admin: Option<&Path>,
    mut check_alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut totals: BTreeMap<String, usize> = BTreeMap::new();
    let started = Instant::now();
    let per_window = (rate * 2).max(1);
    loop {
        let tick = Instant::now();
        let (counts, peers) = sample(per_window)?;
        for (k, v) in &counts {
            *totals.entry(k.clone()).or_default() += v;
        }
        let gateway_cx = match gateway_admin {
            Some(path) => http::get_unix(path, "/stats?filter=upstream_cx_total")
                .await
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("cluster.outbound_."))
                .filter_map(|l| l.rsplit(": ").next()?.trim().parse::<u64>().ok())
                .sum::<u64>(),
            None => 0,
        };
        let callers: Vec<String> =
            peers.values().flatten().filter(|p| !p.is_empty()).cloned().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        println!(
            "[{:>4.0}s] {:>4} requests  {}   (backends saw caller {}; gateway connections so far {gateway_cx})",
            started.elapsed().as_secs_f64(),
            per_window,
            share_line(&counts),
            if callers.is_empty() { "-".to_string() } else { callers.join(", ") }
        );
        check_alive()?;
        if !duration.is_zero() && started.elapsed() >= duration {
            break;
        }
        if let Some(rest) = Duration::from_secs(2).checked_sub(tick.elapsed()) {
            tokio::select! {
                _ = tokio::time::sleep(rest) => {}
                _ = tokio::signal::ctrl_c() => break,
            }
        }
    }
    Ok(totals)
}

pub fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("meshpilot-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
