//! ECR repositories: scan on push, tag immutability, and a lifecycle
//! policy keeping the last N images.
//!
//! Repositories are named `<stack>/<env>/<name>`: one paginated
//! `DescribeRepositories` finds the candidates by that prefix, and their
//! tags (`ListTagsForResource`) confirm ownership and give the address. ECR
//! has no batch call for tags or lifecycle policies, so those two calls are
//! made per repository of the stack (concurrently, under the rate limit).

use std::collections::BTreeMap;

use aws_sdk_ecr::types::{ImageScanningConfiguration, ImageTagMutability, Tag};
use futures::StreamExt;

use crate::provider::{ApplyContext, ProviderError};
use crate::resource::{Address, Desired, Live, ProviderId, Scope, Value};

use super::call::{AwsError, Service};
use super::network::gone_ok;
use super::{
    AwsProvider, TAG_ADDRESS, TAG_ENV, TAG_STACK, attr_str, kind, map_delta, names, ownership_tags,
    str_map, user_tags,
};

/// The lifecycle policy that keeps the last `n` images.
pub fn keep_last_policy(n: i64) -> String {
    serde_json::json!({
        "rules": [{
            "rulePriority": 1,
            "description": format!("mesh: keep the last {n} images"),
            "selection": { "tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": n },
            "action": { "type": "expire" }
        }]
    })
    .to_string()
}

