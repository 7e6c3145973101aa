//! Prometheus metrics of the control plane.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

impl TypeLabel {
    pub fn new(short: &str) -> Self {
        TypeLabel { r#type: short.to_string() }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Every metric meshpilot exports.
pub struct Metrics {
    pub registry: Registry,
    pub connected_proxies: Family<ModeLabel, Gauge>,
    pub pushes: Family<TypeLabel, Counter>,
    pub push_bytes: Family<TypeLabel, Counter>,
    pub rejects: Family<TypeLabel, Counter>,
    pub expired_nonces: Family<TypeLabel, Counter>,
    pub stream_errors: Family<ReasonLabel, Counter>,
    /// Config change → the proxy ACKed the response it caused.
    pub convergence: Family<TypeLabel, Histogram>,
    pub config_changes: Counter,
    pub push_triggers: Counter,
    pub debounce_seconds: Histogram,
    pub config_generation: Gauge,
    /// Large responses that waited for the send budget, and shares let go overdue.
    pub send_budget_waits: Counter,
    pub send_budget_overdue: Counter,
    /// What the mesh provider did per scope on a change.
    pub translation: TranslationCounters,
}

/// How the mesh provider met changes: whole-scope translations, scopes a
/// policy change patched instead, and policy versions Envoy's rejection rolled back.
#[derive(Clone, Debug, Default)]
pub struct TranslationCounters {
    pub scope_translations: Counter,
    pub scope_patches: Counter,
    pub policy_rollbacks: Counter,
}

fn convergence_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0, 5.0, 10.0, 30.0])
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshpilot");
        let connected_proxies = Family::<ModeLabel, Gauge>::default();
        registry.register("xds_connected_proxies", "xDS streams open, by protocol mode", connected_proxies.clone());
        let pushes = Family::<TypeLabel, Counter>::default();
        registry.register("xds_pushes", "xDS responses sent, by type", pushes.clone());
        let push_bytes = Family::<TypeLabel, Counter>::default();
        registry.register("xds_push_bytes", "Encoded bytes of xDS responses sent, by type", push_bytes.clone());
        let rejects = Family::<TypeLabel, Counter>::default();
        registry.register("xds_rejects", "Responses a proxy rejected (NACK), by type", rejects.clone());
        let expired_nonces = Family::<TypeLabel, Counter>::default();
        registry.register("xds_expired_nonces", "Requests ignored for carrying a stale nonce", expired_nonces.clone());
        let stream_errors = Family::<ReasonLabel, Counter>::default();
        registry.register("xds_stream_errors", "Streams or requests refused, by reason", stream_errors.clone());
        let convergence = Family::<TypeLabel, Histogram>::new_with_constructor(convergence_histogram as fn() -> Histogram);
        registry.register("proxy_convergence_seconds", "Time from a config change to the proxy's ACK of the response it caused", convergence.clone());
        let config_changes = Counter::default();
        registry.register("config_changes", "Config change events received from sources", config_changes.clone());
        let push_triggers = Counter::default();
        registry.register("push_triggers", "Debounced pushes started", push_triggers.clone());
        let debounce_seconds = Histogram::new([0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0]);
        registry.register("debounce_seconds", "Time from the first change to the push it joined", debounce_seconds.clone());
        let config_generation = Gauge::default();
        registry.register("config_generation", "The number of debounced pushes so far", config_generation.clone());
        let send_budget_waits = Counter::default();
        registry.register(
            "xds_send_budget_waits",
            "Large xDS responses that found the send budget taken when they asked (counted before they wait)",
            send_budget_waits.clone(),
        );
        let send_budget_overdue = Counter::default();
        registry.register(
            "xds_send_budget_overdue",
            "Send-budget shares let go because their proxy had not taken the response within the hold limit",
            send_budget_overdue.clone(),
        );
        let translation = TranslationCounters::default();
        registry.register(
            "scope_translations",
            "Whole translations of a proxy scope (a cache miss, or a change a patch could not follow)",
            translation.scope_translations.clone(),
        );
        registry.register(
            "scope_patches",
            "Proxy scopes a policy change patched instead of translating them again",
            translation.scope_patches.clone(),
        );
        registry.register(
            "policy_rollbacks",
            "Policy versions rolled back because Envoy rejected their routes",
            translation.policy_rollbacks.clone(),
        );
        Metrics {
            translation,
            registry,
            connected_proxies,
            pushes,
            push_bytes,
            rejects,
            expired_nonces,
            stream_errors,
            convergence,
            config_changes,
            push_triggers,
            debounce_seconds,
            config_generation,
            send_budget_waits,
            send_budget_overdue,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    pub fn stream_error(&self, reason: &str) {
        self.stream_errors.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc();
    }
}
