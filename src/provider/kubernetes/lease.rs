//! The shared lock of a stack and environment on a cluster: a
//! `coordination.k8s.io/v1` Lease, `default/mesh-<stack>-<env>`, the way
//! Kubernetes' own controllers elect a leader. Everyone applying the stack
//! to this cluster (a laptop, CI) sees it, unlike the lock file under
//! `.mesh/`.
//!
//! - Taken by creating the Lease, or by replacing one whose holder stopped
//!   renewing it (`renewTime + leaseDurationSeconds` in the past), with the
//!   read `resourceVersion`: of two runs racing, the API server lets one win
//!   (409 for the other).
//! - Renewed every 20 s while held; a killed run's Lease lapses after 60 s.
//! - Released by deleting it, with the `uid` as a precondition so a Lease
//!   taken over meanwhile is left alone.
//! - Who holds it is in the `mesh.dev/holder` annotation (pid, host, command,
//!   since), for the refusal message.

use std::time::Duration;

use async_trait::async_trait;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams, Preconditions};
use serde_json::{Value as J, json};

use super::{Conn, describe, is_not_found};
use crate::lock::{Holder, format_time, now, parse_time};
use crate::provider::{ProviderError, SharedLock};
use crate::resource::Scope;

/// Where the Leases live: every cluster has it.
pub const NAMESPACE: &str = "default";
const DURATION_SECS: u64 = 60;
const RENEW_EVERY: Duration = Duration::from_secs(20);
const ANNOTATION_HOLDER: &str = "mesh.dev/holder";

fn resource() -> ApiResource {
    ApiResource {
        group: "coordination.k8s.io".into(),
        version: "v1".into(),
        api_version: "coordination.k8s.io/v1".into(),
        kind: "Lease".into(),
        plural: "leases".into(),
    }
}

/// `mesh-<stack>-<env>`, as a DNS subdomain (lowercase, at most 253).
pub fn name(scope: &Scope) -> String {
    let raw = format!("mesh-{}-{}", scope.stack, scope.env).to_lowercase();
    let mut n: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    n.truncate(253);
    n.trim_end_matches(['-', '.']).to_owned()
}

/// A Kubernetes `MicroTime`: RFC 3339 with exactly six fractional digits.
fn micro_time(secs: u64) -> String {
    format_time(secs).replace('Z', ".000000Z")
}

/// When a Lease lapses: its last renewal (or acquisition) plus its duration;
/// `None` when it says neither (then it is held).
fn lapses_at(lease: &J) -> Option<u64> {
    let spec = lease.get("spec")?;
    let last = spec
        .get("renewTime")
        .or_else(|| spec.get("acquireTime"))
        .and_then(J::as_str)
        .and_then(parse_time)?;
    let duration = spec
        .get("leaseDurationSeconds")
        .and_then(J::as_u64)
        .unwrap_or(DURATION_SECS);
    Some(last + duration)
}

/// Who holds `lease`, in words.
fn holder_of(lease: &J) -> String {
    let annotated = lease
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(ANNOTATION_HOLDER))
        .and_then(J::as_str)
        .and_then(|t| serde_json::from_str::<Holder>(t).ok());
    match annotated {
        Some(h) => format!(
            "`{}` (pid {} on {}) since {}",
            h.command,
            h.pid,
            h.host,
            format_time(h.since)
        ),
        None => format!(
            "`{}`",
            lease
                .pointer("/spec/holderIdentity")
                .and_then(J::as_str)
                .unwrap_or("someone")
        ),
    }
}

fn manifest(scope: &Scope, holder: &Holder, at: u64) -> J {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name(scope),
            "namespace": NAMESPACE,
            "labels": super::kinds::ownership_labels(&scope.stack, &scope.env),
            "annotations": { ANNOTATION_HOLDER: serde_json::to_string(holder).unwrap_or_default() },
        },
        "spec": {
            "holderIdentity": format!("{}@{} pid {}", holder.command, holder.host, holder.pid),
            "leaseDurationSeconds": DURATION_SECS,
            "acquireTime": micro_time(at),
            "renewTime": micro_time(at),
        },
    })
}

