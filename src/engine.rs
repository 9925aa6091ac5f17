//! The engine: picks the providers a stack's environment needs, gathers the
//! desired resources and the live state, and asks `plan` for the diff.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::plan::{self, Plan};
use crate::provider::{Provider, ProviderError};
use crate::resource::{Desired, Live, ProviderId, Scope};
use crate::stack::{Stack, Target};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The environment needs a provider this build lacks.
    #[error("environment `{env}` targets {target}, but this mesh was built without the `{feature}` feature\n  help: rebuild with `cargo build --release --features {feature}`")]
    MissingFeature { env: String, target: &'static str, feature: &'static str },
    /// Providers' resources depend on each other in a cycle.
    #[error("dependency cycle between {0}")]
    Cycle(String),
}

/// A stack ready to be planned and applied.
pub struct Engine {
    pub stack: Stack,
    pub scope: Scope,
    pub providers: BTreeMap<ProviderId, Arc<dyn Provider>>,
}

impl Engine {
    /// Sets up the providers for the stack's environment.
    pub async fn new(stack: Stack) -> Result<Engine, EngineError> {
        let scope = Scope { stack: stack.name.clone(), env: stack.env.name.clone(), root: stack.root.clone() };
        let mut providers: BTreeMap<ProviderId, Arc<dyn Provider>> = BTreeMap::new();
        match stack.env.target {
            Target::Local => {
                providers.insert(ProviderId::Local, Arc::new(crate::provider::local::LocalProvider::new()?));
            }
            Target::Aws => {
                #[cfg(feature = "aws")]
                {
                    let aws = crate::provider::aws::AwsProvider::new(stack.env.region.clone()).await?;
                    providers.insert(ProviderId::Aws, Arc::new(aws));
                }
                #[cfg(not(feature = "aws"))]
                return Err(EngineError::MissingFeature { env: stack.env.name.clone(), target: "aws", feature: "aws" });
            }
            Target::Kubernetes => {
                return Err(EngineError::MissingFeature { env: stack.env.name.clone(), target: "kubernetes", feature: "kubernetes" });
            }
        }
        Ok(Engine { stack, scope, providers })
    }

    /// Every provider's desired resources, in dependency order.
    pub fn desired(&self) -> Result<Vec<Desired>, EngineError> {
        let mut all = Vec::new();
        for p in self.providers.values() {
            all.extend(p.desired(&self.stack)?);
        }
        crate::graph::topo_order(all).map_err(|stuck| EngineError::Cycle(stuck.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")))
    }

    /// Every provider's live resources (observed concurrently).
    pub async fn observe(&self) -> Result<Vec<Live>, EngineError> {
        let futures = self.providers.values().map(|p| {
            let p = p.clone();
            let scope = self.scope.clone();
            async move { p.observe(&scope).await }
        });
        let mut live = Vec::new();
        for r in futures_join(futures).await {
            live.extend(r?);
        }
        Ok(live)
    }

    /// Observes live state and diffs it against the stack.
    pub async fn plan(&self, options: &plan::Options) -> Result<Plan, EngineError> {
        let desired = self.desired()?;
        let live = self.observe().await?;
        Ok(plan::diff(&self.stack.name, &self.stack.env.name, &desired, &live, options))
    }
}

async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut out = Vec::new();
    for f in futures {
        out.push(f.await);
    }
    out
}
