//! The AWS provider: networks (VPC, subnets, internet gateway, route tables,
//! NAT gateways with their Elastic IPs, security group), EKS clusters with
//! managed node groups, their IAM roles and the VPC CNI add-on with network
//! policy on ([`addon`]), the node security group's rules that open a
//! NodePort to the CIDRs its exposure allows, and ECR repositories.
//!
//! - Desired resources come from the resolved stack ([`desired`], pure).
//! - Live resources are read by their ownership tags (`mesh:stack`,
//!   `mesh:env`, `mesh:address`, set at creation), a few list calls per kind
//!   ([`AwsProvider::observe`]).
//! - The environment's shared lock is an item in the account's DynamoDB
//!   table `mesh-locks` ([`lock`]), taken before planning.
//! - Changes are carried out one at a time, waiting for EKS resources to be
//!   ACTIVE and NAT gateways available (or gone), with progress on stderr; Ctrl-C stops a wait and a
//!   rerun picks the operation up (a cluster still `CREATING` plans as an
//!   update of `status` that only waits).
//!
//! This is the only module that imports `aws-sdk-*`.

mod addon;
mod call;
mod desired;
mod ec2;
mod ecr;
mod eks;
mod iam;
mod kube_access;
pub mod lock;
mod nat;
mod network;
mod node_ports;
mod outputs;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;

use crate::plan::{Action, Change};
use crate::resource::{Address, Desired, Live, ProviderId, Scope, Value};
use crate::stack::Stack;

use super::wait::Every;
use super::{ApplyContext, Provider, ProviderError};

pub use addon::{NETWORK_POLICY_ON, VPC_CNI};
pub use call::{AwsError, RateLimit, RateLimits, Service};
pub use ecr::{RegistryCredentials, decode_authorization_token, is_ecr_host};
pub use kube_access::{KubeAccess, eks_kube_access, eks_token};

/// Resource kinds this provider manages.
pub mod kind {
    pub const VPC: &str = "aws_vpc";
    pub const SUBNET: &str = "aws_subnet";
    pub const INTERNET_GATEWAY: &str = "aws_internet_gateway";
    pub const ROUTE_TABLE: &str = "aws_route_table";
    pub const EIP: &str = "aws_eip";
    pub const NAT_GATEWAY: &str = "aws_nat_gateway";
    pub const SECURITY_GROUP: &str = "aws_security_group";
    pub const SECURITY_GROUP_RULE: &str = "aws_security_group_rule";
    pub const IAM_ROLE: &str = "aws_iam_role";
    pub const EKS_CLUSTER: &str = "aws_eks_cluster";
    pub const EKS_NODE_GROUP: &str = "aws_eks_node_group";
    pub const EKS_ADDON: &str = "aws_eks_addon";
    pub const ECR_REPOSITORY: &str = "aws_ecr_repository";
}

/// Ownership tag keys.
pub const TAG_STACK: &str = "mesh:stack";
pub const TAG_ENV: &str = "mesh:env";
pub const TAG_ADDRESS: &str = "mesh:address";

/// How long and how often to wait for EKS resources and NAT gateways.
#[derive(Clone, Debug, PartialEq)]
pub struct WaitConfig {
    /// EKS clusters take ~10-15 minutes to create in real AWS.
    pub cluster_timeout: Duration,
    /// Node groups, and add-ons (a few minutes).
    pub node_group_timeout: Duration,
    /// NAT gateways take a few minutes to become available or to be deleted.
    pub nat_gateway_timeout: Duration,
    /// First poll interval; grows by half each poll up to `max_interval`.
    pub initial_interval: Duration,
    pub max_interval: Duration,
}

impl WaitConfig {
    /// How often a wait polls.
    pub(crate) fn every(&self) -> Every {
        Every::growing(self.initial_interval, self.max_interval)
    }
}

impl Default for WaitConfig {
    fn default() -> Self {
        WaitConfig {
            cluster_timeout: Duration::from_secs(40 * 60),
            node_group_timeout: Duration::from_secs(30 * 60),
            nat_gateway_timeout: Duration::from_secs(20 * 60),
            initial_interval: Duration::from_secs(5),
            max_interval: Duration::from_secs(30),
        }
    }
}

