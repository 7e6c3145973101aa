//! `meshpilot echo`: a backend that says who it is. Over HTTP (1.1 or
//! cleartext HTTP/2) it answers every request with `<name>\n`, the caller's
//! certificate as its sidecar forwarded it, and the HTTP version it saw; a
//! gRPC call (`content-type: application/grpc`) gets the name as a gRPC
//! message with `grpc-status: 0`. With `--tcp` it writes `<name>\n` on each
//! connection and closes it.

use std::convert::Infallible;

use super::http::grpc_frame;
use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http_body_util::StreamBody;
use hyper::body::Frame;

#[derive(Debug, clap::Args)]
pub struct EchoArgs {
    /// Address to listen on (a pod's application listens on 0.0.0.0:<port>).
    #[arg(long, default_value = "127.0.0.1:9080")]
    pub listen: String,
    /// The identity to answer with (e.g. reviews-v3).
    #[arg(long)]
    pub name: String,
    /// Raw TCP: write the name on each connection and close it.
    #[arg(long)]
    pub tcp: bool,
}

fn grpc_answer(name: &str) -> Response {
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
    let frames = [Ok::<_, Infallible>(Frame::data(grpc_frame(name.as_bytes()))), Ok(Frame::trailers(trailers))];
    let body = Body::new(StreamBody::new(futures::stream::iter(frames)));
    Response::builder().header("content-type", "application/grpc").body(body).unwrap_or_else(|_| Response::new(Body::empty()))
}

/// The router: every path answers `<name>\n` with `x-backend`, `x-peer-cert`
/// (the caller's `x-forwarded-client-cert`) and `x-seen-version` headers.
pub fn router(name: String) -> axum::Router {
    axum::Router::new().fallback(move |req: Request| {
        let name = name.clone();
        async move {
            let headers = req.headers();
            let peer = headers.get("x-forwarded-client-cert").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let version = format!("{:?}", req.version());
            let grpc = headers.get("content-type").and_then(|v| v.to_str().ok()).is_some_and(|c| c.starts_with("application/grpc"));
            let mut resp = if grpc { grpc_answer(&name) } else { format!("{name}\n").into_response() };
            let h = resp.headers_mut();
            for (k, v) in [("x-backend", name.as_str()), ("x-peer-cert", peer.as_str()), ("x-seen-version", version.as_str())] {
                if let Ok(v) = hyper::header::HeaderValue::from_str(v) {
                    h.insert(k, v);
                }
            }
            resp
        }
    })
}

pub async fn run(args: EchoArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, name = %args.name, tcp = args.tcp, "echo backend listening");
    if args.tcp {
        let line = format!("{}\n", args.name);
        loop {
            let (mut conn, _) = listener.accept().await?;
            let line = line.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = conn.write_all(line.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    }
    axum::serve(listener, router(args.name)).await?;
    Ok(())
}
