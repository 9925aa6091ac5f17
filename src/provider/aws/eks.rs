//! EKS clusters and managed node groups, with waiters.
//!
//! A cluster or node group that is still `CREATING`/`UPDATING` when
//! observed reports `status` ≠ `ACTIVE`, so the plan shows an update that
//! only waits: a run interrupted by Ctrl-C is picked up by the next one
//! instead of creating again.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use aws_sdk_eks::types::{NodegroupScalingConfig, UpdateLabelsPayload, VpcConfigRequest};

use crate::provider::{ApplyContext, ProviderError};
use crate::resource::{Address, Desired, Live, ProviderId, Scope, Value};

use super::call::{AwsError, Service, retry_for};
use super::network::{named_ids, reverse};
use super::{
    AwsProvider, TAG_ADDRESS, TAG_ENV, TAG_STACK, attr_str, id_map, kind, map_delta,
    ownership_tags, str_map, user_tags,
};
use crate::provider::wait::{Polled, wait_gone, wait_until};

pub(super) fn owned(tags: Option<&HashMap<String, String>>, scope: &Scope) -> Option<Address> {
    let t = tags?;
    if t.get(TAG_STACK)? != &scope.stack || t.get(TAG_ENV)? != &scope.env {
        return None;
    }
    t.get(TAG_ADDRESS).map(Address::new)
}

pub(super) fn sorted_tags(tags: Option<&HashMap<String, String>>) -> Value {
    user_tags(
        tags.into_iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    )
}

fn cluster_live(
    address: Address,
    c: &aws_sdk_eks::types::Cluster,
    names: &BTreeMap<String, String>,
) -> Live {
    let name = c.name().unwrap_or_default();
    let vpc = c.resources_vpc_config();
    let subnets = vpc.map(|v| v.subnet_ids()).unwrap_or_default();
    let groups = vpc.map(|v| v.security_group_ids()).unwrap_or_default();
    Live::new(address, kind::EKS_CLUSTER, ProviderId::Aws, name)
        .attr("name", name)
        .attr("version", c.version().unwrap_or_default())
        .attr("role_arn", c.role_arn().unwrap_or_default())
        .attr(
            "subnets",
            named_ids(subnets.iter().map(String::as_str), names),
        )
        .attr(
            "security_groups",
            Value::list_of_str(groups.iter().cloned()),
        )
        .attr(
            "endpoint_public",
            vpc.is_some_and(|v| v.endpoint_public_access()),
        )
        .attr(
            "endpoint_private",
            vpc.is_some_and(|v| v.endpoint_private_access()),
        )
        .attr("tags", sorted_tags(c.tags()))
        .attr(
            "status",
            c.status().map(|s| s.as_str()).unwrap_or("UNKNOWN"),
        )
        .output("name", name)
        .output("arn", c.arn().unwrap_or_default())
        .output("endpoint", c.endpoint().unwrap_or_default())
        .output(
            "ca",
            c.certificate_authority()
                .and_then(|x| x.data())
                .unwrap_or_default(),
        )
        .output("version", c.version().unwrap_or_default())
        .output("node_security_group", node_security_group(c))
}

/// The security group of the cluster's managed nodes: the cluster security
/// group EKS creates (managed node groups without a launch template get it).
/// An EKS API that reports none (moto creates none) gets the first group
/// mesh gave the cluster, which the control plane carries.
fn node_security_group(c: &aws_sdk_eks::types::Cluster) -> String {
    let vpc = c.resources_vpc_config();
    vpc.and_then(|v| v.cluster_security_group_id())
        .filter(|id| !id.is_empty())
        .or_else(|| vpc.and_then(|v| v.security_group_ids().first().map(String::as_str)))
        .unwrap_or_default()
        .to_owned()
}