/// Knobs of the AWS provider; the defaults suit real AWS.
#[derive(Clone, Debug, PartialEq)]
pub struct AwsConfig {
    /// SDK attempts per call for throttling, 5xx and transient network errors.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
    /// Per-attempt timeout of one API call.
    pub attempt_timeout: Duration,
    pub wait: WaitConfig,
    /// How long deletes retry `DependencyViolation` (ENIs and load balancers
    /// released by AWS in the background) and creates retry IAM propagation.
    pub dependency_timeout: Duration,
    /// Base of the backoff of those retries.
    pub dependency_backoff: Duration,
    pub rate_limits: RateLimits,
    /// Prefix of AWS managed policy ARNs (default: `arn:<partition>:iam::aws:policy/`).
    pub managed_policy_prefix: Option<String>,
    /// Endpoint URL override (default: `AWS_ENDPOINT_URL` / the standard chain).
    pub endpoint_url: Option<String>,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(60),
            wait: WaitConfig::default(),
            dependency_timeout: Duration::from_secs(10 * 60),
            dependency_backoff: Duration::from_secs(2),
            rate_limits: RateLimits::default(),
            managed_policy_prefix: None,
            endpoint_url: None,
        }
    }
}

/// The AWS provider. Cheap to share (`Arc`) between parallel applies.
pub struct AwsProvider {
    ec2: aws_sdk_ec2::Client,
    eks: aws_sdk_eks::Client,
    ecr: aws_sdk_ecr::Client,
    iam: aws_sdk_iam::Client,
    elbv2: aws_sdk_elasticloadbalancingv2::Client,
    sts: aws_sdk_sts::Client,
    dynamodb: aws_sdk_dynamodb::Client,
    sdk: aws_config::SdkConfig,
    region: String,
    config: AwsConfig,
    limiter: call::Limiter,
    /// The last ECR push credentials and when they were fetched.
    registry_credentials: tokio::sync::Mutex<Option<(RegistryCredentials, std::time::Instant)>>,
}

impl AwsProvider {
    /// Loads credentials and settings from the standard AWS chain
    /// (environment, profiles, SSO, instance metadata); `AWS_ENDPOINT_URL` is
    /// honoured. `region` overrides the chain's region.
    pub async fn new(region: Option<String>) -> Result<Self, ProviderError> {
        Self::with_config(region, AwsConfig::default()).await
    }

