//! The resolved stack as desired AWS resources (pure).
//!
//! Addresses: `network.N` (VPC) with children `.subnet.S`,
//! `.internet_gateway`, `.route_table.public`, `.security_group.cluster`
//! and, per NAT gateway (keyed by its zone Z), `.nat_eip.Z`,
//! `.nat_gateway.Z` and `.route_table.private-Z`;
//! `cluster.C` (EKS) with `.role`, `.node_role`, `.node_group.G` and
//! `.addon.vpc-cni` (network policy on);
//! `expose.X.node_port_rule.K` (per CIDR the NodePort exposure X opens the
//! node security group to, see [`node_port_rules`]); `registry.R` (ECR). Cross-resource ids are `Value::Ref`s, so the engine
//! orders and parallelises them; every attribute has the same name and
//! shape as [`super::AwsProvider::observe`] reports it.

use std::collections::{BTreeMap, BTreeSet};

use crate::resource::{Address, Desired, ProviderId, Value};
use crate::stack::{Caller, ClusterKind, ExposeKind, NatGateways, Network, Stack};

use super::super::ProviderError;
use super::addon::{NETWORK_POLICY_ON, VPC_CNI};
use super::{kind, names};

/// Managed policies of the cluster role.
pub const CLUSTER_POLICIES: &[&str] = &["AmazonEKSClusterPolicy"];
/// Managed policies of the node role.
pub const NODE_POLICIES: &[&str] = &[
    "AmazonEKSWorkerNodePolicy",
    "AmazonEKS_CNI_Policy",
    "AmazonEC2ContainerRegistryReadOnly",
];

fn r(address: &Address, output: &str) -> Value {
    Value::Ref {
        address: address.clone(),
        output: output.to_owned(),
    }
}

fn tags(items: impl IntoIterator<Item = (String, String)>) -> Value {
    Value::Map(items.into_iter().map(|(k, v)| (k, Value::Str(v))).collect())
}

