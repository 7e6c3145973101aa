//! `meshpilot load`: N simulated Envoys against any xDS server, then the
//! numbers that matter at fleet scale: time until all are SYNCED, bytes the
//! control plane sent, its RSS and CPU seconds (from /proc), and the
//! change-to-delivery latency across the fleet for endpoint churn (edits of
//! a fixture folder's files) and a TrafficPolicy change.
//!
//! Latency of a change = from the moment the file was written to the first
//! response of the affected type (EDS for endpoints, RDS or VHDS for a policy) each
//! proxy receives after it; the simulated proxy ACKs at once. It includes the
//! file watch, the debounce window and the push.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::fixtures::{cluster_name, service_name, service_yaml};
use crate::loadgen::scan::{Flavor, ResponseScanner};
use crate::loadgen::{Outgoing, ScannedResponse, SimulatedProxy, percentiles};

const SOTW_ADS_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_ADS_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// The simulated proxies' HTTP/2 receive windows (stream and connection).
const STREAM_WINDOW_BYTES: u32 = 1024 * 1024;
use crate::xds::resources::ResourceType;

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// The xDS server, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub xds_addr: String,
    /// Simulated proxies.
    #[arg(long, default_value_t = 1000)]
    pub proxies: usize,
    /// Incremental (delta) xDS instead of state of the world.
    #[arg(long)]
    pub delta: bool,
    /// Proxies are spread over this many clusters (cluster-<i>)...
    #[arg(long, default_value_t = 3)]
    pub clusters: usize,
    /// ...and namespaces (ns-<i>)...
    #[arg(long, default_value_t = 10)]
    pub namespaces: usize,
    /// ...and applications (label app=svc-<i>).
    #[arg(long, default_value_t = 1000)]
    pub apps: usize,
    /// The proxies' INTERCEPTION_MODE: REDIRECT (Istio's captured layout) or NONE (explicit loopback listeners).
    #[arg(long, default_value = "REDIRECT", value_parser = ["REDIRECT", "TPROXY", "NONE"])]
    pub interception: String,
    /// Each proxy is one of the fixture's pods, as Istio's agent says: INSTANCE_IPS is that pod's
    /// address (an endpoint of its app's service; needs --endpoints as the fixture has them).
    #[arg(long)]
    pub instance_ips: bool,
    /// Fraction of proxies that NACK their first listener response.
    #[arg(long, default_value_t = 0.0)]
    pub nack_fraction: f64,
    /// Each simulated proxy's kernel receive buffer (SO_RCVBUF, bytes; 0: the kernel's autotuning).
    /// Bounded, as thousands of autotuned ones press on the machine's TCP memory;
    /// but at 64 KiB (as large as loopback's MSS) the receiver's window could stay
    /// closed after it drained, and the server's zero-window probes back off for
    /// tens of seconds: the sync tail of docs/performance.md.
    #[arg(long, default_value_t = 262_144)]
    pub recv_buffer: u32,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub sync_timeout: Duration,
    /// The control plane's pid, for RSS and CPU seconds.
    #[arg(long)]
    pub pid: Option<u32>,
    /// The fixture folder the server reads (`meshpilot fixtures`), for churn and policy changes.
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
    /// Its shape (to rewrite service files): services and endpoints per service.
    #[arg(long, default_value_t = 1000)]
    pub services: usize,
    #[arg(long, default_value_t = 10)]
    pub endpoints: usize,
    /// Endpoint changes per second (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub churn_rate: f64,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub churn_duration: Duration,
    /// Change one TrafficPolicy once (after churn).
    #[arg(long)]
    pub policy_change: bool,
    /// After sync, make one endpoint change (with --config-dir) and measure its delivery.
    #[arg(long)]
    pub endpoint_change: bool,
    /// Wait this long after the fleet is SYNCED before the first change.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub pause_after_sync: Duration,
    /// Wait this long after the last change before computing latencies.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Print one markdown table row per measurement too.
    #[arg(long)]
    pub markdown: bool,
    /// The config dir has the per-namespace Sidecars of `fixtures --sidecars`:
    /// a change must reach only the proxies in its service's namespace.
    #[arg(long)]
    pub sidecars: bool,
    /// Connect over TLS (the server's --xds-tls-addr), trusting this root.
    #[arg(long)]
    pub xds_root_cert: Option<PathBuf>,
    /// The name the server's certificate is checked for.
    #[arg(long, default_value = "meshpilot.service-mesh-hub.svc")]
    pub xds_server_name: String,
    /// Instead of proxies: send this many CreateCertificate requests (Istio's
    /// certificate API, over TLS) with --token-file's token, and report how
    /// many the server signs per second.
    #[arg(long, default_value_t = 0, requires_all = ["xds_root_cert", "token_file"])]
    pub certificate_requests: usize,
    /// The ServiceAccount token (audience istio-ca) the certificate requests prove their identity with.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The `clusterid` header of certificate requests.
    #[arg(long, default_value = "Kubernetes")]
    pub cluster_id: String,
    /// Look like Istio's injected sidecars, to istiod as to meshpilot: proxy i is pod
    /// `svc-<i % apps>-<k>` of the mesh `fixtures --kubeconfig` loads (namespace
    /// `ns-<service % 10>`), with an Istio node id and Istio's metadata (ISTIO_VERSION,
    /// CLUSTER_ID from --istio-cluster-id, NAMESPACE, LABELS, INSTANCE_IPS, SERVICE_ACCOUNT).
    #[arg(long)]
    pub istio: bool,
    /// The CLUSTER_ID the --istio proxies send (istiod's --clusterID, or meshpilot's registered name).
    #[arg(long, default_value = "Kubernetes")]
    pub istio_cluster_id: String,
    /// Changes go to this cluster (the mesh `fixtures --kubeconfig` loaded) instead of
    /// --config-dir: an endpoint change is an update of a `churn-<j>` EndpointSlice, a
    /// weight change one of `shift-0`.
    #[arg(long, conflicts_with = "config_dir")]
    pub kubeconfig: Option<PathBuf>,
    #[arg(long, requires = "kubeconfig")]
    pub context: Option<String>,
    /// With --kubeconfig: the weight change edits the VirtualService (istiod) instead of the TrafficPolicy.
    #[arg(long, requires = "kubeconfig")]
    pub change_virtual_service: bool,
    /// With --kubeconfig: the registered cluster name the TrafficPolicy names.
    #[arg(long, default_value = "management-plane")]
    pub cluster_name: String,
    /// Certificate requests in flight at once.
    #[arg(long, default_value_t = 16)]
    pub certificate_concurrency: usize,
}

