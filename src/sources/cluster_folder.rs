//! A config-dir cluster folder's objects as its files define them, kept in
//! the cluster's [`ClusterBuilder`]: a rewritten file applies only the
//! objects it added, changed or dropped, so the reload of one endpoint
//! change builds one service again, not the cluster.
//!
//! An object two files define (the same kind, namespace and name) is taken
//! from the first of them by path, as a fresh read would; the other
//! definitions are reported and ignored until that file drops it. An object
//! one file defines twice: its first definition, reported.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::model::ClusterState;
use crate::model::cluster_build::{ClusterBuilder, ClusterObject, Kind, ObjectId};
use crate::model::k8s::ClusterObjects;

fn shown((kind, (ns, name)): &ObjectId) -> String {
    match kind {
        Kind::Namespace => format!("Namespace {name}"),
        _ => format!("{kind:?} {ns}/{name}"),
    }
}

/// A file's objects by kind and key, in the file's order; a key the file
/// repeats keeps its first definition (the others are in `repeated`).
fn keyed(objects: &ClusterObjects, mut repeated: Option<&mut Vec<(ObjectId, ClusterObject)>>) -> Vec<(ObjectId, ClusterObject)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for object in objects.objects() {
        let Some(id) = object.id() else { continue };
        if seen.insert(id.clone()) {
            out.push((id, object));
        } else if let Some(repeated) = repeated.as_deref_mut() {
            repeated.push((id, object));
        }
    }
    out
}

/// See the module doc.
#[derive(Debug)]
pub(super) struct ClusterFolder {
    name: String,
    builder: ClusterBuilder,
    /// Each file's objects as set (for the ones the builder took when the
    /// file was set, the builder's `Arc`s).
    files: HashMap<Arc<Path>, ClusterObjects>,
    /// Each object's defining files, sorted: the first one's definition is used.
    definers: HashMap<ObjectId, Vec<Arc<Path>>>,
    /// The objects more than one file defines.
    duplicated: BTreeSet<ObjectId>,
    /// Per file, the messages for objects it defines twice.
    repeated: BTreeMap<Arc<Path>, Vec<String>>,
}

impl ClusterFolder {
    pub(super) fn new(name: &str) -> Self {
        ClusterFolder {
            name: name.to_string(),
            builder: ClusterBuilder::new(name),
            files: HashMap::new(),
            definers: HashMap::new(),
            duplicated: BTreeSet::new(),
            repeated: BTreeMap::new(),
        }
    }

    /// The files whose objects are applied.
    pub(super) fn file_count(&self) -> usize {
        self.files.len()
    }

    /// The applied files `keep` refuses.
    pub(super) fn files_not(&self, keep: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
        self.files.keys().filter(|f| !keep(f)).map(|f| f.to_path_buf()).collect()
    }

    /// `file` now defines `objects` (None: the file is gone): applies what it
    /// added, changed and dropped. Returns the file's objects as the folder
    /// keeps them, for the source to keep instead of its parse (so an
    /// object rewritten unchanged is held once).
    pub(super) fn set_file(&mut self, file: &Path, objects: Option<&ClusterObjects>) -> Option<ClusterObjects> {
        let path: Arc<Path> = self.files.get_key_value(file).map(|(k, _)| k.clone()).unwrap_or_else(|| Arc::from(file));
        let old = self.files.remove(file);
        let mut repeated = Vec::new();
        let new = objects.map(|o| keyed(o, Some(&mut repeated))).unwrap_or_default();
        if let Some(old) = &old {
            let still: HashSet<&ObjectId> = new.iter().map(|(id, _)| id).collect();
            for (id, _) in keyed(old, None) {
                if !still.contains(&id) {
                    self.undefine(&id, &path);
                }
            }
        }
        let messages: Vec<String> = repeated
            .iter()
            .map(|(id, _)| format!("{} in cluster {}: defined twice in {}; only the first definition is used", shown(id), self.name, file.display()))
            .collect();
        if messages.is_empty() {
            self.repeated.remove(file);
        } else {
            self.repeated.insert(path.clone(), messages);
        }
        objects?;
        let mut kept = ClusterObjects::default();
        for (id, object) in new {
            let definers = self.definers.entry(id.clone()).or_default();
            if let Err(at) = definers.binary_search(&path) {
                definers.insert(at, path.clone());
            }
            if definers.len() > 1 {
                self.duplicated.insert(id);
            }
            // The first file (by path) defines it: this one, or another one that keeps it.
            let object = if Arc::ptr_eq(&definers[0], &path) || *definers[0] == *path { self.builder.apply(object) } else { object };
            kept.push(object);
        }
        // A repeated definition is kept as parsed (unused, but the file's: a
        // folder built again from the kept objects reports it again).
        for (_, object) in repeated {
            kept.push(object);
        }
        self.files.insert(path, kept.clone());
        Some(kept)
    }

    /// `file` no longer defines `id`: the next file that does takes over, else it is removed.
    fn undefine(&mut self, id: &ObjectId, file: &Path) {
        let Some(definers) = self.definers.get_mut(id) else { return };
        let was_used = definers.first().is_some_and(|f| **f == *file);
        definers.retain(|f| **f != *file);
        if definers.len() < 2 {
            self.duplicated.remove(id);
        }
        let next = definers.first().cloned();
        if next.is_none() {
            self.definers.remove(id);
        }
        if !was_used {
            return;
        }
        let taken_over = next.and_then(|next| self.files.get(&next)).and_then(|objects| keyed(objects, None).into_iter().find(|(i, _)| i == id));
        match taken_over {
            Some((_, object)) => {
                self.builder.apply(object);
            }
            None => self.builder.remove(id),
        }
    }

    /// The cluster's state, and its messages: the builder's, then each
    /// object defined in more than one file or twice in one.
    pub(super) fn build(&mut self) -> (Arc<ClusterState>, Vec<String>) {
        let (state, mut errors) = self.builder.build();
        for id in &self.duplicated {
            let files = &self.definers[id];
            errors.push(format!(
                "{} in cluster {}: defined in {} and again in {}; only the first definition is used",
                shown(id),
                self.name,
                files[0].display(),
                files[1..].iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
            ));
        }
        errors.extend(self.repeated.values().flatten().cloned());
        (state, errors)
    }
}
