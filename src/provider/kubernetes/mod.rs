//! The Kubernetes provider: a stack's services and exposures on any cluster
//! (a kubeconfig context, or an EKS cluster reached by endpoint, CA and
//! token), with server-side apply.
//!
//! - Desired objects ([`objects`], pure): per service a Deployment (the
//!   runtime image pinned by digest, [`images`]) with its ConfigMap (the
//!   `service.json` and the generations' `split.json`; one resource, so a
//!   weight change updates the ConfigMap alone), a Secret (credentials by
//!   reference, resolved at apply time; only a digest is planned) and an
//!   autoscaler; per exposure a Service, an Ingress and a NetworkPolicy;
//!   and the namespace.
//! - Live objects are found by their labels (one list call per kind across
//!   namespaces) and projected onto the attributes mesh sets ([`project`]),
//!   so defaulted and allocated fields never show as differences.
//! - Apply server-side applies with field manager `mesh` (forced), removes
//!   what other managers added to what mesh owns wholly (data keys, pod
//!   template labels, containers, pull secrets: [`foreign_patch`]), then
//!   waits for Deployments to roll out ([`rollout`]) unless `--no-wait`.
//! - With registry credentials, a `kubernetes.io/dockerconfigjson` Secret
//!   (`pull_secret.registry`) lets the nodes pull the images.
//!
//! This is the only module that imports `kube`.

mod images;
mod kinds;
mod lease;
mod objects;
mod project;
mod rollout;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value as J, json};

use super::wait::{Every, Polled, Report, Wait, poll_until};
use super::{ApplyContext, Provider, ProviderError};
use crate::image::RegistryAuth;
use crate::output::Outputs;
use crate::plan::{Action, Change};
use crate::resource::{Address, Desired, Live, ProviderId, Scope, Value};
use crate::stack::{ClusterKind, Stack};

pub use images::find_runtime;
pub use kinds::Kind;
pub use objects::{RUNTIME_PORT, namespace};

/// How to reach a cluster's API server without a kubeconfig (EKS: from
/// `DescribeCluster` and an STS-signed token). `Debug` hides the token.
#[derive(Clone)]
pub struct KubeAccess {
    /// `https://...`
    pub endpoint: String,
    /// The cluster CA, PEM (empty: the system's roots).
    pub ca_pem: String,
    /// Bearer token.
    pub token: String,
}

impl fmt::Debug for KubeAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeAccess")
            .field("endpoint", &self.endpoint)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Produces a [`KubeAccess`] when asked; `None` when the cluster does not
/// exist yet (it is to be created by the same apply): live state is then
/// empty and every object plans as a create.
pub type AccessSource = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Option<KubeAccess>, ProviderError>> + Send>>
        + Send
        + Sync,
>;

/// Credentials for pushing to a registry host (e.g. ECR's, from the aws
/// provider's `GetAuthorizationToken`), asked at push time. `None`: the
/// host is not one the source knows; [`Settings::registry_auth`] is used.
pub type RegistryAuthSource = Arc<
    dyn Fn(
            String,
        )
            -> Pin<Box<dyn Future<Output = Result<Option<RegistryAuth>, ProviderError>> + Send>>
        + Send
        + Sync,
>;

/// Knobs of the provider; [`Settings::from_env`] suits real clusters.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Registry URL used when the environment names none (`MESH_REGISTRY`).
    pub registry: Option<String>,
    /// Credentials for the registry (`MESH_REGISTRY_USER`/`MESH_REGISTRY_PASSWORD`, else anonymous).
    pub registry_auth: RegistryAuth,
    /// The runtime binary images ship ([`find_runtime`]).
    pub runtime: Option<PathBuf>,
    /// How long a Deployment may take to roll out (`MESH_ROLLOUT_TIMEOUT_SECS`, default 600).
    pub rollout_timeout: Duration,
    /// First poll interval while waiting (grows to 2 s).
    pub poll_interval: Duration,
    /// How long a deletion may take (LoadBalancer Services, namespaces).
    pub delete_timeout: Duration,
    /// How long a changed Secret takes to reach the pods' volumes (the
    /// kubelet's sync period and cache; the runtime reads key files again
    /// every second): each step of a key rotation waits this long
    /// (`MESH_KEY_PROPAGATION_SECS`, default 120).
    pub key_propagation: Duration,
}

impl Settings {
    pub fn from_env() -> Settings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let registry_auth = match (var("MESH_REGISTRY_USER"), var("MESH_REGISTRY_PASSWORD")) {
            (Some(user), Some(password)) => RegistryAuth::Basic { user, password },
            _ => RegistryAuth::Anonymous,
        };
        Settings {
            registry: var("MESH_REGISTRY"),
            registry_auth,
            runtime: find_runtime(),
            rollout_timeout: Duration::from_secs(
                var("MESH_ROLLOUT_TIMEOUT_SECS")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(600),
            ),
            poll_interval: Duration::from_millis(200),
            delete_timeout: Duration::from_secs(600),
            key_propagation: Duration::from_secs(
                var("MESH_KEY_PROPAGATION_SECS")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(120),
            ),
        }
    }

    /// How often a wait polls: from `poll_interval`, growing to 2 s.
    pub(crate) fn every(&self) -> Every {
        Every::growing(self.poll_interval, Duration::from_secs(2))
    }
}

/// A client and what to call the cluster in messages.
#[derive(Clone)]
struct Conn {
    client: kube::Client,
    server: String,
    context: String,
}

enum Connection {
    Ready(Conn),
    /// Built on first use from an [`AccessSource`]; rebuilt after ten
    /// minutes (EKS tokens live about fifteen).
    Lazy {
        name: String,
        source: AccessSource,
        cached: tokio::sync::Mutex<Option<(Conn, Instant)>>,
    },
}

/// The Kubernetes provider.
pub struct KubernetesProvider {
    connection: Connection,
    settings: Settings,
    images: images::Images,
    /// The stack's namespace, once known: where to look when listing across
    /// namespaces is forbidden (a user with rights in one namespace only).
    namespace: std::sync::Mutex<Option<String>>,
    /// The stack's digest key ([`objects::DIGEST_KEY_SECRET`]), as last
    /// observed or made.
    digest_key: std::sync::Mutex<Option<Vec<u8>>>,
    /// Where push credentials come from before [`Settings::registry_auth`].
    registry_auth_source: Option<RegistryAuthSource>,
    /// The URL of the environment's registry a test instance pushes to
    /// ([`objects::Registry::Reused`]), instead of the stack's own.
    reused_registry: Option<String>,
}

const OWNER: &str = "mesh";

impl KubernetesProvider {
    /// For an environment whose cluster is `kind = "existing"`: its context,
    /// else `MESH_KUBE_CONTEXT`, else the kubeconfig's current one
    /// (`KUBECONFIG` honoured).
    pub async fn for_stack(stack: &Stack, settings: Settings) -> Result<Self, ProviderError> {
        let named = stack
            .env
            .cluster
            .as_ref()
            .and_then(|c| stack.clusters.get(c))
            .and_then(|c| match &c.kind {
                ClusterKind::Existing { context } => context.clone(),
                ClusterKind::Eks(_) => None,
            });
        let context = named.or_else(|| {
            std::env::var("MESH_KUBE_CONTEXT")
                .ok()
                .filter(|c| !c.is_empty())
        });
        Ok(Self::from_kubeconfig(context.as_deref(), settings)
            .await?
            .with_state_dir(stack))
    }

