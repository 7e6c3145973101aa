//! The gRPC edge: ADS (SotW and delta), the per-type discovery services, and
//! the stream loop that drives a sans-IO state machine from requests and pushes.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use futures::Stream;
use futures::StreamExt;
use prost::Message;
use tokio::sync::{Semaphore, watch};
use tonic::Status;

use super::auth::{IdentityPolicy, StreamAuthenticator, StreamCredentials};
use super::debounce::PushTrigger;
use super::delta::{DeltaRequest, DeltaStream};
use super::node::ProxyNode;
use super::outbox;
use super::provider::{ResourceProvider, StreamMemo};
use super::registry::{ConnectionRegistry, ProxyConnection, StreamView};
use super::resources::{ResourceSet, ResourceType};
use super::send_budget::{self, SendBudget, Turn};
use super::sotw::{ProtocolError, SotwRequest, SotwStream, Step, StreamEvent};
use super::status::TypeStatus;
use super::wire::{DeltaResponse, Outgoing, SotwResponse, WireMessage};
use crate::metrics::{Metrics, ModeLabel, TypeLabel};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

/// The send budget's default: about a dozen of a sync's large responses
/// (a few proxies' syncs) on their way at once (docs/performance.md, "The
/// sync in turns").
pub const DEFAULT_SEND_BUDGET_BYTES: usize = 16 << 20;

/// Tuning of the xDS server.
#[derive(Debug, Clone)]
pub struct XdsServerConfig {
    /// How many proxies may be computing and queueing a push at once (istiod's PILOT_PUSH_THROTTLE).
    pub push_concurrency: usize,
    /// A proxy that does not read its responses for this long is disconnected.
    pub send_timeout: Duration,
    /// Responses queued per stream before the sender waits.
    pub stream_buffer: usize,
    /// Bytes of large responses queued for or held by HTTP/2, at most,
    /// across all streams (0: no limit). See `send_budget.rs`.
    pub send_budget_bytes: usize,
    /// A share of the send budget is let go after this even if its proxy has not taken the response.
    pub send_budget_hold_limit: Duration,
    /// HTTP/2 pings to each proxy this often; one not answered within the
    /// timeout closes its connection.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// A push waits this long at most for the reply to the last response of
    /// its type before it is sent anyway.
    pub reply_wait_limit: Duration,
    /// Whether streams without proof are taken at their metadata's word.
    pub identity_policy: IdentityPolicy,
    /// Cluster names proxies use → registered cluster names (Istio's default
    /// `CLUSTER_ID` is `Kubernetes`).
    pub cluster_aliases: BTreeMap<String, String>,
}

impl Default for XdsServerConfig {
    fn default() -> Self {
        XdsServerConfig {
            push_concurrency: 100,
            send_timeout: Duration::from_secs(30),
            stream_buffer: 8,
            send_budget_bytes: DEFAULT_SEND_BUDGET_BYTES,
            send_budget_hold_limit: send_budget::HOLD_LIMIT,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            reply_wait_limit: super::status::REPLY_WAIT_LIMIT,
            identity_policy: IdentityPolicy::default(),
            cluster_aliases: BTreeMap::new(),
        }
    }
}

/// One resource type's series of the server's metrics.
struct TypeMetrics {
    ty: ResourceType,
    pushes: Counter,
    push_bytes: Counter,
    rejects: Counter,
    expired_nonces: Counter,
    convergence: Histogram,
}

impl TypeMetrics {
    fn of(metrics: &Metrics, ty: ResourceType) -> Self {
        let label = TypeLabel::new(ty.short_name());
        TypeMetrics {
            ty,
            pushes: metrics.pushes.get_or_create(&label).clone(),
            push_bytes: metrics.push_bytes.get_or_create(&label).clone(),
            rejects: metrics.rejects.get_or_create(&label).clone(),
            expired_nonces: metrics.expired_nonces.get_or_create(&label).clone(),
            convergence: metrics.convergence.get_or_create(&label).clone(),
        }
    }
}

impl Inner {
    fn of_type(&self, ty: ResourceType) -> &TypeMetrics {
        &self.by_type[ty.index()]
    }
}

/// The xDS server: clone it into every gRPC service.
#[derive(Clone)]
pub struct XdsServer {
    inner: Arc<Inner>,
    /// This copy serves the TLS listener.
    tls: bool,
}