fn to_object(v: J) -> Result<DynamicObject, ProviderError> {
    serde_json::from_value(v).map_err(|e| ProviderError::Observe {
        provider: crate::resource::ProviderId::Kubernetes,
        message: format!("building the Lease: {e}"),
    })
}

fn api_error(conn: &Conn, what: &str, e: &kube::Error) -> ProviderError {
    ProviderError::Observe {
        provider: crate::resource::ProviderId::Kubernetes,
        message: format!("{what} Lease {NAMESPACE}: {}", describe(e, conn)),
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}

/// RBAC forbids Leases here: warn, and rely on the lock file.
fn forbidden(conn: &Conn, e: &kube::Error) -> Option<Box<dyn SharedLock>> {
    eprintln!(
        "warning: may not use Leases in namespace {NAMESPACE} on {} ({}): the stack is locked on this machine only",
        conn.context,
        describe(e, conn)
    );
    None
}

/// Takes the Lease of `scope`, or says who holds it. `Ok(None)` when this
/// user may not use Leases in `default` (a warning; the lock file still
/// guards this machine).
pub async fn acquire(
    conn: &Conn,
    scope: &Scope,
    holder: &Holder,
) -> Result<Option<Box<dyn SharedLock>>, ProviderError> {
    let stack_path_hint = scope.root.display().to_string();
    let api: Api<DynamicObject> = Api::namespaced_with(conn.client.clone(), NAMESPACE, &resource());
    let lease_name = name(scope);
    for _ in 0..3 {
        let at = now();
        let wanted = to_object(manifest(scope, holder, at))?;
        let taken = match api.get_opt(&lease_name).await {
            Err(e) if is_forbidden(&e) => return Ok(forbidden(conn, &e)),
            Err(e) => return Err(api_error(conn, "reading", &e)),
            Ok(None) => api.create(&PostParams::default(), &wanted).await,
            Ok(Some(existing)) => {
                let existing_json = serde_json::to_value(&existing).unwrap_or(J::Null);
                match lapses_at(&existing_json) {
                    Some(t) if t < at => {
                        let mut replacement = wanted.clone();
                        replacement.metadata.resource_version =
                            existing.metadata.resource_version.clone();
                        api.replace(&lease_name, &PostParams::default(), &replacement)
                            .await
                    }
                    lapses => {
                        return Err(ProviderError::Locked(format!(
                            "stack {} (environment {}) is locked on cluster {} by {} (Lease {NAMESPACE}/{lease_name}{})\n  help: wait for it to finish; if that run was killed, its lock lapses {DURATION_SECS} s after its last renewal, or break it with `mesh unlock {stack_path_hint} --env {}`",
                            scope.stack,
                            scope.env,
                            conn.context,
                            holder_of(&existing_json),
                            lapses
                                .map(|t| format!(", lapses at {}", format_time(t)))
                                .unwrap_or_default(),
                            scope.env,
                        )));
                    }
                }
            }
        };
        match taken {
            Ok(obj) => {
                let uid = obj.metadata.uid.clone().unwrap_or_default();
                let renewer = tokio::spawn(renew(api.clone(), lease_name.clone(), uid.clone()));
                return Ok(Some(Box::new(LeaseLock {
                    api,
                    name: lease_name,
                    uid,
                    renewer,
                })));
            }
            // Another run created or took it between our read and write: read again.
            Err(e) if is_conflict(&e) => continue,
            Err(e) if is_forbidden(&e) => return Ok(forbidden(conn, &e)),
            Err(e) => return Err(api_error(conn, "taking", &e)),
        }
    }
    Err(ProviderError::Locked(format!(
        "stack {} (environment {}): another run keeps taking Lease {NAMESPACE}/{lease_name} on {}; try again",
        scope.stack, scope.env, conn.context
    )))
}

/// Keeps the Lease alive while held; stops (with a warning) if it was taken
/// over or deleted.
async fn renew(api: Api<DynamicObject>, name: String, uid: String) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let current = match api.get_opt(&name).await {
            Ok(Some(o)) if o.metadata.uid.as_deref() == Some(uid.as_str()) => o,
            Ok(_) => {
                eprintln!(
                    "warning: the Lease {NAMESPACE}/{name} was broken or taken over; this run no longer holds the stack's lock"
                );
                return;
            }
            Err(_) => continue,
        };
        let mut v = serde_json::to_value(&current).unwrap_or(J::Null);
        v["spec"]["renewTime"] = json!(micro_time(now()));
        if let Ok(o) = serde_json::from_value::<DynamicObject>(v) {
            // A conflict means someone wrote it meanwhile: the next round reads again.
            let _ = api.replace(&name, &PostParams::default(), &o).await;
        }
    }
}

