//! What streams share: the resources of one type that one subscription covers
//! in one [`ResourceSet`](super::resources::ResourceSet) — computed, versioned
//! and encoded once, then handed to every stream of that scope by `Arc`.
//!
//! Subscriptions to explicit names (EDS, RDS) are interned, so every proxy of a
//! scope that names the same resources points at one name set, and the view
//! cache keys on that pointer.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

use super::resource::{Resource, aggregate_version};

/// A set of resource names, shared by every stream that subscribed to exactly these.
pub type NameSet = Arc<BTreeSet<String>>;

/// The interned copy of `names`: equal sets share one allocation.
pub fn intern_names(names: BTreeSet<String>) -> NameSet {
    type ByHash = HashMap<u64, Vec<Weak<BTreeSet<String>>>>;
    static INTERNED: OnceLock<Mutex<ByHash>> = OnceLock::new();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    names.hash(&mut hasher);
    let key = hasher.finish();
    let mut table = INTERNED.get_or_init(Default::default).lock().expect("intern lock");
    let bucket = table.entry(key).or_default();
    bucket.retain(|w| w.strong_count() > 0);
    if let Some(found) = bucket.iter().filter_map(Weak::upgrade).find(|s| **s == names) {
        return found;
    }
    let shared = Arc::new(names);
    bucket.push(Arc::downgrade(&shared));
    // Drop buckets whose sets are all gone now and then, so the table stays small.
    if table.len() > 1024 {
        table.retain(|_, b| b.iter().any(|w| w.strong_count() > 0));
    }
    shared
}

/// The interned set of a request's names (any order, maybe with repeats). A
/// list that some recent request also named is matched against that set
/// without building a new one: a fleet's proxies of one scope name the same
/// 3,100 clusters, and building, hashing and comparing a set of them per
/// stream had been ≈10% of the control plane's CPU during a sync. An
/// unsorted list (Envoy keeps its names in a hash set) is sorted as slices
/// first, which costs no allocation per name.
pub fn intern_request_names<N: AsRef<[u8]>>(names: &[N]) -> NameSet {
    static RECENT: OnceLock<Mutex<std::collections::VecDeque<Weak<BTreeSet<String>>>>> = OnceLock::new();
    const RECENT_KEPT: usize = 16;
    let recent = RECENT.get_or_init(Default::default);
    let mut sorted: Vec<&[u8]> = names.iter().map(|n| n.as_ref()).collect();
    if !sorted.windows(2).all(|w| w[0] < w[1]) {
        sorted.sort_unstable();
        sorted.dedup();
    }
    let found = recent
        .lock()
        .expect("recent names lock")
        .iter()
        .find_map(|w| w.upgrade().filter(|set| set.len() == sorted.len() && set.iter().zip(&sorted).all(|(a, b)| a.as_bytes() == *b)));
    if let Some(set) = found {
        return set;
    }
    let set = intern_names(sorted.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect());
    let mut recent = recent.lock().expect("recent names lock");
    recent.retain(|w| w.strong_count() > 0);
    recent.push_front(Arc::downgrade(&set));
    recent.truncate(RECENT_KEPT);
    set
}

/// True when `names` (a request's list, any order, maybe with repeats) is exactly `set`.
pub fn same_names<N: AsRef<[u8]>>(set: &BTreeSet<String>, names: &[N]) -> bool {
    if names.len() < set.len() {
        return false;
    }
    // Sorted without repeats (what a client that keeps a sorted set sends): one walk.
    if names.len() == set.len() && names.windows(2).all(|w| w[0].as_ref() < w[1].as_ref()) {
        return set.iter().zip(names).all(|(a, b)| a.as_bytes() == b.as_ref());
    }
    if !names.iter().all(|n| std::str::from_utf8(n.as_ref()).is_ok_and(|n| set.contains(n))) {
        return false;
    }
    // Every name is in the set: equal when the distinct names are as many.
    let distinct: std::collections::HashSet<&[u8]> = names.iter().map(|n| n.as_ref()).collect();
    distinct.len() == set.len()
}