/// `keep_last` as observed: the count of a mesh-shaped policy, `Null` when
/// there is none, and a marker string for any other policy (so it diffs).
fn keep_last_of(policy: Option<&str>) -> Value {
    let Some(text) = policy else {
        return Value::Null;
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else {
        return Value::str("custom lifecycle policy");
    };
    match json["rules"].as_array().map(Vec::as_slice) {
        Some([rule])
            if rule["selection"]["countType"] == "imageCountMoreThan"
                && rule["selection"]["tagStatus"] == "any"
                && rule["action"]["type"] == "expire" =>
        {
            rule["selection"]["countNumber"]
                .as_i64()
                .map(Value::Int)
                .unwrap_or(Value::str("custom lifecycle policy"))
        }
        _ => Value::str("custom lifecycle policy"),
    }
}

fn ecr_tags(items: impl IntoIterator<Item = (String, String)>) -> Result<Vec<Tag>, String> {
    items
        .into_iter()
        .map(|(k, v)| {
            Tag::builder()
                .key(k)
                .value(v)
                .build()
                .map_err(|e| e.to_string())
        })
        .collect()
}

fn repository_live(
    address: Address,
    r: &aws_sdk_ecr::types::Repository,
    tags: &[(String, String)],
    policy: Option<&str>,
) -> Live {
    let name = r.repository_name().unwrap_or_default();
    Live::new(address, kind::ECR_REPOSITORY, ProviderId::Aws, name)
        .attr("name", name)
        .attr(
            "scan_on_push",
            r.image_scanning_configuration()
                .is_some_and(|c| c.scan_on_push()),
        )
        .attr(
            "immutable_tags",
            r.image_tag_mutability()
                .is_some_and(|m| m.as_str().starts_with("IMMUTABLE")),
        )
        .attr("keep_last", keep_last_of(policy))
        .attr(
            "tags",
            user_tags(tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        )
        .output("name", name)
        .output("arn", r.repository_arn().unwrap_or_default())
        .output("url", r.repository_uri().unwrap_or_default())
}

impl AwsProvider {
    pub(super) async fn observe_registries(
        &self,
        scope: &Scope,
    ) -> Result<Vec<Live>, ProviderError> {
        let prefix = names::ecr_prefix(&scope.stack, &scope.env);
        let mut repos = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let req = self
                .ecr
                .describe_repositories()
                .max_results(1000)
                .set_next_token(token.take());
            let page = self
                .limiter
                .call(Service::Ecr, "DescribeRepositories", req.send())
                .await
                .map_err(AwsError::observing)?;
            repos.extend(
                page.repositories()
                    .iter()
                    .filter(|r| r.repository_name().is_some_and(|n| n.starts_with(&prefix)))
                    .cloned(),
            );
            match page.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                _ => break,
            }
        }
        let results: Vec<Result<Option<Live>, AwsError>> = futures::stream::iter(repos)
            .map(|r| async move {
                let (tags, policy) =
                    futures::join!(self.repository_tags(&r), self.lifecycle_policy(&r));
                let tags = tags?;
                let policy = policy?;
                let get = |k: &str| tags.iter().find(|(t, _)| t == k).map(|(_, v)| v.as_str());
                if get(TAG_STACK) != Some(scope.stack.as_str())
                    || get(TAG_ENV) != Some(scope.env.as_str())
                {
                    return Ok(None);
                }
                let Some(address) = get(TAG_ADDRESS).map(Address::new) else {
                    return Ok(None);
                };
                Ok(Some(repository_live(address, &r, &tags, policy.as_deref())))
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut out = Vec::new();
        for r in results {
            if let Some(l) = r.map_err(AwsError::observing)? {
                out.push(l);
            }
        }
        out.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(out)
    }

    async fn repository_tags(
        &self,
        r: &aws_sdk_ecr::types::Repository,
    ) -> Result<Vec<(String, String)>, AwsError> {
        let req = self
            .ecr
            .list_tags_for_resource()
            .resource_arn(r.repository_arn().unwrap_or_default());
        let out = self
            .limiter
            .call(Service::Ecr, "ListTagsForResource", req.send())
            .await?;
        Ok(out
            .tags()
            .iter()
            .map(|t| (t.key().to_owned(), t.value().to_owned()))
            .collect())
    }

    async fn lifecycle_policy(
        &self,
        r: &aws_sdk_ecr::types::Repository,
    ) -> Result<Option<String>, AwsError> {
        let req = self
            .ecr
            .get_lifecycle_policy()
            .repository_name(r.repository_name().unwrap_or_default());
        match self
            .limiter
            .call(Service::Ecr, "GetLifecyclePolicy", req.send())
            .await
        {
            Ok(out) => Ok(out.lifecycle_policy_text().map(str::to_owned)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn read_repository(&self, a: &Address, name: &str) -> Result<Live, ProviderError> {
        let req = self.ecr.describe_repositories().repository_names(name);
        let out = self
            .limiter
            .call(Service::Ecr, "DescribeRepositories", req.send())
            .await
            .map_err(|e| e.at(a))?;
        let Some(r) = out.repositories().first() else {
            return Err(ProviderError::Api {
                address: a.clone(),
                message: format!("repository {name} not returned"),
            });
        };
        let (tags, policy) = futures::join!(self.repository_tags(r), self.lifecycle_policy(r));
        let tags = tags.map_err(|e| e.at(a))?;
        let policy = policy.map_err(|e| e.at(a))?;
        Ok(repository_live(a.clone(), r, &tags, policy.as_deref()))
    }

    pub(super) async fn create_repository(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let name = attr_str(attrs, "name").unwrap_or_default();
        let mut tags = str_map(attrs.get("tags"));
        tags.extend(ownership_tags(&ctx.scope, a));
        let tags = ecr_tags(tags).map_err(|m| ProviderError::Invalid {
            address: a.clone(),
            message: m,
        })?;
        let req = self
            .ecr
            .create_repository()
            .repository_name(&name)
            .image_tag_mutability(mutability(attrs))
            .image_scanning_configuration(scanning(attrs))
            .set_tags(Some(tags));
        self.limiter
            .call(Service::Ecr, "CreateRepository", req.send())
            .await
            .map_err(|e| e.at(a))?;
        if let Some(n) = attrs.get("keep_last").and_then(Value::as_int) {
            self.put_lifecycle(a, &name, n).await?;
        }
        self.read_repository(a, &name).await
    }

    async fn put_lifecycle(&self, a: &Address, name: &str, n: i64) -> Result<(), ProviderError> {
        let req = self
            .ecr
            .put_lifecycle_policy()
            .repository_name(name)
            .lifecycle_policy_text(keep_last_policy(n));
        self.limiter
            .call(Service::Ecr, "PutLifecyclePolicy", req.send())
            .await
            .map_err(|e| e.at(a))?;
        Ok(())
    }

    pub(super) async fn update_repository(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        live: &Live,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let name = live.id.as_str();
        if attrs.get("scan_on_push") != live.attrs.get("scan_on_push") {
            let req = self
                .ecr
                .put_image_scanning_configuration()
                .repository_name(name)
                .image_scanning_configuration(scanning(attrs));
            self.limiter
                .call(Service::Ecr, "PutImageScanningConfiguration", req.send())
                .await
                .map_err(|e| e.at(a))?;
        }
        if attrs.get("immutable_tags") != live.attrs.get("immutable_tags") {
            let req = self
                .ecr
                .put_image_tag_mutability()
                .repository_name(name)
                .image_tag_mutability(mutability(attrs));
            self.limiter
                .call(Service::Ecr, "PutImageTagMutability", req.send())
                .await
                .map_err(|e| e.at(a))?;
        }
        let want = attrs.get("keep_last").cloned().unwrap_or(Value::Null);
        if Some(&want) != live.attrs.get("keep_last") {
            match want.as_int() {
                Some(n) => self.put_lifecycle(a, name, n).await?,
                None => {
                    let req = self.ecr.delete_lifecycle_policy().repository_name(name);
                    match self
                        .limiter
                        .call(Service::Ecr, "DeleteLifecyclePolicy", req.send())
                        .await
                    {
                        Ok(_) => {}
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e.at(a)),
                    }
                }
            }
        }
        let (set, remove) = map_delta(
            &str_map(attrs.get("tags")),
            &str_map(live.attrs.get("tags")),
        );
        let arn = live
            .outputs
            .get("arn")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !set.is_empty() {
            let tags = ecr_tags(set).map_err(|m| ProviderError::Invalid {
                address: a.clone(),
                message: m,
            })?;
            let req = self
                .ecr
                .tag_resource()
                .resource_arn(arn)
                .set_tags(Some(tags));
            self.limiter
                .call(Service::Ecr, "TagResource", req.send())
                .await
                .map_err(|e| e.at(a))?;
        }
        if !remove.is_empty() {
            let req = self
                .ecr
                .untag_resource()
                .resource_arn(arn)
                .set_tag_keys(Some(remove));
            self.limiter
                .call(Service::Ecr, "UntagResource", req.send())
                .await
                .map_err(|e| e.at(a))?;
        }
        self.read_repository(a, name).await
    }

    pub(super) async fn delete_repository(&self, live: &Live) -> Result<(), ProviderError> {
        // `force`: the images go with the repository (destroy leaves nothing).
        let req = self
            .ecr
            .delete_repository()
            .repository_name(&live.id)
            .force(true);
        gone_ok(
            self.limiter
                .call(Service::Ecr, "DeleteRepository", req.send())
                .await,
            &live.address,
        )
    }
}

fn mutability(attrs: &BTreeMap<String, Value>) -> ImageTagMutability {
    if attrs.get("immutable_tags").and_then(Value::as_bool) == Some(true) {
        ImageTagMutability::Immutable
    } else {
        ImageTagMutability::Mutable
    }
}

fn scanning(attrs: &BTreeMap<String, Value>) -> ImageScanningConfiguration {
    ImageScanningConfiguration::builder()
        .scan_on_push(
            attrs
                .get("scan_on_push")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        )
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_policy_round_trips_and_custom_ones_differ() {
        assert_eq!(keep_last_of(Some(&keep_last_policy(7))), Value::Int(7));
        assert_eq!(keep_last_of(None), Value::Null);
        assert_eq!(
            keep_last_of(Some(r#"{"rules":[]}"#)),
            Value::str("custom lifecycle policy")
        );
        assert_eq!(
            keep_last_of(Some("nonsense")),
            Value::str("custom lifecycle policy")
        );
    }
}
