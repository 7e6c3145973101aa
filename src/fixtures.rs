//! Synthetic meshes of any size (services × clusters × endpoints, with
//! TrafficPolicies), for benchmarks and load tests.

pub mod kube;

use std::collections::BTreeMap;

use crate::model::api::{
    MultiDestination, ResourceRef, ServiceRefs, ServiceSelector, SidecarSpec, TrafficPolicySpec, VirtualMeshSpec, WeightedDestination,
};
use crate::model::{ClusterState, Endpoint, Locality, MeshInputs, PolicyObject, Service, ServiceKey, ServicePort};

#[derive(Debug, Clone, Copy)]
pub struct ScaleSpec {
    pub services: usize,
    pub clusters: usize,
    pub endpoints: usize,
    /// TrafficPolicies, each shifting one service of cluster 0 half to its v1 subset, half to the next cluster.
    pub policies: usize,
    /// One Istio Sidecar per namespace importing that namespace's services
    /// (`./*`, Istio's usual first step at scale); without, every proxy sees
    /// every service.
    pub sidecars: bool,
}

/// The namespaces services are spread over (`ns-<i % 10>`).
pub const NAMESPACES: usize = 10;

/// `ns-<i>`'s Sidecar: import the namespace's own services.
fn namespace_sidecar(ns: usize) -> PolicyObject<SidecarSpec> {
    crate::model::sidecar::sidecar_object(&format!("ns-{ns}"), "default", "fixtures", None, &["./*"])
}

pub fn cluster_name(i: usize) -> String {
    format!("cluster-{i}")
}

pub fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

/// The address of endpoint `i` of service `service` in cluster `cluster` (its pod's IP).
pub fn endpoint_address(cluster: usize, service: usize, i: usize) -> String {
    format!("10.{}.{}.{}", cluster, (service * 10 + i) / 250 % 250, (service * 10 + i) % 250 + 1)
}

fn endpoint(cluster: usize, service: usize, i: usize) -> Endpoint {
    Endpoint {
        address: endpoint_address(cluster, service, i),
        ports: std::sync::Arc::new([("http".to_string(), 8080)].into()),
        labels: std::sync::Arc::new([("app".to_string(), service_name(service)), ("version".to_string(), format!("v{}", i % 3 + 1))].into()),
        ready: true,
        locality: Locality { region: format!("region-{cluster}"), zone: format!("zone-{}", i % 2) },
        network: String::new(),
        service_account: service_name(service),
        pod: Some(format!("{}-{i}", service_name(service))),
        mesh_tls: false,
    }
}

/// A mesh object of the fixture (namespace `service-mesh-hub`, generation 1).
fn mesh_object<S>(name: String, created_ms: i64, spec: S) -> PolicyObject<S> {
    PolicyObject {
        namespace: "service-mesh-hub".into(),
        name,
        generation: Some(1),
        created_ms,
        origin: "fixtures".into(),
        spec,
        parse_errors: vec![],
    }
}