pub fn desired(
    stack: &Stack,
    policy_arn: &dyn Fn(&str) -> String,
) -> Result<Vec<Desired>, ProviderError> {
    // A test instance of a stack with services deploys them on the
    // environment's own cluster and registry: it builds none of its own.
    if stack.reuses_platform() {
        return Ok(Vec::new());
    }
    let s = stack.name.as_str();
    let e = stack.env.name.as_str();
    let mut out = Vec::new();

    // Which EKS clusters use which subnets (for the `kubernetes.io/cluster/<name>` tag).
    let mut cluster_of_subnet: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (cname, c) in &stack.clusters {
        if let ClusterKind::Eks(eks) = &c.kind {
            let eks_name = names::eks_cluster(s, e, cname);
            let used = eks
                .subnets
                .iter()
                .chain(eks.node_groups.iter().flat_map(|g| g.subnets.iter()));
            for sub in used {
                cluster_of_subnet
                    .entry((eks.network.clone(), sub.clone()))
                    .or_default()
                    .insert(eks_name.clone());
            }
        }
    }

    for (nname, n) in &stack.networks {
        let vpc = Address::of("network", nname);
        let mut base_tags: BTreeMap<String, String> = n.tags.clone();
        base_tags.insert("Name".into(), names::display(s, e, nname));
        out.push(
            Desired::new(vpc.clone(), kind::VPC, ProviderId::Aws)
                .attr_force_new("cidr", n.cidr.to_string())
                .attr("tags", tags(base_tags.clone())),
        );
        let mut public = Vec::new();
        for sub in &n.subnets {
            let addr = vpc.child("subnet", &sub.name);
            let mut t = n.tags.clone();
            t.insert(
                "Name".into(),
                names::display(s, e, &format!("{nname}-{}", sub.name)),
            );
            if sub.public {
                t.insert("kubernetes.io/role/elb".into(), "1".into());
                public.push((sub.name.clone(), addr.clone()));
            } else {
                t.insert("kubernetes.io/role/internal-elb".into(), "1".into());
            }
            if let Some(clusters) = cluster_of_subnet.get(&(nname.clone(), sub.name.clone())) {
                for c in clusters {
                    t.insert(format!("kubernetes.io/cluster/{c}"), "shared".into());
                }
            }
            out.push(
                Desired::new(addr, kind::SUBNET, ProviderId::Aws)
                    .attr_force_new("vpc_id", r(&vpc, "id"))
                    .attr_force_new("cidr", sub.cidr.to_string())
                    .attr_force_new("zone", sub.zone.clone())
                    .attr("map_public_ip_on_launch", sub.public)
                    .attr("tags", tags(t))
                    .depends(vpc.clone()),
            );
        }
        if !public.is_empty() {
            let igw = Address::new(format!("{vpc}.internet_gateway"));
            let mut t = n.tags.clone();
            t.insert("Name".into(), names::display(s, e, nname));
            out.push(
                Desired::new(igw.clone(), kind::INTERNET_GATEWAY, ProviderId::Aws)
                    .attr_force_new("vpc_id", r(&vpc, "id"))
                    .attr("tags", tags(t.clone()))
                    .depends(vpc.clone()),
            );
            let rt = vpc.child("route_table", "public");
            let mut d = Desired::new(rt, kind::ROUTE_TABLE, ProviderId::Aws)
                .attr_force_new("vpc_id", r(&vpc, "id"))
                .attr("gateway_id", r(&igw, "id"))
                .attr("nat_gateway_id", Value::Null)
                .attr(
                    "subnets",
                    Value::Map(
                        public
                            .iter()
                            .map(|(name, a)| (name.clone(), r(a, "id")))
                            .collect(),
                    ),
                )
                .attr("tags", tags(named(&t, s, e, &format!("{nname}-public"))))
                .depends(vpc.clone())
                .depends(igw.clone());
            for (_, a) in &public {
                d = d.depends(a.clone());
            }
            out.push(d);
            out.extend(nat_gateways(n, &vpc, &igw, s, e));
        }
        let sg = vpc.child("security_group", "cluster");
        out.push(
            Desired::new(sg, kind::SECURITY_GROUP, ProviderId::Aws)
                .attr_force_new("vpc_id", r(&vpc, "id"))
                .attr_force_new("name", names::security_group(s, e, nname))
                .attr(
                    "tags",
                    tags(named(&n.tags, s, e, &format!("{nname}-cluster"))),
                )
                .depends(vpc.clone()),
        );
    }

    for (cname, c) in &stack.clusters {
        let ClusterKind::Eks(eks) = &c.kind else {
            continue;
        };
        let caddr = Address::of("cluster", cname);
        let Some(net) = stack.networks.get(&eks.network) else {
            return Err(ProviderError::Invalid {
                address: caddr,
                message: format!("network `{}` is not declared", eks.network),
            });
        };
        let vpc = Address::of("network", &eks.network);
        let subnet_ref = |name: &str| -> Result<(String, Value, Address), ProviderError> {
            if !net.subnets.iter().any(|x| x.name == name) {
                return Err(ProviderError::Invalid {
                    address: caddr.clone(),
                    message: format!(
                        "subnet `{name}` is not declared in network `{}`",
                        eks.network
                    ),
                });
            }
            let a = vpc.child("subnet", name);
            Ok((name.to_owned(), r(&a, "id"), a))
        };

        let mut cluster = Desired::new(caddr.clone(), kind::EKS_CLUSTER, ProviderId::Aws);
        let role_arn = match &eks.role_arn {
            Some(arn) => Value::str(arn.clone()),
            None => {
                let raddr = Address::new(format!("{caddr}.role"));
                let name = names::iam_role(s, e, cname, "cluster");
                out.push(role(
                    &raddr,
                    s,
                    e,
                    &name,
                    "eks.amazonaws.com",
                    CLUSTER_POLICIES,
                    policy_arn,
                ));
                cluster = cluster.depends(raddr.clone());
                r(&raddr, "arn")
            }
        };
        let mut subnets = BTreeMap::new();
        for name in &eks.subnets {
            let (n, v, a) = subnet_ref(name)?;
            subnets.insert(n, v);
            cluster = cluster.depends(a);
        }
        let sg = vpc.child("security_group", "cluster");
        let eks_name = names::eks_cluster(s, e, cname);
        cluster = cluster
            .attr_force_new("name", eks_name.clone())
            .attr("version", eks.version.clone())
            .attr_force_new("role_arn", role_arn)
            .attr_force_new("subnets", Value::Map(subnets))
            .attr_force_new("security_groups", Value::List(vec![r(&sg, "id")]))
            .attr("endpoint_public", eks.endpoint_public)
            .attr("endpoint_private", eks.endpoint_private)
            .attr("tags", Value::Map(BTreeMap::new()))
            .attr("status", "ACTIVE")
            .depends(sg);
        out.push(cluster);

        // The VPC CNI enforces the NetworkPolicies mesh writes from `allow`
        // only with its network-policy agent on.
        out.push(
            Desired::new(
                caddr.child("addon", VPC_CNI),
                kind::EKS_ADDON,
                ProviderId::Aws,
            )
            .attr_force_new("cluster", r(&caddr, "name"))
            .attr_force_new("name", VPC_CNI)
            .attr("configuration", NETWORK_POLICY_ON)
            .attr("tags", Value::Map(BTreeMap::new()))
            .attr("status", "ACTIVE")
            .depends(caddr.clone()),
        );

        let node_role = Address::new(format!("{caddr}.node_role"));
        if eks.node_groups.iter().any(|g| g.role_arn.is_none()) {
            let name = names::iam_role(s, e, cname, "node");
            out.push(role(
                &node_role,
                s,
                e,
                &name,
                "ec2.amazonaws.com",
                NODE_POLICIES,
                policy_arn,
            ));
        }
        for g in &eks.node_groups {
            let gaddr = caddr.child("node_group", &g.name);
            let mut d =
                Desired::new(gaddr, kind::EKS_NODE_GROUP, ProviderId::Aws).depends(caddr.clone());
            let role_arn = match &g.role_arn {
                Some(arn) => Value::str(arn.clone()),
                None => {
                    d = d.depends(node_role.clone());
                    r(&node_role, "arn")
                }
            };
            let names_of_subnets = if g.subnets.is_empty() {
                &eks.subnets
            } else {
                &g.subnets
            };
            let mut subnets = BTreeMap::new();
            for name in names_of_subnets {
                let (n, v, a) = subnet_ref(name)?;
                subnets.insert(n, v);
                d = d.depends(a);
            }
            let labels = Value::Map(
                g.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::str(v.clone())))
                    .collect(),
            );
            out.push(
                d.attr_force_new("cluster", r(&caddr, "name"))
                    .attr_force_new("name", g.name.clone())
                    .attr_force_new("role_arn", role_arn)
                    .attr_force_new("subnets", Value::Map(subnets))
                    .attr_force_new(
                        "instance_types",
                        Value::list_of_str(g.instance_types.iter().cloned()),
                    )
                    .attr_force_new("disk_size", g.disk_size)
                    .attr("min", g.min)
                    .attr("max", g.max)
                    .attr("desired", g.desired)
                    .attr("labels", labels)
                    .attr("tags", Value::Map(BTreeMap::new()))
                    .attr("status", "ACTIVE"),
            );
        }
    }

    out.extend(node_port_rules(stack));

    for (rname, reg) in &stack.registries {
        let addr = Address::of("registry", rname);
        out.push(
            Desired::new(addr, kind::ECR_REPOSITORY, ProviderId::Aws)
                .attr_force_new("name", names::ecr_repository(s, e, rname))
                .attr("scan_on_push", reg.scan_on_push)
                .attr("immutable_tags", reg.immutable_tags)
                .attr(
                    "keep_last",
                    reg.keep_last.map(Value::from).unwrap_or(Value::Null),
                )
                .attr(
                    "keep_last_per",
                    if reg.keep_last.is_some() {
                        Value::list_of_str(pushing_services(stack, rname))
                    } else {
                        Value::Null
                    },
                )
                .attr("tags", Value::Map(BTreeMap::new())),
        );
    }
    Ok(out)
}

