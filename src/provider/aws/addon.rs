//! EKS add-ons: the VPC CNI (`vpc-cni`) of every EKS cluster mesh creates,
//! with its network-policy agent on (`{"enableNetworkPolicy":"true"}`), so
//! the NetworkPolicies mesh writes from `allow` are enforced on the cluster.
//!
//! An add-on is `cluster.C.addon.NAME`; its configuration values are
//! compared as JSON (key order and spacing do not count), and a change is an
//! in-place `UpdateAddon`. Created and updated with
//! `resolveConflicts = OVERWRITE`: a new cluster already runs a self-managed
//! VPC CNI, which the managed add-on takes over. Waits until ACTIVE, and
//! until gone on delete; a cluster's add-ons are deleted before it.

use std::collections::BTreeMap;

use aws_sdk_eks::types::{Addon, ResolveConflicts};

use crate::provider::{ApplyContext, ProviderError};
use crate::resource::{Address, Desired, Live, ProviderId, Value};

use super::call::{AwsError, Service, gone_ok};
use super::eks::{ActiveWait, owned, sorted_tags, tags_with_owner};
use super::{AwsProvider, attr_str, kind};

/// The add-on that enforces NetworkPolicy on EKS: the Amazon VPC CNI.
pub const VPC_CNI: &str = "vpc-cni";

/// The VPC CNI's configuration values that turn its network-policy agent on.
pub const NETWORK_POLICY_ON: &str = r#"{"enableNetworkPolicy":"true"}"#;

/// Configuration values as compact JSON with sorted keys, so that two
/// spellings of the same configuration compare equal; text that is not JSON
/// is kept as it is.
pub fn normalized_configuration(text: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => v.to_string(),
        Err(_) => text.to_owned(),
    }
}

fn addon_live(address: Address, a: &Addon) -> Live {
    let cluster = a.cluster_name().unwrap_or_default();
    let name = a.addon_name().unwrap_or_default();
    let configuration = a
        .configuration_values()
        .filter(|c| !c.trim().is_empty())
        .map(|c| Value::str(normalized_configuration(c)))
        .unwrap_or(Value::Null);
    Live::new(
        address,
        kind::EKS_ADDON,
        ProviderId::Aws,
        format!("{cluster}/{name}"),
    )
    .attr("cluster", cluster)
    .attr("name", name)
    .attr("configuration", configuration)
    .attr("tags", sorted_tags(a.tags()))
    .attr(
        "status",
        a.status().map(|s| s.as_str()).unwrap_or("UNKNOWN"),
    )
    .output("name", name)
    .output("arn", a.addon_arn().unwrap_or_default())
    .output("version", a.addon_version().unwrap_or_default())
}

fn split_id(id: &str) -> (&str, &str) {
    id.split_once('/').unwrap_or((id, ""))
}

impl AwsProvider {
    /// The add-ons of `cluster` that carry the scope's ownership tags:
    /// `ListAddons` + one `DescribeAddon` each.
    pub(super) async fn observe_addons(
        &self,
        cluster: &str,
        scope: &crate::resource::Scope,
    ) -> Result<Vec<Live>, AwsError> {
        let names: Vec<String> = self
            .limiter
            .pages(
                Service::Eks,
                "ListAddons",
                |token| {
                    let req = self.eks.list_addons().cluster_name(cluster);
                    req.set_next_token(token).send()
                },
                |page| (page.addons().to_vec(), page.next_token().map(str::to_owned)),
            )
            .await?;
        let mut out = Vec::new();
        for name in &names {
            if let Some(a) = self.describe_addon(cluster, name).await?
                && let Some(address) = owned(a.tags(), scope)
            {
                out.push(addon_live(address, &a));
            }
        }
        Ok(out)
    }