struct Inner {
    provider: Arc<dyn ResourceProvider>,
    registry: Arc<ConnectionRegistry>,
    metrics: Arc<Metrics>,
    /// `metrics`' series of each type (by `ResourceType::index`), looked up
    /// once: every response and reply counts into them.
    by_type: Vec<TypeMetrics>,
    pushes: watch::Receiver<Option<PushTrigger>>,
    permits: Semaphore,
    /// Bytes of large responses on their way at once (`None`: no limit).
    send_budget: Option<SendBudget>,
    config: XdsServerConfig,
    /// Proves identities from a stream's token (Kubernetes mode).
    authenticator: std::sync::OnceLock<Arc<dyn StreamAuthenticator>>,
}

impl XdsServer {
    pub fn new(
        provider: Arc<dyn ResourceProvider>,
        registry: Arc<ConnectionRegistry>,
        metrics: Arc<Metrics>,
        pushes: watch::Receiver<Option<PushTrigger>>,
        config: XdsServerConfig,
    ) -> Self {
        let permits = Semaphore::new(config.push_concurrency.max(1));
        let authenticator = std::sync::OnceLock::new();
        let mut by_type: Vec<TypeMetrics> = ResourceType::PUSH_ORDER.iter().map(|ty| TypeMetrics::of(&metrics, *ty)).collect();
        by_type.sort_by_key(|m| m.ty.index());
        let send_budget = (config.send_budget_bytes > 0)
            .then(|| SendBudget::new(config.send_budget_bytes, config.send_budget_hold_limit, metrics.send_budget_overdue.clone()));
        XdsServer { inner: Arc::new(Inner { provider, registry, metrics, by_type, pushes, permits, send_budget, config, authenticator }), tls: false }
    }

    /// Who proves streams' tokens; set once, before serving.
    pub fn set_authenticator(&self, authenticator: Arc<dyn StreamAuthenticator>) {
        let _ = self.inner.authenticator.set(authenticator);
    }

    /// The same server, for the TLS listener: its streams may prove an identity.
    pub fn for_tls(&self) -> XdsServer {
        XdsServer { inner: self.inner.clone(), tls: true }
    }

    pub fn over_tls(&self) -> bool {
        self.tls
    }

    pub fn config(&self) -> &XdsServerConfig {
        &self.inner.config
    }

    fn start<M: Machine>(&self, machine: M, credentials: StreamCredentials, requests: RequestStream<M::Req>) -> OutgoingStream<M::Resp> {
        let (tx, rx) = outbox::channel(self.inner.config.stream_buffer.max(1));
        let inner = self.inner.clone();
        tokio::spawn(async move { run_stream(inner, machine, credentials, requests, tx).await });
        Box::pin(rx.map(|queued| queued.map(|resp| *resp)))
    }

    pub fn stream_sotw(
        &self,
        only: Option<ResourceType>,
        credentials: StreamCredentials,
        requests: RequestStream<SotwRequest>,
    ) -> OutgoingStream<SotwResponse> {
        let machine = match only {
            Some(ty) => SotwStream::new_single(ty),
            None => SotwStream::new_ads(),
        }
        .with_reply_wait_limit(self.inner.config.reply_wait_limit);
        self.start(Arc::new(Mutex::new(machine)), credentials, requests)
    }

    pub fn stream_delta(
        &self,
        only: Option<ResourceType>,
        credentials: StreamCredentials,
        requests: RequestStream<DeltaRequest>,
    ) -> OutgoingStream<DeltaResponse> {
        let machine = match only {
            Some(ty) => DeltaStream::new_single(ty),
            None => DeltaStream::new_ads(),
        }
        .with_reply_wait_limit(self.inner.config.reply_wait_limit);
        self.start(Arc::new(Mutex::new(machine)), credentials, requests)
    }
}

pub use super::wire::{OutgoingStream, ResponseStream};
/// The requests of one stream, decoded.
pub type RequestStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// What the stream loop needs from a protocol state machine.
trait Machine: StreamView + Clone + Sized + Send + Sync + 'static {
    type Req: Message + Send + 'static;
    type Resp: WireMessage;
    const MODE: &'static str;
    /// Delta ADS: route configurations may take their virtual hosts over VHDS.
    fn delta_ads(&self) -> bool;
    fn node(req: &Self::Req) -> Option<&Node>;
    fn on_request(&self, req: &Self::Req, res: &ResourceSet, now: Instant) -> Result<Step<Self::Resp>, ProtocolError>;
    fn on_push(&self, res: &ResourceSet, change_at: Instant, now: Instant) -> Step<Self::Resp>;
    /// Notes a push that nothing could be sent for now (see `DeltaStream::defer_push`).
    fn defer_push(&self, _change_at: Instant, _now: Instant) -> bool {
        false
    }
}

