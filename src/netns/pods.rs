//! Pods as Linux network namespaces, with Istio's iptables capture (for the
//! capture e2e test and `meshpilot demo --captured`; needs root, `ip`,
//! `iptables` and `setpriv`).
//!
//! ```text
//!  network A (router netns, bridge 10.10.0.1/24)          network B (router netns, bridge 10.20.0.1/24)
//!   pod netns 10.10.0.x ─┐                                 ┌─ pod netns 10.20.0.x
//!   pod netns 10.10.0.y ─┤ br0   10.99.0.1 ── veth ── 10.99.0.2 = gateway pod (10.20.0.99 on B's bridge)
//! ```
//! Each pod has its own namespace (its application listens on 0.0.0.0:<port>
//! like in any pod), a default route through its network's router, a hosts
//! file naming services by their ClusterIPs, and — when captured — the nat
//! rules Istio's `istio-iptables` writes for REDIRECT mode. Network A has no
//! route to B's pods: only the gateway's link crosses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::NetnsError;

/// Istio's nat rules for an injected pod in REDIRECT mode, as
/// `istio-iptables -p 15001 -z 15006 -u 1337 -g 1337 -m REDIRECT -i '*' -b '*' -d 15090,15021,15020`
/// writes them at the pinned Istio (iptables-restore format, the excluded
/// inbound ports as one multiport rule; the injector's defaults): inbound TCP
/// to 15006 except the sidecar's own ports, outbound TCP to 15001 except the
/// proxy's own (uid/gid 1337) and 127.0.0.1, and the inbound clusters'
/// 127.0.0.6 source let through.
pub const ISTIO_REDIRECT_RULES: &str = "\
*nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp -m multiport --dports 15090,15021,15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
";

/// The uid and gid Istio's sidecar runs as (the rules above let it through).
pub const PROXY_UID: u32 = 1337;

/// Where a `.global` name points in a pod's hosts file: an address no pod
/// has (Istio's auto-allocated VIP range), so the connection is captured
/// and routed by its Host.
pub const GLOBAL_NAMES_ADDRESS: &str = "240.240.0.1";

/// Network A's router address on the link to the gateway, and the gateway's.
pub const ROUTER_LINK_ADDRESS: &str = "10.99.0.1";
pub const GATEWAY_LINK_ADDRESS: &str = "10.99.0.2";

/// One cluster network: its router's bridge address is `<prefix>.1`.
#[derive(Debug, Clone)]
pub struct NetworkSpec {
    /// The first three octets of its /24, e.g. `10.10.0`.
    pub prefix: String,
}

/// The namespaces made; all deleted (with their hosts files) when dropped.
#[derive(Debug)]
pub struct PodNetwork {
    id: String,
    /// Network prefix → router namespace.
    routers: BTreeMap<String, String>,
    /// Pod IP → its namespace.
    pods: BTreeMap<String, String>,
    links: usize,
}

