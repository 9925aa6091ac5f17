//! NAT gateways and their Elastic IPs: the way out to the internet for a
//! network's private subnets (the private route tables that point at them
//! are route tables like the public one, in [`super::network`]).
//!
//! Both are observed with one tag-filtered describe call per kind. AWS
//! manages the association between a NAT gateway and its address, so the
//! order matters on the way down: a NAT gateway is deleted (and waited for)
//! before its Elastic IP is released, and a release waits for the NAT
//! gateway holding the address to be gone.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::types::{ConnectivityType, DomainType, Filter, NatGatewayState, ResourceType};

use crate::provider::{ApplyContext, ProviderError};
use crate::resource::{Address, Desired, Live, ProviderId, Scope, Value};

use super::call::{AwsError, Service, gone_ok, retry_for};
use super::ec2::{address_of, filter, owned_by, owner_filters, tag_pairs, tag_spec};
use super::{AwsProvider, attr_str, kind, user_tags};
use crate::provider::wait::{Polled, wait_gone, wait_until};

/// A NAT gateway that is, or will soon be, nothing: not live state.
fn is_gone(state: Option<&NatGatewayState>) -> bool {
    matches!(
        state,
        Some(NatGatewayState::Deleted | NatGatewayState::Deleting | NatGatewayState::Failed)
    )
}

/// A NAT gateway that has finished: it holds no address or interface any more.
fn has_ended(state: Option<&NatGatewayState>) -> bool {
    matches!(
        state,
        Some(NatGatewayState::Deleted | NatGatewayState::Failed)
    )
}

fn state_str(g: &aws_sdk_ec2::types::NatGateway) -> &str {
    g.state().map(|s| s.as_str()).unwrap_or("unknown")
}

/// The allocation id of a NAT gateway's (primary) public address.
fn allocation_of(g: &aws_sdk_ec2::types::NatGateway) -> Option<&str> {
    g.nat_gateway_addresses()
        .iter()
        .find_map(|a| a.allocation_id())
}

/// The network interface a NAT gateway's public address is associated with.
fn interface_of(g: &aws_sdk_ec2::types::NatGateway) -> Option<&str> {
    g.nat_gateway_addresses()
        .iter()
        .find_map(|a| a.network_interface_id())
}

pub(super) fn nat_gateway_live(g: &aws_sdk_ec2::types::NatGateway) -> Option<Live> {
    let address = address_of(g.tags())?;
    let id = g.nat_gateway_id()?;
    let public_ip = g
        .nat_gateway_addresses()
        .iter()
        .find_map(|a| a.public_ip())
        .map(Value::str)
        .unwrap_or(Value::Null);
    Some(
        Live::new(address, kind::NAT_GATEWAY, ProviderId::Aws, id)
            .attr("subnet_id", g.subnet_id().unwrap_or_default())
            .attr(
                "allocation_id",
                allocation_of(g).map(Value::str).unwrap_or(Value::Null),
            )
            .attr(
                "connectivity",
                g.connectivity_type()
                    .map(|c| c.as_str())
                    .unwrap_or("public"),
            )
            .attr("tags", user_tags(tag_pairs(g.tags())))
            .attr("state", state_str(g))
            .output("id", id)
            .output("public_ip", public_ip)
            .output(
                "network_interface_id",
                interface_of(g).map(Value::str).unwrap_or(Value::Null),
            ),
    )
}

pub(super) fn eip_live(a: &aws_sdk_ec2::types::Address) -> Option<Live> {
    let address = address_of(a.tags())?;
    let id = a.allocation_id()?;
    Some(
        Live::new(address, kind::EIP, ProviderId::Aws, id)
            .attr("domain", a.domain().map(|d| d.as_str()).unwrap_or("vpc"))
            .attr("tags", user_tags(tag_pairs(a.tags())))
            .output("id", id)
            .output("public_ip", a.public_ip().unwrap_or_default()),
    )
}

/// The NAT gateways of the scope that are live state (not being deleted,
/// deleted or failed). Ownership is checked on the answer too: not every
/// implementation honours tag filters on `DescribeNatGateways`.
pub(super) fn live_nat_gateways(
    gateways: &[aws_sdk_ec2::types::NatGateway],
    scope: &Scope,
) -> Vec<Live> {
    gateways
        .iter()
        .filter(|g| owned_by(g.tags(), scope) && !is_gone(g.state()))
        .filter_map(nat_gateway_live)
        .collect()
}

pub(super) fn live_eips(addresses: &[aws_sdk_ec2::types::Address], scope: &Scope) -> Vec<Live> {
    addresses
        .iter()
        .filter(|a| owned_by(a.tags(), scope))
        .filter_map(eip_live)
        .collect()
}