    /// From the kubeconfig (`KUBECONFIG` or `~/.kube/config`), at `context` or the current one.
    pub async fn from_kubeconfig(
        context: Option<&str>,
        settings: Settings,
    ) -> Result<Self, ProviderError> {
        let fail = |message: String| ProviderError::Observe {
            provider: ProviderId::Kubernetes,
            message,
        };
        let where_ = std::env::var("KUBECONFIG")
            .map(|k| format!("KUBECONFIG={k}"))
            .unwrap_or_else(|_| "~/.kube/config".to_owned());
        let kc = Kubeconfig::read()
            .map_err(|e| fail(format!("cannot read the kubeconfig ({where_}): {e}")))?;
        let context = context.map(str::to_owned).or_else(|| kc.current_context.clone()).ok_or_else(|| {
            fail(format!("the kubeconfig ({where_}) has no current context: name one in the stack's cluster (`context = ...`) or with MESH_KUBE_CONTEXT"))
        })?;
        let options = KubeConfigOptions {
            context: Some(context.clone()),
            ..Default::default()
        };
        let config = kube::Config::from_custom_kubeconfig(kc, &options)
            .await
            .map_err(|e| fail(format!("kubeconfig context {context} ({where_}): {e}")))?;
        let conn = connect(config, context)?;
        Ok(KubernetesProvider {
            connection: Connection::Ready(conn),
            settings: settings.clone(),
            images: images::Images::new(settings.runtime),
            namespace: std::sync::Mutex::new(None),
            digest_key: std::sync::Mutex::new(None),
            registry_auth_source: None,
            reused_registry: None,
        })
    }

    /// From an endpoint, CA and token (e.g. an EKS cluster that exists).
    pub async fn from_access(
        access: &KubeAccess,
        settings: Settings,
    ) -> Result<Self, ProviderError> {
        let conn = connect_access(access, "eks").await?;
        Ok(KubernetesProvider {
            connection: Connection::Ready(conn),
            settings: settings.clone(),
            images: images::Images::new(settings.runtime),
            namespace: std::sync::Mutex::new(None),
            digest_key: std::sync::Mutex::new(None),
            registry_auth_source: None,
            reused_registry: None,
        })
    }

    /// From an [`AccessSource`] asked on first use (an EKS cluster that may
    /// not exist yet). `name` names the cluster in messages.
    pub fn from_access_source(name: &str, source: AccessSource, settings: Settings) -> Self {
        KubernetesProvider {
            connection: Connection::Lazy {
                name: name.to_owned(),
                source,
                cached: tokio::sync::Mutex::new(None),
            },
            settings: settings.clone(),
            images: images::Images::new(settings.runtime),
            namespace: std::sync::Mutex::new(None),
            digest_key: std::sync::Mutex::new(None),
            registry_auth_source: None,
            reused_registry: None,
        }
    }

    /// Asks `source` for push credentials first (ECR on an aws environment).
    pub fn with_registry_auth_source(mut self, source: RegistryAuthSource) -> Self {
        self.registry_auth_source = Some(source);
        self
    }

    /// Pushes images to `url`, the registry of the environment a test
    /// instance reuses, rather than to a registry of its own.
    pub fn with_reused_registry(mut self, url: String) -> Self {
        self.reused_registry = Some(url);
        self
    }

    /// The credentials to push to `repository` (`host/path`).
    async fn registry_auth_for(&self, repository: &str) -> Result<RegistryAuth, ProviderError> {
        if let Some(source) = &self.registry_auth_source
            && let Ok((host, _)) = crate::image::registry_and_repository(repository)
            && let Some(auth) = source(host).await?
        {
            return Ok(auth);
        }
        Ok(self.settings.registry_auth.clone())
    }

    /// The pull secret the images need: for a registry by URL pushed to
    /// with credentials (`MESH_REGISTRY_USER`/`MESH_REGISTRY_PASSWORD`).
    /// A stack's ECR registry needs none: EKS nodes pull with their role.
    fn pull_secret(&self, registry: Option<&objects::Registry>) -> Option<objects::PullSecret> {
        let Some(objects::Registry::Url(url)) = registry else {
            return None;
        };
        let RegistryAuth::Basic { user, password } = &self.settings.registry_auth else {
            return None;
        };
        let (host, _) = crate::image::registry_and_repository(url).ok()?;
        let config = objects::docker_config(&host, user, password);
        Some(objects::PullSecret {
            digest: self
                .known_digest_key()
                .map(|key| objects::pull_secret_digest(&key, &config)),
            host,
        })
    }

    fn known_digest_key(&self) -> Option<Vec<u8>> {
        self.digest_key
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn remember_digest_key(&self, key: Option<Vec<u8>>) {
        *self.digest_key.lock().unwrap_or_else(|e| e.into_inner()) = key;
    }

    /// The digest key at apply: as observed, else read from (or made in,
    /// by its own change, which every digest depends on) the namespace.
    async fn digest_key(
        &self,
        conn: &Conn,
        ns: &str,
        address: &Address,
    ) -> Result<Vec<u8>, ProviderError> {
        if let Some(key) = self.known_digest_key() {
            return Ok(key);
        }
        let values = read_secret(conn, ns, objects::DIGEST_KEY_SECRET, address).await?;
        let key = values
            .get(objects::DIGEST_KEY)
            .map(|v| v.as_bytes().to_vec())
            .filter(|k| k.len() >= 32)
            .ok_or_else(|| {
                invalid(
                    address,
                    format!(
                        "the Secret {ns}/{} holds no digest key",
                        objects::DIGEST_KEY_SECRET
                    ),
                )
            })?;
        self.remember_digest_key(Some(key.clone()));
        Ok(key)
    }

    /// Remembers image digests under the stack's state folder (`.mesh/<env>/`).
    pub fn with_state_dir(self, stack: &Stack) -> Self {
        self.images
            .use_cache_dir(&super::local::state_dir(&stack.root, &stack.env.name));
        self.remember_namespace(stack);
        self
    }

    fn remember_namespace(&self, stack: &Stack) {
        *self.namespace.lock().unwrap_or_else(|e| e.into_inner()) = Some(objects::namespace(stack));
    }

    /// The client, or `None` when the cluster does not exist yet.
    async fn conn(&self) -> Result<Option<Conn>, ProviderError> {
        match &self.connection {
            Connection::Ready(c) => Ok(Some(c.clone())),
            Connection::Lazy {
                name,
                source,
                cached,
            } => {
                let mut cached = cached.lock().await;
                if let Some((c, at)) = cached.as_ref()
                    && at.elapsed() < Duration::from_secs(600)
                {
                    return Ok(Some(c.clone()));
                }
                let Some(access) = source().await? else {
                    return Ok(None);
                };
                let c = connect_access(&access, name).await?;
                *cached = Some((c.clone(), Instant::now()));
                Ok(Some(c))
            }
        }
    }

    async fn require_conn(&self, address: &Address) -> Result<Conn, ProviderError> {
        self.conn().await?.ok_or_else(|| ProviderError::Api {
            address: address.clone(),
            message: "the cluster does not exist (yet)".into(),
        })
    }
}

/// With every feature on, rustls sees two crypto back ends (ring from kube,
/// aws-lc-rs from the AWS SDK) and cannot pick one itself: choose ring.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn connect(mut config: kube::Config, context: String) -> Result<Conn, ProviderError> {
    install_crypto_provider();
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(Duration::from_secs(60));
    let server = config
        .cluster_url
        .to_string()
        .trim_end_matches('/')
        .to_owned();
    let client = kube::Client::try_from(config).map_err(|e| ProviderError::Observe {
        provider: ProviderId::Kubernetes,
        message: format!(
            "cannot set up a client for the Kubernetes API at {server} (context {context}): {}",
            root_cause(&e)
        ),
    })?;
    Ok(Conn {
        client,
        server,
        context,
    })
}

