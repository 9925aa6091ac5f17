//! Networks: VPC, subnets, internet gateway, route tables (the public one
//! and the private ones through NAT gateways), cluster security group.
//! Observed with one tag-filtered, paginated describe call per kind (NAT
//! gateways and Elastic IPs included, see [`super::nat`]); deleted after
//! removing what Kubernetes left in the VPC.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::types::{
    AttributeBooleanValue, Filter, IpPermission, ResourceType, Tag, UserIdGroupPair,
};

use crate::provider::{ApplyContext, ProviderError};
use crate::resource::{Address, Desired, Live, ProviderId, Scope, Value};

use super::call::{AwsError, Service, gone_ok, retry_for};
use super::ec2::{address_of, ec2_tags, filter, owner_filters, tag_pairs, tag_spec};
use super::nat::{eip_live, live_eips, live_nat_gateways};
use super::{
    AwsProvider, TAG_ADDRESS, TAG_STACK, attr_str, id_map, kind, map_delta, str_map, user_tags,
};

fn dv(e: &AwsError) -> bool {
    e.is("DependencyViolation")
}

/// Subnet id → subnet name, from observed subnets.
pub(super) fn subnet_names(live: &[Live]) -> BTreeMap<String, String> {
    live.iter()
        .filter(|l| l.kind == kind::SUBNET)
        .filter_map(|l| {
            Some((
                l.id.clone(),
                l.address.as_str().rsplit('.').next()?.to_owned(),
            ))
        })
        .collect()
}

/// `{name: id}` of subnet ids, named where the id is known.
pub(super) fn named_ids<'a>(
    ids: impl IntoIterator<Item = &'a str>,
    names: &BTreeMap<String, String>,
) -> Value {
    Value::Map(
        ids.into_iter()
            .map(|id| {
                (
                    names.get(id).cloned().unwrap_or_else(|| id.to_owned()),
                    Value::str(id),
                )
            })
            .collect(),
    )
}

/// Reverses a resolved `{name: id}` attribute into `{id: name}`.
pub(super) fn reverse(m: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (v.clone(), k.clone())).collect()
}

fn vpc_live(v: &aws_sdk_ec2::types::Vpc) -> Option<Live> {
    let address = address_of(v.tags())?;
    let id = v.vpc_id()?;
    Some(
        Live::new(address, kind::VPC, ProviderId::Aws, id)
            .attr("cidr", v.cidr_block().unwrap_or_default())
            .attr("tags", user_tags(tag_pairs(v.tags())))
            .output("id", id)
            .output("cidr", v.cidr_block().unwrap_or_default()),
    )
}

fn subnet_live(s: &aws_sdk_ec2::types::Subnet) -> Option<Live> {
    let address = address_of(s.tags())?;
    let id = s.subnet_id()?;
    Some(
        Live::new(address, kind::SUBNET, ProviderId::Aws, id)
            .attr("vpc_id", s.vpc_id().unwrap_or_default())
            .attr("cidr", s.cidr_block().unwrap_or_default())
            .attr("zone", s.availability_zone().unwrap_or_default())
            .attr(
                "map_public_ip_on_launch",
                s.map_public_ip_on_launch().unwrap_or(false),
            )
            .attr("tags", user_tags(tag_pairs(s.tags())))
            .output("id", id)
            .output("zone", s.availability_zone().unwrap_or_default()),
    )
}

fn igw_live(g: &aws_sdk_ec2::types::InternetGateway) -> Option<Live> {
    let address = address_of(g.tags())?;
    let id = g.internet_gateway_id()?;
    let vpc = g
        .attachments()
        .iter()
        .find_map(|a| a.vpc_id())
        .map(Value::str)
        .unwrap_or(Value::Null);
    Some(
        Live::new(address, kind::INTERNET_GATEWAY, ProviderId::Aws, id)
            .attr("vpc_id", vpc)
            .attr("tags", user_tags(tag_pairs(g.tags())))
            .output("id", id),
    )
}

