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

/// Sends `n` GETs of `path` to `addr` with Host `host`, `concurrency` at a time
/// over kept-alive connections, and counts the answers by body (trimmed); a
/// non-200 counts as `HTTP <status>`, a failed request as `error: …`.
pub async fn count_answers(addr: &str, host: &str, path: &str, n: usize, concurrency: usize) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for (answer, _) in answers_with_peers(addr, host, path, n, concurrency).await {
        *counts.entry(answer).or_insert(0) += 1;
    }
    counts
}

/// `n` GETs (at most `concurrency` at once); per request the answer (the
/// body's first line, `HTTP <status>` or `error: …`) and the `x-peer-cert`
/// header (what `meshpilot echo` saw in `x-forwarded-client-cert`).
pub async fn answers_with_peers(addr: &str, host: &str, path: &str, n: usize, concurrency: usize) -> Vec<(String, String)> {
    use futures::StreamExt;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: Option<hyper::Uri> = format!("http://{addr}{path}").parse().ok();
    futures::stream::iter(0..n)
        .map(|_| {
            let client = client.clone();
            let uri = uri.clone();
            async move {
                let Some(uri) = uri else { return (format!("error: bad address {addr:?}"), String::new()) };
                let req = match hyper::Request::get(uri).header(hyper::header::HOST, host).body(Empty::new()) {
                    Ok(r) => r,
                    Err(e) => return (format!("error: {e}"), String::new()),
                };
                match client.request(req).await {
                    Ok(resp) if resp.status() == 200 => {
                        let peer = resp.headers().get("x-peer-cert").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        (String::from_utf8_lossy(&body).trim().to_string(), peer)
                    }
                    Ok(resp) => (format!("HTTP {}", resp.status().as_u16()), String::new()),
                    Err(e) => (format!("error: {e}"), String::new()),
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await
}

/// GET over a Unix socket (an Envoy admin page served there); the body.
pub async fn get_unix(path: &std::path::Path, url: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(path).await?;
    s.write_all(format!("GET {url} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // Envoy's admin answers HTTP/1.1 with chunked bodies; undo the chunking.
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        return Ok(out);
    }
    Ok(body.to_string())
}
