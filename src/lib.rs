//! meshpilot: an Envoy xDS control plane for cross-cluster routing.
//!
//! Data flows one way: sources → mesh state → snapshot → translate → xds → Envoy.
//! See `docs/architecture.md`.
//!
//! The `testkit` feature (on by default) adds what tests, demos and
//! benchmarks need and a production control plane does not: `fixtures`,
//! `loadgen`, `netns`, and the `demo`, `echo`, `load` and `fixtures` commands.

pub mod admin;
pub mod allocator;
pub mod bootstrap;
pub mod ca;
pub mod cache;
pub mod cli;
#[cfg(any(test, feature = "testkit"))]
pub mod fixtures;
#[cfg(feature = "testkit")]
pub mod loadgen;
pub mod metrics;
pub mod model;
#[cfg(feature = "testkit")]
pub mod netns;
pub mod runtime;
pub mod sources;
pub mod static_resources;
pub mod status;
pub mod translate;
pub mod xds;