fn route_table_live(
    t: &aws_sdk_ec2::types::RouteTable,
    names: &BTreeMap<String, String>,
) -> Option<Live> {
    let address = address_of(t.tags())?;
    let id = t.route_table_id()?;
    let default_route = t
        .routes()
        .iter()
        .find(|r| r.destination_cidr_block() == Some("0.0.0.0/0"));
    let gateway = default_route
        .and_then(|r| r.gateway_id())
        .map(Value::str)
        .unwrap_or(Value::Null);
    let nat_gateway = default_route
        .and_then(|r| r.nat_gateway_id())
        .map(Value::str)
        .unwrap_or(Value::Null);
    let subnets = t
        .associations()
        .iter()
        .filter(|a| !a.main().unwrap_or(false))
        .filter_map(|a| a.subnet_id());
    Some(
        Live::new(address, kind::ROUTE_TABLE, ProviderId::Aws, id)
            .attr("vpc_id", t.vpc_id().unwrap_or_default())
            .attr("gateway_id", gateway)
            .attr("nat_gateway_id", nat_gateway)
            .attr("subnets", named_ids(subnets, names))
            .attr("tags", user_tags(tag_pairs(t.tags())))
            .output("id", id),
    )
}

fn security_group_live(g: &aws_sdk_ec2::types::SecurityGroup) -> Option<Live> {
    let address = address_of(g.tags())?;
    let id = g.group_id()?;
    Some(
        Live::new(address, kind::SECURITY_GROUP, ProviderId::Aws, id)
            .attr("vpc_id", g.vpc_id().unwrap_or_default())
            .attr("name", g.group_name().unwrap_or_default())
            .attr("tags", user_tags(tag_pairs(g.tags())))
            .output("id", id),
    )
}

impl AwsProvider {
    /// Every VPC, subnet, internet gateway, route table, security group,
    /// NAT gateway and Elastic IP tagged for the scope: seven describe calls
    /// (paginated, run concurrently).
    pub(super) async fn observe_network(&self, scope: &Scope) -> Result<Vec<Live>, ProviderError> {
        let (vpcs, subnets, igws, tables, groups, nats, eips) = futures::join!(
            self.list_vpcs(owner_filters(scope)),
            self.list_subnets(owner_filters(scope)),
            self.list_igws(owner_filters(scope)),
            self.list_route_tables(owner_filters(scope)),
            self.list_security_groups(owner_filters(scope)),
            self.list_nat_gateways(owner_filters(scope)),
            self.list_addresses(owner_filters(scope)),
        );
        let mut out: Vec<Live> = Vec::new();
        out.extend(
            vpcs.map_err(AwsError::observing)?
                .iter()
                .filter_map(vpc_live),
        );
        out.extend(
            subnets
                .map_err(AwsError::observing)?
                .iter()
                .filter_map(subnet_live),
        );
        let names = subnet_names(&out);
        out.extend(
            igws.map_err(AwsError::observing)?
                .iter()
                .filter_map(igw_live),
        );
        out.extend(
            tables
                .map_err(AwsError::observing)?
                .iter()
                .filter_map(|t| route_table_live(t, &names)),
        );
        out.extend(
            groups
                .map_err(AwsError::observing)?
                .iter()
                .filter_map(security_group_live),
        );
        out.extend(live_eips(&eips.map_err(AwsError::observing)?, scope));
        out.extend(live_nat_gateways(
            &nats.map_err(AwsError::observing)?,
            scope,
        ));
        Ok(out)
    }

    /// Reads one EC2 resource back by id (retrying briefly: EC2 reads are
    /// eventually consistent right after a create).
    pub(super) async fn read_ec2(
        &self,
        kind_name: &str,
        address: &Address,
        id: &str,
        attrs: &BTreeMap<String, Value>,
    ) -> Result<Live, ProviderError> {
        let by_id = |name: &str| vec![filter(name, id)];
        let names = reverse(&id_map(attrs, "subnets"));
        let found = retry_for(
            Duration::from_secs(30),
            Duration::from_millis(250),
            |e: &AwsError| e.is("NotYetVisible"),
            |_| async {},
            || async {
                let live = match kind_name {
                    kind::VPC => self
                        .list_vpcs(by_id("vpc-id"))
                        .await?
                        .iter()
                        .find_map(vpc_live),
                    kind::SUBNET => self
                        .list_subnets(by_id("subnet-id"))
                        .await?
                        .iter()
                        .find_map(subnet_live),
                    kind::INTERNET_GATEWAY => self
                        .list_igws(by_id("internet-gateway-id"))
                        .await?
                        .iter()
                        .find_map(igw_live),
                    kind::ROUTE_TABLE => self
                        .list_route_tables(by_id("route-table-id"))
                        .await?
                        .iter()
                        .find_map(|t| route_table_live(t, &names)),
                    kind::EIP => self
                        .list_addresses(by_id("allocation-id"))
                        .await?
                        .iter()
                        .find_map(eip_live),
                    _ => self
                        .list_security_groups(by_id("group-id"))
                        .await?
                        .iter()
                        .find_map(security_group_live),
                };
                live.ok_or_else(|| AwsError {
                    kind: super::call::ErrorKind::Service,
                    code: Some("NotYetVisible".into()),
                    status: None,
                    message: format!("{id} is not visible yet (or lost its {TAG_ADDRESS} tag)"),
                })
            },
        )
        .await
        .map_err(|e| e.at(address))?;
        Ok(found)
    }