    pub async fn with_config(
        region: Option<String>,
        config: AwsConfig,
    ) -> Result<Self, ProviderError> {
        let retry = RetryConfig::standard()
            .with_max_attempts(config.max_attempts.max(1))
            .with_initial_backoff(config.initial_backoff)
            .with_max_backoff(config.max_backoff);
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(config.connect_timeout)
            .operation_attempt_timeout(config.attempt_timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(retry)
            .timeout_config(timeouts);
        if let Some(r) = region.filter(|r| !r.trim().is_empty()) {
            loader = loader.region(aws_config::Region::new(r));
        }
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk = loader.load().await;
        let Some(region) = sdk.region().map(|r| r.to_string()) else {
            return Err(config_error(
                "no AWS region: set `region` in the environment of the stack, or AWS_REGION, or a region in the AWS profile",
            ));
        };
        if sdk.credentials_provider().is_none() {
            return Err(config_error(
                "no AWS credentials provider: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
            ));
        }
        Ok(AwsProvider {
            ec2: aws_sdk_ec2::Client::new(&sdk),
            eks: aws_sdk_eks::Client::new(&sdk),
            ecr: aws_sdk_ecr::Client::new(&sdk),
            iam: aws_sdk_iam::Client::new(&sdk),
            elbv2: aws_sdk_elasticloadbalancingv2::Client::new(&sdk),
            sts: aws_sdk_sts::Client::new(&sdk),
            dynamodb: aws_sdk_dynamodb::Client::new(&sdk),
            limiter: call::Limiter::new(&config.rate_limits),
            registry_credentials: tokio::sync::Mutex::new(None),
            sdk,
            region,
            config,
        })
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn config(&self) -> &AwsConfig {
        &self.config
    }

    /// API calls made so far, per service (logical calls; SDK retries of one call count once).
    pub fn api_calls(&self) -> Vec<(Service, u64)> {
        self.limiter.counts()
    }

    /// Checks that credentials and endpoint work (STS `GetCallerIdentity`);
    /// returns the caller's ARN.
    pub async fn check_access(&self) -> Result<String, ProviderError> {
        let out = self
            .limiter
            .call(
                Service::Sts,
                "GetCallerIdentity",
                self.sts.get_caller_identity().send(),
            )
            .await
            .map_err(AwsError::observing)?;
        Ok(out.arn().unwrap_or_default().to_owned())
    }

    fn managed_policy(&self, name: &str) -> String {
        match &self.config.managed_policy_prefix {
            Some(p) => format!("{p}{name}"),
            None => format!("arn:{}:iam::aws:policy/{name}", partition(&self.region)),
        }
    }
}

fn config_error(message: &str) -> ProviderError {
    ProviderError::Observe {
        provider: ProviderId::Aws,
        message: message.to_owned(),
    }
}

fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

/// Names of AWS resources, derived from the stack, environment and address
/// so that two stacks or environments never collide.
pub mod names {
    use sha2::{Digest, Sha256};

    /// The EKS cluster name of `cluster.NAME` (1-100 characters).
    pub fn eks_cluster(stack: &str, env: &str, cluster: &str) -> String {
        bounded(&format!("{stack}-{env}-{cluster}"), 100)
    }

    /// The IAM role name for a cluster (`suffix` = `cluster` or `node`); at most 64 characters.
    pub fn iam_role(stack: &str, env: &str, cluster: &str, suffix: &str) -> String {
        bounded(&format!("{stack}-{env}-{cluster}-{suffix}"), 64)
    }

    /// The IAM path of every role of a stack and environment: roles are
    /// listed by this prefix, and the full path ends with the role's address.
    pub fn iam_path_prefix(stack: &str, env: &str) -> String {
        format!("/mesh/{stack}/{env}/")
    }

    pub fn iam_path(stack: &str, env: &str, address: &str) -> String {
        format!("{}{address}/", iam_path_prefix(stack, env))
    }

    pub fn security_group(stack: &str, env: &str, network: &str) -> String {
        bounded(&format!("mesh-{stack}-{env}-{network}-cluster"), 255)
    }

    /// The ECR repository name of `registry.NAME`.
    pub fn ecr_repository(stack: &str, env: &str, registry: &str) -> String {
        format!(
            "{}/{}",
            ecr_prefix(stack, env).trim_end_matches('/'),
            registry.to_lowercase()
        )
    }

    pub fn ecr_prefix(stack: &str, env: &str) -> String {
        format!("{}/{}/", stack.to_lowercase(), env.to_lowercase())
    }

    /// The `Name` tag of network resources.
    pub fn display(stack: &str, env: &str, rest: &str) -> String {
        format!("{stack}-{env}-{rest}")
    }

    /// `s` if short enough, else a prefix and a hash of the whole.
    fn bounded(s: &str, max: usize) -> String {
        if s.len() <= max {
            return s.to_owned();
        }
        let hash = hex::encode(Sha256::digest(s.as_bytes()));
        let keep = max - 9;
        let mut cut = keep;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}-{}", &s[..cut], &hash[..8])
    }
}

/// The ownership tags of a resource.
pub(crate) fn ownership_tags(scope: &Scope, address: &Address) -> Vec<(String, String)> {
    vec![
        (TAG_STACK.to_owned(), scope.stack.clone()),
        (TAG_ENV.to_owned(), scope.env.clone()),
        (TAG_ADDRESS.to_owned(), address.as_str().to_owned()),
    ]
}

/// Tags mesh manages as the `tags` attribute: everything but ownership and
/// AWS-reserved tags.
pub(crate) fn user_tags<'a>(tags: impl IntoIterator<Item = (&'a str, &'a str)>) -> Value {
    Value::Map(
        tags.into_iter()
            .filter(|(k, _)| !k.starts_with("mesh:") && !k.starts_with("aws:"))
            .map(|(k, v)| (k.to_owned(), Value::str(v)))
            .collect(),
    )
}

