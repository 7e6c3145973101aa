//! `meshpilot echo`: an HTTP backend that says who it is.

use axum::http::HeaderMap;
use axum::response::IntoResponse;

#[derive(Debug, clap::Args)]
pub struct EchoArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9080")]
    pub listen: String,
    /// The identity to answer with (e.g. reviews-v3).
    #[arg(long)]
    pub name: String,
}

/// The router: every path answers `<name>\n` with an `x-backend` header.
pub fn router(name: String) -> axum::Router {
    axum::Router::new().fallback(move |headers: HeaderMap| {
        let name = name.clone();
        async move {
            let peer = headers.get("x-forwarded-client-cert").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            ([("x-backend", name.clone()), ("x-peer-cert", peer)], format!("{name}\n")).into_response()
        }
    })
}

pub async fn run(args: EchoArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, name = %args.name, "echo backend listening");
    axum::serve(listener, router(args.name)).await?;
    Ok(())
}