    pub(super) async fn create_vpc(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let cidr = attr_str(attrs, "cidr").unwrap_or_default();
        let req = self
            .ec2
            .create_vpc()
            .cidr_block(cidr)
            .tag_specifications(tag_spec(ResourceType::Vpc, &ctx.scope, a, attrs));
        let out = self
            .limiter
            .call(Service::Ec2, "CreateVpc", req.send())
            .await
            .map_err(|e| e.at(a))?;
        let id = out
            .vpc()
            .and_then(|v| v.vpc_id())
            .unwrap_or_default()
            .to_owned();
        // EKS needs DNS support and hostnames in the VPC.
        let on = || AttributeBooleanValue::builder().value(true).build();
        let req = self
            .ec2
            .modify_vpc_attribute()
            .vpc_id(&id)
            .enable_dns_support(on());
        self.limiter
            .call(Service::Ec2, "ModifyVpcAttribute", req.send())
            .await
            .map_err(|e| e.at(a))?;
        let req = self
            .ec2
            .modify_vpc_attribute()
            .vpc_id(&id)
            .enable_dns_hostnames(on());
        self.limiter
            .call(Service::Ec2, "ModifyVpcAttribute", req.send())
            .await
            .map_err(|e| e.at(a))?;
        self.read_ec2(kind::VPC, a, &id, attrs).await
    }

    pub(super) async fn create_subnet(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let req = self
            .ec2
            .create_subnet()
            .vpc_id(attr_str(attrs, "vpc_id").unwrap_or_default())
            .cidr_block(attr_str(attrs, "cidr").unwrap_or_default())
            .availability_zone(attr_str(attrs, "zone").unwrap_or_default())
            .tag_specifications(tag_spec(ResourceType::Subnet, &ctx.scope, a, attrs));
        let out = self
            .limiter
            .call(Service::Ec2, "CreateSubnet", req.send())
            .await
            .map_err(|e| e.at(a))?;
        let id = out
            .subnet()
            .and_then(|s| s.subnet_id())
            .unwrap_or_default()
            .to_owned();
        if attrs
            .get("map_public_ip_on_launch")
            .and_then(Value::as_bool)
            == Some(true)
        {
            self.set_map_public_ip(a, &id, true).await?;
        }
        self.read_ec2(kind::SUBNET, a, &id, attrs).await
    }

    async fn set_map_public_ip(
        &self,
        a: &Address,
        id: &str,
        on: bool,
    ) -> Result<(), ProviderError> {
        let req = self
            .ec2
            .modify_subnet_attribute()
            .subnet_id(id)
            .map_public_ip_on_launch(AttributeBooleanValue::builder().value(on).build());
        self.limiter
            .call(Service::Ec2, "ModifySubnetAttribute", req.send())
            .await
            .map_err(|e| e.at(a))?;
        Ok(())
    }

    pub(super) async fn create_internet_gateway(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let req = self
            .ec2
            .create_internet_gateway()
            .tag_specifications(tag_spec(
                ResourceType::InternetGateway,
                &ctx.scope,
                a,
                attrs,
            ));
        let out = self
            .limiter
            .call(Service::Ec2, "CreateInternetGateway", req.send())
            .await
            .map_err(|e| e.at(a))?;
        let id = out
            .internet_gateway()
            .and_then(|g| g.internet_gateway_id())
            .unwrap_or_default()
            .to_owned();
        let vpc = attr_str(attrs, "vpc_id").unwrap_or_default();
        let req = self
            .ec2
            .attach_internet_gateway()
            .internet_gateway_id(&id)
            .vpc_id(vpc);
        self.limiter
            .call(Service::Ec2, "AttachInternetGateway", req.send())
            .await
            .map_err(|e| e.at(a))?;
        self.read_ec2(kind::INTERNET_GATEWAY, a, &id, attrs).await
    }

