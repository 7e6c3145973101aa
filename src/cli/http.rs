//! A minimal HTTP client for the admin API (hyper), and the sampler behind
//! `meshpilot sample`: many requests (HTTP/1.1, cleartext HTTP/2, gRPC) or
//! TCP connections, each answer counted with what the backend saw.

use std::time::Duration;

use anyhow::Context;
use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
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
    let resp = client.request(req.body(Empty::new())?).await.with_context(|| format!("GET http://{addr}{path}"))?;
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
    sample(addr, (Some(host), "GET", path), (n, concurrency), SampleProtocol::Http, SAMPLE_WITHIN)
        .await
        .into_iter()
        .map(|a| (a.answer, a.peer))
        .collect()
}

/// How `meshpilot sample` talks to the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SampleProtocol {
    /// HTTP/1.1 GETs.
    Http,
    /// Cleartext HTTP/2 GETs (prior knowledge).
    H2c,
    /// gRPC unary calls (HTTP/2, `application/grpc`, the answer in a gRPC message, `grpc-status` in the trailers).
    Grpc,
    /// TCP connections: the answer is what the server writes before it closes.
    Tcp,
}

/// One request's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The body's first line (or gRPC message, or TCP line); `HTTP <status>`, `grpc-status <n>` or `error: …` otherwise.
    pub answer: String,
    /// `x-peer-cert`: what `meshpilot echo` saw in `x-forwarded-client-cert`.
    pub peer: String,
    /// `x-seen-version`: the HTTP version the backend saw.
    pub version: String,
}

impl Answer {
    fn failed(what: String) -> Answer {
        Answer { answer: what, peer: String::new(), version: String::new() }
    }
}

fn header(resp: &hyper::HeaderMap, name: &str) -> String {
    resp.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

/// `n` requests to `addr` (at most `concurrency` at once, kept-alive
/// connections for HTTP), each answer with what the backend saw. `host`
/// overrides the Host / `:authority` (default: `addr`, as a pod's client sends it).
/// Each request gets [`REQUEST_TIMEOUT`]; whatever has not been sent
/// when `within` has passed is counted as `error: not sent within …`, so a
/// path that holds connections open costs a bounded time, never a hang.
pub async fn sample(
    addr: &str,
    (host, method, path): (Option<&str>, &str, &str),
    (n, concurrency): (usize, usize),
    protocol: SampleProtocol,
    within: Duration,
) -> Vec<Answer> {
    use futures::StreamExt;
    let requests = requests(addr, (host, method, path), n, protocol);
    let timed = requests.map(|answer| async move {
        tokio::time::timeout(REQUEST_TIMEOUT, answer).await.unwrap_or_else(|_| Answer::failed(format!("error: no answer in {REQUEST_TIMEOUT:?}")))
    });
    let mut answers: Vec<Answer> = timed.buffer_unordered(concurrency.max(1)).take_until(tokio::time::sleep(within)).collect().await;
    let unsent = n - answers.len();
    answers.extend((0..unsent).map(|_| Answer::failed(format!("error: not sent within {within:?}"))));
    answers
}

/// How long a whole sample may take unless told otherwise.
pub const SAMPLE_WITHIN: Duration = Duration::from_secs(60);

/// How long one sampled request or connection may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn requests<'a>(
    addr: &'a str,
    (host, method, path): (Option<&'a str>, &'a str, &'a str),
    n: usize,
    protocol: SampleProtocol,
) -> futures::stream::BoxStream<'a, futures::future::BoxFuture<'a, Answer>> {
    use futures::{FutureExt, StreamExt};
    use http_body_util::Full;
    if protocol == SampleProtocol::Tcp {
        return futures::stream::iter(0..n).map(move |_| tcp_answer(addr).boxed()).boxed();
    }
    let http2 = protocol != SampleProtocol::Http;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(http2).build_http();
    let grpc = protocol == SampleProtocol::Grpc;
    let path = if grpc && path == "/" { "/meshpilot.Echo/Who" } else { path };
    let uri: Option<hyper::Uri> = format!("http://{addr}{path}").parse().ok();
    futures::stream::iter(0..n)
        .map(move |_| {
            let client = client.clone();
            let uri = uri.clone();
            async move {
                let Some(uri) = uri else { return Answer::failed(format!("error: bad address {addr:?}")) };
                let mut req = if grpc {
                    hyper::Request::post(uri).header("content-type", "application/grpc").header("te", "trailers")
                } else {
                    hyper::Request::builder().method(method).uri(uri)
                };
                if let Some(host) = host {
                    req = req.header(hyper::header::HOST, host);
                }
                let body = if grpc { Full::new(grpc_frame(b"")) } else { Full::new(Bytes::new()) };
                let req = match req.body(body) {
                    Ok(r) => r,
                    Err(e) => return Answer::failed(format!("error: {e}")),
                };
                match client.request(req).await {
                    Ok(resp) if resp.status() == 200 => {
                        let (peer, version) = (header(resp.headers(), "x-peer-cert"), header(resp.headers(), "x-seen-version"));
                        let head_status = header(resp.headers(), "grpc-status");
                        let collected = match resp.into_body().collect().await {
                            Ok(c) => c,
                            Err(e) => return Answer::failed(format!("error: {e}")),
                        };
                        let status = collected.trailers().map(|t| header(t, "grpc-status")).filter(|s| !s.is_empty()).unwrap_or(head_status);
                        let body = collected.to_bytes();
                        let answer = if !grpc {
                            String::from_utf8_lossy(&body).trim().to_string()
                        } else if status != "0" {
                            format!("grpc-status {status}")
                        } else {
                            String::from_utf8_lossy(body.get(5..).unwrap_or_default()).trim().to_string()
                        };
                        Answer { answer, peer, version }
                    }
                    Ok(resp) => Answer::failed(format!("HTTP {}", resp.status().as_u16())),
                    Err(e) => Answer::failed(format!("error: {e}")),
                }
            }
            .boxed()
        })
        .boxed()
}

async fn tcp_answer(addr: &str) -> Answer {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        let mut buf = Vec::new();
        conn.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    match read.await {
        Ok(buf) if buf.is_empty() => Answer::failed("error: closed without an answer".into()),
        Ok(buf) => Answer { answer: String::from_utf8_lossy(&buf).trim().to_string(), peer: String::new(), version: String::new() },
        Err(e) => Answer::failed(format!("error: {e}")),
    }
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

/// One gRPC message: uncompressed flag, big-endian length, payload.
pub fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(0);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}