/// The resources of one type a subscription covers, in name order, with their
/// aggregate version and (lazily) their wire encodings.
pub struct ResourceView {
    pub version: String,
    pub resources: Vec<Arc<Resource>>,
    sotw: OnceLock<Bytes>,
    delta: OnceLock<Bytes>,
    /// What changed since an older view, per older view: every stream that
    /// holds the same older view is sent the same bytes.
    changes: Mutex<Vec<CachedChanges>>,
}

/// Which message's `resources` entries an encoding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Sotw,
    Delta,
}

/// What changed from an older view to a newer one, shared by every stream
/// that held the older view.
#[derive(Debug)]
pub struct ViewChanges {
    /// New or changed resources, in name order.
    pub updated: Vec<Arc<Resource>>,
    /// Names the older view had and the newer one has not, in name order.
    pub removed: Vec<String>,
    sotw: OnceLock<Bytes>,
    delta: OnceLock<Bytes>,
}

struct CachedChanges {
    since: Weak<ResourceView>,
    changes: Arc<ViewChanges>,
}

/// Changes kept per view: streams hold a handful of distinct older views at
/// a time (one per push they are behind by).
const CHANGES_KEPT: usize = 16;

impl std::fmt::Debug for ResourceView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceView").field("version", &self.version).field("resources", &self.resources.len()).finish()
    }
}

impl ResourceView {
    /// `resources` must be in name order.
    pub fn new(resources: Vec<Arc<Resource>>) -> Self {
        debug_assert!(resources.windows(2).all(|w| w[0].name < w[1].name));
        ResourceView {
            version: aggregate_version(resources.iter()),
            resources,
            sotw: OnceLock::new(),
            delta: OnceLock::new(),
            changes: Mutex::new(Vec::new()),
        }
    }

