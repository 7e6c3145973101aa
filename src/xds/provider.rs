//! Where the xDS server gets each proxy's resources, and how it hears of changes.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::node::ProxyNode;
use super::resources::{ResourceSet, ResourceType};

/// What a provider keeps for one stream between its calls (see
/// [`ResourceProvider::resources_for_stream`]).
pub type StreamMemo = Option<Box<dyn std::any::Any + Send + Sync>>;

/// The source of every proxy's resources. The xDS server asks it on every
/// request and push, so implementations cache per proxy scope.
pub trait ResourceProvider: Send + Sync + 'static {
    /// The full resource set this proxy should have now.
    fn resources_for(&self, proxy: &ProxyNode) -> Arc<ResourceSet>;

    /// [`ResourceProvider::resources_for`], for a stream that asks on every
    /// push and every reply: `memo` is the stream's own, kept between its
    /// calls, and holds whatever the provider needs to answer the next call
    /// sooner (it starts empty).
    fn resources_for_stream(&self, proxy: &ProxyNode, memo: &mut StreamMemo) -> Arc<ResourceSet> {
        let _ = memo;
        self.resources_for(proxy)
    }

    /// True once every source behind the provider has loaded once.
    fn is_ready(&self) -> bool;

    /// `proxy` rejected (NACKed) the resources of `ty` it was last sent,
    /// saying `message`. A provider that knows which input produced them
    /// may stop serving that input.
    fn on_rejected(&self, _proxy: &ProxyNode, _ty: ResourceType, _message: &str) {}

    /// Why this proxy's configuration may not be what its operator expects
    /// (logged at connect and shown in `proxy-status`), e.g. a cluster
    /// nothing is known about.
    fn warnings_for(&self, _proxy: &ProxyNode) -> Vec<String> {
        Vec::new()
    }
}

/// A handle sources use to say "config changed"; the debouncer turns bursts
/// of these into pushes.
#[derive(Clone, Debug)]
pub struct ChangeNotifier {
    tx: mpsc::UnboundedSender<Instant>,
}

impl ChangeNotifier {
    pub fn channel() -> (ChangeNotifier, mpsc::UnboundedReceiver<Instant>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (ChangeNotifier { tx }, rx)
    }

    /// Reports a change that happened now.
    pub fn changed(&self) {
        let _ = self.tx.send(Instant::now());
    }
}

/// A provider that gives every proxy the same set, replaceable at run time.
#[derive(Debug)]
pub struct SharedResources {
    current: std::sync::RwLock<Arc<ResourceSet>>,
    ready: std::sync::atomic::AtomicBool,
    notifier: ChangeNotifier,
}

impl SharedResources {
    pub fn new(notifier: ChangeNotifier) -> Self {
        SharedResources { current: std::sync::RwLock::new(Arc::new(ResourceSet::new())), ready: false.into(), notifier }
    }

    /// Replaces the set; proxies are pushed only if it differs.
    pub fn set(&self, resources: ResourceSet) {
        let mut cur = self.current.write().expect("resource lock poisoned");
        let changed = **cur != resources;
        *cur = Arc::new(resources);
        drop(cur);
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        if changed {
            self.notifier.changed();
        }
    }

    pub fn current(&self) -> Arc<ResourceSet> {
        self.current.read().expect("resource lock poisoned").clone()
    }
}

impl ResourceProvider for SharedResources {
    fn resources_for(&self, _proxy: &ProxyNode) -> Arc<ResourceSet> {
        self.current()
    }

    fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }
}