    pub(super) async fn create_route_table(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let req = self
            .ec2
            .create_route_table()
            .vpc_id(attr_str(attrs, "vpc_id").unwrap_or_default())
            .tag_specifications(tag_spec(ResourceType::RouteTable, &ctx.scope, a, attrs));
        let out = self
            .limiter
            .call(Service::Ec2, "CreateRouteTable", req.send())
            .await
            .map_err(|e| e.at(a))?;
        let id = out
            .route_table()
            .and_then(|t| t.route_table_id())
            .unwrap_or_default()
            .to_owned();
        if let Some(target) = RouteTarget::of(attrs) {
            let req = self
                .ec2
                .create_route()
                .route_table_id(&id)
                .destination_cidr_block("0.0.0.0/0");
            self.limiter
                .call(Service::Ec2, "CreateRoute", target.set(req).send())
                .await
                .map_err(|e| e.at(a))?;
        }
        let subnets: Vec<String> = id_map(attrs, "subnets").into_values().collect();
        self.associate_subnets(a, &id, &subnets).await?;
        self.read_ec2(kind::ROUTE_TABLE, a, &id, attrs).await
    }

    /// Associates `subnets` with the route table. A subnet has exactly one
    /// route table: one still associated with another (a subnet that turned
    /// private, a NAT layout that changed) is moved over, not associated twice.
    async fn associate_subnets(
        &self,
        a: &Address,
        table: &str,
        subnets: &[String],
    ) -> Result<(), ProviderError> {
        if subnets.is_empty() {
            return Ok(());
        }
        let by_subnet = Filter::builder()
            .name("association.subnet-id")
            .set_values(Some(subnets.to_vec()))
            .build();
        let current = self
            .list_route_tables(vec![by_subnet])
            .await
            .map_err(|e| e.at(a))?;
        for subnet in subnets {
            let existing = current.iter().find_map(|t| {
                t.associations()
                    .iter()
                    .find(|x| !x.main().unwrap_or(false) && x.subnet_id() == Some(subnet.as_str()))
                    .map(|x| (t.route_table_id(), x.route_table_association_id()))
            });
            match existing {
                Some((Some(t), _)) if t == table => {}
                Some((_, Some(assoc))) => {
                    let req = self
                        .ec2
                        .replace_route_table_association()
                        .association_id(assoc)
                        .route_table_id(table);
                    self.limiter
                        .call(Service::Ec2, "ReplaceRouteTableAssociation", req.send())
                        .await
                        .map_err(|e| e.at(a))?;
                }
                _ => {
                    let req = self
                        .ec2
                        .associate_route_table()
                        .route_table_id(table)
                        .subnet_id(subnet);
                    self.limiter
                        .call(Service::Ec2, "AssociateRouteTable", req.send())
                        .await
                        .map_err(|e| e.at(a))?;
                }
            }
        }
        Ok(())
    }

    pub(super) async fn create_security_group(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let name = attr_str(attrs, "name").unwrap_or_default();
        let req = self
            .ec2
            .create_security_group()
            .group_name(&name)
            .description(format!("mesh {a}: traffic within the cluster"))
            .vpc_id(attr_str(attrs, "vpc_id").unwrap_or_default())
            .tag_specifications(tag_spec(ResourceType::SecurityGroup, &ctx.scope, a, attrs));
        let out = self
            .limiter
            .call(Service::Ec2, "CreateSecurityGroup", req.send())
            .await
            .map_err(|e| e.at(a))?;
        let id = out.group_id().unwrap_or_default().to_owned();
        // Everything inside the group may talk to everything else inside it.
        let rule = IpPermission::builder()
            .ip_protocol("-1")
            .user_id_group_pairs(UserIdGroupPair::builder().group_id(&id).build())
            .build();
        let req = self
            .ec2
            .authorize_security_group_ingress()
            .group_id(&id)
            .ip_permissions(rule);
        match self
            .limiter
            .call(Service::Ec2, "AuthorizeSecurityGroupIngress", req.send())
            .await
        {
            Ok(_) => {}
            Err(e) if e.is("InvalidPermission.Duplicate") => {}
            Err(e) => return Err(e.at(a)),
        }
        self.read_ec2(kind::SECURITY_GROUP, a, &id, attrs).await
    }

