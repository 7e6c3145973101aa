//! `meshpilot cluster register|deregister`, like `meshctl cluster register`
//! but with least privilege: the remote cluster gets a ServiceAccount that
//! can only read what meshpilot watches (Services, EndpointSlices, Pods,
//! Nodes, Namespaces), not cluster-admin. Its token becomes a kubeconfig,
//! stored as a Secret in the management cluster beside a KubernetesCluster.

use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;

use crate::model::api::{DISCOVERY_GROUP_VERSION, KubernetesCluster};
use crate::sources::kubernetes::client_from_kubeconfig_yaml;

const MANAGER: &str = "meshpilot-cluster-register";
/// The remote cluster's reader identity.
pub const READER_NAME: &str = "meshpilot-reader";

#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Give meshpilot read access to a cluster and register it in the management cluster.
    Register(RegisterArgs),
    /// Remove a cluster's registration (and, with --remote-context, its reader identity).
    Deregister(DeregisterArgs),
}

#[derive(Debug, clap::Args)]
pub struct ManagementArgs {
    /// Kubeconfig for both clusters (defaults to $KUBECONFIG or ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The management cluster's context (defaults to the current context).
    #[arg(long)]
    pub context: Option<String>,
    /// Namespace of KubernetesClusters and their Secrets in the management cluster.
    #[arg(short = 'n', long, default_value = "service-mesh-hub")]
    pub namespace: String,
}

#[derive(Debug, clap::Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub management: ManagementArgs,
    /// The name the cluster goes by in the mesh (TrafficPolicy `cluster:` fields).
    #[arg(long)]
    pub remote_cluster_name: String,
    /// The remote cluster's context in the kubeconfig.
    #[arg(long)]
    pub remote_context: String,
    /// A separate kubeconfig for the remote cluster.
    #[arg(long)]
    pub remote_kubeconfig: Option<std::path::PathBuf>,
    /// Namespace for meshpilot's reader ServiceAccount in the remote cluster.
    #[arg(long, default_value = "service-mesh-hub")]
    pub remote_write_namespace: String,
    /// Replace an existing registration of the same name.
    #[arg(long)]
    pub overwrite: bool,
    /// The API server address meshpilot should use for the remote cluster, when it differs
    /// from the kubeconfig's (e.g. an address reachable from inside the management cluster).
    #[arg(long)]
    pub api_server_address: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct DeregisterArgs {
    #[command(flatten)]
    pub management: ManagementArgs,
    #[arg(long)]
    pub remote_cluster_name: String,
    /// Also delete the reader identity from the remote cluster.
    #[arg(long)]
    pub remote_context: Option<String>,
    #[arg(long)]
    pub remote_kubeconfig: Option<std::path::PathBuf>,
    #[arg(long, default_value = "service-mesh-hub")]
    pub remote_write_namespace: String,
}

fn read_kubeconfig(path: Option<&std::path::Path>) -> anyhow::Result<Kubeconfig> {
    match path {
        Some(p) => Kubeconfig::read_from(p).with_context(|| format!("reading kubeconfig {}", p.display())),
        None => Kubeconfig::read().context("reading the kubeconfig ($KUBECONFIG or ~/.kube/config)"),
    }
}

async fn client_for(kubeconfig: Kubeconfig, context: Option<String>) -> anyhow::Result<Client> {
    let options = KubeConfigOptions { context: context.clone(), ..Default::default() };
    let config = Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .with_context(|| format!("kubeconfig context {}", context.as_deref().unwrap_or("(current)")))?;
    Ok(Client::try_from(config)?)
}

/// The remote cluster's server URL and CA (PEM, base64) from the kubeconfig context.
fn remote_endpoint(kubeconfig: &Kubeconfig, context: &str, base: Option<&std::path::Path>) -> anyhow::Result<(String, Option<String>)> {
    let ctx = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .with_context(|| format!("--remote-context {context}: no such context in the kubeconfig"))?;
    let cluster = kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .and_then(|c| c.cluster.as_ref())
        .with_context(|| format!("context {context}: cluster {} is not in the kubeconfig", ctx.cluster))?;
    let server = cluster.server.clone().with_context(|| format!("cluster {}: no server", ctx.cluster))?;
    let ca = match (&cluster.certificate_authority_data, &cluster.certificate_authority) {
        (Some(data), _) => Some(data.clone()),
        (None, Some(path)) => {
            let p = std::path::Path::new(path);
            let p =
                if p.is_relative() { base.and_then(|b| b.parent()).map(|d| d.join(p)).unwrap_or_else(|| p.to_path_buf()) } else { p.to_path_buf() };
            let pem = std::fs::read(&p).with_context(|| format!("reading certificate-authority {}", p.display()))?;
            Some(base64::engine::general_purpose::STANDARD.encode(pem))
        }
        (None, None) => None,
    };
    Ok((server, ca))
}

