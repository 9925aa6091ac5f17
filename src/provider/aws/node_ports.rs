//! The node security group's ingress rules that open a NodePort exposure to
//! the CIDRs it allows (`expose.X.node_port_rule.K`, see
//! `desired::node_port_rules`). Each rule is an EC2 security group rule
//! carrying the ownership tags (set at creation, `TagSpecifications` of
//! `AuthorizeSecurityGroupIngress`), read with one tag-filtered
//! `DescribeSecurityGroupRules`. Every attribute forces a new rule: a rule
//! changed by hand (another port or CIDR) plans as a replacement, a rule
//! deleted by hand as a create.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::types::{
    IpPermission, IpRange, ResourceType, SecurityGroupRule, TagSpecification,
};

use crate::provider::{ApplyContext, ProviderError};
use crate::resource::{Address, Desired, Live, ProviderId, Scope, Value};

use super::call::{AwsError, ErrorKind, Service, gone_ok, retry_for};
use super::ec2::{address_of, ec2_tags, filter, owned_by, owner_filters};
use super::{AwsProvider, attr_str, kind, ownership_tags};

fn rule_live(r: &SecurityGroupRule, scope: &Scope) -> Option<Live> {
    if r.is_egress() == Some(true) || !owned_by(r.tags(), scope) {
        return None;
    }
    let address = address_of(r.tags())?;
    let id = r.security_group_rule_id()?;
    let (from, to) = (r.from_port().unwrap_or(-1), r.to_port().unwrap_or(-1));
    let port = if from == to {
        Value::Int(i64::from(from))
    } else {
        Value::str(format!("{from}-{to}"))
    };
    let cidr = r
        .cidr_ipv4()
        .or(r.cidr_ipv6())
        .map(Value::str)
        .unwrap_or(Value::Null);
    Some(
        Live::new(address, kind::SECURITY_GROUP_RULE, ProviderId::Aws, id)
            .attr("group_id", r.group_id().unwrap_or_default())
            .attr("protocol", r.ip_protocol().unwrap_or_default())
            .attr("port", port)
            .attr("cidr", cidr)
            .output("id", id),
    )
}

impl AwsProvider {
    /// The scope's NodePort rules: one paginated `DescribeSecurityGroupRules`.
    pub(super) async fn observe_node_port_rules(
        &self,
        scope: &Scope,
    ) -> Result<Vec<Live>, AwsError> {
        let rules = self.list_security_group_rules(owner_filters(scope)).await?;
        Ok(rules.iter().filter_map(|r| rule_live(r, scope)).collect())
    }

    /// Reads one rule back by id (retrying briefly: EC2 reads are eventually consistent).
    pub(super) async fn read_node_port_rule(
        &self,
        a: &Address,
        id: &str,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        retry_for(
            Duration::from_secs(30),
            Duration::from_millis(250),
            |e: &AwsError| e.is("NotYetVisible"),
            |_| async {},
            || async {
                self.list_security_group_rules(vec![filter("security-group-rule-id", id)])
                    .await?
                    .iter()
                    .find_map(|r| rule_live(r, &ctx.scope))
                    .ok_or_else(|| AwsError {
                        kind: ErrorKind::Service,
                        code: Some("NotYetVisible".into()),
                        status: None,
                        message: format!("security group rule {id} is not visible yet"),
                    })
            },
        )
        .await
        .map_err(|e| e.at(a))
    }

    pub(super) async fn create_node_port_rule(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let group = attr_str(attrs, "group_id").unwrap_or_default();
        let cidr = attr_str(attrs, "cidr").unwrap_or_default();
        let Some(port) = attrs
            .get("port")
            .and_then(Value::as_int)
            .and_then(|p| i32::try_from(p).ok())
        else {
            return Err(ProviderError::Invalid {
                address: a.clone(),
                message: "the exposure's node port is not known".to_owned(),
            });
        };
        let rule = IpPermission::builder()
            .ip_protocol(attr_str(attrs, "protocol").unwrap_or_else(|| "tcp".into()))
            .from_port(port)
            .to_port(port)
            .ip_ranges(
                IpRange::builder()
                    .cidr_ip(&cidr)
                    .description(format!("mesh {a}"))
                    .build(),
            )
            .build();
        let req = self
            .ec2
            .authorize_security_group_ingress()
            .group_id(&group)
            .ip_permissions(rule)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::SecurityGroupRule)
                    .set_tags(Some(ec2_tags(ownership_tags(&ctx.scope, a))))
                    .build(),
            );
        let out = self
            .limiter
            .call(Service::Ec2, "AuthorizeSecurityGroupIngress", req.send())
            .await
            .map_err(|e| match e.is("InvalidPermission.Duplicate") {
                true => ProviderError::Api {
                    address: a.clone(),
                    message: format!(
                        "security group {group} already has a rule for port {port} from {cidr} that mesh did not make: remove it, mesh adds its own"
                    ),
                },
                false => e.at(a),
            })?;
        let id = out
            .security_group_rules()
            .first()
            .and_then(|r| r.security_group_rule_id())
            .unwrap_or_default()
            .to_owned();
        self.read_node_port_rule(a, &id, ctx).await
    }

    pub(super) async fn delete_node_port_rule(&self, live: &Live) -> Result<(), ProviderError> {
        let group = attr_str(&live.attrs, "group_id").unwrap_or_default();
        let req = self
            .ec2
            .revoke_security_group_ingress()
            .group_id(group)
            .security_group_rule_ids(&live.id);
        gone_ok(
            self.limiter
                .call(Service::Ec2, "RevokeSecurityGroupIngress", req.send())
                .await,
            &live.address,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::Tag;

    fn scope() -> Scope {
        Scope {
            stack: "s".into(),
            env: "dev".into(),
            root: std::path::PathBuf::new(),
        }
    }

    fn tagged(address: &str) -> Vec<Tag> {
        ec2_tags(ownership_tags(&scope(), &Address::new(address)))
    }

    #[test]
    fn only_owned_ingress_rules_are_read_and_a_port_range_shows_as_drift() {
        let rule = |egress: bool, tags: Vec<Tag>, to: i32| {
            SecurityGroupRule::builder()
                .security_group_rule_id("sgr-1")
                .group_id("sg-1")
                .is_egress(egress)
                .ip_protocol("tcp")
                .from_port(30080)
                .to_port(to)
                .cidr_ipv4("10.0.0.0/16")
                .set_tags(Some(tags))
                .build()
        };
        let a = "expose.x.node_port_rule.10-0-0-0_16";
        let live = rule_live(&rule(false, tagged(a), 30080), &scope()).expect("owned");
        assert_eq!(live.address.as_str(), a);
        assert_eq!(live.attrs["port"], Value::Int(30080));
        assert_eq!(live.attrs["cidr"], Value::str("10.0.0.0/16"));
        let widened = rule_live(&rule(false, tagged(a), 30090), &scope()).expect("owned");
        assert_eq!(widened.attrs["port"], Value::str("30080-30090"));
        assert!(rule_live(&rule(true, tagged(a), 30080), &scope()).is_none());
        assert!(rule_live(&rule(false, Vec::new(), 30080), &scope()).is_none());
    }
}