/// The NAT gateways of a network that has an internet gateway: per
/// placement an Elastic IP, the NAT gateway in the zone's public subnet, and
/// a private route table sending `0.0.0.0/0` through it, associated with
/// the private subnets it serves.
///
/// Addresses are keyed by the NAT gateway's zone, so switching between
/// `single` and `per_zone` keeps the first NAT gateway (and its public IP,
/// which partners may have allow-listed) and only adds or removes the
/// others. The Elastic IP has nothing to do with the subnet: when the NAT
/// gateway moves (its public subnet replaced), the new one gets the same
/// address once the old one is deleted.
fn nat_gateways(n: &Network, vpc: &Address, igw: &Address, s: &str, e: &str) -> Vec<Desired> {
    let nname = n.name.as_str();
    let mut out = Vec::new();
    for p in n.nat_placements() {
        let eip = vpc.child("nat_eip", &p.zone);
        let nat = vpc.child("nat_gateway", &p.zone);
        let host = vpc.child("subnet", &p.subnet);
        let label = format!("{nname}-nat-{}", p.zone);
        out.push(
            Desired::new(eip.clone(), kind::EIP, ProviderId::Aws)
                .attr_force_new("domain", "vpc")
                .attr("tags", tags(named(&n.tags, s, e, &label))),
        );
        out.push(
            Desired::new(nat.clone(), kind::NAT_GATEWAY, ProviderId::Aws)
                .attr_force_new("subnet_id", r(&host, "id"))
                .attr_force_new("allocation_id", r(&eip, "id"))
                .attr_force_new("connectivity", "public")
                .attr("tags", tags(named(&n.tags, s, e, &label)))
                .attr("state", "available")
                .depends(vpc.clone())
                .depends(host)
                .depends(eip)
                .depends(igw.clone()),
        );
        let table_name = match n.nat_gateway {
            NatGateways::PerZone => format!("{nname}-private-{}", p.zone),
            _ => format!("{nname}-private"),
        };
        let mut d = Desired::new(
            vpc.child("route_table", &format!("private-{}", p.zone)),
            kind::ROUTE_TABLE,
            ProviderId::Aws,
        )
        .attr_force_new("vpc_id", r(vpc, "id"))
        .attr("gateway_id", Value::Null)
        .attr("nat_gateway_id", r(&nat, "id"))
        .attr(
            "subnets",
            Value::Map(
                p.private
                    .iter()
                    .map(|name| (name.clone(), r(&vpc.child("subnet", name), "id")))
                    .collect(),
            ),
        )
        .attr("tags", tags(named(&n.tags, s, e, &table_name)))
        .depends(vpc.clone())
        .depends(nat);
        for name in &p.private {
            d = d.depends(vpc.child("subnet", name));
        }
        out.push(d);
    }
    out
}

