//! The operator's HTTP surface: health, readiness, Prometheus metrics, and
//! istiod-style debug endpoints (`/debug/syncz`, `/debug/config_dump`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::cache::MeshResources;
use crate::metrics::Metrics;
use crate::model::describe::{describe_service, parse_service_arg, policy_report};
use crate::xds::codec;
use crate::xds::node::ProxyNode;
use crate::xds::provider::ResourceProvider;
use crate::xds::registry::{ConnectionRegistry, ProxyConnection};
use crate::xds::resources::ResourceType;
use crate::xds::status::{SyncState, TypeStatus};

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub registry: Arc<ConnectionRegistry>,
    pub metrics: Arc<Metrics>,
    pub provider: Arc<dyn ResourceProvider>,
    /// The mesh, when serving from mesh sources (policy status, describe).
    pub mesh: Option<Arc<MeshResources>>,
    /// The Kubernetes source's per-cluster watch health, when serving from Kubernetes.
    pub clusters: Option<crate::sources::kubernetes::SourceHealth>,
}

pub fn router(state: AdminState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/debug/syncz", get(syncz))
        .route("/debug/config_dump", get(config_dump))
        .route("/debug/policyz", get(policyz))
        .route("/debug/describe", get(describe))
        .route("/debug/clusterz", get(clusterz))
        .with_state(state)
}

/// Serves the admin router on `listener` until `shutdown` resolves.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

const NO_MESH: &str = "not serving a mesh (start meshpilot with --config-dir)\n";

/// Every TrafficPolicy's state (ACCEPTED / INVALID / CONFLICT), messages and
/// generations, and the inputs that could not be read.
async fn policyz(State(state): State<AdminState>) -> Response {
    match &state.mesh {
        Some(mesh) => Json(policy_report(&mesh.snapshot())).into_response(),
        None => (StatusCode::NOT_FOUND, NO_MESH).into_response(),
    }
}

/// Every registered cluster's watches: synced, stale (serving last known
/// objects while its API server is unreachable), errors, object counts.
async fn clusterz(State(state): State<AdminState>) -> Response {
    match &state.clusters {
        Some(h) => Json(h.clusters()).into_response(),
        None => (StatusCode::NOT_FOUND, "not serving from Kubernetes (start meshpilot with --kubernetes)\n").into_response(),
    }
}

#[derive(Deserialize)]
struct DescribeQuery {
    service: String,
}

async fn describe(State(state): State<AdminState>, Query(q): Query<DescribeQuery>) -> Response {
    let Some(mesh) = &state.mesh else { return (StatusCode::NOT_FOUND, NO_MESH).into_response() };
    match parse_service_arg(&q.service) {
        Some(key) => Json(describe_service(&mesh.snapshot(), &key)).into_response(),
        None => (StatusCode::BAD_REQUEST, format!("service={:?} is not NAME.NAMESPACE.CLUSTER\n", q.service)).into_response(),
    }
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if state.provider.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: config sources have not loaded yet\n").into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode()).into_response()
}

/// One row of `/debug/syncz`: a connected proxy and each type's sync state.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct SyncStatus {
    pub proxy: String,
    pub cluster: String,
    pub namespace: String,
    pub role: String,
    pub mode: String,
    pub conn_id: u64,
    pub connected_at_unix: f64,
    pub envoy_version: String,
    /// What the stream proved: `unproven`, `<ns>/<sa> (token in <cluster>)`, `self-asserted`.
    #[serde(default)]
    pub identity: String,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// By short type name (CDS, EDS, LDS, RDS, SDS).
    pub types: BTreeMap<String, TypeSync>,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct TypeSync {
    pub state: String,
    pub sent_version: Option<String>,
    pub sent_nonce: Option<String>,
    pub acked_version: Option<String>,
    pub acked_nonce: Option<String>,
    pub sent_age_seconds: Option<f64>,
    pub last_error: Option<String>,
    pub last_error_age_seconds: Option<f64>,
    pub resource_count: usize,
}