    pub fn empty() -> Arc<Self> {
        static EMPTY: OnceLock<Arc<ResourceView>> = OnceLock::new();
        EMPTY.get_or_init(|| Arc::new(ResourceView::new(Vec::new()))).clone()
    }

    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.resources.binary_search_by(|r| r.name.as_str().cmp(name)).ok().map(|i| &self.resources[i])
    }

    /// Every resource as `DiscoveryResponse.resources` entries, encoded once.
    pub fn sotw_entries(&self) -> Bytes {
        self.sotw.get_or_init(|| sotw_entries(self.resources.iter())).clone()
    }

    /// Every resource as `DeltaDiscoveryResponse.resources` entries, encoded once.
    pub fn delta_entries(&self) -> Bytes {
        self.delta.get_or_init(|| delta_entries(self.resources.iter())).clone()
    }

    /// What changed since an older view (see [`diff`](Self::diff)), computed
    /// once per older view and encoded once per kind: a push that changes a
    /// few resources is sent to thousands of streams that hold the same older
    /// view, and a stream several pushes behind gets what those pushes
    /// changed. (Per stream, the diff had been the largest cost of an endpoint
    /// push at 5,000 proxies, and the encodings, each a copy of its own, had
    /// held gigabytes under endpoint churn.)
    pub fn changes_since(&self, since: &Arc<ResourceView>) -> Arc<ViewChanges> {
        if std::ptr::eq(self, Arc::as_ptr(since)) {
            static NONE: OnceLock<Arc<ViewChanges>> = OnceLock::new();
            return NONE
                .get_or_init(|| Arc::new(ViewChanges { updated: Vec::new(), removed: Vec::new(), sotw: OnceLock::new(), delta: OnceLock::new() }))
                .clone();
        }
        let mut cache = self.changes.lock().expect("change cache lock");
        if let Some(found) = cache.iter().find(|c| std::ptr::eq(c.since.as_ptr(), Arc::as_ptr(since))) {
            return found.changes.clone();
        }
        let (updated, removed) = self.diff(since);
        let changes = Arc::new(ViewChanges {
            updated: updated.into_iter().cloned().collect(),
            removed: removed.into_iter().map(str::to_string).collect(),
            sotw: OnceLock::new(),
            delta: OnceLock::new(),
        });
        // (A `Weak` keeps its allocation, so a cached address is never reused
        // by another view; dead older views are dropped to free their entries.)
        cache.retain(|c| c.since.strong_count() > 0);
        if cache.len() >= CHANGES_KEPT {
            cache.remove(0);
        }
        cache.push(CachedChanges { since: Arc::downgrade(since), changes: changes.clone() });
        changes
    }

    /// `changes`' updated resources as entries of `kind`: the view's own
    /// encoding when everything changed.
    pub fn change_entries(&self, changes: &ViewChanges, kind: EntryKind) -> Bytes {
        if changes.updated.len() == self.resources.len() {
            return match kind {
                EntryKind::Sotw => self.sotw_entries(),
                EntryKind::Delta => self.delta_entries(),
            };
        }
        match kind {
            EntryKind::Sotw => changes.sotw.get_or_init(|| sotw_entries(changes.updated.iter())),
            EntryKind::Delta => changes.delta.get_or_init(|| delta_entries(changes.updated.iter())),
        }
        .clone()
    }

    /// What `self` has that `held` lacks or holds at another version, and the
    /// names `held` has that `self` does not (both in name order).
    pub fn diff<'a>(&'a self, held: &'a ResourceView) -> (Vec<&'a Arc<Resource>>, Vec<&'a str>) {
        let (mut updated, mut removed) = (Vec::new(), Vec::new());
        let (mut a, mut b) = (self.resources.iter().peekable(), held.resources.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                // The same shared resource: nothing to compare (the common case).
                (Some(new), Some(old)) if Arc::ptr_eq(new, old) => {
                    a.next();
                    b.next();
                }
                (Some(new), Some(old)) => match new.name.cmp(&old.name) {
                    std::cmp::Ordering::Less => updated.push(a.next().expect("peeked")),
                    std::cmp::Ordering::Greater => removed.push(b.next().expect("peeked").name.as_str()),
                    std::cmp::Ordering::Equal => {
                        let (new, old) = (a.next().expect("peeked"), b.next().expect("peeked"));
                        if new.version != old.version {
                            updated.push(new);
                        }
                    }
                },
                (Some(_), None) => updated.push(a.next().expect("peeked")),
                (None, Some(_)) => removed.push(b.next().expect("peeked").name.as_str()),
                (None, None) => break,
            }
        }
        (updated, removed)
    }
}

/// Resources as repeated field 2 of `DiscoveryResponse` (each an `Any`).
pub fn sotw_entries<'a>(resources: impl Iterator<Item = &'a Arc<Resource>>) -> Bytes {
    let mut buf = BytesMut::new();
    for r in resources {
        let any = r.encoded_any();
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(any.len() as u64, &mut buf);
        buf.put_slice(any);
    }
    buf.freeze()
}

/// Resources as repeated field 2 of `DeltaDiscoveryResponse` (each a
/// `Resource {version = 1, resource = 2, name = 3}`).
pub fn delta_entries<'a>(resources: impl Iterator<Item = &'a Arc<Resource>>) -> Bytes {
    let mut buf = BytesMut::new();
    for r in resources {
        let any = r.encoded_any();
        let inner = string_field_len(1, &r.version) + 1 + encoded_len_varint(any.len() as u64) + any.len() + string_field_len(3, &r.name);
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(inner as u64, &mut buf);
        put_string_field(1, &r.version, &mut buf);
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(any.len() as u64, &mut buf);
        buf.put_slice(any);
        put_string_field(3, &r.name, &mut buf);
    }
    buf.freeze()
}

/// Encoded length of a string field with a one-byte key (tags below 16); empty strings are omitted.
pub fn string_field_len(_tag: u32, s: &str) -> usize {
    if s.is_empty() { 0 } else { 1 + encoded_len_varint(s.len() as u64) + s.len() }
}

