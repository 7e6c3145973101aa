//! The gRPC wire edge: discovery responses that carry already-encoded
//! resources (shared `Bytes` from a [`ResourceView`](super::view::ResourceView)),
//! the HTTP/2 body that streams them without copying them per stream, and the
//! reading of request bodies message by message. (The tonic services that
//! use them are in `services.rs`.)

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};
use http_body::Frame;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use tonic::Status;
use tonic::codegen::{Body, StdError, http};

use super::send_budget::SendShare;
use super::view::put_string_field;

/// A stream of responses to one xDS stream's requests.
pub type ResponseStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A response on its way to the wire, with the share of the server's send
/// budget it took (large responses only; see [`super::send_budget`]).
pub struct Outgoing<R> {
    pub response: R,
    pub share: Option<SendShare>,
}

/// A stream's responses as its HTTP/2 body takes them.
pub type OutgoingStream<T> = Pin<Box<dyn futures::Stream<Item = Result<Outgoing<T>, Status>> + Send + 'static>>;

/// A response the server writes itself: the per-stream fields before and
/// after the shared, already-encoded resource entries.
pub trait WireMessage: Send + 'static {
    /// Fields before the entries (version).
    fn head(&self, buf: &mut impl BufMut);
    /// `head`'s encoded length.
    fn head_len(&self) -> usize;
    /// The encoded resource entries, shared with every stream that sends them.
    fn entries(&self) -> &Bytes;
    /// Fields after the entries (type URL, nonce, removed names).
    fn tail(&self, buf: &mut impl BufMut);
    /// `tail`'s encoded length.
    fn tail_len(&self) -> usize;
    fn type_url(&self) -> &str;

    fn encoded_len(&self) -> usize {
        self.head_len() + self.entries().len() + self.tail_len()
    }

    fn encode_to(&self, buf: &mut impl BufMut) {
        self.head(buf);
        buf.put_slice(self.entries());
        self.tail(buf);
    }

    /// The gRPC message (5-byte prefix, then the protobuf encoding) as chunks.
    /// Large entries go out as the shared `Bytes` itself, never copied per
    /// stream; a message of at most one HTTP/2 frame ([`COALESCE_UP_TO`]) is
    /// one chunk, so it is one DATA frame and not three (an endpoint change's
    /// response is a few hundred bytes, and each frame costs both ends a
    /// round of HTTP/2 flow control and framing).
    fn grpc_chunks(&self, out: &mut VecDeque<Bytes>) {
        let len = self.encoded_len();
        let prefix = |buf: &mut BytesMut| {
            buf.put_u8(0);
            buf.put_u32(len as u32);
        };
        if len <= COALESCE_UP_TO {
            let mut message = BytesMut::with_capacity(5 + len);
            prefix(&mut message);
            self.encode_to(&mut message);
            out.push_back(message.freeze());
            return;
        }
        let mut head = BytesMut::with_capacity(5 + self.head_len());
        prefix(&mut head);
        self.head(&mut head);
        out.push_back(head.freeze());
        if !self.entries().is_empty() {
            out.push_back(self.entries().clone());
        }
        let mut tail = BytesMut::with_capacity(self.tail_len());
        self.tail(&mut tail);
        if !tail.is_empty() {
            out.push_back(tail.freeze());
        }
    }
}

/// Messages up to this size are sent as one chunk (HTTP/2's default maximum
/// frame size): copying them costs less than framing their parts apart.
pub const COALESCE_UP_TO: usize = 16 * 1024;

/// The encoded length of a string field as [`put_string_field`] writes it.
fn string_field_len(tag: u32, s: &str) -> usize {
    if s.is_empty() { 0 } else { prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(s.len() as u64) + s.len() }
}

/// A SotW `DiscoveryResponse` whose resources are already encoded.
#[derive(Debug, Clone)]
pub struct SotwResponse {
    pub version_info: String,
    pub type_url: &'static str,
    pub nonce: String,
    /// Repeated field 2 (`resources`), encoded.
    pub resources: Bytes,
    pub resource_count: usize,
}

impl SotwResponse {
    /// The response as the generated message (tests and debugging).
    pub fn to_message(&self) -> DiscoveryResponse {
        let mut buf = Vec::with_capacity(self.encoded_len());
        self.encode_to(&mut buf);
        DiscoveryResponse::decode(buf.as_slice()).expect("we encode valid responses")
    }
}

