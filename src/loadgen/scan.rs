//! The load generator's reader of xDS responses (sans-IO). It walks a gRPC
//! response body chunk by chunk as the chunks arrive and keeps only what a
//! simulated proxy reads: the response's version, type and nonce, the names
//! a delta response removes, the EDS clusters' names and the encoded
//! listeners (the proxy subscribes from them), and the change-marking
//! addresses in endpoint assignments. Everything else — most of the bytes:
//! the clusters' and assignments' bodies, the route configurations — is read
//! past, and each chunk is let go as soon as it has been read.
//!
//! (Assembling every 1–1.5 MB response whole, as prost views over the chunks,
//! had kept ≈8 GB of receive buffers alive at 10,000 proxies, and the
//! kernel's zeroing of fresh pages for them was over a quarter of the load
//! generator's CPU — on the two cores it shares with the control plane it
//! measures.)

use bytes::{Buf, Bytes};

use crate::xds::resources::ResourceType;
use crate::xds::wire::ChunkedBuf;

/// Which ADS response message the body carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `DiscoveryResponse` (state of the world).
    Sotw,
    /// `DeltaDiscoveryResponse`.
    Delta,
}

/// What a simulated proxy reads of one response.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ScannedResponse {
    /// `version_info` (SotW) or `system_version_info` (delta).
    pub version_info: String,
    pub type_url: String,
    pub nonce: String,
    /// Delta's `removed_resources`.
    pub removed_resources: Vec<String>,
    /// How many resources the response carried.
    pub resources: usize,
    /// The names of the EDS clusters among the resources, in order.
    pub eds_clusters: EdsClusterNames,
    /// The encoded listeners, in order (other types' bodies are not kept).
    pub listeners: Vec<Bytes>,
    /// Every `SocketAddress.address` in the endpoint assignments that starts with the marker prefix.
    pub marked_addresses: Vec<Bytes>,
    /// The message's size on the wire (without gRPC's 5-byte prefix).
    pub encoded_len: usize,
    /// Some route configuration here takes its virtual hosts over VHDS (its
    /// `vhds` field is set): Envoy then subscribes to them, and only then.
    pub routes_with_vhds: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScanError {
    #[error("compressed responses are not supported")]
    Compressed,
    #[error("malformed response: {0}")]
    Malformed(&'static str),
}

/// Where in a response the walk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Response,
    /// A delta `Resource` (its body is an `Any` inside).
    DeltaResource,
    /// A `google.protobuf.Any`: a SotW resource, or a delta resource's body.
    Any,
    /// A `RouteConfiguration`, walked past for its `vhds` field only.
    RouteConfig,
}

/// A field to be read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Version,
    TypeUrl,
    Nonce,
    Removed,
    AnyTypeUrl,
    /// The body of a resource of this type.
    Body(ResourceType),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Before a message: its 5-byte gRPC prefix.
    Prefix,
    /// At a field's key (or at the end of what is being read).
    Key,
    /// Reading past this many more bytes.
    Skipping(usize),
    /// Waiting until a whole field of this many bytes is here.
    Gathering(Target, usize),
}

/// See the module documentation. Feed it chunks with [`push`](Self::push)
/// and take completed responses with [`next_response`](Self::next_response).
pub struct ResponseScanner {
    flavor: Flavor,
    markers: memchr::memmem::Finder<'static>,
    received: ChunkedBuf,
    step: Step,
    /// Bytes of the current message read so far.
    pos: usize,
    /// What is being read, outermost first, each with where it ends in the message.
    levels: Vec<(Level, usize)>,
    /// The type of the `Any` being read, once its type URL has been.
    any_type: Option<ResourceType>,
    /// The type of the current message's first resource read whole (a
    /// response's resources are all of its type: a client rejects others).
    message_type: Option<ResourceType>,
    current: ScannedResponse,
    /// How many marked addresses the last response that had any carried.
    last_marked: usize,
}

impl ResponseScanner {
    /// `marker_prefix`: endpoint addresses starting with it are reported.
    pub fn new(flavor: Flavor, marker_prefix: &'static [u8]) -> Self {
        ResponseScanner {
            flavor,
            markers: memchr::memmem::Finder::new(marker_prefix),
            received: ChunkedBuf::default(),
            step: Step::Prefix,
            pos: 0,
            levels: Vec::new(),
            any_type: None,
            message_type: None,
            current: ScannedResponse::default(),
            last_marked: 0,
        }
    }

