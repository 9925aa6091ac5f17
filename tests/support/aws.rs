//! What the AWS tests share: an SDK configuration for moto, and what of a
//! stack is left in the account, found by its ownership tags.

use std::collections::BTreeMap;

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
    vec![
        aws_sdk_ec2::types::Filter::builder()
            .name("tag:mesh:stack")
            .values(stack)
            .build(),
    ]
}

/// Everything tagged for `stack` (any environment) that a tag query finds.
pub async fn leftovers(endpoint: &str, stack: &str) -> Vec<String> {
    let sdk = sdk(endpoint).await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let mut out = Vec::new();
    let f = owner_filters(stack);
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
            .filter(|c| c.starts_with(&format!("{stack}-")))
            .cloned(),
    );
    let ecr = aws_sdk_ecr::Client::new(&sdk);
    let repos = ecr.describe_repositories().send().await.expect("repos");
    out.extend(
        repos
            .repositories()
            .iter()
            .filter_map(|r| r.repository_name())
            .filter(|n| n.starts_with(&format!("{stack}/")))
            .map(str::to_owned),
    );
    let iam = aws_sdk_iam::Client::new(&sdk);
    let roles = iam
        .list_roles()
        .path_prefix(format!("/mesh/{stack}/"))
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
