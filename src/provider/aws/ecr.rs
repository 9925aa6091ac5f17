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

use super::call::{AwsError, Service, gone_ok};
use super::{
    AwsProvider, TAG_ADDRESS, TAG_ENV, TAG_STACK, attr_str, kind, map_delta, names, ownership_tags,
    str_map, user_tags,
};

/// How long fetched push credentials are reused (ECR's last 12 hours).
const CREDENTIALS_REUSE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Credentials to push to an account's ECR registry, from
/// `GetAuthorizationToken`. Never printed: `Debug` hides the password.
#[derive(Clone)]
pub struct RegistryCredentials {
    /// The registry host (`<account>.dkr.ecr.<region>.amazonaws.com`), from `proxyEndpoint`.
    pub host: String,
    /// Always `AWS`.
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("host", &self.host)
            .field("user", &self.user)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// `authorizationToken` is the base64 of `user:password`.
pub fn decode_authorization_token(token: &str) -> Result<(String, String), String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .map_err(|_| "the ECR authorization token is not base64".to_owned())?;
    let text = String::from_utf8(bytes)
        .map_err(|_| "the ECR authorization token is not text".to_owned())?;
    match text.split_once(':') {
        Some((user, password)) if !user.is_empty() && !password.is_empty() => {
            Ok((user.to_owned(), password.to_owned()))
        }
        _ => Err("the ECR authorization token is not `user:password`".to_owned()),
    }
}

/// `<account>.dkr.ecr.<region>.amazonaws.com[.cn]` (any port).
pub fn is_ecr_host(host: &str) -> bool {
    let host = host.split(':').next().unwrap_or_default();
    let parts: Vec<&str> = host.split('.').collect();
    matches!(
        parts.as_slice(),
        [account, "dkr", "ecr", _region, "amazonaws", "com"]
            | [account, "dkr", "ecr", _region, "amazonaws", "com", "cn"]
            if !account.is_empty() && account.bytes().all(|b| b.is_ascii_digit())
    )
}

impl AwsProvider {
    /// Push credentials for the account's ECR registry in this region
    /// (`GetAuthorizationToken`), reused for an hour.
    pub async fn registry_credentials(&self) -> Result<RegistryCredentials, ProviderError> {
        let mut cached = self.registry_credentials.lock().await;
        if let Some((c, at)) = cached.as_ref()
            && at.elapsed() < CREDENTIALS_REUSE
        {
            return Ok(c.clone());
        }
        let address = Address::new("ecr:authorization-token");
        let out = self
            .limiter
            .call(
                Service::Ecr,
                "GetAuthorizationToken",
                self.ecr.get_authorization_token().send(),
            )
            .await
            .map_err(|e| e.at(&address))?;
        let invalid = |message: String| ProviderError::Api {
            address: address.clone(),
            message,
        };
        let data = out.authorization_data().first().ok_or_else(|| {
            invalid("GetAuthorizationToken returned no authorization data".into())
        })?;
        let (user, password) =
            decode_authorization_token(data.authorization_token().unwrap_or_default())
                .map_err(invalid)?;
        let host = data
            .proxy_endpoint()
            .unwrap_or_default()
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let c = RegistryCredentials {
            host,
            user,
            password,
        };
        *cached = Some((c.clone(), std::time::Instant::now()));
        Ok(c)
    }
}

/// The lifecycle policy that keeps the last `n` images of each service
/// pushing to the repository (tags `<service>.<digest hex>`, see the
/// Kubernetes provider), then the last `n` of whatever else it holds.
///
/// One rule per service matters: services share the stack's repository, and
/// a single "keep the last n" would expire a quiet service's running image
/// after another service's n pushes. ECR never lets a lower-priority rule
/// expire an image a higher one selected, so the final `any` rule cannot
/// reach the services' images.
pub fn keep_last_policy(n: i64, services: &[String]) -> String {
    let mut rules: Vec<serde_json::Value> = services
        .iter()
        .enumerate()
        .map(|(i, svc)| {
            serde_json::json!({
                "rulePriority": i + 1,
                "description": format!("mesh: keep the last {n} images of {svc}"),
                "selection": {
                    "tagStatus": "tagged",
                    "tagPrefixList": [format!("{svc}.")],
                    "countType": "imageCountMoreThan",
                    "countNumber": n,
                },
                "action": { "type": "expire" }
            })
        })
        .collect();
    rules.push(serde_json::json!({
        "rulePriority": services.len() + 1,
        "description": format!("mesh: keep the last {n} images"),
        "selection": { "tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": n },
        "action": { "type": "expire" }
    }));
    serde_json::json!({ "rules": rules }).to_string()
}

