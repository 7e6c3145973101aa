//! One xDS resource (name, stable version, encoded body) and the types
//! meshpilot serves: what `view` (what a stream was sent) and `resources`
//! (the sets streams read) both build on, importing neither.

use std::sync::Arc;

use bytes::Bytes;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::codec;

/// The xDS resource types meshpilot serves, in make-before-break push order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ResourceType {
    Cluster,
    Endpoint,
    Listener,
    Route,
    /// VHDS: a route configuration's virtual hosts one by one, named
    /// `<route configuration>/<host>`, over delta ADS only (Envoy subscribes
    /// by the route configuration's name and gets every host under it).
    VirtualHost,
    Secret,
}

impl ResourceType {
    /// CDS → EDS → LDS → RDS → VHDS → SDS: the order of every push on ADS.
    pub const PUSH_ORDER: [ResourceType; 6] =
        [ResourceType::Cluster, ResourceType::Endpoint, ResourceType::Listener, ResourceType::Route, ResourceType::VirtualHost, ResourceType::Secret];

    /// The columns of `proxy-status`, in `istioctl proxy-status`'s order.
    /// VHDS is shown inside the RDS cell (it carries RDS's virtual hosts);
    /// SDS, as in istioctl, has no column (its NACKs are listed below the table).
    pub const STATUS_COLUMNS: [ResourceType; 4] = [ResourceType::Cluster, ResourceType::Listener, ResourceType::Endpoint, ResourceType::Route];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoint => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            ResourceType::VirtualHost => "type.googleapis.com/envoy.config.route.v3.VirtualHost",
            ResourceType::Secret => "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::PUSH_ORDER.into_iter().find(|t| t.type_url() == url)
    }

    /// The short name operators know from `istioctl proxy-status`.
    pub fn short_name(self) -> &'static str {
        match self {
            ResourceType::Cluster => "CDS",
            ResourceType::Endpoint => "EDS",
            ResourceType::Listener => "LDS",
            ResourceType::Route => "RDS",
            ResourceType::VirtualHost => "VHDS",
            ResourceType::Secret => "SDS",
        }
    }

    /// LDS and CDS responses carry the full state in SotW: an absent resource is deleted.
    pub fn requires_full_state(self) -> bool {
        matches!(self, ResourceType::Cluster | ResourceType::Listener)
    }

    /// Subscribed to by namespace (Envoy's `use_namespace_matching`): the
    /// name `X` stands for every resource named `X/<anything>`.
    pub fn namespaced(self) -> bool {
        self == ResourceType::VirtualHost
    }

    /// True when an explicit subscription to `names` covers the resource
    /// `name`: by its name, or for a namespaced type by its namespace.
    pub fn subscription_covers(self, names: &std::collections::BTreeSet<String>, name: &str) -> bool {
        names.contains(name) || (self.namespaced() && names.contains(namespace_of(name)))
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for ResourceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.short_name())
    }
}

/// One named resource, encoded once and shared (`Arc`) by every proxy that gets it.
#[derive(Clone, PartialEq)]
pub struct Resource {
    pub name: String,
    /// Content hash, stable across restarts (see [`codec::canonical_hash`]).
    pub version: String,
    /// The `google.protobuf.Any` holding the resource, encoded (what goes on the wire).
    encoded: Bytes,
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resource").field("name", &self.name).field("version", &self.version).field("bytes", &self.encoded.len()).finish()
    }
}

impl Resource {
    pub fn from_any(name: impl Into<String>, body: Any) -> Self {
        let version = codec::canonical_hash(&body);
        Resource { name: name.into(), version, encoded: Bytes::from(body.encode_to_vec()) }
    }

    pub fn from_message<M: Message + Name>(name: impl Into<String>, msg: &M) -> Self {
        Self::from_any(name, Any { type_url: M::type_url(), value: msg.encode_to_vec() })
    }

    /// The resource as an `Any` (decoded from its encoding: for dumps and tests, not the hot path).
    pub fn body(&self) -> Any {
        Any::decode(self.encoded.clone()).expect("a resource's encoding is an Any we encoded")
    }

    /// The encoded `Any`, shared.
    pub fn encoded_any(&self) -> &Bytes {
        &self.encoded
    }
}

/// The namespace of a namespaced resource name: what precedes its last `/`.
pub fn namespace_of(name: &str) -> &str {
    name.rsplit_once('/').map_or("", |(ns, _)| ns)
}

/// The version of a set of resources: a hash of their sorted names and versions.
/// Used as the SotW `version_info` and the delta `system_version_info`.
pub fn aggregate_version<'a>(resources: impl IntoIterator<Item = &'a Arc<Resource>>) -> String {
    // The bytes are gathered first and hashed in one call: four small
    // updates per resource had spent more in the hasher's buffering than in
    // hashing (3,100 assignments: most of a view's cost in an endpoint push).
    let resources = resources.into_iter();
    // (Sized for the usual name and version: growing by doubling had copied it all again.)
    let mut bytes = Vec::with_capacity(resources.size_hint().0 * 64 + 8);
    let mut count = 0u64;
    for r in resources {
        bytes.extend_from_slice(r.name.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(r.version.as_bytes());
        bytes.push(0);
        count += 1;
    }
    bytes.extend_from_slice(&count.to_le_bytes());
    codec::short_hex(&Sha256::digest(&bytes))
}