/// A string-to-string map attribute (`tags`, `labels`).
pub(crate) fn str_map(v: Option<&Value>) -> BTreeMap<String, String> {
    match v {
        Some(Value::Map(m)) => m
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// What to set and what to remove to go from `live` to `desired`.
pub(crate) fn map_delta(
    desired: &BTreeMap<String, String>,
    live: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, Vec<String>) {
    let set = desired
        .iter()
        .filter(|(k, v)| live.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let remove = live
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .cloned()
        .collect();
    (set, remove)
}

/// A resolved attribute as a string.
pub(crate) fn attr_str(attrs: &BTreeMap<String, Value>, name: &str) -> Option<String> {
    attrs.get(name).and_then(Value::as_str).map(str::to_owned)
}

/// A resolved `{name: id}` map attribute.
pub(crate) fn id_map(attrs: &BTreeMap<String, Value>, name: &str) -> BTreeMap<String, String> {
    str_map(attrs.get(name))
}

/// The resolved attributes, failing if a reference is still unknown.
pub(crate) fn resolved(
    ctx: &ApplyContext,
    d: &Desired,
) -> Result<BTreeMap<String, Value>, ProviderError> {
    let attrs = ctx.resolved_attrs(d);
    if let Some((k, _)) = attrs.iter().find(|(_, v)| v.is_unknown()) {
        return Err(ProviderError::Invalid {
            address: d.address.clone(),
            message: format!("`{k}` refers to a resource that does not exist yet"),
        });
    }
    Ok(attrs)
}

#[async_trait]
impl Provider for AwsProvider {
    fn id(&self) -> ProviderId {
        ProviderId::Aws
    }

    fn desired(&self, stack: &Stack) -> Result<Vec<Desired>, ProviderError> {
        desired::desired(stack, &|name| self.managed_policy(name))
    }

    fn outputs(&self, stack: &Stack, live: &[Live]) -> crate::output::Outputs {
        outputs::outputs(stack, live)
    }

    async fn observe(&self, scope: &Scope) -> Result<Vec<Live>, ProviderError> {
        let (net, roles, repos, rules) = futures::join!(
            self.observe_network(scope),
            self.observe_roles(scope),
            self.observe_registries(scope),
            self.observe_node_port_rules(scope),
        );
        let net = net?;
        let subnet_names = network::subnet_names(&net);
        let eks = self.observe_eks(scope, &subnet_names).await?;
        let mut all = net;
        all.extend(roles?);
        all.extend(eks);
        all.extend(repos?);
        all.extend(rules.map_err(AwsError::observing)?);
        Ok(all)
    }

    async fn lock(
        &self,
        scope: &Scope,
        holder: &crate::lock::Holder,
    ) -> Result<Option<Box<dyn super::SharedLock>>, ProviderError> {
        self.take_lock(scope, holder).await.map(Some)
    }

    async fn unlock(&self, scope: &Scope) -> Result<Option<String>, ProviderError> {
        self.break_lock(scope).await
    }

    async fn apply(
        &self,
        change: &Change,
        ctx: &ApplyContext,
    ) -> Result<Option<Live>, ProviderError> {
        if ctx.cancelled() {
            return Err(ProviderError::Interrupted {
                address: change.address.clone(),
            });
        }
        let live = match &change.action {
            Action::NoOp => return Ok(change.live.clone()),
            Action::Create => {
                let d = desired_of(change)?;
                self.create(d, ctx).await?
            }
            Action::Update => {
                let d = desired_of(change)?;
                let l = live_of(change)?;
                self.update(d, l, ctx).await?
            }
            Action::Replace { .. } => {
                let d = desired_of(change)?;
                if let Some(l) = &change.live {
                    ctx.progress(&change.address, "deleting (replacement)");
                    self.delete(l, ctx).await?;
                    ctx.forget(&change.address);
                }
                self.create(d, ctx).await?
            }
            Action::Delete => {
                let l = live_of(change)?;
                self.delete(l, ctx).await?;
                ctx.forget(&change.address);
                return Ok(None);
            }
        };
        ctx.record(&live);
        Ok(Some(live))
    }
}

fn desired_of(change: &Change) -> Result<&Desired, ProviderError> {
    change
        .desired
        .as_ref()
        .ok_or_else(|| ProviderError::Invalid {
            address: change.address.clone(),
            message: "the change carries no desired resource".to_owned(),
        })
}

fn live_of(change: &Change) -> Result<&Live, ProviderError> {
    change.live.as_ref().ok_or_else(|| ProviderError::Invalid {
        address: change.address.clone(),
        message: "the change carries no live resource".to_owned(),
    })
}

impl AwsProvider {
    async fn create(&self, d: &Desired, ctx: &ApplyContext) -> Result<Live, ProviderError> {
        ctx.progress(&d.address, "creating");
        let attrs = resolved(ctx, d)?;
        match d.kind.as_str() {
            kind::VPC => self.create_vpc(d, &attrs, ctx).await,
            kind::SUBNET => self.create_subnet(d, &attrs, ctx).await,
            kind::INTERNET_GATEWAY => self.create_internet_gateway(d, &attrs, ctx).await,
            kind::ROUTE_TABLE => self.create_route_table(d, &attrs, ctx).await,
            kind::EIP => self.create_eip(d, &attrs, ctx).await,
            kind::NAT_GATEWAY => self.create_nat_gateway(d, &attrs, ctx).await,
            kind::SECURITY_GROUP => self.create_security_group(d, &attrs, ctx).await,
            kind::SECURITY_GROUP_RULE => self.create_node_port_rule(d, &attrs, ctx).await,
            kind::IAM_ROLE => self.create_role(d, &attrs, ctx).await,
            kind::EKS_CLUSTER => self.create_cluster(d, &attrs, ctx).await,
            kind::EKS_NODE_GROUP => self.create_node_group(d, &attrs, ctx).await,
            kind::EKS_ADDON => self.create_addon(d, &attrs, ctx).await,
            kind::ECR_REPOSITORY => self.create_repository(d, &attrs, ctx).await,
            other => Err(unknown_kind(&d.address, other)),
        }
    }

    async fn update(
        &self,
        d: &Desired,
        live: &Live,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        ctx.progress(&d.address, "updating");
        let attrs = resolved(ctx, d)?;
        match d.kind.as_str() {
            kind::VPC | kind::INTERNET_GATEWAY | kind::SECURITY_GROUP | kind::EIP => {
                self.update_ec2_tags(d, &attrs, live).await?;
                self.read_ec2(&d.kind, &d.address, &live.id, &attrs).await
            }
            kind::SUBNET => self.update_subnet(d, &attrs, live).await,
            // Every attribute forces a new rule: nothing to change in place.
            kind::SECURITY_GROUP_RULE => self.read_node_port_rule(&d.address, &live.id, ctx).await,
            kind::ROUTE_TABLE => self.update_route_table(d, &attrs, live).await,
            kind::NAT_GATEWAY => self.update_nat_gateway(d, &attrs, live, ctx).await,
            kind::IAM_ROLE => self.update_role(d, &attrs, live).await,
            kind::EKS_CLUSTER => self.update_cluster(d, &attrs, live, ctx).await,
            kind::EKS_NODE_GROUP => self.update_node_group(d, &attrs, live, ctx).await,
            kind::EKS_ADDON => self.update_addon(d, &attrs, live, ctx).await,
            kind::ECR_REPOSITORY => self.update_repository(d, &attrs, live).await,
            other => Err(unknown_kind(&d.address, other)),
        }
    }

    async fn delete(&self, live: &Live, ctx: &ApplyContext) -> Result<(), ProviderError> {
        ctx.progress(&live.address, "deleting");
        match live.kind.as_str() {
            kind::VPC => self.delete_vpc(live, ctx).await,
            kind::SUBNET => self.delete_subnet(live, ctx).await,
            kind::INTERNET_GATEWAY => self.delete_internet_gateway(live, ctx).await,
            kind::ROUTE_TABLE => self.delete_route_table(live).await,
            kind::EIP => self.delete_eip(live, ctx).await,
            kind::NAT_GATEWAY => self.delete_nat_gateway(live, ctx).await,
            kind::SECURITY_GROUP => self.delete_security_group(live, ctx).await,
            kind::SECURITY_GROUP_RULE => self.delete_node_port_rule(live).await,
            kind::IAM_ROLE => self.delete_role(live).await,
            kind::EKS_CLUSTER => self.delete_cluster(live, ctx).await,
            kind::EKS_NODE_GROUP => self.delete_node_group(live, ctx).await,
            kind::EKS_ADDON => self.delete_addon(live, ctx).await,
            kind::ECR_REPOSITORY => self.delete_repository(live).await,
            other => Err(unknown_kind(&live.address, other)),
        }
    }
}

fn unknown_kind(address: &Address, kind: &str) -> ProviderError {
    ProviderError::Invalid {
        address: address.clone(),
        message: format!("the aws provider does not manage `{kind}`"),
    }
}
