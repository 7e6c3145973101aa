//! The VirtualMeshes' CAs in Kubernetes mode, kept where every replica finds
//! them, and their roots published where Istio's injected pods read them.
//!
//! - `certificateAuthority.builtin`: the root lives in the Secret
//!   `meshpilot-ca-<virtual mesh>` beside the VirtualMesh in the management
//!   cluster, in Istio's `cacerts` layout. The first replica to need it
//!   creates it; every other replica and every restart reads it (a create
//!   that loses the race reads the winner's), so sidecars connected to
//!   different replicas trust each other.
//! - `certificateAuthority.provided.certificate`: the named Secret, in
//!   Istio's `cacerts` layout (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
//!   `cert-chain.pem`).
//! - The root goes into the ConfigMap `istio-ca-root-cert` (key
//!   `root-cert.pem`) in every namespace of every cluster in the mesh, as
//!   istiod writes it: injected pods mount it to verify the control plane.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use super::CertificateAuthority;
use super::clusters::ClusterClients;
use crate::model::{CaSource, MeshTrust, builtin_ca_secret_name};

/// The ConfigMap istiod writes into every namespace, and its key.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
pub const ROOT_CONFIGMAP_KEY: &str = "root-cert.pem";
const FIELD_MANAGER: &str = "meshpilot";

/// Why a VirtualMesh's CA could not be had; the message names the object and field.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("VirtualMesh {virtual_mesh} spec.certificateAuthority.provided.certificate: Secret {secret}: {reason}")]
    Provided { virtual_mesh: String, secret: String, reason: String },
    #[error("VirtualMesh {virtual_mesh}: the builtin root's Secret {secret}: {reason}")]
    Builtin { virtual_mesh: String, secret: String, reason: String },
}

fn secret_files(secret: &Secret) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = secret.string_data.clone().unwrap_or_default();
    for (k, v) in secret.data.clone().unwrap_or_default() {
        out.insert(k, String::from_utf8_lossy(&v.0).into_owned());
    }
    out
}

/// Reads (or, for a builtin root not made yet, creates) the CA of `trust`'s
/// VirtualMesh from the management cluster.
pub async fn load_root(client: &kube::Client, trust: &MeshTrust) -> Result<CertificateAuthority, RootError> {
    let (vm_namespace, vm_name) = trust.virtual_mesh.split_once('/').unwrap_or(("", &trust.virtual_mesh));
    match &trust.ca {
        CaSource::Provided { namespace, name } => {
            let err =
                |reason: String| RootError::Provided { virtual_mesh: trust.virtual_mesh.clone(), secret: format!("{namespace}/{name}"), reason };
            if name.is_empty() {
                return Err(err("no name given".into()));
            }
            let secret = Api::<Secret>::namespaced(client.clone(), namespace).get_opt(name).await.map_err(|e| err(e.to_string()))?;
            let secret = secret.ok_or_else(|| err("not found".into()))?;
            CertificateAuthority::from_cacerts(&secret_files(&secret)).map_err(|e| err(e.to_string()))
        }
        CaSource::Builtin => {
            let name = builtin_ca_secret_name(vm_name);
            let err =
                |reason: String| RootError::Builtin { virtual_mesh: trust.virtual_mesh.clone(), secret: format!("{vm_namespace}/{name}"), reason };
            let secrets = Api::<Secret>::namespaced(client.clone(), vm_namespace);
            let read = |secret: Secret| CertificateAuthority::from_cacerts(&secret_files(&secret)).map_err(|e| err(e.to_string()));
            if let Some(secret) = secrets.get_opt(&name).await.map_err(|e| err(e.to_string()))? {
                return read(secret);
            }
            let ca = CertificateAuthority::generate(&format!("meshpilot {}", trust.virtual_mesh)).map_err(|e| err(e.to_string()))?;
            let secret: Secret = serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "istio.io/ca-root",
                "metadata": {
                    "name": name,
                    "namespace": vm_namespace,
                    "labels": { "app.kubernetes.io/managed-by": "meshpilot" },
                    "annotations": { "meshpilot.io/virtual-mesh": trust.virtual_mesh },
                },
            }))
            .map_err(|e| err(e.to_string()))?;
            let secret = Secret { data: Some(ca.to_cacerts().into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))).collect()), ..secret };
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    tracing::info!(virtual_mesh = %trust.virtual_mesh, secret = %format!("{vm_namespace}/{name}"), "generated the builtin root and stored it");
                    Ok(ca)
                }
                // Another replica created it first: theirs is the root.
                Err(kube::Error::Api(s)) if s.code == 409 => read(secrets.get(&name).await.map_err(|e| err(e.to_string()))?),
                Err(e) => Err(err(format!("cannot create it: {e}"))),
            }
        }
    }
}

/// Writes the root ConfigMap into namespaces of registered clusters,
/// remembering what it wrote so that a snapshot with nothing new writes nothing.
pub struct RootPublisher {
    clusters: Arc<ClusterClients>,
    written: std::sync::Mutex<BTreeMap<(String, String), String>>,
}

impl RootPublisher {
    pub fn new(clusters: Arc<ClusterClients>) -> Self {
        RootPublisher { clusters, written: Default::default() }
    }

    /// Forgets what was written into `cluster` (its client changed or it
    /// left): the next publish writes its ConfigMaps again.
    pub fn forget_cluster(&self, cluster: &str) {
        self.written.lock().expect("written lock").retain(|(c, _), _| c != cluster);
    }

    /// Forgets what was written, so the next publish writes every ConfigMap
    /// again (one deleted by hand comes back).
    pub fn forget(&self) {
        self.written.lock().expect("written lock").clear();
    }

    /// Makes `istio-ca-root-cert` hold `roots[cluster].0` in each namespace
    /// `roots[cluster].1`. Returns how many writes failed (each logged).
    pub async fn publish(&self, roots: &BTreeMap<String, (String, BTreeSet<String>)>) -> usize {
        let mut failed = 0;
        for (cluster, (root_pem, namespaces)) in roots {
            let Some(client) = self.clusters.get(cluster) else { continue };
            for ns in namespaces {
                let key = (cluster.clone(), ns.clone());
                if self.written.lock().expect("written lock").get(&key) == Some(root_pem) {
                    continue;
                }
                let cm = json!({
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {
                        "name": ROOT_CONFIGMAP,
                        "namespace": ns,
                        "labels": { "istio.io/config": "true", "app.kubernetes.io/managed-by": "meshpilot" },
                    },
                    "data": { ROOT_CONFIGMAP_KEY: root_pem },
                });
                let api = Api::<ConfigMap>::namespaced(client.clone(), ns);
                match api.patch(ROOT_CONFIGMAP, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(cm)).await {
                    Ok(_) => {
                        tracing::debug!(cluster, namespace = %ns, "published the mesh root ({ROOT_CONFIGMAP})");
                        self.written.lock().expect("written lock").insert(key, root_pem.clone());
                    }
                    // A namespace being deleted refuses new objects; it is gone soon.
                    Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("being terminated") => {}
                    Err(e) => {
                        failed += 1;
                        tracing::warn!(cluster, namespace = %ns, error = %e, "cannot publish the mesh root ConfigMap {ROOT_CONFIGMAP}");
                    }
                }
            }
        }
        failed
    }
}
