//! Reflection over Envoy's protobuf types: proto3 JSON in and out, and a
//! canonical content hash.
//!
//! envoy-types has no serde support and its map fields are `HashMap`s, so its
//! wire encoding of a message with a multi-entry map depends on the process's
//! hash seed. Resource versions must be stable across restarts, so they are a
//! hash of a *canonical* walk of the encoded message (fields as prost writes
//! them, in number order; each map field's entries hashed separately and fed
//! sorted; `Any` payloads walked with their own type), guided by a table of
//! every message type's message, map and `Any` fields that `build.rs`
//! generates from the descriptor set envoy-types was generated from
//! (`proto/envoy-types-*.descriptor.bin`; [`hash_schema`]). The walk reads the
//! wire bytes; it does not decode into dynamic messages (that had cost more
//! than the translation it versioned), and it needs no descriptor pool: the
//! pool, decoded only for the JSON conversions, holds about 33 MiB.

use std::sync::LazyLock;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use sha2::{Digest, Sha256};

/// The file descriptor set shipped inside envoy-types 0.7.7 (`src/generated/types.bin`).
static DESCRIPTOR_SET: &[u8] = include_bytes!("../../proto/envoy-types-0.7.7.descriptor.bin");

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| DescriptorPool::decode(DESCRIPTOR_SET).expect("embedded Envoy descriptor set is valid"));

/// Errors converting between JSON and Envoy protobuf messages.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("unknown protobuf type {0:?} (not in Envoy's API)")]
    UnknownType(String),
    #[error("{type_name}: {source}")]
    Json {
        type_name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{type_name}: cannot decode protobuf: {source}")]
    Decode {
        type_name: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("missing \"@type\" in a JSON object that should be an Any")]
    MissingType,
}

/// The shared descriptor pool of every Envoy API type.
pub fn pool() -> &'static DescriptorPool {
    &POOL
}

fn type_name_of(type_url: &str) -> &str {
    type_url.rsplit_once('/').map(|(_, n)| n).unwrap_or(type_url)
}

fn descriptor(type_name: &str) -> Result<MessageDescriptor, CodecError> {
    pool().get_message_by_name(type_name).ok_or_else(|| CodecError::UnknownType(type_name.to_string()))
}

/// Parses proto3 JSON of the named message type into its wire encoding.
pub fn json_to_bytes(type_name: &str, json: &serde_json::Value) -> Result<Vec<u8>, CodecError> {
    let desc = descriptor(type_name)?;
    let msg = DynamicMessage::deserialize(desc, json).map_err(|source| CodecError::Json { type_name: type_name.to_string(), source })?;
    Ok(msg.encode_to_vec())
}

/// Parses a JSON object carrying `"@type"` (as Envoy's own configs do) into an `Any`.
pub fn json_to_any(json: &serde_json::Value) -> Result<Any, CodecError> {
    let type_url = json.get("@type").and_then(|t| t.as_str()).ok_or(CodecError::MissingType)?.to_string();
    let mut body = json.clone();
    if let Some(obj) = body.as_object_mut() {
        obj.remove("@type");
    }
    let value = json_to_bytes(type_name_of(&type_url), &body)?;
    Ok(Any { type_url, value })
}

/// Renders an `Any` as proto3 JSON with an `"@type"` field, as Envoy's config dump does.
pub fn any_to_json(any: &Any) -> Result<serde_json::Value, CodecError> {
    let type_name = type_name_of(&any.type_url);
    let desc = descriptor(type_name)?;
    let msg = DynamicMessage::decode(desc, any.value.as_slice()).map_err(|source| CodecError::Decode { type_name: type_name.to_string(), source })?;
    let mut json = serde_json::to_value(&msg).map_err(|source| CodecError::Json { type_name: type_name.to_string(), source })?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("@type".into(), serde_json::Value::String(any.type_url.clone()));
    }
    Ok(json)
}

/// A content hash of an `Any` that does not depend on map iteration order.
///
/// Returns the first 16 hex digits of a SHA-256 over the canonical walk. A
/// payload that does not decode (unknown type) is hashed as raw bytes.
pub fn canonical_hash(any: &Any) -> String {
    let mut hasher = Sha256::new();
    hash_any(&mut hasher, &any.type_url, &any.value);
    short_hex(&hasher.finalize())
}

