//! Reflection over Envoy's protobuf types: proto3 JSON in and out, and a
//! canonical content hash.
//!
//! envoy-types has no serde support and its map fields are `HashMap`s, so its
//! wire encoding of a message with a multi-entry map depends on the process's
//! hash seed. Resource versions must be stable across restarts, so they are a
//! hash of a *canonical* walk of the message (fields by number, map entries by
//! key, `Any` payloads expanded), computed with the descriptor set that
//! envoy-types was generated from (`proto/envoy-types-*.descriptor.bin`).

use std::sync::LazyLock;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MapKey, MessageDescriptor, ReflectMessage, Value};
use sha2::{Digest, Sha256};

/// The file descriptor set shipped inside envoy-types 0.7.7 (`src/generated/types.bin`).
static DESCRIPTOR_SET: &[u8] = include_bytes!("../../proto/envoy-types-0.7.7.descriptor.bin");

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(DESCRIPTOR_SET).expect("embedded Envoy descriptor set is valid")
});


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
    pool()
        .get_message_by_name(type_name)
        .ok_or_else(|| CodecError::UnknownType(type_name.to_string()))
}

/// Parses proto3 JSON of the named message type into its wire encoding.
pub fn json_to_bytes(type_name: &str, json: &serde_json::Value) -> Result<Vec<u8>, CodecError> {
    let desc = descriptor(type_name)?;
    let msg = DynamicMessage::deserialize(desc, json).map_err(|source| CodecError::Json {
        type_name: type_name.to_string(),
        source,
    })?;
    Ok(msg.encode_to_vec())
}

/// Parses a JSON object carrying `"@type"` (as Envoy's own configs do) into an `Any`.
pub fn json_to_any(json: &serde_json::Value) -> Result<Any, CodecError> {
    let type_url = json
        .get("@type")
        .and_then(|t| t.as_str())
        .ok_or(CodecError::MissingType)?
        .to_string();
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
    let msg = DynamicMessage::decode(desc, any.value.as_slice()).map_err(|source| {
        CodecError::Decode {
            type_name: type_name.to_string(),
            source,
        }
    })?;
    let mut json = serde_json::to_value(&msg).map_err(|source| CodecError::Json {
        type_name: type_name.to_string(),
        source,
    })?;
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
    let digest = hasher.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn hash_any(h: &mut Sha256, type_url: &str, bytes: &[u8]) {
    h.update(type_url.as_bytes());
    h.update([0]);
    match pool().get_message_by_name(type_name_of(type_url)) {
        Some(desc) => match DynamicMessage::decode(desc, bytes) {
            Ok(msg) => hash_message(h, &msg),
            Err(_) => h.update(bytes),
        },
        None => h.update(bytes),
    }
}

fn hash_message(h: &mut Sha256, msg: &DynamicMessage) {
    if msg.descriptor().full_name() == "google.protobuf.Any" {
        let url = msg.get_field_by_number(1);
        let value = msg.get_field_by_number(2);
        if let (Some(url), Some(value)) = (url, value)
            && let (Value::String(url), Value::Bytes(value)) = (url.as_ref(), value.as_ref())
        {
            h.update(b"A");
            hash_any(h, url, value);
            return;
        }
    }
    let mut fields: Vec<_> = msg.fields().collect();
    fields.sort_by_key(|(f, _)| f.number());
    h.update(b"{");
    for (field, value) in fields {
        h.update(field.number().to_le_bytes());
        hash_value(h, value);
    }
    h.update(b"}");
}

fn hash_map_key(h: &mut Sha256, key: &MapKey) {
    match key {
        MapKey::Bool(b) => h.update([*b as u8]),
        MapKey::I32(v) => h.update(v.to_le_bytes()),
        MapKey::I64(v) => h.update(v.to_le_bytes()),
        MapKey::U32(v) => h.update(v.to_le_bytes()),
        MapKey::U64(v) => h.update(v.to_le_bytes()),
        MapKey::String(s) => {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes())
        }
    }
}

fn hash_value(h: &mut Sha256, value: &Value) {
    match value {
        Value::Bool(b) => h.update([b'b', *b as u8]),
        Value::I32(v) => h.update(v.to_le_bytes()),
        Value::I64(v) => h.update(v.to_le_bytes()),
        Value::U32(v) => h.update(v.to_le_bytes()),
        Value::U64(v) => h.update(v.to_le_bytes()),
        Value::F32(v) => h.update(v.to_bits().to_le_bytes()),
        Value::F64(v) => h.update(v.to_bits().to_le_bytes()),
        Value::String(s) => {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes())
        }
        Value::Bytes(b) => {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b)
        }
        Value::EnumNumber(v) => h.update(v.to_le_bytes()),
        Value::Message(m) => hash_message(h, m),
        Value::List(items) => {
            h.update(b"[");
            h.update((items.len() as u64).to_le_bytes());
            for item in items {
                hash_value(h, item);
            }
        }
        Value::Map(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            h.update(b"M");
            h.update((entries.len() as u64).to_le_bytes());
            for (k, v) in entries {
                hash_map_key(h, k);
                hash_value(h, v);
            }
        }
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

    fn cluster_with_metadata(keys: &[&str]) -> Cluster {
        let fields = keys
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    PbValue { kind: Some(Kind::StringValue(format!("v-{k}"))) },
                )
            })
            .collect();
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