const CUSTOM_POLICY: &str = "custom lifecycle policy";

/// `keep_last` and `keep_last_per` (the services) as observed from a
/// mesh-shaped policy; `Null`s when there is none, and a marker string for
/// any other policy (so it diffs).
fn keep_last_of(policy: Option<&str>) -> (Value, Value) {
    let Some(text) = policy else {
        return (Value::Null, Value::Null);
    };
    let custom = (Value::str(CUSTOM_POLICY), Value::Null);
    let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else {
        return custom;
    };
    let Some(rules) = json["rules"].as_array() else {
        return custom;
    };
    let mut rules: Vec<&serde_json::Value> = rules.iter().collect();
    rules.sort_by_key(|r| r["rulePriority"].as_i64().unwrap_or(i64::MAX));
    let (Some(last), services) = (rules.pop(), rules) else {
        return custom;
    };
    let count = |r: &serde_json::Value| {
        (r["selection"]["countType"] == "imageCountMoreThan" && r["action"]["type"] == "expire")
            .then(|| r["selection"]["countNumber"].as_i64())
            .flatten()
    };
    let Some(n) = count(last).filter(|_| last["selection"]["tagStatus"] == "any") else {
        return custom;
    };
    let mut names = Vec::new();
    for r in services {
        let prefix = match r["selection"]["tagPrefixList"]
            .as_array()
            .map(Vec::as_slice)
        {
            Some([p]) => p.as_str().and_then(|p| p.strip_suffix('.')),
            _ => None,
        };
        match (count(r), prefix) {
            (Some(m), Some(svc)) if m == n && r["selection"]["tagStatus"] == "tagged" => {
                names.push(svc.to_owned());
            }
            _ => return custom,
        }
    }
    names.sort();
    (Value::Int(n), Value::list_of_str(names))
}