/// Services `svc-00000…` in namespace `ns-<i % 10>`, every cluster having all of
/// them, all clusters in one virtual mesh.
pub fn scale_inputs(spec: ScaleSpec) -> MeshInputs {
    let mut inputs = MeshInputs::default();
    for c in 0..spec.clusters {
        let name = cluster_name(c);
        let mut state = ClusterState { name: name.clone(), ..Default::default() };
        for s in 0..spec.services {
            let ns = format!("ns-{}", s % 10);
            let svc = service_name(s);
            state.services.insert(
                (ns.clone(), svc.clone()),
                std::sync::Arc::new(Service {
                    key: ServiceKey::new(&name, &ns, &svc),
                    ports: vec![ServicePort::named("http", 9080)],
                    labels: [("app".to_string(), svc.clone())].into(),
                    cluster_ip: None,
                    headless: false,
                    excluded_ports: Vec::new(),
                    external_addresses: Vec::new(),
                }),
            );
            state.endpoints.insert((ns, svc), std::sync::Arc::new((0..spec.endpoints).map(|i| endpoint(c, s, i)).collect()));
        }
        inputs.clusters.insert(name, std::sync::Arc::new(state));
    }
    inputs.virtual_meshes.push(mesh_object(
        "all".into(),
        0,
        VirtualMeshSpec {
            meshes: (0..spec.clusters).map(|c| ResourceRef { name: cluster_name(c), ..Default::default() }).collect(),
            ..Default::default()
        },
    ));
    for p in 0..spec.policies.min(spec.services) {
        let ns = format!("ns-{}", p % 10);
        let r = |c: usize| ResourceRef { name: service_name(p), namespace: ns.clone(), cluster: cluster_name(c) };
        let mut dests =
            vec![WeightedDestination { destination: r(0), weight: 50, subset: [("version".to_string(), "v1".to_string())].into(), port: None }];
        if spec.clusters > 1 {
            dests.push(WeightedDestination { destination: r(1), weight: 50, subset: BTreeMap::new(), port: None });
        }
        inputs.traffic_policies.push(mesh_object(
            format!("shift-{p}"),
            p as i64,
            TrafficPolicySpec {
                destination_selector: Some(ServiceSelector { service_refs: Some(ServiceRefs { services: vec![r(0)] }), matcher: None }),
                traffic_shift: Some(MultiDestination { destinations: dests }),
                ..Default::default()
            },
        ));
    }
    if spec.sidecars {
        inputs.sidecars = (0..NAMESPACES).map(namespace_sidecar).collect();
    }
    inputs
}

/// Turns on access control in the fixture's virtual mesh and adds `count`
/// AccessControlPolicies: policy `p` lets `svc-<p+1>`'s service account (in
/// cluster-0) GET `/api*` on port 9080 of `svc-<p>` in every cluster.
pub fn with_access_control(inputs: &mut MeshInputs, spec: ScaleSpec, count: usize) {
    use crate::model::api::{AccessControlPolicySpec, IdentitySelector, ServiceAccountRefs};
    for vm in &mut inputs.virtual_meshes {
        vm.spec.enforce_access_control = Some(serde_json::Value::String("ENABLED".into()));
    }
    for p in 0..count.min(spec.services.saturating_sub(1)) {
        let (client, ns) = (p + 1, |s: usize| format!("ns-{}", s % 10));
        let source = ResourceRef { name: service_name(client), namespace: ns(client), cluster: cluster_name(0) };
        let destinations = (0..spec.clusters).map(|c| ResourceRef { name: service_name(p), namespace: ns(p), cluster: cluster_name(c) }).collect();
        inputs.access_policies.push(mesh_object(
            format!("access-{p}"),
            p as i64,
            AccessControlPolicySpec {
                source_selector: Some(IdentitySelector {
                    matcher: None,
                    service_account_refs: Some(ServiceAccountRefs { service_accounts: vec![source] }),
                }),
                destination_selector: Some(ServiceSelector { matcher: None, service_refs: Some(ServiceRefs { services: destinations }) }),
                allowed_paths: vec!["/api*".into()],
                allowed_methods: vec!["GET".into()],
                allowed_ports: vec![9080],
            },
        ));
    }
}

/// Moves one endpoint of `service` in `cluster` (an address change, as a rollout would).
pub fn churn_endpoint(inputs: &mut MeshInputs, cluster: usize, service: usize, step: usize) {
    let ns = format!("ns-{}", service % 10);
    let state = std::sync::Arc::make_mut(inputs.clusters.get_mut(&cluster_name(cluster)).expect("cluster"));
    if let Some(eps) = state.endpoints.get_mut(&(ns, service_name(service)))
        && let Some(ep) = std::sync::Arc::make_mut(eps).first_mut()
    {
        ep.address = changed_address(step);
    }
}

/// What every [`changed_address`] starts with (no other fixture address does).
pub const CHANGED_ADDRESS_PREFIX: &str = "10.200.";

/// How many change steps a [`changed_address`] tells apart (its last two octets).
pub const CHANGED_ADDRESS_STEPS: usize = 250 * 250;

/// The address a change at `step` gives a service's first endpoint (unique per step).
pub fn changed_address(step: usize) -> String {
    format!("{CHANGED_ADDRESS_PREFIX}{}.{}", step / 250 % 250, step % 250 + 1)
}