/// A TLS client configuration trusting `root` (PEM), HTTP/2.
fn tls_client(root: &std::path::Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(root).with_context(|| format!("reading {}", root.display()))? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The connection a simulated proxy or certificate client talks over: TCP, or TLS on it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// How connections are made.
#[derive(Clone)]
struct Connector {
    tls: Option<(tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>)>,
    recv_buffer: u32,
}

impl Connector {
    fn of(args: &LoadArgs) -> anyhow::Result<Connector> {
        let tls = match &args.xds_root_cert {
            Some(root) => Some((
                tokio_rustls::TlsConnector::from(tls_client(root)?),
                rustls::pki_types::ServerName::try_from(args.xds_server_name.clone()).context("--xds-server-name")?,
            )),
            None => None,
        };
        Ok(Connector { tls, recv_buffer: args.recv_buffer })
    }

    async fn channel(&self, uri: &str) -> anyhow::Result<tonic::transport::Channel> {
        let tls = self.tls.clone();
        let recv_buffer = self.recv_buffer;
        Ok(tonic::transport::Endpoint::from_shared(uri.to_string())?
            // Flow control keeps unread responses on the server (shared
            // buffers there) instead of in this process (hyper's 2 MiB
            // default per stream was gigabytes at thousands of proxies).
            .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(STREAM_WINDOW_BYTES))
            .connect_with_connector(tower::service_fn(move |uri: tonic::codegen::http::Uri| {
                let tls = tls.clone();
                async move {
                    // A bounded kernel receive buffer: thousands of autotuned
                    // ones (up to net.ipv4.tcp_rmem's maximum each) put the
                    // machine's TCP memory under pressure, which slows every
                    // connection, the control plane's included.
                    let addr = tokio::net::lookup_host(uri.authority().map(|a| a.as_str()).unwrap_or_default())
                        .await?
                        .next()
                        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
                    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
                    if recv_buffer > 0 {
                        socket.set_recv_buffer_size(recv_buffer)?;
                    }
                    let stream = socket.connect(addr).await?;
                    stream.set_nodelay(true)?;
                    let io: Box<dyn Io> = match tls {
                        Some((connector, name)) => Box::new(connector.connect(name, stream).await?),
                        None => Box::new(stream),
                    };
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
                }
            }))
            .await?)
    }
}

/// Which proxies a change to a fixture service must reach: every one, or
/// (with per-namespace Sidecars) those in the service's namespace.
#[derive(Debug, Clone, Copy)]
struct Reach {
    scoped: bool,
    proxy_namespaces: usize,
}

impl Reach {
    fn of(args: &LoadArgs) -> Reach {
        Reach { scoped: args.sidecars, proxy_namespaces: args.namespaces.max(1) }
    }

    fn reaches(&self, proxy: usize, service: usize) -> bool {
        !self.scoped || proxy % self.proxy_namespaces == service % crate::fixtures::NAMESPACES
    }
}

#[derive(Default)]
struct Record {
    synced_at: Option<Instant>,
    /// Endpoint changes (by index) and when this proxy first received them.
    delivered: Deliveries,
    rds_at: Vec<Instant>,
    bytes: u64,
    rejects: u64,
    error: Option<String>,
    /// Streams that failed and were opened again (as Envoy does, with backoff).
    reconnects: u64,
    /// Bytes received by the streams before the current one.
    bytes_before: u64,
    /// Until SYNCED: per type (short name, or the type URL's message name for
    /// types this generator does not know), bytes and resources received.
    sync_by_type: std::collections::BTreeMap<String, (u64, u64)>,
}

fn string_value(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.to_string())) }
}

/// Proxy `i` as Istio's injector and agent describe a pod's sidecar.
fn istio_node_for(i: usize, args: &LoadArgs) -> Node {
    let (service, pod) = (i % args.apps.max(1), (i / args.apps.max(1)) % args.endpoints.max(1));
    let (svc, ns) = (service_name(service), format!("ns-{}", service % 10));
    let ip = crate::fixtures::endpoint_address(0, service, pod);
    let mut labels = Struct::default();
    labels.fields.insert("app".into(), string_value(&svc));
    labels.fields.insert("version".into(), string_value(&format!("v{}", pod % 3 + 1)));
    let mut meta = Struct::default();
    for (k, v) in [
        ("ISTIO_VERSION", "1.31-dev"),
        ("CLUSTER_ID", args.istio_cluster_id.as_str()),
        ("NAMESPACE", ns.as_str()),
        ("INSTANCE_IPS", ip.as_str()),
        ("SERVICE_ACCOUNT", svc.as_str()),
        ("INTERCEPTION_MODE", "REDIRECT"),
    ] {
        meta.fields.insert(k.into(), string_value(v));
    }
    meta.fields.insert("LABELS".into(), Value { kind: Some(Kind::StructValue(labels)) });
    Node {
        id: format!("sidecar~{ip}~{svc}-{pod}.{ns}~{ns}.svc.cluster.local"),
        cluster: format!("{svc}.{ns}"),
        metadata: Some(meta),
        ..Default::default()
    }
}

fn node_for(i: usize, args: &LoadArgs) -> Node {
    if args.istio {
        return istio_node_for(i, args);
    }
    let mut labels = Struct::default();
    labels.fields.insert("app".into(), string_value(&service_name(i % args.apps.max(1))));
    let mut meta = Struct::default();
    meta.fields.insert("CLUSTER_ID".into(), string_value(&cluster_name(i % args.clusters.max(1))));
    meta.fields.insert("NAMESPACE".into(), string_value(&format!("ns-{}", i % args.namespaces.max(1))));
    meta.fields.insert("INTERCEPTION_MODE".into(), string_value(&args.interception));
    if args.instance_ips {
        let (apps, clusters) = (args.apps.max(1), args.clusters.max(1));
        let pod = crate::fixtures::endpoint_address(i % clusters, i % apps, (i / apps) % args.endpoints.max(1));
        meta.fields.insert("INSTANCE_IPS".into(), string_value(&pod));
    }
    meta.fields.insert("LABELS".into(), Value { kind: Some(Kind::StructValue(labels)) });
    // Outbound listeners of simulated proxies are never bound; keep one scope per (cluster, ns, app).
    Node { id: format!("load-{i}"), cluster: cluster_name(i % args.clusters.max(1)), metadata: Some(meta), ..Default::default() }
}

