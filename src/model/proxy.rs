//! What kind of proxy is being configured: the facts about it that decide
//! its layout (read from its node by `xds::node`, used by translation).

use serde::Serialize;

/// The proxy role: an application sidecar or an east-west gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyRole {
    Sidecar,
    Gateway,
}

/// How the proxy's traffic reaches it (Istio's `INTERCEPTION_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum InterceptionMode {
    /// iptables REDIRECT to 15001 (outbound) and 15006 (inbound): Istio's injected pods.
    Redirect,
    /// iptables TPROXY: the same listeners, marked transparent.
    Tproxy,
    /// No capture: the application calls the sidecar's loopback listeners (`OUTBOUND_BIND`).
    None,
}

impl InterceptionMode {
    pub fn captured(self) -> bool {
        self != InterceptionMode::None
    }
}
