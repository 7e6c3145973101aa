//! Real Kubernetes clusters (kubeenv, built from the Kubernetes Go modules
//! by e2e/build.sh), registered with meshpilot as a user would, and
//! meshpilot serving from them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Proc, free_port, meshpilot_bin, require_e2e, wait_for};

/// The kubeenv binary, built (or reused) by e2e/build.sh.
pub fn kubeenv_or_skip(test: &str) -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("KUBEENV_BIN").map(PathBuf::from).filter(|p| p.exists()) {
        return Some(bin);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let have_tools = Command::new("go").arg("version").output().is_ok_and(|o| o.status.success())
        && Command::new("kubectl").arg("version").arg("--client").output().is_ok_and(|o| o.status.success());
    if !have_tools {
        assert!(!require_e2e(), "{test}: go and kubectl are required here (CI or MESHPILOT_REQUIRE_E2E=1)");
        eprintln!("{test}: skipped (go or kubectl missing)");
        return None;
    }
    let out = Command::new(root.join("e2e/build.sh")).output().expect("running e2e/build.sh");
    assert!(out.status.success(), "e2e/build.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let path = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
    Some(PathBuf::from(path))
}

/// Three consecutive free ports (kube-apiserver, etcd client, etcd peer),
/// below the kernel's ephemeral range (32768+): there, a port free when
/// checked could be taken by another cluster's outgoing connection (its
/// apiserver to its etcd) before kubeenv binds it. Each call in a process
/// starts past the last one's triple, so clusters started together never
/// pick the same ports; the start is spread by the process id.
pub fn free_port_triple() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const LOW: u16 = 20000;
    const HIGH: u16 = 32700;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(0, LOW + (std::process::id() % 4000) as u16 * 3, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let mut p = NEXT.fetch_add(3, Ordering::SeqCst);
        if p >= HIGH {
            NEXT.store(LOW + 3, Ordering::SeqCst);
            p = LOW;
        }
        if (0..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
}

pub struct KubeCluster {
    pub name: String,
    pub dir: PathBuf,
    pub port: u16,
    pub bin: PathBuf,
    pub proc: Option<Proc>,
}

impl KubeCluster {
    pub async fn start(bin: &Path, name: &str, root: &Path) -> KubeCluster {
        let dir = root.join(name);
        let mut c = KubeCluster { name: name.into(), dir, port: free_port_triple(), bin: bin.into(), proc: None };
        c.run().await;
        c
    }

    /// Starts (or restarts, keeping etcd's data) and waits for the ready file.
    pub async fn run(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("ready"));
        std::fs::create_dir_all(&self.dir).unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["cluster", "--name", &self.name, "--port", &self.port.to_string(), "--dir"]).arg(&self.dir);
        let mut proc = Proc::spawn(&format!("kubeenv-{}", self.name), cmd, &self.dir);
        let ready = self.dir.join("ready");
        let started = Instant::now();
        // Ready, or the reason it is not: kubeenv's exit or its log at the deadline.
        while !ready.exists() {
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("kubeenv for cluster {} (port {}) exited ({status}) before it was ready:\n{}", self.name, self.port, proc.log_tail());
            }
            if started.elapsed() > Duration::from_secs(180) {
                panic!("timed out after 180s waiting for cluster {} (port {}) ready:\n{}", self.name, self.port, proc.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("cluster {} ready in {:.1}s", self.name, started.elapsed().as_secs_f64());
        self.proc = Some(proc);
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// `kubectl apply -k deploy/` (CRDs, RBAC, Deployment, Service: proves
    /// they are valid) and waits for the CRDs.
    pub fn install_meshpilot(&self) {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        self.kubectl(&["apply", "-k", repo.join("deploy").to_str().unwrap()]);
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/trafficpolicies.networking.zephyr.solo.io",
            "crd/kubernetesclusters.discovery.zephyr.solo.io",
            "crd/virtualmeshes.networking.zephyr.solo.io",
        ]);
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    pub fn context(&self) -> String {
        format!("{}-context", self.name)
    }

    /// Runs kubectl against this cluster; panics with its output on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_stdin(args, None).expect("kubectl")
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        use std::io::Write;
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig").arg(self.kubeconfig()).args(["--context", &self.context()]).args(args);
        cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl");
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() { Ok(stdout) } else { Err(format!("kubectl {args:?} failed: {}{}", stdout, String::from_utf8_lossy(&out.stderr))) }
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The TrafficPolicy of the seed guide, cut out of the guide itself when it is
/// beside the repository (and checked equal to examples/bookinfo's copy).
pub fn seed_policy() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(root.join("examples/bookinfo/mesh/traffic-policy.yaml")).unwrap();
    if let Ok(guide) = std::fs::read_to_string(root.join("../shared/seed/multicluster-communication.md")) {
        let start = guide.find("kubectl apply -f - <<EOF\n").expect("the guide's heredoc") + "kubectl apply -f - <<EOF\n".len();
        let end = start + guide[start..].find("\nEOF").unwrap();
        let from_guide = &guide[start..=end];
        assert_eq!(from_guide.trim(), example.trim(), "examples/bookinfo/mesh/traffic-policy.yaml must be the guide's manifest verbatim");
        return from_guide.to_string();
    }
    example
}

pub struct KubeMeshpilot {
    pub _proc: Proc,
    pub admin: String,
    pub xds_port: u16,
    /// xDS and the certificate API over TLS (streams prove identities here).
    pub tls_port: u16,
}

impl KubeMeshpilot {
    pub async fn start(dir: &Path, mgmt: &KubeCluster, id: &str) -> KubeMeshpilot {
        Self::start_with(dir, mgmt, id, &[]).await
    }

    /// `serve --kubernetes` with `extra` flags; TLS xDS on every address
    /// (pods in network namespaces reach it through their router).
    pub async fn start_with(dir: &Path, mgmt: &KubeCluster, id: &str, extra: &[&str]) -> KubeMeshpilot {
        let (xds_port, tls_port) = (free_port(), free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(meshpilot_bin());
        cmd.args(["serve", "--kubernetes", "--xds-addr", &format!("127.0.0.1:{xds_port}"), "--admin-addr", &admin])
            .args(["--xds-tls-addr", &format!("0.0.0.0:{tls_port}")])
            .args(extra)
            .arg("--kubeconfig")
            .arg(mgmt.kubeconfig())
            .args(["--context", &mgmt.context(), "--management-cluster-name", &mgmt.name])
            .args(["--debounce-after", "20ms", "--lease-duration", "3s", "--id", id])
            .env("MESHPILOT_LOG", "info,meshpilot=debug");
        let mp = KubeMeshpilot { _proc: Proc::spawn(&format!("meshpilot-{id}"), cmd, dir), admin, xds_port, tls_port };
        let addr = mp.admin.clone();
        wait_for("meshpilot /readyz", Duration::from_secs(60), || {
            let addr = addr.clone();
            async move { matches!(meshpilot::cli::http::get(&addr, "/readyz").await, Ok((200, _))).then_some(()) }
        })
        .await;
        mp
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let (_, body) = meshpilot::cli::http::get(&self.admin, path).await.unwrap();
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
    }

    pub async fn cluster_health(&self, name: &str) -> serde_json::Value {
        let all = self.get_json("/debug/clusterz").await;
        all.as_array().and_then(|a| a.iter().find(|c| c["name"] == name).cloned()).unwrap_or_default()
    }

    pub async fn counter(&self, name: &str) -> f64 {
        let (_, body) = meshpilot::cli::http::get(&self.admin, "/metrics").await.unwrap();
        body.lines().filter(|l| l.starts_with(name) && !l.starts_with('#')).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }
}

pub fn register(mgmt: &KubeCluster, cluster: &KubeCluster) {
    let out = Command::new(meshpilot_bin())
        .args(["cluster", "register", "--kubeconfig"])
        .arg(mgmt.kubeconfig())
        .args(["--context", &mgmt.context(), "--remote-kubeconfig"])
        .arg(cluster.kubeconfig())
        .args(["--remote-context", &cluster.context(), "--remote-cluster-name", &cluster.name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cluster register {} failed:\n{}{}",
        cluster.name,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