/// The change step an address of [`changed_address`] encodes (modulo
/// [`CHANGED_ADDRESS_STEPS`]). Read from bytes, with no UTF-8 check or
/// string search: the load generator reads a million a second under a churn.
pub fn step_of_changed_address(address: &[u8]) -> Option<usize> {
    let rest = address.strip_prefix(CHANGED_ADDRESS_PREFIX.as_bytes())?;
    let dot = rest.iter().position(|b| *b == b'.')?;
    let number = |digits: &[u8]| -> Option<usize> {
        (!digits.is_empty() && digits.len() <= 3 && digits.iter().all(u8::is_ascii_digit))
            .then(|| digits.iter().fold(0, |n, d| n * 10 + usize::from(d - b'0')))
    };
    let (high, low) = (number(&rest[..dot])?, number(&rest[dot + 1..])?);
    (high < 250 && (1..=250).contains(&low)).then(|| high * 250 + low - 1)
}

/// The highest change step among the addresses in `text` (0 when none).
pub fn last_changed_step(text: &str) -> usize {
    text.match_indices(CHANGED_ADDRESS_PREFIX)
        .filter_map(|(at, _)| {
            let rest = &text[at..];
            let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
            step_of_changed_address(&rest.as_bytes()[..end])
        })
        .max()
        .unwrap_or(0)
}

/// Writes a config dir of the same shape as [`scale_inputs`]: one file per
/// (cluster, service) with the Service, its EndpointSlice and its Pods in
/// `DIR/cluster-<c>/`, and the VirtualMesh and TrafficPolicies in `DIR/mesh/`.
/// Endpoint churn then edits one small file.
pub fn write_config_dir(dir: &std::path::Path, spec: ScaleSpec) -> std::io::Result<()> {
    use std::fmt::Write as _;
    std::fs::create_dir_all(dir.join("mesh"))?;
    for c in 0..spec.clusters {
        let cdir = dir.join(cluster_name(c));
        std::fs::create_dir_all(&cdir)?;
        for s in 0..spec.services {
            std::fs::write(cdir.join(format!("{}.yaml", service_name(s))), service_yaml(c, s, spec.endpoints, 0))?;
        }
    }
    let mut vm = String::from(
        "apiVersion: networking.zephyr.solo.io/v1alpha1\nkind: VirtualMesh\nmetadata: {name: all, namespace: service-mesh-hub}\nspec:\n  meshes:\n",
    );
    for c in 0..spec.clusters {
        let _ = writeln!(vm, "  - name: {}", cluster_name(c));
    }
    std::fs::write(dir.join("mesh/virtual-mesh.yaml"), vm)?;
    let mut policies = String::new();
    for p in 0..spec.policies.min(spec.services) {
        let ns = format!("ns-{}", p % 10);
        let svc = service_name(p);
        let _ = write!(
            policies,
            "---\napiVersion: networking.zephyr.solo.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: shift-{p}, namespace: service-mesh-hub}}\nspec:\n  destinationSelector: {{serviceRefs: {{services: [{{cluster: {c0}, name: {svc}, namespace: {ns}}}]}}}}\n  trafficShift:\n    destinations:\n    - {{destination: {{cluster: {c0}, name: {svc}, namespace: {ns}}}, weight: 50, subset: {{version: v1}}}}\n",
            c0 = cluster_name(0)
        );
        if spec.clusters > 1 {
            let _ = writeln!(policies, "    - {{destination: {{cluster: {}, name: {svc}, namespace: {ns}}}, weight: 50}}", cluster_name(1));
        }
    }
    std::fs::write(dir.join("mesh/traffic-policies.yaml"), policies)?;
    if spec.sidecars {
        let mut sidecars = String::new();
        for ns in 0..NAMESPACES {
            let _ = write!(
                sidecars,
                "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: ns-{ns}}}\nspec:\n  egress:\n  - hosts: [\"./*\"]\n"
            );
        }
        std::fs::write(dir.join("mesh/sidecars.yaml"), sidecars)?;
    }
    Ok(())
}