    pub fn push(&mut self, chunk: Bytes) {
        self.received.push(chunk);
    }

    /// Between messages, with nothing left over.
    pub fn is_idle(&self) -> bool {
        self.step == Step::Prefix && self.received.remaining() == 0
    }

    /// Reads on through what has arrived; a response once its last byte has.
    pub fn next_response(&mut self) -> Result<Option<ScannedResponse>, ScanError> {
        loop {
            match self.step {
                Step::Prefix => {
                    let Some(prefix) = self.received.peek_prefix() else { return Ok(None) };
                    self.discard(5);
                    if prefix[0] != 0 {
                        return Err(ScanError::Compressed);
                    }
                    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
                    self.pos = 0;
                    self.levels.clear();
                    self.levels.push((Level::Response, len));
                    self.current = ScannedResponse { encoded_len: len, ..Default::default() };
                    self.message_type = None;
                    self.step = Step::Key;
                }
                Step::Key => {
                    while let Some(&(level, end)) = self.levels.last() {
                        if self.pos < end {
                            break;
                        }
                        self.levels.pop();
                        if level == Level::Any {
                            self.any_type = None;
                        }
                    }
                    let Some(&(level, end)) = self.levels.last() else {
                        self.step = Step::Prefix;
                        if !self.current.marked_addresses.is_empty() {
                            self.last_marked = self.current.marked_addresses.len();
                        }
                        return Ok(Some(std::mem::take(&mut self.current)));
                    };
                    if level == Level::Response && self.whole_resource(end)? {
                        continue;
                    }
                    let Some((key, key_len)) = self.peek_varint(0)? else { return Ok(None) };
                    let (field, wire_type) = (key >> 3, key & 7);
                    match wire_type {
                        0 => {
                            let Some((_, value_len)) = self.peek_varint(key_len)? else { return Ok(None) };
                            self.discard(key_len + value_len);
                        }
                        1 | 5 => {
                            self.discard(key_len);
                            self.step = Step::Skipping(if wire_type == 1 { 8 } else { 4 });
                        }
                        2 => {
                            let Some((len, len_len)) = self.peek_varint(key_len)? else { return Ok(None) };
                            self.discard(key_len + len_len);
                            let len = len as usize;
                            if self.pos + len > end {
                                return Err(ScanError::Malformed("a field runs past what contains it"));
                            }
                            self.step = Step::Key;
                            match self.action(level, field) {
                                Action::Descend(inner) => {
                                    if level == Level::Response {
                                        self.current.resources += 1;
                                    }
                                    if inner == Level::Any {
                                        self.any_type = None;
                                    }
                                    self.levels.push((inner, self.pos + len));
                                }
                                Action::Gather(target) => self.step = Step::Gathering(target, len),
                                Action::Skip => self.step = Step::Skipping(len),
                                Action::NoteVhds => {
                                    self.current.routes_with_vhds = true;
                                    self.step = Step::Skipping(len);
                                }
                            }
                        }
                        _ => return Err(ScanError::Malformed("unsupported wire type")),
                    }
                    if self.pos > end {
                        return Err(ScanError::Malformed("a field runs past what contains it"));
                    }
                }
                Step::Skipping(n) => {
                    let k = n.min(self.received.remaining());
                    self.discard(k);
                    if k < n {
                        self.step = Step::Skipping(n - k);
                        return Ok(None);
                    }
                    self.step = Step::Key;
                }
                Step::Gathering(target, len) => {
                    if self.received.remaining() < len {
                        return Ok(None);
                    }
                    let bytes = self.take(len);
                    self.gathered(target, bytes)?;
                    self.step = Step::Key;
                }
            }
        }
    }

