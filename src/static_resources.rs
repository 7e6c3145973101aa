//! A file of Envoy resources as a resource source: the small provider that
//! feeds the xDS server before (and besides) mesh translation.
//!
//! The file has the shape of Envoy's own filesystem subscriptions, in YAML or
//! JSON: `resources: [ {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", ...}, ... ]`.
//! Every proxy gets the same set. The file is watched; an edit that does not
//! parse is logged with its position and the last good set keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use notify::{RecursiveMode, Watcher};

use crate::xds::codec::{self, CodecError};
use crate::xds::provider::SharedResources;
use crate::xds::resources::{Resource, ResourceSet, ResourceType};

#[derive(Debug, thiserror::Error)]
pub enum ResourceFileError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: not valid YAML/JSON: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}: expected a top-level `resources:` list")]
    Shape { path: String },
    #[error("{path}: resources[{index}]: {source}")]
    Resource { path: String, index: usize, source: CodecError },
    #[error("{path}: resources[{index}]: type {type_url} is not an xDS resource type meshpilot serves")]
    NotServed { path: String, index: usize, type_url: String },
    #[error("{path}: resources[{index}]: missing `{field}`, the resource's name")]
    NoName { path: String, index: usize, field: &'static str },
    #[error("{path}: resources[{index}]: duplicate {ty} name {name:?}")]
    Duplicate { path: String, index: usize, ty: ResourceType, name: String },
}

fn name_of(ty: ResourceType, json: &serde_json::Value) -> Result<String, &'static str> {
    let keys: &[&str] = match ty {
        ResourceType::Endpoint => &["clusterName", "cluster_name"],
        _ => &["name"],
    };
    keys.iter().find_map(|k| json.get(*k).and_then(|v| v.as_str()).filter(|s| !s.is_empty())).map(str::to_string).ok_or(keys[0])
}

/// Parses a resource file's text; `path` is only used in messages.
pub fn parse_resources(text: &str, path: &str) -> Result<ResourceSet, ResourceFileError> {
    let doc: serde_json::Value =
        serde_yaml_ng::from_str(text).map_err(|e| ResourceFileError::Syntax { path: path.into(), message: e.to_string() })?;
    let list = match doc.get("resources") {
        Some(serde_json::Value::Array(list)) => list.as_slice(),
        None | Some(serde_json::Value::Null) if doc.is_null() => &[],
        _ => return Err(ResourceFileError::Shape { path: path.into() }),
    };
    let mut set = ResourceSet::new();
    for (index, item) in list.iter().enumerate() {
        let any = codec::json_to_any(item).map_err(|source| ResourceFileError::Resource { path: path.into(), index, source })?;
        let ty = ResourceType::from_type_url(&any.type_url).ok_or_else(|| ResourceFileError::NotServed {
            path: path.into(),
            index,
            type_url: any.type_url.clone(),
        })?;
        let name = name_of(ty, item).map_err(|field| ResourceFileError::NoName { path: path.into(), index, field })?;
        if set.get(ty, &name).is_some() {
            return Err(ResourceFileError::Duplicate { path: path.into(), index, ty, name });
        }
        set.insert(ty, Resource::from_any(name, any));
    }
    Ok(set)
}

pub fn load_resource_file(path: &Path) -> Result<ResourceSet, ResourceFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ResourceFileError::Read { path: path.display().to_string(), source })?;
    parse_resources(&text, &path.display().to_string())
}

/// Watches `path` and replaces the shared resources on every good edit.
/// Returns the watcher, which must be kept alive.
pub fn watch_resource_file(path: PathBuf, shared: Arc<SharedResources>) -> notify::Result<notify::RecommendedWatcher> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let file_name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && event.paths.iter().any(|p| p.file_name() == file_name.as_deref())
        {
            let _ = tx.send(());
        }
    })?;
    // Watch the directory: editors and `mv` replace the file rather than write it.
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            while rx.try_recv().is_ok() {}
            match load_resource_file(&path) {
                Ok(set) => {
                    tracing::info!(path = %path.display(), resources = set.len(), "resource file reloaded");
                    shared.set(set);
                }
                Err(err) => tracing::error!(error = %err, "resource file rejected; the last good resources keep serving"),
            }
        }
    });
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
resources:
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: backend
  type: EDS
  edsClusterConfig: {edsConfig: {ads: {}, resourceApiVersion: V3}}
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: backend
  endpoints:
  - lbEndpoints:
    - endpoint: {address: {socketAddress: {address: 127.0.0.1, portValue: 8080}}}
"#;

    #[test]
    fn parses_envoy_style_resource_lists() {
        let set = parse_resources(GOOD, "r.yaml").unwrap();
        assert!(set.get(ResourceType::Cluster, "backend").is_some());
        assert!(set.get(ResourceType::Endpoint, "backend").is_some());
        assert_eq!(parse_resources("", "r.yaml").unwrap().len(), 0);
    }

    #[test]
    fn errors_name_file_index_and_field() {
        let bad = GOOD.replace("type: EDS", "typo: EDS");
        let err = parse_resources(&bad, "r.yaml").unwrap_err().to_string();
        assert!(err.starts_with("r.yaml: resources[0]:") && err.contains("typo"), "{err}");
        let dup = format!("{GOOD}{}", &GOOD[GOOD.find("- \"@type\": type.googleapis.com/envoy.config.endpoint").unwrap()..]);
        let err = parse_resources(&dup, "r.yaml").unwrap_err().to_string();
        assert!(err.contains("resources[2]") && err.contains("duplicate EDS name \"backend\""), "{err}");
        let unnamed = "resources:\n- '@type': type.googleapis.com/envoy.config.listener.v3.Listener\n";
        let err = parse_resources(unnamed, "r.yaml").unwrap_err().to_string();
        assert!(err.contains("missing `name`"), "{err}");
        let err = parse_resources("resources: 3", "r.yaml").unwrap_err().to_string();
        assert!(err.contains("top-level `resources:` list"), "{err}");
    }
}