struct LeaseLock {
    api: Api<DynamicObject>,
    name: String,
    uid: String,
    renewer: tokio::task::JoinHandle<()>,
}

#[async_trait]
impl SharedLock for LeaseLock {
    async fn release(self: Box<Self>) {
        self.renewer.abort();
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.api.delete(&self.name, &params).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) || is_conflict(&e) => {}
            Err(e) => eprintln!(
                "warning: could not release the Lease {NAMESPACE}/{}: {e}; it lapses in {DURATION_SECS} s",
                self.name
            ),
        }
    }
}

/// Deletes the Lease of `scope` whoever holds it; who held it.
pub async fn break_lease(conn: &Conn, scope: &Scope) -> Result<Option<String>, ProviderError> {
    let api: Api<DynamicObject> = Api::namespaced_with(conn.client.clone(), NAMESPACE, &resource());
    let lease_name = name(scope);
    let Some(existing) = api
        .get_opt(&lease_name)
        .await
        .map_err(|e| api_error(conn, "reading", &e))?
    else {
        return Ok(None);
    };
    let who = holder_of(&serde_json::to_value(&existing).unwrap_or(J::Null));
    match api.delete(&lease_name, &DeleteParams::default()).await {
        Ok(_) => Ok(Some(format!(
            "{who} (Lease {NAMESPACE}/{lease_name} on {})",
            conn.context
        ))),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(api_error(conn, "deleting", &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(stack: &str, env: &str) -> Scope {
        Scope {
            stack: stack.into(),
            env: env.into(),
            root: std::path::PathBuf::from("."),
        }
    }

    #[test]
    fn lease_names_are_dns_subdomains() {
        assert_eq!(
            name(&scope("customer-mesh", "dev")),
            "mesh-customer-mesh-dev"
        );
        assert_eq!(name(&scope("Big_Stack", "prod")), "mesh-big-stack-prod");
        assert!(name(&scope(&"x".repeat(400), "e")).len() <= 253);
    }

    #[test]
    fn a_lease_lapses_after_its_last_renewal() {
        let lease = manifest(
            &scope("s", "e"),
            &Holder {
                pid: 7,
                host: "ci".into(),
                command: "mesh apply".into(),
                since: 1_795_000_000,
            },
            1_795_000_000,
        );
        assert_eq!(
            lease["spec"]["renewTime"], "2026-11-18T11:06:40.000000Z",
            "MicroTime has six fractional digits"
        );
        assert_eq!(lapses_at(&lease), Some(1_795_000_060));
        let mut renewed = lease.clone();
        renewed["spec"]["renewTime"] = json!(micro_time(1_795_000_100));
        assert_eq!(lapses_at(&renewed), Some(1_795_000_160));
        assert_eq!(
            holder_of(&lease),
            "`mesh apply` (pid 7 on ci) since 2026-11-18T11:06:40Z"
        );
        let bare = json!({"spec": {"holderIdentity": "kubectl"}});
        assert_eq!(holder_of(&bare), "`kubectl`");
        assert_eq!(lapses_at(&bare), None);
    }
}
