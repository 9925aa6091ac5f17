//! A test double of the Kubernetes API server for mesh's tests.
//!
//! It serves the REST API of the built-in kinds mesh uses (Namespace, ConfigMap, Secret,
//! Service, ServiceAccount, Deployment, ReplicaSet, HorizontalPodAutoscaler, Ingress,
//! NetworkPolicy, and read-only Pods and Nodes) over plain HTTP on loopback, with the
//! semantics clients depend on: discovery, `resourceVersion` concurrency, server-side apply
//! with field managers, label/field selectors, defaulting, validation (422 `Invalid`),
//! NodePort/ClusterIP allocation, deletion with finalizers and propagation, and a simulated
//! rollout (ReplicaSets, Pods and Deployment status). See README.md for what is modelled.
//!
//! ```no_run
//! # async fn demo() {
//! let double = kube_double::KubeDouble::start().await;
//! let client: kube::Client = double.client();
//! double.set_rollout("default", "web", kube_double::Rollout::CrashLoop);
//! # }
//! ```

mod controllers;
mod fields;
mod kinds;
mod patch;
mod registry;
mod selector;
mod server;
mod status;
mod store;
mod util;

use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use controllers::template_hash;

/// How the simulated pods of a Deployment behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rollout {
    /// Pods run and become ready (after the rollout delay, if one is set).
    #[default]
    Ready,
    /// Pods are never scheduled (`PodScheduled=False`, reason `Unschedulable`).
    Pending,
    /// Containers wait with reason `ImagePullBackOff`.
    ImagePullBackOff,
    /// Containers wait with reason `CrashLoopBackOff` after restarts.
    CrashLoop,
}

impl std::str::FromStr for Rollout {
    type Err = String;
    fn from_str(s: &str) -> Result<Rollout, String> {
        match s {
            "Ready" => Ok(Rollout::Ready),
            "Pending" => Ok(Rollout::Pending),
            "ImagePullBackOff" => Ok(Rollout::ImagePullBackOff),
            "CrashLoop" | "CrashLoopBackOff" => Ok(Rollout::CrashLoop),
            other => Err(format!(
                "unknown rollout mode {other:?} (Ready, Pending, ImagePullBackOff, CrashLoop)"
            )),
        }
    }
}

/// State shared between the server task and the test's handle.
pub struct Shared {
    store: Mutex<store::Store>,
    requests: AtomicU64,
    log: Mutex<Vec<String>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, store::Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running double. Dropping it stops the server.
pub struct KubeDouble {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl KubeDouble {
    /// Binds 127.0.0.1 on a free port and serves in a tokio task.
    ///
    /// # Panics
    /// If no loopback port can be bound.
    pub async fn start() -> KubeDouble {
        KubeDouble::start_on("127.0.0.1:0".parse().expect("literal address"))
            .await
            .expect("kube-double: binding 127.0.0.1")
    }

    /// Binds `addr` and serves in a tokio task.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<KubeDouble> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(store::Store::new(format!("http://{addr}"))),
            requests: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
        });
        let app = server::router(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(KubeDouble { shared, addr, task })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A `kube::Client` talking plain HTTP to the double, default namespace `default`.
    pub fn client(&self) -> kube::Client {
        // A test binary may also link the AWS SDK (aws-lc-rs): pick ring explicitly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = self.url().parse().expect("valid url");
        let mut config = kube::Config::new(url);
        config.default_namespace = "default".into();
        kube::Client::try_from(config).expect("kube client for kube-double")
    }

    /// A kubeconfig whose current context (`context`) points at the double.
    pub fn kubeconfig_yaml(&self, context: &str) -> String {
        kubeconfig_yaml(&self.url(), context)
    }

    /// Sets how the pods of `namespace/deployment` behave (default [`Rollout::Ready`]).
    /// It applies to the Deployment's current ReplicaSet, now and in later rollouts.
    pub fn set_rollout(&self, namespace: &str, deployment: &str, rollout: Rollout) {
        let mut s = self.shared.lock();
        s.rollouts
            .insert((namespace.into(), deployment.into()), rollout);
        s.dirty = true;
        s.reconcile();
    }

    /// Sets how pods running `image` behave, whatever Deployment runs them (takes precedence
    /// over [`KubeDouble::set_rollout`]): a bad image stays bad, a rollback to a good one works.
    pub fn set_image_rollout(&self, image: &str, rollout: Rollout) {
        let mut s = self.shared.lock();
        s.image_rollouts.insert(image.into(), rollout);
        s.dirty = true;
        s.reconcile();
    }

    /// Pods become ready this long after they are created (default: at once).
    pub fn set_rollout_delay(&self, delay: Duration) {
        self.shared.lock().rollout_delay = delay.as_secs() as i64;
    }

    /// LoadBalancer Services get their ingress hostname this long after creation (default: at once).
    pub fn set_load_balancer_delay(&self, delay: Duration) {
        self.shared.lock().lb_delay = delay.as_secs() as i64;
    }

    /// Moves the double's clock forward (to reach `progressDeadlineSeconds`, delays, ...).
    pub fn advance_clock(&self, by: Duration) {
        let mut s = self.shared.lock();
        s.clock_offset += by.as_secs() as i64;
        s.timed = true;
        s.reconcile();
    }

    /// Every stored object (any kind) matching a label selector, e.g.
    /// `app.kubernetes.io/managed-by=mesh`.
    ///
    /// # Panics
    /// If the selector does not parse.
    pub fn objects_with_label(&self, selector: &str) -> Vec<Value> {
        let sel = selector::LabelSelector::parse(selector)
            .unwrap_or_else(|e| panic!("bad selector {selector:?}: {e}"));
        let mut s = self.shared.lock();
        s.reconcile();
        s.with_label(&sel)
    }

    /// One stored object by `apiVersion`, `kind`, namespace ("" when cluster-scoped) and name.
    pub fn object(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let ti = registry::TYPES
            .iter()
            .position(|t| t.api_version() == api_version && t.kind == kind)?;
        let mut s = self.shared.lock();
        s.reconcile();
        s.get_obj(ti, namespace, name).cloned()
    }

    /// HTTP requests served so far.
    pub fn request_count(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// `METHOD /path?query` of every request served so far.
    pub fn request_log(&self) -> Vec<String> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for KubeDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A kubeconfig for a server at `url` with one context.
pub fn kubeconfig_yaml(url: &str, context: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-double\n  cluster:\n    server: {url}\ncontexts:\n- name: {context}\n  context:\n    cluster: kube-double\n    user: kube-double\n    namespace: default\ncurrent-context: {context}\nusers:\n- name: kube-double\n  user: {{}}\npreferences: {{}}\n"
    )
}
