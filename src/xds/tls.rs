//! TLS on accepted connections, each handshake on a task of its own with a
//! deadline, so a slow or silent client holds up nobody else's connection.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A handshake not finished within this is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS connections of `incoming`'s TCP connections, in the order their
/// handshakes finish; failed handshakes are logged and skipped.
pub fn handshakes(
    incoming: impl Stream<Item = std::io::Result<TcpStream>> + Send + 'static,
    config: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static {
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut incoming = std::pin::pin!(incoming);
        while let Some(conn) = incoming.next().await {
            let Ok(tcp) = conn else { continue };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let peer = tcp.peer_addr().ok();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls));
                    }
                    Ok(Err(e)) => tracing::debug!(?peer, error = %e, "TLS xDS handshake failed"),
                    Err(_) => tracing::debug!(?peer, "TLS xDS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
}
