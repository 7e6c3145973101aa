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
pub mod view;
pub mod wire;

use std::net::SocketAddr;

use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::ClientStatusDiscoveryServiceServer;

use wire::{
    AdsService, CdsService, EdsService, LdsService, MAX_MESSAGE_BYTES, RdsService, SdsService,
};

/// Serves ADS, the per-type services and CSDS on `listener` until `shutdown` resolves.
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    server: server::XdsServer,
    csds: csds::Csds,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_grpc_incoming(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        server,
        csds,
        shutdown,
    )
    .await
}

/// The same on a Unix socket (reachable from other network namespaces).
pub async fn serve_grpc_unix(
    listener: tokio::net::UnixListener,
    server: server::XdsServer,
    csds: csds::Csds,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_grpc_incoming(
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        server,
        csds,
        shutdown,
    )
    .await
}

async fn serve_grpc_incoming<S, IO>(
    incoming: S,
    server: server::XdsServer,
    csds: csds::Csds,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error>
where
    S: futures::Stream<Item = std::io::Result<IO>> + Send + 'static,
    IO: tonic::transport::server::Connected
        + tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + Send
        + Unpin
        + 'static,
{
    tonic::transport::Server::builder()
        // Requests a proxy has sent but the server has not read yet wait in
        // this window. hyper's default (1 MiB per stream) let thousands of
        // proxies park their SotW EDS ACKs (each names every cluster, ≈220 KB)
        // in the control plane's memory during a fleet sync; HTTP/2's own
        // default keeps them in the proxy until the server reads.
        .initial_stream_window_size(REQUEST_WINDOW_BYTES)
        .initial_connection_window_size(REQUEST_WINDOW_BYTES)
        .http2_keepalive_interval(Some(server.config().keepalive_interval))
        .http2_keepalive_timeout(Some(server.config().keepalive_timeout))
        .add_service(AdsService(server.clone()))
        .add_service(CdsService(server.clone()))
        .add_service(EdsService(server.clone()))
        .add_service(LdsService(server.clone()))
        .add_service(RdsService(server.clone()))
        .add_service(SdsService(server))
        .add_service(
            ClientStatusDiscoveryServiceServer::new(csds)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The xDS server's HTTP/2 receive window, per stream and per connection (HTTP/2's default).
pub const REQUEST_WINDOW_BYTES: u32 = 65_535;

/// The address a listener is bound to, for logs.
pub fn local_addr(listener: &tokio::net::TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
