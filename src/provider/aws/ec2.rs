//! How mesh finds its EC2 resources, for the network, NAT and node-port
//! code: the ownership tags it sets at creation (`mesh:stack`, `mesh:env`,
//! `mesh:address` and the stack's own), the filters that find them again,
//! reading them back, and the filtered, paginated `Describe*` listings.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{
    Filter, InternetGateway, NatGateway, ResourceType, RouteTable, SecurityGroup,
    SecurityGroupRule, Subnet, Tag, TagSpecification, Vpc,
};

use crate::resource::{Address, Scope, Value};

use super::call::{AwsError, Service};
use super::{AwsProvider, TAG_ADDRESS, TAG_ENV, TAG_STACK, ownership_tags, str_map};

pub(super) fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

pub(super) fn owner_filters(scope: &Scope) -> Vec<Filter> {
    vec![
        filter(&format!("tag:{TAG_STACK}"), &scope.stack),
        filter(&format!("tag:{TAG_ENV}"), &scope.env),
    ]
}

pub(super) fn tag_pairs(tags: &[Tag]) -> impl Iterator<Item = (&str, &str)> {
    tags.iter()
        .filter_map(|t| Some((t.key()?, t.value().unwrap_or(""))))
}

/// The resource carries the scope's stack and environment tags.
pub(super) fn owned_by(tags: &[Tag], scope: &Scope) -> bool {
    let mut stack = false;
    let mut env = false;
    for (k, v) in tag_pairs(tags) {
        stack |= k == TAG_STACK && v == scope.stack;
        env |= k == TAG_ENV && v == scope.env;
    }
    stack && env
}

pub(super) fn address_of(tags: &[Tag]) -> Option<Address> {
    tag_pairs(tags)
        .find(|(k, _)| *k == TAG_ADDRESS)
        .map(|(_, v)| Address::new(v))
}

pub(super) fn ec2_tags(items: impl IntoIterator<Item = (String, String)>) -> Vec<Tag> {
    items
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

pub(super) fn tag_spec(
    rt: ResourceType,
    scope: &Scope,
    address: &Address,
    attrs: &BTreeMap<String, Value>,
) -> TagSpecification {
    let mut tags = str_map(attrs.get("tags"));
    tags.extend(ownership_tags(scope, address));
    TagSpecification::builder()
        .resource_type(rt)
        .set_tags(Some(ec2_tags(tags)))
        .build()
}

/// Defines `AwsProvider::NAME(filters)`: every page of one filtered EC2
/// `Describe*` call, through the rate limiter. A row: `NAME => request
/// builder, its filter setter, "Action", the answer's list: item type;`.
macro_rules! ec2_listings {
    ($($name:ident => $describe:ident, $set_filters:ident, $action:literal, $items:ident: $item:ty;)*) => {
        impl AwsProvider {
            $(
                pub(super) async fn $name(&self, filters: Vec<Filter>) -> Result<Vec<$item>, AwsError> {
                    self.limiter
                        .pages(
                            Service::Ec2,
                            $action,
                            |token| {
                                self.ec2
                                    .$describe()
                                    .$set_filters(Some(filters.clone()))
                                    .set_next_token(token)
                                    .send()
                            },
                            |page| (page.$items().to_vec(), page.next_token().map(str::to_owned)),
                        )
                        .await
                }
            )*
        }
    };
}

ec2_listings! {
    list_vpcs => describe_vpcs, set_filters, "DescribeVpcs", vpcs: Vpc;
    list_subnets => describe_subnets, set_filters, "DescribeSubnets", subnets: Subnet;
    list_igws => describe_internet_gateways, set_filters, "DescribeInternetGateways", internet_gateways: InternetGateway;
    list_route_tables => describe_route_tables, set_filters, "DescribeRouteTables", route_tables: RouteTable;
    list_security_groups => describe_security_groups, set_filters, "DescribeSecurityGroups", security_groups: SecurityGroup;
    list_nat_gateways => describe_nat_gateways, set_filter, "DescribeNatGateways", nat_gateways: NatGateway;
    list_security_group_rules => describe_security_group_rules, set_filters, "DescribeSecurityGroupRules", security_group_rules: SecurityGroupRule;
}