async fn run_proxy(
    uri: String,
    connector: Connector,
    mut proxy: SimulatedProxy,
    delta: bool,
    record: Arc<Mutex<Record>>,
    connect: Arc<Semaphore>,
    markers: Markers,
) -> anyhow::Result<()> {
    let channel = {
        let _permit = connect.acquire().await?;
        connector.channel(&uri).await?
    };
    let mut channel = channel;
    let note = |proxy: &SimulatedProxy, r: &ScannedResponse, now: Instant| {
        let mut rec = record.lock().expect("record lock");
        match ResourceType::from_type_url(&r.type_url) {
            Some(ResourceType::Endpoint) if !r.marked_addresses.is_empty() => {
                let markers = markers.read().expect("markers lock");
                for address in &r.marked_addresses {
                    if let Some(idx) = marker_index(&markers, address) {
                        rec.delivered.insert_first(idx, now);
                    }
                }
            }
            Some(ResourceType::Route | ResourceType::VirtualHost) => rec.rds_at.push(now),
            _ => {}
        }
        if rec.synced_at.is_none() {
            let ty = ResourceType::from_type_url(&r.type_url)
                .map_or_else(|| r.type_url.rsplit(['/', '.']).next().unwrap_or_default().to_string(), |t| t.short_name().to_string());
            let entry = rec.sync_by_type.entry(ty).or_default();
            *entry = (entry.0 + r.encoded_len as u64, entry.1 + r.resources as u64);
        }
        rec.synced_at = rec.synced_at.or(proxy.synced_at);
        rec.bytes = rec.bytes_before + proxy.bytes;
        rec.rejects = proxy.rejects;
    };
    if delta {
        let (tx, rx) = mpsc::channel(16);
        tx.send(Outgoing::own(proxy.delta_start())).await?;
        let mut stream = open_stream(&mut channel, &uri, DELTA_ADS_PATH, Flavor::Delta, rx).await?;
        while let Some(resp) = stream.next().await.transpose()? {
            let now = Instant::now();
            let requests = proxy.delta_on_response(&resp, now);
            note(&proxy, &resp, now);
            for r in requests {
                tx.send(r).await?;
            }
        }
    } else {
        let (tx, rx) = mpsc::channel(16);
        tx.send(Outgoing::own(proxy.sotw_start())).await?;
        let mut stream = open_stream(&mut channel, &uri, SOTW_ADS_PATH, Flavor::Sotw, rx).await?;
        while let Some(resp) = stream.next().await.transpose()? {
            let now = Instant::now();
            let requests = proxy.sotw_on_response(&resp, now);
            note(&proxy, &resp, now);
            for r in requests {
                tx.send(r).await?;
            }
        }
    }
    anyhow::bail!("the server ended the stream")
}