async fn connect_access(access: &KubeAccess, name: &str) -> Result<Conn, ProviderError> {
    let mut cluster = json!({ "server": access.endpoint });
    if !access.ca_pem.trim().is_empty() {
        // Kubeconfig's `certificate-authority-data` is base64; k8s-openapi's ByteString serializes as it.
        cluster["certificate-authority-data"] =
            serde_json::to_value(k8s_openapi::ByteString(access.ca_pem.as_bytes().to_vec()))
                .unwrap_or_default();
    }
    let kc = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{ "name": name, "cluster": cluster }],
        "users": [{ "name": name, "user": { "token": access.token } }],
        "contexts": [{ "name": name, "context": { "cluster": name, "user": name } }],
        "current-context": name,
    });
    let fail = |message: String| ProviderError::Observe {
        provider: ProviderId::Kubernetes,
        message,
    };
    let kc: Kubeconfig =
        serde_json::from_value(kc).map_err(|e| fail(format!("access to cluster {name}: {e}")))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| {
            fail(format!(
                "access to cluster {name} at {}: {e}",
                access.endpoint
            ))
        })?;
    connect(config, name.to_owned())
}

/// The innermost cause of an error, for one-line messages.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// An API error as one line: the server's message, or why it was not reached.
fn describe(e: &kube::Error, conn: &Conn) -> String {
    match e {
        kube::Error::Api(s) => {
            if s.reason.is_empty() {
                s.message.clone()
            } else {
                format!("{} ({}, {})", s.message, s.reason, s.code)
            }
        }
        other => format!(
            "cannot reach the Kubernetes API at {} (context {}): {}",
            conn.server,
            conn.context,
            root_cause(other)
        ),
    }
}

/// The objects of one kind carrying `lp`'s labels, across namespaces; where
/// that is forbidden (403), in the stack's namespace only.
async fn list_owned(
    conn: &Conn,
    kind: Kind,
    lp: &ListParams,
    namespace: Option<&str>,
) -> Result<Vec<DynamicObject>, kube::Error> {
    match api_for(conn, kind, None).list(lp).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(s)) if s.code == 403 && namespace.is_some() => {
            let ns = namespace.unwrap_or_default();
            if kind == Kind::Namespace {
                // One namespace by name; owned only if it carries the stack's labels.
                let wanted = lp.label_selector.clone().unwrap_or_default();
                let obj = api_for(conn, kind, None).get_opt(ns).await.ok().flatten();
                Ok(obj
                    .filter(|o| {
                        let labels = o.metadata.labels.clone().unwrap_or_default();
                        wanted.split(',').all(|kv| {
                            kv.split_once('=')
                                .is_some_and(|(k, v)| labels.get(k).map(String::as_str) == Some(v))
                        })
                    })
                    .into_iter()
                    .collect())
            } else {
                Ok(api_for(conn, kind, Some(ns)).list(lp).await?.items)
            }
        }
        Err(e) => Err(e),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn api_for(conn: &Conn, kind: Kind, namespace: Option<&str>) -> Api<DynamicObject> {
    let ar = kind.api_resource();
    match namespace {
        Some(ns) if kind.namespaced() => Api::namespaced_with(conn.client.clone(), ns, &ar),
        _ => Api::all_with(conn.client.clone(), &ar),
    }
}

/// The live resource of an object mesh owns (`None` without an address).
fn live_of(kind: Kind, obj: &J, digest_key: Option<&[u8]>) -> Option<Live> {
    let address = obj
        .pointer("/metadata/annotations")?
        .get(kinds::ANNOTATION_ADDRESS)?
        .as_str()?;
    let name = obj.pointer("/metadata/name")?.as_str()?;
    let ns = obj.pointer("/metadata/namespace").and_then(J::as_str);
    let id = match ns {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    };
    let mut live = Live::new(
        Address::new(address),
        kind.resource_kind(),
        ProviderId::Kubernetes,
        id,
    )
    .output("name", name);
    live.attrs = project::project(kind, obj);
    if kind == Kind::Secret
        && let Some(digest) = project::secret_data_digest(obj, digest_key)
    {
        live.attrs.insert("data".to_owned(), digest);
    }
    if let Some(ns) = ns {
        live = live.output("namespace", ns);
    }
    match kind {
        Kind::Namespace => {
            let adopted = obj
                .pointer("/metadata/annotations")
                .and_then(|a| a.get(kinds::ANNOTATION_ADOPTED))
                .and_then(J::as_str)
                == Some("true");
            if adopted {
                live = live.output("adopted", true);
            }
        }
        Kind::Service => {
            let port = obj
                .pointer("/spec/ports/0/port")
                .and_then(J::as_i64)
                .unwrap_or(0);
            if let Some(ip) = obj.pointer("/spec/clusterIP").and_then(J::as_str) {
                live = live.output("cluster_ip", ip);
            }
            if let Some(np) = obj.pointer("/spec/ports/0/nodePort").and_then(J::as_i64) {
                live = live.output("node_port", np);
            }
            let lb = obj
                .pointer("/status/loadBalancer/ingress/0")
                .and_then(|i| i.get("hostname").or_else(|| i.get("ip")))
                .and_then(J::as_str);
            // TLS on the load balancer's port (an ACM certificate, `aws`).
            let annotation = |k: &str| {
                obj.pointer("/metadata/annotations")
                    .and_then(|a| a.get(k))
                    .and_then(J::as_str)
            };
            let tls = annotation(kinds::ANNOTATION_AWS_SSL_CERT).is_some()
                && annotation(kinds::ANNOTATION_AWS_SSL_PORTS)
                    .is_some_and(|ports| ports.split(',').any(|p| p.trim() == port.to_string()));
            if let Some(host) = lb {
                let scheme = if tls { "https" } else { "http" };
                live = live.output("url", format!("{scheme}://{host}:{port}"));
            } else if let Some(ns) = ns {
                live = live.output(
                    "url",
                    format!("http://{name}.{ns}.svc.cluster.local:{port}"),
                );
            }
        }
        Kind::Ingress => {
            let host = obj
                .pointer("/spec/rules/0/host")
                .and_then(J::as_str)
                .unwrap_or_default();
            let path = obj
                .pointer("/spec/rules/0/http/paths/0/path")
                .and_then(J::as_str)
                .unwrap_or("/");
            // HTTPS where a `tls` entry covers the host.
            let tls = obj
                .pointer("/spec/tls")
                .and_then(J::as_array)
                .into_iter()
                .flatten()
                .any(|t| {
                    t.get("hosts")
                        .and_then(J::as_array)
                        .is_some_and(|h| h.iter().any(|h| h.as_str() == Some(host)))
                });
            let scheme = if tls { "https" } else { "http" };
            live = live.output(
                "url",
                format!("{scheme}://{host}{}", path.trim_end_matches('/')),
            );
        }
        _ => {}
    }
    Some(live)
}

