//! A minimal HTTP/1.1 GET client for the admin API (hyper).

use anyhow::Context;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// GETs `http://{addr}{path}` and returns status and body.
pub async fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    get_with_host(addr, path, None).await
}

/// GETs with an explicit Host header (for virtual-host routing through Envoy).
pub async fn get_with_host(addr: &str, path: &str, host: Option<&str>) -> anyhow::Result<(u16, String)> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: hyper::Uri = format!("http://{addr}{path}").parse().with_context(|| format!("bad address {addr:?}"))?;
    let mut req = hyper::Request::get(uri);
    if let Some(host) = host {
        req = req.header(hyper::header::HOST, host);
    }
    let resp = client
        .request(req.body(Empty::new())?)
        .await
        .with_context(|| format!("GET http://{addr}{path}"))?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
