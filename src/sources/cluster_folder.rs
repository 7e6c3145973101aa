//! A config-dir cluster folder's objects as its files define them, kept in
//! the cluster's [`ClusterBuilder`]: a rewritten file applies only the
//! objects it added, changed or dropped, so the reload of one endpoint
//! change builds one service again, not the cluster.
//!
//! An object two files define (the same kind, namespace and name) is taken
//! from the file that defined it first; the other definitions are reported
//! and ignored until that file drops it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::ClusterState;
use crate::model::cluster_build::{ClusterBuilder, ObjectKey, object_key, pod_key};
use crate::model::k8s::{ClusterObjects, PodSummary};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Namespace,
}

/// One object of a file, of any cluster kind.
#[derive(Debug, Clone)]
enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Pod(Arc<PodSummary>),
    Namespace(Arc<Namespace>),
}

impl Object {
    /// Its kind and key; None without a name (files always name theirs).
    fn id(&self) -> Option<(Kind, ObjectKey)> {
        match self {
            Object::Service(o) => Some((Kind::Service, object_key(&o.metadata)?)),
            Object::EndpointSlice(o) => Some((Kind::EndpointSlice, object_key(&o.metadata)?)),
            Object::Pod(o) => Some((Kind::Pod, pod_key(o)?)),
            Object::Namespace(o) => Some((Kind::Namespace, (String::new(), o.metadata.name.clone()?))),
        }
    }

    fn apply(self, builder: &mut ClusterBuilder) {
        match self {
            Object::Service(o) => builder.apply_service(o),
            Object::EndpointSlice(o) => builder.apply_slice(o),
            Object::Pod(o) => builder.apply_pod(o),
            Object::Namespace(o) => builder.apply_namespace(o),
        }
    }
}

fn remove(builder: &mut ClusterBuilder, (kind, key): &(Kind, ObjectKey)) {
    match kind {
        Kind::Service => builder.remove_service(key),
        Kind::EndpointSlice => builder.remove_slice(key),
        Kind::Pod => builder.remove_pod(key),
        Kind::Namespace => builder.remove_namespace(&key.1),
    }
}

/// A file's objects by kind and key (a key the file repeats: its last definition).
fn keyed(objects: &ClusterObjects) -> HashMap<(Kind, ObjectKey), Object> {
    let all = objects
        .services
        .iter()
        .map(|o| Object::Service(o.clone()))
        .chain(objects.endpoint_slices.iter().map(|o| Object::EndpointSlice(o.clone())))
        .chain(objects.pods.iter().map(|o| Object::Pod(o.clone())))
        .chain(objects.namespaces.iter().map(|o| Object::Namespace(o.clone())));
    all.filter_map(|o| Some((o.id()?, o))).collect()
}

/// See the module doc.
#[derive(Debug)]
pub(super) struct ClusterFolder {
    name: String,
    builder: ClusterBuilder,
    /// Each file's objects as applied.
    files: HashMap<PathBuf, ClusterObjects>,
    /// Each object's defining files, in the order they defined it (the first one's is used).
    definers: HashMap<(Kind, ObjectKey), Vec<PathBuf>>,
    /// The objects more than one file defines.
    duplicated: BTreeSet<(Kind, ObjectKey)>,
}

impl ClusterFolder {
    pub(super) fn new(name: &str) -> Self {
        ClusterFolder {
            name: name.to_string(),
            builder: ClusterBuilder::new(name),
            files: HashMap::new(),
            definers: HashMap::new(),
            duplicated: BTreeSet::new(),
        }
    }

    /// The files whose objects are applied.
    pub(super) fn file_count(&self) -> usize {
        self.files.len()
    }

    /// The applied files `keep` refuses.
    pub(super) fn files_not(&self, keep: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
        self.files.keys().filter(|f| !keep(f)).cloned().collect()
    }

    /// `file` now defines `objects` (None: the file is gone): applies what it
    /// added, changed and dropped.
    pub(super) fn set_file(&mut self, file: &Path, objects: Option<&ClusterObjects>) {
        let old = match objects {
            Some(objects) => self.files.insert(file.to_path_buf(), objects.clone()),
            None => self.files.remove(file),
        };
        let old = old.as_ref().map(keyed).unwrap_or_default();
        let new = objects.map(keyed).unwrap_or_default();
        for id in old.keys().filter(|id| !new.contains_key(*id)) {
            self.undefine(id, file);
        }
        for (id, object) in new {
            let definers = self.definers.entry(id.clone()).or_default();
            if !definers.iter().any(|f| f == file) {
                definers.push(file.to_path_buf());
            }
            if definers.len() > 1 {
                self.duplicated.insert(id.clone());
            }
            if definers[0] == file {
                object.apply(&mut self.builder);
            }
        }
    }

    /// `file` no longer defines `id`: the next file that does takes over, else it is removed.
    fn undefine(&mut self, id: &(Kind, ObjectKey), file: &Path) {
        let Some(definers) = self.definers.get_mut(id) else { return };
        let was_used = definers.first().is_some_and(|f| f == file);
        definers.retain(|f| f != file);
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
        match next.and_then(|next| self.files.get(&next).and_then(|objects| keyed(objects).remove(id))) {
            Some(object) => object.apply(&mut self.builder),
            None => remove(&mut self.builder, id),
        }
    }

    /// The cluster's state, and its messages: the builder's, then each object defined twice.
    pub(super) fn build(&mut self) -> (Arc<ClusterState>, Vec<String>) {
        let (state, mut errors) = self.builder.build();
        for id in &self.duplicated {
            let (kind, (ns, name)) = id;
            let files = &self.definers[id];
            let shown = |f: &PathBuf| f.display().to_string();
            let object = if *kind == Kind::Namespace { name.clone() } else { format!("{ns}/{name}") };
            errors.push(format!(
                "{kind:?} {object} in cluster {}: defined in {} and again in {}; only the first definition is used",
                self.name,
                shown(&files[0]),
                files[1..].iter().map(shown).collect::<Vec<_>>().join(", ")
            ));
        }
        (state, errors)
    }
}
