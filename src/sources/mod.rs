//! Where the mesh comes from. A source fills [`crate::model::MeshInputs`] and
//! never knows about xDS: the file source (local mode) and the Kubernetes
//! source (one set of watchers per registered cluster) feed the same inputs.

mod cluster_folder;
pub mod file;
pub mod kubernetes;