impl WireMessage for SotwResponse {
    fn head(&self, buf: &mut impl BufMut) {
        put_string_field(1, &self.version_info, buf);
    }

    fn head_len(&self) -> usize {
        string_field_len(1, &self.version_info)
    }

    fn entries(&self) -> &Bytes {
        &self.resources
    }

    fn tail(&self, buf: &mut impl BufMut) {
        put_string_field(4, self.type_url, buf);
        put_string_field(5, &self.nonce, buf);
    }

    fn tail_len(&self) -> usize {
        string_field_len(4, self.type_url) + string_field_len(5, &self.nonce)
    }

    fn type_url(&self) -> &str {
        self.type_url
    }
}

/// A `DeltaDiscoveryResponse` whose resources are already encoded.
#[derive(Debug, Clone)]
pub struct DeltaResponse {
    pub system_version_info: String,
    pub type_url: &'static str,
    pub nonce: String,
    /// Repeated field 2 (`resources`), encoded.
    pub resources: Bytes,
    pub resource_count: usize,
    pub removed_resources: Vec<String>,
}

impl DeltaResponse {
    pub fn to_message(&self) -> DeltaDiscoveryResponse {
        let mut buf = Vec::with_capacity(self.encoded_len());
        self.encode_to(&mut buf);
        DeltaDiscoveryResponse::decode(buf.as_slice()).expect("we encode valid responses")
    }
}

impl WireMessage for DeltaResponse {
    fn head(&self, buf: &mut impl BufMut) {
        put_string_field(1, &self.system_version_info, buf);
    }

    fn head_len(&self) -> usize {
        string_field_len(1, &self.system_version_info)
    }

    fn entries(&self) -> &Bytes {
        &self.resources
    }

    fn tail(&self, buf: &mut impl BufMut) {
        put_string_field(4, self.type_url, buf);
        put_string_field(5, &self.nonce, buf);
        for name in &self.removed_resources {
            // Repeated strings are written even when empty.
            encode_key(6, WireType::LengthDelimited, buf);
            encode_varint(name.len() as u64, buf);
            buf.put_slice(name.as_bytes());
        }
    }

    fn tail_len(&self) -> usize {
        let removed: usize =
            self.removed_resources.iter().map(|n| prost::encoding::key_len(6) + prost::encoding::encoded_len_varint(n.len() as u64) + n.len()).sum();
        string_field_len(4, self.type_url) + string_field_len(5, &self.nonce) + removed
    }

    fn type_url(&self) -> &str {
        self.type_url
    }
}

/// The messages of a streaming gRPC call, read from an HTTP/2 body: each
/// 5-byte-prefixed message decoded with prost straight from the received
/// HTTP/2 data chunks ([`ChunkedBuf`]): no message-sized buffer is assembled,
/// and `bytes` fields are slices of the chunks. (Assembling one had cost a
/// fresh allocation per large message — a SotW EDS request names every
/// cluster; a CDS response is a megabyte — and most of its time in the
/// kernel zeroing the new pages.) The server reads requests with it.
pub struct GrpcMessages<B, Req> {
    body: Pin<Box<B>>,
    received: ChunkedBuf,
    _req: PhantomData<fn() -> Req>,
}

impl<B, Req> GrpcMessages<B, Req> {
    pub fn new(body: B) -> Self {
        GrpcMessages { body: Box::pin(body), received: ChunkedBuf::default(), _req: PhantomData }
    }
}

