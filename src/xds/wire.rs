//! The gRPC wire edge: discovery responses that carry already-encoded
//! resources (shared `Bytes` from a [`ResourceView`](super::view::ResourceView),
//! so a push costs one copy into the socket buffer per proxy, not an encode),
//! the codec that writes them, and the tonic services for ADS and the
//! per-type discovery services (SotW and delta on each).

use std::convert::Infallible;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService};

use super::resources::ResourceType;
use super::server::{ResponseStream, XdsServer};
use super::view::{put_string_field, string_field_len};

/// A message the server writes itself.
pub trait WireMessage: Send + 'static {
    fn encoded_len(&self) -> usize;
    fn encode_to(&self, buf: &mut impl BufMut);
    fn type_url(&self) -> &str;
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
    fn encoded_len(&self) -> usize {
        string_field_len(1, &self.version_info)
            + self.resources.len()
            + string_field_len(4, self.type_url)
            + string_field_len(5, &self.nonce)
    }

    fn encode_to(&self, buf: &mut impl BufMut) {
        put_string_field(1, &self.version_info, buf);
        buf.put_slice(&self.resources);
        put_string_field(4, self.type_url, buf);
        put_string_field(5, &self.nonce, buf);
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
    fn encoded_len(&self) -> usize {
        string_field_len(1, &self.system_version_info)
            + self.resources.len()
            + string_field_len(4, self.type_url)
            + string_field_len(5, &self.nonce)
            + self
                .removed_resources
                .iter()
                .map(|n| 1 + encoded_len_varint(n.len() as u64) + n.len())
                .sum::<usize>()
    }

    fn encode_to(&self, buf: &mut impl BufMut) {
        put_string_field(1, &self.system_version_info, buf);
        buf.put_slice(&self.resources);
        put_string_field(4, self.type_url, buf);
        put_string_field(5, &self.nonce, buf);
        for name in &self.removed_resources {
            // Repeated strings are written even when empty.
            encode_key(6, WireType::LengthDelimited, buf);
            encode_varint(name.len() as u64, buf);
            buf.put_slice(name.as_bytes());
        }
    }

    fn type_url(&self) -> &str {
        self.type_url
    }
}

/// Writes [`WireMessage`]s, reads prost requests.
pub struct XdsCodec<Resp, Req>(PhantomData<fn() -> (Resp, Req)>);

impl<Resp, Req> Default for XdsCodec<Resp, Req> {
    fn default() -> Self {
        XdsCodec(PhantomData)
    }
}

pub struct WireEncoder<Resp>(PhantomData<fn() -> Resp>);
pub struct ProstDecoder<Req>(PhantomData<fn() -> Req>);

impl<Resp: WireMessage> Encoder for WireEncoder<Resp> {
    type Item = Resp;
    type Error = Status;

    fn encode(&mut self, item: Resp, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.encoded_len());
        item.encode_to(dst);
        Ok(())
    }
}

impl<Req: Message + Default + Send + 'static> Decoder for ProstDecoder<Req> {
    type Item = Req;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Req>, Status> {
        Req::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("cannot decode the request: {e}")))
    }
}

impl<Resp: WireMessage, Req: Message + Default + Send + 'static> Codec for XdsCodec<Resp, Req> {
    type Encode = Resp;
    type Decode = Req;
    type Encoder = WireEncoder<Resp>;
    type Decoder = ProstDecoder<Req>;

    fn encoder(&mut self) -> Self::Encoder {
        WireEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder(PhantomData)
    }
}

/// Largest message accepted or sent (gRPC's 4 MB default is too small for big meshes).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

struct SotwMethod(XdsServer, Option<ResourceType>);

