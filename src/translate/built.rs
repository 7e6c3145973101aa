//! A piece of translation as it is kept and shared: `routes` builds it,
//! `memo` keeps it, `patch` swaps it in. (In a module of its own so that
//! `routes` and `memo` import it, and not each other.)

use std::sync::Arc;

use envoy_types::pb::envoy::config::route::v3::VirtualHost;

use super::ClusterTarget;
use crate::xds::resources::Resource;

/// One service port's virtual host as built for a client, with the
/// clusters its routes use (shared by every scope that builds it alike; see `memo`).
#[derive(Debug)]
pub struct BuiltVirtualHost {
    pub vhost: VirtualHost,
    pub targets: Vec<ClusterTarget>,
    /// Its VHDS resource, encoded the first time a delta ADS scope needs it.
    vhds: std::sync::OnceLock<Arc<Resource>>,
}

impl BuiltVirtualHost {
    pub fn new(vhost: VirtualHost, targets: Vec<ClusterTarget>) -> BuiltVirtualHost {
        BuiltVirtualHost { vhost, targets, vhds: std::sync::OnceLock::new() }
    }

    /// The virtual host as a VHDS resource of route configuration `configuration`:
    /// named `<configuration>/<virtual host>` (Envoy's naming convention; the
    /// name is also the virtual host's own `name`, which Envoy keys it by).
    pub fn vhds_resource(&self, configuration: &str) -> Arc<Resource> {
        self.vhds.get_or_init(|| Arc::new(vhds_resource(configuration, self.vhost.clone()))).clone()
    }
}

/// `vh` as a VHDS resource of route configuration `configuration`.
pub fn vhds_resource(configuration: &str, mut vh: VirtualHost) -> Resource {
    vh.name = format!("{configuration}/{}", vh.name);
    Resource::from_message(vh.name.clone(), &vh)
}