impl<B, Req> futures::Stream for GrpcMessages<B, Req>
where
    B: Body,
    B::Error: Into<StdError>,
    Req: Message + Default,
{
    type Item = Result<Req, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        use bytes::Buf;
        let this = self.get_mut();
        loop {
            if let Some(prefix) = this.received.peek_prefix() {
                if prefix[0] != 0 {
                    return Poll::Ready(Some(Err(Status::unimplemented("compressed requests are not supported"))));
                }
                let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
                if len > MAX_MESSAGE_BYTES {
                    return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                        "request of {len} bytes is larger than the {MAX_MESSAGE_BYTES} allowed"
                    )))));
                }
                if this.received.remaining() >= 5 + len {
                    this.received.advance(5);
                    let message = this.received.split_to(len);
                    let decoded = Req::decode(message).map_err(|e| Status::internal(format!("cannot decode the request: {e}")));
                    return Poll::Ready(Some(decoded));
                }
            }
            match this.body.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(mut data) = frame.into_data() {
                        let n = data.remaining();
                        this.received.push(data.copy_to_bytes(n));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Some(Err(Status::from_error(e.into()))));
                }
                Poll::Ready(None) if this.received.remaining() == 0 => return Poll::Ready(None),
                Poll::Ready(None) => {
                    return Poll::Ready(Some(Err(Status::internal("the request stream ended inside a message"))));
                }
                Poll::Pending => {
                    // Waiting for the rest of a message: hold its bytes, not
                    // the HTTP/2 read buffers its chunks are slices of (each
                    // pins up to 64 KiB; thousands of streams with a partial
                    // SotW ACK each had pinned gigabytes under churn).
                    this.received.compact();
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Received bytes as the chunks they arrived in, read as one [`bytes::Buf`]:
/// `copy_to_bytes` (prost's `bytes` fields) is a zero-copy slice when the
/// bytes lie in one chunk, a copy only across a chunk boundary.
#[derive(Debug, Default)]
pub struct ChunkedBuf {
    chunks: VecDeque<Bytes>,
    remaining: usize,
    /// The last `received` chunks are slices of someone else's buffers
    /// (received since the last `compact`).
    received: usize,
}

impl ChunkedBuf {
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.received += 1;
            self.remaining += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Copies the chunks received since the last call into one buffer of
    /// their own (the buffers they were slices of can go). Each byte is
    /// copied once: copying everything held each time had made a large
    /// message that arrives in many reads cost quadratic copying (the load
    /// generator spent ≈40% of its CPU there during a sync).
    fn compact(&mut self) {
        let fresh = self.received.min(self.chunks.len());
        self.received = 0;
        if fresh == 0 {
            return;
        }
        let start = self.chunks.len() - fresh;
        let len: usize = self.chunks.range(start..).map(Bytes::len).sum();
        let mut own = BytesMut::with_capacity(len);
        for chunk in self.chunks.drain(start..) {
            own.extend_from_slice(&chunk);
        }
        self.chunks.push_back(own.freeze());
    }

    /// The received bytes, chunk by chunk, in order.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks.iter().map(|c| &c[..])
    }

    /// The first five bytes (a gRPC message prefix), if received.
    pub fn peek_prefix(&self) -> Option<[u8; 5]> {
        if self.remaining < 5 {
            return None;
        }
        let mut out = [0u8; 5];
        let mut filled = 0;
        for chunk in &self.chunks {
            let n = chunk.len().min(5 - filled);
            out[filled..filled + n].copy_from_slice(&chunk[..n]);
            filled += n;
            if filled == 5 {
                break;
            }
        }
        Some(out)
    }

    /// The first `len` bytes, as their own buffer (the chunks are shared, not copied).
    pub fn split_to(&mut self, mut len: usize) -> ChunkedBuf {
        assert!(len <= self.remaining, "split past the end");
        let mut out = ChunkedBuf::default();
        while len > 0 {
            let front = self.chunks.front_mut().expect("remaining counts the chunks");
            if front.len() <= len {
                len -= front.len();
                self.remaining -= front.len();
                out.push(self.chunks.pop_front().expect("just seen"));
            } else {
                out.push(front.split_to(len));
                self.remaining -= len;
                len = 0;
            }
        }
        out
    }
}

impl bytes::Buf for ChunkedBuf {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map(|c| &c[..]).unwrap_or_default()
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end");
        self.remaining -= cnt;
        while cnt > 0 {
            let front = self.chunks.front_mut().expect("remaining counts the chunks");
            if front.len() <= cnt {
                cnt -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(cnt);
                cnt = 0;
            }
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(len <= self.remaining, "copy_to_bytes past the end");
        match self.chunks.front_mut() {
            Some(front) if front.len() >= len => {
                let out = front.split_to(len);
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                self.remaining -= len;
                out
            }
            _ => {
                let mut out = BytesMut::with_capacity(len);
                out.put(self.take(len));
                out.freeze()
            }
        }
    }
}