impl StreamingService<DiscoveryRequest> for SotwMethod {
    type Response = SotwResponse;
    type ResponseStream = ResponseStream<SotwResponse>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(
        &mut self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Self::Future {
        let (server, only) = (self.0.clone(), self.1);
        Box::pin(async move {
            Ok(tonic::Response::new(
                server.stream_sotw(only, request.into_inner()),
            ))
        })
    }
}

struct DeltaMethod(XdsServer, Option<ResourceType>);

impl StreamingService<DeltaDiscoveryRequest> for DeltaMethod {
    type Response = DeltaResponse;
    type ResponseStream = ResponseStream<DeltaResponse>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(
        &mut self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Self::Future {
        let (server, only) = (self.0.clone(), self.1);
        Box::pin(async move {
            Ok(tonic::Response::new(
                server.stream_delta(only, request.into_inner()),
            ))
        })
    }
}

/// Routes one discovery service's methods: `Stream*` is SotW, `Delta*` is
/// delta, anything else (the REST-style `Fetch*`) is unimplemented.
fn route<B>(
    server: XdsServer,
    only: Option<ResourceType>,
    req: http::Request<B>,
) -> BoxFuture<http::Response<tonic::body::Body>, Infallible>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    let method = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    Box::pin(async move {
        if method.starts_with("Stream") {
            let mut grpc = Grpc::new(XdsCodec::<SotwResponse, DiscoveryRequest>::default())
                .apply_max_message_size_config(Some(MAX_MESSAGE_BYTES), Some(MAX_MESSAGE_BYTES));
            Ok(grpc.streaming(SotwMethod(server, only), req).await)
        } else if method.starts_with("Delta") {
            let mut grpc = Grpc::new(XdsCodec::<DeltaResponse, DeltaDiscoveryRequest>::default())
                .apply_max_message_size_config(Some(MAX_MESSAGE_BYTES), Some(MAX_MESSAGE_BYTES));
            Ok(grpc.streaming(DeltaMethod(server, only), req).await)
        } else {
            let status = Status::unimplemented(format!(
                "{method} is not served; use a gRPC stream (ADS recommended)"
            ));
            Ok(status.into_http())
        }
    })
}

macro_rules! discovery_service {
    ($(#[$doc:meta])* $name:ident, $service:literal, $only:expr) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name(pub XdsServer);

        impl NamedService for $name {
            const NAME: &'static str = $service;
        }

        impl<B> Service<http::Request<B>> for $name
        where
            B: Body + Send + 'static,
            B::Error: Into<StdError> + Send + 'static,
        {
            type Response = http::Response<tonic::body::Body>;
            type Error = Infallible;
            type Future = BoxFuture<Self::Response, Self::Error>;

            fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, req: http::Request<B>) -> Self::Future {
                route(self.0.clone(), $only, req)
            }
        }
    };
}

discovery_service!(
    /// ADS: every type on one stream.
    AdsService, "envoy.service.discovery.v3.AggregatedDiscoveryService", None
);
discovery_service!(
    CdsService,
    "envoy.service.cluster.v3.ClusterDiscoveryService",
    Some(ResourceType::Cluster)
);
discovery_service!(
    EdsService,
    "envoy.service.endpoint.v3.EndpointDiscoveryService",
    Some(ResourceType::Endpoint)
);
discovery_service!(
    LdsService,
    "envoy.service.listener.v3.ListenerDiscoveryService",
    Some(ResourceType::Listener)
);
discovery_service!(
    RdsService,
    "envoy.service.route.v3.RouteDiscoveryService",
    Some(ResourceType::Route)
);
discovery_service!(
    SdsService,
    "envoy.service.secret.v3.SecretDiscoveryService",
    Some(ResourceType::Secret)
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_encode_as_the_generated_messages() {
        let any = envoy_types::pb::google::protobuf::Any {
            type_url: "t".into(),
            value: vec![1, 2, 3],
        };
        let r = std::sync::Arc::new(super::super::resources::Resource::from_any(
            "a",
            any.clone(),
        ));
        let sotw = SotwResponse {
            version_info: "v1".into(),
            type_url: ResourceType::Cluster.type_url(),
            nonce: "7".into(),
            resources: super::super::view::sotw_entries([&r].into_iter()),
            resource_count: 1,
        };
        let m = sotw.to_message();
        assert_eq!(
            (
                m.version_info.as_str(),
                m.nonce.as_str(),
                m.resources.as_slice()
            ),
            ("v1", "7", [any.clone()].as_slice())
        );
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
}
