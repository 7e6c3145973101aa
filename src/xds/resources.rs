//! Typed xDS resources as the server hands them out: name, stable version and
//! encoded body, grouped per resource type.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use serde::Serialize;
use sha2::{Digest, Sha256};

use bytes::Bytes;

use super::codec;
use super::view::{NameSet, ResourceView, ViewCache, ViewKey};

/// The xDS resource types meshpilot serves, in make-before-break push order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ResourceType {
    Cluster,
    Endpoint,
    Listener,
    Route,
    Secret,
}

impl ResourceType {
    /// CDS → EDS → LDS → RDS → SDS: the order of every push on ADS.
    pub const PUSH_ORDER: [ResourceType; 5] = [
        ResourceType::Cluster,
        ResourceType::Endpoint,
        ResourceType::Listener,
        ResourceType::Route,
        ResourceType::Secret,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoint => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            ResourceType::Secret => {
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
            }
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
            ResourceType::Secret => "SDS",
        }
    }

    /// LDS and CDS responses carry the full state in SotW: an absent resource is deleted.
    pub fn requires_full_state(self) -> bool {
        matches!(self, ResourceType::Cluster | ResourceType::Listener)
    }

    fn index(self) -> usize {
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
        f.debug_struct("Resource")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("bytes", &self.encoded.len())
            .finish()
    }
}

impl Resource {
    pub fn from_any(name: impl Into<String>, body: Any) -> Self {
        let version = codec::canonical_hash(&body);
        Resource {
            name: name.into(),
            version,
            encoded: Bytes::from(body.encode_to_vec()),
        }
    }

    pub fn from_message<M: Message + Name>(name: impl Into<String>, msg: &M) -> Self {
        Self::from_any(
            name,
            Any {
                type_url: M::type_url(),
                value: msg.encode_to_vec(),
            },
        )
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

type ByName = BTreeMap<String, Arc<Resource>>;

/// Everything one proxy should have, per type, by name. Each type's map is
/// shared between copies until one of them changes it, and the views streams
/// take of it ([`ResourceSet::view`]) are computed once per set.
#[derive(Debug, Default, Clone)]
pub struct ResourceSet {
    by_type: [Arc<ByName>; 5],
    views: ViewCache,
}

impl PartialEq for ResourceSet {
    fn eq(&self, other: &Self) -> bool {
        self.by_type == other.by_type
    }
}

impl ResourceSet {
    pub fn new() -> Self {
        Self::default()
    }

    fn of_type_mut(&mut self, ty: ResourceType) -> &mut ByName {
        self.views = ViewCache::default();
        Arc::make_mut(&mut self.by_type[ty.index()])
    }

    pub fn insert(&mut self, ty: ResourceType, resource: Resource) {
        self.insert_shared(ty, Arc::new(resource));
    }

    pub fn insert_shared(&mut self, ty: ResourceType, resource: Arc<Resource>) {
        self.of_type_mut(ty).insert(resource.name.clone(), resource);
    }

    pub fn remove(&mut self, ty: ResourceType, name: &str) -> Option<Arc<Resource>> {
        self.of_type_mut(ty).remove(name)
    }

    pub fn of_type(&self, ty: ResourceType) -> &BTreeMap<String, Arc<Resource>> {
        &self.by_type[ty.index()]
    }

    pub fn get(&self, ty: ResourceType, name: &str) -> Option<&Arc<Resource>> {
        self.by_type[ty.index()].get(name)
    }

    pub fn len(&self) -> usize {
        self.by_type.iter().map(|m| m.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every resource of `ty` (`names: None`) or those of `names` that exist,
    /// computed once per set and subscription and shared by every stream that asks.
    pub fn view(&self, ty: ResourceType, names: Option<&NameSet>) -> Arc<ResourceView> {
        let all = self.of_type(ty);
        match names {
            None => self.views.get_or_compute(ViewKey::All(ty), || {
                ResourceView::new(all.values().cloned().collect())
            }),
            Some(names) => self
                .views
                .get_or_compute(ViewKey::Names(ty, names.clone()), || {
                    let picked = if names.len() * 4 < all.len() {
                        names.iter().filter_map(|n| all.get(n)).cloned().collect()
                    } else {
                        all.iter()
                            .filter(|(n, _)| names.contains(*n))
                            .map(|(_, r)| r.clone())
                            .collect()
                    };
                    ResourceView::new(picked)
                }),
        }
    }
}

/// The version of a set of resources: a hash of their sorted names and versions.
/// Used as the SotW `version_info` and the delta `system_version_info`.
pub fn aggregate_version<'a>(resources: impl IntoIterator<Item = &'a Arc<Resource>>) -> String {
    let mut hasher = Sha256::new();
    let mut count = 0u64;
    for r in resources {
        hasher.update(r.name.as_bytes());
        hasher.update([0]);
        hasher.update(r.version.as_bytes());
        hasher.update([0]);
        count += 1;
    }
    hasher.update(count.to_le_bytes());
    let digest = hasher.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;

    #[test]
    fn type_urls_round_trip_and_order_is_make_before_break() {
        for ty in ResourceType::PUSH_ORDER {
            assert_eq!(ResourceType::from_type_url(ty.type_url()), Some(ty));
        }
        assert_eq!(
            ResourceType::from_type_url("type.googleapis.com/nope"),
            None
        );
        let names: Vec<_> = ResourceType::PUSH_ORDER
            .iter()
            .map(|t| t.short_name())
            .collect();
        assert_eq!(names, ["CDS", "EDS", "LDS", "RDS", "SDS"]);
        assert_eq!(
            ResourceType::Cluster.type_url(),
            <Cluster as Name>::type_url(),
            "our type URL matches envoy-types'"
        );
    }

    #[test]
    fn same_content_same_version() {
        let c = Cluster {
            name: "a".into(),
            ..Default::default()
        };
        let a = Resource::from_message("a", &c);
        let b = Resource::from_message("a", &c.clone());
        assert_eq!(a.version, b.version);
        let c2 = Cluster {
            name: "b".into(),
            ..Default::default()
        };
        assert_ne!(a.version, Resource::from_message("a", &c2).version);
        let set1 = [Arc::new(a.clone())];
        let set2 = [Arc::new(b)];
        assert_eq!(aggregate_version(&set1), aggregate_version(&set2));
        assert_ne!(aggregate_version(&set1), aggregate_version(&[]));
    }
}
