//! The tonic services for ADS and the per-type discovery services (SotW and
//! delta on each), on the hand-written wire types: each routes a stream's
//! body to the server loop and streams its responses back.

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::NamedService;

use super::auth::StreamCredentials;
use super::delta::DeltaRequest;
use super::resources::ResourceType;
use super::server::XdsServer;
use super::sotw::SotwRequest;
use super::wire::{GrpcMessages, GrpcResponseBody};

/// Routes one discovery service's methods: `Stream*` is SotW, `Delta*` is
/// delta, anything else (the REST-style `Fetch*`) is unimplemented.
fn route<B>(server: XdsServer, only: Option<ResourceType>, req: http::Request<B>) -> BoxFuture<http::Response<tonic::body::Body>, Infallible>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    let method = req.uri().path().rsplit('/').next().unwrap_or_default().to_string();
    let credentials = StreamCredentials::from_headers(server.over_tls(), req.headers());
    Box::pin(async move {
        let body = req.into_body();
        let response_body = if method.starts_with("Stream") {
            let requests = Box::pin(GrpcMessages::<B, SotwRequest>::new(body));
            tonic::body::Body::new(GrpcResponseBody::new(server.stream_sotw(only, credentials, requests)))
        } else if method.starts_with("Delta") {
            let requests = Box::pin(GrpcMessages::<B, DeltaRequest>::new(body));
            tonic::body::Body::new(GrpcResponseBody::new(server.stream_delta(only, credentials, requests)))
        } else {
            let status = Status::unimplemented(format!("{method} is not served; use a gRPC stream (ADS recommended)"));
            return Ok(status.into_http());
        };
        let mut response = http::Response::new(response_body);
        response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        Ok(response)
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
discovery_service!(CdsService, "envoy.service.cluster.v3.ClusterDiscoveryService", Some(ResourceType::Cluster));
discovery_service!(EdsService, "envoy.service.endpoint.v3.EndpointDiscoveryService", Some(ResourceType::Endpoint));
discovery_service!(LdsService, "envoy.service.listener.v3.ListenerDiscoveryService", Some(ResourceType::Listener));
discovery_service!(RdsService, "envoy.service.route.v3.RouteDiscoveryService", Some(ResourceType::Route));
discovery_service!(SdsService, "envoy.service.secret.v3.SecretDiscoveryService", Some(ResourceType::Secret));
