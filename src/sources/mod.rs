//! Where the mesh comes from. A source fills [`crate::model::MeshInputs`] and
//! never knows about xDS. Today: the file source (local mode); the Kubernetes
//! source (one set of watchers per registered cluster) feeds the same inputs.

pub mod file;
