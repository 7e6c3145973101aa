//! Every open xDS stream, with a live view of its sync state, for
//! `/debug/syncz`, config dumps and CSDS.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use dashmap::DashMap;

use super::delta::DeltaStream;
use super::node::ProxyNode;
use super::resources::{Resource, ResourceType};
use super::sotw::SotwStream;
use super::status::TypeStatus;

/// Read access to a stream's state machine.
pub trait StreamView: Send + Sync {
    fn status(&self, now: Instant) -> Vec<TypeStatus>;
    fn sent(&self) -> BTreeMap<ResourceType, (String, Vec<Arc<Resource>>)>;
}

impl StreamView for Mutex<SotwStream> {
    fn status(&self, now: Instant) -> Vec<TypeStatus> {
        self.lock().expect("stream lock").status(now)
    }
    fn sent(&self) -> BTreeMap<ResourceType, (String, Vec<Arc<Resource>>)> {
        self.lock().expect("stream lock").sent()
    }
}

impl StreamView for Mutex<DeltaStream> {
    fn status(&self, now: Instant) -> Vec<TypeStatus> {
        self.lock().expect("stream lock").status(now)
    }
    fn sent(&self) -> BTreeMap<ResourceType, (String, Vec<Arc<Resource>>)> {
        self.lock().expect("stream lock").sent()
    }
}

/// One open stream.
pub struct ProxyConnection {
    pub conn_id: u64,
    pub node: ProxyNode,
    /// "sotw" or "delta".
    pub mode: &'static str,
    pub connected_at: SystemTime,
    pub view: Arc<dyn StreamView>,
    /// What is wrong with the proxy's configuration source (the provider's
    /// word at connect time, e.g. an unregistered cluster).
    pub warnings: Vec<String>,
}

/// All open streams.
#[derive(Default)]
pub struct ConnectionRegistry {
    conns: DashMap<u64, Arc<ProxyConnection>>,
    next_id: AtomicU64,
}

impl ConnectionRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn insert(&self, conn: Arc<ProxyConnection>) {
        self.conns.insert(conn.conn_id, conn);
    }

    pub fn remove(&self, conn_id: u64) {
        self.conns.remove(&conn_id);
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Every open stream, sorted by proxy id, then newest first.
    pub fn all(&self) -> Vec<Arc<ProxyConnection>> {
        let mut all: Vec<_> = self.conns.iter().map(|e| e.value().clone()).collect();
        all.sort_by(|a, b| a.node.id.cmp(&b.node.id).then(b.conn_id.cmp(&a.conn_id)));
        all
    }

    /// The newest stream of the proxy with this node id.
    pub fn by_node_id(&self, id: &str) -> Option<Arc<ProxyConnection>> {
        self.conns.iter().filter(|e| e.value().node.id == id).max_by_key(|e| e.value().conn_id).map(|e| e.value().clone())
    }
}