/// Folds a service's ConfigMap into its Deployment's live resource
/// ([`objects::configmap_attrs`]). One whose Deployment is not there (an
/// apply stopped between the two, or a Deployment deleted by hand) stands
/// for the Deployment, so the plan makes it and a destroy deletes both.
/// ConfigMaps applied before they were part of the Deployment carry the
/// address `service.NAME.configmap`.
fn fold_configmap(lives: &mut Vec<Live>, cm: &J) {
    let annotated = cm
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(kinds::ANNOTATION_ADDRESS))
        .and_then(J::as_str);
    let Some(service) = annotated
        .and_then(|a| a.strip_prefix("service."))
        .and_then(|a| {
            a.strip_suffix(".deployment")
                .or_else(|| a.strip_suffix(".configmap"))
        })
    else {
        return;
    };
    let address = objects::sub(&Address::of("service", service), "deployment");
    let attrs = objects::configmap_attrs(cm);
    if let Some(dep) = lives.iter_mut().find(|l| l.address == address) {
        dep.attrs.extend(attrs);
        return;
    }
    let ns = cm
        .pointer("/metadata/namespace")
        .and_then(J::as_str)
        .unwrap_or("default");
    let mut live = Live::new(
        address,
        Kind::Deployment.resource_kind(),
        ProviderId::Kubernetes,
        format!("{ns}/{service}"),
    )
    .output("name", service)
    .output("namespace", ns)
    .attr("name", Value::str(service))
    .attr("namespace", Value::str(ns));
    live.attrs.extend(attrs);
    lives.push(live);
}

/// A strategic merge patch deleting what `live` holds beyond `manifest` in
/// the parts mesh declares as wholly its own: a ConfigMap's or Secret's
/// data keys; a Deployment's pod template labels, containers and pull
/// secrets. `None` when there is nothing foreign.
fn foreign_patch(kind: Kind, manifest: &J, live: &J) -> Option<J> {
    let extra_keys = |path: &str| -> serde_json::Map<String, J> {
        let wanted = manifest.pointer(path).and_then(J::as_object);
        live.pointer(path)
            .and_then(J::as_object)
            .into_iter()
            .flatten()
            .filter(|(k, _)| !wanted.is_some_and(|w| w.contains_key(*k)))
            .map(|(k, _)| (k.clone(), J::Null))
            .collect()
    };
    let extra_items = |path: &str| -> Vec<J> {
        let named = |v: Option<&J>| -> Vec<String> {
            v.and_then(J::as_array)
                .into_iter()
                .flatten()
                .filter_map(|i| i.get("name").and_then(J::as_str).map(str::to_owned))
                .collect()
        };
        let wanted = named(manifest.pointer(path));
        named(live.pointer(path))
            .into_iter()
            .filter(|n| !wanted.contains(n))
            .map(|n| json!({ "name": n, "$patch": "delete" }))
            .collect()
    };
    let mut patch = json!({});
    match kind {
        Kind::ConfigMap | Kind::Secret => {
            let data = extra_keys("/data");
            if !data.is_empty() {
                patch["data"] = J::Object(data);
            }
            if kind == Kind::ConfigMap {
                let binary = extra_keys("/binaryData");
                if !binary.is_empty() {
                    patch["binaryData"] = J::Object(binary);
                }
            }
        }
        Kind::Deployment => {
            let labels = extra_keys("/spec/template/metadata/labels");
            if !labels.is_empty() {
                patch["spec"]["template"]["metadata"]["labels"] = J::Object(labels);
            }
            for list in ["containers", "imagePullSecrets"] {
                let extra = extra_items(&format!("/spec/template/spec/{list}"));
                if !extra.is_empty() {
                    patch["spec"]["template"]["spec"][list] = J::Array(extra);
                }
            }
        }
        _ => {}
    }
    (patch != json!({})).then_some(patch)
}

fn to_json(obj: &DynamicObject) -> J {
    serde_json::to_value(obj).unwrap_or(J::Null)
}

/// A Secret's values (`data`, decoded; not UTF-8: left out).
fn secret_values(obj: &J) -> BTreeMap<String, String> {
    obj.pointer("/data")
        .and_then(J::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            let bytes = serde_json::from_value::<k8s_openapi::ByteString>(v.clone()).ok()?;
            Some((k.clone(), String::from_utf8(bytes.0).ok()?))
        })
        .collect()
}

/// The values of Secret `ns/name`; none when it does not exist.
async fn read_secret(
    conn: &Conn,
    ns: &str,
    name: &str,
    address: &Address,
) -> Result<BTreeMap<String, String>, ProviderError> {
    let api = api_for(conn, Kind::Secret, Some(ns));
    let found = api.get_opt(name).await.map_err(|e| ProviderError::Api {
        address: address.clone(),
        message: format!("reading Secret {ns}/{name}: {}", describe(&e, conn)),
    })?;
    Ok(found
        .map(|o| secret_values(&to_json(&o)))
        .unwrap_or_default())
}

/// The verifiers' Secret for (caller, old key, new key): of both keys, or
/// of the new one only.
fn verifier_lines(fresh: &[(String, String, String)], with_old: bool) -> BTreeMap<String, String> {
    fresh
        .iter()
        .map(|(caller, old, new)| {
            let keys = if with_old { vec![old, new] } else { vec![new] };
            let lines: Vec<String> = keys
                .into_iter()
                .map(|k| mesh_runtime::auth::verifier(caller, k))
                .collect();
            (caller.clone(), lines.join("\n"))
        })
        .collect()
}

/// A new random key (64 hex digits).
fn new_key(address: &Address) -> Result<String, ProviderError> {
    crate::provider::local::secrets::random_key()
        .map(hex::encode)
        .map_err(|source| ProviderError::Io {
            context: format!("{address}: making a key"),
            source,
        })
}

fn internal_str<'a>(d: &'a Desired, name: &str) -> Option<&'a str> {
    d.attrs.get(name).and_then(|a| a.value.as_str())
}

fn invalid(address: &Address, message: impl Into<String>) -> ProviderError {
    ProviderError::Invalid {
        address: address.clone(),
        message: message.into(),
    }
}