/// The first 8 bytes of a digest as 16 hex digits (versions and hashes shown to users).
pub fn short_hex(digest: &[u8]) -> String {
    use std::fmt::Write;
    let mut hex = String::with_capacity(16);
    for b in &digest[..8] {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

fn hash_any(h: &mut Sha256, type_url: &str, bytes: &[u8]) {
    h.update(type_url.as_bytes());
    h.update([0]);
    match hash_schema::message(type_name_of(type_url)) {
        Some(shape) => {
            if hash_encoded(h, shape, bytes).is_err() {
                h.update(b"!");
                h.update(bytes);
            }
        }
        None => h.update(bytes),
    }
}

/// Not protobuf wire format (a truncated or malformed payload).
struct Malformed;

fn read_varint(bytes: &mut &[u8]) -> Result<u64, Malformed> {
    prost::encoding::decode_varint(bytes).map_err(|_| Malformed)
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], Malformed> {
    if bytes.len() < n {
        return Err(Malformed);
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

/// Hashes one encoded message by walking its wire format with its
/// descriptor, without decoding it into a dynamic message: scalar and string
/// fields are hashed as encoded (prost writes fields in number order, so
/// that part is already deterministic), sub-messages are walked, `Any`
/// payloads are walked with their own type, and the entries of each map field
/// are hashed separately and fed in sorted order.
fn hash_encoded(h: &mut Sha256, shape: &hash_schema::MessageShape, mut bytes: &[u8]) -> Result<(), Malformed> {
    // Map entries per field number, as digests, fed sorted at the end.
    let mut maps: Vec<(u32, [u8; 32])> = Vec::new();
    h.update(b"{");
    while !bytes.is_empty() {
        let key = read_varint(&mut bytes)?;
        let number = u32::try_from(key >> 3).map_err(|_| Malformed)?;
        let wire_type = key & 7;
        h.update(key.to_le_bytes());
        match wire_type {
            0 => {
                let v = read_varint(&mut bytes)?;
                h.update(v.to_le_bytes());
            }
            1 => h.update(take(&mut bytes, 8)?),
            5 => h.update(take(&mut bytes, 4)?),
            2 => {
                let len = usize::try_from(read_varint(&mut bytes)?).map_err(|_| Malformed)?;
                let payload = take(&mut bytes, len)?;
                match shape.field(number) {
                    Some(hash_schema::FieldShape::Map(entry)) => {
                        let mut sub = Sha256::new();
                        hash_encoded(&mut sub, hash_schema::at(entry), payload)?;
                        maps.push((number, sub.finalize().into()));
                    }
                    Some(hash_schema::FieldShape::Any) => {
                        h.update(b"A");
                        hash_any_encoded(h, payload)?;
                    }
                    Some(hash_schema::FieldShape::Message(inner)) => hash_encoded(h, hash_schema::at(inner), payload)?,
                    None => {
                        h.update((len as u64).to_le_bytes());
                        h.update(payload);
                    }
                }
            }
            _ => return Err(Malformed),
        }
    }
    maps.sort_unstable();
    for (number, digest) in maps {
        h.update(b"M");
        h.update(number.to_le_bytes());
        h.update(digest);
    }
    h.update(b"}");
    Ok(())
}

/// An encoded `google.protobuf.Any` inside another message: its payload is walked with its own type.
fn hash_any_encoded(h: &mut Sha256, mut bytes: &[u8]) -> Result<(), Malformed> {
    let (mut type_url, mut value): (&[u8], &[u8]) = (&[], &[]);
    while !bytes.is_empty() {
        let key = read_varint(&mut bytes)?;
        if key & 7 != 2 {
            return Err(Malformed);
        }
        let len = usize::try_from(read_varint(&mut bytes)?).map_err(|_| Malformed)?;
        let payload = take(&mut bytes, len)?;
        match key >> 3 {
            1 => type_url = payload,
            2 => value = payload,
            _ => return Err(Malformed),
        }
    }
    hash_any(h, std::str::from_utf8(type_url).map_err(|_| Malformed)?, value);
    Ok(())
}

/// What the canonical hash knows of Envoy's message types: static data that
/// `build.rs` generates from the descriptor set, sorted by name.
mod hash_schema {
    /// How a field that holds messages is hashed (every other field is hashed as encoded).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum FieldShape {
        /// A sub-message, walked with its own type (an index into `MESSAGES`).
        Message(u16),
        /// A map: its entries (of this type) are hashed one by one and fed sorted.
        Map(u16),
        /// A `google.protobuf.Any`: its payload is walked with the type it names.
        Any,
    }

    /// One message type: its full name and its message-holding fields, sorted by number.
    pub(super) struct MessageShape {
        pub(super) name: &'static str,
        pub(super) fields: &'static [(u32, FieldShape)],
    }

    impl MessageShape {
        pub(super) fn field(&self, number: u32) -> Option<FieldShape> {
            self.fields.binary_search_by_key(&number, |(n, _)| *n).ok().map(|i| self.fields[i].1)
        }
    }

    include!(concat!(env!("OUT_DIR"), "/hash_schema.rs"));

    /// The message type of this full name (with or without the leading `.`
    /// of a fully qualified name), if Envoy's API has it.
    pub(super) fn message(name: &str) -> Option<&'static MessageShape> {
        let name = name.strip_prefix('.').unwrap_or(name);
        MESSAGES.binary_search_by(|m| m.name.cmp(name)).ok().map(|i| &MESSAGES[i])
    }

    pub(super) fn at(index: u16) -> &'static MessageShape {
        &MESSAGES[usize::from(index)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value::Kind};
    use envoy_types::util::pack_any;
    use prost::Name;

    #[test]
    fn every_xds_resource_type_is_in_the_pool() {
        for name in [
            "envoy.config.cluster.v3.Cluster",
            "envoy.config.endpoint.v3.ClusterLoadAssignment",
            "envoy.config.listener.v3.Listener",
            "envoy.config.route.v3.RouteConfiguration",
            "envoy.extensions.transport_sockets.tls.v3.Secret",
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "envoy.extensions.filters.http.router.v3.Router",
        ] {
            assert!(pool().get_message_by_name(name).is_some(), "{name} missing");
        }
        assert_eq!(Cluster::full_name(), "envoy.config.cluster.v3.Cluster");
    }

    /// The walk's output is the version proxies hold across restarts and
    /// upgrades: pinned for a Cluster with a multi-entry map inside a nested
    /// `Any` (the value the descriptor-pool walk gave before the table).
    #[test]
    fn canonical_hashes_are_pinned() {
        let fields = ["a", "b", "c"].map(|k| (k.to_string(), PbValue { kind: Some(Kind::StringValue(k.repeat(3))) })).into_iter().collect();
        let mut typed_filter_metadata = std::collections::HashMap::new();
        typed_filter_metadata.insert("meshpilot".to_string(), pack_any(Struct { fields }));
        typed_filter_metadata.insert("other".to_string(), pack_any(Struct::default()));
        let cluster = Cluster {
            name: "outbound|9080||reviews.default.svc.cluster.local".into(),
            metadata: Some(Metadata { typed_filter_metadata, ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(canonical_hash(&pack_any(cluster.clone())), "dda43fcc08f0466c");
        // A fully qualified type name (leading `.`) is walked as the same type.
        let plain = hash_schema::message("envoy.config.cluster.v3.Cluster").expect("in the schema");
        assert!(std::ptr::eq(hash_schema::message(".envoy.config.cluster.v3.Cluster").expect("found with its dot"), plain));
        let dotted = |c: &Cluster| Any { type_url: "type.googleapis.com/.envoy.config.cluster.v3.Cluster".into(), value: c.encode_to_vec() };
        let mut reordered = cluster.clone();
        let entries: Vec<_> = reordered.metadata.as_mut().unwrap().typed_filter_metadata.drain().collect();
        reordered.metadata.as_mut().unwrap().typed_filter_metadata = entries.into_iter().rev().collect();
        assert_eq!(canonical_hash(&dotted(&cluster)), canonical_hash(&dotted(&reordered)));
    }

    /// The generated table classifies every field of every message exactly as
    /// the descriptor pool does, so the hash walks as it did with the pool.
    #[test]
    fn the_hash_schema_agrees_with_the_descriptor_pool() {
        use hash_schema::FieldShape;
        let mut messages = 0;
        let mut message_fields = 0;
        for desc in pool().all_messages() {
            let shape = hash_schema::message(desc.full_name()).unwrap_or_else(|| panic!("{} is not in the hash schema", desc.full_name()));
            for field in desc.fields() {
                let expected = match (field.is_map(), field.kind()) {
                    (true, prost_reflect::Kind::Message(entry)) => Some(format!("map {}", entry.full_name())),
                    (false, prost_reflect::Kind::Message(inner)) if inner.full_name() == "google.protobuf.Any" => Some("any".to_string()),
                    (false, prost_reflect::Kind::Message(inner)) => Some(format!("message {}", inner.full_name())),
                    _ => None,
                };
                let found = shape.field(field.number()).map(|f| match f {
                    FieldShape::Map(i) => format!("map {}", hash_schema::at(i).name),
                    FieldShape::Any => "any".to_string(),
                    FieldShape::Message(i) => format!("message {}", hash_schema::at(i).name),
                });
                assert_eq!(found, expected, "{}", field.full_name());
                message_fields += usize::from(expected.is_some());
            }
            messages += 1;
        }
        assert_eq!(messages, hash_schema::MESSAGES.len());
        assert_eq!(message_fields, hash_schema::MESSAGES.iter().map(|m| m.fields.len()).sum::<usize>());
        assert!(messages > 1000, "{messages} message types");
    }

    fn cluster_with_metadata(keys: &[&str]) -> Cluster {
        let fields = keys.iter().map(|k| (k.to_string(), PbValue { kind: Some(Kind::StringValue(format!("v-{k}"))) })).collect();
        let mut filter_metadata = std::collections::HashMap::new();
        filter_metadata.insert("istio".to_string(), Struct { fields });
        filter_metadata.insert("meshpilot".to_string(), Struct::default());
        Cluster {
            name: "outbound|9080||reviews.default.svc.cluster.local".into(),
            metadata: Some(Metadata { filter_metadata, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn canonical_hash_ignores_map_insertion_order() {
        let keys: Vec<String> = (0..32).map(|i| format!("key{i}")).collect();
        let forward: Vec<&str> = keys.iter().map(String::as_str).collect();
        let backward: Vec<&str> = forward.iter().rev().copied().collect();
        let a = canonical_hash(&pack_any(cluster_with_metadata(&forward)));
        let b = canonical_hash(&pack_any(cluster_with_metadata(&backward)));
        assert_eq!(a, b);
        let c = canonical_hash(&pack_any(cluster_with_metadata(&forward[1..])));
        assert_ne!(a, c, "different content must hash differently");
    }

    #[test]
    fn canonical_hash_walks_maps_inside_nested_any_payloads() {
        let with_struct = |keys: &[String]| {
            let fields = keys.iter().map(|k| (k.clone(), PbValue { kind: Some(Kind::NumberValue(k.len() as f64)) })).collect();
            let mut typed_filter_metadata = std::collections::HashMap::new();
            typed_filter_metadata.insert("meshpilot".to_string(), pack_any(Struct { fields }));
            pack_any(Cluster { name: "c".into(), metadata: Some(Metadata { typed_filter_metadata, ..Default::default() }), ..Default::default() })
        };
        let keys: Vec<String> = (0..32).map(|i| format!("k{i}")).collect();
        let backward: Vec<String> = keys.iter().rev().cloned().collect();
        assert_eq!(canonical_hash(&with_struct(&keys)), canonical_hash(&with_struct(&backward)));
        assert_ne!(canonical_hash(&with_struct(&keys)), canonical_hash(&with_struct(&keys[1..])));
        // Not wire format: hashed as bytes, still stable.
        let garbage = Any { type_url: Cluster::type_url(), value: vec![0xff, 0xff, 0xff] };
        assert_eq!(canonical_hash(&garbage), canonical_hash(&garbage.clone()));
    }

    #[test]
    fn json_round_trip_keeps_nested_any() {
        let json = serde_json::json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "l",
            "address": {"socketAddress": {"address": "127.0.0.1", "portValue": 1}},
            "filterChains": [{"filters": [{"name": "hcm", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "statPrefix": "x",
                "rds": {"routeConfigName": "1", "configSource": {"ads": {}, "resourceApiVersion": "V3"}}
            }}]}]
        });
        let any = json_to_any(&json).unwrap();
        let back = any_to_json(&any).unwrap();
        assert_eq!(back["filterChains"][0]["filters"][0]["typedConfig"]["statPrefix"], "x");
        assert_eq!(back["@type"], json["@type"]);
    }

    #[test]
    fn json_errors_name_the_type_and_field() {
        let json = serde_json::json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "nmae": "x"});
        let err = json_to_any(&json).unwrap_err().to_string();
        assert!(err.contains("envoy.config.cluster.v3.Cluster") && err.contains("nmae"), "{err}");
    }
}
