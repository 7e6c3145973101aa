//! The xDS server's IO edge with a plain gRPC client (no Envoy): bad input,
//! fan-out filtering and many streams. Each case checks that other proxies are
//! unaffected.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_client::ClusterDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DiscoveryRequest, DiscoveryResponse, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use meshpilot::metrics::Metrics;
use meshpilot::runtime::{ControlPlane, Listeners};
use meshpilot::xds::debounce::DebounceConfig;
use meshpilot::xds::node::ProxyNode;
use meshpilot::xds::provider::{ChangeNotifier, ResourceProvider};
use meshpilot::xds::registry::ConnectionRegistry;
use meshpilot::xds::resources::{Resource, ResourceSet, ResourceType};
use meshpilot::xds::server::XdsServerConfig;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Resources per Kubernetes cluster of the proxy (CLUSTER_ID).
struct PerClusterResources {
    sets: RwLock<HashMap<String, Arc<ResourceSet>>>,
    notifier: ChangeNotifier,
}

impl PerClusterResources {
    fn set_clusters(&self, cluster: &str, names: &[&str]) {
        let mut set = ResourceSet::new();
        for n in names {
            set.insert(ResourceType::Cluster, Resource::from_message(*n, &Cluster { name: n.to_string(), ..Default::default() }));
        }
        self.sets.write().unwrap().insert(cluster.to_string(), Arc::new(set));
        self.notifier.changed();
    }
}

impl ResourceProvider for PerClusterResources {
    fn resources_for(&self, proxy: &ProxyNode) -> Arc<ResourceSet> {
        self.sets.read().unwrap().get(&proxy.cluster).cloned().unwrap_or_default()
    }
    fn is_ready(&self) -> bool {
        true
    }
}

struct Plane {
    addr: String,
    provider: Arc<PerClusterResources>,
    registry: Arc<ConnectionRegistry>,
    metrics: Arc<Metrics>,
}

async fn start_plane(send_timeout: Duration) -> Plane {
    start_plane_with(XdsServerConfig { push_concurrency: 8, send_timeout, stream_buffer: 2, ..Default::default() }).await
}

async fn start_plane_with(config: XdsServerConfig) -> Plane {
    let (notifier, changes) = ChangeNotifier::channel();
    let provider = Arc::new(PerClusterResources { sets: Default::default(), notifier });
    let debounce = DebounceConfig { quiet: Duration::from_millis(10), max: Duration::from_secs(1) };
    // The composition root `serve` uses, with this test's provider.
    let plane = ControlPlane::with_provider(provider.clone(), changes, Arc::new(Metrics::new()), debounce, config);
    let (registry, metrics) = (plane.registry.clone(), plane.metrics.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(plane.serve(Listeners { xds: listener, xds_unix: None, xds_tls: None, admin: None }, std::future::pending()));
    Plane { addr, provider, registry, metrics }
}

fn node(id: &str, cluster: &str) -> Node {
    let mut meta = Struct::default();
    meta.fields.insert("CLUSTER_ID".into(), Value { kind: Some(Kind::StringValue(cluster.into())) });
    Node { id: id.into(), metadata: Some(meta), ..Default::default() }
}

fn cds_request(node: Option<Node>, nonce: &str, version: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node,
        type_url: ResourceType::Cluster.type_url().into(),
        response_nonce: nonce.into(),
        version_info: version.into(),
        ..Default::default()
    }
}

/// An ADS stream driven by hand.
struct Ads {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
}

impl Ads {
    async fn open(channel: Channel, first: DiscoveryRequest) -> Result<Ads, tonic::Status> {
        let (tx, req_rx) = mpsc::channel(16);
        tx.send(first).await.unwrap();
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let rx = client.stream_aggregated_resources(ReceiverStream::new(req_rx)).await?.into_inner();
        Ok(Ads { tx, rx })
    }