fn run(program: &str, args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new(program).args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetnsError::Ip { args: format!("{program} {}", args.join(" ")), stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    run("ip", args)
}

fn hosts_dir(ns: &str) -> PathBuf {
    Path::new("/etc/netns").join(ns)
}

/// Whether pods with capture can be made here: root, `ip`, `iptables-restore`, `setpriv`.
pub fn available() -> bool {
    super::available() && ["iptables-restore", "setpriv"].iter().all(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
}

impl PodNetwork {
    /// Routers for `networks` (the first one linked to the gateway, added with [`PodNetwork::add_gateway`]).
    pub fn create(id: &str, networks: &[NetworkSpec]) -> Result<PodNetwork, NetnsError> {
        let mut net = PodNetwork { id: id.to_string(), routers: BTreeMap::new(), pods: BTreeMap::new(), links: 0 };
        for (i, n) in networks.iter().enumerate() {
            let router = format!("r{i}-{id}");
            ip(&["netns", "add", &router])?;
            net.routers.insert(n.prefix.clone(), router.clone());
            ip(&["-n", &router, "link", "set", "lo", "up"])?;
            ip(&["-n", &router, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &router, "addr", "add", &format!("{}.1/24", n.prefix), "dev", "br0"])?;
            ip(&["-n", &router, "link", "set", "br0", "up"])?;
            run("ip", &["netns", "exec", &router, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        }
        Ok(net)
    }

    fn router_of(&self, ip: &str) -> Option<&String> {
        let prefix = ip.rsplit_once('.').map(|(p, _)| p)?;
        self.routers.get(prefix)
    }

    /// A veth pair: `inner` end in `ns` with `address`, the other end in `router`'s bridge.
    fn attach(&mut self, ns: &str, router: &str, address: &str) -> Result<(), NetnsError> {
        self.links += 1;
        let (inner, outer) = (format!("e{}{}", self.id, self.links), format!("h{}{}", self.id, self.links));
        ip(&["link", "add", &inner, "netns", ns, "type", "veth", "peer", "name", &outer, "netns", router])?;
        ip(&["-n", router, "link", "set", &outer, "master", "br0", "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{address}/24"), "dev", &inner])?;
        ip(&["-n", ns, "link", "set", &inner, "up"])?;
        Ok(())
    }

    /// A pod at `address` (its network's /24), with `hosts` as its
    /// `/etc/hosts`, captured by Istio's rules when `capture`. Returns its namespace.
    pub fn add_pod(&mut self, address: &str, hosts: &str, capture: bool) -> Result<String, NetnsError> {
        let router = self
            .router_of(address)
            .cloned()
            .ok_or_else(|| NetnsError::Ip { args: format!("pod {address}"), stderr: "no network for this address".into() })?;
        let ns = format!("p{}-{}", self.pods.len(), self.id);
        ip(&["netns", "add", &ns])?;
        self.pods.insert(address.to_string(), ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        self.attach(&ns, &router, address)?;
        let gw = format!("{}.1", address.rsplit_once('.').map(|(p, _)| p).unwrap_or_default());
        ip(&["-n", &ns, "route", "add", "default", "via", &gw])?;
        std::fs::create_dir_all(hosts_dir(&ns))?;
        std::fs::write(hosts_dir(&ns).join("hosts"), format!("127.0.0.1 localhost\n{address} {ns}\n{hosts}"))?;
        if capture {
            let rules = std::env::temp_dir().join(format!("istio-iptables-{ns}.rules"));
            std::fs::write(&rules, ISTIO_REDIRECT_RULES)?;
            let applied = run("ip", &["netns", "exec", &ns, "iptables-restore", "--noflush", &rules.display().to_string()]);
            let _ = std::fs::remove_file(&rules);
            applied?;
        }
        Ok(ns)
    }

    /// The east-west gateway pod: `pod_address` on its own network's bridge
    /// and the link address the first network's router reaches it on (no capture).
    pub fn add_gateway(&mut self, pod_address: &str, first_network: &str) -> Result<String, NetnsError> {
        let ns = self.add_pod(pod_address, "", false)?;
        let router = self
            .routers
            .get(first_network)
            .cloned()
            .ok_or_else(|| NetnsError::Ip { args: format!("network {first_network}"), stderr: "unknown network".into() })?;
        let (inner, outer) = (format!("g{}", self.id), format!("l{}", self.id));
        ip(&["link", "add", &inner, "netns", &ns, "type", "veth", "peer", "name", &outer, "netns", &router])?;
        ip(&["-n", &ns, "addr", "add", &format!("{GATEWAY_LINK_ADDRESS}/24"), "dev", &inner])?;
        ip(&["-n", &router, "addr", "add", &format!("{ROUTER_LINK_ADDRESS}/24"), "dev", &outer])?;
        ip(&["-n", &ns, "link", "set", &inner, "up"])?;
        ip(&["-n", &router, "link", "set", &outer, "up"])?;
        ip(&["-n", &ns, "route", "add", &format!("{first_network}.0/24"), "via", ROUTER_LINK_ADDRESS])?;
        Ok(ns)
    }

    /// Links every network's router to the host's own namespace (where a
    /// control plane outside the mesh listens, like istiod in its own
    /// network): a /30 per router, `10.98.<i>.1` on the host's side, and
    /// the router masquerading pods behind its end, so the host needs no
    /// route to any pod network and the networks still meet only at the
    /// gateway. Returns each network prefix's host address.
    pub fn link_host(&mut self) -> Result<BTreeMap<String, String>, NetnsError> {
        let mut out = BTreeMap::new();
        for (i, (prefix, router)) in self.routers.clone().iter().enumerate() {
            let (host_end, router_end) = (format!("t{}{i}", self.id), format!("u{}{i}", self.id));
            let (host_addr, router_addr) = (format!("10.98.{i}.1"), format!("10.98.{i}.2"));
            ip(&["link", "add", &host_end, "type", "veth", "peer", "name", &router_end, "netns", router])?;
            ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_end])?;
            ip(&["link", "set", &host_end, "up"])?;
            ip(&["-n", router, "addr", "add", &format!("{router_addr}/30"), "dev", &router_end])?;
            ip(&["-n", router, "link", "set", &router_end, "up"])?;
            run("ip", &["netns", "exec", router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", &router_end, "-j", "MASQUERADE"])?;
            out.insert(prefix.clone(), host_addr);
        }
        Ok(out)
    }

    /// The namespace of the pod at `address`.
    pub fn pod(&self, address: &str) -> Option<&str> {
        self.pods.get(address).map(String::as_str)
    }

    /// The router namespace of a network (for a server outside the mesh).
    pub fn router(&self, prefix: &str) -> Option<&str> {
        self.routers.get(prefix).map(String::as_str)
    }

    /// `program` run inside `ns`, as `uid`/`gid` when given (Envoy as 1337).
    pub fn command(ns: &str, as_user: Option<u32>, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        if let Some(uid) = as_user {
            c.args(["setpriv", "--reuid", &uid.to_string(), "--regid", &uid.to_string(), "--clear-groups"]);
        }
        c.arg(program);
        c
    }

    /// `iptables-save -c` of the nat table in `ns` (its counters show what was captured).
    pub fn nat_counters(ns: &str) -> Result<String, NetnsError> {
        let out = Command::new("ip").args(["netns", "exec", ns, "iptables-save", "-c", "-t", "nat"]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Packets counted by the rule of `chain` that jumps to `target` in `iptables-save -c` output.
pub fn jump_packets(counters: &str, chain: &str, target: &str) -> u64 {
    counters
        .lines()
        .filter(|l| l.contains(&format!("-A {chain} ")) && l.trim_end().ends_with(&format!("-j {target}")))
        .filter_map(|l| l.strip_prefix('[')?.split(':').next()?.parse::<u64>().ok())
        .sum()
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        for ns in self.pods.values().chain(self.routers.values()) {
            let _ = ip(&["netns", "del", ns]);
            let _ = std::fs::remove_dir_all(hosts_dir(ns));
        }
    }
}

/// The real Envoy binary behind `envoy` (pip's `envoy` is a Python wrapper
/// around `site-packages/envoy/_bin/envoy`): another user must run the binary itself.
pub fn real_envoy_binary(envoy: &Path) -> std::io::Result<PathBuf> {
    let head = std::fs::read(envoy).map(|b| b.into_iter().take(256).collect::<Vec<u8>>())?;
    if head.starts_with(b"\x7fELF") {
        return Ok(envoy.to_path_buf());
    }
    let text = String::from_utf8_lossy(&head);
    let python = text.lines().next().and_then(|l| l.strip_prefix("#!")).map(str::trim).unwrap_or("python3");
    let out = Command::new(python).args(["-c", "import envoy, os; print(os.path.dirname(envoy.__file__))"]).output()?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let bin = Path::new(&dir).join("_bin/envoy");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("no Envoy binary behind {}", envoy.display())))
    }
}

/// A copy of Envoy that the proxy user can run (root's home is not theirs to read).
pub fn envoy_for_proxy_user(envoy: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let copy = dir.join("envoy");
    std::fs::copy(real_envoy_binary(envoy)?, &copy)?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
    Ok(copy)
}
