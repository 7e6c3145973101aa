//! Kubernetes objects (the real shapes, parsed with k8s-openapi) into one
//! cluster's [`ClusterState`]: Services, EndpointSlices and the Pods behind
//! them (subset labels, service accounts), and Namespaces (the cluster's
//! network, Istio's `topology.istio.io/network` label).
//!
//! A Service with no EndpointSlice gets its endpoints from the Pods its
//! selector matches, the way the endpointslice controller would write them,
//! so hand-written local-mode folders can stay short.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ContainerPort, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Service as MeshService, ServiceKey, ServicePort};

/// Istio's label for the network of a namespace, pod or gateway Service.
pub const NETWORK_LABEL: &str = "topology.istio.io/network";
/// Istio's pod label saying its sidecar accepts mTLS.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The ports a sidecar keeps for itself (Istio's 15000–15090: admin, 15001
/// outbound, 15006 inbound, 15020/15021 health, 15090 stats).
pub const SIDECAR_PORTS: std::ops::RangeInclusive<u16> = 15000..=15090;

/// Objects of one cluster, as a file defines them or a complete list gives
/// them, shared (`Arc`) with the source's copy.
#[derive(Debug, Clone, Default)]
pub struct ClusterObjects {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub pods: Vec<Arc<PodSummary>>,
    pub namespaces: Vec<Arc<Namespace>>,
}

/// What [`super::cluster_build::ClusterBuilder`] reads from a Pod, kept instead of the Pod itself: a
/// parsed `Pod` is ≈4 KB (its spec and status inline, containers and all),
/// and a mesh keeps one per endpoint (30,000 in the scale fixture: ≈130 MB).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodSummary {
    pub namespace: String,
    pub name: Option<String>,
    pub labels: Arc<BTreeMap<String, String>>,
    pub service_account: Option<String>,
    pub pod_ip: Option<String>,
    /// The Ready condition, when the status has one.
    pub ready: Option<bool>,
    /// Being deleted (`deletionTimestamp` set): not serving new connections,
    /// whatever its Ready condition still says.
    pub terminating: bool,
    /// (name, containerPort) of every container port, for named target ports.
    pub container_ports: Vec<(Option<String>, i32)>,
}

impl From<&PodView> for PodSummary {
    fn from(pod: &PodView) -> Self {
        let status = pod.status.as_ref();
        PodSummary {
            namespace: ns_of(&pod.metadata),
            name: pod.metadata.name.clone(),
            labels: Arc::new(pod.metadata.labels.clone().unwrap_or_default()),
            service_account: pod.spec.as_ref().and_then(|s| s.service_account_name.clone()),
            pod_ip: status.and_then(|s| s.pod_ip.clone()).filter(|ip| !ip.is_empty()),
            ready: status.and_then(|s| s.conditions.as_ref()).and_then(|cs| cs.iter().find(|c| c.type_ == "Ready")).map(|c| c.status == "True"),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            container_ports: pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter().flatten())
                .flat_map(|c| c.ports.iter().flatten())
                .map(|p| (p.name.clone(), p.container_port))
                .collect(),
        }
    }
}

impl From<&Pod> for PodSummary {
    fn from(pod: &Pod) -> Self {
        PodSummary::from(&PodView::from(pod))
    }
}

impl From<Pod> for PodSummary {
    fn from(pod: Pod) -> Self {
        PodSummary::from(&pod)
    }
}

