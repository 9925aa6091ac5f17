//! Waiting for a Deployment to roll out, and explaining why it does not.
//!
//! Done when `observedGeneration >= generation` and updated, available and
//! total replicas all equal the desired count. Pods of the new template
//! waiting with a reason that does not fix itself (`ImagePullBackOff`,
//! `CrashLoopBackOff`, a bad config) fail the wait at once; otherwise it
//! fails at the timeout or when the Deployment reports
//! `ProgressDeadlineExceeded`, naming the pod's reason and what to look at.

use kube::api::{Api, DynamicObject, ListParams};
use serde_json::Value as J;

use super::project::rollout_state;
use super::{Conn, Settings, describe, to_json};
use crate::provider::wait::{Polled, Report, Wait, poll_until};
use crate::provider::{ApplyContext, ProviderError};
use crate::resource::Address;

/// Container waiting reasons that mean the rollout will not finish by itself.
const STUCK: &[&str] = &[
    "ImagePullBackOff",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

pub(super) struct Waiter<'a> {
    pub api: &'a Api<DynamicObject>,
    pub pods: Api<DynamicObject>,
    pub conn: &'a Conn,
    pub settings: &'a Settings,
}

impl Waiter<'_> {
    /// Polls until the rollout completes; returns the Deployment as last read.
    pub async fn wait(
        &self,
        address: &Address,
        name: &str,
        ns: &str,
        ctx: &ApplyContext,
    ) -> Result<J, ProviderError> {
        let api_err = |e: kube::Error| ProviderError::Api {
            address: address.clone(),
            message: format!(
                "reading Deployment {ns}/{name}: {}",
                describe(&e, self.conn)
            ),
        };
        let wait = Wait {
            what: "rolling out",
            timeout: self.settings.rollout_timeout,
            every: self.settings.every(),
            report: Report::Changes,
        };
        poll_until(&wait, Some((ctx, address)), || async {
            let dep = to_json(&self.api.get(name).await.map_err(api_err)?);
            let state = rollout_state(&dep);
            if state == "complete" {
                return Ok(Polled::Done(dep));
            }
            let image = dep
                .pointer("/spec/template/spec/containers/0/image")
                .and_then(J::as_str)
                .unwrap_or_default()
                .to_owned();
            let pods = self.pods_of(name, &image).await;
            if let Some(p) = pods
                .iter()
                .find(|p| p.reason.as_deref().is_some_and(|r| STUCK.contains(&r)))
            {
                return Err(ProviderError::Api {
                    address: address.clone(),
                    message: failure(ns, name, p, "rollout failed"),
                });
            }
            if state.starts_with("failed") {
                let message = match pods.iter().find(|p| p.reason.is_some()) {
                    Some(p) => failure(ns, name, p, &format!("rollout {state}")),
                    None => format!(
                        "rollout of Deployment {ns}/{name} {state}\n  look at: kubectl -n {ns} describe deployment {name}"
                    ),
                };
                return Err(ProviderError::Api {
                    address: address.clone(),
                    message,
                });
            }
            Ok(Polled::Pending(Rolling { state, pods }))
        })
        .await
        .map_err(|w| {
            w.into_error(address, self.settings.rollout_timeout, |last| {
                match last.pods.iter().find(|p| p.reason.is_some()) {
                    Some(p) => failure(ns, name, p, &last.state),
                    None => format!(
                        "{}\n  look at: kubectl -n {ns} describe deployment {name}",
                        last.state
                    ),
                }
            })
        })
    }

    /// The pods of the Deployment running `image` (the new template's), with
    /// why each is not ready. Errors reading pods leave the list empty: they
    /// only explain, the Deployment's status decides.
    async fn pods_of(&self, deployment: &str, image: &str) -> Vec<PodState> {
        let Ok(dep) = self.api.get(deployment).await else {
            return Vec::new();
        };
        let dep = to_json(&dep);
        let Some(labels) = dep
            .pointer("/spec/selector/matchLabels")
            .and_then(J::as_object)
        else {
            return Vec::new();
        };
        let selector: Vec<String> = labels
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|v| format!("{k}={v}")))
            .collect();
        let Ok(list) = self
            .pods
            .list(&ListParams::default().labels(&selector.join(",")))
            .await
        else {
            return Vec::new();
        };
        list.items
            .iter()
            .map(to_json)
            .filter(|p| p.pointer("/spec/containers/0/image").and_then(J::as_str) == Some(image))
            .map(|p| pod_state(&p))
            .collect()
    }
}

