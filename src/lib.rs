//! meshpilot: an Envoy xDS control plane for cross-cluster routing.
//!
//! Data flows one way: sources → mesh state → snapshot → translate → xds → Envoy.
//! See `docs/architecture.md`.

pub mod admin;
pub mod bootstrap;
pub mod ca;
pub mod cache;
pub mod cli;
pub mod fixtures;
pub mod loadgen;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod sources;
pub mod static_resources;
pub mod translate;
pub mod xds;
