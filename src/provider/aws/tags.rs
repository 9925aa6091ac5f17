//! Ownership marks on EC2 resources: the tags mesh sets at creation
//! (`mesh:stack`, `mesh:env`, `mesh:address` and the stack's own), the
//! filters that find them again, and reading them back. Shared by the
//! network, NAT and node-port code.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};

use crate::resource::{Address, Scope, Value};

use super::{TAG_ADDRESS, TAG_ENV, TAG_STACK, ownership_tags, str_map};

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