impl KubernetesProvider {
    /// Server-side applies a desired object (resolving secrets and pushing
    /// the image first), waits for Deployments, returns the live object.
    async fn put(
        &self,
        kind: Kind,
        change: &Change,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let address = &change.address;
        let d = change
            .desired
            .as_ref()
            .ok_or_else(|| invalid(address, "no desired state"))?;
        let text = internal_str(d, objects::ATTR_MANIFEST)
            .ok_or_else(|| invalid(address, "no manifest"))?;
        let mut manifest: J = serde_json::from_str(text)
            .map_err(|e| invalid(address, format!("the planned manifest does not parse: {e}")))?;
        let secrets = match internal_str(d, objects::ATTR_SECRETS) {
            Some(s) => {
                let refs: std::collections::BTreeMap<String, objects::SecretSource> =
                    serde_json::from_str(s).map_err(|e| {
                        invalid(
                            address,
                            format!("the planned secret references do not parse: {e}"),
                        )
                    })?;
                // Read now, at apply time; only the digest is ever written outside the Secret.
                Some(objects::resolve_secrets(&refs).map_err(|m| invalid(address, m))?)
            }
            None => None,
        };
        let conn = self.require_conn(address).await?;
        let mut configmap = None;
        let name = manifest
            .pointer("/metadata/name")
            .and_then(J::as_str)
            .unwrap_or_default()
            .to_owned();
        let ns = manifest
            .pointer("/metadata/namespace")
            .and_then(J::as_str)
            .map(str::to_owned);
        let in_ns = ns.as_deref().unwrap_or("default");
        match kind {
            // Keys mesh makes: those there are kept, missing ones made.
            Kind::Secret if internal_str(d, objects::ATTR_GENERATE).is_some() => {
                let wanted: Vec<String> =
                    serde_json::from_str(internal_str(d, objects::ATTR_GENERATE).unwrap_or("[]"))
                        .unwrap_or_default();
                let mut values = read_secret(&conn, in_ns, &name, address).await?;
                values.retain(|k, v| wanted.contains(k) && v.len() >= 32);
                for k in wanted {
                    if let std::collections::btree_map::Entry::Vacant(e) = values.entry(k) {
                        e.insert(new_key(address)?);
                    }
                }
                manifest["data"] = objects::secret_data(&values);
            }
            // Verifiers, from the callers' keys (applied before: dependencies).
            Kind::Secret if internal_str(d, objects::ATTR_VERIFIERS).is_some() => {
                let callers: Vec<String> =
                    serde_json::from_str(internal_str(d, objects::ATTR_VERIFIERS).unwrap_or("[]"))
                        .unwrap_or_default();
                let mut values = BTreeMap::new();
                for caller in callers {
                    let secret = objects::key_secret_name(&caller);
                    let keys = read_secret(&conn, in_ns, &secret, address).await?;
                    let key = keys.get(&caller).ok_or_else(|| {
                        invalid(address, format!("the Secret {in_ns}/{secret} holds no key"))
                    })?;
                    values.insert(caller.clone(), mesh_runtime::auth::verifier(&caller, key));
                }
                manifest["data"] = objects::secret_data(&values);
            }
            Kind::Secret if internal_str(d, objects::ATTR_PULL_SECRET).is_some() => {
                let host = internal_str(d, objects::ATTR_PULL_SECRET).unwrap_or_default();
                let RegistryAuth::Basic { user, password } = &self.settings.registry_auth else {
                    return Err(invalid(
                        address,
                        "the registry's credentials (MESH_REGISTRY_USER, MESH_REGISTRY_PASSWORD) are not set any more; set them or plan again",
                    ));
                };
                let config = objects::docker_config(host, user, password);
                let key = self.digest_key(&conn, in_ns, address).await?;
                manifest["metadata"]["annotations"][kinds::ANNOTATION_SECRET_HASH] =
                    json!(objects::pull_secret_digest(&key, &config));
                manifest["data"] =
                    objects::secret_data(&[(objects::DOCKER_CONFIG_KEY.to_owned(), config)].into());
            }
            Kind::Secret => {
                let values = secrets.unwrap_or_default();
                let key = self.digest_key(&conn, in_ns, address).await?;
                manifest["metadata"]["annotations"][kinds::ANNOTATION_SECRET_HASH] =
                    json!(objects::secret_digest(&key, &values));
                manifest["data"] = objects::secret_data(&values);
            }
            Kind::Deployment => {
                // Its ConfigMap first: the pods it starts mount it.
                if let Some(text) = internal_str(d, objects::ATTR_CONFIGMAP) {
                    let cm: J = serde_json::from_str(text).map_err(|e| {
                        invalid(
                            address,
                            format!("the planned ConfigMap does not parse: {e}"),
                        )
                    })?;
                    let cm = self
                        .apply_object(Kind::ConfigMap, &conn, cm, address)
                        .await?;
                    configmap = Some(cm);
                }
                // The weights alone: the kubelet updates the pods' split file in
                // place and the runtimes take it up; nothing rolls out.
                let split_only =
                    !change.fields.is_empty() && change.fields.iter().all(|f| f.path == "split");
                if let (true, Some(live), Some(cm)) = (split_only, &change.live, &configmap) {
                    ctx.progress(
                        address,
                        "new weights in the ConfigMap; the pods take them up when the kubelet refreshes the file (about a minute)",
                    );
                    let mut live = live.clone();
                    live.attrs.extend(objects::configmap_attrs(cm));
                    return Ok(live);
                }
                if let Some(values) = &secrets {
                    let key = self.digest_key(&conn, in_ns, address).await?;
                    manifest["spec"]["template"]["metadata"]["annotations"]
                        [kinds::ANNOTATION_SECRET_HASH] =
                        json!(objects::secret_digest(&key, values));
                }
                let image = self.push_image(d, change.live.as_ref(), ctx).await?;
                manifest["spec"]["template"]["spec"]["containers"][0]["image"] = json!(image);
            }
            _ => {}
        }
        let api = api_for(&conn, kind, ns.as_deref());
        // A namespace that is already there (made by hand, or by another
        // tool) is adopted: destroy will give it back rather than delete it.
        if kind == Kind::Namespace && change.live.is_none() {
            let existing = api.get_opt(&name).await.map_err(|e| ProviderError::Api {
                address: address.clone(),
                message: format!("reading Namespace {name}: {}", describe(&e, &conn)),
            })?;
            if existing.is_some() {
                manifest["metadata"]["annotations"][kinds::ANNOTATION_ADOPTED] = json!("true");
                ctx.progress(
                    address,
                    &format!("namespace {name} already exists: adopting it (destroy will leave it in place)"),
                );
            }
        }
        let mut obj = self.apply_object(kind, &conn, manifest, address).await?;
        if kind == Kind::Deployment && !ctx.no_wait {
            let waiter = rollout::Waiter {
                api: &api,
                pods: Api::namespaced_with(
                    conn.client.clone(),
                    ns.as_deref().unwrap_or("default"),
                    &kinds::pod_resource(),
                ),
                conn: &conn,
                settings: &self.settings,
            };
            obj = waiter
                .wait(address, &name, ns.as_deref().unwrap_or("default"), ctx)
                .await?;
        }
        if kind == Kind::Secret && name == objects::DIGEST_KEY_SECRET {
            let key = secret_values(&obj).remove(objects::DIGEST_KEY);
            self.remember_digest_key(key.map(String::into_bytes));
        }
        let mut live =
            live_of(kind, &obj, self.known_digest_key().as_deref()).ok_or_else(|| {
                invalid(
                    address,
                    "the applied object has no mesh.dev/address annotation",
                )
            })?;
        if let Some(cm) = &configmap {
            live.attrs.extend(objects::configmap_attrs(cm));
        }
        Ok(live)
    }

    /// Server-side applies `manifest` (forced, field manager `mesh`), then
    /// removes what other managers added to what mesh owns wholly.
    async fn apply_object(
        &self,
        kind: Kind,
        conn: &Conn,
        manifest: J,
        address: &Address,
    ) -> Result<J, ProviderError> {
        let name = manifest
            .pointer("/metadata/name")
            .and_then(J::as_str)
            .unwrap_or_default()
            .to_owned();
        let ns = manifest.pointer("/metadata/namespace").and_then(J::as_str);
        let api = api_for(conn, kind, ns);
        let params = PatchParams::apply(OWNER).force();
        let obj = api
            .patch(&name, &params, &Patch::Apply(&manifest))
            .await
            .map_err(|e| ProviderError::Api {
                address: address.clone(),
                message: format!(
                    "applying {} {}: {}",
                    kind.kind(),
                    ns.map(|n| format!("{n}/{name}")).unwrap_or(name.clone()),
                    describe(&e, conn)
                ),
            })?;
        let obj = to_json(&obj);
        if foreign_patch(kind, &manifest, &obj).is_some() {
            return self
                .remove_foreign(kind, &api, &manifest, obj, address, conn)
                .await;
        }
        Ok(obj)
    }