    fn action(&self, level: Level, field: u64) -> Action {
        match (level, self.flavor, field) {
            (Level::Response, _, 1) => Action::Gather(Target::Version),
            (Level::Response, Flavor::Sotw, 2) => Action::Descend(Level::Any),
            (Level::Response, Flavor::Delta, 2) => Action::Descend(Level::DeltaResource),
            (Level::Response, _, 4) => Action::Gather(Target::TypeUrl),
            (Level::Response, _, 5) => Action::Gather(Target::Nonce),
            (Level::Response, Flavor::Delta, 6) => Action::Gather(Target::Removed),
            (Level::DeltaResource, _, 2) => Action::Descend(Level::Any),
            (Level::Any, _, 1) => Action::Gather(Target::AnyTypeUrl),
            (Level::Any, _, 2) => match self.any_type {
                Some(ty @ (ResourceType::Cluster | ResourceType::Listener | ResourceType::Endpoint)) => Action::Gather(Target::Body(ty)),
                Some(ResourceType::Route) => Action::Descend(Level::RouteConfig),
                _ => Action::Skip,
            },
            (Level::RouteConfig, _, 9) => Action::NoteVhds,
            _ => Action::Skip,
        }
    }

    fn gathered(&mut self, target: Target, bytes: Bytes) -> Result<(), ScanError> {
        let text = |b: &Bytes| std::str::from_utf8(b).map(str::to_string).map_err(|_| ScanError::Malformed("a string field is not UTF-8"));
        match target {
            Target::Version => self.current.version_info = text(&bytes)?,
            Target::TypeUrl => self.current.type_url = text(&bytes)?,
            Target::Nonce => self.current.nonce = text(&bytes)?,
            Target::Removed => self.current.removed_resources.push(text(&bytes)?),
            Target::AnyTypeUrl => self.any_type = type_of(&bytes),
            Target::Body(ty) => self.read_body(ty, &bytes, &bytes),
        }
        Ok(())
    }

    /// What the proxy reads of a resource's body `value` (a slice of `owner`).
    fn read_body(&mut self, ty: ResourceType, value: &[u8], owner: &Bytes) {
        match ty {
            ResourceType::Cluster => {
                if let Some(name) = eds_name(value) {
                    self.current.eds_clusters.push(name);
                }
            }
            ResourceType::Listener => self.current.listeners.push(owner.slice_ref(value)),
            ResourceType::Endpoint => self.find_markers(value, owner),
            // (The first resource of a delta response, read before its type is known.)
            ResourceType::Route => self.current.routes_with_vhds |= config_has_vhds(value),
            _ => {}
        }
    }

    /// Each marker in `payload` (a slice of `owner`) that starts a
    /// `SocketAddress.address` field (key 0x12, then its length), taken
    /// whole: `10.200.0.5` is not reported inside `10.200.0.50`.
    fn find_markers(&mut self, payload: &[u8], owner: &Bytes) {
        for p in self.markers.find_iter(payload) {
            if p < 2 || payload[p - 2] != 0x12 {
                continue;
            }
            let end = p + payload[p - 1] as usize;
            if end <= payload.len() {
                if self.current.marked_addresses.capacity() == 0 {
                    // (As many as the last response had: a churn's responses
                    // carry dozens, and growing one by one was a reallocation
                    // every doubling.)
                    self.current.marked_addresses.reserve(self.last_marked.max(4));
                }
                self.current.marked_addresses.push(owner.slice_ref(&payload[p..end]));
            }
        }
    }

    /// The usual case, read straight from the first chunk: a whole resource
    /// is in it. `false` (nothing read) when it is not; the step by step
    /// walk then reads it.
    fn whole_resource(&mut self, end: usize) -> Result<bool, ScanError> {
        let mut buf = self.received.chunk();
        let whole = buf.len();
        let (Some(key), Some(len)) = (slice_varint(&mut buf), slice_varint(&mut buf)) else { return Ok(false) };
        let len = len as usize;
        if key != (2 << 3 | 2) || buf.len() < len {
            return Ok(false);
        }
        let head = whole - buf.len();
        if self.pos + head + len > end {
            return Err(ScanError::Malformed("a field runs past what contains it"));
        }
        // (Within the first chunk: a slice of it, not a copy.)
        let chunk = self.take(head + len).slice(head..);
        let resource = &chunk[..];
        let any = match (self.message_type, self.flavor) {
            // Most resources: assignments, read for markers only, and route
            // configurations, not read — no need to walk their fields.
            (Some(ResourceType::Endpoint), _) => {
                self.find_markers(resource, &chunk);
                None
            }
            (Some(ResourceType::Route), flavor) => {
                if !self.current.routes_with_vhds {
                    self.current.routes_with_vhds = route_has_vhds(resource, flavor);
                }
                None
            }
            (Some(ResourceType::VirtualHost), _) => None,
            (_, Flavor::Sotw) => Some(resource),
            (_, Flavor::Delta) => {
                let mut any = None;
                for field in Fields(resource) {
                    if let (2, Field::Bytes(b)) = field.ok_or(ScanError::Malformed("a resource does not parse"))? {
                        any = Some(b);
                    }
                }
                any
            }
        };
        if let Some(any) = any {
            let (mut type_url, mut value): (&[u8], &[u8]) = (&[], &[]);
            for field in Fields(any) {
                match field.ok_or(ScanError::Malformed("a resource does not parse"))? {
                    (1, Field::Bytes(b)) => type_url = b,
                    (2, Field::Bytes(b)) => value = b,
                    _ => {}
                }
            }
            let ty = type_of(type_url);
            self.message_type = self.message_type.or(ty);
            if let Some(ty) = ty {
                self.read_body(ty, value, &chunk);
            }
        }
        self.current.resources += 1;
        Ok(true)
    }