/// The ingress rules of the node security group that open each NodePort
/// exposure of the environment's EKS cluster: one rule per CIDR in the
/// exposure's `allow` (service names are callers inside the cluster and
/// need none); an exposure that allows no CIDR (only services, or nobody)
/// is opened to the cluster network's VPC CIDR alone, "accessible only from
/// inside the VPC". The node port is the exposure's `node_port`, else the
/// one Kubernetes gave its Service (known once the Service exists).
///
/// The group is the cluster's `node_security_group` output: the cluster
/// security group EKS creates, which managed node groups use.
fn node_port_rules(stack: &Stack) -> Vec<Desired> {
    let Some(cname) = stack.env.cluster.as_deref() else {
        return Vec::new();
    };
    let Some(ClusterKind::Eks(eks)) = stack.clusters.get(cname).map(|c| &c.kind) else {
        return Vec::new();
    };
    let Some(net) = stack.networks.get(&eks.network) else {
        return Vec::new();
    };
    let caddr = Address::of("cluster", cname);
    let mut out = Vec::new();
    for (name, e) in &stack.exposes {
        let ExposeKind::NodePort { node_port, .. } = &e.kind else {
            continue;
        };
        let base = Address::of("expose", name);
        // The Kubernetes Service of the exposure (the kubernetes provider's).
        let service = Address::new(format!("{base}.service"));
        let mut cidrs: Vec<String> = e
            .allow
            .iter()
            .filter_map(|c| match c {
                Caller::Cidr(n) => Some(n.to_string()),
                Caller::Service(_) => None,
            })
            .collect();
        if cidrs.is_empty() {
            cidrs.push(net.cidr.to_string());
        }
        cidrs.sort();
        cidrs.dedup();
        for cidr in cidrs {
            let mut d = Desired::new(
                base.child("node_port_rule", &rule_key(&cidr)),
                kind::SECURITY_GROUP_RULE,
                ProviderId::Aws,
            )
            .attr_force_new("group_id", r(&caddr, "node_security_group"))
            .attr_force_new("protocol", "tcp")
            .attr_force_new("cidr", cidr)
            .depends(caddr.clone());
            d = match node_port {
                Some(p) => d.attr_force_new("port", *p),
                None => d
                    .attr_force_new("port", r(&service, "node_port"))
                    .depends(service.clone()),
            };
            out.push(d);
        }
    }
    out
}