    async fn next(&mut self) -> Result<DiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(20), self.rx.message()).await {
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => Err(tonic::Status::cancelled("stream ended")),
            Ok(Err(s)) => Err(s),
            Err(_) => panic!("no response within 20s"),
        }
    }

    async fn ack(&self, r: &DiscoveryResponse) {
        self.tx.send(cds_request(None, &r.nonce, &r.version_info)).await.unwrap();
    }
}

fn names(r: &DiscoveryResponse) -> Vec<String> {
    use prost::Message;
    r.resources.iter().map(|a| Cluster::decode(a.value.as_slice()).unwrap().name).collect()
}

#[tokio::test]
async fn a_malformed_node_is_refused_with_a_clear_status() {
    let plane = start_plane(Duration::from_secs(5)).await;
    let channel = Channel::from_shared(plane.addr.clone()).unwrap().connect().await.unwrap();
    for (bad, expect) in [(None, "must carry a node"), (Some(Node::default()), "node.id is empty")] {
        let mut ads = Ads::open(channel.clone(), cds_request(bad, "", "")).await.unwrap();
        let err = ads.next().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(expect), "{}", err.message());
    }
    assert!(plane.metrics.encode().contains("meshpilot_xds_stream_errors_total{reason=\"bad_node\"} 2"));
    assert_eq!(plane.registry.len(), 0);
}

#[tokio::test]
async fn an_unknown_type_is_ignored_and_the_stream_keeps_working() {
    let plane = start_plane(Duration::from_secs(5)).await;
    plane.provider.set_clusters("c1", &["a"]);
    let channel = Channel::from_shared(plane.addr.clone()).unwrap().connect().await.unwrap();
    let mut unknown = cds_request(Some(node("p1", "c1")), "", "");
    unknown.type_url = "type.googleapis.com/envoy.config.nope.v3.Nope".into();
    let mut ads = Ads::open(channel, unknown).await.unwrap();
    ads.tx.send(cds_request(None, "", "")).await.unwrap();
    let r = ads.next().await.unwrap();
    assert_eq!(r.type_url, ResourceType::Cluster.type_url(), "the valid request after it is answered");
    assert_eq!(names(&r), ["a"]);
    assert!(plane.metrics.encode().contains("meshpilot_xds_stream_errors_total{reason=\"unknown_type\"} 1"));
}

#[tokio::test]
async fn a_proxy_whose_config_did_not_change_gets_nothing() {
    let plane = start_plane(Duration::from_secs(5)).await;
    plane.provider.set_clusters("c1", &["a"]);
    plane.provider.set_clusters("c2", &["x"]);
    let channel = Channel::from_shared(plane.addr.clone()).unwrap().connect().await.unwrap();
    let mut p1 = Ads::open(channel.clone(), cds_request(Some(node("p1", "c1")), "", "")).await.unwrap();
    let mut p2 = Ads::open(channel.clone(), cds_request(Some(node("p2", "c2")), "", "")).await.unwrap();
    let r1 = p1.next().await.unwrap();
    let r2 = p2.next().await.unwrap();
    p1.ack(&r1).await;
    p2.ack(&r2).await;
    // Only c1 changes: p1 gets a push.
    plane.provider.set_clusters("c1", &["a", "b"]);
    let push1 = p1.next().await.unwrap();
    assert_eq!(names(&push1), ["a", "b"]);
    p1.ack(&push1).await;
    // Then c2 changes. p2's next response must be that one: it got nothing for c1's change.
    plane.provider.set_clusters("c2", &["x", "y"]);
    let push2 = p2.next().await.unwrap();
    assert_eq!(names(&push2), ["x", "y"]);
    assert_eq!(push2.nonce.parse::<u64>().unwrap(), r2.nonce.parse::<u64>().unwrap() + 1, "no response in between");
}