fn node_group_live(
    address: Address,
    g: &aws_sdk_eks::types::Nodegroup,
    names: &BTreeMap<String, String>,
) -> Live {
    let cluster = g.cluster_name().unwrap_or_default();
    let name = g.nodegroup_name().unwrap_or_default();
    let scaling = g.scaling_config();
    let labels = Value::Map(
        g.labels()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), Value::str(v.clone())))
            .collect(),
    );
    Live::new(
        address,
        kind::EKS_NODE_GROUP,
        ProviderId::Aws,
        format!("{cluster}/{name}"),
    )
    .attr("cluster", cluster)
    .attr("name", name)
    .attr("role_arn", g.node_role().unwrap_or_default())
    .attr(
        "subnets",
        named_ids(g.subnets().iter().map(String::as_str), names),
    )
    .attr(
        "instance_types",
        Value::list_of_str(g.instance_types().iter().cloned()),
    )
    .attr(
        "disk_size",
        g.disk_size()
            .map(i64::from)
            .map(Value::Int)
            .unwrap_or(Value::Null),
    )
    .attr(
        "min",
        Value::Int(
            scaling
                .and_then(|s| s.min_size())
                .map(i64::from)
                .unwrap_or(0),
        ),
    )
    .attr(
        "max",
        Value::Int(
            scaling
                .and_then(|s| s.max_size())
                .map(i64::from)
                .unwrap_or(0),
        ),
    )
    .attr(
        "desired",
        Value::Int(
            scaling
                .and_then(|s| s.desired_size())
                .map(i64::from)
                .unwrap_or(0),
        ),
    )
    .attr("labels", labels)
    .attr("tags", sorted_tags(g.tags()))
    .attr(
        "status",
        g.status().map(|s| s.as_str()).unwrap_or("UNKNOWN"),
    )
    .output("name", name)
    .output("arn", g.nodegroup_arn().unwrap_or_default())
}

fn int(attrs: &BTreeMap<String, Value>, name: &str) -> Option<i32> {
    attrs
        .get(name)
        .and_then(Value::as_int)
        .and_then(|i| i32::try_from(i).ok())
}