pub fn put_string_field(tag: u32, s: &str, buf: &mut impl BufMut) {
    if !s.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(s.len() as u64, buf);
        buf.put_slice(s.as_bytes());
    }
}

/// What a view cache entry is keyed on: the type and the subscription.
#[derive(Clone)]
pub enum ViewKey {
    All(super::resources::ResourceType),
    Names(super::resources::ResourceType, NameSet),
}

impl PartialEq for ViewKey {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ViewKey::All(a), ViewKey::All(b)) => a == b,
            (ViewKey::Names(a, x), ViewKey::Names(b, y)) => a == b && Arc::ptr_eq(x, y),
            _ => false,
        }
    }
}
impl Eq for ViewKey {}

impl Hash for ViewKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            ViewKey::All(t) => (0u8, t).hash(state),
            ViewKey::Names(t, n) => (1u8, t, Arc::as_ptr(n) as usize).hash(state),
        }
    }
}

/// Views computed from one resource set; empty again whenever the set changes.
#[derive(Default)]
pub struct ViewCache {
    views: Mutex<HashMap<ViewKey, Arc<ResourceView>>>,
}

/// Distinct subscriptions remembered per resource set; beyond this, views are computed and not kept.
const MAX_CACHED_VIEWS: usize = 64;

impl ViewCache {
    pub fn get_or_compute(&self, key: ViewKey, compute: impl FnOnce() -> ResourceView) -> Arc<ResourceView> {
        if let Some(v) = self.views.lock().expect("view cache lock").get(&key) {
            return v.clone();
        }
        // Computed outside the lock: streams of other subscriptions are not held up.
        let view = Arc::new(compute());
        let mut views = self.views.lock().expect("view cache lock");
        if let Some(v) = views.get(&key) {
            return v.clone();
        }
        if views.len() < MAX_CACHED_VIEWS {
            views.insert(key, view.clone());
        }
        view
    }
}

impl Clone for ViewCache {
    /// A copy of a set is about to change: it starts with no views.
    fn clone(&self) -> Self {
        ViewCache::default()
    }
}