    /// Removes what other field managers added to what mesh declares as
    /// wholly its own ([`foreign_patch`]). Server-side apply keeps such
    /// fields (they belong to their manager), so the plan would show them
    /// forever. A strategic merge patch deletes exactly those entries, on
    /// the condition that the object is still the one read (its
    /// `resourceVersion`): a write in between is read again, never undone.
    async fn remove_foreign(
        &self,
        kind: Kind,
        api: &Api<DynamicObject>,
        manifest: &J,
        mut obj: J,
        address: &Address,
        conn: &Conn,
    ) -> Result<J, ProviderError> {
        let name = manifest
            .pointer("/metadata/name")
            .and_then(J::as_str)
            .unwrap_or_default();
        let fail = |e: &kube::Error| ProviderError::Api {
            address: address.clone(),
            message: format!(
                "removing fields other managers added to {} {name}: {}",
                kind.kind(),
                describe(e, conn)
            ),
        };
        let params = PatchParams {
            field_manager: Some(OWNER.to_owned()),
            ..Default::default()
        };
        for _ in 0..5 {
            let Some(mut patch) = foreign_patch(kind, manifest, &obj) else {
                return Ok(obj);
            };
            patch["metadata"]["resourceVersion"] = obj
                .pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or(J::Null);
            match api.patch(name, &params, &Patch::Strategic(&patch)).await {
                Ok(o) => return Ok(to_json(&o)),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    obj = to_json(&api.get(name).await.map_err(|e| fail(&e))?);
                }
                Err(e) => return Err(fail(&e)),
            }
        }
        Err(ProviderError::Api {
            address: address.clone(),
            message: format!(
                "{} {name} kept changing while mesh removed fields other managers added; apply again",
                kind.kind()
            ),
        })
    }

    /// Pushes the Deployment's image unless the live one already runs it;
    /// returns the image reference to apply.
    async fn push_image(
        &self,
        d: &Desired,
        live: Option<&Live>,
        ctx: &ApplyContext,
    ) -> Result<String, ProviderError> {
        let address = &d.address;
        if let Some(message) = internal_str(d, objects::ATTR_IMAGE_ERROR) {
            return Err(invalid(
                address,
                format!("cannot build the image: {message}"),
            ));
        }
        let attrs = ctx.resolved_attrs(d);
        // A registry of the stack (ECR) is one repository for all services:
        // each image is tagged `<service>.<digest hex>`, so the registry's
        // lifecycle policy keeps the last N of every service.
        let (repository, digest, shared) = match (
            attrs.get("image"),
            attrs.get("image_repository"),
            attrs.get("image_digest"),
        ) {
            (Some(Value::Str(image)), _, _) => match image.split_once('@') {
                Some((r, dg)) => (r.to_owned(), dg.to_owned(), false),
                None => {
                    return Err(invalid(
                        address,
                        format!("image {image} is not pinned by digest"),
                    ));
                }
            },
            (_, Some(Value::Str(r)), Some(Value::Str(dg))) if !r.is_empty() => {
                (r.clone(), dg.clone(), true)
            }
            _ => {
                return Err(invalid(
                    address,
                    "the registry's URL is not known: is the registry created?",
                ));
            }
        };
        let pinned = format!("{repository}@{digest}");
        if live
            .and_then(|l| l.attrs.get("image"))
            .and_then(Value::as_str)
            == Some(pinned.as_str())
        {
            return Ok(pinned);
        }
        let bundle = objects::bundle_from_attrs(
            internal_str(d, objects::ATTR_BUNDLE).unwrap_or("{}"),
            internal_str(d, objects::ATTR_FILES).unwrap_or("{}"),
        )
        .map_err(|m| invalid(address, m))?;
        let service = bundle.config.service.clone();
        let reference = if shared {
            objects::shared_repository_tag(&repository, &service, &digest)
        } else {
            repository.clone()
        };
        let auth = self.registry_auth_for(&repository).await?;
        if let Some(rt) = self.images.runtime()
            && !crate::image::is_static_executable(rt).unwrap_or(false)
        {
            ctx.progress(address, &format!("warning: {} is not statically linked; it will not start in the image (build it with scripts/build-static-runtime and set MESH_RUNTIME_STATIC_BIN)", rt.display()));
        }
        ctx.progress(address, &format!("pushing image {pinned}"));
        let pushed = self
            .images
            .push(&service, bundle, RUNTIME_PORT, &digest, &reference, auth)
            .await
            .map_err(|m| ProviderError::Api {
                address: address.clone(),
                message: format!("pushing the image: {m}"),
            })?;
        Ok(pushed)
    }

    /// Leaves an adopted namespace as it was found: only the labels and
    /// annotations mesh put on it are removed (a JSON merge patch).
    async fn give_back_namespace(
        &self,
        api: &Api<DynamicObject>,
        live: &Live,
        conn: &Conn,
    ) -> Result<(), ProviderError> {
        let labels: serde_json::Map<String, J> =
            [kinds::MANAGED_BY, kinds::LABEL_STACK, kinds::LABEL_ENV]
                .iter()
                .map(|k| ((*k).to_owned(), J::Null))
                .collect();
        let patch = json!({ "metadata": {
            "labels": labels,
            "annotations": { kinds::ANNOTATION_ADDRESS: null, kinds::ANNOTATION_ADOPTED: null },
        }});
        match api
            .patch(&live.id, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(ProviderError::Api {
                address: live.address.clone(),
                message: format!(
                    "removing mesh's labels from Namespace {}: {}",
                    live.id,
                    describe(&e, conn)
                ),
            }),
        }
    }

    /// Deletes a live object. LoadBalancer Services (whose cloud load
    /// balancer must be gone before the network can be deleted) and objects
    /// being replaced are waited for; namespaces unless `--no-wait`.
    async fn remove(
        &self,
        kind: Kind,
        live: &Live,
        ctx: &ApplyContext,
        wait: bool,
    ) -> Result<(), ProviderError> {
        let address = &live.address;
        // A cluster that does not exist (any more) holds nothing.
        let Some(conn) = self.conn().await? else {
            return Ok(());
        };
        let (ns, name) = match live.id.split_once('/') {
            Some((ns, name)) => (Some(ns), name),
            None => (None, live.id.as_str()),
        };
        let api = api_for(&conn, kind, ns);
        if kind == Kind::Namespace && live.outputs.get("adopted") == Some(&Value::Bool(true)) {
            return self.give_back_namespace(&api, live, &conn).await;
        }
        if kind == Kind::Deployment {
            // Its ConfigMap goes with it.
            let cms = api_for(&conn, Kind::ConfigMap, ns);
            match cms
                .delete(&objects::configmap_name(name), &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(ProviderError::Api {
                        address: address.clone(),
                        message: format!(
                            "deleting ConfigMap {}: {}",
                            objects::configmap_name(name),
                            describe(&e, &conn)
                        ),
                    });
                }
            }
        }
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => {
                return Err(ProviderError::Api {
                    address: address.clone(),
                    message: format!(
                        "deleting {} {}: {}",
                        kind.kind(),
                        live.id,
                        describe(&e, &conn)
                    ),
                });
            }
        }
        let load_balancer = kind == Kind::Service
            && live.attrs.get("type").and_then(Value::as_str) == Some("LoadBalancer");
        if !(wait || load_balancer || (kind == Kind::Namespace && !ctx.no_wait)) {
            return Ok(());
        }
        let note = format!("waiting for {} {} to be deleted", kind.kind(), live.id);
        let wait = Wait {
            what: &note,
            timeout: self.settings.delete_timeout,
            every: self.settings.every(),
            report: Report::Note(&note),
        };
        poll_until(&wait, Some((ctx, address)), || async {
            match api.get_opt(name).await {
                Ok(None) => Ok(Polled::Done(())),
                Ok(Some(_)) => Ok(Polled::Pending("there")),
                Err(e) => Err(ProviderError::Api {
                    address: address.clone(),
                    message: format!(
                        "waiting for {} {} to go: {}",
                        kind.kind(),
                        live.id,
                        describe(&e, &conn)
                    ),
                }),
            }
        })
        .await
        .map_err(|w| {
            w.into_error(address, self.settings.delete_timeout, |_| {
                format!(
                    "{} {} is still being deleted; look at `kubectl{} get {} {name} -o yaml` (finalizers)",
                    kind.kind(),
                    live.id,
                    ns.map(|n| format!(" -n {n}")).unwrap_or_default(),
                    kind.plural()
                )
            })
        })
    }
}

