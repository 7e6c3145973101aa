//! The file source (local mode): `DIR/<cluster>/` holds that cluster's
//! Kubernetes manifests (Service, EndpointSlice, Pod, Namespace; anything else
//! is skipped), `DIR/mesh/` the mesh objects (VirtualMesh, TrafficPolicy,
//! AccessControlPolicy, and Istio's Sidecar). Files are YAML (several documents allowed, `kind:
//! List` too) or JSON. The folder is watched; every change reloads it.
//!
//! Bad input never costs the last good configuration: a file that does not
//! parse keeps its last good contents (and the error is reported), and a
//! TrafficPolicy whose spec does not parse is still passed on, marked with
//! its errors, so it shows INVALID while its last accepted version serves.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use notify::{RecursiveMode, Watcher};
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::cluster_folder::ClusterFolder;
use crate::model::api::{
    AccessControlPolicySpec, ISTIO_NETWORKING_VERSIONS, NETWORKING_GROUP_VERSION, SidecarSpec, TrafficPolicySpec, VirtualMeshSpec,
};
use crate::model::k8s::{ClusterObjects, PodSummary};
use crate::model::{MeshInputs, PolicyObject};

/// The folder of mesh objects inside a config dir.
pub const MESH_DIR: &str = "mesh";

#[derive(Debug, thiserror::Error)]
pub enum ConfigDirError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0}: not a directory (expected DIR/<cluster>/*.yaml and DIR/mesh/*.yaml)")]
    NotADirectory(String),
}

type FileStamp = (u64, u64, std::time::SystemTime);

/// A folder's files, in order, each with its stamp when it has one.
type FileStamps = Vec<(PathBuf, Option<FileStamp>)>;

fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

/// What a reload must look at again: everything, or (from the watcher's
/// events) the folders whose entries changed and, in each, the manifest files
/// that did. A file nobody reported keeps its last stamp and parse without a
/// stat: with 3,000 files, stat-ing each on every reload had been a third of
/// an endpoint change's reload (docs/performance.md).
#[derive(Debug, Clone, Default)]
pub enum Changed {
    #[default]
    Everything,
    /// Folder name → the changed files in it; `None`: every file in it.
    Folders(HashMap<String, Option<std::collections::HashSet<PathBuf>>>),
}

impl Changed {
    /// What events with these paths (below `root`) changed. Anything but a
    /// file directly inside a folder of `root` (the folder itself, `root`,
    /// deeper paths) is everything; a hidden entry (an editor's swap file, a
    /// ConfigMap mount's `..data` link) is its whole folder; a file that is
    /// no manifest (`app.tmp` written before it is renamed to `app.yaml`) is
    /// nothing.
    pub fn of_paths<'a>(root: &Path, paths: impl IntoIterator<Item = &'a Path>) -> Changed {
        let mut folders: HashMap<String, Option<std::collections::HashSet<PathBuf>>> = HashMap::new();
        for path in paths {
            let Ok(relative) = path.strip_prefix(root) else { return Changed::Everything };
            let parts: Vec<_> = relative.components().collect();
            let [std::path::Component::Normal(folder), std::path::Component::Normal(file)] = parts[..] else {
                return Changed::Everything;
            };
            let (Some(folder), Some(file)) = (folder.to_str(), file.to_str()) else { return Changed::Everything };
            if file.starts_with('.') {
                folders.insert(folder.to_string(), None);
            } else if is_manifest(path)
                && let Some(files) = folders.entry(folder.to_string()).or_insert_with(|| Some(Default::default()))
            {
                files.insert(path.to_path_buf());
            }
        }
        Changed::Folders(folders)
    }

    /// Nothing a load reads changed: no reload is needed.
    pub fn is_nothing(&self) -> bool {
        matches!(self, Changed::Folders(folders) if folders.is_empty())
    }

    /// Whether `folder` may differ from its last load.
    fn folder(&self, folder: &str) -> bool {
        match self {
            Changed::Everything => true,
            Changed::Folders(folders) => folders.contains_key(folder),
        }
    }

    /// The files events named in `folder` (none when everything changed).
    fn files_in<'a>(&'a self, folder: &str) -> impl Iterator<Item = &'a Path> + 'a {
        let named = match self {
            Changed::Folders(folders) => folders.get(folder).and_then(Option::as_ref),
            Changed::Everything => None,
        };
        named.into_iter().flatten().map(PathBuf::as_path)
    }

    /// The files events named in `folder`, when they are all that changed in
    /// it (`None`: everything, or the whole folder).
    fn named_files(&self, folder: &str) -> Option<impl Iterator<Item = &Path> + Clone> {
        match self {
            Changed::Folders(folders) => folders.get(folder)?.as_ref().map(|files| files.iter().map(PathBuf::as_path)),
            Changed::Everything => None,
        }
    }

    /// Whether `file` in `folder` must be stat-ed again.
    fn file(&self, folder: &str, file: &Path) -> bool {
        match self {
            Changed::Everything => true,
            Changed::Folders(folders) => match folders.get(folder) {
                None => false,
                Some(None) => true,
                Some(Some(files)) => files.contains(file),
            },
        }
    }
}

/// One parsed file's objects.
#[derive(Debug, Clone, Default)]
struct FileObjects {
    cluster: ClusterObjects,
    traffic_policies: Vec<PolicyObject<TrafficPolicySpec>>,
    virtual_meshes: Vec<PolicyObject<VirtualMeshSpec>>,
    access_policies: Vec<PolicyObject<AccessControlPolicySpec>>,
    sidecars: Vec<PolicyObject<SidecarSpec>>,
}

impl FileObjects {
    /// Appends `other`'s objects (the cluster objects' `Arc`s, copies of the policies).
    fn extend_from(&mut self, other: &FileObjects) {
        self.cluster.services.extend(other.cluster.services.iter().cloned());
        self.cluster.endpoint_slices.extend(other.cluster.endpoint_slices.iter().cloned());
        self.cluster.pods.extend(other.cluster.pods.iter().cloned());
        self.cluster.namespaces.extend(other.cluster.namespaces.iter().cloned());
        self.traffic_policies.extend(other.traffic_policies.iter().cloned());
        self.virtual_meshes.extend(other.virtual_meshes.iter().cloned());
        self.access_policies.extend(other.access_policies.iter().cloned());
        self.sidecars.extend(other.sidecars.iter().cloned());
    }
}

/// What reading one folder's files gave: how many of them have objects in
/// the memory (a file that never parsed has none), and the errors, reported
/// again while the folder is kept (a broken file stays broken until an event
/// names it).
#[derive(Debug, Clone, Default)]
struct FolderRead {
    parsed: usize,
    /// Each broken file's message, by file, in file order.
    errors: Vec<(PathBuf, String)>,
}

impl FolderRead {
    fn messages(&self) -> impl Iterator<Item = String> + '_ {
        self.errors.iter().map(|(_, e)| e.clone())
    }
}

/// A cluster folder as last built: its files and their stamps, what reading
/// them gave, its state and the errors building it gave.
#[derive(Debug)]
struct BuiltCluster {
    built_from: FileStamps,
    read: FolderRead,
    state: Arc<crate::model::ClusterState>,
    state_errors: Vec<String>,
}

impl BuiltCluster {
    /// Puts this state in `inputs` as it is, with its errors again; returns
    /// how many of its files have objects in the memory.
    fn reuse(&self, name: &str, inputs: &mut MeshInputs) -> usize {
        inputs.errors.extend(self.read.messages().chain(self.state_errors.iter().cloned()));
        inputs.clusters.insert(name.to_string(), self.state.clone());
        self.read.parsed
    }
}

/// What the source remembers between loads: each file's last good parse,
/// when each policy was first seen (its age, when it has no
/// creationTimestamp) and its spec generations (when it has no generation).
#[derive(Debug, Default)]
pub struct SourceMemory {
    files: HashMap<PathBuf, FileObjects>,
    /// (inode, length, modification time) of each file when it last parsed:
    /// an unchanged file is not parsed again.
    stamps: HashMap<PathBuf, (u64, u64, std::time::SystemTime)>,
    /// Each cluster folder's state, its read errors and the stamps it was
    /// built from: a folder whose files did not change is not rebuilt.
    clusters: HashMap<String, BuiltCluster>,
    /// Per cluster folder, its objects as its files define them, in the
    /// cluster's builder (a rewritten file applies only what it changed).
    cluster_folders: HashMap<String, ClusterFolder>,
    first_seen_ms: HashMap<(String, String, String), i64>,
    generations: HashMap<(String, String, String), (String, i64)>,
    /// The mesh folder as last read: a reload no event of it named reuses its
    /// objects without listing, copying, hashing and ageing every policy again.
    mesh: Option<BuiltMesh>,
    /// The last load failed partway: the next looks at everything.
    incomplete: bool,
}

/// The mesh folder's last read: its files, what reading them gave, its
/// objects (aged and numbered), and its duplicate definitions' messages.
#[derive(Debug, Clone, Default)]
struct BuiltMesh {
    files: Vec<PathBuf>,
    read: FolderRead,
    objects: FileObjects,
    duplicates: Vec<String>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn is_manifest(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with('.') && matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

/// The paths of `dir`'s entries that `keep` accepts, sorted.
fn read_dir_sorted(dir: &Path, keep: impl Fn(&std::fs::DirEntry) -> bool) -> Result<Vec<PathBuf>, ConfigDirError> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ConfigDirError::Read { path: dir.display().to_string(), source })?
        .filter_map(|e| e.ok().filter(|e| keep(e)).map(|e| e.path()))
        .collect();
    out.sort();
    Ok(out)
}

/// `listed` (a folder's manifests as `read_dir` gave them) completed with
/// the manifests it should have shown: a file this source already knew
/// (`known`) or an event just named (`named`) that is still a manifest file
/// on disk. A listing taken while a file is replaced by a rename may leave
/// the file out (readdir is unspecified for entries renamed during it, and
/// tmpfs, where such a folder often lives, moves a renamed entry in its
/// list): under 100 edits a second one reload in a few had dropped a
/// service for a moment, sending every proxy its clusters without it and
/// then with it, and all their endpoints twice over. Sorted, no repeats.
fn complete_listing<'a>(
    mut listed: Vec<PathBuf>,
    known: impl IntoIterator<Item = &'a Path>,
    named: impl IntoIterator<Item = &'a Path>,
) -> Vec<PathBuf> {
    let mut missed: Vec<PathBuf> = known
        .into_iter()
        .chain(named)
        .filter(|f| listed.binary_search_by(|l| l.as_path().cmp(f)).is_err())
        .filter(|f| is_manifest_on_disk(f))
        .map(Path::to_path_buf)
        .collect();
    if missed.is_empty() {
        return listed;
    }
    tracing::debug!(files = ?missed, "a folder's listing left out files that are there; reading them too");
    listed.append(&mut missed);
    listed.sort();
    listed.dedup();
    listed
}

/// A folder's files after events named `named` in it, from its files
/// before them (`known`, sorted): a named file is in if it is a manifest file
/// on disk now, out if not; the others are as they were. No listing: a
/// cluster folder of 1,000 files had been listed, sorted and merged on every
/// reload for the one file an event named, and an event lost is a rescan
/// (everything looked at). Sorted, no repeats.
fn listing_after_events<'a>(mut known: Vec<PathBuf>, named: impl IntoIterator<Item = &'a Path>) -> Vec<PathBuf> {
    for f in named {
        let there = is_manifest_on_disk(f);
        match (known.binary_search_by(|k| k.as_path().cmp(f)), there) {
            (Err(at), true) => known.insert(at, f.to_path_buf()),
            (Ok(at), false) => {
                known.remove(at);
            }
            _ => {}
        }
    }
    known
}

/// A manifest file that is on disk now (a symlink followed).
fn is_manifest_on_disk(path: &Path) -> bool {
    is_manifest(path) && path.is_file()
}

/// A manifest file. The entry's type comes from the directory listing (no
/// stat), except for symlinks (Kubernetes mounts ConfigMaps as links), which
/// are followed.
fn is_manifest_file(entry: &std::fs::DirEntry) -> bool {
    let is_file = match entry.file_type() {
        Ok(t) if t.is_symlink() => entry.path().is_file(),
        Ok(t) => t.is_file(),
        Err(_) => false,
    };
    is_file && is_manifest(&entry.path())
}

/// Deserializes with the path of the offending field in the message.
fn typed<T: DeserializeOwned>(doc: &Value) -> Result<T, String> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." { inner } else { format!("{path}: {inner}") }
    })
}

fn documents(text: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(text) {
        let v = <Value as serde::Deserialize>::deserialize(de).map_err(|e| e.to_string())?;
        match v {
            Value::Null => {}
            Value::Object(ref m) if m.get("kind").and_then(Value::as_str) == Some("List") => {
                docs.extend(m.get("items").and_then(Value::as_array).cloned().unwrap_or_default());
            }
            other => docs.push(other),
        }
    }
    Ok(docs)
}

struct Meta {
    name: String,
    namespace: String,
    generation: Option<i64>,
    created_ms: Option<i64>,
}

fn meta_of(doc: &Value) -> Result<Meta, String> {
    let m = doc.get("metadata").ok_or("metadata: missing")?;
    let name = m.get("name").and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or("metadata.name: missing")?;
    let created_ms = match m.get("creationTimestamp").and_then(Value::as_str) {
        Some(t) => Some(
            t.parse::<k8s_openapi::jiff::Timestamp>()
                .map_err(|e| format!("metadata.creationTimestamp: {t:?} is not an RFC 3339 time ({e})"))?
                .as_millisecond(),
        ),
        None => None,
    };
    Ok(Meta {
        name: name.to_string(),
        namespace: m.get("namespace").and_then(Value::as_str).unwrap_or("default").to_string(),
        generation: m.get("generation").and_then(Value::as_i64),
        created_ms,
    })
}

/// Parses one file. `Err` means the file as a whole is unusable (its last good
/// contents are kept); per-policy spec errors travel inside the objects.
fn parse_file(path: &Path, in_mesh_dir: bool) -> Result<FileObjects, String> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
    let docs = documents(&text).map_err(|e| format!("{shown}: not valid YAML/JSON: {e}"))?;
    let mut out = FileObjects::default();
    for (i, doc) in docs.iter().enumerate() {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
        let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let what = |m: &str| format!("{shown}: document {} ({kind} {m})", i + 1);
        if kind.is_empty() || api_version.is_empty() {
            return Err(format!("{shown}: document {}: apiVersion and kind are required", i + 1));
        }
        let meta = meta_of(doc).map_err(|e| format!("{shown}: document {} ({kind}): {e}", i + 1))?;
        let id = format!("{}/{}", meta.namespace, meta.name);
        if in_mesh_dir {
            if !matches!(kind, "TrafficPolicy" | "VirtualMesh" | "AccessControlPolicy" | "Sidecar") {
                tracing::debug!(file = %shown, kind, "skipping an object meshpilot does not read in mesh/");
                continue;
            }
            let mut parse_errors = Vec::new();
            if kind == "Sidecar" {
                if !ISTIO_NETWORKING_VERSIONS.contains(&api_version) {
                    parse_errors.push(format!("apiVersion: {api_version:?} is not one of {}", ISTIO_NETWORKING_VERSIONS.join(", ")));
                }
            } else if api_version != NETWORKING_GROUP_VERSION {
                parse_errors.push(format!("apiVersion: {api_version:?} is not {NETWORKING_GROUP_VERSION}"));
            }
            let spec_doc = doc.get("spec").cloned().unwrap_or(Value::Object(Default::default()));
            macro_rules! policy {
                ($list:ident, $ty:ty) => {{
                    let spec: $ty = match typed::<$ty>(&spec_doc) {
                        Ok(s) => s,
                        Err(e) => {
                            parse_errors.push(format!("spec.{}", e.trim_start_matches('.')));
                            Default::default()
                        }
                    };
                    out.$list.push(PolicyObject {
                        namespace: meta.namespace.clone(),
                        name: meta.name.clone(),
                        generation: meta.generation,
                        created_ms: meta.created_ms.unwrap_or(i64::MIN),
                        origin: shown.clone(),
                        spec,
                        parse_errors: parse_errors.clone(),
                    });
                }};
            }
            match kind {
                "TrafficPolicy" => policy!(traffic_policies, TrafficPolicySpec),
                "VirtualMesh" => policy!(virtual_meshes, VirtualMeshSpec),
                "Sidecar" => policy!(sidecars, SidecarSpec),
                _ => policy!(access_policies, AccessControlPolicySpec),
            }
        } else {
            match (kind, api_version) {
                ("Service", "v1") => out.cluster.services.push(typed::<Service>(doc).map_err(|e| what(&format!("{id}): {e}")))?.into()),
                ("Pod", "v1") => out.cluster.pods.push(Arc::new(PodSummary::from(typed::<Pod>(doc).map_err(|e| what(&format!("{id}): {e}")))?))),
                ("Namespace", "v1") => out.cluster.namespaces.push(typed::<Namespace>(doc).map_err(|e| what(&format!("{id}): {e}")))?.into()),
                ("EndpointSlice", "discovery.k8s.io/v1") => {
                    out.cluster.endpoint_slices.push(typed::<EndpointSlice>(doc).map_err(|e| what(&format!("{id}): {e}")))?.into())
                }
                ("TrafficPolicy" | "VirtualMesh" | "AccessControlPolicy" | "Sidecar", _) => {
                    return Err(format!("{shown}: document {}: {kind} {id} belongs in {MESH_DIR}/, not in a cluster's folder", i + 1));
                }
                _ => tracing::debug!(file = %shown, kind, "skipping an object meshpilot does not read"),
            }
        }
    }
    Ok(out)
}

fn spec_hash(v: &impl serde::Serialize) -> String {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    // The first 8 bytes in hex, as the xDS versions are shown.
    format!("{:016x}", u64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes")))
}

/// Reads the whole folder into [`MeshInputs`].
pub fn load_config_dir(root: &Path, memory: &mut SourceMemory) -> Result<MeshInputs, ConfigDirError> {
    load_config_dir_changed(root, memory, &Changed::Everything)
}

/// [`load_config_dir`] after `changed`: a cluster folder nothing in it changed
/// keeps its last state without being listed, and a file nobody reported
/// keeps its last stamp without a stat. After a load that failed, the next
/// one looks at everything: the failed one may have parsed files into the
/// memory and stopped before the records of their folders (a cluster's
/// files, the mesh folder's objects) were brought up to date, and a later
/// load that trusts those records would keep serving what they say.
pub fn load_config_dir_changed(root: &Path, memory: &mut SourceMemory, changed: &Changed) -> Result<MeshInputs, ConfigDirError> {
    let everything = Changed::Everything;
    let changed = if memory.incomplete { &everything } else { changed };
    if memory.incomplete {
        // The failed load may have applied files to folders whose records it
        // did not bring up to date: every cluster folder is read and built
        // again (a folder kept without its builder would be read on its
        // records, which the builder had been ahead of).
        memory.cluster_folders.clear();
        memory.clusters.clear();
    }
    memory.incomplete = true;
    let loaded = load_config_dir_walk(root, memory, changed);
    memory.incomplete = loaded.is_err();
    loaded
}

fn load_config_dir_walk(root: &Path, memory: &mut SourceMemory, changed: &Changed) -> Result<MeshInputs, ConfigDirError> {
    if !root.is_dir() {
        return Err(ConfigDirError::NotADirectory(root.display().to_string()));
    }
    let mut inputs = MeshInputs::default();
    // The files this load covers that have objects in the memory, counted:
    // when the memory holds another number, it forgets the files no folder
    // has any more. (Collecting every path into a set on every reload had
    // been 3,000 copies and hashes for the one file an event named.)
    let mut seen_files = 0usize;
    // Cluster folders read now: their objects, files with stamps, and what reading them gave.
    let mut read_clusters: BTreeMap<String, (FileStamps, FolderRead)> = BTreeMap::new();
    // The mesh folder: kept as last read, or read now (its objects, files and what reading them gave).
    let mut mesh_kept = None;
    let mut mesh_read: Option<(FileObjects, BuiltMesh)> = None;
    for entry in read_dir_sorted(root, |_| true)? {
        let name = entry.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
        if name.starts_with('.') {
            continue;
        }
        if !entry.is_dir() {
            if is_manifest(&entry) {
                inputs.errors.push(format!("{}: files belong in DIR/<cluster>/ or DIR/{MESH_DIR}/; ignored", entry.display()));
            }
            continue;
        }
        let in_mesh = name == MESH_DIR;
        if in_mesh
            && !changed.folder(&name)
            && let Some(kept) = memory.mesh.take()
        {
            seen_files += kept.read.parsed;
            inputs.errors.extend(kept.read.messages());
            mesh_kept = Some(kept);
            continue;
        }
        if !in_mesh
            && !changed.folder(&name)
            && let Some(built) = memory.clusters.get(&name)
        {
            // No event in this cluster's folder: its last state stands, unlisted.
            seen_files += built.reuse(&name, &mut inputs);
            continue;
        }
        if !in_mesh
            && let Some(named) = changed.named_files(&name)
            && let Some(parsed) = reload_named_files(&name, named, memory, &mut inputs)
        {
            seen_files += parsed;
            continue;
        }
        let mut file_errors: Vec<(PathBuf, String)> = Vec::new();
        let files = match (changed.named_files(&name), memory.clusters.get(&name)) {
            (Some(named), Some(built)) => listing_after_events(built.built_from.iter().map(|(f, _)| f.to_path_buf()).collect(), named),
            (_, known) => {
                let known: Vec<&Path> = match known {
                    Some(built) => built.built_from.iter().map(|(f, _)| f.as_path()).collect(),
                    None => memory.files.keys().filter(|f| f.parent() == Some(entry.as_path())).map(PathBuf::as_path).collect(),
                };
                complete_listing(read_dir_sorted(&entry, is_manifest_file)?, known, changed.files_in(&name))
            }
        };
        // A file's stamp: taken again when an event named it, else the last one.
        let stamp_of = |stamps: &HashMap<PathBuf, FileStamp>, f: &PathBuf| match stamps.get(f) {
            Some(stamp) if !changed.file(&name, f) => Some(*stamp),
            _ => file_stamp(f),
        };
        // A cluster folder's files with their stamps (the mesh folder's are taken one by one).
        let cluster_stamps = if in_mesh {
            None
        } else {
            let stamps: FileStamps = files.iter().map(|f| (f.clone(), stamp_of(&memory.stamps, f))).collect();
            if let Some(built) = memory.clusters.get(&name)
                && built.built_from == stamps
                && stamps.iter().all(|(_, s)| s.is_some())
            {
                // Nothing in this cluster's folder changed: its last state stands.
                seen_files += built.reuse(&name, &mut inputs);
                continue;
            }
            Some(stamps)
        };
        // The mesh folder's objects are gathered; a cluster folder's go into its builder file by file.
        let mut objects = FileObjects::default();
        let kept_folder = if in_mesh { None } else { memory.cluster_folders.remove(&name) };
        // A folder kept from the last load has every file it read applied: only files parsed now change it.
        let fresh_folder = kept_folder.is_none();
        let mut folder = (!in_mesh).then(|| kept_folder.unwrap_or_else(|| ClusterFolder::new(&name)));
        // How many of the listed files the folder has applied: fewer than it has means some are gone.
        let mut applied_listed = 0;
        let mut parsed = 0;
        for (i, file) in files.iter().enumerate() {
            // Each file's stamp is taken once per reload (a stat per file:
            // with 3,000 files, stat-ing each three times had been most of a reload).
            let stamp = match &cluster_stamps {
                Some(stamps) => stamps[i].1,
                None => stamp_of(&memory.stamps, file),
            };
            let unchanged = stamp.is_some() && memory.stamps.get(file) == stamp.as_ref();
            // A changed file is parsed into the memory; every file's objects
            // are then read from there, not copied out first (that had been
            // a copy of every file's object lists of a changed folder).
            let mut changed = fresh_folder;
            if !(unchanged && memory.files.contains_key(file)) {
                match parse_into_memory(file, in_mesh, stamp, memory) {
                    Ok(_) => changed = true,
                    Err(message) => file_errors.push((file.clone(), message)),
                }
            }
            if let Some(file_objects) = memory.files.get_mut(file) {
                match folder.as_mut() {
                    Some(folder) => {
                        // The file keeps its objects as the folder does (an object
                        // rewritten unchanged stays the one the builder holds).
                        if changed && let Some(kept) = folder.set_file(file, Some(&file_objects.cluster)) {
                            file_objects.cluster = kept;
                        }
                        applied_listed += 1;
                    }
                    None => objects.extend_from(file_objects),
                }
                parsed += 1;
            }
        }
        if let Some(folder) = folder.as_mut()
            && folder.file_count() > applied_listed
        {
            // Files the folder no longer lists: their objects go.
            let listed: std::collections::HashSet<&Path> = files.iter().map(PathBuf::as_path).collect();
            for gone in folder.files_not(|f| listed.contains(f)) {
                folder.set_file(&gone, None);
            }
        }
        seen_files += parsed;
        let read = FolderRead { parsed, errors: file_errors };
        inputs.errors.extend(read.messages());
        match cluster_stamps {
            Some(built_from) => {
                memory.cluster_folders.insert(name.clone(), folder.expect("a cluster folder"));
                read_clusters.insert(name, (built_from, read));
            }
            None => mesh_read = Some((objects, BuiltMesh { files, read, ..Default::default() })),
        }
    }

    for (name, (built_from, read)) in read_clusters {
        let (state, state_errors) = memory.cluster_folders.get_mut(&name).expect("read above").build();
        inputs.errors.extend(state_errors.iter().cloned());
        inputs.clusters.insert(name.clone(), state.clone());
        memory.clusters.insert(name, BuiltCluster { built_from, read, state, state_errors });
    }
    memory.clusters.retain(|name, _| inputs.clusters.contains_key(name));
    memory.cluster_folders.retain(|name, _| inputs.clusters.contains_key(name));

    let (mesh_objects, duplicates) = match mesh_kept {
        Some(kept) => {
            let objects = kept.objects.clone();
            let duplicates = kept.duplicates.clone();
            memory.mesh = Some(kept);
            (objects, duplicates)
        }
        None => {
            let (read_objects, read) = mesh_read.unzip();
            let (objects, duplicates) = number_mesh_objects(read_objects.unwrap_or_default(), memory);
            memory.mesh = read.map(|read| BuiltMesh { objects: objects.clone(), duplicates: duplicates.clone(), ..read });
            (objects, duplicates)
        }
    };
    inputs.errors.extend(duplicates);
    if memory.files.len() != seen_files || memory.stamps.len() > seen_files {
        let covered: std::collections::HashSet<PathBuf> = memory
            .clusters
            .values()
            .flat_map(|built| built.built_from.iter().map(|(f, _)| f.clone()))
            .chain(memory.mesh.iter().flat_map(|m| m.files.iter().cloned()))
            .collect();
        memory.files.retain(|p, _| covered.contains(p));
        memory.stamps.retain(|p, _| covered.contains(p));
    }

    inputs.traffic_policies = mesh_objects.traffic_policies;
    inputs.virtual_meshes = mesh_objects.virtual_meshes;
    inputs.access_policies = mesh_objects.access_policies;
    inputs.sidecars = mesh_objects.sidecars;
    Ok(inputs)
}

/// Parses `file` into the memory with its stamp: Ok(whether the memory had
/// no parse of it before), or the message for a file that does not parse
/// (its last good parse, if any, stays).
fn parse_into_memory(file: &Path, in_mesh: bool, stamp: Option<FileStamp>, memory: &mut SourceMemory) -> Result<bool, String> {
    match parse_file(file, in_mesh) {
        Ok(parsed) => {
            if let Some(stamp) = stamp {
                memory.stamps.insert(file.to_path_buf(), stamp);
            }
            Ok(memory.files.insert(file.to_path_buf(), parsed).is_none())
        }
        Err(e) if memory.files.contains_key(file) => Err(format!("{e} (the file's last good contents keep serving)")),
        Err(e) => Err(e),
    }
}

/// A cluster folder read before in which events named only some files:
/// only those are looked at (stat-ed, and parsed when their stamp changed),
/// their objects' changes go into the folder's builder, and its records
/// (files and stamps, errors) are patched. None when the folder has no
/// records to patch (the caller then reads it whole). Returns how many of
/// the folder's files have objects in the memory.
fn reload_named_files<'a>(name: &str, named: impl Iterator<Item = &'a Path>, memory: &mut SourceMemory, inputs: &mut MeshInputs) -> Option<usize> {
    if !(memory.clusters.contains_key(name) && memory.cluster_folders.contains_key(name)) {
        return None;
    }
    let mut built = memory.clusters.remove(name).expect("checked");
    let mut folder = memory.cluster_folders.remove(name).expect("checked");
    for file in named {
        let at = built.built_from.binary_search_by(|(known, _)| known.as_path().cmp(file));
        if !is_manifest_on_disk(file) {
            // Gone (or no manifest any more): its objects go.
            if let Ok(at) = at {
                built.built_from.remove(at);
                built.read.errors.retain(|(f, _)| f != file);
                folder.set_file(file, None);
                if memory.files.remove(file).is_some() {
                    built.read.parsed -= 1;
                }
                memory.stamps.remove(file);
            }
            continue;
        }
        let stamp = file_stamp(file);
        let unchanged = stamp.is_some()
            && at.is_ok_and(|at| built.built_from[at].1 == stamp)
            && memory.stamps.get(file) == stamp.as_ref()
            && memory.files.contains_key(file);
        if unchanged {
            continue;
        }
        built.read.errors.retain(|(f, _)| f != file);
        match parse_into_memory(file, false, stamp, memory) {
            Ok(new) => {
                built.read.parsed += usize::from(new);
                let file_objects = memory.files.get_mut(file).expect("parsed into the memory");
                if let Some(kept) = folder.set_file(file, Some(&file_objects.cluster)) {
                    file_objects.cluster = kept;
                }
            }
            Err(message) => {
                let at = built.read.errors.partition_point(|(f, _)| f.as_path() < file);
                built.read.errors.insert(at, (file.to_path_buf(), message));
            }
        }
        match at {
            Ok(at) => built.built_from[at].1 = stamp,
            Err(at) => built.built_from.insert(at, (file.to_path_buf(), stamp)),
        }
    }
    let (state, state_errors) = folder.build();
    (built.state, built.state_errors) = (state, state_errors);
    let parsed = built.reuse(name, inputs);
    memory.clusters.insert(name.to_string(), built);
    memory.cluster_folders.insert(name.to_string(), folder);
    Some(parsed)
}

/// Gives the mesh objects that carry no age or generation (files rarely do)
/// the source's (first seen; one more per spec change), and drops a
/// TrafficPolicy defined twice but the first: the objects and a message per
/// duplicate.
fn number_mesh_objects(mut mesh_objects: FileObjects, memory: &mut SourceMemory) -> (FileObjects, Vec<String>) {
    // Age and generation for objects that do not carry them (files rarely do).
    let now = now_ms();
    let mut live = std::collections::HashSet::new();
    let mut fill = |kind: &str, namespace: &str, name: &str, created: &mut i64, generation: &mut Option<i64>, hash: String| {
        let key = (kind.to_string(), namespace.to_string(), name.to_string());
        let first = *memory.first_seen_ms.entry(key.clone()).or_insert(now);
        if *created == i64::MIN {
            *created = first;
        }
        if generation.is_none() {
            let entry = memory.generations.entry(key.clone()).or_insert((hash.clone(), 1));
            if entry.0 != hash {
                *entry = (hash, entry.1 + 1);
            }
            *generation = Some(entry.1);
        }
        live.insert(key);
    };
    let mut dupes = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for p in &mut mesh_objects.traffic_policies {
        if !ids.insert((p.namespace.clone(), p.name.clone())) {
            dupes.push(format!("{}: TrafficPolicy {}/{} is defined twice; the first definition is used", p.origin, p.namespace, p.name));
        }
        fill("TrafficPolicy", &p.namespace, &p.name, &mut p.created_ms, &mut p.generation, spec_hash(&p.spec));
    }
    for p in &mut mesh_objects.virtual_meshes {
        fill("VirtualMesh", &p.namespace, &p.name, &mut p.created_ms, &mut p.generation, spec_hash(&p.spec));
    }
    for p in &mut mesh_objects.access_policies {
        fill("AccessControlPolicy", &p.namespace, &p.name, &mut p.created_ms, &mut p.generation, spec_hash(&p.spec));
    }
    for p in &mut mesh_objects.sidecars {
        fill("Sidecar", &p.namespace, &p.name, &mut p.created_ms, &mut p.generation, spec_hash(&p.spec));
    }
    memory.first_seen_ms.retain(|k, _| live.contains(k));
    memory.generations.retain(|k, _| live.contains(k));
    let mut seen = std::collections::HashSet::new();
    mesh_objects.traffic_policies.retain(|p| seen.insert((p.namespace.clone(), p.name.clone())));
    (mesh_objects, dupes)
}

/// How long a reload waits after the one before it ended: none after a quiet
/// `pace`, else the rest of it. Pushes merge the changes of a burst anyway
/// (the debouncer's `quiet` and `max`); reloading back to back under 100
/// changes a second only burned a third of the control plane's CPU on states
/// no proxy was sent.
pub fn reload_delay(last_reload_end: Option<std::time::Instant>, now: std::time::Instant, pace: std::time::Duration) -> std::time::Duration {
    last_reload_end.map_or(std::time::Duration::ZERO, |end| (end + pace).saturating_duration_since(now))
}

/// What a watcher event asks of the reload thread.
#[derive(Debug, PartialEq)]
enum EventUse {
    Ignore,
    /// Look at these paths again.
    Paths(Vec<PathBuf>),
    /// Look at everything (an error, a rescan).
    Everything,
}

fn event_use(event: notify::Result<notify::Event>) -> EventUse {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    let event = match event {
        Ok(event) => event,
        Err(_) => return EventUse::Everything,
    };
    match event.kind {
        // A file written in place is whole once its writer closes it, not at
        // each write: the first is its truncation, and a reload then had
        // read a rewritten file half written, its services gone for a moment
        // (and their policies INVALID) until the next write's reload. (Linux
        // reports the close; elsewhere each write reloads, as before.)
        EventKind::Access(AccessKind::Close(AccessMode::Write)) if !event.paths.is_empty() => EventUse::Paths(event.paths),
        EventKind::Access(_) => EventUse::Ignore,
        EventKind::Modify(ModifyKind::Data(_)) if cfg!(target_os = "linux") => EventUse::Ignore,
        _ if !event.need_rescan() && !event.paths.is_empty() => EventUse::Paths(event.paths),
        _ => EventUse::Everything,
    }
}

/// Loads `root` now and on every change below it, handing each load to `apply`;
/// reloads are at least `pace` apart ([`reload_delay`]). Returns the watcher,
/// which must be kept alive.
pub fn watch_config_dir(
    root: PathBuf,
    memory: Arc<std::sync::Mutex<SourceMemory>>,
    pace: std::time::Duration,
    apply: impl Fn(MeshInputs) + Send + 'static,
) -> notify::Result<notify::RecommendedWatcher> {
    // Each event's paths, or None: look at everything (an error, a rescan).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<Vec<PathBuf>>>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event_use(event) {
        EventUse::Ignore => {}
        EventUse::Paths(paths) => {
            let _ = tx.send(Some(paths));
        }
        EventUse::Everything => {
            let _ = tx.send(None);
        }
    })?;
    watcher.watch(&root, RecursiveMode::Recursive)?;
    // Reloads are CPU work (parse, convert, translate-patch): they run on their
    // own thread, not on a runtime worker, so they never hold up the debouncer
    // or the streams (a task woken from a busy worker's task waits for it).
    std::thread::Builder::new().name("config-dir-reload".into()).spawn(move || {
        let mut last_reload_end = None;
        while let Some(first) = rx.blocking_recv() {
            let wait = reload_delay(last_reload_end, std::time::Instant::now(), pace);
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            let mut paths = first;
            while let Ok(more) = rx.try_recv() {
                paths = paths.zip(more).map(|(mut a, b)| {
                    a.extend(b);
                    a
                });
            }
            let changed = match &paths {
                Some(paths) => Changed::of_paths(&root, paths.iter().map(PathBuf::as_path)),
                None => Changed::Everything,
            };
            // (Nor does it count as a reload for the pace: a temporary file
            // written just before its rename had held the rename's reload
            // back by a whole pace, 100 ms of every single change.)
            if changed.is_nothing() {
                continue;
            }
            let started = std::time::Instant::now();
            let loaded = {
                let mut memory = memory.lock().expect("source memory lock");
                load_config_dir_changed(&root, &mut memory, &changed)
            };
            tracing::debug!(elapsed = ?started.elapsed(), "config dir reloaded");
            match loaded {
                Ok(inputs) => {
                    for e in &inputs.errors {
                        tracing::error!(error = %e, "config dir: bad input");
                    }
                    apply(inputs);
                }
                Err(err) => tracing::error!(error = %err, "config dir unreadable; the last good config keeps serving"),
            }
            last_reload_end = Some(std::time::Instant::now());
        }
    })?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str =
        "apiVersion: v1\nkind: Service\nmetadata: {name: reviews}\nspec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: r1, labels: {app: reviews, version: v1}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 127.0.0.9}\n";
    const POLICY: &str = "apiVersion: networking.zephyr.solo.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p, namespace: service-mesh-hub}\nspec:\n  destinationSelector: {serviceRefs: {services: [{cluster: c1, name: reviews, namespace: default}]}}\n  trafficShift: {destinations: [{destination: {cluster: c1, name: reviews, namespace: default}, weight: 1}]}\n";

    #[test]
    fn a_listing_that_left_out_a_replaced_or_new_file_is_completed_and_a_deleted_one_stays_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n);
        for name in ["a.yaml", "b.yaml", "c.yaml", "notes.txt"] {
            std::fs::write(path(name), SVC).unwrap();
        }
        // The listing missed b (known: being replaced) and c (new: an event named it);
        // gone.yaml was known but is deleted; notes.txt is no manifest.
        let listed = vec![path("a.yaml")];
        let known = [path("a.yaml"), path("b.yaml"), path("gone.yaml")];
        let named = [path("c.yaml"), path("notes.txt")];
        let completed = complete_listing(listed, known.iter().map(PathBuf::as_path), named.iter().map(PathBuf::as_path));
        assert_eq!(completed, vec![path("a.yaml"), path("b.yaml"), path("c.yaml")]);
        // A complete listing stays as it is.
        let whole = vec![path("a.yaml"), path("b.yaml")];
        assert_eq!(complete_listing(whole.clone(), known.iter().map(PathBuf::as_path), std::iter::empty()), whole);
    }

    #[test]
    fn a_folder_after_events_is_its_files_before_them_with_the_named_ones_looked_at() {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n);
        for name in ["a.yaml", "c.yaml", "d.yaml", "e.txt"] {
            std::fs::write(path(name), SVC).unwrap();
        }
        std::fs::create_dir(path("f.yaml")).unwrap();
        // b was deleted, d is new, a was rewritten; e.txt is no manifest and f.yaml no file.
        let known = vec![path("a.yaml"), path("b.yaml"), path("c.yaml")];
        let named = [path("b.yaml"), path("d.yaml"), path("e.txt"), path("a.yaml"), path("f.yaml")];
        let after = listing_after_events(known, named.iter().map(PathBuf::as_path));
        assert_eq!(after, vec![path("a.yaml"), path("c.yaml"), path("d.yaml")]);
    }

    #[test]
    fn a_reload_after_a_quiet_pace_is_at_once_and_one_within_it_waits_the_rest() {
        let (t0, pace) = (std::time::Instant::now(), std::time::Duration::from_millis(100));
        assert_eq!(reload_delay(None, t0, pace), std::time::Duration::ZERO, "the first reload");
        let ms = std::time::Duration::from_millis;
        assert_eq!(reload_delay(Some(t0), t0 + ms(30), pace), ms(70), "30 ms after the last one ended");
        assert_eq!(reload_delay(Some(t0), t0 + ms(100), pace), std::time::Duration::ZERO);
        assert_eq!(reload_delay(Some(t0), t0 + ms(250), pace), std::time::Duration::ZERO, "after a quiet spell");
        assert_eq!(reload_delay(Some(t0), t0 + ms(30), std::time::Duration::ZERO), std::time::Duration::ZERO, "unpaced");
    }

    #[test]
    fn reloads_run_on_their_own_thread_not_a_runtime_worker() {
        // Back-to-back reloads on a runtime worker had kept the debouncer (woken
        // into that worker's LIFO slot) from running for as long as files changed.
        let dir = setup();
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let _watcher = watch_config_dir(dir.path().to_path_buf(), Default::default(), std::time::Duration::ZERO, move |inputs| {
            let thread = std::thread::current().name().map(str::to_string);
            let _ = tx.lock().unwrap().send((thread, inputs.clusters.contains_key("c1")));
        })
        .unwrap();
        std::fs::write(dir.path().join("c1/app.yaml"), format!("{SVC}---\n{POD}# touched\n")).unwrap();
        let (thread, loaded) = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("a reload after the change");
        assert_eq!(thread.as_deref(), Some("config-dir-reload"));
        assert!(loaded);
    }

    #[test]
    fn a_file_rewritten_in_place_is_read_once_its_writer_closes_it_not_half_written() {
        use std::io::Write;
        let dir = setup();
        // Loaded once, then watched (as `serve` does).
        let memory = Arc::new(std::sync::Mutex::new(SourceMemory::default()));
        load_config_dir(dir.path(), &mut memory.lock().unwrap()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let _watcher = watch_config_dir(dir.path().to_path_buf(), memory, std::time::Duration::ZERO, move |inputs| {
            let c1 = &inputs.clusters["c1"];
            let names: Vec<String> = c1.services.values().map(|s| s.key.name.clone()).collect();
            let _ = tx.lock().unwrap().send((names, c1.endpoints.values().map(|eps| eps.len()).sum::<usize>()));
        })
        .unwrap();
        let next_load = || rx.recv_timeout(std::time::Duration::from_secs(20)).expect("a reload");
        // app.yaml rewritten in place: truncated, its Service written, the Pod not yet.
        let mut app = std::fs::File::create(dir.path().join("c1/app.yaml")).unwrap();
        app.write_all(format!("{SVC}---\n").as_bytes()).unwrap();
        app.flush().unwrap();
        // Another file, written whole, makes a reload happen meanwhile.
        std::fs::write(dir.path().join("c1/ratings.yaml"), SVC.replace("reviews", "ratings")).unwrap();
        loop {
            let (names, endpoints) = next_load();
            assert_eq!(endpoints, 1, "a reload saw app.yaml half written (its Pod gone)");
            if names.iter().any(|n| n == "ratings") {
                break;
            }
        }
        // The writer finishes (one more Pod than before) and closes: now
        // app.yaml is read, whole.
        let second = POD.replace("name: r1", "name: r2").replace("127.0.0.9", "127.0.0.10");
        app.write_all(format!("{POD}---\n{second}").as_bytes()).unwrap();
        drop(app);
        loop {
            let (names, endpoints) = next_load();
            assert_eq!(names.len(), 2);
            assert!(endpoints >= 1, "a reload saw app.yaml half written");
            if endpoints == 2 {
                break;
            }
        }
    }

    #[test]
    fn a_file_that_is_no_manifest_changes_nothing_and_costs_no_reload() {
        // (The reload thread skips such events, so a temporary file written
        // before its rename does not start the pace the rename then waits out.)
        let root = Path::new("/config");
        assert!(Changed::of_paths(root, [root.join("c1/app.tmp").as_path()]).is_nothing(), "no manifest");
        let renamed = Changed::of_paths(root, [root.join("c1/app.tmp").as_path(), root.join("c1/app.yaml").as_path()]);
        assert!(renamed.folder("c1") && !renamed.folder("c2") && !renamed.is_nothing());
        assert!(!Changed::of_paths(root, [root.join("c1/.swap").as_path()]).is_nothing(), "hidden: the whole folder");
        assert!(!Changed::of_paths(root, [root.join("c1").as_path()]).is_nothing(), "a folder: everything");
    }

    fn setup() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("c1")).unwrap();
        std::fs::create_dir_all(dir.path().join("mesh")).unwrap();
        std::fs::write(dir.path().join("c1/app.yaml"), format!("{SVC}---\n{POD}")).unwrap();
        std::fs::write(dir.path().join("mesh/p.yaml"), POLICY).unwrap();
        dir
    }

    #[test]
    fn reads_clusters_and_mesh_objects() {
        let dir = setup();
        let inputs = load_config_dir(dir.path(), &mut SourceMemory::default()).unwrap();
        assert!(inputs.errors.is_empty(), "{:?}", inputs.errors);
        assert_eq!(inputs.clusters["c1"].endpoints.values().map(|eps| eps.len()).sum::<usize>(), 1);
        assert_eq!(inputs.traffic_policies.len(), 1);
        assert_eq!(inputs.traffic_policies[0].generation, Some(1));
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_contents() {
        let dir = setup();
        let mut memory = SourceMemory::default();
        load_config_dir(dir.path(), &mut memory).unwrap();
        std::fs::write(dir.path().join("c1/app.yaml"), format!("{SVC}---\nkind: [unclosed")).unwrap();
        let inputs = load_config_dir(dir.path(), &mut memory).unwrap();
        assert_eq!(inputs.errors.len(), 1);
        assert!(inputs.errors[0].contains("c1/app.yaml") && inputs.errors[0].contains("last good contents keep serving"), "{:?}", inputs.errors);
        assert_eq!(inputs.clusters["c1"].services.len(), 1);
        assert_eq!(inputs.clusters["c1"].endpoints.values().map(|eps| eps.len()).sum::<usize>(), 1);
        // A typed error names the object and field.
        std::fs::write(dir.path().join("c1/app.yaml"), SVC.replace("port: 9080", "port: nine")).unwrap();
        let inputs = load_config_dir(dir.path(), &mut memory).unwrap();
        assert!(inputs.errors[0].contains("Service default/reviews") && inputs.errors[0].contains("spec.ports[0].port"), "{:?}", inputs.errors);
    }

    #[test]
    fn a_policy_spec_that_does_not_parse_is_passed_on_with_its_errors() {
        let dir = setup();
        let mut memory = SourceMemory::default();
        let first = load_config_dir(dir.path(), &mut memory).unwrap();
        std::fs::write(dir.path().join("mesh/p.yaml"), POLICY.replace("weight: 1", "wieght: 1")).unwrap();
        let inputs = load_config_dir(dir.path(), &mut memory).unwrap();
        let p = &inputs.traffic_policies[0];
        assert_eq!(p.parse_errors.len(), 1);
        assert!(
            p.parse_errors[0].starts_with("spec.trafficShift.destinations[0].wieght: unknown field `wieght`, expected one of"),
            "{:?}",
            p.parse_errors
        );
        assert_eq!(p.generation, Some(2), "a changed spec is a new generation");
        assert_eq!(p.created_ms, first.traffic_policies[0].created_ms, "age is kept across edits");
    }

    #[test]
    fn a_reload_after_events_looks_only_where_they_point() {
        let dir = setup();
        std::fs::create_dir_all(dir.path().join("c2")).unwrap();
        std::fs::write(dir.path().join("c2/app.yaml"), SVC).unwrap();
        let mut memory = SourceMemory::default();
        let first = load_config_dir(dir.path(), &mut memory).unwrap();
        let c1_app = dir.path().join("c1/app.yaml");
        let changed = |paths: &[PathBuf]| Changed::of_paths(dir.path(), paths.iter().map(PathBuf::as_path));
        // What events say: one file; a hidden entry is its whole folder; anything else is everything.
        match changed(&[c1_app.clone(), dir.path().join("c1/app.tmp")]) {
            Changed::Folders(f) => assert_eq!(f, HashMap::from([("c1".to_string(), Some([c1_app.clone()].into()))])),
            other => panic!("{other:?}"),
        }
        assert!(matches!(changed(&[dir.path().join("c1/..data")]), Changed::Folders(f) if f["c1"].is_none()));
        for path in [dir.path().join("c1"), dir.path().to_path_buf(), dir.path().join("c1/sub/x.yaml"), PathBuf::from("/elsewhere/c1/a.yaml")] {
            assert!(matches!(changed(std::slice::from_ref(&path)), Changed::Everything), "{path:?}");
        }
        // The named file is read again; the folder nothing named keeps its state (the same Arc).
        std::fs::write(&c1_app, SVC.replace("9080", "9081")).unwrap();
        let again = load_config_dir_changed(dir.path(), &mut memory, &changed(std::slice::from_ref(&c1_app))).unwrap();
        let port = |inputs: &MeshInputs| inputs.clusters["c1"].services.values().next().unwrap().ports[0].port;
        assert_eq!(port(&again), 9081);
        assert!(Arc::ptr_eq(&again.clusters["c2"], &first.clusters["c2"]));
        assert_eq!(again.traffic_policies.len(), 1, "the mesh folder keeps its objects");
        // A file removed is an event in its folder: it is gone.
        std::fs::remove_file(&c1_app).unwrap();
        let gone = load_config_dir_changed(dir.path(), &mut memory, &changed(std::slice::from_ref(&c1_app))).unwrap();
        assert!(gone.clusters["c1"].services.is_empty());
        assert!(!memory.files.contains_key(&c1_app) && !memory.stamps.contains_key(&c1_app), "the memory forgets it");
        assert!(memory.files.contains_key(&dir.path().join("c2/app.yaml")) && memory.files.contains_key(&dir.path().join("mesh/p.yaml")));
    }

    #[test]
    fn an_object_two_files_define_is_taken_from_the_first_by_path_until_it_drops_it() {
        let dir = setup();
        let path = |name: &str| dir.path().join("c1").join(name);
        let mut memory = SourceMemory::default();
        let first = load_config_dir(dir.path(), &mut memory).unwrap();
        let port = |inputs: &MeshInputs| inputs.clusters["c1"].services[&("default".to_string(), "reviews".to_string())].ports[0].port;
        let changed = |path: &PathBuf| Changed::of_paths(dir.path(), [path.as_path()]);
        // A file after app.yaml defines the same Service: app.yaml's stays, the other is reported.
        std::fs::write(path("other.yaml"), SVC.replace("9080", "9081")).unwrap();
        let twice = load_config_dir_changed(dir.path(), &mut memory, &changed(&path("other.yaml"))).unwrap();
        assert_eq!(port(&twice), 9080);
        assert!(Arc::ptr_eq(&twice.clusters["c1"], &first.clusters["c1"]), "nothing the cluster serves changed");
        assert_eq!(twice.errors.len(), 1, "{:?}", twice.errors);
        assert!(
            twice.errors[0].starts_with("Service default/reviews in cluster c1: defined in ")
                && twice.errors[0].contains("app.yaml and again in ")
                && twice.errors[0].contains("other.yaml"),
            "{:?}",
            twice.errors
        );
        // A file before app.yaml takes over at once, as a fresh read would have it.
        std::fs::write(path("a.yaml"), SVC.replace("9080", "9082")).unwrap();
        let before = load_config_dir_changed(dir.path(), &mut memory, &changed(&path("a.yaml"))).unwrap();
        assert_eq!(port(&before), 9082);
        let fresh = load_config_dir(dir.path(), &mut SourceMemory::default()).unwrap();
        assert_eq!(*before.clusters["c1"], *fresh.clusters["c1"]);
        assert_eq!(before.errors, fresh.errors);
        // The first files drop it: the last definition takes over, and nothing is reported.
        std::fs::remove_file(path("a.yaml")).unwrap();
        load_config_dir_changed(dir.path(), &mut memory, &changed(&path("a.yaml"))).unwrap();
        std::fs::write(path("app.yaml"), POD).unwrap();
        let taken_over = load_config_dir_changed(dir.path(), &mut memory, &changed(&path("app.yaml"))).unwrap();
        assert_eq!(port(&taken_over), 9081);
        assert!(taken_over.errors.is_empty(), "{:?}", taken_over.errors);
        // Its file removed, the Service is gone; the Pod stays.
        std::fs::remove_file(path("other.yaml")).unwrap();
        let gone = load_config_dir_changed(dir.path(), &mut memory, &changed(&path("other.yaml"))).unwrap();
        assert!(gone.clusters["c1"].services.is_empty());
        let fresh = load_config_dir(dir.path(), &mut SourceMemory::default()).unwrap();
        assert_eq!(*gone.clusters["c1"], *fresh.clusters["c1"]);
        // One file defining it twice: the first definition, reported.
        std::fs::write(path("app.yaml"), format!("{SVC}---\n{}", SVC.replace("9080", "9083"))).unwrap();
        let repeated = load_config_dir_changed(dir.path(), &mut memory, &changed(&path("app.yaml"))).unwrap();
        assert_eq!(port(&repeated), 9080);
        assert!(repeated.errors.len() == 1 && repeated.errors[0].contains("defined twice in"), "{:?}", repeated.errors);
        // Built again from the memory (as after a failed load), nothing parsed: reported still.
        memory.incomplete = true;
        let rebuilt = load_config_dir(dir.path(), &mut memory).unwrap();
        assert_eq!((port(&rebuilt), &rebuilt.errors), (9080, &repeated.errors));
    }

    #[test]
    fn a_file_rewritten_unchanged_keeps_the_objects_the_cluster_holds() {
        let dir = setup();
        let app = dir.path().join("c1/app.yaml");
        let mut memory = SourceMemory::default();
        let first = load_config_dir(dir.path(), &mut memory).unwrap();
        let held = |memory: &SourceMemory| memory.files[&app].cluster.services[0].clone();
        let service = held(&memory);
        // Rewritten with the same Service and a changed Pod: the Service parsed again is not kept twice.
        std::fs::write(&app, format!("{SVC}---\n{}", POD.replace("127.0.0.9", "127.0.0.8"))).unwrap();
        let again = load_config_dir_changed(dir.path(), &mut memory, &Changed::of_paths(dir.path(), [app.as_path()])).unwrap();
        assert!(Arc::ptr_eq(&service, &held(&memory)), "the memory holds the builder's Service, not its new parse");
        assert!(Arc::ptr_eq(
            &first.clusters["c1"].services[&("default".to_string(), "reviews".to_string())],
            &again.clusters["c1"].services[&("default".to_string(), "reviews".to_string())]
        ));
        assert_eq!(again.clusters["c1"].endpoints.values().next().unwrap()[0].address, "127.0.0.8");
    }

    #[test]
    fn a_reload_no_event_of_the_mesh_folder_named_keeps_its_objects_as_they_were_numbered() {
        let dir = setup();
        std::fs::write(dir.path().join("mesh/q-dupe.yaml"), POLICY).unwrap();
        let mut memory = SourceMemory::default();
        let first = load_config_dir(dir.path(), &mut memory).unwrap();
        let duplicate = |inputs: &MeshInputs| inputs.errors.iter().filter(|e| e.contains("defined twice")).count();
        assert_eq!(duplicate(&first), 1);
        let c1_app = dir.path().join("c1/app.yaml");
        let policy = dir.path().join("mesh/p.yaml");
        let changed = |path: &Path| Changed::of_paths(dir.path(), [path]);
        // The policy's file changes, but only an event in c1 is reported: the mesh folder is not read again.
        std::fs::write(&policy, POLICY.replace("weight: 1", "weight: 2")).unwrap();
        let kept = load_config_dir_changed(dir.path(), &mut memory, &changed(&c1_app)).unwrap();
        assert_eq!((&kept.traffic_policies, &kept.errors), (&first.traffic_policies, &first.errors));
        // Its own event: read, a new generation, the same age, the duplicate still reported once.
        let read = load_config_dir_changed(dir.path(), &mut memory, &changed(&policy)).unwrap();
        let (before, after) = (&first.traffic_policies[0], &read.traffic_policies[0]);
        assert_eq!(after.spec.traffic_shift.as_ref().unwrap().destinations[0].weight, 2);
        assert_eq!((after.generation, after.created_ms), (Some(2), before.created_ms));
        assert_eq!(duplicate(&read), 1);
        // Kept again after that: the numbered objects as last read.
        let again = load_config_dir_changed(dir.path(), &mut memory, &changed(&c1_app)).unwrap();
        assert_eq!((&again.traffic_policies, &again.errors), (&read.traffic_policies, &read.errors));
        assert_eq!(again.traffic_policies.len(), 1);
    }

    #[test]
    fn a_load_after_a_failed_one_looks_at_everything() {
        let dir = setup();
        let mut memory = SourceMemory::default();
        load_config_dir(dir.path(), &mut memory).unwrap();
        let c1_app = dir.path().join("c1/app.yaml");
        let changed = Changed::of_paths(dir.path(), [c1_app.as_path()]);
        // A load fails (here its root is gone); meanwhile the policy changes and no event names it.
        assert!(load_config_dir_changed(&dir.path().join("gone"), &mut memory, &changed).is_err());
        std::fs::write(dir.path().join("mesh/p.yaml"), POLICY.replace("weight: 1", "weight: 2")).unwrap();
        let after = load_config_dir_changed(dir.path(), &mut memory, &changed).unwrap();
        assert_eq!(after.traffic_policies[0].spec.traffic_shift.as_ref().unwrap().destinations[0].weight, 2);
        // Once a load succeeds, events are trusted again: an unnamed change waits for its event.
        std::fs::write(dir.path().join("mesh/p.yaml"), POLICY.replace("weight: 1", "weight: 3")).unwrap();
        let trusted = load_config_dir_changed(dir.path(), &mut memory, &changed).unwrap();
        assert_eq!(trusted.traffic_policies[0].spec.traffic_shift.as_ref().unwrap().destinations[0].weight, 2);
    }

    #[test]
    fn a_file_deleted_as_a_broken_one_is_added_is_forgotten() {
        let dir = setup();
        let mut memory = SourceMemory::default();
        load_config_dir(dir.path(), &mut memory).unwrap();
        let (app, broken) = (dir.path().join("c1/app.yaml"), dir.path().join("c1/broken.yaml"));
        let changed = |paths: &[&Path]| Changed::of_paths(dir.path(), paths.iter().copied());
        // One reload: app.yaml deleted, broken.yaml added and never parsed (the file count is the same).
        std::fs::remove_file(&app).unwrap();
        std::fs::write(&broken, "kind: [").unwrap();
        let gone = load_config_dir_changed(dir.path(), &mut memory, &changed(&[&app, &broken])).unwrap();
        assert!(gone.clusters["c1"].services.is_empty());
        assert!(!memory.files.contains_key(&app), "the memory forgets it");
        // app.yaml comes back broken: nothing of its deleted contents serves as "last good".
        std::fs::write(&app, "kind: [").unwrap();
        let back = load_config_dir_changed(dir.path(), &mut memory, &changed(&[&app])).unwrap();
        assert!(back.clusters["c1"].services.is_empty());
        assert!(back.errors.iter().any(|e| e.contains("app.yaml") && !e.contains("last good")), "{:?}", back.errors);
    }

    #[test]
    fn a_reload_of_named_files_agrees_with_a_full_read() {
        let dir = setup();
        let path = |name: &str| dir.path().join("c1").join(name);
        let mut memory = SourceMemory::default();
        load_config_dir(dir.path(), &mut memory).unwrap();
        let named = |memory: &mut SourceMemory, names: &[&str]| {
            let paths: Vec<PathBuf> = names.iter().map(|n| path(n)).collect();
            load_config_dir_changed(dir.path(), memory, &Changed::of_paths(dir.path(), paths.iter().map(PathBuf::as_path))).unwrap()
        };
        let agrees = |inputs: &MeshInputs| {
            let fresh = load_config_dir(dir.path(), &mut SourceMemory::default()).unwrap();
            assert_eq!(*inputs.clusters["c1"], *fresh.clusters["c1"]);
            assert_eq!(
                inputs.errors,
                fresh.errors.iter().map(|e| e.replace(" (the file's last good contents keep serving)", "")).collect::<Vec<_>>()
            );
        };
        // A new file, and app.yaml broken: its last good contents serve, and it is reported.
        std::fs::write(path("b.yaml"), SVC.replace("reviews", "ratings")).unwrap();
        std::fs::write(path("app.yaml"), "kind: [").unwrap();
        let broken = named(&mut memory, &["b.yaml", "app.yaml"]);
        assert_eq!(broken.clusters["c1"].services.len(), 2);
        assert!(broken.errors.len() == 1 && broken.errors[0].contains("app.yaml") && broken.errors[0].contains("last good"), "{:?}", broken.errors);
        // Named again, unchanged: still reported, once; then fixed, and reported no more.
        assert_eq!(named(&mut memory, &["app.yaml"]).errors, broken.errors);
        std::fs::write(path("app.yaml"), format!("{SVC}---\n{POD}")).unwrap();
        let fixed = named(&mut memory, &["app.yaml"]);
        assert!(fixed.errors.is_empty(), "{:?}", fixed.errors);
        agrees(&fixed);
        // b.yaml removed: as a full read has it.
        std::fs::remove_file(path("b.yaml")).unwrap();
        let removed = named(&mut memory, &["b.yaml"]);
        assert_eq!(removed.clusters["c1"].services.len(), 1);
        agrees(&removed);
    }

    #[test]
    fn a_broken_files_error_is_reported_while_it_stays_broken() {
        let dir = setup();
        std::fs::create_dir_all(dir.path().join("c2")).unwrap();
        std::fs::write(dir.path().join("c2/app.yaml"), SVC).unwrap();
        let broken = dir.path().join("c1/broken.yaml");
        std::fs::write(&broken, "kind: [").unwrap();
        let mut memory = SourceMemory::default();
        let broken_reported = |inputs: &MeshInputs| inputs.errors.iter().filter(|e| e.contains("broken.yaml")).count();
        assert_eq!(broken_reported(&load_config_dir(dir.path(), &mut memory).unwrap()), 1);
        // Reloads for events elsewhere, and in its folder for another file: still reported, once.
        for other in ["c2/app.yaml", "mesh/p.yaml", "c1/app.yaml"] {
            let changed = Changed::of_paths(dir.path(), [dir.path().join(other).as_path()]);
            assert_eq!(broken_reported(&load_config_dir_changed(dir.path(), &mut memory, &changed).unwrap()), 1, "after an event for {other}");
        }
        assert_eq!(broken_reported(&load_config_dir(dir.path(), &mut memory).unwrap()), 1, "after a full look");
    }

    #[test]
    fn misplaced_objects_are_reported() {
        let dir = setup();
        std::fs::write(dir.path().join("c1/policy.yaml"), POLICY).unwrap();
        std::fs::write(dir.path().join("stray.yaml"), SVC).unwrap();
        let inputs = load_config_dir(dir.path(), &mut SourceMemory::default()).unwrap();
        assert!(inputs.errors.iter().any(|e| e.contains("belongs in mesh/")), "{:?}", inputs.errors);
        assert!(inputs.errors.iter().any(|e| e.contains("stray.yaml") && e.contains("DIR/<cluster>/")), "{:?}", inputs.errors);
        assert!(matches!(load_config_dir(&dir.path().join("nope"), &mut SourceMemory::default()), Err(ConfigDirError::NotADirectory(_))));
    }
}