/// The least RBAC meshpilot needs in a watched cluster: read the workloads,
/// review the ServiceAccount tokens its workloads prove their identity with
/// (Istio's certificate API; `create tokenreviews` and nothing broader), and
/// publish the mesh root as the ConfigMap `istio-ca-root-cert` (no other ConfigMap).
pub fn reader_cluster_role() -> serde_json::Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": { "name": READER_NAME, "labels": { "app.kubernetes.io/managed-by": "meshpilot" } },
        "rules": [
            { "apiGroups": [""], "resources": ["services", "pods", "nodes", "namespaces"], "verbs": ["get", "list", "watch"] },
            { "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"] },
            { "apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"] },
            { "apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"] },
            { "apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["istio-ca-root-cert"], "verbs": ["get", "patch", "update"] }
        ]
    })
}

pub async fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let name = &args.remote_cluster_name;
    let remote_path = args.remote_kubeconfig.clone().or(args.management.kubeconfig.clone());
    let remote_kc = read_kubeconfig(remote_path.as_deref())?;
    let (mut server, ca) = remote_endpoint(&remote_kc, &args.remote_context, remote_path.as_deref())?;
    if let Some(addr) = &args.api_server_address {
        server = addr.clone();
    }
    let remote = client_for(remote_kc, Some(args.remote_context.clone())).await?;
    let mgmt = client_for(read_kubeconfig(args.management.kubeconfig.as_deref())?, args.management.context.clone()).await?;

    let clusters: Api<KubernetesCluster> = Api::namespaced(mgmt.clone(), &args.management.namespace);
    if !args.overwrite && clusters.get_opt(name).await.context("reading KubernetesClusters in the management cluster")?.is_some() {
        bail!("cluster {name} is already registered (KubernetesCluster {}/{name}); pass --overwrite to replace it", args.management.namespace);
    }

    // 1. The reader identity in the remote cluster.
    let ns = &args.remote_write_namespace;
    let ssa = PatchParams::apply(MANAGER).force();
    Api::<Namespace>::all(remote.clone())
        .patch(ns, &ssa, &Patch::Apply(json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } })))
        .await
        .with_context(|| format!("creating namespace {ns} in {}", args.remote_context))?;
    Api::<ServiceAccount>::namespaced(remote.clone(), ns)
        .patch(
            READER_NAME,
            &ssa,
            &Patch::Apply(json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": READER_NAME, "namespace": ns } })),
        )
        .await
        .context("creating the reader ServiceAccount")?;
    Api::<ClusterRole>::all(remote.clone())
        .patch(READER_NAME, &ssa, &Patch::Apply(reader_cluster_role()))
        .await
        .context("creating the reader ClusterRole")?;
    Api::<ClusterRoleBinding>::all(remote.clone())
        .patch(
            READER_NAME,
            &ssa,
            &Patch::Apply(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": { "name": READER_NAME },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": READER_NAME },
                "subjects": [{ "kind": "ServiceAccount", "name": READER_NAME, "namespace": ns }]
            })),
        )
        .await
        .context("binding the reader ClusterRole")?;
    // A long-lived token, filled in by the cluster's token controller.
    let token_secret = format!("{READER_NAME}-token");
    let secrets: Api<Secret> = Api::namespaced(remote.clone(), ns);
    secrets
        .patch(
            &token_secret,
            &ssa,
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
                "metadata": { "name": token_secret, "namespace": ns, "annotations": { "kubernetes.io/service-account.name": READER_NAME } }
            })),
        )
        .await
        .context("creating the reader's token Secret")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let token = loop {
        let s = secrets.get(&token_secret).await?;
        if let Some(t) = s.data.as_ref().and_then(|d| d.get("token")) {
            break String::from_utf8(t.0.clone()).context("token is not UTF-8")?;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the token controller did not fill Secret {ns}/{token_secret} within 30s (is kube-controller-manager running?)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // 2. A kubeconfig for it, proven to work before it is stored.
    let mut cluster = json!({ "server": server });
    if let Some(ca) = &ca {
        cluster["certificate-authority-data"] = json!(ca);
    }
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{ "name": name, "cluster": cluster }],
        "users": [{ "name": READER_NAME, "user": { "token": token } }],
        "contexts": [{ "name": name, "context": { "cluster": name, "user": READER_NAME } }],
        "current-context": name,
    });
    let kubeconfig_yaml = serde_yaml_ng::to_string(&kubeconfig)?;
    if args.api_server_address.is_none() {
        let (reader, _) = client_from_kubeconfig_yaml(&kubeconfig_yaml, None).await?;
        Api::<Service>::all(reader.clone()).list(&ListParams::default().limit(1)).await.context("the new reader identity cannot list Services")?;
        if Api::<Secret>::all(reader).list(&ListParams::default().limit(1)).await.is_ok() {
            bail!("the reader identity can read Secrets: something else grants it more than meshpilot needs");
        }
    }

    // 3. The Secret and the KubernetesCluster in the management cluster.
    let mns = &args.management.namespace;
    Api::<Namespace>::all(mgmt.clone())
        .patch(mns, &ssa, &Patch::Apply(json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": mns } })))
        .await
        .with_context(|| format!("creating namespace {mns} in the management cluster"))?;
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(mns.clone()),
            labels: Some([("app.kubernetes.io/managed-by".to_string(), "meshpilot".to_string())].into()),
            ..Default::default()
        },
        type_: Some("solo.io/kubeconfig".into()),
        data: Some([("kubeconfig".to_string(), ByteString(kubeconfig_yaml.into_bytes()))].into()),
        ..Default::default()
    };
    let mut secret_value = serde_json::to_value(&secret)?;
    secret_value["apiVersion"] = json!("v1");
    secret_value["kind"] = json!("Secret");
    Api::<Secret>::namespaced(mgmt.clone(), mns).patch(name, &ssa, &Patch::Apply(secret_value)).await.context("writing the kubeconfig Secret")?;
    clusters
        .patch(
            name,
            &ssa,
            &Patch::Apply(json!({
                "apiVersion": DISCOVERY_GROUP_VERSION, "kind": "KubernetesCluster",
                "metadata": { "name": name, "namespace": mns },
                "spec": { "secretRef": { "name": name, "namespace": mns }, "context": name, "writeNamespace": ns }
            })),
        )
        .await
        .context("writing the KubernetesCluster")?;
    println!("Registered cluster {name}: KubernetesCluster {mns}/{name}, kubeconfig in Secret {mns}/{name}");
    println!(
        "  reader identity: ServiceAccount {ns}/{READER_NAME} in {} (ClusterRole {READER_NAME}: read Services, EndpointSlices, Pods, Nodes, Namespaces; review tokens; write ConfigMap istio-ca-root-cert)",
        args.remote_context
    );
    println!("  API server: {server}");
    Ok(())
}