impl AwsProvider {
    /// `DescribeAddresses` is not paginated: one call answers all.
    pub(super) async fn list_addresses(
        &self,
        filters: Vec<Filter>,
    ) -> Result<Vec<aws_sdk_ec2::types::Address>, AwsError> {
        let req = self.ec2.describe_addresses().set_filters(Some(filters));
        let out = self
            .limiter
            .call(Service::Ec2, "DescribeAddresses", req.send())
            .await?;
        Ok(out.addresses().to_vec())
    }

    /// One NAT gateway by id (`None`: not visible, or never was).
    async fn describe_nat_gateway(
        &self,
        id: &str,
    ) -> Result<Option<aws_sdk_ec2::types::NatGateway>, AwsError> {
        match self
            .list_nat_gateways(vec![filter("nat-gateway-id", id)])
            .await
        {
            Ok(list) => Ok(list.into_iter().find(|g| g.nat_gateway_id() == Some(id))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn create_eip(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let req = self
            .ec2
            .allocate_address()
            .domain(DomainType::Vpc)
            .tag_specifications(tag_spec(ResourceType::ElasticIp, &ctx.scope, a, attrs));
        let out = self
            .limiter
            .call(Service::Ec2, "AllocateAddress", req.send())
            .await
            .map_err(|e| e.at(a))?;
        let id = out.allocation_id().unwrap_or_default().to_owned();
        if let Some(ip) = out.public_ip() {
            ctx.progress(a, &format!("allocated {ip} ({id})"));
        }
        self.read_ec2(kind::EIP, a, &id, attrs).await
    }

    pub(super) async fn create_nat_gateway(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let subnet = attr_str(attrs, "subnet_id").unwrap_or_default();
        let allocation = attr_str(attrs, "allocation_id").unwrap_or_default();
        // The same token on every retry of this create: AWS makes one NAT gateway.
        let token = format!("mesh-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        // Right after they are made, the address and the subnet may not be
        // visible to the NAT gateway service yet; an address still held by a
        // NAT gateway being replaced is let go once that one is deleted.
        let budget = self.config.dependency_timeout.min(Duration::from_secs(120));
        let out = retry_for(
            budget,
            self.config.dependency_backoff,
            |e: &AwsError| {
                e.is("InvalidAllocationID.NotFound")
                    || e.is("InvalidSubnetID.NotFound")
                    || e.is("Resource.AlreadyAssociated")
            },
            |_| async {
                ctx.progress(
                    a,
                    "the Elastic IP or subnet is not usable by a NAT gateway yet, retrying",
                )
            },
            || async {
                let req = self
                    .ec2
                    .create_nat_gateway()
                    .subnet_id(&subnet)
                    .allocation_id(&allocation)
                    .connectivity_type(ConnectivityType::Public)
                    .client_token(&token)
                    .tag_specifications(tag_spec(ResourceType::Natgateway, &ctx.scope, a, attrs));
                self.limiter
                    .call(Service::Ec2, "CreateNatGateway", req.send())
                    .await
            },
        )
        .await
        .map_err(|e| e.at(a))?;
        let id = out
            .nat_gateway()
            .and_then(|g| g.nat_gateway_id())
            .unwrap_or_default()
            .to_owned();
        ctx.progress(
            a,
            &format!("NAT gateway {id} requested; this takes a few minutes in AWS"),
        );
        self.wait_nat_gateway_available(a, &id, ctx).await
    }

    /// A NAT gateway still `pending` (e.g. after Ctrl-C) is waited for; tags are brought in line.
    pub(super) async fn update_nat_gateway(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        live: &Live,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        self.update_ec2_tags(d, attrs, live).await?;
        self.wait_nat_gateway_available(&d.address, &live.id, ctx)
            .await
    }

    async fn wait_nat_gateway_available(
        &self,
        a: &Address,
        id: &str,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let wait = &self.config.wait;
        wait_until(
            ctx,
            a,
            "waiting for the NAT gateway to be available",
            wait.nat_gateway_timeout,
            wait.every(),
            || async {
                let Some(g) = self.describe_nat_gateway(id).await.map_err(|e| e.at(a))? else {
                    // Describe calls are eventually consistent right after a create.
                    return Ok(Polled::Pending("not visible yet".to_owned()));
                };
                match g.state() {
                    Some(NatGatewayState::Available) => nat_gateway_live(&g)
                        .map(Polled::Done)
                        .ok_or_else(|| ProviderError::Api {
                            address: a.clone(),
                            message: format!("NAT gateway {id} lost its ownership tags"),
                        }),
                    Some(NatGatewayState::Failed) => Err(ProviderError::Api {
                        address: a.clone(),
                        message: format!(
                            "NAT gateway {id} failed: {}: {} (AWS removes it; apply again to create a new one)",
                            g.failure_code().unwrap_or("no code"),
                            g.failure_message().unwrap_or("no message")
                        ),
                    }),
                    Some(NatGatewayState::Deleting | NatGatewayState::Deleted) => {
                        Err(ProviderError::Api {
                            address: a.clone(),
                            message: format!(
                                "NAT gateway {id} is {} (deleted outside mesh?): apply again to create a new one",
                                state_str(&g)
                            ),
                        })
                    }
                    _ => Ok(Polled::Pending(state_str(&g).to_owned())),
                }
            },
        )
        .await
    }

    async fn wait_nat_gateway_deleted(
        &self,
        a: &Address,
        id: &str,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        let wait = &self.config.wait;
        wait_gone(
            ctx,
            a,
            "waiting for the NAT gateway to be deleted",
            wait.nat_gateway_timeout,
            wait.every(),
            || async {
                let g = self.describe_nat_gateway(id).await.map_err(|e| e.at(a))?;
                Ok(g.filter(|g| !has_ended(g.state()))
                    .map(|g| state_str(&g).to_owned()))
            },
        )
        .await
    }

    /// Deletes the NAT gateway and waits until it is `deleted`: only then
    /// are its address and its network interface in the subnet let go.
    pub(super) async fn delete_nat_gateway(
        &self,
        live: &Live,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        let allocation = attr_str(&live.attrs, "allocation_id");
        let interface = live
            .outputs
            .get("network_interface_id")
            .and_then(Value::as_str);
        let held = allocation.as_deref().zip(interface);
        self.delete_nat_gateway_by_id(&live.address, &live.id, held, ctx)
            .await
    }

    /// `held`: the allocation id of its address and the network interface it is associated with.
    async fn delete_nat_gateway_by_id(
        &self,
        a: &Address,
        id: &str,
        held: Option<(&str, &str)>,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        let req = self.ec2.delete_nat_gateway().nat_gateway_id(id);
        let res = self
            .limiter
            .call(Service::Ec2, "DeleteNatGateway", req.send())
            .await;
        match res {
            Ok(_) => {}
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e.at(a)),
        }
        self.wait_nat_gateway_deleted(a, id, ctx).await?;
        if let Some((allocation, interface)) = held {
            self.let_go_of_address(allocation, interface).await;
        }
        Ok(())
    }

    /// A deleted NAT gateway no longer holds its address, so a new one (the
    /// replacement in another subnet) can take it. AWS drops the association
    /// with the NAT gateway and this finds nothing to do; an implementation
    /// that keeps it (moto) is made to let go. Only an association with the
    /// deleted NAT gateway's own interface is touched. Best effort: a create
    /// that still finds the address taken retries.
    async fn let_go_of_address(&self, allocation: &str, interface: &str) {
        let Ok(addresses) = self
            .list_addresses(vec![filter("allocation-id", allocation)])
            .await
        else {
            return;
        };
        for assoc in addresses
            .iter()
            .filter(|x| x.network_interface_id() == Some(interface))
            .filter_map(|x| x.association_id())
        {
            let req = self.ec2.disassociate_address().association_id(assoc);
            let _ = self
                .limiter
                .call(Service::Ec2, "DisassociateAddress", req.send())
                .await;
        }
    }

    /// Deletes the scope's NAT gateways in a subnet that is being deleted:
    /// their network interfaces keep the subnet from going
    /// (`DependencyViolation`), and they go with it anyway (a NAT gateway
    /// refers to its subnet, so the plan replaces or deletes it too; its
    /// own change then finds it gone).
    pub(super) async fn delete_nat_gateways_in_subnet(
        &self,
        a: &Address,
        subnet: &str,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        let mut filters = owner_filters(&ctx.scope);
        filters.push(filter("subnet-id", subnet));
        let gateways = self.list_nat_gateways(filters).await.map_err(|e| e.at(a))?;
        for g in gateways.iter().filter(|g| {
            owned_by(g.tags(), &ctx.scope) && g.subnet_id() == Some(subnet) && !has_ended(g.state())
        }) {
            let Some(id) = g.nat_gateway_id() else {
                continue;
            };
            let owner = address_of(g.tags())
                .map(|x| x.to_string())
                .unwrap_or_else(|| "a NAT gateway of the stack".to_owned());
            ctx.progress(
                a,
                &format!("deleting NAT gateway {id} ({owner}) first: it lives in this subnet"),
            );
            let held = allocation_of(g).zip(interface_of(g));
            self.delete_nat_gateway_by_id(a, id, held, ctx).await?;
        }
        Ok(())
    }

    /// Releases the Elastic IP once no NAT gateway of the scope holds it any
    /// more (a destroy deletes the NAT gateway at the same time).
    pub(super) async fn delete_eip(
        &self,
        live: &Live,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        let a = &live.address;
        let id = live.id.as_str();
        let wait = &self.config.wait;
        let scope = &ctx.scope;
        wait_gone(
            ctx,
            a,
            "waiting for the NAT gateway holding the address to be deleted",
            wait.nat_gateway_timeout,
            wait.every(),
            || async {
                let holders = self
                    .list_nat_gateways(owner_filters(scope))
                    .await
                    .map_err(|e| e.at(a))?;
                let holder = holders.iter().find(|g| {
                    owned_by(g.tags(), scope)
                        && allocation_of(g) == Some(id)
                        && !has_ended(g.state())
                });
                Ok(holder.map(|g| {
                    format!(
                        "{} is {}",
                        g.nat_gateway_id().unwrap_or("a NAT gateway"),
                        state_str(g)
                    )
                }))
            },
        )
        .await?;
        // AWS lets go of the association a moment after the NAT gateway is deleted.
        let (budget, base) = (
            self.config.dependency_timeout,
            self.config.dependency_backoff,
        );
        let res = retry_for(
            budget,
            base,
            |e: &AwsError| e.is("InvalidIPAddress.InUse"),
            |_| async { ctx.progress(a, "the address is still in use, retrying") },
            || async {
                let req = self.ec2.release_address().allocation_id(id);
                self.limiter
                    .call(Service::Ec2, "ReleaseAddress", req.send())
                    .await
            },
        )
        .await;
        gone_ok(res, a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::{NatGateway, NatGatewayAddress, Tag};

    fn tag(k: &str, v: &str) -> Tag {
        Tag::builder().key(k).value(v).build()
    }

    fn gateway(id: &str, stack: &str, state: NatGatewayState) -> NatGateway {
        NatGateway::builder()
            .nat_gateway_id(id)
            .subnet_id("subnet-1")
            .state(state)
            .connectivity_type(ConnectivityType::Public)
            .nat_gateway_addresses(
                NatGatewayAddress::builder()
                    .allocation_id("eipalloc-1")
                    .public_ip("203.0.113.7")
                    .network_interface_id("eni-1")
                    .build(),
            )
            .tags(tag("mesh:stack", stack))
            .tags(tag("mesh:env", "dev"))
            .tags(tag("mesh:address", "network.main.nat_gateway.us-east-1a"))
            .tags(tag("Name", "s-dev-main-nat-us-east-1a"))
            .build()
    }

    fn scope() -> Scope {
        Scope {
            stack: "s".into(),
            env: "dev".into(),
            root: ".".into(),
        }
    }

    #[test]
    fn only_owned_nat_gateways_that_are_not_going_away_are_live() {
        let list = [
            gateway("nat-a", "s", NatGatewayState::Available),
            gateway("nat-b", "s", NatGatewayState::Pending),
            gateway("nat-c", "s", NatGatewayState::Deleting),
            gateway("nat-d", "s", NatGatewayState::Deleted),
            gateway("nat-e", "s", NatGatewayState::Failed),
            gateway("nat-f", "other", NatGatewayState::Available),
        ];
        let live = live_nat_gateways(&list, &scope());
        let ids: Vec<&str> = live.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids, ["nat-a", "nat-b"]);
        let a = &live[0];
        assert_eq!(a.address.as_str(), "network.main.nat_gateway.us-east-1a");
        assert_eq!(a.attrs["allocation_id"], Value::str("eipalloc-1"));
        assert_eq!(a.attrs["subnet_id"], Value::str("subnet-1"));
        assert_eq!(a.attrs["connectivity"], Value::str("public"));
        assert_eq!(a.attrs["state"], Value::str("available"));
        assert_eq!(live[1].attrs["state"], Value::str("pending"));
        assert_eq!(a.outputs["public_ip"], Value::str("203.0.113.7"));
        assert_eq!(a.outputs["network_interface_id"], Value::str("eni-1"));
        // Ownership tags are not user tags.
        let Value::Map(tags) = &a.attrs["tags"] else {
            panic!("tags")
        };
        assert_eq!(tags.keys().collect::<Vec<_>>(), ["Name"]);
    }
}
