//! The engine: picks the providers a stack's environment needs, gathers the
//! desired resources and the live state, and asks `plan` for the diff.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::output::Outputs;
use crate::plan::{self, Abandoned, Action, Plan};
use crate::provider::{Provider, ProviderError};
use crate::resource::{Address, Desired, Live, ProviderId, Scope};
use crate::stack::{Stack, Target};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The environment needs a provider this build lacks.
    #[error(
        "environment `{env}` targets {target}, but this mesh was built without the `{feature}` feature\n  help: rebuild with `cargo build --release --features {feature}`"
    )]
    MissingFeature {
        env: String,
        target: &'static str,
        feature: &'static str,
    },
    /// A test instance deploys onto its environment's cluster and registry,
    /// and the environment has not been applied.
    #[error(
        "the test instance deploys its services onto environment `{env}`'s {what}, which does not exist\n  help: apply the environment first: `mesh apply {path} --env {env}`"
    )]
    PlatformNotApplied {
        env: String,
        what: String,
        path: String,
    },
    /// Providers' resources depend on each other in a cycle.
    #[error("dependency cycle between {0}")]
    Cycle(String),
}

/// A stack ready to be planned and applied.
pub struct Engine {
    pub stack: Stack,
    pub scope: Scope,
    pub providers: BTreeMap<ProviderId, Arc<dyn Provider>>,
    /// The cluster the Kubernetes provider's objects live in, when the stack
    /// itself manages it (`cluster.NAME`, the EKS cluster of an `aws`
    /// environment): a destroy deletes it, and the objects go with it.
    in_cluster: Option<Address>,
}

impl Engine {
    /// Sets up the providers for the stack's environment.
    pub async fn new(stack: Stack) -> Result<Engine, EngineError> {
        let scope = Scope {
            stack: stack.name.clone(),
            env: stack.env.name.clone(),
            root: stack.root.clone(),
        };
        let mut providers: BTreeMap<ProviderId, Arc<dyn Provider>> = BTreeMap::new();
        #[cfg_attr(not(all(feature = "aws", feature = "kubernetes")), allow(unused_mut))]
        let mut in_cluster = None;
        match stack.env.target {
            Target::Local => {
                providers.insert(
                    ProviderId::Local,
                    Arc::new(crate::provider::local::LocalProvider::new()?),
                );
            }
            Target::Aws => {
                #[cfg(feature = "aws")]
                {
                    let aws = Arc::new(
                        crate::provider::aws::AwsProvider::new(stack.env.region.clone()).await?,
                    );
                    // Services and exposures go to the environment's cluster.
                    #[cfg(feature = "kubernetes")]
                    {
                        if !stack.services.is_empty() || !stack.exposes.is_empty() {
                            providers.insert(
                                ProviderId::Kubernetes,
                                Arc::new(kubernetes_on_aws(&stack, aws.clone()).await?),
                            );
                            // A test instance's objects live on the environment's
                            // cluster, which a destroy of the instance keeps.
                            if !stack.reuses_platform() {
                                in_cluster = eks_cluster_of(&stack);
                            }
                        }
                    }
                    providers.insert(ProviderId::Aws, aws);
                }
                #[cfg(not(feature = "aws"))]
                return Err(EngineError::MissingFeature {
                    env: stack.env.name.clone(),
                    target: "aws",
                    feature: "aws",
                });
            }
            Target::Kubernetes => {
                #[cfg(feature = "kubernetes")]
                {
                    let settings = crate::provider::kubernetes::Settings::from_env();
                    let k = crate::provider::kubernetes::KubernetesProvider::for_stack(
                        &stack, settings,
                    )
                    .await?;
                    providers.insert(ProviderId::Kubernetes, Arc::new(k));
                }
                #[cfg(not(feature = "kubernetes"))]
                return Err(EngineError::MissingFeature {
                    env: stack.env.name.clone(),
                    target: "kubernetes",
                    feature: "kubernetes",
                });
            }
        }
        Ok(Engine {
            stack,
            scope,
            providers,
            in_cluster,
        })
    }

