//! Names that must stay stable: Envoy cluster names, hosts, subset names,
//! virtual host domains. They follow Istio's (`outbound|9080|v1|reviews.default.svc.cluster.local`)
//! so Envoy stats and tooling look familiar; another cluster's service is
//! named by its `.global` host, so the name says which cluster it is.

use crate::model::ServiceKey;

/// The host of `service` as a proxy in `client_cluster` sees it: its own
/// cluster's services are `name.ns.svc.cluster.local`, another cluster's are
/// `name.ns.svc.<cluster>.global` (Service Mesh Hub's multicluster DNS name).
pub fn host(client_cluster: &str, service: &ServiceKey) -> String {
    if service.cluster == client_cluster { kubernetes_host(service) } else { global_host(service) }
}

/// `name.ns.svc.cluster.local`: the service's Kubernetes name, in whichever cluster.
pub fn kubernetes_host(service: &ServiceKey) -> String {
    format!("{}.{}.svc.cluster.local", service.name, service.namespace)
}

/// `name.ns.svc.<cluster>.global`: a service of a given cluster, from anywhere in the mesh.
pub fn global_host(service: &ServiceKey) -> String {
    format!("{}.{}.svc.{}.global", service.name, service.namespace, service.cluster)
}

pub use crate::model::subset_name;

/// Istio's `BuildSubsetKey`: `outbound|<port>|<subset>|<host>`.
pub fn outbound_cluster(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// Istio's `BuildDNSSrvSubsetKey`: `outbound_.<port>_.<subset>_.<host>` (SNI toward a gateway).
pub fn outbound_sni(port: u16, subset: &str, host: &str) -> String {
    format!("outbound_.{port}_.{subset}_.{host}")
}

/// The route configuration of a port (Istio's RDS name for HTTP ports).
pub fn route_config_name(port: u16) -> String {
    port.to_string()
}

/// `<bind>_<port>`, Istio's listener name.
pub fn listener_name(bind: &str, port: u16) -> String {
    format!("{bind}_{port}")
}

/// Virtual host domains for a service (Istio's `generateVirtualHostDomains`):
/// always the host; with `aliases`, the Kubernetes short forms as seen from
/// `client_namespace` and the `cluster.local` FQDN.
pub fn domains(service: &ServiceKey, host: &str, aliases: bool, client_namespace: &str, cluster_ip: Option<&str>) -> Vec<String> {
    let mut out = vec![host.to_string()];
    if aliases {
        let (n, ns) = (&service.name, &service.namespace);
        let fqdn = format!("{n}.{ns}.svc.cluster.local");
        if fqdn != host {
            out.push(fqdn);
        }
        if ns == client_namespace {
            out.push(n.clone());
        }
        out.push(format!("{n}.{ns}"));
        out.push(format!("{n}.{ns}.svc"));
        if let Some(ip) = cluster_ip {
            out.push(ip.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn istio_shaped_names() {
        let k = ServiceKey::new("remote-cluster", "default", "reviews");
        assert_eq!(host("management-plane", &k), "reviews.default.svc.remote-cluster.global");
        assert_eq!(host("remote-cluster", &k), "reviews.default.svc.cluster.local");
        let v1: BTreeMap<String, String> = [("version".to_string(), "v1".to_string())].into();
        assert_eq!(subset_name(&v1), "version-v1");
        let odd: BTreeMap<String, String> = [("app.kubernetes.io/version".to_string(), "1 2".to_string())].into();
        assert_eq!(subset_name(&odd), "app.kubernetes.io-version-1-2");
        assert_eq!(
            outbound_cluster(9080, "version-v1", "reviews.default.svc.cluster.local"),
            "outbound|9080|version-v1|reviews.default.svc.cluster.local"
        );
        assert_eq!(outbound_sni(9080, "", "r.d.svc.cluster.local"), "outbound_.9080_._.r.d.svc.cluster.local");
        let local = ServiceKey::new("c", "default", "reviews");
        assert_eq!(
            domains(&local, "reviews.default.svc.cluster.local", true, "default", Some("10.0.0.9")),
            ["reviews.default.svc.cluster.local", "reviews", "reviews.default", "reviews.default.svc", "10.0.0.9"]
        );
        assert_eq!(domains(&local, "reviews.default.svc.cluster.local", true, "other", None).len(), 3);
    }
}
