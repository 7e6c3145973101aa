//! The xDS server: resources, per-stream protocol state machines (SotW and
//! delta), push debouncing and fan-out, sync status, and CSDS. It knows
//! resources, not meshes.

pub mod codec;
pub mod csds;
pub mod debounce;
pub mod delta;
pub mod node;
pub mod provider;
pub mod registry;
pub mod resources;
pub mod server;
pub mod sotw;
pub mod status;

use std::net::SocketAddr;

use envoy_types::pb::envoy::service::{
    cluster::v3::cluster_discovery_service_server::ClusterDiscoveryServiceServer,
    discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer,
    endpoint::v3::endpoint_discovery_service_server::EndpointDiscoveryServiceServer,
    listener::v3::listener_discovery_service_server::ListenerDiscoveryServiceServer,
    route::v3::route_discovery_service_server::RouteDiscoveryServiceServer,
    secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer,
    status::v3::client_status_discovery_service_server::ClientStatusDiscoveryServiceServer,
};

/// Largest message accepted or sent (gRPC's 4 MB default is too small for big meshes).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Serves ADS, the per-type services and CSDS on `listener` until `shutdown` resolves.
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    server: server::XdsServer,
    csds: csds::Csds,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_grpc_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener), server, csds, shutdown).await
}

/// The same on a Unix socket (reachable from other network namespaces).
pub async fn serve_grpc_unix(
    listener: tokio::net::UnixListener,
    server: server::XdsServer,
    csds: csds::Csds,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_grpc_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener), server, csds, shutdown).await
}

async fn serve_grpc_incoming<S, IO>(
    incoming: S,
    server: server::XdsServer,
    csds: csds::Csds,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error>
where
    S: futures::Stream<Item = std::io::Result<IO>> + Send + 'static,
    IO: tonic::transport::server::Connected + tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(
            AggregatedDiscoveryServiceServer::new(server.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(ClusterDiscoveryServiceServer::new(server.clone()).max_encoding_message_size(MAX_MESSAGE_BYTES))
        .add_service(EndpointDiscoveryServiceServer::new(server.clone()).max_encoding_message_size(MAX_MESSAGE_BYTES))
        .add_service(ListenerDiscoveryServiceServer::new(server.clone()).max_encoding_message_size(MAX_MESSAGE_BYTES))
        .add_service(RouteDiscoveryServiceServer::new(server.clone()).max_encoding_message_size(MAX_MESSAGE_BYTES))
        .add_service(SecretDiscoveryServiceServer::new(server).max_encoding_message_size(MAX_MESSAGE_BYTES))
        .add_service(ClientStatusDiscoveryServiceServer::new(csds).max_encoding_message_size(MAX_MESSAGE_BYTES))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The address a listener is bound to, for logs.
pub fn local_addr(listener: &tokio::net::TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