impl From<TypeStatus> for TypeSync {
    fn from(t: TypeStatus) -> Self {
        TypeSync {
            state: t.state.as_str().to_string(),
            sent_version: t.sent_version,
            sent_nonce: t.sent_nonce,
            acked_version: t.acked_version,
            acked_nonce: t.acked_nonce,
            sent_age_seconds: t.sent_age_seconds,
            last_error: t.last_error,
            last_error_age_seconds: t.last_error_age_seconds,
            resource_count: t.resource_count,
        }
    }
}

/// A type never sent (also the base of test rows).
pub(crate) fn not_sent() -> TypeSync {
    TypeSync {
        state: SyncState::NotSent.as_str().to_string(),
        sent_version: None,
        sent_nonce: None,
        acked_version: None,
        acked_nonce: None,
        sent_age_seconds: None,
        last_error: None,
        last_error_age_seconds: None,
        resource_count: 0,
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}

fn role_name(node: &ProxyNode) -> String {
    serde_json::to_value(node.role).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

pub fn sync_status(conn: &ProxyConnection, now: Instant) -> SyncStatus {
    let mut types: BTreeMap<String, TypeSync> = [ResourceType::Cluster, ResourceType::Endpoint, ResourceType::Listener, ResourceType::Route]
        .into_iter()
        .map(|t| (t.short_name().to_string(), not_sent()))
        .collect();
    for st in conn.view.status(now) {
        types.insert(st.type_short.to_string(), st.into());
    }
    SyncStatus {
        proxy: conn.node.id.clone(),
        cluster: conn.node.cluster.clone(),
        namespace: conn.node.namespace.clone(),
        role: role_name(&conn.node),
        mode: conn.mode.to_string(),
        conn_id: conn.conn_id,
        connected_at_unix: unix_seconds(conn.connected_at),
        envoy_version: conn.node.envoy_version.clone(),
        identity: conn.node.identity.describe(),
        warnings: conn.warnings.clone(),
        types,
    }
}

async fn syncz(State(state): State<AdminState>) -> Json<Vec<SyncStatus>> {
    let now = Instant::now();
    Json(state.registry.all().iter().map(|c| sync_status(c, now)).collect())
}

#[derive(Debug, Deserialize)]
struct ConfigDumpQuery {
    proxy: Option<String>,
    #[serde(rename = "proxyID")]
    proxy_id: Option<String>,
    /// Comma-separated short type names to include (default: all).
    types: Option<String>,
}

async fn config_dump(State(state): State<AdminState>, Query(q): Query<ConfigDumpQuery>) -> Response {
    let Some(id) = q.proxy.or(q.proxy_id) else {
        return (StatusCode::BAD_REQUEST, "missing ?proxy=<node id>\n").into_response();
    };
    let Some(conn) = state.registry.by_node_id(&id) else {
        return (StatusCode::NOT_FOUND, format!("no connected proxy with node id {id:?}\n")).into_response();
    };
    let wanted: Option<Vec<String>> = q.types.map(|t| t.split(',').map(|s| s.trim().to_ascii_uppercase()).filter(|s| !s.is_empty()).collect());
    match config_dump_json(&conn, wanted.as_deref()) {
        Ok(json) => Json(json).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot render config: {err}\n")).into_response(),
    }
}

/// What meshpilot last sent one proxy, as JSON (resources in proto3 JSON with `@type`).
pub fn config_dump_json(conn: &ProxyConnection, types: Option<&[String]>) -> Result<serde_json::Value, codec::CodecError> {
    let mut configs = Vec::new();
    for (ty, (version, resources)) in conn.view.sent() {
        if types.is_some_and(|t| !t.iter().any(|w| w == ty.short_name())) {
            continue;
        }
        let rendered = resources
            .iter()
            .map(|r| {
                Ok(serde_json::json!({
                    "name": r.name,
                    "version": r.version,
                    "resource": codec::any_to_json(&r.body())?,
                }))
            })
            .collect::<Result<Vec<_>, codec::CodecError>>()?;
        configs.push(serde_json::json!({
            "type": ty.short_name(),
            "type_url": ty.type_url(),
            "version": version,
            "resources": rendered,
        }));
    }
    Ok(serde_json::json!({
        "node": conn.node,
        "mode": conn.mode,
        "configs": configs,
    }))
}