    /// A varint starting `offset` bytes into what is buffered: (value, its length), or `None` until it has all arrived.
    fn peek_varint(&self, offset: usize) -> Result<Option<(u64, usize)>, ScanError> {
        let mut value = 0u64;
        let mut skip = offset;
        let mut len = 0;
        for chunk in self.received.slices() {
            if skip >= chunk.len() {
                skip -= chunk.len();
                continue;
            }
            for &b in &chunk[skip..] {
                if len == 10 {
                    return Err(ScanError::Malformed("a varint longer than 10 bytes"));
                }
                value |= u64::from(b & 0x7f) << (7 * len);
                len += 1;
                if b & 0x80 == 0 {
                    return Ok(Some((value, len)));
                }
            }
            skip = 0;
        }
        Ok(None)
    }

    /// Drops `n` buffered bytes (all there).
    fn discard(&mut self, n: usize) {
        self.received.advance(n);
        self.pos += n;
    }

    /// Takes `n` buffered bytes (all there): a slice of the chunk when they are in one, else a copy.
    fn take(&mut self, n: usize) -> Bytes {
        self.pos += n;
        self.received.copy_to_bytes(n)
    }
}

/// The types whose bodies the simulated proxy reads, by type URL (compared as bytes).
fn type_of(type_url: &[u8]) -> Option<ResourceType> {
    [ResourceType::Endpoint, ResourceType::Cluster, ResourceType::Listener, ResourceType::Route, ResourceType::VirtualHost]
        .into_iter()
        .find(|t| t.type_url().as_bytes() == type_url)
}

/// A varint at the start of `buf` (advancing it), or `None` when `buf` ends first or it is too long.
fn slice_varint(buf: &mut &[u8]) -> Option<u64> {
    prost::encoding::decode_varint(buf).ok()
}

enum Action {
    Gather(Target),
    Descend(Level),
    Skip,
    /// A route configuration's `vhds`: noted, then skipped.
    NoteVhds,
}

/// Names, one after another in one buffer (each after its length as a
/// little-endian `u32`): a CDS response's EDS cluster names without a
/// `String` each. Equal lists are equal bytes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EdsClusterNames {
    bytes: Vec<u8>,
    count: usize,
}

