//! What the AWS tests share: an SDK configuration for moto, and what of a
//! stack is left in the account, found by its ownership tags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The AWS endpoint the tests point mesh at: a fault proxy in front of moto
/// (one per test binary, never stopped) that answers the EKS add-on calls
/// moto does not serve (`aws_fault_proxy::addons`) and forwards the rest.
pub fn endpoint() -> String {
    static PROXY: std::sync::OnceLock<aws_fault_proxy::FaultProxy> = std::sync::OnceLock::new();
    PROXY
        .get_or_init(|| aws_fault_proxy::FaultProxy::start(&aws_fault_proxy::moto_endpoint()))
        .endpoint()
}

/// Points a `mesh` command at the AWS endpoint `endpoint` (moto, or a
/// proxy in front of it) with moto's test credentials.
pub fn point_at(cmd: &mut std::process::Command, endpoint: &str) {
    cmd.env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_PROFILE");
}

/// A copy of `stacks/platform` named `name` in a folder of its own (another machine's checkout).
pub fn platform_named(dir: &Path, name: &str) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let to = dir.join("platform");
    std::fs::create_dir_all(&to).unwrap();
    for f in ["stack.toml", "prod.toml"] {
        let text = std::fs::read_to_string(repo.join("stacks/platform").join(f)).unwrap();
        std::fs::write(
            to.join(f),
            text.replace("name = \"platform\"", &format!("name = \"{name}\"")),
        )
        .unwrap();
    }
    to
}

/// A copy of the customer mesh named `name` under `dir`; returns its folder.
pub fn customer_mesh_named(dir: &Path, name: &str) -> PathBuf {
    let stack = super::copy_customer_mesh(dir);
    let file = stack.join("stack.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace("name = \"customer-mesh\"", &format!("name = \"{name}\"")),
    )
    .unwrap();
    stack
}

pub async fn sdk(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .load()
        .await
}

pub fn ec2_tags(tags: &[aws_sdk_ec2::types::Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
        .collect()
}

pub fn owner_filters(stack: &str) -> Vec<aws_sdk_ec2::types::Filter> {
    env_filters(stack, None)
}

/// Tag filters for `stack`, and for its environment `env` if given.
fn env_filters(stack: &str, env: Option<&str>) -> Vec<aws_sdk_ec2::types::Filter> {
    let tag = |k: &str, v: &str| {
        aws_sdk_ec2::types::Filter::builder()
            .name(format!("tag:{k}"))
            .values(v)
            .build()
    };
    let mut f = vec![tag("mesh:stack", stack)];
    f.extend(env.map(|e| tag("mesh:env", e)));
    f
}

/// Everything tagged for `stack` (any environment) that a tag query finds.
pub async fn leftovers(endpoint: &str, stack: &str) -> Vec<String> {
    leftovers_of(endpoint, stack, None).await
}

/// Everything of `stack` (of its environment `env` if given; a test
/// instance is an environment of its own) that a tag, name or path query
/// finds: VPCs and their parts, NAT gateways, Elastic IPs, EKS clusters,
/// ECR repositories, IAM roles.
pub async fn leftovers_of(endpoint: &str, stack: &str, env: Option<&str>) -> Vec<String> {
    let sdk = sdk(endpoint).await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let mut out = Vec::new();
    let f = env_filters(stack, env);
    let owned = |prefix: String| match env {
        Some(e) => format!("{prefix}{e}"),
        None => prefix
            .trim_end_matches('-')
            .trim_end_matches('/')
            .to_owned(),
    };
    let v = ec2
        .describe_vpcs()
        .set_filters(Some(f.clone()))
        .send()
        .await
        .expect("vpcs");
    out.extend(
        v.vpcs()
            .iter()
            .filter_map(|x| x.vpc_id().map(str::to_owned)),
    );
    let s = ec2
        .describe_subnets()
        .set_filters(Some(f.clone()))
        .send()
        .await
        .expect("subnets");
    out.extend(
        s.subnets()
            .iter()
            .filter_map(|x| x.subnet_id().map(str::to_owned)),
    );
    let g = ec2
        .describe_internet_gateways()
        .set_filters(Some(f.clone()))
        .send()
        .await
        .expect("igws");
    out.extend(
        g.internet_gateways()
            .iter()
            .filter_map(|x| x.internet_gateway_id().map(str::to_owned)),
    );
    let r = ec2
        .describe_route_tables()
        .set_filters(Some(f.clone()))
        .send()
        .await
        .expect("rts");
    out.extend(
        r.route_tables()
            .iter()
            .filter_map(|x| x.route_table_id().map(str::to_owned)),
    );
    let sg = ec2
        .describe_security_groups()
        .set_filters(Some(f.clone()))
        .send()
        .await
        .expect("sgs");
    out.extend(
        sg.security_groups()
            .iter()
            .filter_map(|x| x.group_id().map(str::to_owned)),
    );
    out.extend(
        live_nat_gateways(&ec2, stack)
            .await
            .into_iter()
            .filter(|g| {
                env.is_none_or(|e| {
                    ec2_tags(g.tags()).get("mesh:env").map(String::as_str) == Some(e)
                })
            })
            .filter_map(|g| g.nat_gateway_id().map(str::to_owned)),
    );
    let eips = ec2
        .describe_addresses()
        .set_filters(Some(f))
        .send()
        .await
        .expect("addresses");
    out.extend(
        eips.addresses()
            .iter()
            .filter_map(|x| x.allocation_id().map(str::to_owned)),
    );
    let eks = aws_sdk_eks::Client::new(&sdk);
    let clusters = eks.list_clusters().send().await.expect("clusters");
    out.extend(
        clusters
            .clusters()
            .iter()
            .filter(|c| c.starts_with(&format!("{}-", owned(format!("{stack}-")))))
            .cloned(),
    );
    let ecr = aws_sdk_ecr::Client::new(&sdk);
    let repos = ecr.describe_repositories().send().await.expect("repos");
    out.extend(
        repos
            .repositories()
            .iter()
            .filter_map(|r| r.repository_name())
            .filter(|n| n.starts_with(&format!("{}/", owned(format!("{stack}/")))))
            .map(str::to_owned),
    );
    let iam = aws_sdk_iam::Client::new(&sdk);
    let roles = iam
        .list_roles()
        .path_prefix(format!("/mesh/{}/", owned(format!("{stack}/"))))
        .send()
        .await
        .expect("roles");
    out.extend(roles.roles().iter().map(|r| r.role_name().to_owned()));
    out
}

/// NAT gateways tagged for `stack` that are not deleted. (moto ignores tag
/// filters on `DescribeNatGateways` and keeps deleted ones: both checked here.)
pub async fn live_nat_gateways(
    ec2: &aws_sdk_ec2::Client,
    stack: &str,
) -> Vec<aws_sdk_ec2::types::NatGateway> {
    let out = ec2
        .describe_nat_gateways()
        .set_filter(Some(owner_filters(stack)))
        .send()
        .await
        .expect("nat gateways");
    out.nat_gateways()
        .iter()
        .filter(|g| ec2_tags(g.tags()).get("mesh:stack").map(String::as_str) == Some(stack))
        .filter(|g| g.state() != Some(&aws_sdk_ec2::types::NatGatewayState::Deleted))
        .cloned()
        .collect()
}
