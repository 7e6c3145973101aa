//! The registered clusters' API clients, as the Kubernetes source hands
//! them over: the token reviewer and the root publisher both work through
//! them.

use std::collections::BTreeMap;
use std::sync::RwLock;

/// Registered cluster name → its client (meshpilot's reader identity there).
#[derive(Default)]
pub struct ClusterClients(RwLock<BTreeMap<String, kube::Client>>);

impl ClusterClients {
    /// Registers (or replaces) a cluster's client.
    pub fn set(&self, name: &str, client: kube::Client) {
        self.0.write().expect("cluster clients lock").insert(name.to_string(), client);
    }

    pub fn remove(&self, name: &str) {
        self.0.write().expect("cluster clients lock").remove(name);
    }

    pub fn get(&self, name: &str) -> Option<kube::Client> {
        self.0.read().expect("cluster clients lock").get(name).cloned()
    }

    /// The registered names, comma-separated (for messages).
    pub fn names(&self) -> String {
        self.0.read().expect("cluster clients lock").keys().cloned().collect::<Vec<_>>().join(", ")
    }
}
