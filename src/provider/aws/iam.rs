//! IAM roles for EKS clusters and node groups.
//!
//! A role's path is `/mesh/<stack>/<env>/<address>/`, so one paginated
//! `ListRoles` by path prefix finds every role of a stack and environment
//! and names its address; the ownership tags are set at creation too.

use std::collections::BTreeMap;

use aws_sdk_iam::types::Tag;

use crate::provider::{ApplyContext, ProviderError};
use crate::resource::{Address, Desired, Live, ProviderId, Scope, Value};

use super::call::{AwsError, Service, gone_ok, retry_for};
use super::{AwsProvider, attr_str, kind, names, ownership_tags};

fn trust_policy(service: &str) -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": { "Service": service },
            "Action": "sts:AssumeRole"
        }]
    })
    .to_string()
}

/// The service principal of a trust policy document (URL-encoded or not).
fn trusted_service(doc: &str) -> Value {
    let decoded = percent_decode(doc);
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&decoded) else {
        return Value::Null;
    };
    let statements = match &json["Statement"] {
        serde_json::Value::Array(a) => a.clone(),
        other => vec![other.clone()],
    };
    statements
        .iter()
        .find_map(|s| match &s["Principal"]["Service"] {
            serde_json::Value::String(x) => Some(Value::str(x.clone())),
            serde_json::Value::Array(a) => a.first().and_then(|v| v.as_str()).map(Value::str),
            _ => None,
        })
        .unwrap_or(Value::Null)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// IAM's continuation marker: only meaningful while the listing is truncated.
fn next_marker(truncated: bool, marker: Option<&str>) -> Option<String> {
    marker.filter(|_| truncated).map(str::to_owned)
}

impl AwsProvider {
    pub(super) async fn observe_roles(&self, scope: &Scope) -> Result<Vec<Live>, ProviderError> {
        let prefix = names::iam_path_prefix(&scope.stack, &scope.env);
        let roles = self
            .limiter
            .pages(
                Service::Iam,
                "ListRoles",
                |marker| {
                    let req = self.iam.list_roles().path_prefix(&prefix);
                    req.set_marker(marker).send()
                },
                |page| {
                    let next = next_marker(page.is_truncated(), page.marker());
                    (page.roles().to_vec(), next)
                },
            )
            .await
            .map_err(AwsError::observing)?;
        let mut out = Vec::new();
        for role in &roles {
            let Some(address) = role
                .path()
                .strip_prefix(&prefix)
                .map(|p| p.trim_end_matches('/'))
            else {
                continue;
            };
            if address.is_empty() {
                continue;
            }
            let policies = self
                .attached_policies(role.role_name())
                .await
                .map_err(AwsError::observing)?;
            out.push(role_live(Address::new(address), role, policies));
        }
        Ok(out)
    }

    async fn attached_policies(&self, role: &str) -> Result<Vec<String>, AwsError> {
        let mut out = self
            .limiter
            .pages(
                Service::Iam,
                "ListAttachedRolePolicies",
                |marker| {
                    let req = self.iam.list_attached_role_policies().role_name(role);
                    req.set_marker(marker).send()
                },
                |page| {
                    let arns = page.attached_policies().iter();
                    let arns = arns.filter_map(|p| p.policy_arn().map(str::to_owned));
                    (
                        arns.collect(),
                        next_marker(page.is_truncated(), page.marker()),
                    )
                },
            )
            .await?;
        out.sort();
        Ok(out)
    }

    async fn read_role(&self, a: &Address, name: &str) -> Result<Live, ProviderError> {
        let out = self
            .limiter
            .call(
                Service::Iam,
                "GetRole",
                self.iam.get_role().role_name(name).send(),
            )
            .await
            .map_err(|e| e.at(a))?;
        let Some(role) = out.role() else {
            return Err(ProviderError::Api {
                address: a.clone(),
                message: format!("GetRole: role {name} not returned"),
            });
        };
        let policies = self.attached_policies(name).await.map_err(|e| e.at(a))?;
        Ok(role_live(a.clone(), role, policies))
    }