    /// Brings the `tags` of an EC2 resource to the desired ones.
    pub(super) async fn update_ec2_tags(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        live: &Live,
    ) -> Result<(), ProviderError> {
        let a = &d.address;
        let (set, remove) = map_delta(
            &str_map(attrs.get("tags")),
            &str_map(live.attrs.get("tags")),
        );
        if !set.is_empty() {
            let req = self
                .ec2
                .create_tags()
                .resources(&live.id)
                .set_tags(Some(ec2_tags(set)));
            self.limiter
                .call(Service::Ec2, "CreateTags", req.send())
                .await
                .map_err(|e| e.at(a))?;
        }
        if !remove.is_empty() {
            let tags = remove
                .into_iter()
                .map(|k| Tag::builder().key(k).build())
                .collect();
            let req = self
                .ec2
                .delete_tags()
                .resources(&live.id)
                .set_tags(Some(tags));
            self.limiter
                .call(Service::Ec2, "DeleteTags", req.send())
                .await
                .map_err(|e| e.at(a))?;
        }
        Ok(())
    }

    pub(super) async fn update_subnet(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        live: &Live,
    ) -> Result<Live, ProviderError> {
        let want = attrs
            .get("map_public_ip_on_launch")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if live
            .attrs
            .get("map_public_ip_on_launch")
            .and_then(Value::as_bool)
            != Some(want)
        {
            self.set_map_public_ip(&d.address, &live.id, want).await?;
        }
        self.update_ec2_tags(d, attrs, live).await?;
        self.read_ec2(kind::SUBNET, &d.address, &live.id, attrs)
            .await
    }