impl EdsClusterNames {
    pub fn push(&mut self, name: &[u8]) {
        self.bytes.extend_from_slice(&(name.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(name);
        self.count += 1;
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The whole list as bytes (to hash or compare).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The names (a name that is not UTF-8 is read lossily).
    pub fn iter(&self) -> impl Iterator<Item = std::borrow::Cow<'_, str>> {
        let mut rest = &self.bytes[..];
        std::iter::from_fn(move || {
            let (len, tail) = rest.split_first_chunk::<4>()?;
            let (name, tail) = tail.split_at(u32::from_le_bytes(*len) as usize);
            rest = tail;
            Some(String::from_utf8_lossy(name))
        })
    }
}

/// The name a `Cluster` (encoded) asks EDS for — its `eds_cluster_config.service_name`,
/// else its own `name` — or `None` when it is not an EDS cluster or does not parse.
pub fn eds_name(cluster: &[u8]) -> Option<&[u8]> {
    const EDS: u64 = 3; // envoy.config.cluster.v3.Cluster.DiscoveryType.EDS
    let mut name: &[u8] = &[];
    let mut service_name: &[u8] = &[];
    let mut eds = false;
    for field in Fields(cluster) {
        match field? {
            (1, Field::Bytes(b)) => name = b,
            (2, Field::Varint(t)) => eds = t == EDS,
            (3, Field::Bytes(config)) => {
                for inner in Fields(config) {
                    if let (2, Field::Bytes(b)) = inner? {
                        service_name = b;
                    }
                }
            }
            _ => {}
        }
    }
    eds.then_some(if service_name.is_empty() { name } else { service_name })
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The fields of an encoded message; `None` once it does not parse.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Option<(u64, Field<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        let varint = slice_varint;
        if self.0.is_empty() {
            return None;
        }
        let mut buf = self.0;
        let parsed = (|| {
            let key = varint(&mut buf)?;
            let field = match key & 7 {
                0 => Field::Varint(varint(&mut buf)?),
                1 | 5 => {
                    buf = buf.get(if key & 7 == 1 { 8 } else { 4 }..)?;
                    Field::Fixed
                }
                2 => {
                    let len = usize::try_from(varint(&mut buf)?).ok()?;
                    let (bytes, rest) = (buf.get(..len)?, &buf[len..]);
                    buf = rest;
                    Field::Bytes(bytes)
                }
                _ => return None,
            };
            Some((key >> 3, field))
        })();
        self.0 = if parsed.is_some() { buf } else { &[] };
        Some(parsed)
    }
}

/// Scans whole gRPC-framed messages at once (tests and tools).
pub fn scan_all(flavor: Flavor, marker_prefix: &'static [u8], framed: &[u8]) -> Result<Vec<ScannedResponse>, ScanError> {
    let mut scanner = ResponseScanner::new(flavor, marker_prefix);
    scanner.push(Bytes::copy_from_slice(framed));
    let mut out = Vec::new();
    while let Some(r) = scanner.next_response()? {
        out.push(r);
    }
    Ok(out)
}

/// `message` with gRPC's 5-byte prefix.
pub fn grpc_framed(message: &impl prost::Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Whether a route configuration resource (SotW: an `Any`; delta: a
/// `Resource` holding one) has `vhds` (`RouteConfiguration` field 9).
fn route_has_vhds(resource: &[u8], flavor: Flavor) -> bool {
    fn field(message: &[u8], number: u64) -> Option<&[u8]> {
        Fields(message).find_map(|f| match f {
            Some((n, Field::Bytes(b))) if n == number => Some(b),
            _ => None,
        })
    }
    let any = match flavor {
        Flavor::Sotw => Some(resource),
        Flavor::Delta => field(resource, 2),
    };
    any.and_then(|a| field(a, 2)).is_some_and(config_has_vhds)
}

/// Whether an encoded `RouteConfiguration` has `vhds` (field 9).
fn config_has_vhds(config: &[u8]) -> bool {
    Fields(config).any(|f| matches!(f, Some((9, _))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::cluster::DiscoveryType;
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
    use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints, lb_endpoint};
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse, Resource};
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message;

    const MARK: &[u8] = b"10.200.";

    fn cluster(name: &str, ty: DiscoveryType, service_name: &str) -> Vec<u8> {
        use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster::ClusterDiscoveryType, cluster::EdsClusterConfig};
        Cluster {
            name: name.into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(ty as i32)),
            eds_cluster_config: Some(EdsClusterConfig { service_name: service_name.into(), ..Default::default() }),
            connect_timeout: Some(envoy_types::pb::google::protobuf::Duration { seconds: 10, nanos: 0 }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// A route configuration of about `size` bytes (a long name).
    fn route_config(size: usize) -> Vec<u8> {
        envoy_types::pb::envoy::config::route::v3::RouteConfiguration { name: "r".repeat(size), ..Default::default() }.encode_to_vec()
    }

    fn any(ty: ResourceType, value: Vec<u8>) -> Any {
        Any { type_url: ty.type_url().into(), value }
    }

    fn assignment(name: &str, addresses: &[&str]) -> Vec<u8> {
        ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: addresses
                    .iter()
                    .map(|a| LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(envoy_types::pb::envoy::config::endpoint::v3::Endpoint {
                            address: Some(Address {
                                address: Some(address::Address::SocketAddress(SocketAddress { address: a.to_string(), ..Default::default() })),
                            }),
                            ..Default::default()
                        })),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// Every way of cutting `framed` into two or three chunks scans the same.
    fn same_however_split(flavor: Flavor, framed: &[u8]) -> Vec<ScannedResponse> {
        let whole = scan_all(flavor, MARK, framed).unwrap();
        let step = (framed.len() / 97).max(1);
        for a in (0..framed.len()).step_by(step).chain([1, 2, 3, 4, 5, 6]) {
            for b in [a + 1, a + 7, a + 300] {
                let mut scanner = ResponseScanner::new(flavor, MARK);
                let mut got = Vec::new();
                for (from, to) in [(0, a), (a, b), (b, framed.len())] {
                    let (from, to) = (from.min(framed.len()), to.min(framed.len()));
                    scanner.push(Bytes::copy_from_slice(&framed[from..to]));
                    while let Some(r) = scanner.next_response().unwrap() {
                        got.push(r);
                    }
                }
                assert!(scanner.is_idle());
                assert_eq!(got, whole, "split at {a} and {b}");
            }
        }
        whole
    }

    #[test]
    fn state_of_the_world_responses_keep_clusters_and_listeners_and_report_markers() {
        let cds = DiscoveryResponse {
            version_info: "v1".into(),
            resources: vec![
                any(ResourceType::Cluster, cluster("a", DiscoveryType::Eds, "")),
                any(ResourceType::Cluster, cluster("b", DiscoveryType::StrictDns, "")),
                any(ResourceType::Cluster, cluster("c", DiscoveryType::Eds, "c-endpoints")),
            ],
            canary: true,
            type_url: ResourceType::Cluster.type_url().into(),
            nonce: "n1".into(),
            ..Default::default()
        };
        let eds = DiscoveryResponse {
            version_info: "v2".into(),
            resources: vec![
                any(ResourceType::Endpoint, assignment("a", &["10.0.0.1", "10.200.0.50", "10.200.0.5"])),
                any(ResourceType::Endpoint, assignment("b", &["10.200.1.7"])),
            ],
            type_url: ResourceType::Endpoint.type_url().into(),
            nonce: "n2".into(),
            ..Default::default()
        };
        let rds = DiscoveryResponse {
            version_info: "v3".into(),
            resources: vec![any(ResourceType::Route, route_config(100_000))],
            type_url: ResourceType::Route.type_url().into(),
            nonce: "n3".into(),
            ..Default::default()
        };
        let empty = DiscoveryResponse { type_url: ResourceType::Listener.type_url().into(), ..Default::default() };
        let framed = [grpc_framed(&cds), grpc_framed(&eds), grpc_framed(&rds), grpc_framed(&empty)].concat();
        let got = same_however_split(Flavor::Sotw, &framed);
        assert_eq!(got.len(), 4);
        assert_eq!((got[0].version_info.as_str(), got[0].nonce.as_str(), got[0].type_url.as_str()), ("v1", "n1", cds.type_url.as_str()));
        assert_eq!(got[0].eds_clusters.iter().collect::<Vec<_>>(), ["a", "c-endpoints"], "EDS clusters' names, not a DNS cluster's");
        assert_eq!((got[0].resources, got[0].encoded_len), (3, cds.encoded_len()));
        assert!(got[1].listeners.is_empty() && got[1].eds_clusters.is_empty(), "assignments are read past, not kept");
        assert_eq!(
            got[1].marked_addresses,
            [Bytes::from_static(b"10.200.0.50"), Bytes::from_static(b"10.200.0.5"), Bytes::from_static(b"10.200.1.7")]
        );
        assert_eq!((got[2].resources, got[2].listeners.len(), got[2].encoded_len), (1, 0, rds.encoded_len()));
        assert_eq!(got[3], ScannedResponse { type_url: empty.type_url.clone(), encoded_len: empty.encoded_len(), ..Default::default() });
    }

    #[test]
    fn delta_responses_keep_bodies_and_removed_names() {
        let resource = |name: &str, body: Any| Resource { name: name.into(), version: "1".into(), resource: Some(body), ..Default::default() };
        let lds = DeltaDiscoveryResponse {
            system_version_info: "s".into(),
            resources: vec![resource("l", any(ResourceType::Listener, b"listener".to_vec()))],
            type_url: ResourceType::Listener.type_url().into(),
            nonce: "7".into(),
            removed_resources: vec!["gone-1".into(), "gone-2".into()],
            ..Default::default()
        };
        let eds = DeltaDiscoveryResponse {
            resources: vec![resource("a", any(ResourceType::Endpoint, assignment("a", &["10.200.3.4"])))],
            type_url: ResourceType::Endpoint.type_url().into(),
            nonce: "8".into(),
            ..Default::default()
        };
        let framed = [grpc_framed(&lds), grpc_framed(&eds)].concat();
        let got = same_however_split(Flavor::Delta, &framed);
        assert_eq!(got[0].listeners, [Bytes::from_static(b"listener")]);
        assert_eq!(got[0].removed_resources, ["gone-1", "gone-2"]);
        assert_eq!((got[0].version_info.as_str(), got[0].nonce.as_str()), ("s", "7"));
        assert_eq!(got[1].marked_addresses, [Bytes::from_static(b"10.200.3.4")]);
    }

    #[test]
    fn route_configurations_with_vhds_are_told_apart_whichever_resource_comes_first() {
        use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, Vhds};
        let resource = |name: &str, body: Any| Resource { name: name.into(), version: "1".into(), resource: Some(body), ..Default::default() };
        let config = |vhds: bool| {
            RouteConfiguration {
                name: "9080".into(),
                vhds: vhds.then(|| Vhds { config_source: Some(crate::translate::proto::ads_config_source()) }),
                ..Default::default()
            }
            .encode_to_vec()
        };
        for (flavor, vhds) in [(Flavor::Delta, true), (Flavor::Delta, false), (Flavor::Sotw, true), (Flavor::Sotw, false)] {
            // One route configuration (a captured sidecar's only port): the
            // first resource, read before the response says its type.
            let framed = match flavor {
                Flavor::Delta => grpc_framed(&DeltaDiscoveryResponse {
                    resources: vec![resource("9080", any(ResourceType::Route, config(vhds)))],
                    type_url: ResourceType::Route.type_url().into(),
                    ..Default::default()
                }),
                Flavor::Sotw => grpc_framed(&DiscoveryResponse {
                    resources: vec![any(ResourceType::Route, config(vhds))],
                    type_url: ResourceType::Route.type_url().into(),
                    ..Default::default()
                }),
            };
            assert_eq!(same_however_split(flavor, &framed)[0].routes_with_vhds, vhds, "{flavor:?}");
        }
    }

    #[test]
    fn bad_input_is_refused_not_guessed_at() {
        assert_eq!(scan_all(Flavor::Sotw, MARK, &[1, 0, 0, 0, 0]), Err(ScanError::Compressed));
        // A resource claiming more bytes than its message has.
        let bad = [0, 0, 0, 0, 3, 0x12, 0x05, 0x0a];
        assert!(matches!(scan_all(Flavor::Sotw, MARK, &bad), Err(ScanError::Malformed(_))));
        // Unfinished: nothing yet, and not idle.
        let mut scanner = ResponseScanner::new(Flavor::Sotw, MARK);
        scanner.push(Bytes::from_static(&[0, 0, 0, 0, 4, 0x2a]));
        assert_eq!(scanner.next_response(), Ok(None));
        assert!(!scanner.is_idle());
    }

    #[test]
    fn chunks_already_read_are_let_go() {
        let rds = DiscoveryResponse {
            resources: vec![any(ResourceType::Route, route_config(50_000))],
            type_url: ResourceType::Route.type_url().into(),
            ..Default::default()
        };
        let framed = grpc_framed(&rds);
        let mut scanner = ResponseScanner::new(Flavor::Sotw, MARK);
        let first = Bytes::copy_from_slice(&framed[..16_384]);
        scanner.push(first.clone());
        assert_eq!(scanner.next_response(), Ok(None));
        assert!(first.is_unique(), "a route configuration's first chunk is not held while the rest arrives");
        scanner.push(Bytes::copy_from_slice(&framed[16_384..]));
        assert_eq!(scanner.next_response().unwrap().unwrap().resources, 1);
    }
}
