//! Which protocol a Service port speaks, by Istio's rules: the port's
//! `appProtocol`, else its name's prefix (`http`, `http-web`, `grpc-api`,
//! `tcp-db`, …), else it is undeclared and detected at connection time
//! (Envoy's HTTP inspector; TCP when it is not HTTP). A name whose prefix
//! Istio does not know is TCP, never a broken HTTP listener.

use serde::Serialize;

/// A Service port's protocol as meshpilot configures it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    GrpcWeb,
    Tcp,
    /// TLS from the application: passed through by SNI, never terminated.
    Tls,
    Mongo,
    Redis,
    Mysql,
    /// UDP: not proxied (Envoy sidecars carry TCP only).
    Udp,
    /// Undeclared: HTTP when Envoy's HTTP inspector sees HTTP, TCP otherwise.
    Detected,
}

/// How a port is served outbound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Routed by Host over RDS on the port's `0.0.0.0_<port>` listener.
    Http,
    /// `tcp_proxy` on the service's `<ClusterIP>_<port>` listener.
    Tcp,
    /// `tcp_proxy` chosen by SNI on `<ClusterIP>_<port>`.
    Tls,
    /// HTTP inspector on `<ClusterIP>_<port>`: HTTP routes, else `tcp_proxy`.
    Detected,
    /// Not proxied.
    None,
}

impl Protocol {
    pub fn layout(self) -> Layout {
        match self {
            Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb => Layout::Http,
            Protocol::Tcp | Protocol::Mongo | Protocol::Redis | Protocol::Mysql => Layout::Tcp,
            Protocol::Tls => Layout::Tls,
            Protocol::Detected => Layout::Detected,
            Protocol::Udp => Layout::None,
        }
    }

    /// HTTP is routed (the port has virtual hosts), whether declared or detected.
    pub fn has_http_routes(self) -> bool {
        matches!(self.layout(), Layout::Http | Layout::Detected)
    }

    /// The upstream keeps HTTP/2 (Istio: `http2` and `grpc` ports get HTTP/2 cluster options).
    pub fn http2_upstream(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Http2 => "HTTP2",
            Protocol::Grpc => "GRPC",
            Protocol::GrpcWeb => "GRPC-Web",
            Protocol::Tcp => "TCP",
            Protocol::Tls => "TLS",
            Protocol::Mongo => "Mongo",
            Protocol::Redis => "Redis",
            Protocol::Mysql => "MySQL",
            Protocol::Udp => "UDP",
            Protocol::Detected => "detected (HTTP or TCP)",
        }
    }
}

/// Istio's protocol names (case-insensitive), as `appProtocol` values or name prefixes.
fn by_istio_name(name: &str) -> Option<Protocol> {
    Some(match name.to_ascii_lowercase().as_str() {
        "http" | "http_proxy" => Protocol::Http,
        "http2" => Protocol::Http2,
        "grpc" => Protocol::Grpc,
        "grpc-web" => Protocol::GrpcWeb,
        "tcp" => Protocol::Tcp,
        "tls" | "https" => Protocol::Tls,
        "mongo" => Protocol::Mongo,
        "redis" => Protocol::Redis,
        "mysql" => Protocol::Mysql,
        "udp" => Protocol::Udp,
        _ => return None,
    })
}

/// A port's protocol and why, from its Kubernetes fields.
pub fn port_protocol(name: &str, app_protocol: Option<&str>, transport: Option<&str>) -> (Protocol, String) {
    if transport.is_some_and(|t| t.eq_ignore_ascii_case("UDP") || t.eq_ignore_ascii_case("SCTP")) {
        return (Protocol::Udp, format!("protocol {}: not proxied", transport.unwrap_or_default()));
    }
    if let Some(app) = app_protocol.filter(|a| !a.is_empty()) {
        // Kubernetes' standard appProtocol values, then Istio's names.
        let known = match app {
            "kubernetes.io/h2c" => Some(Protocol::Http2),
            "kubernetes.io/ws" => Some(Protocol::Http),
            "kubernetes.io/wss" => Some(Protocol::Tls),
            other => by_istio_name(other),
        };
        return match known {
            Some(p) => (p, format!("appProtocol {app}")),
            None => (Protocol::Tcp, format!("appProtocol {app:?} names no protocol Istio knows: treated as TCP")),
        };
    }
    if name.is_empty() {
        return (Protocol::Detected, "no appProtocol and no port name: detected per connection (HTTP inspector, else TCP)".into());
    }
    // Istio's longest names first, so "grpc-web" is not read as "grpc" + "-web".
    let lower = name.to_ascii_lowercase();
    if lower == "grpc-web" || lower.starts_with("grpc-web-") {
        return (Protocol::GrpcWeb, format!("port name {name} (prefix grpc-web)"));
    }
    let prefix = lower.split('-').next().unwrap_or_default();
    match by_istio_name(prefix) {
        Some(p) => (p, format!("port name {name} (prefix {prefix})")),
        None => (Protocol::Tcp, format!("port name {name:?} has no protocol prefix Istio knows (http, http2, grpc, tcp, tls, …): treated as TCP")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_protocol_then_name_prefix_then_detection() {
        assert_eq!(port_protocol("tcp-x", Some("grpc"), None).0, Protocol::Grpc);
        assert_eq!(port_protocol("", Some("kubernetes.io/h2c"), None).0, Protocol::Http2);
        assert_eq!(port_protocol("http", None, Some("TCP")).0, Protocol::Http);
        assert_eq!(port_protocol("http2-api", None, None).0, Protocol::Http2);
        assert_eq!(port_protocol("grpc-web", None, None).0, Protocol::GrpcWeb);
        assert_eq!(port_protocol("grpc-web-ui", None, None).0, Protocol::GrpcWeb);
        assert_eq!(port_protocol("grpc-api", None, None).0, Protocol::Grpc);
        assert_eq!(port_protocol("HTTPS", None, None).0, Protocol::Tls);
        assert_eq!(port_protocol("mongo", None, None).0, Protocol::Mongo);
        assert_eq!(port_protocol("", None, None).0, Protocol::Detected);
        assert_eq!(port_protocol("dns", None, Some("UDP")).0, Protocol::Udp);
    }

    #[test]
    fn an_unknown_name_is_tcp_and_says_why() {
        let (p, why) = port_protocol("web", None, None);
        assert_eq!(p, Protocol::Tcp);
        assert!(why.contains("\"web\"") && why.contains("treated as TCP"), "{why}");
        let (p, why) = port_protocol("http", Some("thrift"), None);
        assert_eq!(p, Protocol::Tcp);
        assert!(why.contains("appProtocol \"thrift\""), "{why}");
    }
}