    pub(super) async fn update_route_table(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        live: &Live,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let want_route = RouteTarget::of(attrs);
        let have_route = RouteTarget::of(&live.attrs);
        if want_route != have_route {
            match (want_route, have_route) {
                (Some(target), Some(_)) => {
                    let req = self
                        .ec2
                        .replace_route()
                        .route_table_id(&live.id)
                        .destination_cidr_block("0.0.0.0/0");
                    let req = match &target {
                        RouteTarget::Gateway(id) => req.gateway_id(id),
                        RouteTarget::Nat(id) => req.nat_gateway_id(id),
                    };
                    self.limiter
                        .call(Service::Ec2, "ReplaceRoute", req.send())
                        .await
                        .map_err(|e| e.at(a))?;
                }
                (Some(target), None) => {
                    let req = self
                        .ec2
                        .create_route()
                        .route_table_id(&live.id)
                        .destination_cidr_block("0.0.0.0/0");
                    self.limiter
                        .call(Service::Ec2, "CreateRoute", target.set(req).send())
                        .await
                        .map_err(|e| e.at(a))?;
                }
                (None, _) => {
                    let req = self
                        .ec2
                        .delete_route()
                        .route_table_id(&live.id)
                        .destination_cidr_block("0.0.0.0/0");
                    match self
                        .limiter
                        .call(Service::Ec2, "DeleteRoute", req.send())
                        .await
                    {
                        Ok(_) => {}
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e.at(a)),
                    }
                }
            }
        }
        let want: Vec<String> = id_map(attrs, "subnets").into_values().collect();
        let have: Vec<String> = id_map(&live.attrs, "subnets").into_values().collect();
        if want != have {
            // Associations are found by describing the table (their ids are not live attributes).
            let tables = self
                .list_route_tables(vec![filter("route-table-id", &live.id)])
                .await
                .map_err(|e| e.at(a))?;
            let assocs: Vec<(String, String)> = tables
                .iter()
                .flat_map(|t| t.associations())
                .filter(|x| !x.main().unwrap_or(false))
                .filter_map(|x| {
                    Some((
                        x.subnet_id()?.to_owned(),
                        x.route_table_association_id()?.to_owned(),
                    ))
                })
                .collect();
            for (subnet, assoc) in &assocs {
                if !want.contains(subnet) {
                    let req = self.ec2.disassociate_route_table().association_id(assoc);
                    match self
                        .limiter
                        .call(Service::Ec2, "DisassociateRouteTable", req.send())
                        .await
                    {
                        Ok(_) => {}
                        // Moved to another table meanwhile (by that table's own change).
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e.at(a)),
                    }
                }
            }
            let missing: Vec<String> = want
                .iter()
                .filter(|subnet| !assocs.iter().any(|(s, _)| s == *subnet))
                .cloned()
                .collect();
            self.associate_subnets(a, &live.id, &missing).await?;
        }
        self.update_ec2_tags(d, attrs, live).await?;
        self.read_ec2(kind::ROUTE_TABLE, a, &live.id, attrs).await
    }

    fn dependency_retry(&self) -> (Duration, Duration) {
        (
            self.config.dependency_timeout,
            self.config.dependency_backoff,
        )
    }

    pub(super) async fn delete_vpc(
        &self,
        live: &Live,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        let a = &live.address;
        let id = live.id.as_str();
        self.cleanup_kubernetes_leftovers(a, id, ctx).await?;
        let (budget, base) = self.dependency_retry();
        let res = retry_for(
            budget,
            base,
            dv,
            |attempt| async move {
                ctx.progress(
                    a,
                    "waiting for resources still in the VPC to go (DependencyViolation)",
                );
                if attempt % 3 == 2 {
                    let _ = self.cleanup_kubernetes_leftovers(a, id, ctx).await;
                }
            },
            || async {
                let req = self.ec2.delete_vpc().vpc_id(id);
                self.limiter
                    .call(Service::Ec2, "DeleteVpc", req.send())
                    .await
            },
        )
        .await;
        gone_ok(res, a)
    }

    pub(super) async fn delete_subnet(
        &self,
        live: &Live,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        let a = &live.address;
        let id = live.id.as_str();
        // Disassociate route tables first (not every implementation drops them with the subnet).
        let tables = self
            .list_route_tables(vec![filter("association.subnet-id", id)])
            .await
            .map_err(|e| e.at(a))?;
        for t in &tables {
            for x in t
                .associations()
                .iter()
                .filter(|x| x.subnet_id() == Some(id))
            {
                if let Some(assoc) = x.route_table_association_id() {
                    let req = self.ec2.disassociate_route_table().association_id(assoc);
                    match self
                        .limiter
                        .call(Service::Ec2, "DisassociateRouteTable", req.send())
                        .await
                    {
                        Ok(_) => {}
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e.at(a)),
                    }
                }
            }
        }
        let vpc = attr_str(&live.attrs, "vpc_id").unwrap_or_default();
        let (budget, base) = self.dependency_retry();
        let vpc = vpc.as_str();
        let res = retry_for(
            budget,
            base,
            dv,
            |_| async move {
                ctx.progress(a, "subnet still in use (DependencyViolation): removing what Kubernetes left and NAT gateways in it, retrying");
                let _ = self.cleanup_kubernetes_leftovers(a, vpc, ctx).await;
                let _ = self.delete_nat_gateways_in_subnet(a, id, ctx).await;
            },
            || async {
                let req = self.ec2.delete_subnet().subnet_id(id);
                self.limiter.call(Service::Ec2, "DeleteSubnet", req.send()).await
            },
        )
        .await;
        gone_ok(res, a)
    }

    pub(super) async fn delete_internet_gateway(
        &self,
        live: &Live,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        let a = &live.address;
        let id = live.id.as_str();
        let (budget, base) = self.dependency_retry();
        if let Some(vpc) = attr_str(&live.attrs, "vpc_id") {
            let vpc = vpc.as_str();
            let res = retry_for(
                budget,
                base,
                dv,
                |_| async move {
                    ctx.progress(a, "public addresses still mapped (DependencyViolation): cleaning up, retrying");
                    let _ = self.cleanup_kubernetes_leftovers(a, vpc, ctx).await;
                },
                || async {
                    let req = self.ec2.detach_internet_gateway().internet_gateway_id(id).vpc_id(vpc);
                    self.limiter.call(Service::Ec2, "DetachInternetGateway", req.send()).await
                },
            )
            .await;
            match res {
                Ok(_) => {}
                Err(e) if e.is_not_found() || e.is("Gateway.NotAttached") => {}
                Err(e) => return Err(e.at(a)),
            }
        }
        let req = self.ec2.delete_internet_gateway().internet_gateway_id(id);
        gone_ok(
            self.limiter
                .call(Service::Ec2, "DeleteInternetGateway", req.send())
                .await,
            a,
        )
    }

    pub(super) async fn delete_route_table(&self, live: &Live) -> Result<(), ProviderError> {
        let a = &live.address;
        let tables = self
            .list_route_tables(vec![filter("route-table-id", &live.id)])
            .await
            .map_err(|e| e.at(a))?;
        for x in tables
            .iter()
            .flat_map(|t| t.associations())
            .filter(|x| !x.main().unwrap_or(false))
        {
            if let Some(assoc) = x.route_table_association_id() {
                let req = self.ec2.disassociate_route_table().association_id(assoc);
                match self
                    .limiter
                    .call(Service::Ec2, "DisassociateRouteTable", req.send())
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.at(a)),
                }
            }
        }
        let (budget, base) = self.dependency_retry();
        let res = retry_for(
            budget,
            base,
            dv,
            |_| async {},
            || async {
                let req = self.ec2.delete_route_table().route_table_id(&live.id);
                self.limiter
                    .call(Service::Ec2, "DeleteRouteTable", req.send())
                    .await
            },
        )
        .await;
        gone_ok(res, a)
    }

    pub(super) async fn delete_security_group(
        &self,
        live: &Live,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        let a = &live.address;
        let id = live.id.as_str();
        let vpc = attr_str(&live.attrs, "vpc_id").unwrap_or_default();
        let vpc = vpc.as_str();
        let (budget, base) = self.dependency_retry();
        let res = retry_for(
            budget,
            base,
            dv,
            |_| async move {
                ctx.progress(
                    a,
                    "security group still in use (DependencyViolation): cleaning up, retrying",
                );
                let _ = self.cleanup_kubernetes_leftovers(a, vpc, ctx).await;
                let _ = self.revoke_references_to(vpc, &[id.to_owned()]).await;
            },
            || async {
                let req = self.ec2.delete_security_group().group_id(id);
                self.limiter
                    .call(Service::Ec2, "DeleteSecurityGroup", req.send())
                    .await
            },
        )
        .await;
        gone_ok(res, a)
    }

    /// Removes what Kubernetes created inside the VPC and AWS does not remove
    /// by itself: load balancers tagged for a cluster
    /// (`kubernetes.io/cluster/<name>`, `elbv2.k8s.aws/cluster`), their
    /// security groups, and detached network interfaces. Without this the
    /// VPC delete fails with `DependencyViolation` forever.
    pub(super) async fn cleanup_kubernetes_leftovers(
        &self,
        a: &Address,
        vpc_id: &str,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        if vpc_id.is_empty() {
            return Ok(());
        }
        // Load balancers (ELBv2: application and network).
        let lbs: Vec<String> = self
            .limiter
            .pages(
                Service::Elbv2,
                "DescribeLoadBalancers",
                |marker| {
                    self.elbv2
                        .describe_load_balancers()
                        .set_marker(marker)
                        .send()
                },
                |page| {
                    let arns = page.load_balancers().iter();
                    let arns = arns.filter(|lb| lb.vpc_id() == Some(vpc_id));
                    let arns = arns.filter_map(|lb| lb.load_balancer_arn().map(str::to_owned));
                    (arns.collect(), page.next_marker().map(str::to_owned))
                },
            )
            .await
            .map_err(|e| e.at(a))?;
        let mut doomed_lbs = Vec::new();
        for chunk in lbs.chunks(20) {
            let req = self
                .elbv2
                .describe_tags()
                .set_resource_arns(Some(chunk.to_vec()));
            let out = self
                .limiter
                .call(Service::Elbv2, "DescribeTags", req.send())
                .await
                .map_err(|e| e.at(a))?;
            for d in out.tag_descriptions() {
                let k8s = d
                    .tags()
                    .iter()
                    .filter_map(|t| t.key())
                    .any(is_kubernetes_tag);
                if k8s && let Some(arn) = d.resource_arn() {
                    doomed_lbs.push(arn.to_owned());
                }
            }
        }
        for arn in &doomed_lbs {
            ctx.progress(
                a,
                &format!("deleting load balancer left by Kubernetes: {arn}"),
            );
            let req = self.elbv2.delete_load_balancer().load_balancer_arn(arn);
            match self
                .limiter
                .call(Service::Elbv2, "DeleteLoadBalancer", req.send())
                .await
            {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.at(a)),
            }
        }

        // Security groups Kubernetes created (tagged for a cluster, not owned by mesh).
        let groups = self
            .list_security_groups(vec![filter("vpc-id", vpc_id)])
            .await
            .map_err(|e| e.at(a))?;
        let doomed_groups: Vec<String> = groups
            .iter()
            .filter(|g| g.group_name() != Some("default"))
            .filter(|g| {
                let keys: Vec<&str> = g.tags().iter().filter_map(|t| t.key()).collect();
                keys.iter().any(|k| is_kubernetes_tag(k)) && !keys.contains(&TAG_STACK)
            })
            .filter_map(|g| g.group_id().map(str::to_owned))
            .collect();

        // Detached network interfaces (left by load balancers and the VPC CNI).
        let req = self
            .ec2
            .describe_network_interfaces()
            .filters(filter("vpc-id", vpc_id))
            .filters(filter("status", "available"));
        let enis = self
            .limiter
            .call(Service::Ec2, "DescribeNetworkInterfaces", req.send())
            .await
            .map_err(|e| e.at(a))?;
        for eni in enis.network_interfaces() {
            if let Some(id) = eni.network_interface_id() {
                ctx.progress(a, &format!("deleting detached network interface {id}"));
                let req = self.ec2.delete_network_interface().network_interface_id(id);
                match self
                    .limiter
                    .call(Service::Ec2, "DeleteNetworkInterface", req.send())
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.is_not_found() || e.is("InvalidNetworkInterface.InUse") => {}
                    Err(e) => return Err(e.at(a)),
                }
            }
        }

        if !doomed_groups.is_empty() {
            self.revoke_references_to(vpc_id, &doomed_groups)
                .await
                .map_err(|e| e.at(a))?;
            for id in &doomed_groups {
                ctx.progress(
                    a,
                    &format!("deleting security group left by Kubernetes: {id}"),
                );
                let req = self.ec2.delete_security_group().group_id(id);
                match self
                    .limiter
                    .call(Service::Ec2, "DeleteSecurityGroup", req.send())
                    .await
                {
                    // Still used by an interface that is going away: the caller retries.
                    Ok(_) => {}
                    Err(e) if e.is_not_found() || e.is("DependencyViolation") => {}
                    Err(e) => return Err(e.at(a)),
                }
            }
        }
        Ok(())
    }

    /// Revokes ingress rules of other groups in the VPC that refer to `groups`.
    async fn revoke_references_to(&self, vpc_id: &str, groups: &[String]) -> Result<(), AwsError> {
        let all = self
            .list_security_groups(vec![filter("vpc-id", vpc_id)])
            .await?;
        for g in &all {
            let Some(gid) = g.group_id() else { continue };
            let refs: Vec<IpPermission> = g
                .ip_permissions()
                .iter()
                .filter(|p| {
                    p.user_id_group_pairs()
                        .iter()
                        .any(|u| u.group_id().is_some_and(|x| groups.iter().any(|d| d == x)))
                })
                .cloned()
                .collect();
            if !refs.is_empty() && !groups.iter().any(|d| d == gid) {
                let req = self
                    .ec2
                    .revoke_security_group_ingress()
                    .group_id(gid)
                    .set_ip_permissions(Some(refs));
                self.limiter
                    .call(Service::Ec2, "RevokeSecurityGroupIngress", req.send())
                    .await?;
            }
        }
        Ok(())
    }
}

/// Where a route table sends `0.0.0.0/0`: the internet gateway (public
/// subnets) or a NAT gateway (private subnets).
#[derive(Clone, Debug, PartialEq, Eq)]
enum RouteTarget {
    Gateway(String),
    Nat(String),
}

impl RouteTarget {
    fn of(attrs: &BTreeMap<String, Value>) -> Option<RouteTarget> {
        attr_str(attrs, "gateway_id")
            .map(RouteTarget::Gateway)
            .or_else(|| attr_str(attrs, "nat_gateway_id").map(RouteTarget::Nat))
    }

    fn set(
        &self,
        req: aws_sdk_ec2::operation::create_route::builders::CreateRouteFluentBuilder,
    ) -> aws_sdk_ec2::operation::create_route::builders::CreateRouteFluentBuilder {
        match self {
            RouteTarget::Gateway(id) => req.gateway_id(id),
            RouteTarget::Nat(id) => req.nat_gateway_id(id),
        }
    }
}

fn is_kubernetes_tag(key: &str) -> bool {
    key.starts_with("kubernetes.io/cluster/")
        || key == "elbv2.k8s.aws/cluster"
        || key == "service.k8s.aws/stack"
}