#[async_trait]
impl Provider for KubernetesProvider {
    fn id(&self) -> ProviderId {
        ProviderId::Kubernetes
    }

    /// Each exposure: the Ingress's URL, else the Service's, its node port
    /// and cluster IP, and where the operator's key is when callers need
    /// one; an `existing` cluster's API endpoint and kubeconfig context.
    fn outputs(&self, stack: &Stack, live: &[Live]) -> Outputs {
        let find = |a: &Address| live.iter().find(|l| &l.address == a);
        let mut out = Outputs::default();
        let operator = crate::provider::local::access::OPERATOR;
        let key_secret = find(&objects::identity_address(operator)).and_then(|s| {
            match (s.outputs.get("namespace"), s.outputs.get("name")) {
                (Some(Value::Str(ns)), Some(Value::Str(name))) => Some((ns, name)),
                _ => None,
            }
        });
        for (name, e) in &stack.exposes {
            let base = Address::of("expose", name);
            let service = find(&objects::sub(&base, "service"));
            let ingress = find(&objects::sub(&base, "ingress"));
            if ![ingress, service]
                .into_iter()
                .flatten()
                .any(|l| out.exposure(stack, e, l))
            {
                continue;
            }
            if let Some(s) = service {
                out.copy(
                    "expose",
                    name,
                    s,
                    &[("node_port", "node_port"), ("cluster_ip", "cluster_ip")],
                );
            }
            if let Some((ns, secret)) = key_secret
                && crate::provider::local::access::restricted_to(stack, &e.service).is_some()
            {
                out.set("expose", name, "api_key_secret", format!("{ns}/{secret}"));
                out.set(
                    "expose",
                    name,
                    "api_key_command",
                    format!("kubectl -n {ns} get secret {secret} -o jsonpath='{{.data.{operator}}}' | base64 -d"),
                );
            }
        }
        let existing = stack.env.cluster.as_ref().filter(|c| {
            matches!(
                stack.clusters.get(*c).map(|c| &c.kind),
                Some(ClusterKind::Existing { .. })
            )
        });
        if let (Some(cluster), Connection::Ready(conn)) = (existing, &self.connection) {
            out.set("cluster", cluster, "endpoint", conn.server.clone());
            out.set("cluster", cluster, "context", conn.context.clone());
        }
        out
    }

    fn desired(&self, stack: &Stack) -> Result<Vec<Desired>, ProviderError> {
        self.remember_namespace(stack);
        let digests = |wanted: &[(&str, &crate::bundle::BundlePlan)]| {
            self.images.digests(wanted, RUNTIME_PORT)
        };
        let registry = match &self.reused_registry {
            Some(url) => Some(objects::Registry::Reused(url.clone())),
            None => objects::registry(stack, self.settings.registry.as_deref()),
        };
        let inputs = objects::Inputs {
            pull_secret: self.pull_secret(registry.as_ref()),
            registry,
            image_digests: &digests,
            digest_key: self.known_digest_key(),
        };
        objects::desired(stack, &inputs)
    }

    async fn observe(&self, scope: &Scope) -> Result<Vec<Live>, ProviderError> {
        let Some(conn) = self.conn().await? else {
            return Ok(Vec::new());
        };
        let selector = kinds::ownership_selector(&scope.stack, &scope.env);
        let hint = self
            .namespace
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut set = tokio::task::JoinSet::new();
        for kind in Kind::ALL {
            let conn = conn.clone();
            let lp = ListParams::default().labels(&selector);
            let hint = hint.clone();
            set.spawn(async move { (kind, list_owned(&conn, kind, &lp, hint.as_deref()).await) });
        }
        let mut objects = Vec::new();
        let mut first_error = None;
        while let Some(joined) = set.join_next().await {
            let Ok((kind, listed)) = joined else { continue };
            match listed {
                Ok(items) => objects.extend(items.iter().map(|o| (kind, to_json(o)))),
                Err(e) => {
                    if first_error.is_none() {
                        first_error = Some(match &e {
                            kube::Error::Api(_) => {
                                format!("listing {}: {}", kind.plural(), describe(&e, &conn))
                            }
                            _ => describe(&e, &conn),
                        });
                    }
                }
            }
        }
        if let Some(message) = first_error {
            return Err(ProviderError::Observe {
                provider: ProviderId::Kubernetes,
                message,
            });
        }
        // The digest key first: the other Secrets' digests are keyed by it.
        let key = objects.iter().find_map(|(kind, o)| {
            let name = o.pointer("/metadata/name").and_then(J::as_str);
            (*kind == Kind::Secret && name == Some(objects::DIGEST_KEY_SECRET))
                .then(|| secret_values(o).remove(objects::DIGEST_KEY))?
                .map(String::into_bytes)
                .filter(|k| k.len() >= 32)
        });
        self.remember_digest_key(key.clone());
        let mut out: Vec<Live> = objects
            .iter()
            .filter(|(kind, _)| *kind != Kind::ConfigMap)
            .filter_map(|(kind, o)| live_of(*kind, o, key.as_deref()))
            .collect();
        let configmaps = objects.iter().filter(|(kind, _)| *kind == Kind::ConfigMap);
        for (_, cm) in configmaps {
            fold_configmap(&mut out, cm);
        }
        out.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(out)
    }

    async fn caller_key(
        &self,
        stack: &Stack,
        caller: &str,
    ) -> Result<Option<String>, ProviderError> {
        let at = objects::identity_address(caller);
        let Some(conn) = self.conn().await? else {
            return Ok(None);
        };
        let ns = objects::namespace(stack);
        let mut values = read_secret(&conn, &ns, &objects::key_secret_name(caller), &at).await?;
        Ok(values.remove(caller))
    }