fn strings(attrs: &BTreeMap<String, Value>, name: &str) -> Vec<String> {
    match attrs.get(name) {
        Some(Value::List(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn hash(m: BTreeMap<String, String>) -> HashMap<String, String> {
    m.into_iter().collect()
}

pub(super) fn tags_with_owner(
    attrs: &BTreeMap<String, Value>,
    ctx: &ApplyContext,
    a: &Address,
) -> HashMap<String, String> {
    let mut t = str_map(attrs.get("tags"));
    t.extend(ownership_tags(&ctx.scope, a));
    hash(t)
}

/// `(cluster, node group)` of a node group's live id.
fn split_id(id: &str) -> (&str, &str) {
    id.split_once('/').unwrap_or((id, ""))
}

impl AwsProvider {
    /// Clusters whose name starts with the stack's prefix, confirmed by their
    /// tags, their node groups and add-ons: `ListClusters` + one
    /// `DescribeCluster` per candidate, `ListNodegroups` + `DescribeNodegroup`
    /// per node group, `ListAddons` + `DescribeAddon` per add-on.
    pub(super) async fn observe_eks(
        &self,
        scope: &Scope,
        subnet_names: &BTreeMap<String, String>,
    ) -> Result<Vec<Live>, ProviderError> {
        let prefix = format!("{}-{}-", scope.stack, scope.env);
        let prefix = prefix.as_str();
        let names: Vec<String> = self
            .limiter
            .pages(
                Service::Eks,
                "ListClusters",
                |token| self.eks.list_clusters().set_next_token(token).send(),
                |page| {
                    let ours = page.clusters().iter().filter(|n| n.starts_with(prefix));
                    (
                        ours.cloned().collect(),
                        page.next_token().map(str::to_owned),
                    )
                },
            )
            .await
            .map_err(AwsError::observing)?;
        let mut out = Vec::new();
        for name in &names {
            let cluster = match self.describe_cluster(name).await {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => return Err(e.observing()),
            };
            let Some(address) = owned(cluster.tags(), scope) else {
                continue;
            };
            out.push(cluster_live(address, &cluster, subnet_names));
            let groups = match self.list_node_groups(name).await {
                Ok(g) => g,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.observing()),
            };
            for g in &groups {
                match self.describe_node_group(name, g).await {
                    Ok(Some(ng)) => {
                        if let Some(address) = owned(ng.tags(), scope) {
                            out.push(node_group_live(address, &ng, subnet_names));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => return Err(e.observing()),
                }
            }
            match self.observe_addons(name, scope).await {
                Ok(addons) => out.extend(addons),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.observing()),
            }
        }
        Ok(out)
    }

    /// The cluster, or `None` if it does not exist.
    pub(super) async fn describe_cluster(
        &self,
        name: &str,
    ) -> Result<Option<aws_sdk_eks::types::Cluster>, AwsError> {
        let req = self.eks.describe_cluster().name(name);
        match self
            .limiter
            .call(Service::Eks, "DescribeCluster", req.send())
            .await
        {
            Ok(out) => Ok(out.cluster().cloned()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list_node_groups(&self, cluster: &str) -> Result<Vec<String>, AwsError> {
        self.limiter
            .pages(
                Service::Eks,
                "ListNodegroups",
                |token| {
                    let req = self.eks.list_nodegroups().cluster_name(cluster);
                    req.set_next_token(token).send()
                },
                |page| {
                    (
                        page.nodegroups().to_vec(),
                        page.next_token().map(str::to_owned),
                    )
                },
            )
            .await
    }

    async fn describe_node_group(
        &self,
        cluster: &str,
        name: &str,
    ) -> Result<Option<aws_sdk_eks::types::Nodegroup>, AwsError> {
        let req = self
            .eks
            .describe_nodegroup()
            .cluster_name(cluster)
            .nodegroup_name(name);
        match self
            .limiter
            .call(Service::Eks, "DescribeNodegroup", req.send())
            .await
        {
            Ok(out) => Ok(out.nodegroup().cloned()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits until the cluster is ACTIVE and returns it read back.
    async fn wait_cluster_active(
        &self,
        a: &Address,
        name: &str,
        names: &BTreeMap<String, String>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        self.wait_eks_active(
            ctx,
            a,
            ActiveWait {
                what: "waiting for the EKS cluster to be ACTIVE",
                timeout: self.config.wait.cluster_timeout,
                subject: format!("EKS cluster {name}"),
                failing: &["FAILED"],
                hint: ": delete it or plan with --replace",
            },
            || self.describe_cluster(name),
            |c| cluster_live(a.clone(), c, names),
        )
        .await
    }

    async fn wait_cluster_gone(
        &self,
        a: &Address,
        name: &str,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        self.wait_eks_gone(
            ctx,
            a,
            "waiting for the EKS cluster to be deleted",
            self.config.wait.cluster_timeout,
            || self.describe_cluster(name),
        )
        .await
    }

    async fn wait_node_group_active(
        &self,
        a: &Address,
        cluster: &str,
        name: &str,
        names: &BTreeMap<String, String>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        self.wait_eks_active(
            ctx,
            a,
            ActiveWait {
                what: "waiting for the node group to be ACTIVE",
                timeout: self.config.wait.node_group_timeout,
                subject: format!("node group {cluster}/{name}"),
                failing: &["CREATE_FAILED", "DEGRADED", "DELETE_FAILED"],
                hint: "",
            },
            || self.describe_node_group(cluster, name),
            |g| node_group_live(a.clone(), g, names),
        )
        .await
    }

    async fn wait_node_group_gone(
        &self,
        a: &Address,
        cluster: &str,
        name: &str,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        self.wait_eks_gone(
            ctx,
            a,
            "waiting for the node group to be deleted",
            self.config.wait.node_group_timeout,
            || self.describe_node_group(cluster, name),
        )
        .await
    }

    pub(super) async fn create_cluster(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let name = attr_str(attrs, "name").unwrap_or_default();
        let subnets = id_map(attrs, "subnets");
        let names = reverse(&subnets);
        let vpc = VpcConfigRequest::builder()
            .set_subnet_ids(Some(subnets.values().cloned().collect()))
            .set_security_group_ids(Some(strings(attrs, "security_groups")))
            .endpoint_public_access(
                attrs
                    .get("endpoint_public")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            )
            .endpoint_private_access(
                attrs
                    .get("endpoint_private")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            )
            .build();
        let tags = tags_with_owner(attrs, ctx, a);
        // A role created a moment ago may not be assumable by EKS yet (IAM is eventually consistent).
        let budget = self.config.dependency_timeout.min(Duration::from_secs(120));
        retry_for(
            budget,
            self.config.dependency_backoff,
            |e: &AwsError| {
                e.is("InvalidParameterException") && e.message.to_lowercase().contains("role")
            },
            |_| async { ctx.progress(a, "the IAM role is not usable by EKS yet, retrying") },
            || async {
                let req = self
                    .eks
                    .create_cluster()
                    .name(&name)
                    .version(attr_str(attrs, "version").unwrap_or_default())
                    .role_arn(attr_str(attrs, "role_arn").unwrap_or_default())
                    .resources_vpc_config(vpc.clone())
                    .set_tags(Some(tags.clone()));
                self.limiter
                    .call(Service::Eks, "CreateCluster", req.send())
                    .await
            },
        )
        .await
        .map_err(|e| e.at(a))?;
        ctx.progress(
            a,
            &format!("EKS cluster {name} requested; this takes ~10-15 minutes in AWS"),
        );
        self.wait_cluster_active(a, &name, &names, ctx).await
    }

    pub(super) async fn update_cluster(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        live: &Live,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let name = live.id.as_str();
        let names = reverse(&id_map(attrs, "subnets"));
        match attr_str(&live.attrs, "status").as_deref() {
            Some("DELETING") => {
                ctx.progress(
                    a,
                    "the cluster is being deleted; waiting, then creating it again",
                );
                self.wait_cluster_gone(a, name, ctx).await?;
                return self.create_cluster(d, attrs, ctx).await;
            }
            Some("FAILED") => {
                return Err(ProviderError::Api {
                    address: a.clone(),
                    message: format!(
                        "EKS cluster {name} is FAILED: delete it or plan with --replace"
                    ),
                });
            }
            _ => {}
        }
        // Pick up a cluster still creating or updating (e.g. after Ctrl-C).
        let mut current = self.wait_cluster_active(a, name, &names, ctx).await?;

        let want_version = attr_str(attrs, "version");
        if want_version.is_some() && want_version != attr_str(&current.attrs, "version") {
            let version = want_version.unwrap_or_default();
            let from = attr_str(&current.attrs, "version").unwrap_or_default();
            ctx.progress(a, &format!("upgrading Kubernetes {from} → {version}"));
            let req = self
                .eks
                .update_cluster_version()
                .name(name)
                .version(&version);
            self.limiter
                .call(Service::Eks, "UpdateClusterVersion", req.send())
                .await
                .map_err(|e| ProviderError::Api {
                    address: a.clone(),
                    message: format!("upgrading Kubernetes {from} → {version}: {}", e.message),
                })?;
            current = self.wait_cluster_active(a, name, &names, ctx).await?;
        }

        let public = attrs.get("endpoint_public").and_then(Value::as_bool);
        let private = attrs.get("endpoint_private").and_then(Value::as_bool);
        if public
            != current
                .attrs
                .get("endpoint_public")
                .and_then(Value::as_bool)
            || private
                != current
                    .attrs
                    .get("endpoint_private")
                    .and_then(Value::as_bool)
        {
            let vpc = VpcConfigRequest::builder()
                .set_endpoint_public_access(public)
                .set_endpoint_private_access(private)
                .build();
            let req = self
                .eks
                .update_cluster_config()
                .name(name)
                .resources_vpc_config(vpc);
            self.limiter
                .call(Service::Eks, "UpdateClusterConfig", req.send())
                .await
                .map_err(|e| e.at(a))?;
            current = self.wait_cluster_active(a, name, &names, ctx).await?;
        }

        let arn = current
            .outputs
            .get("arn")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if self.update_eks_tags(a, &arn, attrs, &current).await? {
            current = self.wait_cluster_active(a, name, &names, ctx).await?;
        }
        Ok(current)
    }

    /// Brings user tags to the desired ones; true if anything changed.
    pub(super) async fn update_eks_tags(
        &self,
        a: &Address,
        arn: &str,
        attrs: &BTreeMap<String, Value>,
        live: &Live,
    ) -> Result<bool, ProviderError> {
        let (set, remove) = map_delta(
            &str_map(attrs.get("tags")),
            &str_map(live.attrs.get("tags")),
        );
        if !set.is_empty() {
            let req = self
                .eks
                .tag_resource()
                .resource_arn(arn)
                .set_tags(Some(hash(set.clone())));
            self.limiter
                .call(Service::Eks, "TagResource", req.send())
                .await
                .map_err(|e| e.at(a))?;
        }
        if !remove.is_empty() {
            let req = self
                .eks
                .untag_resource()
                .resource_arn(arn)
                .set_tag_keys(Some(remove.clone()));
            self.limiter
                .call(Service::Eks, "UntagResource", req.send())
                .await
                .map_err(|e| e.at(a))?;
        }
        Ok(!set.is_empty() || !remove.is_empty())
    }

    pub(super) async fn delete_cluster(
        &self,
        live: &Live,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        let a = &live.address;
        let name = live.id.as_str();
        if attr_str(&live.attrs, "status").as_deref() != Some("DELETING") {
            // Node groups first (a replaced cluster still has them).
            let groups = match self.list_node_groups(name).await {
                Ok(g) => g,
                Err(e) if e.is_not_found() => return Ok(()),
                Err(e) => return Err(e.at(a)),
            };
            for g in &groups {
                self.delete_node_group_named(a, name, g, ctx).await?;
            }
            let (budget, base) = (
                self.config.dependency_timeout,
                self.config.dependency_backoff,
            );
            let res = retry_for(
                budget,
                base,
                |e: &AwsError| e.is("ResourceInUseException"),
                |_| async { ctx.progress(a, "cluster still in use, retrying the delete") },
                || async {
                    self.limiter
                        .call(
                            Service::Eks,
                            "DeleteCluster",
                            self.eks.delete_cluster().name(name).send(),
                        )
                        .await
                },
            )
            .await;
            match res {
                Ok(_) => {}
                Err(e) if e.is_not_found() => return Ok(()),
                Err(e) => return Err(e.at(a)),
            }
        }
        self.wait_cluster_gone(a, name, ctx).await
    }

    pub(super) async fn create_node_group(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let cluster = attr_str(attrs, "cluster").unwrap_or_default();
        let name = attr_str(attrs, "name").unwrap_or_default();
        let subnets = id_map(attrs, "subnets");
        let names = reverse(&subnets);
        let scaling = NodegroupScalingConfig::builder()
            .set_min_size(int(attrs, "min"))
            .set_max_size(int(attrs, "max"))
            .set_desired_size(int(attrs, "desired"))
            .build();
        let labels = hash(str_map(attrs.get("labels")));
        let tags = tags_with_owner(attrs, ctx, a);
        let budget = self.config.dependency_timeout.min(Duration::from_secs(120));
        retry_for(
            budget,
            self.config.dependency_backoff,
            |e: &AwsError| {
                e.is("InvalidParameterException") && e.message.to_lowercase().contains("role")
            },
            |_| async { ctx.progress(a, "the node IAM role is not usable by EKS yet, retrying") },
            || async {
                let req = self
                    .eks
                    .create_nodegroup()
                    .cluster_name(&cluster)
                    .nodegroup_name(&name)
                    .node_role(attr_str(attrs, "role_arn").unwrap_or_default())
                    .set_subnets(Some(subnets.values().cloned().collect()))
                    .set_instance_types(Some(strings(attrs, "instance_types")))
                    .set_disk_size(int(attrs, "disk_size"))
                    .scaling_config(scaling.clone())
                    .set_labels(if labels.is_empty() {
                        None
                    } else {
                        Some(labels.clone())
                    })
                    .set_tags(Some(tags.clone()));
                self.limiter
                    .call(Service::Eks, "CreateNodegroup", req.send())
                    .await
            },
        )
        .await
        .map_err(|e| e.at(a))?;
        self.wait_node_group_active(a, &cluster, &name, &names, ctx)
            .await
    }

    pub(super) async fn update_node_group(
        &self,
        d: &Desired,
        attrs: &BTreeMap<String, Value>,
        live: &Live,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let a = &d.address;
        let (cluster, name) = split_id(&live.id);
        let names = reverse(&id_map(attrs, "subnets"));
        match attr_str(&live.attrs, "status").as_deref() {
            Some("DELETING") => {
                ctx.progress(
                    a,
                    "the node group is being deleted; waiting, then creating it again",
                );
                self.wait_node_group_gone(a, cluster, name, ctx).await?;
                return self.create_node_group(d, attrs, ctx).await;
            }
            Some(s @ ("CREATE_FAILED" | "DELETE_FAILED")) => {
                return Err(ProviderError::Api {
                    address: a.clone(),
                    message: format!(
                        "node group {cluster}/{name} is {s}: delete it or plan with --replace"
                    ),
                });
            }
            _ => {}
        }
        let mut current = self
            .wait_node_group_active(a, cluster, name, &names, ctx)
            .await?;

        let scaling_changed = ["min", "max", "desired"]
            .iter()
            .any(|k| int(attrs, k) != int(&current.attrs, k));
        let (add, remove) = map_delta(
            &str_map(attrs.get("labels")),
            &str_map(current.attrs.get("labels")),
        );
        if scaling_changed || !add.is_empty() || !remove.is_empty() {
            let mut req = self
                .eks
                .update_nodegroup_config()
                .cluster_name(cluster)
                .nodegroup_name(name);
            if scaling_changed {
                req = req.scaling_config(
                    NodegroupScalingConfig::builder()
                        .set_min_size(int(attrs, "min"))
                        .set_max_size(int(attrs, "max"))
                        .set_desired_size(int(attrs, "desired"))
                        .build(),
                );
            }
            if !add.is_empty() || !remove.is_empty() {
                req = req.labels(
                    UpdateLabelsPayload::builder()
                        .set_add_or_update_labels(if add.is_empty() {
                            None
                        } else {
                            Some(hash(add))
                        })
                        .set_remove_labels(if remove.is_empty() {
                            None
                        } else {
                            Some(remove)
                        })
                        .build(),
                );
            }
            self.limiter
                .call(Service::Eks, "UpdateNodegroupConfig", req.send())
                .await
                .map_err(|e| e.at(a))?;
            current = self
                .wait_node_group_active(a, cluster, name, &names, ctx)
                .await?;
        }
        let arn = current
            .outputs
            .get("arn")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if self.update_eks_tags(a, &arn, attrs, &current).await? {
            current = self
                .wait_node_group_active(a, cluster, name, &names, ctx)
                .await?;
        }
        Ok(current)
    }

    pub(super) async fn delete_node_group(
        &self,
        live: &Live,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        let (cluster, name) = split_id(&live.id);
        if attr_str(&live.attrs, "status").as_deref() == Some("DELETING") {
            return self
                .wait_node_group_gone(&live.address, cluster, name, ctx)
                .await;
        }
        self.delete_node_group_named(&live.address, cluster, name, ctx)
            .await
    }

    async fn delete_node_group_named(
        &self,
        a: &Address,
        cluster: &str,
        name: &str,
        ctx: &ApplyContext,
    ) -> Result<(), ProviderError> {
        let (budget, base) = (
            self.config.dependency_timeout,
            self.config.dependency_backoff,
        );
        let res = retry_for(
            budget,
            base,
            |e: &AwsError| e.is("ResourceInUseException"),
            |_| async { ctx.progress(a, "node group busy (updating), retrying the delete") },
            || async {
                let req = self
                    .eks
                    .delete_nodegroup()
                    .cluster_name(cluster)
                    .nodegroup_name(name);
                self.limiter
                    .call(Service::Eks, "DeleteNodegroup", req.send())
                    .await
            },
        )
        .await;
        match res {
            Ok(_) => {}
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e.at(a)),
        }
        self.wait_node_group_gone(a, cluster, name, ctx).await
    }
}

/// What the waits for an EKS cluster, node group or add-on read of it.
pub(super) trait EksStatus {
    /// `ACTIVE`, `CREATING`, ...
    fn status_str(&self) -> Option<&str>;
    /// The messages of the health issues it reports.
    fn issues(&self) -> Option<Vec<&str>>;
}

/// The three answer the same questions the same way.
macro_rules! eks_status {
    ($($t:ty),*) => {$(
        impl EksStatus for $t {
            fn status_str(&self) -> Option<&str> {
                self.status().map(|s| s.as_str())
            }
            fn issues(&self) -> Option<Vec<&str>> {
                self.health()
                    .map(|h| h.issues().iter().filter_map(|i| i.message()).collect())
            }
        }
    )*};
}

eks_status!(
    aws_sdk_eks::types::Cluster,
    aws_sdk_eks::types::Nodegroup,
    aws_sdk_eks::types::Addon
);

/// A wait for an EKS resource to be ACTIVE.
pub(super) struct ActiveWait<'a> {
    /// What the progress lines say.
    pub what: &'a str,
    pub timeout: std::time::Duration,
    /// The resource, as errors name it.
    pub subject: String,
    /// The statuses that end the wait with an error.
    pub failing: &'a [&'a str],
    /// What such an error adds.
    pub hint: &'a str,
}

impl AwsProvider {
    /// Waits until the EKS resource `describe` reads is ACTIVE and returns
    /// `live` of it; it disappearing or reaching a failing status ends the
    /// wait with an error.
    pub(super) async fn wait_eks_active<R, F, Fut>(
        &self,
        ctx: &ApplyContext,
        a: &Address,
        w: ActiveWait<'_>,
        describe: F,
        live: impl Fn(&R) -> Live,
    ) -> Result<Live, ProviderError>
    where
        R: EksStatus,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Option<R>, AwsError>>,
    {
        let ActiveWait {
            what,
            timeout,
            subject,
            failing,
            hint,
        } = w;
        let subject = &subject;
        wait_until(ctx, a, what, timeout, self.config.wait.every(), || async {
            let Some(r) = describe().await.map_err(|e| e.at(a))? else {
                return Err(ProviderError::Api {
                    address: a.clone(),
                    message: format!("{subject} disappeared"),
                });
            };
            match r.status_str().unwrap_or("UNKNOWN") {
                "ACTIVE" => Ok(Polled::Done(live(&r))),
                s if failing.contains(&s) => Err(ProviderError::Api {
                    address: a.clone(),
                    message: format!("{subject} is {s}{}{hint}", health(r.issues())),
                }),
                other => Ok(Polled::Pending(other.to_owned())),
            }
        })
        .await
    }

    /// Waits until `describe` finds the EKS resource no more, showing its
    /// status meanwhile.
    pub(super) async fn wait_eks_gone<R, F, Fut>(
        &self,
        ctx: &ApplyContext,
        a: &Address,
        what: &str,
        timeout: std::time::Duration,
        describe: F,
    ) -> Result<(), ProviderError>
    where
        R: EksStatus,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Option<R>, AwsError>>,
    {
        wait_gone(ctx, a, what, timeout, self.config.wait.every(), || async {
            let r = describe().await.map_err(|e| e.at(a))?;
            Ok(r.map(|r| r.status_str().unwrap_or_default().to_owned()))
        })
        .await
    }
}

pub(super) fn health(issues: Option<Vec<&str>>) -> String {
    match issues {
        Some(v) if !v.is_empty() => format!(" ({})", v.join("; ")),
        _ => String::new(),
    }
}