impl Machine for Arc<Mutex<SotwStream>> {
    type Req = SotwRequest;
    type Resp = SotwResponse;
    const MODE: &'static str = "sotw";
    fn delta_ads(&self) -> bool {
        false
    }
    fn node(req: &SotwRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn on_request(&self, req: &SotwRequest, res: &ResourceSet, now: Instant) -> Result<Step<SotwResponse>, ProtocolError> {
        self.lock().expect("stream lock").on_request(req, res, now)
    }
    fn on_push(&self, res: &ResourceSet, change_at: Instant, now: Instant) -> Step<SotwResponse> {
        self.lock().expect("stream lock").on_push(res, change_at, now)
    }
}

impl Machine for Arc<Mutex<DeltaStream>> {
    type Req = DeltaRequest;
    type Resp = DeltaResponse;
    const MODE: &'static str = "delta";
    fn delta_ads(&self) -> bool {
        self.lock().expect("stream lock").is_aggregated()
    }
    fn node(req: &DeltaRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn on_request(&self, req: &DeltaRequest, res: &ResourceSet, now: Instant) -> Result<Step<DeltaResponse>, ProtocolError> {
        self.lock().expect("stream lock").on_request(req, res, now)
    }
    fn on_push(&self, res: &ResourceSet, change_at: Instant, now: Instant) -> Step<DeltaResponse> {
        self.lock().expect("stream lock").on_push(res, change_at, now)
    }
    fn defer_push(&self, change_at: Instant, now: Instant) -> bool {
        self.lock().expect("stream lock").defer_push(change_at, now)
    }
}

impl<T: StreamView + ?Sized> StreamView for Arc<T> {
    fn status(&self, now: Instant) -> Vec<TypeStatus> {
        (**self).status(now)
    }
    fn sent(&self) -> BTreeMap<ResourceType, (String, Vec<Arc<super::resources::Resource>>)> {
        (**self).sent()
    }
}

/// Removes the connection from the registry and the gauge when the stream ends.
struct ConnectionGuard {
    inner: Arc<Inner>,
    conn_id: u64,
    mode: &'static str,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.inner.registry.remove(self.conn_id);
        self.inner.metrics.connected_proxies.get_or_create(&ModeLabel { mode: self.mode.into() }).dec();
    }
}

enum SendError {
    Closed,
    TimedOut,
}

/// What a stream's outbox holds: a response boxed, so the queue's slots are
/// pointers, not responses (with tokio's channel, whose blocks of 32 slots
/// are allocated whole, unboxed responses had been 4 KB of every stream).
type Queued<R> = Result<Box<Outgoing<R>>, Status>;

/// Queues `responses` in order. `turn`: the stream's place in the send
/// budget's queue, [`Turn::Continuing`] once it has had a large response.
async fn send_all<M: Machine>(
    inner: &Inner,
    tx: &outbox::Sender<Queued<M::Resp>>,
    responses: Vec<M::Resp>,
    turn: &mut Turn,
) -> Result<(), SendError> {
    for resp in responses {
        if let Some(ty) = ResourceType::from_type_url(resp.type_url()) {
            let counted = inner.of_type(ty);
            counted.pushes.inc();
            counted.push_bytes.inc_by(resp.encoded_len() as u64);
        }
        // A large response waits for its share of the send budget (not
        // counted against the proxy's send timeout: the wait is the
        // server's), unless its proxy goes away meanwhile.
        let share = match &inner.send_budget {
            Some(budget) if SendBudget::applies_to(resp.encoded_len()) => {
                if budget.would_wait(resp.encoded_len(), *turn) {
                    inner.metrics.send_budget_waits.inc();
                }
                let share = tokio::select! {
                    share = budget.share(resp.encoded_len(), *turn) => share,
                    () = tx.closed() => return Err(SendError::Closed),
                };
                *turn = Turn::Continuing;
                Some(share)
            }
            _ => None,
        };
        // (A timer only when the channel is full: most sends find room.)
        let resp = match tx.try_send(Ok(Box::new(Outgoing { response: resp, share }))) {
            Ok(()) => continue,
            Err(outbox::TrySendError::Closed(_)) => return Err(SendError::Closed),
            Err(outbox::TrySendError::Full(resp)) => resp,
        };
        // (Boxed: the timer and the send's future are only made for a full
        // channel, and are not sized into every stream's task.)
        match Box::pin(tokio::time::timeout(inner.config.send_timeout, tx.send(resp))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(SendError::Closed),
            Err(_) => return Err(SendError::TimedOut),
        }
    }
    Ok(())
}

fn record_events(inner: &Inner, node: &ProxyNode, events: &[StreamEvent]) {
    for event in events {
        match event {
            StreamEvent::Acked { ty, latency } => {
                if let Some(latency) = latency {
                    inner.of_type(*ty).convergence.observe(latency.as_secs_f64());
                }
            }
            StreamEvent::Nacked { ty, message } => {
                inner.of_type(*ty).rejects.inc();
                tracing::warn!(proxy = %node.id, r#type = %ty, error = %message, "proxy rejected config (NACK)");
                inner.provider.on_rejected(node, *ty, message);
            }
            StreamEvent::StaleNonce { ty, nonce } => {
                inner.of_type(*ty).expired_nonces.inc();
                tracing::debug!(proxy = %node.id, r#type = %ty, nonce, "ignoring request with stale nonce");
            }
        }
    }
}

/// The stream's identity: its token reviewed (TLS only), compared with what
/// its node claims. A failed proof or a contradicting claim ends the stream.
async fn identify(inner: &Inner, credentials: &StreamCredentials, node: &ProxyNode) -> Result<super::auth::StreamIdentity, Status> {
    let proven = match inner.authenticator.get() {
        Some(auth) if credentials.tls && credentials.bearer.is_some() => {
            // The cluster the token is from: the `clusterid` header, else the node's.
            let cluster = credentials.token_cluster(&node.cluster, &inner.config.cluster_aliases);
            auth.authenticate(&StreamCredentials { cluster: Some(cluster), ..credentials.clone() }).await?
        }
        _ => None,
    };
    super::auth::decide(&inner.config.identity_policy, credentials, proven, node)
}

/// A stream past its first request: its proxy named, proven and registered.
struct OpenedStream<Req> {
    /// The registry's entry, whose node the loop reads (one copy per stream).
    conn: Arc<ProxyConnection>,
    _guard: ConnectionGuard,
    first: Box<Req>,
}

async fn run_stream<M: Machine>(
    inner: Arc<Inner>,
    machine: M,
    credentials: StreamCredentials,
    mut requests: RequestStream<M::Req>,
    tx: outbox::Sender<Queued<M::Resp>>,
) {
    // Opening is boxed and done before the loop: its state (the first
    // request, a token review's future) is gone once it has run, instead of
    // sized into every stream's task for the stream's life.
    let Some(opened) = Box::pin(open_stream(&inner, &machine, credentials, &mut requests, &tx)).await else {
        return;
    };
    serve_stream(inner, machine, opened, requests, tx).await;
}

/// The first request names the proxy; its identity is proven (or refused)
/// and the stream registered. `None`: the stream ended or was refused.
async fn open_stream<M: Machine>(
    inner: &Arc<Inner>,
    machine: &M,
    credentials: StreamCredentials,
    requests: &mut RequestStream<M::Req>,
    tx: &outbox::Sender<Queued<M::Resp>>,
) -> Option<OpenedStream<M::Req>> {
    let first = match requests.next().await {
        Some(Ok(req)) => Box::new(req),
        None => return None,
        Some(Err(status)) => {
            tracing::debug!(%status, "stream closed before its first request");
            return None;
        }
    };
    let mut node = match ProxyNode::from_node(M::node(&first)) {
        Ok(node) => ProxyNode { delta_ads: machine.delta_ads(), ..node },
        Err(err) => {
            inner.metrics.stream_error("bad_node");
            tracing::warn!(error = %err, "refusing xDS stream");
            let _ = tx.send(Err(Status::invalid_argument(err.to_string()))).await;
            return None;
        }
    };
    if let Some(registered) = inner.config.cluster_aliases.get(&node.cluster) {
        node.cluster = registered.clone();
    }
    node.identity = match identify(inner, &credentials, &node).await {
        Ok(identity) => identity,
        Err(status) => {
            inner.metrics.stream_error(match status.code() {
                tonic::Code::PermissionDenied => "permission_denied",
                tonic::Code::Unavailable => "authentication_unavailable",
                _ => "unauthenticated",
            });
            tracing::warn!(proxy = %node.id, code = ?status.code(), reason = status.message(), "refusing xDS stream");
            let _ = tx.send(Err(status)).await;
            return None;
        }
    };
    let warnings = inner.provider.warnings_for(&node);
    for warning in &warnings {
        tracing::warn!(proxy = %node.id, "{warning}");
    }
    let conn_id = inner.registry.next_id();
    inner.metrics.connected_proxies.get_or_create(&ModeLabel { mode: M::MODE.into() }).inc();
    let guard = ConnectionGuard { inner: inner.clone(), conn_id, mode: M::MODE };
    let conn = Arc::new(ProxyConnection { conn_id, node, mode: M::MODE, connected_at: SystemTime::now(), view: Arc::new(machine.clone()), warnings });
    inner.registry.insert(conn.clone());
    let node = &conn.node;
    tracing::info!(proxy = %node.id, cluster = %node.cluster, mode = M::MODE, conn_id, identity = %node.identity.describe(), "proxy connected");
    Some(OpenedStream { conn, _guard: guard, first })
}

/// The stream's loop: requests and pushes into the state machine, its
/// responses onto the wire, until either side ends it.
async fn serve_stream<M: Machine>(
    inner: Arc<Inner>,
    machine: M,
    opened: OpenedStream<M::Req>,
    mut requests: RequestStream<M::Req>,
    tx: outbox::Sender<Queued<M::Resp>>,
) {
    let OpenedStream { conn, _guard, first } = opened;
    let node = &conn.node;
    let conn_id = conn.conn_id;
    let mut pushes = inner.pushes.clone();
    pushes.borrow_and_update();
    let mut memo: StreamMemo = None;
    let mut unknown_types_logged = 0u32;
    let mut turn = Turn::First;
    let mut next: Option<Box<M::Req>> = Some(first);
    let end = loop {
        let (responses, events) = if let Some(req) = next.take() {
            let permit = inner.permits.acquire().await.expect("semaphore never closed");
            let resources = inner.provider.resources_for_stream(node, &mut memo);
            let result = machine.on_request(&req, &resources, Instant::now());
            drop(permit);
            match result {
                Ok(step) => (step.responses, step.events),
                Err(err) => {
                    inner.metrics.stream_error(match err {
                        ProtocolError::UnknownType(_) => "unknown_type",
                        ProtocolError::WrongType { .. } => "wrong_type",
                    });
                    if unknown_types_logged < 3 {
                        tracing::warn!(proxy = %node.id, error = %err, "ignoring xDS request");
                        unknown_types_logged += 1;
                    }
                    (Vec::new(), Vec::new())
                }
            }
        } else {
            tokio::select! {
                req = requests.next() => match req {
                    Some(Ok(req)) => { next = Some(Box::new(req)); continue; }
                    None => break "closed by proxy",
                    Some(Err(status)) => {
                        tracing::debug!(proxy = %node.id, %status, "stream error");
                        break "stream error";
                    }
                },
                changed = pushes.changed() => {
                    if changed.is_err() { break "server shutting down"; }
                    // A stream waiting for the replies to all its last responses
                    // sends nothing now: it notes the change (sent with the
                    // replies) without a permit or its set looked up.
                    if let Some(trigger) = *pushes.borrow_and_update()
                        && machine.defer_push(trigger.change_at, Instant::now())
                    {
                        continue;
                    }
                    let permit = inner.permits.acquire().await.expect("semaphore never closed");
                    // The newest push, read once this stream's turn has come: a
                    // push that came while it waited is answered now, not by
                    // waking it again after (under churn streams wait
                    // longer than pushes are apart).
                    let Some(trigger) = *pushes.borrow_and_update() else { continue };
                    let resources = inner.provider.resources_for_stream(node, &mut memo);
                    let step = machine.on_push(&resources, trigger.change_at, Instant::now());
                    drop(permit);
                    (step.responses, step.events)
                }
            }
        };
        record_events(&inner, node, &events);
        match send_all::<M>(&inner, &tx, responses, &mut turn).await {
            Ok(()) => {}
            Err(SendError::Closed) => break "proxy went away mid-push",
            Err(SendError::TimedOut) => {
                inner.metrics.stream_error("send_timeout");
                tracing::warn!(proxy = %node.id, timeout = ?inner.config.send_timeout, "proxy is not reading its responses; closing its stream");
                let _ = tx.try_send(Err(Status::deadline_exceeded("responses were not read in time")));
                break "send timeout";
            }
        }
    };
    tracing::info!(proxy = %node.id, conn_id, reason = end, "proxy disconnected");
}