pub async fn deregister(args: DeregisterArgs) -> anyhow::Result<()> {
    let name = &args.remote_cluster_name;
    let mgmt = client_for(read_kubeconfig(args.management.kubeconfig.as_deref())?, args.management.context.clone()).await?;
    let mns = &args.management.namespace;
    let dp = DeleteParams::default();
    let mut removed = 0;
    if Api::<KubernetesCluster>::namespaced(mgmt.clone(), mns).delete(name, &dp).await.is_ok() {
        removed += 1;
    }
    if Api::<Secret>::namespaced(mgmt, mns).delete(name, &dp).await.is_ok() {
        removed += 1;
    }
    if let Some(ctx) = &args.remote_context {
        let path = args.remote_kubeconfig.clone().or(args.management.kubeconfig.clone());
        let remote = client_for(read_kubeconfig(path.as_deref())?, Some(ctx.clone())).await?;
        let ns = &args.remote_write_namespace;
        let _ = Api::<ClusterRoleBinding>::all(remote.clone()).delete(READER_NAME, &dp).await;
        let _ = Api::<ClusterRole>::all(remote.clone()).delete(READER_NAME, &dp).await;
        let _ = Api::<ServiceAccount>::namespaced(remote, ns).delete(READER_NAME, &dp).await;
    }
    if removed == 0 {
        bail!("cluster {name} is not registered in {mns}");
    }
    println!("Deregistered cluster {name}");
    Ok(())
}