/// The services of `attrs["keep_last_per"]`.
fn keep_last_per(attrs: &BTreeMap<String, Value>) -> Vec<String> {
    match attrs.get("keep_last_per") {
        Some(Value::List(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
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
    let (keep_last, keep_last_per) = keep_last_of(policy);
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
        .attr("keep_last", keep_last)
        .attr("keep_last_per", keep_last_per)
        .attr(
            "tags",
            user_tags(tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        )
        .output("name", name)
        .output("arn", r.repository_arn().unwrap_or_default())
        .output("url", r.repository_uri().unwrap_or_default())
}

impl AwsProvider {
    /// The URL of `registry.NAME` of the stack and environment of `scope`,
    /// as applied (found by its ownership tags); `None` when it does not exist.
    pub async fn registry_url(
        &self,
        scope: &Scope,
        registry: &str,
    ) -> Result<Option<String>, ProviderError> {
        let address = Address::of("registry", registry);
        Ok(self
            .observe_registries(scope)
            .await?
            .into_iter()
            .find(|l| l.address == address)
            .and_then(|l| {
                l.outputs
                    .get("url")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .filter(|u| !u.is_empty()))
    }

    pub(super) async fn observe_registries(
        &self,
        scope: &Scope,
    ) -> Result<Vec<Live>, ProviderError> {
        let prefix = names::ecr_prefix(&scope.stack, &scope.env);
        let prefix = prefix.as_str();
        let repos = self
            .limiter
            .pages(
                Service::Ecr,
                "DescribeRepositories",
                |token| {
                    let req = self.ecr.describe_repositories().max_results(1000);
                    req.set_next_token(token).send()
                },
                |page| {
                    let ours = page
                        .repositories()
                        .iter()
                        .filter(|r| r.repository_name().is_some_and(|n| n.starts_with(prefix)));
                    (
                        ours.cloned().collect(),
                        page.next_token().map(str::to_owned),
                    )
                },
            )
            .await
            .map_err(AwsError::observing)?;
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
            self.put_lifecycle(a, &name, n, &keep_last_per(attrs))
                .await?;
        }
        self.read_repository(a, &name).await
    }

    async fn put_lifecycle(
        &self,
        a: &Address,
        name: &str,
        n: i64,
        services: &[String],
    ) -> Result<(), ProviderError> {
        let req = self
            .ecr
            .put_lifecycle_policy()
            .repository_name(name)
            .lifecycle_policy_text(keep_last_policy(n, services));
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
        let want_per = attrs.get("keep_last_per").cloned().unwrap_or(Value::Null);
        if Some(&want) != live.attrs.get("keep_last")
            || (want.as_int().is_some() && Some(&want_per) != live.attrs.get("keep_last_per"))
        {
            match want.as_int() {
                Some(n) => {
                    self.put_lifecycle(a, name, n, &keep_last_per(attrs))
                        .await?
                }
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
        let svcs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            keep_last_of(Some(&keep_last_policy(7, &[]))),
            (Value::Int(7), Value::list_of_str(Vec::<String>::new()))
        );
        assert_eq!(
            keep_last_of(Some(&keep_last_policy(
                5,
                &svcs(&["customer-scoring", "customer-features"])
            ))),
            (
                Value::Int(5),
                Value::list_of_str(svcs(&["customer-features", "customer-scoring"]))
            )
        );
        assert_eq!(keep_last_of(None), (Value::Null, Value::Null));
        let custom = (Value::str(CUSTOM_POLICY), Value::Null);
        assert_eq!(keep_last_of(Some(r#"{"rules":[]}"#)), custom);
        assert_eq!(keep_last_of(Some("nonsense")), custom);
        // A hand-edited count in one service's rule is not mesh's policy.
        let edited = keep_last_policy(5, &svcs(&["a"])).replacen(
            "\"countNumber\":5",
            "\"countNumber\":9",
            1,
        );
        assert_eq!(keep_last_of(Some(&edited)), custom);
    }

    #[test]
    fn service_rules_come_before_the_catch_all() {
        let p: serde_json::Value =
            serde_json::from_str(&keep_last_policy(3, &["a".into(), "b".into()])).unwrap();
        let rules = p["rules"].as_array().unwrap();
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0]["selection"]["tagPrefixList"][0], "a.");
        assert_eq!(rules[1]["selection"]["tagPrefixList"][0], "b.");
        assert_eq!(rules[2]["selection"]["tagStatus"], "any");
        assert_eq!(rules[2]["rulePriority"], 3);
    }

    #[test]
    fn authorization_tokens_decode_and_hosts_are_recognised() {
        use base64::Engine;
        let t = base64::engine::general_purpose::STANDARD.encode("AWS:s3cr:et");
        assert_eq!(
            decode_authorization_token(&t),
            Ok(("AWS".into(), "s3cr:et".into()))
        );
        assert!(decode_authorization_token("!!").is_err());
        let bad = base64::engine::general_purpose::STANDARD.encode("nocolon");
        let e = decode_authorization_token(&bad).unwrap_err();
        assert!(
            !e.contains("nocolon"),
            "the token's text is never echoed: {e}"
        );
        assert!(is_ecr_host("123456789012.dkr.ecr.eu-west-1.amazonaws.com"));
        assert!(is_ecr_host(
            "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn:443"
        ));
        assert!(!is_ecr_host("127.0.0.1:5001"));
        assert!(!is_ecr_host("ghcr.io"));
        assert!(!is_ecr_host("evil.dkr.ecr.us-east-1.amazonaws.com"));
    }
}