/// A rollout not done yet: its state (what progress shows) and why its pods
/// are not ready (what a timeout names).
struct Rolling {
    state: String,
    pods: Vec<PodState>,
}

impl std::fmt::Display for Rolling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.state)
    }
}

/// Why a pod is not ready.
#[derive(Debug, PartialEq)]
struct PodState {
    name: String,
    reason: Option<String>,
    message: Option<String>,
}

fn pod_state(p: &J) -> PodState {
    let name = p
        .pointer("/metadata/name")
        .and_then(J::as_str)
        .unwrap_or_default()
        .to_owned();
    let statuses = p
        .pointer("/status/containerStatuses")
        .and_then(J::as_array)
        .cloned()
        .unwrap_or_default();
    for c in &statuses {
        if let Some(w) = c.pointer("/state/waiting")
            && let Some(r) = w.get("reason").and_then(J::as_str)
            && r != "ContainerCreating"
            && r != "PodInitializing"
        {
            return PodState {
                name,
                reason: Some(r.to_owned()),
                message: w.get("message").and_then(J::as_str).map(str::to_owned),
            };
        }
    }
    let conditions = p
        .pointer("/status/conditions")
        .and_then(J::as_array)
        .cloned()
        .unwrap_or_default();
    let cond = |t: &str| {
        conditions
            .iter()
            .find(|c| c.get("type").and_then(J::as_str) == Some(t))
    };
    if let Some(c) =
        cond("PodScheduled").filter(|c| c.get("status").and_then(J::as_str) == Some("False"))
    {
        return PodState {
            name,
            reason: Some(
                c.get("reason")
                    .and_then(J::as_str)
                    .unwrap_or("Unschedulable")
                    .to_owned(),
            ),
            message: c.get("message").and_then(J::as_str).map(str::to_owned),
        };
    }
    let running = statuses
        .iter()
        .any(|c| c.pointer("/state/running").is_some());
    let ready = statuses
        .iter()
        .all(|c| c.get("ready").and_then(J::as_bool) == Some(true));
    if running && !ready {
        return PodState {
            name,
            reason: Some("failed readiness".to_owned()),
            message: Some(format!(
                "the container runs but {} does not answer 200",
                "/readyz"
            )),
        };
    }
    PodState {
        name,
        reason: None,
        message: None,
    }
}

fn failure(ns: &str, deployment: &str, p: &PodState, what: &str) -> String {
    let reason = p.reason.as_deref().unwrap_or("not ready");
    let detail = p
        .message
        .as_deref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    let hint = match reason {
        "ImagePullBackOff" | "ErrImagePull" | "InvalidImageName" => {
            "can the cluster's nodes pull the image from the registry (address, credentials)?"
        }
        "CrashLoopBackOff" => {
            "the runtime exits at start: read its log with `kubectl -n NS logs POD --previous`"
        }
        "failed readiness" => {
            "the runtime runs but is not ready (datasets or connections still loading, or failing)"
        }
        "Unschedulable" => "no node has room for the requested cpu/memory, or none matches",
        _ => "",
    }
    .replace("NS", ns)
    .replace("POD", &p.name);
    let mut m = format!(
        "{what}: pod {} of Deployment {ns}/{deployment}: {reason}{detail}\n  look at: kubectl -n {ns} describe pod {}",
        p.name, p.name
    );
    if !hint.is_empty() {
        m.push_str(&format!("\n  hint: {hint}"));
    }
    m.push_str("\n  pods of the previous template, if any, keep serving; fix the stack and apply again, or apply the previous stack to roll back");
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn waiting_reason_is_reported() {
        let p = json!({"metadata": {"name": "web-1"}, "status": {"containerStatuses": [{"ready": false, "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}]}});
        let s = pod_state(&p);
        assert_eq!(s.reason.as_deref(), Some("ImagePullBackOff"));
        let m = failure("ns", "web", &s, "rollout failed");
        assert!(
            m.contains("ImagePullBackOff") && m.contains("kubectl -n ns describe pod web-1"),
            "{m}"
        );
    }

    #[test]
    fn running_but_unready_is_failed_readiness() {
        let p = json!({"metadata": {"name": "web-1"}, "status": {"containerStatuses": [{"ready": false, "state": {"running": {}}}]}});
        assert_eq!(pod_state(&p).reason.as_deref(), Some("failed readiness"));
    }
}