/// A CIDR as the last part of an address: `10.0.0.0/16` → `10-0-0-0_16`.
fn rule_key(cidr: &str) -> String {
    cidr.replace('.', "-").replace('/', "_")
}

/// The services whose images go to `registry.NAME` (the environment's
/// registry), sorted: each gets its own lifecycle rule.
fn pushing_services(stack: &Stack, registry: &str) -> Vec<String> {
    if stack.env.registry.as_deref() != Some(registry) {
        return Vec::new();
    }
    stack.services.keys().cloned().collect()
}

fn named(
    base: &BTreeMap<String, String>,
    s: &str,
    e: &str,
    rest: &str,
) -> BTreeMap<String, String> {
    let mut t = base.clone();
    t.insert("Name".into(), names::display(s, e, rest));
    t
}

fn role(
    address: &Address,
    stack: &str,
    env: &str,
    name: &str,
    service: &str,
    policies: &[&str],
    policy_arn: &dyn Fn(&str) -> String,
) -> Desired {
    let mut arns: Vec<String> = policies.iter().map(|p| policy_arn(p)).collect();
    arns.sort();
    Desired::new(address.clone(), kind::IAM_ROLE, ProviderId::Aws)
        .attr_force_new("name", name.to_owned())
        .attr_force_new("path", names::iam_path(stack, env, address.as_str()))
        .attr_force_new("service", service.to_owned())
        .attr("policies", Value::list_of_str(arns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn platform(env: &str) -> Stack {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/platform");
        crate::stack::load(&root, Some(env)).unwrap_or_else(|r| panic!("{}", r.render()))
    }

    fn resources(stack: &Stack) -> Vec<Desired> {
        desired(stack, &|name| format!("arn:aws:iam::aws:policy/{name}")).expect("desired")
    }

    fn is_nat(d: &Desired) -> bool {
        d.kind == kind::EIP
            || d.kind == kind::NAT_GATEWAY
            || d.address.as_str().contains(".route_table.private-")
    }

    fn get<'a>(all: &'a [Desired], address: &str) -> (usize, &'a Desired) {
        all.iter()
            .enumerate()
            .find(|(_, d)| d.address.as_str() == address)
            .unwrap_or_else(|| panic!("{address} is not desired"))
    }

    fn reference(address: &str) -> Value {
        r(&Address::new(address), "id")
    }

    #[test]
    fn a_test_instance_builds_cloud_resources_only_for_a_platform_stack() {
        // A platform stack (no services): the instance's own, under its name.
        let inst = platform("dev").instance("t1");
        assert!(!inst.reuses_platform());
        let own = resources(&inst);
        let (_, cluster) = get(&own, "cluster.main");
        assert_eq!(
            cluster.attrs["name"].value,
            Value::str(names::eks_cluster("platform", "dev-t1", "main"))
        );
        // A stack with services: the environment's cluster and registry.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
        let mesh =
            crate::stack::load(&root, Some("dev")).unwrap_or_else(|r| panic!("{}", r.render()));
        assert!(!resources(&mesh).is_empty());
        let inst = mesh.instance("t1");
        assert!(inst.reuses_platform());
        assert_eq!(inst.platform_env(), "dev");
        assert!(resources(&inst).is_empty());
    }

    #[test]
    fn dev_routes_both_private_subnets_through_one_nat_gateway() {
        let all = resources(&platform("dev"));
        let nat: Vec<&str> = all
            .iter()
            .filter(|d| is_nat(d))
            .map(|d| d.address.as_str())
            .collect();
        assert_eq!(
            nat,
            [
                "network.main.nat_eip.us-east-1a",
                "network.main.nat_gateway.us-east-1a",
                "network.main.route_table.private-us-east-1a",
            ]
        );
        let (i_eip, eip) = get(&all, "network.main.nat_eip.us-east-1a");
        let (i_nat, gw) = get(&all, "network.main.nat_gateway.us-east-1a");
        let (i_rt, rt) = get(&all, "network.main.route_table.private-us-east-1a");
        let (i_igw, _) = get(&all, "network.main.internet_gateway");
        let (i_host, _) = get(&all, "network.main.subnet.public-a");
        // Dependency order: what a resource refers to comes first.
        assert!(i_igw < i_nat && i_host < i_nat && i_eip < i_nat && i_nat < i_rt);

        // The address has nothing to do with the subnet: it outlives a move of the NAT gateway.
        assert_eq!(eip.attrs.keys().collect::<Vec<_>>(), ["domain", "tags"]);
        assert!(eip.attrs["domain"].force_new);

        let subnet = &gw.attrs["subnet_id"];
        assert_eq!(subnet.value, reference("network.main.subnet.public-a"));
        assert!(
            subnet.force_new,
            "a NAT gateway cannot move to another subnet"
        );
        let allocation = &gw.attrs["allocation_id"];
        assert_eq!(
            allocation.value,
            reference("network.main.nat_eip.us-east-1a")
        );
        assert!(allocation.force_new);
        assert_eq!(gw.attrs["state"].value, Value::str("available"));
        assert!(
            gw.depends_on
                .contains(&Address::new("network.main.internet_gateway"))
        );

        assert_eq!(rt.kind, kind::ROUTE_TABLE);
        assert_eq!(rt.attrs["gateway_id"].value, Value::Null);
        assert_eq!(
            rt.attrs["nat_gateway_id"].value,
            reference("network.main.nat_gateway.us-east-1a")
        );
        let Value::Map(subnets) = &rt.attrs["subnets"].value else {
            panic!("subnets")
        };
        assert_eq!(
            subnets.keys().collect::<Vec<_>>(),
            ["private-a", "private-b"]
        );
        let Value::Map(tags) = &rt.attrs["tags"].value else {
            panic!("tags")
        };
        assert_eq!(tags["Name"], Value::str("platform-dev-main-private"));

        // The public table still goes out through the internet gateway.
        let (_, public) = get(&all, "network.main.route_table.public");
        assert_eq!(public.attrs["nat_gateway_id"].value, Value::Null);
        assert_eq!(
            public.attrs["gateway_id"].value,
            reference("network.main.internet_gateway")
        );
    }

    #[test]
    fn prod_has_a_nat_gateway_per_zone() {
        let all = resources(&platform("prod"));
        assert_eq!(all.iter().filter(|d| is_nat(d)).count(), 6);
        for (zone, public, private) in [
            ("us-east-1a", "public-a", "private-a"),
            ("us-east-1b", "public-b", "private-b"),
        ] {
            let (_, gw) = get(&all, &format!("network.main.nat_gateway.{zone}"));
            assert_eq!(
                gw.attrs["subnet_id"].value,
                reference(&format!("network.main.subnet.{public}"))
            );
            let (_, rt) = get(&all, &format!("network.main.route_table.private-{zone}"));
            assert_eq!(
                rt.attrs["nat_gateway_id"].value,
                reference(&format!("network.main.nat_gateway.{zone}"))
            );
            let Value::Map(subnets) = &rt.attrs["subnets"].value else {
                panic!("subnets")
            };
            assert_eq!(subnets.keys().collect::<Vec<_>>(), [private]);
        }
    }

    #[test]
    fn the_default_is_single_with_private_and_public_subnets_else_none() {
        assert_eq!(
            platform("dev").networks["main"].nat_gateway,
            NatGateways::Single
        );
        assert_eq!(
            platform("prod").networks["main"].nat_gateway,
            NatGateways::PerZone
        );
        // customer-mesh's network (from modules/aws-platform) has public subnets only.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
        let stack =
            crate::stack::load(&root, Some("dev")).unwrap_or_else(|r| panic!("{}", r.render()));
        assert!(!stack.networks.is_empty());
        for n in stack.networks.values() {
            assert!(n.subnets.iter().all(|s| s.public), "{n:?}");
            assert_eq!(n.nat_gateway, NatGateways::None);
        }
        assert!(!resources(&stack).iter().any(is_nat));
    }

    #[test]
    fn a_nodeport_without_node_port_waits_for_the_one_kubernetes_gives() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
        let mut stack =
            crate::stack::load(&root, Some("dev")).unwrap_or_else(|r| panic!("{}", r.render()));
        if let Some(ExposeKind::NodePort { node_port, .. }) = stack
            .exposes
            .get_mut("customer-scoring")
            .map(|e| &mut e.kind)
        {
            *node_port = None;
        }
        let all = resources(&stack);
        let (_, rule) = get(&all, "expose.customer-scoring.node_port_rule.0-0-0-0_0");
        let service = Address::new("expose.customer-scoring.service");
        assert_eq!(rule.attrs["port"].value, r(&service, "node_port"));
        assert!(rule.depends_on.contains(&service));
        assert_eq!(
            rule.attrs["group_id"].value,
            r(&Address::new("cluster.platform"), "node_security_group")
        );
        let (_, features) = get(&all, "expose.customer-features.node_port_rule.10-40-0-0_16");
        assert_eq!(features.attrs["port"].value, Value::Int(30080));
        let (_, addon) = get(&all, "cluster.platform.addon.vpc-cni");
        assert_eq!(
            addon.attrs["configuration"].value,
            Value::str(r#"{"enableNetworkPolicy":"true"}"#)
        );
        // A test instance deploys onto the environment's cluster: no rules of its own.
        assert!(
            !resources(&stack.instance("t1"))
                .iter()
                .any(|d| d.kind == kind::SECURITY_GROUP_RULE)
        );
    }

    #[test]
    fn none_means_no_nat_resources() {
        let mut stack = platform("dev");
        if let Some(n) = stack.networks.get_mut("main") {
            n.nat_gateway = NatGateways::None;
        }
        let all = resources(&stack);
        assert!(!all.iter().any(is_nat));
        get(&all, "network.main.route_table.public");
    }
}
