//! Istio's own binaries as test peers: `pilot-agent` and `pilot-discovery`
//! (istiod), built from the `istio.io/istio` Go module by e2e/istio/build.sh.

use std::path::PathBuf;
use std::process::Command;

use super::require_e2e;

/// The folder with pilot-agent, pilot-discovery, Istio's sidecar bootstrap
/// template and its CRDs, built (or reused) by e2e/istio/build.sh.
pub fn istio_or_skip(test: &str) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("ISTIO_BIN_DIR").map(PathBuf::from).filter(|d| d.join("pilot-agent").exists()) {
        return Some(dir);
    }
    if !Command::new("go").arg("version").output().is_ok_and(|o| o.status.success()) {
        assert!(!require_e2e(), "{test}: go is required here to build Istio's binaries (CI or MESHPILOT_REQUIRE_E2E=1)");
        eprintln!("{test}: skipped (go missing)");
        return None;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("e2e/istio/build.sh")).output().expect("running e2e/istio/build.sh");
    assert!(out.status.success(), "e2e/istio/build.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim()))
}
