//! Client Status Discovery Service: the standard way for tooling to ask a
//! control plane what each proxy was sent and whether it accepted it.

use std::time::{Instant, SystemTime};

use envoy_types::pb::envoy::admin::v3::{ClientResourceStatus, UpdateFailureState};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::status::v3::{
    ClientConfig, ClientStatusRequest, ClientStatusResponse, ConfigStatus, client_config::GenericXdsConfig,
    client_status_discovery_service_server::ClientStatusDiscoveryService,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{NodeMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::Timestamp;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::registry::{ConnectionRegistry, ProxyConnection};
use super::server::ResponseStream;
use super::status::SyncState;

/// The CSDS service over the connection registry.
#[derive(Clone)]
pub struct Csds {
    registry: Arc<ConnectionRegistry>,
}

impl Csds {
    pub fn new(registry: Arc<ConnectionRegistry>) -> Self {
        Csds { registry }
    }

    /// Answers one status request.
    pub fn client_status(&self, req: &ClientStatusRequest) -> ClientStatusResponse {
        let config = self
            .registry
            .all()
            .into_iter()
            .filter(|c| req.node_matchers.is_empty() || req.node_matchers.iter().any(|m| node_matches(m, &c.node.id)))
            .map(|c| client_config(&c, req.exclude_resource_contents))
            .collect();
        ClientStatusResponse { config }
    }
}

fn node_matches(matcher: &NodeMatcher, id: &str) -> bool {
    let Some(m) = &matcher.node_id else { return true };
    match &m.match_pattern {
        Some(MatchPattern::Exact(e)) => e == id,
        Some(MatchPattern::Prefix(p)) => id.starts_with(p.as_str()),
        Some(MatchPattern::Suffix(s)) => id.ends_with(s.as_str()),
        Some(MatchPattern::Contains(c)) => id.contains(c.as_str()),
        _ => true,
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn client_config(conn: &ProxyConnection, exclude_contents: bool) -> ClientConfig {
    let now = Instant::now();
    let wall = SystemTime::now();
    let statuses = conn.view.status(now);
    let sent = conn.view.sent();
    let mut generic = Vec::new();
    for st in statuses {
        let Some(ty) = super::resources::ResourceType::from_type_url(st.type_url) else { continue };
        let (config_status, client_status) = match st.state {
            SyncState::Synced => (ConfigStatus::Synced, ClientResourceStatus::Acked),
            SyncState::Stale => (ConfigStatus::Stale, ClientResourceStatus::Requested),
            SyncState::NotSent => (ConfigStatus::NotSent, ClientResourceStatus::Requested),
            SyncState::Error => (ConfigStatus::Error, ClientResourceStatus::Nacked),
        };
        let last_updated = st.sent_age_seconds.map(|age| timestamp(wall - std::time::Duration::from_secs_f64(age)));
        let error_state = st.last_error.as_ref().map(|details| UpdateFailureState {
            details: details.clone(),
            version_info: st.sent_version.clone().unwrap_or_default(),
            last_update_attempt: st.last_error_age_seconds.map(|age| timestamp(wall - std::time::Duration::from_secs_f64(age))),
            ..Default::default()
        });
        for resource in sent.get(&ty).map(|(_, r)| r.as_slice()).unwrap_or_default() {
            generic.push(GenericXdsConfig {
                type_url: ty.type_url().to_string(),
                name: resource.name.clone(),
                version_info: resource.version.clone(),
                xds_config: (!exclude_contents).then(|| resource.body()),
                last_updated,
                config_status: config_status as i32,
                client_status: client_status as i32,
                error_state: error_state.clone(),
                is_static_resource: false,
            });
        }
    }
    ClientConfig {
        node: Some(Node { id: conn.node.id.clone(), cluster: conn.node.cluster.clone(), ..Default::default() }),
        generic_xds_configs: generic,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl ClientStatusDiscoveryService for Csds {
    type StreamClientStatusStream = ResponseStream<ClientStatusResponse>;

    async fn stream_client_status(
        &self,
        request: Request<Streaming<ClientStatusRequest>>,
    ) -> Result<Response<Self::StreamClientStatusStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = requests.message().await {
                if tx.send(Ok(this.client_status(&req))).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_client_status(&self, request: Request<ClientStatusRequest>) -> Result<Response<ClientStatusResponse>, Status> {
        Ok(Response::new(self.client_status(request.get_ref())))
    }
}