#[tokio::test]
async fn a_client_that_never_acks_or_disconnects_mid_push_costs_only_itself() {
    let reply_wait_limit = Duration::from_secs(1);
    let plane = start_plane_with(XdsServerConfig {
        push_concurrency: 8,
        send_timeout: Duration::from_millis(500),
        stream_buffer: 2,
        reply_wait_limit,
        ..Default::default()
    })
    .await;
    plane.provider.set_clusters("c1", &["a"]);
    // Each proxy has its own connection, as each Envoy does.
    let connect = || async { Channel::from_shared(plane.addr.clone()).unwrap().connect().await.unwrap() };
    let mut good = Ads::open(connect().await, cds_request(Some(node("good", "c1")), "", "")).await.unwrap();
    let r = good.next().await.unwrap();
    good.ack(&r).await;
    // Never ACKs and never reads.
    let silent = Ads::open(connect().await, cds_request(Some(node("silent", "c1")), "", "")).await.unwrap();
    // Disconnects right after its first response.
    let mut leaver = Ads::open(connect().await, cds_request(Some(node("leaver", "c1")), "", "")).await.unwrap();
    leaver.next().await.unwrap();
    drop(leaver);
    let registry = plane.registry.clone();
    let silent_responses = || {
        let conn = registry.all().into_iter().find(|c| c.node.id == "silent")?;
        let status = conn.view.status(std::time::Instant::now());
        status.iter().find(|t| t.type_short == "CDS")?.sent_nonce.as_ref()?.parse::<u64>().ok()
    };
    // Pushes of 512 KiB each.
    let pad = "x".repeat(256 * 1024);
    let push = |i: usize| {
        let names = [format!("c{i}-a-{pad}"), format!("c{i}-b-{pad}")];
        plane.provider.set_clusters("c1", &[names[0].as_str(), names[1].as_str()]);
    };
    let started = std::time::Instant::now();
    for i in 0..10 {
        push(i);
        let r = good.next().await.unwrap();
        assert_eq!(r.resources.len(), 2, "the well-behaved proxy keeps getting every push");
        good.ack(&r).await;
    }
    // The silent proxy has not answered its first response: pushes wait for
    // the reply (one more per elapsed wait limit), nothing queues up for it.
    let allowed = 1 + (started.elapsed().as_secs_f64() / reply_wait_limit.as_secs_f64()).ceil() as u64;
    let sent = silent_responses().expect("the silent proxy is still connected");
    assert!(sent <= allowed && sent < 10, "{sent} responses to a proxy that never replied (allowed {allowed})");
    // Past the wait limit it is pushed to again; as it does not read, HTTP/2
    // flow control and the bounded buffers fill and the send timeout drops it.
    tokio::time::timeout(Duration::from_secs(30), async {
        let mut i = 10;
        while registry.all().iter().any(|c| c.node.id == "silent" || c.node.id == "leaver") {
            push(i);
            i += 1;
            let r = good.next().await.unwrap();
            assert_eq!(r.resources.len(), 2);
            good.ack(&r).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!("stuck and departed proxies are dropped; still open: {:?}", plane.registry.all().iter().map(|c| c.node.id.clone()).collect::<Vec<_>>())
    });
    assert!(plane.metrics.encode().contains("meshpilot_xds_stream_errors_total{reason=\"send_timeout\"} 1"));
    assert_eq!(registry.all().iter().map(|c| c.node.id.as_str()).collect::<Vec<_>>(), ["good"]);
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_opening_at_once_all_sync_and_get_pushes() {
    let plane = start_plane(Duration::from_secs(10)).await;
    plane.provider.set_clusters("c1", &["a"]);
    // 10 HTTP/2 connections × 100 streams.
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(Channel::from_shared(plane.addr.clone()).unwrap().connect().await.unwrap());
    }
    let opens = (0..1000).map(|i| {
        let ch = channels[i % 10].clone();
        async move {
            let mut ads = Ads::open(ch, cds_request(Some(node(&format!("p{i}"), "c1")), "", "")).await.unwrap();
            let r = ads.next().await.unwrap();
            ads.ack(&r).await;
            ads
        }
    });
    let mut streams = futures::future::join_all(opens).await;
    assert_eq!(plane.registry.len(), 1000);
    plane.provider.set_clusters("c1", &["a", "b"]);
    for ads in streams.iter_mut() {
        assert_eq!(names(&ads.next().await.unwrap()), ["a", "b"]);
    }
    // A single-type CDS stream (not ADS) on the same server is served too.
    let mut cds = ClusterDiscoveryServiceClient::new(channels[0].clone());
    let (tx, rx) = mpsc::channel(1);
    tx.send(cds_request(Some(node("cds-only", "c1")), "", "")).await.unwrap();
    let mut resp = cds.stream_clusters(ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert_eq!(names(&resp.message().await.unwrap().unwrap()), ["a", "b"]);
}

/// The send budget: large responses take turns, each holds its turn until
/// HTTP/2 has taken it, and a proxy that stops reading holds its turn only
/// for the hold limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_responses_take_turns_and_a_stalled_proxy_holds_its_turn_only_for_the_hold_limit() {
    let hold_limit = Duration::from_secs(2);
    // One byte: every large response takes the whole budget, so they go one at a time.
    let plane = start_plane_with(XdsServerConfig { send_budget_bytes: 1, send_budget_hold_limit: hold_limit, ..Default::default() }).await;
    // A response of about 1 MiB: over the 64 KiB that takes a share.
    let pad = "x".repeat(256 * 1024);
    let cluster_names: Vec<String> = (0..4).map(|i| format!("c{i}-{pad}")).collect();
    plane.provider.set_clusters("c1", &cluster_names.iter().map(String::as_str).collect::<Vec<_>>());
    // Ten proxies' connections, opened before the clock starts.
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(Channel::from_shared(plane.addr.clone()).unwrap().connect().await.unwrap());
    }
    // A proxy whose receive window is HTTP/2's smallest default and which never
    // reads: HTTP/2 cannot take its response, so its share stays taken.
    let stalled_channel = Channel::from_shared(plane.addr.clone())
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .unwrap();
    let stalled = Ads::open(stalled_channel, cds_request(Some(node("stalled", "c1")), "", "")).await.unwrap();
    let registry = plane.registry.clone();
    let sent_to = move |id: &str| {
        registry
            .all()
            .into_iter()
            .find(|c| c.node.id == id)
            .and_then(|c| c.view.status(std::time::Instant::now()).iter().find(|t| t.type_short == "CDS").and_then(|t| t.sent_nonce.clone()))
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        while sent_to("stalled").is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the stalled proxy's response was made");
    // (Its share is taken after its response is made: from here on, it is
    // let go no earlier than one hold limit later.)
    let stalled_since = std::time::Instant::now();
    let syncs = channels.into_iter().enumerate().map(|(i, channel)| {
        let expected = cluster_names.clone();
        async move {
            let mut ads = Ads::open(channel, cds_request(Some(node(&format!("p{i}"), "c1")), "", "")).await.unwrap();
            let r = ads.next().await.unwrap();
            let arrived = stalled_since.elapsed();
            let mut got = names(&r);
            got.sort();
            assert_eq!(got, expected, "every proxy gets the whole response");
            ads.ack(&r).await;
            arrived
        }
    });
    let arrivals = futures::future::join_all(syncs).await;
    for arrived in &arrivals {
        assert!(*arrived >= hold_limit, "a response went out while the stalled proxy's share was held ({arrived:?})");
    }
    let metrics = plane.metrics.encode();
    // Only the stalled share was overdue: the others' were given back as
    // HTTP/2 took their responses (or ten shares of one byte would have
    // taken ten hold limits).
    assert!(metrics.contains("meshpilot_xds_send_budget_overdue_total 1\n"), "one share let go overdue:\n{metrics}");
    let waits =
        metrics.lines().find_map(|l| l.strip_prefix("meshpilot_xds_send_budget_waits_total ")).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    assert!(waits >= 10, "each of the ten found the budget taken ({waits} waits)");
    drop(stalled);
}