/// The body of a streaming gRPC response: each response's chunks as they
/// come (shared `Bytes`, handed to HTTP/2 as they are, which sends them as the
/// client's flow-control window allows — nothing is copied or buffered per
/// stream), then the trailers with the stream's final status.
pub struct GrpcResponseBody<R> {
    responses: OutgoingStream<R>,
    pending: VecDeque<Bytes>,
    /// The send-budget share of the response whose chunks `pending` holds:
    /// let go when HTTP/2 asks for more after its last chunk.
    share: Option<SendShare>,
    done: bool,
}

impl<R> GrpcResponseBody<R> {
    pub fn new(responses: OutgoingStream<R>) -> Self {
        GrpcResponseBody { responses, pending: VecDeque::new(), share: None, done: false }
    }
}

fn trailers(status: &Status) -> Frame<Bytes> {
    let mut headers = http::HeaderMap::new();
    if status.add_header(&mut headers).is_err() {
        headers.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    Frame::trailers(headers)
}

impl<R: WireMessage> http_body::Body for GrpcResponseBody<R> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(chunk) = this.pending.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        // HTTP/2 asks for more only once it has room again: the last
        // response's bytes are written, or all but the last send buffer's.
        this.share = None;
        if this.done {
            return Poll::Ready(None);
        }
        match this.responses.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(Outgoing { response, share }))) => {
                this.share = share;
                response.grpc_chunks(&mut this.pending);
                let chunk = this.pending.pop_front().expect("a message has at least its prefix");
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(Some(Err(status))) => {
                this.done = true;
                Poll::Ready(Some(Ok(trailers(&status))))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(Some(Ok(trailers(&Status::new(tonic::Code::Ok, "")))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_empty()
    }
}

/// Largest request accepted (gRPC's 4 MB default is too small for big meshes).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::resources::ResourceType;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use std::convert::Infallible;

    #[test]
    fn responses_encode_as_the_generated_messages() {
        let any = envoy_types::pb::google::protobuf::Any { type_url: "t".into(), value: vec![1, 2, 3] };
        let r = std::sync::Arc::new(super::super::resources::Resource::from_any("a", any.clone()));
        let sotw = SotwResponse {
            version_info: "v1".into(),
            type_url: ResourceType::Cluster.type_url(),
            nonce: "7".into(),
            resources: super::super::view::sotw_entries([&r].into_iter()),
            resource_count: 1,
        };
        let m = sotw.to_message();
        assert_eq!((m.version_info.as_str(), m.nonce.as_str(), m.resources.as_slice()), ("v1", "7", [any.clone()].as_slice()));
        assert_eq!(m.encoded_len(), sotw.encoded_len());
        let delta = DeltaResponse {
            system_version_info: "s".into(),
            type_url: ResourceType::Endpoint.type_url(),
            nonce: "8".into(),
            resources: super::super::view::delta_entries([&r].into_iter()),
            resource_count: 1,
            removed_resources: vec!["gone".into(), String::new()],
        };
        let m = delta.to_message();
        assert_eq!(m.removed_resources, ["gone", ""]);
        assert_eq!(m.resources[0].name, "a");
        assert_eq!(m.resources[0].resource.as_ref(), Some(&any));
        assert_eq!(m.encoded_len(), delta.encoded_len());
    }

    #[test]
    fn a_small_message_is_one_chunk_and_a_large_one_shares_its_entries() {
        let chunks = |resp: &DeltaResponse| {
            let mut out = VecDeque::new();
            resp.grpc_chunks(&mut out);
            out
        };
        let message = |chunks: &VecDeque<Bytes>| {
            let whole: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            assert_eq!(whole[0], 0, "not compressed");
            assert_eq!(u32::from_be_bytes(whole[1..5].try_into().unwrap()) as usize, whole.len() - 5);
            DeltaDiscoveryResponse::decode(&whole[5..]).unwrap()
        };
        let sized = |bytes: usize| {
            let any = envoy_types::pb::google::protobuf::Any { type_url: "t".into(), value: vec![7; bytes] };
            let r = std::sync::Arc::new(super::super::resources::Resource::from_any("a", any));
            DeltaResponse {
                system_version_info: "s".into(),
                type_url: ResourceType::Endpoint.type_url(),
                nonce: "9".into(),
                resources: super::super::view::delta_entries([&r].into_iter()),
                resource_count: 1,
                removed_resources: vec!["gone".into()],
            }
        };
        let small = sized(500);
        let one = chunks(&small);
        assert_eq!(one.len(), 1, "one DATA frame");
        assert_eq!(message(&one), small.to_message());
        let large = sized(COALESCE_UP_TO);
        let three = chunks(&large);
        assert_eq!(three.len(), 3);
        assert_eq!(three[1].as_ptr(), large.resources.as_ptr(), "the shared entries, not a copy");
        assert_eq!(message(&three), large.to_message());
    }

    #[tokio::test]
    async fn requests_split_across_frames_decode_and_a_large_one_leaves_no_buffer() {
        use futures::StreamExt;
        let req = DiscoveryRequest { resource_names: (0..5000).map(|i| format!("outbound|9080||svc-{i}")).collect(), ..Default::default() };
        let mut framed = vec![0u8];
        framed.extend((req.encoded_len() as u32).to_be_bytes());
        req.encode(&mut framed).unwrap();
        let twice = [framed.clone(), framed].concat();
        let chunks: Vec<Result<Frame<Bytes>, Infallible>> = twice.chunks(1000).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
        let mut requests = GrpcMessages::<_, DiscoveryRequest>::new(http_body_util::StreamBody::new(futures::stream::iter(chunks)));
        assert_eq!(requests.next().await.unwrap().unwrap(), req);
        assert_eq!(requests.next().await.unwrap().unwrap(), req);
        assert!(requests.next().await.is_none());
        assert_eq!(requests.received.chunks.len(), 0, "an idle stream keeps nothing it received");
        // Slices within one chunk are shared, across chunks copied; both read right.
        let mut buf = ChunkedBuf::default();
        let first = Bytes::from_static(b"abcdef");
        buf.push(first.clone());
        buf.push(Bytes::from_static(b"ghij"));
        use bytes::Buf;
        let ab = buf.copy_to_bytes(2);
        assert_eq!(&ab[..], b"ab");
        assert_eq!(ab.as_ptr(), first.as_ptr(), "zero-copy within a chunk");
        assert_eq!(&buf.copy_to_bytes(6)[..], b"cdefgh");
        buf.compact();
        assert_eq!((buf.chunks.len(), buf.remaining()), (1, 2), "compacted into one buffer of its own");
        let mut rest = buf.split_to(2);
        assert_eq!((rest.remaining(), buf.remaining()), (2, 0));
        assert_eq!(&rest.copy_to_bytes(2)[..], b"ij");
        // A message arriving over many reads: each compaction copies only
        // what came since the last one (what was compacted stays put).
        let mut growing = ChunkedBuf::default();
        growing.push(Bytes::from_static(b"abc"));
        growing.push(Bytes::from_static(b"de"));
        growing.compact();
        let kept = growing.chunks[0].as_ptr();
        growing.push(Bytes::from_static(b"fg"));
        growing.compact();
        growing.compact();
        assert_eq!(growing.chunks.len(), 2);
        assert_eq!(growing.chunks[0].as_ptr(), kept, "not copied again");
        assert_eq!(&growing.copy_to_bytes(7)[..], b"abcdefg");
        // While waiting for the rest of a message the server copies what it
        // has out of the read buffers.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        let mut partial = GrpcMessages::<_, DiscoveryRequest>::new(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let (head, tail) = twice.split_at(1000);
        let head = Bytes::copy_from_slice(head);
        tx.send(Ok(Frame::data(head.clone()))).await.unwrap();
        assert!(futures::poll!(partial.next()).is_pending());
        assert_ne!(partial.received.chunks[0].as_ptr(), head.as_ptr(), "compacted");
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(tail)))).await.unwrap();
        drop(tx);
        assert_eq!(partial.next().await.unwrap().unwrap(), req);
        assert_eq!(partial.next().await.unwrap().unwrap(), req);
        assert!(partial.next().await.is_none());
        // A compressed message is refused with a clear status.
        let chunk: Vec<Result<Frame<Bytes>, Infallible>> = vec![Ok(Frame::data(Bytes::from_static(&[1, 0, 0, 0, 0])))];
        let mut compressed = GrpcMessages::<_, DiscoveryRequest>::new(http_body_util::StreamBody::new(futures::stream::iter(chunk)));
        assert_eq!(compressed.next().await.unwrap().unwrap_err().code(), tonic::Code::Unimplemented);
    }
}