    pub(super) async fn create_role(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let name = attr_str(attrs, "name").unwrap_or_default();
        let service = attr_str(attrs, "service").unwrap_or_else(|| "eks.amazonaws.com".into());
        let mut tags = Vec::new();
        for (k, v) in ownership_tags(&ctx.scope, a) {
            let tag =
                Tag::builder()
                    .key(k)
                    .value(v)
                    .build()
                    .map_err(|e| ProviderError::Invalid {
                        address: a.clone(),
                        message: format!("bad IAM tag: {e}"),
                    })?;
            tags.push(tag);
        }
        let req = self
            .iam
            .create_role()
            .role_name(&name)
            .path(attr_str(attrs, "path").unwrap_or_else(|| "/".into()))
            .assume_role_policy_document(trust_policy(&service))
            .description(format!("mesh {a}"))
            .set_tags(Some(tags));
        self.limiter
            .call(Service::Iam, "CreateRole", req.send())
            .await
            .map_err(|e| e.at(a))?;
        for arn in policy_list(attrs) {
            let req = self
                .iam
                .attach_role_policy()
                .role_name(&name)
                .policy_arn(&arn);
            self.limiter
                .call(Service::Iam, "AttachRolePolicy", req.send())
                .await
                .map_err(|e| e.at(a))?;
        }
        self.read_role(a, &name).await
    }

    pub(super) async fn update_role(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        live: &Live,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let want = policy_list(attrs);
        let have = policy_list(&live.attrs);
        for arn in want.iter().filter(|p| !have.contains(p)) {
            let req = self
                .iam
                .attach_role_policy()
                .role_name(&live.id)
                .policy_arn(arn);
            self.limiter
                .call(Service::Iam, "AttachRolePolicy", req.send())
                .await
                .map_err(|e| e.at(a))?;
        }
        for arn in have.iter().filter(|p| !want.contains(p)) {
            let req = self
                .iam
                .detach_role_policy()
                .role_name(&live.id)
                .policy_arn(arn);
            self.limiter
                .call(Service::Iam, "DetachRolePolicy", req.send())
                .await
                .map_err(|e| e.at(a))?;
        }
        self.read_role(a, &live.id).await
    }

    pub(super) async fn delete_role(&self, live: &Live) -> Result<(), ProviderError> {
        let a = &live.address;
        let name = live.id.as_str();
        match self.attached_policies(name).await {
            Ok(policies) => {
                for arn in policies {
                    let req = self
                        .iam
                        .detach_role_policy()
                        .role_name(name)
                        .policy_arn(&arn);
                    match self
                        .limiter
                        .call(Service::Iam, "DetachRolePolicy", req.send())
                        .await
                    {
                        Ok(_) => {}
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e.at(a)),
                    }
                }
            }
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e.at(a)),
        }
        let (budget, base) = (
            self.config.dependency_timeout,
            self.config.dependency_backoff,
        );
        let res = retry_for(
            budget,
            base,
            |e: &AwsError| e.is("DeleteConflict"),
            |_| async {},
            || async {
                self.limiter
                    .call(
                        Service::Iam,
                        "DeleteRole",
                        self.iam.delete_role().role_name(name).send(),
                    )
                    .await
            },
        )
        .await;
        gone_ok(res, a)
    }
}

fn role_live(address: Address, role: &aws_sdk_iam::types::Role, policies: Vec<String>) -> Live {
    let service = role
        .assume_role_policy_document()
        .map(trusted_service)
        .unwrap_or(Value::Null);
    Live::new(address, kind::IAM_ROLE, ProviderId::Aws, role.role_name())
        .attr("name", role.role_name())
        .attr("path", role.path())
        .attr("service", service)
        .attr("policies", Value::list_of_str(policies))
        .output("arn", role.arn())
        .output("name", role.role_name())
}

fn policy_list(attrs: &BTreeMap<String, Value>) -> Vec<String> {
    match attrs.get("policies") {
        Some(Value::List(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_policy_service_is_read_back_encoded_or_not() {
        let doc = trust_policy("eks.amazonaws.com");
        assert_eq!(trusted_service(&doc), Value::str("eks.amazonaws.com"));
        let encoded: String = doc
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b == b'.' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        assert_eq!(trusted_service(&encoded), Value::str("eks.amazonaws.com"));
        assert_eq!(trusted_service("not json"), Value::Null);
    }
}