    /// The add-on, or `None` if it (or its cluster) does not exist.
    async fn describe_addon(&self, cluster: &str, name: &str) -> Result<Option<Addon>, AwsError> {
        let req = self
            .eks
            .describe_addon()
            .cluster_name(cluster)
            .addon_name(name);
        match self
            .limiter
            .call(Service::Eks, "DescribeAddon", req.send())
            .await
        {
            Ok(out) => Ok(out.addon().cloned()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn wait_addon_active(
        &self,
        a: &Address,
        cluster: &str,
        name: &str,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        self.wait_eks_active(
            ctx,
            a,
            ActiveWait {
                what: "waiting for the add-on to be ACTIVE",
                timeout: self.config.wait.node_group_timeout,
                subject: format!("add-on {name} of EKS cluster {cluster}"),
                failing: &[
                    "CREATE_FAILED",
                    "UPDATE_FAILED",
                    "DELETE_FAILED",
                    "DEGRADED",
                ],
                hint: "",
            },
            || self.describe_addon(cluster, name),
            |addon| addon_live(a.clone(), addon),
        )
        .await
    }

    pub(super) async fn create_addon(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let cluster = attr_str(attrs, "cluster").unwrap_or_default();
        let name = attr_str(attrs, "name").unwrap_or_default();
        let req = self
            .eks
            .create_addon()
            .cluster_name(&cluster)
            .addon_name(&name)
            .set_configuration_values(attr_str(attrs, "configuration"))
            .resolve_conflicts(ResolveConflicts::Overwrite)
            .set_tags(Some(tags_with_owner(attrs, ctx, a)));
        self.limiter
            .call(Service::Eks, "CreateAddon", req.send())
            .await
            .map_err(|e| e.at(a))?;
        self.wait_addon_active(a, &cluster, &name, ctx).await
    }

    pub(super) async fn update_addon(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        live: &Live,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let (cluster, name) = split_id(&live.id);
        if attr_str(&live.attrs, "status").as_deref() == Some("DELETING") {
            ctx.progress(
                a,
                "the add-on is being deleted; waiting, then creating it again",
            );
            self.wait_addon_gone(a, cluster, name, ctx).await?;
            return self.create_addon(d, attrs, ctx).await;
        }
        // Pick up an add-on still creating or updating (e.g. after Ctrl-C).
        let mut current = self.wait_addon_active(a, cluster, name, ctx).await?;
        let want = attr_str(attrs, "configuration").map(|c| normalized_configuration(&c));
        if want != attr_str(&current.attrs, "configuration") {
            // An empty string clears configuration values set before.
            let req = self
                .eks
                .update_addon()
                .cluster_name(cluster)
                .addon_name(name)
                .configuration_values(want.unwrap_or_default())
                .resolve_conflicts(ResolveConflicts::Overwrite);
            self.limiter
                .call(Service::Eks, "UpdateAddon", req.send())
                .await
                .map_err(|e| e.at(a))?;
            current = self.wait_addon_active(a, cluster, name, ctx).await?;
        }
        let arn = attr_str(&current.outputs, "arn").unwrap_or_default();
        if self.update_eks_tags(a, &arn, attrs, &current).await? {
            current = self.wait_addon_active(a, cluster, name, ctx).await?;
        }
        Ok(current)
    }

    pub(super) async fn delete_addon(
        &self,
        live: &Live,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        let a = &live.address;
        let (cluster, name) = split_id(&live.id);
        if attr_str(&live.attrs, "status").as_deref() != Some("DELETING") {
            let req = self
                .eks
                .delete_addon()
                .cluster_name(cluster)
                .addon_name(name);
            gone_ok(
                self.limiter
                    .call(Service::Eks, "DeleteAddon", req.send())
                    .await,
                a,
            )?;
        }
        self.wait_addon_gone(a, cluster, name, ctx).await
    }

    async fn wait_addon_gone(
        &self,
        a: &Address,
        cluster: &str,
        name: &str,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        self.wait_eks_gone(
            ctx,
            a,
            "waiting for the add-on to be deleted",
            self.config.wait.node_group_timeout,
            || self.describe_addon(cluster, name),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_compares_as_json() {
        assert_eq!(
            normalized_configuration("{ \"enableNetworkPolicy\" : \"true\" }"),
            NETWORK_POLICY_ON
        );
        assert_eq!(
            normalized_configuration(r#"{"b":1,"a":{"d":2,"c":3}}"#),
            r#"{"a":{"c":3,"d":2},"b":1}"#
        );
        assert_eq!(normalized_configuration("not json"), "not json");
    }
}