    /// Each step changes the Secrets, then waits
    /// [`Settings::key_propagation`] for the kubelets to update the pods'
    /// volumes (and the runtimes to read them): verifiers of old and new
    /// keys, then the new keys, then verifiers of the new keys only.
    async fn rotate_keys(
        &self,
        stack: &Stack,
        ctx: &ApplyContext,
    ) -> Result<Vec<String>, ProviderError> {
        let identities = crate::provider::local::access::identities(stack);
        let at = objects::verifiers_address();
        if identities.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.require_conn(&at).await?;
        let ns = objects::namespace(stack);
        let api = api_for(&conn, Kind::Secret, Some(&ns));
        let patch = |name: String, values: BTreeMap<String, String>| {
            let api = &api;
            let conn = &conn;
            let at = &at;
            let ns = &ns;
            async move {
                let params = PatchParams {
                    field_manager: Some(OWNER.to_owned()),
                    ..Default::default()
                };
                let body = json!({ "data": objects::secret_data(&values) });
                api.patch(&name, &params, &Patch::Merge(&body))
                    .await
                    .map(drop)
                    .map_err(|e| ProviderError::Api {
                        address: at.clone(),
                        message: format!("updating Secret {ns}/{name}: {}", describe(&e, conn)),
                    })
            }
        };
        let mut fresh = Vec::new();
        for caller in &identities {
            let secret = objects::key_secret_name(caller);
            let old = read_secret(&conn, &ns, &secret, &at).await?;
            let old = old.get(caller).ok_or_else(|| {
                invalid(
                    &at,
                    format!("the Secret {ns}/{secret} holds no key: apply the stack first"),
                )
            })?;
            fresh.push((caller.clone(), old.clone(), new_key(&at)?));
        }
        let wait = self.settings.key_propagation;
        let both = verifier_lines(&fresh, true);
        patch(objects::VERIFIERS_SECRET.to_owned(), both).await?;
        ctx.progress(
            &at,
            &format!(
                "new keys accepted beside the old ones; waiting {}s for the pods",
                wait.as_secs()
            ),
        );
        tokio::time::sleep(wait).await;
        for (caller, _, new) in &fresh {
            patch(
                objects::key_secret_name(caller),
                [(caller.clone(), new.clone())].into(),
            )
            .await?;
        }
        ctx.progress(
            &at,
            &format!(
                "callers given the new keys; waiting {}s for the pods",
                wait.as_secs()
            ),
        );
        tokio::time::sleep(wait).await;
        let new_only = verifier_lines(&fresh, false);
        patch(objects::VERIFIERS_SECRET.to_owned(), new_only).await?;
        tokio::time::sleep(wait).await;
        ctx.progress(&at, "old keys refused");
        Ok(identities)
    }

    async fn lock(
        &self,
        scope: &Scope,
        holder: &crate::lock::Holder,
    ) -> Result<Option<Box<dyn super::SharedLock>>, ProviderError> {
        // A cluster still to be created holds no lock (the file lock does).
        let Some(conn) = self.conn().await? else {
            return Ok(None);
        };
        lease::acquire(&conn, scope, holder).await
    }

    async fn unlock(&self, scope: &Scope) -> Result<Option<String>, ProviderError> {
        let Some(conn) = self.conn().await? else {
            return Ok(None);
        };
        lease::break_lease(&conn, scope).await
    }

    async fn apply(
        &self,
        change: &Change,
        ctx: &ApplyContext,
    ) -> Result<Option<Live>, ProviderError> {
        let kind = Kind::from_resource_kind(&change.kind).ok_or_else(|| {
            invalid(
                &change.address,
                format!("the kubernetes provider does not manage {}", change.kind),
            )
        })?;
        match &change.action {
            Action::NoOp => Ok(change.live.clone()),
            Action::Delete => {
                if let Some(l) = &change.live {
                    self.remove(kind, l, ctx, false).await?;
                }
                Ok(None)
            }
            Action::Replace { .. } => {
                if let Some(l) = &change.live {
                    ctx.progress(
                        &change.address,
                        &format!("deleting {} {} to create it again", kind.kind(), l.id),
                    );
                    self.remove(kind, l, ctx, true).await?;
                }
                self.put(kind, change, ctx).await.map(Some)
            }
            Action::Create | Action::Update => self.put(kind, change, ctx).await.map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A service's ConfigMap is part of its Deployment's live resource; one
    /// left without its Deployment stands for it (so the plan makes the
    /// Deployment, and destroy deletes both); one applied when it was a
    /// resource of its own (`….configmap`) folds the same way.
    #[test]
    fn a_configmap_folds_into_its_deployment() {
        let cm = |address: &str, split: &str| {
            json!({
                "metadata": { "name": "scoring-config", "namespace": "ns",
                              "annotations": { kinds::ANNOTATION_ADDRESS: address } },
                "data": { "service.json": "{}", "split.json": split },
            })
        };
        let dep = json!({
            "metadata": { "name": "scoring", "namespace": "ns",
                          "annotations": { kinds::ANNOTATION_ADDRESS: "service.scoring.deployment" } },
            "spec": {},
        });
        let split = r#"{"high-value": {"v1": 80, "v2": 20}}"#;
        for address in ["service.scoring.deployment", "service.scoring.configmap"] {
            let mut lives = vec![live_of(Kind::Deployment, &dep, None).unwrap()];
            fold_configmap(&mut lives, &cm(address, split));
            assert_eq!(lives.len(), 1, "{address}");
            assert_eq!(
                lives[0].attrs["split"],
                Value::str("high-value: v1 80, v2 20")
            );
            assert!(
                matches!(&lives[0].attrs["config"], Value::Map(m) if m.contains_key("service.json"))
            );

            let mut alone = Vec::new();
            fold_configmap(&mut alone, &cm(address, "not json"));
            assert_eq!(alone.len(), 1);
            assert_eq!(alone[0].address.as_str(), "service.scoring.deployment");
            assert_eq!(alone[0].kind, Kind::Deployment.resource_kind());
            assert_eq!(alone[0].id, "ns/scoring");
            // A split that does not parse shows as a digest: it differs from any split.
            assert!(
                alone[0].attrs["split"]
                    .as_str()
                    .unwrap()
                    .starts_with("sha256:")
            );
        }
        // A ConfigMap mesh did not make a service's is left alone.
        let mut lives = Vec::new();
        fold_configmap(&mut lives, &cm("expose.scoring.service", split));
        assert!(lives.is_empty());
    }

    fn url(kind: Kind, obj: &J) -> String {
        let live = live_of(kind, obj, None).expect("owned");
        live.outputs["url"].as_str().expect("url").to_owned()
    }

    #[test]
    fn an_exposure_url_is_https_where_the_live_object_terminates_tls() {
        let mut svc = json!({
            "metadata": { "name": "scoring", "namespace": "ns",
                "annotations": { kinds::ANNOTATION_ADDRESS: "expose.scoring.service" } },
            "spec": { "type": "LoadBalancer", "ports": [{ "port": 443 }] },
            "status": { "loadBalancer": { "ingress": [{ "hostname": "lb.example.com" }] } },
        });
        assert_eq!(url(Kind::Service, &svc), "http://lb.example.com:443");
        let a = &mut svc["metadata"]["annotations"];
        a[kinds::ANNOTATION_AWS_SSL_CERT] = json!("arn:aws:acm:us-east-1:1:certificate/x");
        a[kinds::ANNOTATION_AWS_SSL_PORTS] = json!("8443");
        // A certificate on another port leaves this one plain.
        assert_eq!(url(Kind::Service, &svc), "http://lb.example.com:443");
        svc["metadata"]["annotations"][kinds::ANNOTATION_AWS_SSL_PORTS] = json!("8443, 443");
        assert_eq!(url(Kind::Service, &svc), "https://lb.example.com:443");

        let mut ing = json!({
            "metadata": { "name": "features", "namespace": "ns",
                "annotations": { kinds::ANNOTATION_ADDRESS: "expose.features.ingress" } },
            "spec": { "rules": [{ "host": "f.example.com", "http": { "paths": [{ "path": "/x" }] } }] },
        });
        assert_eq!(url(Kind::Ingress, &ing), "http://f.example.com/x");
        ing["spec"]["tls"] = json!([{ "hosts": ["other.example.com"], "secretName": "s" }]);
        assert_eq!(url(Kind::Ingress, &ing), "http://f.example.com/x");
        ing["spec"]["tls"] = json!([{ "hosts": ["f.example.com"], "secretName": "s" }]);
        assert_eq!(url(Kind::Ingress, &ing), "https://f.example.com/x");
    }
}
