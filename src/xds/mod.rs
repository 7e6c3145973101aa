//! The xDS server: resources, per-stream protocol state machines (SotW and
//! delta), push debouncing and fan-out, sync status, and CSDS. It knows
//! resources, not meshes.

pub mod auth;
pub mod codec;
pub mod csds;
pub mod debounce;
pub mod delta;
pub mod node;
pub mod outbox;
pub mod provider;
pub mod registry;
pub mod resource;
pub mod resources;
pub mod send_budget;
pub mod server;
pub mod services;
pub mod sotw;
pub mod status;
pub mod tls;
pub mod view;
pub mod wire;

use std::net::SocketAddr;

use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::ClientStatusDiscoveryServiceServer;

use services::{AdsService, CdsService, EdsService, LdsService, RdsService, SdsService};
use wire::MAX_MESSAGE_BYTES;

/// Serves ADS, the per-type services and CSDS on `listener` until `shutdown`
/// resolves. Connections are accepted on a thread of their own
/// ([`accept_on_own_thread`]).
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    server: server::XdsServer,
    csds: csds::Csds,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = match accept_on_own_thread(listener) {
        Ok(incoming) => incoming,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the xDS accept thread");
            return Ok(());
        }
    };
    serve_grpc_incoming(incoming, server, csds, tonic::service::Routes::default(), shutdown).await
}

/// Serves ADS, the per-type services, CSDS and `extra` (Istio's certificate
/// API) over TLS on `listener`: streams here may prove an identity with a
/// token, and only proven streams get certificates. Each handshake runs on
/// a task of its own ([`tls::handshakes`]).
pub async fn serve_grpc_tls(
    listener: tokio::net::TcpListener,
    config: std::sync::Arc<rustls::ServerConfig>,
    server: server::XdsServer,
    csds: csds::Csds,
    extra: tonic::service::Routes,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = match accept_on_own_thread(listener) {
        Ok(incoming) => incoming,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the TLS xDS accept thread");
            return Ok(());
        }
    };
    serve_grpc_incoming(tls::handshakes(incoming, config), server.for_tls(), csds, extra, shutdown).await
}

/// Accepts on an OS thread of its own and hands the connections to the
/// runtime. As a runtime task the accept loop is one task among every
/// stream's: in a 10,000-proxy sync on two busy cores it took ≈1,000
/// connections a second, the kernel's accept queue (8,192) filled, SYNs were
/// dropped, and the unlucky proxies' connects backed off exponentially (the
/// last proxy SYNCED 38 s after the 99th). The thread keeps the kernel's queue
/// empty; accepted connections wait in the channel until the server serves
/// them. The thread ends at the first connection after the server is gone.
pub fn accept_on_own_thread(
    listener: tokio::net::TcpListener,
) -> std::io::Result<tokio_stream::wrappers::UnboundedReceiverStream<std::io::Result<tokio::net::TcpStream>>> {
    let runtime = tokio::runtime::Handle::current();
    let listener = listener.into_std()?;
    listener.set_nonblocking(false)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new().name("xds-accept".into()).spawn(move || {
        let _runtime = runtime.enter();
        loop {
            let accepted = listener.accept().and_then(|(stream, _)| {
                stream.set_nonblocking(true)?;
                // A unary answer (a signed certificate) or a small xDS
                // response must not wait for the peer's delayed ACK:
                // with Nagle on, one CreateCertificate took 44 ms
                // instead of the TokenReview's few.
                stream.set_nodelay(true)?;
                tokio::net::TcpStream::from_std(stream)
            });
            match accepted {
                Ok(stream) => {
                    if tx.send(Ok(stream)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: say so, and let it pass.
                    tracing::warn!(error = %e, "accepting an xDS connection failed");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    if tx.is_closed() {
                        return;
                    }
                }
            }
        }
    })?;
    Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
}

/// The same on a Unix socket (reachable from other network namespaces).
pub async fn serve_grpc_unix(
    listener: tokio::net::UnixListener,
    server: server::XdsServer,
    csds: csds::Csds,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_grpc_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener), server, csds, tonic::service::Routes::default(), shutdown).await
}

async fn serve_grpc_incoming<I, IO>(
    incoming: I,
    server: server::XdsServer,
    csds: csds::Csds,
    extra: tonic::service::Routes,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error>
where
    I: futures::Stream<Item = std::io::Result<IO>> + Send + 'static,
    IO: tonic::transport::server::Connected + tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
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
        .add_routes(
            extra
                .add_service(AdsService(server.clone()))
                .add_service(CdsService(server.clone()))
                .add_service(EdsService(server.clone()))
                .add_service(LdsService(server.clone()))
                .add_service(RdsService(server.clone()))
                .add_service(SdsService(server))
                .add_service(ClientStatusDiscoveryServiceServer::new(csds).max_encoding_message_size(MAX_MESSAGE_BYTES)),
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_stream::StreamExt;

    use super::accept_on_own_thread;

    #[test]
    fn connections_are_accepted_while_the_runtime_is_busy() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (addr, mut incoming) = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let listener = socket.listen(16).unwrap();
            (listener.local_addr().unwrap(), accept_on_own_thread(listener).unwrap())
        });
        // Nothing runs the runtime now (as when its workers are busy). With
        // nothing accepting, the kernel's queue of 16 would stay full and
        // every later connect would time out (its SYNs dropped, retried and
        // dropped again); the thread keeps the queue drained (a SYN dropped
        // while it was descheduled is retried a second later and gets in).
        let clients: Vec<std::net::TcpStream> = (0..200)
            .map(|i| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap_or_else(|e| panic!("connection {i}: {e}")))
            .collect();
        // The server gets every one when it runs again.
        runtime.block_on(async {
            for _ in &clients {
                incoming.next().await.expect("a connection").expect("accepted");
            }
        });
    }
}
