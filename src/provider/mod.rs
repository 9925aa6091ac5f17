//! Providers: the only code that talks to the outside world.
//!
//! Each provider turns the resolved stack into desired resources (pure),
//! observes the live resources it owns for a stack and environment (by
//! ownership marks: AWS tags, Kubernetes labels, local state under `.mesh/`),
//! and carries out one planned change at a time.

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod local;
pub(crate) mod wait;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use async_trait::async_trait;

use crate::output::Outputs;
use crate::plan::Change;
use crate::resource::{Address, Desired, Live, ProviderId, Scope, Value};
use crate::stack::Stack;

/// Errors a provider reports. Messages name the resource and the cause, and
/// never contain secret values.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The stack asks for something this provider cannot build.
    #[error("{address}: {message}")]
    Invalid { address: Address, message: String },
    /// The remote API refused the request and retrying will not help.
    #[error("{address}: {message}")]
    Api { address: Address, message: String },
    /// Observing live state failed.
    #[error("reading live state from {provider}: {message}")]
    Observe {
        provider: ProviderId,
        message: String,
    },
    /// Waiting for a resource to become ready timed out.
    #[error("{address}: not ready after {seconds}s: {message}")]
    Timeout {
        address: Address,
        seconds: u64,
        message: String,
    },
    /// The operation was interrupted (Ctrl-C); a rerun picks it up.
    #[error("{address}: interrupted")]
    Interrupted { address: Address },
    /// Another run holds the stack's shared lock.
    #[error("{0}")]
    Locked(String),
    /// Local I/O.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a provider may use while carrying out a change.
pub struct ApplyContext {
    outputs: Mutex<BTreeMap<Address, BTreeMap<String, Value>>>,
    started: Instant,
    /// Set when the user pressed Ctrl-C: finish or abandon the current wait.
    pub cancel: tokio::sync::watch::Receiver<bool>,
    /// Do not wait for rollouts to become ready (`--no-wait`).
    pub no_wait: bool,
    pub scope: Scope,
}

impl ApplyContext {
    pub fn new(
        scope: Scope,
        live: &[Live],
        cancel: tokio::sync::watch::Receiver<bool>,
        no_wait: bool,
    ) -> Self {
        let outputs = live
            .iter()
            .map(|l| (l.address.clone(), l.outputs.clone()))
            .collect();
        ApplyContext {
            outputs: Mutex::new(outputs),
            started: Instant::now(),
            cancel,
            no_wait,
            scope,
        }
    }

    /// Resolves references in a value against outputs known now (live state
    /// plus what this apply has created so far).
    pub fn resolve(&self, v: &Value) -> Value {
        let outputs = self.outputs.lock().unwrap_or_else(|e| e.into_inner());
        v.resolve_refs(&|address, output| outputs.get(address).and_then(|o| o.get(output)).cloned())
    }

    /// The desired attributes with references resolved.
    pub fn resolved_attrs(&self, d: &Desired) -> BTreeMap<String, Value> {
        d.attrs
            .iter()
            .map(|(k, a)| (k.clone(), self.resolve(&a.value)))
            .collect()
    }

    pub fn record(&self, live: &Live) {
        let mut outputs = self.outputs.lock().unwrap_or_else(|e| e.into_inner());
        outputs.insert(live.address.clone(), live.outputs.clone());
    }

    pub fn forget(&self, address: &Address) {
        let mut outputs = self.outputs.lock().unwrap_or_else(|e| e.into_inner());
        outputs.remove(address);
    }

    /// Progress for people, on stderr: which resource, what, elapsed time.
    pub fn progress(&self, address: &Address, message: &str) {
        eprintln!(
            "{address}: {message} [{}s elapsed]",
            self.started.elapsed().as_secs()
        );
    }

    pub fn cancelled(&self) -> bool {
        *self.cancel.borrow()
    }
}

/// One provider (local, aws, kubernetes).
#[async_trait]
pub trait Provider: Send + Sync {
    fn id(&self) -> ProviderId;

    /// The desired resources for this provider, in dependency order. Reads,
    /// never changes, the world: the stack's own files (to digest a
    /// dataset), the secrets it digests, and what the provider recorded
    /// before (the local target's allocated ports, probed free on this
    /// machine). Nothing it does needs undoing when the plan is not applied.
    /// Two things go beyond reading (see ARCHITECTURE.md): the Kubernetes
    /// provider builds images in memory for their digests (remembered in a
    /// cache file under `.mesh/`), and plan-time warnings go to stderr.
    fn desired(&self, stack: &Stack) -> Result<Vec<Desired>, ProviderError>;

    /// Reads the live resources this provider owns for `scope`.
    async fn observe(&self, scope: &Scope) -> Result<Vec<Live>, ProviderError>;

    /// Carries out one change and waits until it is ready. Returns the live
    /// resource afterwards, or `None` once deleted.
    async fn apply(
        &self,
        change: &Change,
        ctx: &ApplyContext,
    ) -> Result<Option<Live>, ProviderError>;

    /// What `mesh output` shows of the resources this provider owns, read
    /// from `live` (every provider's live resources): an exposure's URLs,
    /// a cluster's endpoint, a registry's URL, a network's ids. Only the
    /// provider knows its addresses and outputs; nothing secret.
    fn outputs(&self, _stack: &Stack, _live: &[Live]) -> Outputs {
        Outputs::default()
    }

    /// Checks, before anything of the plan is applied, what carrying out
    /// `change` needs from outside the stack (the databases a service reads
    /// at start, its query, its key column). `apply` checks every change of
    /// the plan first and changes nothing when one check fails.
    async fn preflight(&self, _change: &Change, _ctx: &ApplyContext) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Gives every caller identity of `stack` a new key without refusing a
    /// call (`mesh apply --rotate-keys`): new keys accepted beside the old,
    /// callers switched, old keys removed. The identities rotated.
    async fn rotate_keys(
        &self,
        _stack: &Stack,
        _ctx: &ApplyContext,
    ) -> Result<Vec<String>, ProviderError> {
        Ok(Vec::new())
    }

    /// The key `caller` presents, where the provider keeps it (a cluster's
    /// Secret); `None` where it does not (the local target: a file).
    async fn caller_key(
        &self,
        _stack: &Stack,
        _caller: &str,
    ) -> Result<Option<String>, ProviderError> {
        Ok(None)
    }

    /// Takes the lock of `scope` that everyone applying it shares, where the
    /// provider's backend can hold one (a Kubernetes Lease); `None` where it
    /// cannot (yet). Refused with [`ProviderError::Locked`] while another
    /// run holds it.
    async fn lock(
        &self,
        _scope: &Scope,
        _holder: &crate::lock::Holder,
    ) -> Result<Option<Box<dyn SharedLock>>, ProviderError> {
        Ok(None)
    }

    /// Breaks `scope`'s shared lock (`mesh unlock`); who held it, if anyone.
    async fn unlock(&self, _scope: &Scope) -> Result<Option<String>, ProviderError> {
        Ok(None)
    }
}

/// A held shared lock; it lapses if not renewed (a killed run), so release it.
#[async_trait]
pub trait SharedLock: Send + Sync {
    /// Gives it up.
    async fn release(self: Box<Self>);
}