    /// Every provider's desired resources, in dependency order.
    pub fn desired(&self) -> Result<Vec<Desired>, EngineError> {
        let mut all = Vec::new();
        for p in self.providers.values() {
            all.extend(p.desired(&self.stack)?);
        }
        crate::graph::topo_order(all).map_err(|stuck| {
            EngineError::Cycle(
                stuck
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })
    }

    /// Every provider's live resources, observed concurrently.
    pub async fn observe(&self) -> Result<Vec<Live>, EngineError> {
        Ok(self.observe_unless_unreachable(false).await?.0)
    }

    /// The live state a saved `plan` is checked against: as [`Engine::observe`],
    /// except that the objects of a cluster the plan abandons are not read
    /// when the cluster cannot be reached (they were not read for the plan either).
    pub async fn observe_for(&self, plan: &Plan) -> Result<Vec<Live>, EngineError> {
        Ok(self
            .observe_unless_unreachable(plan.abandoned.is_some())
            .await?
            .0)
    }

    /// Every provider's live resources. With `tolerate`, a failure to read
    /// the objects of the stack's own cluster ([`Engine::in_cluster`]) leaves
    /// them out and is returned instead.
    async fn observe_unless_unreachable(
        &self,
        tolerate: bool,
    ) -> Result<(Vec<Live>, Option<ProviderError>), EngineError> {
        let tolerate = tolerate && self.in_cluster.is_some();
        let mut set = tokio::task::JoinSet::new();
        for (id, p) in &self.providers {
            let p = p.clone();
            let scope = self.scope.clone();
            let id = *id;
            set.spawn(async move { (id, p.observe(&scope).await) });
        }
        let mut live = Vec::new();
        let mut unreachable = None;
        while let Some(joined) = set.join_next().await {
            let (id, observed) = joined.map_err(|e| ProviderError::Observe {
                provider: ProviderId::Local,
                message: format!("an observer task failed: {e}"),
            })?;
            match observed {
                Ok(l) => live.extend(l),
                Err(e) if tolerate && id == ProviderId::Kubernetes && cannot_reach(&e) => {
                    unreachable = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Providers finish in any order; keep the result stable.
        live.sort_by(|a, b| a.address.cmp(&b.address));
        Ok((live, unreachable))
    }

    /// What `mesh output` shows: every provider's outputs for what it owns
    /// (read from the live state) and the stack's module outputs; `None`
    /// when nothing of the stack's environment is live. The objects of the
    /// stack's own cluster are left out, with a warning, when it cannot be
    /// reached (an EKS cluster outside this network): the cloud's outputs
    /// are still worth showing.
    pub async fn outputs(&self) -> Result<Option<Outputs>, EngineError> {
        let (live, unreachable) = self.observe_unless_unreachable(true).await?;
        if let Some(e) = unreachable {
            eprintln!(
                "warning: the cluster's objects were not read ({e}); their outputs are missing"
            );
        }
        if live.is_empty() {
            return Ok(None);
        }
        let mut out = crate::output::modules(&self.stack);
        for p in self.providers.values() {
            out.merge(p.outputs(&self.stack, &live));
        }
        Ok(Some(out))
    }

    /// Takes the shared locks of every provider that can hold one (see
    /// [`Provider::lock`]); on a refusal, those already taken are released.
    pub async fn lock_shared(
        &self,
        holder: &crate::lock::Holder,
    ) -> Result<Vec<Box<dyn crate::provider::SharedLock>>, EngineError> {
        let mut held = Vec::new();
        let mut unreachable = None;
        for (id, p) in &self.providers {
            match p.lock(&self.scope, holder).await {
                Ok(Some(l)) => held.push(l),
                Ok(None) => {}
                // The stack's own cluster cannot be reached (a destroy still
                // removes it): the lock in the account is enough, if held.
                Err(e)
                    if *id == ProviderId::Kubernetes
                        && self.in_cluster.is_some()
                        && cannot_reach(&e) =>
                {
                    unreachable = Some(e);
                }
                Err(e) => {
                    for l in held {
                        l.release().await;
                    }
                    return Err(e.into());
                }
            }
        }
        if let Some(e) = unreachable {
            if held.is_empty() {
                return Err(e.into());
            }
            eprintln!(
                "warning: the Lease on the cluster was not taken ({e}); the lock in the account guards this run"
            );
        }
        Ok(held)
    }

    /// Breaks every provider's shared lock; who held each.
    pub async fn unlock_shared(&self) -> Result<Vec<String>, EngineError> {
        let mut broken = Vec::new();
        for (id, p) in &self.providers {
            match p.unlock(&self.scope).await {
                Ok(who) => broken.extend(who),
                Err(e)
                    if *id == ProviderId::Kubernetes
                        && self.in_cluster.is_some()
                        && cannot_reach(&e) =>
                {
                    eprintln!("warning: the Lease on the cluster was not checked: {e}");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(broken)
    }

    /// Observes live state and diffs it against the stack.
    ///
    /// A destroy of an environment whose cluster the stack manages does not
    /// need the cluster's objects one by one when the cluster goes too: if
    /// the cluster cannot be reached, or is already gone, the plan deletes
    /// the cloud resources and lists the objects as [`Plan::abandoned`].
    pub async fn plan(&self, options: &plan::Options) -> Result<Plan, EngineError> {
        // Live first: desired digests secrets under the key observing reads
        // (the Kubernetes provider's `mesh-digest-key`).
        let (live, unreachable) = self.observe_unless_unreachable(options.destroy).await?;
        let desired = self.desired()?;
        let mut plan = plan::diff(
            &self.stack.name,
            &self.stack.env.name,
            &desired,
            &live,
            options,
        );
        let Some(cluster) = self.in_cluster.clone().filter(|_| options.destroy) else {
            return Ok(plan);
        };
        let objects: Vec<Address> = desired
            .iter()
            .filter(|d| d.provider == ProviderId::Kubernetes)
            .map(|d| d.address.clone())
            .collect();
        let deletes_cluster = plan
            .changes
            .iter()
            .any(|c| c.address == cluster && c.action == Action::Delete);
        let cluster_exists = live.iter().any(|l| l.address == cluster);
        plan.abandoned = match unreachable {
            Some(e) if deletes_cluster => Some(Abandoned {
                reason: format!("the cluster cannot be reached: {e}"),
                cluster,
                cluster_exists: true,
                objects,
            }),
            // Not a destroy of the cluster itself: the objects are needed.
            Some(e) => return Err(e.into()),
            None if !cluster_exists && plan.has_changes() => Some(Abandoned {
                reason: format!("{cluster} no longer exists"),
                cluster,
                cluster_exists: false,
                objects,
            }),
            None => None,
        };
        Ok(plan)
    }
}

/// `cluster.NAME` of the environment's EKS cluster, if it has one.
#[cfg(all(feature = "aws", feature = "kubernetes"))]
fn eks_cluster_of(stack: &Stack) -> Option<Address> {
    let name = stack.env.cluster.as_ref()?;
    let cluster = stack.clusters.get(name)?;
    matches!(cluster.kind, crate::stack::ClusterKind::Eks(_)).then(|| Address::of("cluster", name))
}

/// A failure to reach or read a cluster, rather than a refusal (another run
/// holds its lock) or an interruption.
fn cannot_reach(e: &ProviderError) -> bool {
    !matches!(
        e,
        ProviderError::Locked(_) | ProviderError::Interrupted { .. }
    )
}

/// The Kubernetes provider for an AWS environment: its EKS cluster, reached
/// through the AWS provider (endpoint, CA, token) once it exists; until then
/// live state is empty and every object plans as a create. A cluster of kind
/// `existing` is reached by kubeconfig as on the `kubernetes` target.
#[cfg(all(feature = "aws", feature = "kubernetes"))]
async fn kubernetes_on_aws(
    stack: &Stack,
    aws: Arc<crate::provider::aws::AwsProvider>,
) -> Result<crate::provider::kubernetes::KubernetesProvider, EngineError> {
    use crate::image::RegistryAuth;
    use crate::provider::kubernetes::{
        AccessSource, KubeAccess, KubernetesProvider, RegistryAuthSource, Settings,
    };
    use crate::stack::ClusterKind;
    let settings = Settings::from_env();
    let cluster = stack
        .env
        .cluster
        .as_ref()
        .and_then(|c| stack.clusters.get(c));
    // Images go to the stack's ECR registry with the account's push token.
    let auth: RegistryAuthSource = Arc::new({
        let aws = aws.clone();
        move |host: String| {
            let aws = aws.clone();
            Box::pin(async move {
                if !crate::provider::aws::is_ecr_host(&host) {
                    return Ok(None);
                }
                let c = aws.registry_credentials().await?;
                Ok(Some(RegistryAuth::Basic {
                    user: c.user,
                    password: c.password,
                }))
            })
        }
    });
    let reused = reused_registry(stack, &aws).await?;
    let reuse = move |k: KubernetesProvider| {
        let k = k.with_registry_auth_source(auth);
        match reused {
            Some(url) => k.with_reused_registry(url),
            None => k,
        }
    };
    let Some(cluster) = cluster.filter(|c| matches!(c.kind, ClusterKind::Eks(_))) else {
        return Ok(reuse(KubernetesProvider::for_stack(stack, settings).await?));
    };
    // A test instance's services go to the environment's cluster.
    let name =
        crate::provider::aws::names::eks_cluster(&stack.name, stack.platform_env(), &cluster.name);
    if stack.reuses_platform() && aws.kube_access(&name).await?.is_none() {
        return Err(not_applied(
            stack,
            format!("cluster.{} (EKS cluster {name})", cluster.name),
        ));
    }
    let eks_name = name.clone();
    let source: AccessSource = Arc::new(move || {
        let aws = aws.clone();
        let name = eks_name.clone();
        Box::pin(async move {
            // `None`: the cluster is to be created by this apply.
            Ok(aws.kube_access(&name).await?.map(|a| KubeAccess {
                endpoint: a.endpoint,
                ca_pem: a.ca_pem,
                token: a.token,
            }))
        })
    });
    Ok(reuse(
        KubernetesProvider::from_access_source(&name, source, settings).with_state_dir(stack),
    ))
}

/// For a test instance whose environment names a registry of the stack
/// (ECR): that registry's URL, as the environment applied it.
#[cfg(all(feature = "aws", feature = "kubernetes"))]
async fn reused_registry(
    stack: &Stack,
    aws: &crate::provider::aws::AwsProvider,
) -> Result<Option<String>, EngineError> {
    let Some(name) = stack
        .env
        .registry
        .as_ref()
        .filter(|r| stack.reuses_platform() && stack.registries.contains_key(*r))
    else {
        return Ok(None);
    };
    let of = Scope {
        stack: stack.name.clone(),
        env: stack.platform_env().to_owned(),
        root: stack.root.clone(),
    };
    match aws.registry_url(&of, name).await? {
        Some(url) => Ok(Some(url)),
        None => Err(not_applied(stack, format!("registry.{name} (ECR)"))),
    }
}

#[cfg(all(feature = "aws", feature = "kubernetes"))]
fn not_applied(stack: &Stack, what: String) -> EngineError {
    EngineError::PlatformNotApplied {
        env: stack.platform_env().to_owned(),
        what,
        path: stack.root.display().to_string(),
    }
}
