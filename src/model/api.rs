//! The seed's API (Service Mesh Hub v0.5, `networking.zephyr.solo.io/v1alpha1`):
//! TrafficPolicy, VirtualMesh, AccessControlPolicy, with every field of that
//! era's spec. Field names follow the proto3 JSON of the original protos.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const NETWORKING_GROUP_VERSION: &str = "networking.zephyr.solo.io/v1alpha1";
pub const DISCOVERY_GROUP_VERSION: &str = "discovery.zephyr.solo.io/v1alpha1";
/// The apiVersions Istio serves `Sidecar` under.
pub const ISTIO_NETWORKING_VERSIONS: [&str; 3] = ["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"];

/// `{name, namespace, cluster}` — a service in a registered cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceRef {
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub cluster: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSelector {
    pub matcher: Option<ServiceMatcher>,
    pub service_refs: Option<ServiceRefs>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMatcher {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub clusters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRefs {
    #[serde(default)]
    pub services: Vec<ResourceRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatcher {
    pub prefix: Option<String>,
    pub exact: Option<String>,
    pub regex: Option<String>,
    #[serde(default)]
    pub headers: Vec<HeaderMatcher>,
    #[serde(default)]
    pub query_parameters: Vec<QueryParameterMatcher>,
    pub method: Option<HttpMethod>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatcher {
    pub name: String,
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub regex: bool,
    #[serde(default)]
    pub invert_match: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueryParameterMatcher {
    pub name: String,
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub regex: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMethod {
    pub method: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MultiDestination {
    #[serde(default)]
    pub destinations: Vec<WeightedDestination>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedDestination {
    pub destination: ResourceRef,
    #[serde(default)]
    pub weight: u32,
    #[serde(default)]
    pub subset: BTreeMap<String, String>,
    pub port: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultInjection {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
    #[serde(default)]
    pub percentage: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    pub fixed_delay: Option<String>,
    pub exponential_delay: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    pub http_status: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    #[serde(default)]
    pub attempts: i32,
    pub per_try_timeout: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CorsPolicy {
    #[serde(default)]
    pub allow_origins: Vec<StringMatch>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    pub max_age: Option<String>,
    pub allow_credentials: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    pub destination: ResourceRef,
    pub percentage: Option<f64>,
    pub port: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderManipulation {
    #[serde(default)]
    pub remove_response_headers: Vec<String>,
    #[serde(default)]
    pub append_response_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub remove_request_headers: Vec<String>,
    #[serde(default)]
    pub append_request_headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    pub consecutive_errors: Option<u32>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
}

/// `TrafficPolicy.spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default, CustomResource)]
#[kube(
    group = "networking.zephyr.solo.io",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    status = "PolicyObjectStatus",
    shortname = "tp",
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.translationStatus.state"}"#,
    printcolumn = r#"{"name":"Generation","type":"integer","jsonPath":".status.observedGeneration"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    pub source_selector: Option<WorkloadSelector>,
    pub destination_selector: Option<ServiceSelector>,
    #[serde(default)]
    pub http_request_matchers: Vec<HttpMatcher>,
    pub traffic_shift: Option<MultiDestination>,
    pub fault_injection: Option<FaultInjection>,
    pub request_timeout: Option<String>,
    pub retries: Option<RetryPolicy>,
    pub cors_policy: Option<CorsPolicy>,
    pub mirror: Option<Mirror>,
    pub header_manipulation: Option<HeaderManipulation>,
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BuiltinCa {
    pub ttl_days: Option<u32>,
    pub rsa_key_size_bytes: Option<u32>,
    pub org_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvidedCa {
    pub certificate: Option<ResourceRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateAuthority {
    pub builtin: Option<BuiltinCa>,
    pub provided: Option<ProvidedCa>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Federation {
    pub mode: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustMode {}

/// `VirtualMesh.spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default, CustomResource)]
#[kube(group = "networking.zephyr.solo.io", version = "v1alpha1", kind = "VirtualMesh", namespaced, status = "PolicyObjectStatus", shortname = "vm")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMeshSpec {
    pub display_name: Option<String>,
    #[serde(default)]
    pub meshes: Vec<ResourceRef>,
    pub certificate_authority: Option<CertificateAuthority>,
    pub federation: Option<Federation>,
    pub shared: Option<TrustMode>,
    pub limited: Option<TrustMode>,
    /// `MESH_DEFAULT`, `ENABLED` or `DISABLED` (a bool in v0.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bool_or_string")]
    pub enforce_access_control: Option<serde_json::Value>,
    /// meshpilot's extension (the seed read it from each cluster's discovered
    /// Istio): member cluster → the trust domain of its workloads' identities
    /// (Istio's `meshConfig.trustDomain` there); `cluster.local` otherwise.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trust_domains: BTreeMap<String, String>,
}

/// `AccessControlPolicy.spec` (accepted; enforcement comes later).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default, CustomResource)]
#[kube(
    group = "networking.zephyr.solo.io",
    version = "v1alpha1",
    kind = "AccessControlPolicy",
    namespaced,
    status = "PolicyObjectStatus",
    shortname = "acp"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessControlPolicySpec {
    pub source_selector: Option<IdentitySelector>,
    pub destination_selector: Option<ServiceSelector>,
    #[serde(default)]
    pub allowed_paths: Vec<String>,
    #[serde(default)]
    pub allowed_methods: Vec<String>,
    #[serde(default)]
    pub allowed_ports: Vec<u32>,
}

/// `AccessControlPolicy.spec.sourceSelector`: one of `matcher` or `serviceAccountRefs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentitySelector {
    pub matcher: Option<IdentityMatcher>,
    pub service_account_refs: Option<ServiceAccountRefs>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityMatcher {
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub clusters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountRefs {
    #[serde(default)]
    pub service_accounts: Vec<ResourceRef>,
}

/// Istio's `Sidecar` (`networking.istio.io/v1`): which services a sidecar
/// imports. A proxy is configured for the services its Sidecar's
/// `egress[].hosts` name (`namespace/dnsName`, `*` and `.` as in Istio), plus
/// whatever their TrafficPolicies route to; without a Sidecar it sees every
/// service of its virtual mesh. Istio's other fields are accepted and
/// reported as not yet supported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default, CustomResource)]
#[kube(group = "networking.istio.io", version = "v1", kind = "Sidecar", namespaced, status = "PolicyObjectStatus")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarSpec {
    pub workload_selector: Option<SidecarWorkloadSelector>,
    #[serde(default)]
    pub egress: Vec<SidecarEgress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub ingress: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub outbound_traffic_policy: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub inbound_connection_pool: Option<serde_json::Value>,
}

/// `Sidecar.spec.workloadSelector`: the pods (in the Sidecar's namespace) it applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarWorkloadSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `Sidecar.spec.egress[]`: hosts to import (`port`, `bind` and
/// `captureMode` are accepted, not yet supported).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarEgress {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub port: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_mode: Option<String>,
}

/// `KubernetesCluster.spec` (`discovery.zephyr.solo.io/v1alpha1`): a
/// registered cluster and where its kubeconfig is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default, CustomResource)]
#[kube(
    group = "discovery.zephyr.solo.io",
    version = "v1alpha1",
    kind = "KubernetesCluster",
    namespaced,
    shortname = "kc",
    printcolumn = r#"{"name":"Context","type":"string","jsonPath":".spec.context"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesClusterSpec {
    /// The Secret holding the cluster's kubeconfig (key `kubeconfig`).
    pub secret_ref: SecretRef,
    /// The kubeconfig context to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<String>,
    /// Where meshpilot keeps its objects in that cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_namespace: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// `status` of the networking objects, in the seed's shape (v0.4
/// translationStatus, v0.5 validationStatus and conflictErrors, v0.6
/// observedGeneration) plus what meshpilot adds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct PolicyObjectStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translation_status: Option<ApprovalStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_status: Option<ApprovalStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflict_errors: Vec<ConflictError>,
    /// The generation whose configuration is in effect (the last accepted one
    /// while the current one is INVALID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_generation: Option<i64>,
    /// The services the policy applies to (`name.namespace.cluster`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// Fields that are accepted but not yet in effect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_yet_supported: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalStatus {
    /// UNKNOWN, ACCEPTED, INVALID, PROCESSING_ERROR or CONFLICT.
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConflictError {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration_target: Option<ResourceRef>,
    pub error_message: String,
}

/// A bool (v0.4) or an enum string (v0.5): a structural schema that keeps either.
fn bool_or_string(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "nullable": true, "x-kubernetes-preserve-unknown-fields": true })
}

/// Any JSON (Istio fields meshpilot keeps but does not act on): a structural schema that keeps it.
fn any_value(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}

/// Parses a proto3 JSON duration (`"1.5s"`) or a human one (`"100ms"`, `"2m"`).
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let t = s.trim();
    if let Some(secs) = t.strip_suffix('s')
        && let Ok(v) = secs.parse::<f64>()
        && v.is_finite()
        && v >= 0.0
    {
        // (from_secs_f64 panics past u64 seconds: "1e30s" would have taken serve down.)
        return std::time::Duration::try_from_secs_f64(v).ok();
    }
    humantime::parse_duration(t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Some(std::time::Duration::from_secs(1)));
        assert_eq!(parse_duration("0.25s"), Some(std::time::Duration::from_millis(250)));
        assert_eq!(parse_duration("100ms"), Some(std::time::Duration::from_millis(100)));
        assert_eq!(parse_duration("soon"), None);
    }
}