impl std::fmt::Debug for ViewCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ViewCache")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::resource::{Resource, ResourceType};
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};
    use prost::Message;

    fn res(name: &str, size: u32) -> Arc<Resource> {
        let c = Cluster {
            name: name.into(),
            per_connection_buffer_limit_bytes: Some(envoy_types::pb::google::protobuf::UInt32Value { value: size }),
            ..Default::default()
        };
        Arc::new(Resource::from_message(name, &c))
    }

    #[test]
    fn interned_name_sets_are_shared() {
        let a = intern_names(["x".to_string(), "y".to_string()].into());
        let b = intern_names(["y".to_string(), "x".to_string()].into());
        assert!(Arc::ptr_eq(&a, &b));
        let c = intern_names(["x".to_string()].into());
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(same_names(&a, &["y", "x"]));
        assert!(same_names(&a, &["y", "x", "x"]));
        assert!(!same_names(&a, &["x", "x"]));
        assert!(!same_names(&a, &["x", "z"]));
    }

    #[test]
    fn encodings_decode_as_the_messages_they_stand_for() {
        let view = ResourceView::new(vec![res("a", 1), res("b", 2)]);
        let sotw = DiscoveryResponse::decode(view.sotw_entries()).unwrap();
        assert_eq!(sotw.resources, vec![view.resources[0].body(), view.resources[1].body()]);
        let delta = DeltaDiscoveryResponse::decode(view.delta_entries()).unwrap();
        assert_eq!(delta.resources.len(), 2);
        assert_eq!(delta.resources[1].name, "b");
        assert_eq!(delta.resources[1].version, view.resources[1].version);
        assert_eq!(delta.resources[1].resource.as_ref(), Some(&view.resources[1].body()));
        assert!(std::ptr::eq(view.sotw_entries().as_ptr(), view.sotw_entries().as_ptr()), "encoded once");
    }

    #[test]
    fn changes_since_an_older_view_are_encoded_once_per_older_view() {
        let (a, b, c) = (res("a", 1), res("b", 1), res("c", 1));
        let v1 = Arc::new(ResourceView::new(vec![a.clone(), b.clone(), c.clone()]));
        let v2 = Arc::new(ResourceView::new(vec![a.clone(), res("b", 2), c.clone()]));
        let v3 = ResourceView::new(vec![a.clone(), v2.resources[1].clone(), res("c", 2)]);
        let encode = |since: &Arc<ResourceView>, kind| v3.change_entries(&v3.changes_since(since), kind);
        // Two streams that hold v1 get the same changes and bytes; one that holds v2 its own.
        assert!(Arc::ptr_eq(&v3.changes_since(&v1), &v3.changes_since(&v1)));
        let from_v1 = encode(&v1, EntryKind::Sotw);
        assert!(std::ptr::eq(from_v1.as_ptr(), encode(&v1, EntryKind::Sotw).as_ptr()));
        let decoded = DiscoveryResponse::decode(from_v1.clone()).unwrap();
        assert_eq!(decoded.resources, vec![v3.resources[1].body(), v3.resources[2].body()]);
        let from_v2 = encode(&v2, EntryKind::Sotw);
        assert_eq!(DiscoveryResponse::decode(from_v2).unwrap().resources, vec![v3.resources[2].body()]);
        let delta = DeltaDiscoveryResponse::decode(encode(&v1, EntryKind::Delta)).unwrap();
        assert_eq!(delta.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        // Everything changed: the view's own full encoding.
        let everything = encode(&ResourceView::empty(), EntryKind::Sotw);
        assert!(std::ptr::eq(everything.as_ptr(), v3.sotw_entries().as_ptr()));
        // An older view that is gone leaves the cache.
        drop(v1);
        let v0 = Arc::new(ResourceView::new(vec![a.clone()]));
        encode(&v0, EntryKind::Sotw);
        let cache = v3.changes.lock().unwrap();
        assert!(cache.iter().all(|c| c.since.strong_count() > 0), "dead entries dropped");
    }

    #[test]
    fn request_names_are_interned_without_building_a_set_twice() {
        let names: Vec<Bytes> = ["a|x", "b|x", "c|x"].map(|n| Bytes::from_static(n.as_bytes())).to_vec();
        let first = intern_request_names(&names);
        assert!(Arc::ptr_eq(&first, &intern_request_names(&names)), "found among recent sets");
        assert_eq!(first.iter().map(String::as_str).collect::<Vec<_>>(), ["a|x", "b|x", "c|x"]);
        // The same names unsorted and repeated find the same set; another list does not.
        let unsorted: Vec<Bytes> = ["c|x", "a|x", "b|x", "a|x"].map(|n| Bytes::from_static(n.as_bytes())).to_vec();
        assert!(Arc::ptr_eq(&first, &intern_request_names(&unsorted)));
        let fewer = intern_request_names(&names[..2]);
        assert_eq!(fewer.len(), 2);
        assert!(!Arc::ptr_eq(&first, &fewer));
    }

    #[test]
    fn diff_finds_changed_added_and_removed() {
        let (a, b, c) = (res("a", 1), res("b", 1), res("c", 1));
        let old = ResourceView::new(vec![a.clone(), b.clone()]);
        let new = ResourceView::new(vec![a.clone(), res("b", 2), c.clone()]);
        let (updated, removed) = new.diff(&old);
        assert_eq!(updated.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        assert!(removed.is_empty());
        let (updated, removed) = old.diff(&new);
        assert_eq!(updated.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["b"]);
        assert_eq!(removed, ["c"]);
        // Same content rebuilt (another Arc): not an update.
        let rebuilt = ResourceView::new(vec![res("a", 1), b]);
        assert!(rebuilt.diff(&old).0.is_empty());
        let _ = ResourceType::Cluster;
    }
}