/// The fields of a Pod that [`PodSummary`] reads, as the Kubernetes watch
/// parses and stores them: name, namespace and labels, service account, IP,
/// the Ready condition and the container ports. Every other field of the
/// API server's JSON is skipped while parsing. The watch had stored whole
/// `Pod`s, about 13 KB each in a heap profile (13 MiB of a 1,000-Pod
/// cluster), for the few fields read here.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct PodView {
    pub metadata: ObjectMeta,
    pub spec: Option<PodViewSpec>,
    pub status: Option<PodViewStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodViewSpec {
    pub service_account_name: Option<String>,
    pub containers: Option<Vec<PodViewContainer>>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct PodViewContainer {
    pub ports: Option<Vec<ContainerPort>>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodViewStatus {
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    pub conditions: Option<Vec<PodViewCondition>>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct PodViewCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

impl PodView {
    /// The metadata a view keeps: the Pod's identity (name, namespace, uid,
    /// resource version), its labels and whether it is being deleted. The
    /// rest (managed fields, annotations, owners, finalizers) can be most of
    /// what the parse leaves, and nothing here reads it.
    fn kept_metadata(meta: &ObjectMeta) -> ObjectMeta {
        ObjectMeta {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            labels: meta.labels.clone(),
            deletion_timestamp: meta.deletion_timestamp.clone(),
            ..Default::default()
        }
    }

    /// The one condition a view keeps.
    fn is_kept_condition(type_: &str) -> bool {
        type_ == "Ready"
    }

    /// Drops what the parse kept and a view does not (the watch calls this
    /// before it stores a Pod); [`PodView::from`] a parsed Pod keeps the same.
    pub fn trim(&mut self) {
        self.metadata = Self::kept_metadata(&self.metadata);
        if let Some(conditions) = self.status.as_mut().and_then(|s| s.conditions.as_mut()) {
            conditions.retain(|c| Self::is_kept_condition(&c.type_));
        }
    }
}

impl From<&Pod> for PodView {
    /// The view of a parsed Pod, as trimmed as the watch keeps it.
    fn from(pod: &Pod) -> Self {
        PodView {
            metadata: PodView::kept_metadata(&pod.metadata),
            spec: pod.spec.as_ref().map(|s| PodViewSpec {
                service_account_name: s.service_account_name.clone(),
                containers: Some(s.containers.iter().map(|c| PodViewContainer { ports: c.ports.clone() }).collect()),
            }),
            status: pod.status.as_ref().map(|s| PodViewStatus {
                pod_ip: s.pod_ip.clone(),
                conditions: s.conditions.as_ref().map(|cs| {
                    cs.iter()
                        .filter(|c| PodView::is_kept_condition(&c.type_))
                        .map(|c| PodViewCondition { type_: c.type_.clone(), status: c.status.clone() })
                        .collect()
                }),
            }),
        }
    }
}

impl k8s_openapi::Resource for PodView {
    const API_VERSION: &'static str = <Pod as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Pod as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Pod as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Pod as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <Pod as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::Metadata for PodView {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

pub(super) fn ns_of(meta: &ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".to_string())
}

/// A Service port and the `targetPort` it names (for endpoints derived from Pods).
pub(super) type TargetPort = (ServicePort, Option<IntOrString>);

/// Values derived from stored objects (the Kubernetes source's policy parses),
/// kept by the stored object's address (the object is held with its value,
/// so the address cannot be reused meanwhile): an object that did not change
/// is not derived again on the next rebuild.
#[derive(Debug)]
pub struct DerivedByObject<K, V> {
    kept: HashMap<usize, (Arc<K>, V)>,
}

impl<K, V> Default for DerivedByObject<K, V> {
    fn default() -> Self {
        DerivedByObject { kept: HashMap::new() }
    }
}

impl<K, V: Clone> DerivedByObject<K, V> {
    /// Each of `stored`'s values, derived by `derive` for the objects not seen
    /// last time; the values of objects no longer stored are dropped.
    pub fn derive(&mut self, stored: &[Arc<K>], derive: impl Fn(&K) -> V) -> Vec<V> {
        let mut kept = HashMap::with_capacity(stored.len());
        let values = stored
            .iter()
            .map(|object| {
                let at = Arc::as_ptr(object) as usize;
                let entry = self.kept.remove(&at).unwrap_or_else(|| (object.clone(), derive(object)));
                let value = entry.1.clone();
                kept.insert(at, entry);
                value
            })
            .collect();
        self.kept = kept;
        values
    }
}

/// One Service as the cluster's state holds it, with what the build of its
/// endpoints needs (target ports, selector) and what was wrong with it.
#[derive(Debug)]
pub(super) struct ConvertedService {
    /// None: not routable (no name).
    pub(super) service: Option<Arc<MeshService>>,
    pub(super) targets: Vec<TargetPort>,
    pub(super) selector: Option<BTreeMap<String, String>>,
    pub(super) errors: Vec<String>,
}

pub(super) fn convert_service(cluster: &str, svc: &Service) -> ConvertedService {
    let mut errors = Vec::new();
    let Some(svc_name) = svc.metadata.name.clone() else {
        errors.push(format!("cluster {cluster}: a Service without metadata.name"));
        return ConvertedService { service: None, targets: Vec::new(), selector: None, errors };
    };
    let namespace = ns_of(&svc.metadata);
    let spec = svc.spec.as_ref();
    let mut ports = Vec::new();
    let mut targets = Vec::new();
    for (i, p) in spec.and_then(|s| s.ports.as_ref()).into_iter().flatten().enumerate() {
        let Ok(port) = u16::try_from(p.port) else {
            errors.push(format!("Service {namespace}/{svc_name} in cluster {cluster}: spec.ports[{i}].port {} is out of range", p.port));
            continue;
        };
        let port_name = p.name.clone().unwrap_or_default();
        let (protocol, protocol_reason) = super::protocol::port_protocol(&port_name, p.app_protocol.as_deref(), p.protocol.as_deref());
        let sp = ServicePort { name: port_name, port, protocol, protocol_reason };
        targets.push((sp.clone(), p.target_port.clone()));
        ports.push(sp);
    }
    if ports.is_empty() {
        errors.push(format!("Service {namespace}/{svc_name} in cluster {cluster}: spec.ports is empty; it is not routable"));
    }
    let cluster_ip = spec.and_then(|s| s.cluster_ip.as_deref());
    let service = MeshService {
        key: ServiceKey::new(cluster, &namespace, &svc_name),
        ports,
        labels: svc.metadata.labels.clone().unwrap_or_default(),
        headless: cluster_ip == Some("None"),
        excluded_ports: Vec::new(),
        cluster_ip: cluster_ip.filter(|ip| !ip.is_empty() && *ip != "None").map(str::to_string),
        external_addresses: spec
            .and_then(|s| s.external_ips.clone())
            .unwrap_or_default()
            .into_iter()
            .chain(svc.status.iter().filter_map(|s| s.load_balancer.as_ref()).flat_map(|lb| lb.ingress.iter().flatten()).filter_map(|i| i.ip.clone()))
            .collect(),
    };
    ConvertedService { service: Some(Arc::new(service)), targets, selector: spec.and_then(|s| s.selector.clone()).filter(|s| !s.is_empty()), errors }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn a_pod_view_has_the_same_summary_as_the_pod_and_nothing_else() {
        let yaml = r#"
metadata:
  name: reviews-v1-abc
  namespace: bookinfo
  labels: {app: reviews, version: v1}
  annotations: {sidecar.istio.io/status: '{"containers":["istio-proxy"]}'}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1, uid: u1}]
  managedFields: [{manager: kubectl, operation: Apply}]
spec:
  serviceAccountName: bookinfo-reviews
  nodeName: node-1
  volumes: [{name: data, emptyDir: {}}]
  initContainers: [{name: istio-init, image: proxyv2}]
  containers:
  - name: reviews
    image: reviews:v1
    env: [{name: LOG_DIR, value: /tmp/logs}]
    ports: [{name: http, containerPort: 9080}, {containerPort: 9090}]
  - name: istio-proxy
    image: proxyv2
    args: [proxy, sidecar]
status:
  phase: Running
  podIP: 10.0.0.7
  hostIP: 192.168.1.1
  conditions:
  - {type: Initialized, status: "True"}
  - {type: Ready, status: "False", reason: ContainersNotReady, message: not ready}
  containerStatuses: [{name: reviews, ready: false, restartCount: 3, image: reviews:v1, imageID: x}]
"#;
        let full: Pod = parse(yaml);
        // As the watch parses it from the API server's JSON, and trims it.
        let mut view: PodView = serde_json::from_value(serde_json::to_value(&full).unwrap()).unwrap();
        view.trim();
        let summary = PodSummary::from(&view);
        assert_eq!(summary, PodSummary::from(&full));
        assert_eq!(PodView::from(&full).spec, view.spec);
        // A config-dir Pod's view is what the watch keeps.
        assert_eq!(PodView::from(&full), view);
        assert_eq!(summary.ready, Some(false));
        assert_eq!(summary.container_ports, vec![(Some("http".to_string()), 9080), (None, 9090)]);
        assert_eq!(summary.service_account.as_deref(), Some("bookinfo-reviews"));
        let kept = format!("{view:?}");
        for gone in [
            "sidecar.istio.io/status",
            "ReplicaSet",
            "kubectl",
            "node-1",
            "emptyDir",
            "istio-init",
            "LOG_DIR",
            "proxyv2",
            "192.168.1.1",
            "Initialized",
            "ContainersNotReady",
            "restartCount",
        ] {
            assert!(!kept.contains(gone), "{gone} kept in {kept}");
        }
    }

    #[test]
    fn a_value_is_derived_once_per_stored_object() {
        let calls = std::cell::Cell::new(0);
        let mut derived = DerivedByObject::<String, usize>::default();
        let length = |s: &String| {
            calls.set(calls.get() + 1);
            s.len()
        };
        let (a, b) = (Arc::new("a".to_string()), Arc::new("bb".to_string()));
        assert_eq!(derived.derive(&[a.clone(), b.clone()], length), [1, 2]);
        assert_eq!(calls.get(), 2);
        // The same objects: nothing derived again. A new object (an equal value included) is.
        let c = Arc::new("a".to_string());
        assert_eq!(derived.derive(&[b.clone(), a.clone(), c.clone()], length), [2, 1, 1]);
        assert_eq!(calls.get(), 3);
        // An object no longer stored is forgotten.
        assert_eq!(derived.derive(&[c], length), [1]);
        assert_eq!(derived.kept.len(), 1);
        assert_eq!(calls.get(), 3);
    }
}