/// One service's manifests in one cluster; `step` > 0 moves its first endpoint (churn).
pub fn service_yaml(cluster: usize, service: usize, endpoints: usize, step: usize) -> String {
    use std::fmt::Write as _;
    let ns = format!("ns-{}", service % 10);
    let svc = service_name(service);
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: {ns}, labels: {{app: {svc}}}}}\nspec: {{selector: {{app: {svc}}}, ports: [{{name: http, port: 9080, targetPort: 8080}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-abc, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
    );
    for i in 0..endpoints {
        let mut ep = endpoint(cluster, service, i);
        if i == 0 && step > 0 {
            ep.address = changed_address(step);
        }
        let _ = writeln!(
            out,
            "- {{addresses: [{}], conditions: {{ready: true}}, zone: {}, targetRef: {{kind: Pod, name: {}-{i}, namespace: {ns}}}}}",
            ep.address, ep.locality.zone, svc
        );
    }
    for i in 0..endpoints {
        let ep = endpoint(cluster, service, i);
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {svc}-{i}, namespace: {ns}, labels: {{app: {svc}, version: {}}}}}\nspec: {{serviceAccountName: {svc}, containers: [{{name: app, image: app}}]}}\n",
            ep.labels["version"]
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_config_dir_loads_as_the_same_mesh() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ScaleSpec { services: 12, clusters: 3, endpoints: 4, policies: 5, sidecars: true };
        write_config_dir(dir.path(), spec).unwrap();
        let mut memory = crate::sources::file::SourceMemory::default();
        let inputs = crate::sources::file::load_config_dir(dir.path(), &mut memory).unwrap();
        assert!(inputs.errors.is_empty(), "{:?}", inputs.errors);
        let expected = scale_inputs(spec);
        assert_eq!(inputs.clusters.len(), 3);
        for (name, state) in &expected.clusters {
            let got = &inputs.clusters[name];
            assert_eq!(got.services.len(), state.services.len());
            for (key, eps) in &state.endpoints {
                let addrs = |v: &[Endpoint]| v.iter().map(|e| (e.address.clone(), e.labels.get("version").cloned())).collect::<Vec<_>>();
                let mut want = addrs(eps);
                want.sort();
                assert_eq!(addrs(&got.endpoints[key]), want, "{name} {key:?}");
            }
        }
        assert_eq!(inputs.traffic_policies.len(), 5);
        assert_eq!(inputs.sidecars.len(), NAMESPACES);
        let snapshot = crate::model::MeshSnapshot::build(inputs, &mut Default::default());
        assert!(snapshot.policy_status.values().all(|s| s.state == crate::model::PolicyState::Accepted), "{:?}", snapshot.policy_status);
        assert!(snapshot.mesh_object_status.values().all(|s| s.state == crate::model::PolicyState::Accepted), "{:?}", snapshot.mesh_object_status);
        // A proxy in ns-3 sees ns-3's services (of every cluster) and nothing else.
        let scope = crate::translate::ProxyScope::sidecar(&cluster_name(0), "ns-3", &[]);
        let set = crate::translate::translate(&snapshot, &scope);
        let clusters = set.of_type(crate::xds::resources::ResourceType::Cluster);
        assert!(!clusters.is_empty() && clusters.keys().all(|n| n.contains(".ns-3.")), "{:?}", clusters.keys());
        assert_eq!(last_changed_step(&std::fs::read_to_string(dir.path().join("cluster-1/svc-00003.yaml")).unwrap()), 0);
        for step in [1, 7, 249, 250, 62_499] {
            assert_eq!(step_of_changed_address(changed_address(step).as_bytes()), Some(step));
            assert_eq!(last_changed_step(&format!("[{}, 10.1.2.3, {}]", changed_address(1), changed_address(step))), step);
        }
        // Churn: one rewritten file changes one endpoint, and only its cluster is rebuilt.
        std::fs::write(dir.path().join("cluster-1/svc-00003.yaml"), service_yaml(1, 3, 4, 7)).unwrap();
        let again = crate::sources::file::load_config_dir(dir.path(), &mut memory).unwrap();
        let moved = &again.clusters["cluster-1"].endpoints[&("ns-3".to_string(), service_name(3))];
        assert!(moved.iter().any(|e| e.address == "10.200.0.8"), "{moved:?}");
    }
}