/// Opens one ADS stream: `requests` are sent as they come; the responses are
/// read as they arrive by a [`ResponseScanner`], which keeps only what the
/// simulated proxy reads and lets each received chunk go once read. (tonic's
/// client kept every stream's buffer at its largest response, ≈1–2.5 MB here,
/// for the stream's life: 20 GB at 10,000 simulated proxies, on the machine
/// under test; whole responses assembled from held chunks were still ≈8 GB.)
async fn open_stream<Req>(
    channel: &mut tonic::transport::Channel,
    uri: &str,
    path: &str,
    flavor: Flavor,
    requests: mpsc::Receiver<Outgoing<Req>>,
) -> anyhow::Result<ScannedResponses<tonic::body::Body>>
where
    Req: prost::Message + Default + Send + 'static,
{
    use tonic::client::GrpcService;
    use tonic::codegen::http;
    let frames = futures::StreamExt::flat_map(ReceiverStream::new(requests), |r: Outgoing<Req>| {
        futures::stream::iter(r.frames().map(|data| Ok::<_, std::convert::Infallible>(http_body::Frame::data(data))))
    });
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("{uri}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::StreamBody::new(frames)))?;
    futures::future::poll_fn(|cx| GrpcService::poll_ready(channel, cx)).await?;
    let response = GrpcService::call(channel, request).await?;
    if response.status() != http::StatusCode::OK {
        anyhow::bail!("HTTP status {}", response.status());
    }
    if let Some(status) = response.headers().get("grpc-status").filter(|s| s.as_bytes() != b"0") {
        let message = response.headers().get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or("");
        anyhow::bail!("gRPC status {status:?}: {message}");
    }
    Ok(ScannedResponses {
        body: Box::pin(response.into_body()),
        scanner: ResponseScanner::new(flavor, crate::fixtures::CHANGED_ADDRESS_PREFIX.as_bytes()),
        ended: false,
    })
}

/// A response body read through a [`ResponseScanner`].
struct ScannedResponses<B> {
    body: std::pin::Pin<Box<B>>,
    scanner: ResponseScanner,
    ended: bool,
}

impl<B> futures::Stream for ScannedResponses<B>
where
    B: http_body::Body,
    B::Error: std::fmt::Display,
{
    type Item = anyhow::Result<ScannedResponse>;

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        use bytes::Buf;
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            match this.scanner.next_response() {
                Ok(Some(response)) => return Poll::Ready(Some(Ok(response))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
            if this.ended {
                return Poll::Ready((!this.scanner.is_idle()).then(|| Err(anyhow::anyhow!("the response stream ended inside a message"))));
            }
            match this.body.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(mut data) = frame.into_data() {
                        let n = data.remaining();
                        this.scanner.push(data.copy_to_bytes(n));
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(anyhow::anyhow!("response stream: {e}")))),
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A memory figure of /proc/PID/status (`VmRSS`, `VmHWM`: kB there), in MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The control plane's RSS sampled every 100 ms while a measurement runs:
/// the most it held during it. (The RSS at a measurement's end is one
/// moment, and VmHWM is the whole run's peak, the initial sync's included.)
struct PhasePeak {
    peak_kib: Arc<std::sync::atomic::AtomicU64>,
    sampler: tokio::task::JoinHandle<()>,
}

impl PhasePeak {
    fn start(pid: Option<u32>) -> Option<PhasePeak> {
        let pid = pid?;
        let peak_kib = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let peak = peak_kib.clone();
        let sampler = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if let Some(mib) = status_mib(pid, "VmRSS") {
                    peak.fetch_max((mib * 1024.0) as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        Some(PhasePeak { peak_kib, sampler })
    }

    /// The most RSS sampled, in MiB; sampling stops.
    fn finish(self) -> f64 {
        self.sampler.abort();
        self.peak_kib.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0
    }
}

/// The most RSS a process has had (`VmHWM`), in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmHWM")
}

/// (RSS in MiB, CPU seconds) of a process, from /proc.
pub fn process_usage(pid: u32) -> Option<(f64, f64)> {
    let rss_mib = status_mib(pid, "VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), counted from after the command name: indexes 11 and 12.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((rss_mib, ticks / 100.0))
}

/// The address each endpoint change introduces (`fixtures::changed_address`,
/// all under 10.200/16, which no fixture endpoint uses) → the change's index.
/// Held as a table by change step (`fixtures::step_of_changed_address`,
/// modulo 62,500): index + 1, 0 for none. (A map by the address's bytes had
/// hashed each of a churn's million markers a second with SipHash.)
type Markers = Arc<std::sync::RwLock<MarkerTable>>;

#[derive(Debug)]
struct MarkerTable {
    by_step: Vec<u32>,
    /// Changes written so far (the next one's index).
    written: usize,
}

fn new_markers() -> Markers {
    Arc::new(std::sync::RwLock::new(MarkerTable { by_step: vec![0; crate::fixtures::CHANGED_ADDRESS_STEPS], written: 0 }))
}

/// The change a marked address introduced, if one was written.
fn marker_index(markers: &MarkerTable, address: &[u8]) -> Option<usize> {
    let step = crate::fixtures::step_of_changed_address(address)?;
    markers.by_step.get(step % crate::fixtures::CHANGED_ADDRESS_STEPS).copied().filter(|i| *i > 0).map(|i| i as usize - 1)
}

/// One proxy's first delivery of each change (by its index): a bit per
/// change seen, and the deliveries in the order they came, in microseconds
/// since the load generator's start. (A B-tree per proxy had cost a walk
/// and about 40 bytes per (proxy, change) pair: 30 M pairs at 10,000 proxies.)
#[derive(Debug, Clone, Default)]
struct Deliveries {
    seen: Vec<u64>,
    at: Vec<(u32, u32)>,
}

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

impl Deliveries {
    fn insert_first(&mut self, idx: usize, now: Instant) {
        let (word, bit) = (idx / 64, 1u64 << (idx % 64));
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & bit == 0 {
            self.seen[word] |= bit;
            let micros = now.saturating_duration_since(*EPOCH).as_micros().min(u32::MAX as u128) as u32;
            self.at.push((idx as u32, micros));
        }
    }

    fn contains(&self, idx: usize) -> bool {
        self.seen.get(idx / 64).is_some_and(|w| w & (1u64 << (idx % 64)) != 0)
    }

    /// When each change index was delivered (None: not), as a table.
    fn by_index(&self) -> Vec<Option<Instant>> {
        let len = self.at.iter().map(|(i, _)| *i as usize + 1).max().unwrap_or(0);
        let mut out = vec![None; len];
        for (idx, micros) in &self.at {
            out[*idx as usize] = Some(*EPOCH + Duration::from_micros(u64::from(*micros)));
        }
        out
    }
}

#[cfg(test)]
impl<const N: usize> From<[(usize, Instant); N]> for Deliveries {
    fn from(pairs: [(usize, Instant); N]) -> Self {
        let mut d = Deliveries::default();
        for (idx, at) in pairs {
            d.insert_first(idx, at);
        }
        d
    }
}

/// One endpoint change written: its marker's index, when, the service (for
/// --sidecars reach) and the object it rewrote (a later change of the same
/// object supersedes it).
#[derive(Debug, Clone, Copy)]
struct WrittenChange {
    idx: usize,
    at: Instant,
    service: usize,
    object: usize,
}

/// (Proxy, change) pairs without a delivery of their own: those the proxy
/// never reached, and those it reached only as a later version of the same
/// object (the object was rewritten before this version reached the proxy;
/// servers push an object's newest version, as istiod does). The latter are
/// timed to that later version's delivery, the moment the proxy had this
/// change or a newer one, so skipping versions does not hide a late proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Undelivered {
    pairs: usize,
    superseded: usize,
}

impl std::fmt::Display for Undelivered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} not delivered", self.pairs)?;
        if self.superseded > 0 {
            write!(f, ", {} reached only as a later version of the same object (timed to it)", self.superseded)?;
        }
        Ok(())
    }
}

/// For each change, how long until each proxy it must reach had it (its
/// own delivery, or a later version of the same object's), and what was not
/// delivered.
fn latencies(changes: &[WrittenChange], deliveries: &[Deliveries], reach: Reach) -> (Vec<f64>, Undelivered) {
    let mut out = Vec::new();
    let mut missing = Undelivered::default();
    let since = |t: &Instant, at: Instant| t.saturating_duration_since(at).as_secs_f64() * 1000.0;
    // Each change's next change of the same object, found once: a missed
    // pair follows its object's later versions only (a few dozen under a
    // churn), not every later change (thousands, for millions of pairs).
    let mut next_of_object = vec![None; changes.len()];
    let mut latest: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    for (n, change) in changes.iter().enumerate().rev() {
        next_of_object[n] = latest.insert(change.object, n);
    }
    for (proxy, delivered) in deliveries.iter().enumerate() {
        let delivered = delivered.by_index();
        let delivered = |idx: usize| delivered.get(idx).copied().flatten();
        for (n, change) in changes.iter().enumerate() {
            if !reach.reaches(proxy, change.service) {
                continue;
            }
            if let Some(t) = delivered(change.idx) {
                out.push(since(&t, change.at));
                continue;
            }
            let later = std::iter::successors(next_of_object[n], |&m| next_of_object[m]).filter_map(|m| delivered(changes[m].idx)).min();
            match later {
                Some(t) => {
                    missing.superseded += 1;
                    out.push(since(&t, change.at));
                }
                None => missing.pairs += 1,
            }
        }
    }
    (out, missing)
}

/// RDS deliveries at or after `at`, the first per proxy.
fn first_after(at: Instant, deliveries: &[Vec<Instant>]) -> (Vec<f64>, Undelivered) {
    let mut out = Vec::new();
    let mut missing = Undelivered::default();
    for times in deliveries {
        match times.iter().find(|t| **t >= at) {
            Some(t) => out.push(t.duration_since(at).as_secs_f64() * 1000.0),
            None => missing.pairs += 1,
        }
    }
    (out, missing)
}

fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let uri = format!("http://{}", args.xds_addr);
    let connector = Connector::of(&args)?;
    if args.certificate_requests > 0 {
        return certificate_load(&args, &uri, &connector).await;
    }
    let mode = if args.delta { "delta" } else { "sotw" };
    let connect = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let nack_every = if args.nack_fraction > 0.0 { (1.0 / args.nack_fraction).round().max(1.0) as usize } else { usize::MAX };
    let records: Vec<Arc<Mutex<Record>>> = (0..args.proxies).map(|_| Arc::default()).collect();
    let markers = new_markers();
    // Deliveries are kept as microseconds since this moment.
    std::sync::LazyLock::force(&EPOCH);
    let usage_before = args.pid.and_then(process_usage);
    let start = Instant::now();
    for (i, record) in records.iter().enumerate() {
        let (node, nack) = (node_for(i, &args), i % nack_every == nack_every - 1);
        let (uri, record, connect, markers, connector) = (uri.clone(), record.clone(), connect.clone(), markers.clone(), connector.clone());
        let delta = args.delta;
        let give_up_at = start + args.sync_timeout;
        tokio::spawn(async move {
            // Like Envoy: a failed connection or stream is opened again after a
            // backoff (250 ms doubling to 4 s), as a new stream, for as long as
            // the sync may take (istiod refuses streams beyond 25 new ones a second).
            let mut backoff = Duration::from_millis(250);
            while Instant::now() < give_up_at {
                let proxy = SimulatedProxy::new(node.clone(), nack);
                match run_proxy(uri.clone(), connector.clone(), proxy, delta, record.clone(), connect.clone(), markers.clone()).await {
                    Ok(()) => return,
                    Err(e) => {
                        let mut r = record.lock().expect("record lock");
                        r.error = Some(format!("{e:#}"));
                        r.reconnects += 1;
                        r.bytes_before = r.bytes;
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(4));
            }
        });
    }
    // Until every proxy that does not NACK is SYNCED (ACKed CDS, EDS, LDS and RDS).
    let expected = (0..args.proxies).filter(|i| i % nack_every != nack_every - 1).count();
    let synced_all = loop {
        let synced = records.iter().filter(|r| r.lock().expect("record lock").synced_at.is_some()).count();
        let failed = records.iter().filter(|r| r.lock().expect("record lock").error.is_some()).count();
        if synced >= expected {
            break true;
        }
        if start.elapsed() > args.sync_timeout {
            let first_error = records.iter().find_map(|r| r.lock().expect("record lock").error.clone()).unwrap_or_default();
            eprintln!("timed out: {synced}/{expected} SYNCED, {failed} streams failed (first error: {first_error})");
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let sync_secs = records
        .iter()
        .filter_map(|r| r.lock().expect("record lock").synced_at)
        .max()
        .map(|t| t.duration_since(start).as_secs_f64())
        .unwrap_or(f64::NAN);
    let bytes = |records: &[Arc<Mutex<Record>>]| records.iter().map(|r| r.lock().expect("record lock").bytes).sum::<u64>();
    let sync_bytes = bytes(&records);
    let usage = args.pid.and_then(process_usage);
    let cpu = |u: Option<(f64, f64)>| u.zip(usage_before).map(|(a, b)| a.1 - b.1).unwrap_or(f64::NAN);
    let rejects: u64 = records.iter().map(|r| r.lock().expect("record lock").rejects).sum();
    // When the fleet got there: a slow tail (a few streams reopened, or
    // connections retried) shows as a last proxy far behind the 99th.
    // What a proxy received until it was SYNCED, by type (the servers' configurations differ).
    let mut by_type: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    let mut synced_proxies = 0u64;
    for r in &records {
        let r = r.lock().expect("record lock");
        if r.synced_at.is_some() {
            synced_proxies += 1;
            for (ty, (b, n)) in &r.sync_by_type {
                let e = by_type.entry(ty.clone()).or_default();
                *e = (e.0 + b, e.1 + n);
            }
        }
    }
    if synced_proxies > 0 {
        let n = synced_proxies as f64;
        let parts: Vec<String> =
            by_type.iter().map(|(ty, (b, c))| format!("{ty} {:.1} KiB ({:.0} resources)", *b as f64 / n / 1024.0, *c as f64 / n)).collect();
        println!("{mode}: per proxy until SYNCED (mean): {}", parts.join(", "));
    }
    let mut synced_secs: Vec<f64> =
        records.iter().filter_map(|r| r.lock().expect("record lock").synced_at).map(|t| t.duration_since(start).as_secs_f64()).collect();
    let (half, p99) = percentiles(&mut synced_secs).map_or((f64::NAN, f64::NAN), |(p50, _, p99, _)| (p50, p99));
    println!(
        "{mode}: {} proxies, {} SYNCED in {sync_secs:.1}s (half by {:.1}s, 99% by {:.1}s){}; {:.1} MiB sent; {rejects} NACKs; control plane RSS {:.0} MiB, CPU {:.1}s",
        args.proxies,
        if synced_all { "all" } else { "NOT all" },
        half,
        p99,
        match records.iter().map(|r| r.lock().expect("record lock").reconnects).sum::<u64>() {
            0 => String::new(),
            n => {
                let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
                for r in &records {
                    if let Some(e) = &r.lock().expect("record lock").error {
                        *errors.entry(e.clone()).or_default() += 1;
                    }
                }
                let (most, count) = errors.into_iter().max_by_key(|(_, c)| *c).unwrap_or_default();
                format!(" ({n} streams failed and were opened again; most common last error, {count} proxies: {most})")
            }
        },
        sync_bytes as f64 / 1048576.0,
        usage.map_or(f64::NAN, |u| u.0),
        cpu(usage)
    );
    let synced_count = records.iter().filter(|r| r.lock().expect("record lock").synced_at.is_some()).count();
    if args.markdown {
        let what = if synced_all { "initial sync".to_string() } else { format!("initial sync: only {synced_count} of {expected} SYNCED") };
        println!(
            "| {mode} | {} | {what} | {sync_secs:.1} s | {:.0} | {:.1} | | | | | {:.0} |",
            args.proxies,
            usage.map_or(f64::NAN, |u| u.0),
            cpu(usage),
            sync_bytes as f64 / 1048576.0
        );
    }
    if !synced_all {
        anyhow::bail!("not every proxy became SYNCED within {:?}", args.sync_timeout);
    }

    if !args.pause_after_sync.is_zero() {
        // (istiod, on two busy cores, may miss its leader lease during a sync and push everything again: let that pass.)
        tokio::time::sleep(args.pause_after_sync).await;
    }
    let target = ChangeTarget::of(&args).await?;
    // After the last change an earlier run left (its address again would change nothing).
    let mut step = match &target {
        Some(target) => target.last_step(&args).await?,
        None => 0,
    };
    if let Some(target) = &target {
        if args.endpoint_change {
            measure_endpoint_changes(&args, mode, target, &records, &markers, &mut step, 1, Duration::ZERO, "one endpoint change").await?;
        }
        if args.churn_rate > 0.0 {
            let what = format!("endpoint churn {:.0}/s for {:?}", args.churn_rate, args.churn_duration);
            let count = (args.churn_rate * args.churn_duration.as_secs_f64()).round().max(1.0) as usize;
            let every = Duration::from_secs_f64(1.0 / args.churn_rate);
            measure_endpoint_changes(&args, mode, target, &records, &markers, &mut step, count, every, &what).await?;
        }
    }
    if let Some(target) = &target
        && args.policy_change
    {
        let before = args.pid.and_then(process_usage);
        let peak = PhasePeak::start(args.pid);
        let bytes_before = bytes(&records);
        // From the moment the write starts: a server can deliver before the
        // API's answer reaches this (busy) process.
        let changed_at = Instant::now();
        target.weight_change(&args).await?;
        let deadline = changed_at + args.settle;
        // The first policy is on svc-00000.
        let reach = Reach::of(&args);
        let deliveries = loop {
            let deliveries: Vec<Vec<Instant>> = records
                .iter()
                .enumerate()
                .filter(|(proxy, _)| reach.reaches(*proxy, 0))
                .map(|(_, r)| r.lock().expect("record lock").rds_at.clone())
                .collect();
            if Instant::now() > deadline || deliveries.iter().all(|d| d.last().is_some_and(|t| *t >= changed_at)) {
                break deliveries;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (mut lat, missing) = first_after(changed_at, &deliveries);
        let what = if args.change_virtual_service { "one weight change (VirtualService)" } else { "one weight change (TrafficPolicy)" };
        report(&args, mode, what, &mut lat, missing, before, peak.map(PhasePeak::finish), bytes(&records) - bytes_before);
    }
    // The most it held at any moment of the run (each line's RSS is a moment).
    if let Some(peak) = args.pid.and_then(peak_rss_mib) {
        println!("{mode}: control plane peak RSS over the run (VmHWM): {peak:.0} MiB");
    }
    Ok(())
}

/// Writes `count` endpoint changes `every` apart (each gives one service's
/// first endpoint a new address), waits until every proxy received every one
/// (or `--settle` after the last), and reports change→delivery latencies.
#[allow(clippy::too_many_arguments)]
async fn measure_endpoint_changes(
    args: &LoadArgs,
    mode: &str,
    target: &ChangeTarget,
    records: &[Arc<Mutex<Record>>],
    markers: &Markers,
    step: &mut usize,
    count: usize,
    every: Duration,
    what: &str,
) -> anyhow::Result<()> {
    let before = args.pid.and_then(process_usage);
    let peak = PhasePeak::start(args.pid);
    let bytes_before: u64 = records.iter().map(|r| r.lock().expect("record lock").bytes).sum();
    let mut changes = Vec::new();
    let mut tick = tokio::time::interval(every.max(Duration::from_micros(1)));
    for _ in 0..count {
        tick.tick().await;
        *step += 1;
        let idx = {
            let mut m = markers.write().expect("markers lock");
            let idx = m.written;
            m.written += 1;
            m.by_step[*step % crate::fixtures::CHANGED_ADDRESS_STEPS] = idx as u32 + 1;
            idx
        };
        let at = Instant::now();
        let (service, object) = target.endpoint_change(args, *step).await?;
        changes.push(WrittenChange { idx, at, service, object });
    }
    let reach = Reach::of(args);
    let (last, last_service) = changes.last().map(|c| (c.idx, c.service)).unwrap_or_default();
    let deadline = Instant::now() + args.settle;
    while Instant::now() < deadline
        && !records
            .iter()
            .enumerate()
            .filter(|(proxy, _)| reach.reaches(*proxy, last_service))
            .all(|(_, r)| r.lock().expect("record lock").delivered.contains(last))
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deliveries: Vec<_> = records.iter().map(|r| r.lock().expect("record lock").delivered.clone()).collect();
    let (mut lat, missing) = latencies(&changes, &deliveries, reach);
    let bytes_after: u64 = records.iter().map(|r| r.lock().expect("record lock").bytes).sum();
    report(
        args,
        mode,
        &format!("{what} ({} changes)", changes.len()),
        &mut lat,
        missing,
        before,
        peak.map(PhasePeak::finish),
        bytes_after - bytes_before,
    );
    Ok(())
}

/// Where changes are written: the fixture folder the server watches, or the
/// cluster it (and istiod) watch.
enum ChangeTarget {
    ConfigDir(PathBuf),
    Kube(kube::Client),
}

impl ChangeTarget {
    async fn of(args: &LoadArgs) -> anyhow::Result<Option<ChangeTarget>> {
        if let Some(dir) = &args.config_dir {
            return Ok(Some(ChangeTarget::ConfigDir(dir.clone())));
        }
        let Some(path) = &args.kubeconfig else { return Ok(None) };
        Ok(Some(ChangeTarget::Kube(super::serve::kube_client(Some(path), args.context.clone()).await?)))
    }

    /// The highest change step already in the target's endpoints: a run
    /// against a mesh an earlier run changed starts after it.
    async fn last_step(&self, args: &LoadArgs) -> anyhow::Result<usize> {
        use crate::fixtures::last_changed_step;
        match self {
            ChangeTarget::ConfigDir(dir) => {
                let mut last = 0;
                for c in 0..args.clusters.max(1) {
                    for s in 0..args.services {
                        let path = dir.join(cluster_name(c)).join(format!("{}.yaml", service_name(s)));
                        last = last.max(std::fs::read_to_string(&path).map(|t| last_changed_step(&t)).unwrap_or(0));
                    }
                }
                Ok(last)
            }
            ChangeTarget::Kube(client) => {
                let slices: kube::Api<k8s_openapi::api::discovery::v1::EndpointSlice> = kube::Api::all(client.clone());
                let listed = slices.list(&kube::api::ListParams::default().labels(crate::fixtures::kube::MANAGED_BY_FIXTURES)).await?;
                Ok(last_changed_step(&serde_json::to_string(&listed.items)?))
            }
        }
    }

    /// Endpoint change `step`: one service's first endpoint gets
    /// `fixtures::changed_address(step)`. Returns the service's index (for
    /// --sidecars reach) and which object it rewrote.
    async fn endpoint_change(&self, args: &LoadArgs, step: usize) -> anyhow::Result<(usize, usize)> {
        match self {
            ChangeTarget::ConfigDir(dir) => {
                let (c, s) = (step % args.clusters.max(1), (step * 7919) % args.services.max(1));
                let path = dir.join(cluster_name(c)).join(format!("{}.yaml", service_name(s)));
                let text = service_yaml(c, s, args.endpoints, step);
                // Off the runtime: a write (a new inode and a rename) had held one
                // of the simulated fleet's two workers for ~0.8 ms, 100 times a
                // second under churn, while its proxies' responses waited unread.
                let written = path.clone();
                tokio::task::spawn_blocking(move || write_atomically(&written, &text))
                    .await
                    .context("the write's thread")?
                    .with_context(|| format!("writing {}", path.display()))?;
                Ok((s, c * args.services.max(1) + s))
            }
            ChangeTarget::Kube(client) => {
                use crate::fixtures::kube::{CHURN_SERVICES, apply, churn_slice};
                let started = Instant::now();
                apply(client, &churn_slice(step % CHURN_SERVICES, args.endpoints, step)).await?;
                tracing::debug!(step, took = ?started.elapsed(), "endpoint change written to the cluster");
                Ok((0, step % CHURN_SERVICES))
            }
        }
    }

    /// Moves the first policy's weights (50/50 ↔ 70/30).
    async fn weight_change(&self, args: &LoadArgs) -> anyhow::Result<()> {
        match self {
            ChangeTarget::ConfigDir(dir) => {
                let path = dir.join("mesh/traffic-policies.yaml");
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                let edited = if text.contains("weight: 50, subset") {
                    text.replacen("weight: 50, subset", "weight: 70, subset", 1)
                } else {
                    text.replacen("weight: 70, subset", "weight: 50, subset", 1)
                };
                write_atomically(&path, &edited)?;
            }
            ChangeTarget::Kube(client) => {
                use crate::fixtures::kube::{apply, get, traffic_policy, virtual_service};
                let object = |w| {
                    if args.change_virtual_service { virtual_service(0, w) } else { traffic_policy(0, &args.cluster_name, "service-mesh-hub", w) }
                };
                // 50 ↔ 70, whichever it is not now (an earlier run may have moved it).
                let now = get(client, &object(50)).await?;
                let first = if args.change_virtual_service {
                    &now["spec"]["http"][0]["route"][0]["weight"]
                } else {
                    &now["spec"]["trafficShift"]["destinations"][0]["weight"]
                };
                let weight = if first.as_u64() == Some(70) { 50 } else { 70 };
                apply(client, &object(weight)).await?;
            }
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn report(args: &LoadArgs, mode: &str, what: &str, lat: &mut [f64], missing: Undelivered, before: Option<(f64, f64)>, peak: Option<f64>, bytes: u64) {
    let usage = args.pid.and_then(process_usage);
    let cpu = usage.zip(before).map(|(a, b)| a.1 - b.1).unwrap_or(f64::NAN);
    let rss = usage.map_or(f64::NAN, |u| u.0);
    // (At least the RSS at the end: a measurement shorter than a sample has none.)
    let peak = peak.map_or(f64::NAN, |p| p.max(rss));
    match percentiles(lat) {
        Some((p50, p90, p99, max)) => {
            // The first proxy served: how soon anyone gets the change
            // (`percentiles` sorted `lat`).
            let min = lat[0];
            println!(
                "{mode}: {what}: change→delivery over {} (proxy, change) pairs: min {min:.0} ms, p50 {p50:.0} ms, p90 {p90:.0} ms, p99 {p99:.0} ms, max {max:.0} ms; {missing}; {:.1} MiB sent; RSS {rss:.0} MiB (at most {peak:.0} MiB during it); CPU {cpu:.1}s",
                lat.len(),
                bytes as f64 / 1048576.0
            );
            if args.markdown {
                let what = match (missing.pairs, missing.superseded) {
                    (0, 0) => what.to_string(),
                    (pairs, superseded) => {
                        format!("{what}; {pairs} (proxy, change) pairs not delivered within --settle; {superseded} reached only as a later version")
                    }
                };
                println!(
                    "| {mode} | {} | {what} | | {rss:.0} | {cpu:.1} | {p50:.0} | {p90:.0} | {p99:.0} | {max:.0} | {:.0} |",
                    args.proxies,
                    bytes as f64 / 1048576.0
                );
            }
        }
        None => {
            println!("{mode}: {what}: nothing delivered ({missing})");
            if args.markdown {
                println!(
                    "| {mode} | {} | {what}: nothing delivered within --settle | | {rss:.0} | {cpu:.1} | | | | | {:.0} |",
                    args.proxies,
                    bytes as f64 / 1048576.0
                );
            }
        }
    }
}

/// `--certificate-requests N`: Istio's certificate API under load. One CSR
/// (an ECDSA P-256 key, the identity the token proves) is sent N times, at
/// most --certificate-concurrency at once, each request with the token; every
/// answer must be a chain. Reports signed certificates per second and the
/// latency percentiles (each includes the server's TokenReview round trip).
async fn certificate_load(args: &LoadArgs, uri: &str, connector: &Connector) -> anyhow::Result<()> {
    use crate::ca::service::{IstioCertificateRequest, IstioCertificateResponse};
    let token_file = args.token_file.as_ref().context("--token-file")?;
    let token = std::fs::read_to_string(token_file).with_context(|| format!("reading {}", token_file.display()))?.trim().to_string();
    let identity = token_service_account(&token).context("the token names no ServiceAccount (sub system:serviceaccount:<ns>:<sa>)")?;
    let spiffe = crate::model::spiffe_id(crate::model::TRUST_DOMAIN, &identity.0, &identity.1);
    let csr = crate::ca::csr::throwaway_request(&[&spiffe])?;
    let channel = connector.channel(uri).await?;
    let permits = Arc::new(Semaphore::new(args.certificate_concurrency.max(1)));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.certificate_requests {
        let permit = permits.clone().acquire_owned().await?;
        let (channel, csr, token, cluster) = (channel.clone(), csr.clone(), token.clone(), args.cluster_id.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let sent = Instant::now();
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut request = tonic::Request::new(IstioCertificateRequest { csr, validity_duration: 3600, metadata: None });
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
            request.metadata_mut().insert("clusterid", cluster.parse()?);
            let path = tonic::codegen::http::uri::PathAndQuery::from_static("/istio.v1.auth.IstioCertificateService/CreateCertificate");
            let response: tonic::Response<IstioCertificateResponse> =
                grpc.unary(request, path, tonic_prost::ProstCodec::default()).await.map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?;
            anyhow::ensure!(response.get_ref().cert_chain.len() >= 2, "a chain of {} certificates", response.get_ref().cert_chain.len());
            Ok::<f64, anyhow::Error>(sent.elapsed().as_secs_f64() * 1000.0)
        });
    }
    let mut latencies = Vec::new();
    let mut errors = std::collections::BTreeMap::<String, usize>::new();
    while let Some(result) = tasks.join_next().await {
        match result? {
            Ok(ms) => latencies.push(ms),
            Err(e) => *errors.entry(format!("{e:#}")).or_default() += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let p = percentiles(&mut latencies).unwrap_or_default();
    println!(
        "certificates: {} signed of {} in {elapsed:.2}s = {:.0}/s at concurrency {}; latency ms p50 {:.1} p99 {:.1} max {:.1}",
        latencies.len(),
        args.certificate_requests,
        latencies.len() as f64 / elapsed,
        args.certificate_concurrency,
        p.0,
        p.2,
        p.3
    );
    for (error, n) in &errors {
        println!("  {n} refused: {error}");
    }
    anyhow::ensure!(errors.is_empty(), "{} requests failed", errors.values().sum::<usize>());
    Ok(())
}

/// The (namespace, service account) a ServiceAccount token's `sub` claim names (not verified: the server does that).
fn token_service_account(token: &str) -> Option<(String, String)> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let sub = claims["sub"].as_str()?.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = sub.split_once(':')?;
    Some((ns.to_string(), sa.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_change_is_matched_to_the_delivery_that_carried_it() {
        let t0 = *EPOCH + Duration::from_millis(5);
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let change = |idx, at, service, object| WrittenChange { idx, at: ms(at), service, object };
        let changes = [change(0, 0, 0, 0), change(1, 100, 1, 1)];
        let deliveries = vec![[(0, ms(50)), (1, ms(300))].into(), [(1, ms(120))].into(), Default::default()];
        let everyone = Reach { scoped: false, proxy_namespaces: 10 };
        let (lat, missing) = latencies(&changes, &deliveries, everyone);
        assert_eq!(lat, vec![50.0, 200.0, 20.0]);
        assert_eq!(missing, Undelivered { pairs: 3, superseded: 0 }, "the second proxy never got change 0, the third got nothing");
        // With per-namespace Sidecars, proxy i (ns-<i % 2>) must get only its namespace's changes.
        let scoped = Reach { scoped: true, proxy_namespaces: 2 };
        let (lat, missing) = latencies(&changes, &deliveries, scoped);
        assert_eq!(lat, vec![50.0, 20.0]);
        assert_eq!(missing.pairs, 1, "only the third proxy (ns-0) missed its change 0");
        // Both changes rewrote one object: the second proxy had the first
        // change once the second reached it (at 120 ms: 120 ms after the first); the third never.
        let same_object = [change(0, 0, 0, 7), change(1, 100, 1, 7)];
        let (lat, missing) = latencies(&same_object, &deliveries, everyone);
        assert_eq!(lat, vec![50.0, 200.0, 120.0, 20.0]);
        assert_eq!(missing, Undelivered { pairs: 2, superseded: 1 });
        // The later version is found past another object's change.
        let interleaved = [change(0, 0, 0, 7), change(1, 100, 0, 8), change(2, 200, 0, 7)];
        let (lat, missing) = latencies(&interleaved, &[[(1, ms(150)), (2, ms(250))].into()], everyone);
        assert_eq!(lat, vec![250.0, 50.0, 50.0]);
        assert_eq!(missing, Undelivered { pairs: 0, superseded: 1 });
        let (lat, missing) = first_after(ms(100), &[vec![ms(50), ms(130)], vec![ms(20)]]);
        assert_eq!((lat, missing.pairs), (vec![30.0], 1));
    }

    #[test]
    fn a_marked_address_finds_its_change_and_only_the_first_delivery_counts() {
        let markers = new_markers();
        {
            let mut m = markers.write().unwrap();
            m.by_step[7] = 1;
            m.by_step[62_499] = 2;
        }
        let m = markers.read().unwrap();
        let index = |step: usize| marker_index(&m, crate::fixtures::changed_address(step).as_bytes());
        assert_eq!((index(7), index(62_499), index(8)), (Some(0), Some(1), None));
        assert_eq!(marker_index(&m, b"10.0.0.7"), None, "not a marker");
        for step in [0, 1, 249, 250, 12_345, 62_499] {
            assert_eq!(crate::fixtures::step_of_changed_address(crate::fixtures::changed_address(step).as_bytes()), Some(step));
        }
        for bad in ["10.200.1", "10.200.1.", "10.200.x.1", "10.200.250.1", "10.200.1.0", "10.200.1.2.3"] {
            assert_eq!(crate::fixtures::step_of_changed_address(bad.as_bytes()), None, "{bad}");
        }
        let t0 = *EPOCH + Duration::from_millis(1);
        let mut d = Deliveries::default();
        d.insert_first(1, t0 + Duration::from_millis(10));
        d.insert_first(1, t0 + Duration::from_millis(99));
        d.insert_first(130, t0);
        assert!(d.contains(1) && d.contains(130) && !d.contains(0) && !d.contains(4000));
        let by_index = d.by_index();
        assert_eq!(by_index[1], Some(t0 + Duration::from_millis(10)), "the first delivery is kept");
        assert_eq!((by_index[0], by_index[130]), (None, Some(t0)));
    }

    #[test]
    fn reads_its_own_usage_from_proc() {
        let (rss, cpu) = process_usage(std::process::id()).unwrap();
        assert!(rss > 1.0 && cpu >= 0.0);
    }
}
