//! The AWS provider against a real AWS API emulator (moto server at
//! `MESH_TEST_AWS_ENDPOINT`, started by `scripts/test` or
//! `scripts/services start`), driven through `mesh::plan::diff` and the
//! provider's `apply` the way the engine drives it. Waiters, retries and
//! throttling go through the fault-injecting proxy (`tests/aws-fault-proxy`).
//!
//! moto's state is shared: every test uses its own stack name.
#![cfg(feature = "aws")]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aws_fault_proxy::{FaultProxy, moto_endpoint};
use mesh::plan::{self, Action, Change, Plan};
use mesh::provider::aws::{AwsConfig, AwsProvider, WaitConfig, names};
use mesh::provider::{ApplyContext, Provider, ProviderError};
use mesh::resource::{ProviderId, Scope, Value};
use mesh::stack::{NatGateways, Stack};

mod support;
use support::aws::{ec2_tags, leftovers, live_nat_gateways, owner_filters, sdk};
use support::unique;

// ---------------------------------------------------------------- helpers

/// Fast waits and retries: moto answers at once.
fn test_config(endpoint: &str) -> AwsConfig {
    AwsConfig {
        endpoint_url: Some(endpoint.to_owned()),
        max_attempts: 5,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        wait: WaitConfig {
            cluster_timeout: Duration::from_secs(30),
            node_group_timeout: Duration::from_secs(30),
            nat_gateway_timeout: Duration::from_secs(30),
            initial_interval: Duration::from_millis(20),
            max_interval: Duration::from_millis(100),
        },
        dependency_timeout: Duration::from_secs(5),
        dependency_backoff: Duration::from_millis(50),
        ..AwsConfig::default()
    }
}

/// moto loads AWS managed policies only when started with
/// `MOTO_IAM_LOAD_MANAGED_POLICIES=true`; otherwise create look-alikes in
/// the account and point the provider at them.
async fn policy_prefix(endpoint: &str) -> Option<String> {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .load()
        .await;
    let iam = aws_sdk_iam::Client::new(&sdk);
    let aws = "arn:aws:iam::aws:policy/AmazonEKSClusterPolicy";
    if iam.get_policy().policy_arn(aws).send().await.is_ok() {
        return None;
    }
    let doc = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"ec2:Describe*","Resource":"*"}]}"#;
    let mut account = None;
    for name in [
        "AmazonEKSClusterPolicy",
        "AmazonEKSWorkerNodePolicy",
        "AmazonEKS_CNI_Policy",
        "AmazonEC2ContainerRegistryReadOnly",
    ] {
        match iam
            .create_policy()
            .policy_name(name)
            .policy_document(doc)
            .send()
            .await
        {
            Ok(out) => {
                let arn = out
                    .policy()
                    .and_then(|p| p.arn())
                    .expect("policy arn")
                    .to_owned();
                account = arn.split(':').nth(4).map(str::to_owned);
            }
            Err(e) => {
                let text = format!("{}", aws_sdk_iam::error::DisplayErrorContext(&e));
                assert!(
                    text.contains("EntityAlreadyExists"),
                    "CreatePolicy {name}: {text}"
                );
            }
        }
    }
    let account = match account {
        Some(a) => a,
        None => {
            let sts = aws_sdk_sts::Client::new(&sdk);
            let me = sts
                .get_caller_identity()
                .send()
                .await
                .expect("GetCallerIdentity");
            me.account().expect("account").to_owned()
        }
    };
    Some(format!("arn:aws:iam::{account}:policy/"))
}

async fn provider_at(endpoint: &str) -> AwsProvider {
    let mut config = test_config(endpoint);
    config.managed_policy_prefix = policy_prefix(&moto_endpoint()).await;
    AwsProvider::with_config(Some("us-east-1".into()), config)
        .await
        .expect("provider")
}

fn platform(name: &str, env: &str) -> Stack {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/platform");
    let mut stack = match mesh::stack::load(&root, Some(env)) {
        Ok(s) => s,
        Err(report) => panic!("stacks/platform --env {env} does not load: {report:?}"),
    };
    stack.name = name.to_owned();
    stack
}

fn scope(stack: &Stack) -> Scope {
    Scope {
        stack: stack.name.clone(),
        env: stack.env.name.clone(),
        root: stack.root.clone(),
    }
}

struct Harness {
    p: AwsProvider,
    cancel_tx: tokio::sync::watch::Sender<bool>,
}

impl Harness {
    async fn new(endpoint: &str) -> Self {
        let (cancel_tx, _) = tokio::sync::watch::channel(false);
        Harness {
            p: provider_at(endpoint).await,
            cancel_tx,
        }
    }

    async fn plan(&self, stack: &Stack, options: &plan::Options) -> Plan {
        let desired = self.p.desired(stack).expect("desired");
        let live = self.p.observe(&scope(stack)).await.expect("observe");
        plan::diff(&stack.name, &stack.env.name, &desired, &live, options)
    }

    async fn apply(&self, stack: &Stack, plan: &Plan) -> Result<(), ProviderError> {
        let ctx = ApplyContext::new(scope(stack), &plan.live, self.cancel_tx.subscribe(), false);
        for c in plan.changes.iter().filter(|c| !c.action.is_noop()) {
            self.p.apply(c, &ctx).await?;
        }
        Ok(())
    }

    async fn destroy(&self, stack: &Stack) {
        let plan = self
            .plan(
                stack,
                &plan::Options {
                    destroy: true,
                    ..Default::default()
                },
            )
            .await;
        self.apply(stack, &plan).await.expect("destroy");
    }
}

fn describe(plan: &Plan) -> String {
    plan.changes
        .iter()
        .filter(|c| !c.action.is_noop())
        .map(|c| {
            let fields: Vec<String> = c
                .fields
                .iter()
                .map(|f| format!("{}: {:?} -> {:?}", f.path, f.before, f.after))
                .collect();
            format!(
                "{} {} [{}]",
                c.action.symbol(),
                c.address,
                fields.join("; ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn changes(plan: &Plan) -> BTreeMap<String, Action> {
    plan.changes
        .iter()
        .filter(|c| !c.action.is_noop())
        .map(|c| (c.address.to_string(), c.action.clone()))
        .collect()
}

fn assert_empty(plan: &Plan, when: &str) {
    assert!(
        !plan.has_changes(),
        "plan after {when} is not empty:\n{}",
        describe(plan)
    );
}

/// The owned route tables of `stack` by `mesh:address`.
async fn route_tables(
    ec2: &aws_sdk_ec2::Client,
    stack: &str,
) -> BTreeMap<String, aws_sdk_ec2::types::RouteTable> {
    let out = ec2
        .describe_route_tables()
        .set_filters(Some(owner_filters(stack)))
        .send()
        .await
        .expect("route tables");
    out.route_tables()
        .iter()
        .filter_map(|t| Some((ec2_tags(t.tags()).get("mesh:address")?.clone(), t.clone())))
        .collect()
}

/// The owned subnets of `stack`: id by subnet name.
async fn subnet_ids(ec2: &aws_sdk_ec2::Client, stack: &str) -> BTreeMap<String, String> {
    let out = ec2
        .describe_subnets()
        .set_filters(Some(owner_filters(stack)))
        .send()
        .await
        .expect("subnets");
    out.subnets()
        .iter()
        .filter_map(|s| {
            let addr = ec2_tags(s.tags()).get("mesh:address")?.clone();
            Some((
                addr.rsplit('.').next()?.to_owned(),
                s.subnet_id()?.to_owned(),
            ))
        })
        .collect()
}

/// Where a route table sends 0.0.0.0/0 (a NAT gateway id), and the subnets associated with it.
fn nat_route(t: &aws_sdk_ec2::types::RouteTable) -> (Option<String>, Vec<String>) {
    let nat = t
        .routes()
        .iter()
        .find(|r| r.destination_cidr_block() == Some("0.0.0.0/0"))
        .and_then(|r| r.nat_gateway_id())
        .map(str::to_owned);
    let mut subnets: Vec<String> = t
        .associations()
        .iter()
        .filter(|a| !a.main().unwrap_or(false))
        .filter_map(|a| a.subnet_id().map(str::to_owned))
        .collect();
    subnets.sort();
    (nat, subnets)
}

fn node_group_mut<'a>(
    stack: &'a mut Stack,
    cluster: &str,
    group: &str,
) -> &'a mut mesh::stack::NodeGroup {
    let c = stack.clusters.get_mut(cluster).expect("cluster");
    let mesh::stack::ClusterKind::Eks(eks) = &mut c.kind else {
        panic!("not eks")
    };
    eks.node_groups
        .iter_mut()
        .find(|g| g.name == group)
        .expect("node group")
}

fn one_line(e: &ProviderError) -> String {
    let s = e.to_string();
    eprintln!("error as shown: {s}");
    assert!(!s.contains('\n'), "error is not one line: {s}");
    assert!(!s.contains("backtrace") && !s.contains("panicked"), "{s}");
    s
}

// ---------------------------------------------------------------- the lifecycle

#[tokio::test]
async fn platform_lifecycle_plan_apply_update_replace_delete_destroy() {
    let endpoint = support::aws::endpoint();
    let h = Harness::new(&endpoint).await;
    let name = unique("plat");
    let mut stack = platform(&name, "dev");

    // 1. Everything is a create.
    let first = h.plan(&stack, &plan::Options::default()).await;
    let creates: Vec<&Change> = first
        .changes
        .iter()
        .filter(|c| c.action == Action::Create)
        .collect();
    let expected = [
        "network.main",
        "network.main.subnet.public-a",
        "network.main.subnet.public-b",
        "network.main.subnet.private-a",
        "network.main.subnet.private-b",
        "network.main.internet_gateway",
        "network.main.route_table.public",
        "network.main.nat_eip.us-east-1a",
        "network.main.nat_gateway.us-east-1a",
        "network.main.route_table.private-us-east-1a",
        "network.main.security_group.cluster",
        "cluster.main.role",
        "cluster.main",
        "cluster.main.addon.vpc-cni",
        "cluster.main.node_role",
        "cluster.main.node_group.general",
        "cluster.main.node_group.scoring",
        "registry.services",
    ];
    let mut got: Vec<&str> = creates.iter().map(|c| c.address.as_str()).collect();
    got.sort();
    let mut want = expected.to_vec();
    want.sort();
    assert_eq!(got, want, "{}", describe(&first));
    assert_eq!(first.changes.len(), expected.len());

    h.apply(&stack, &first).await.expect("apply");

    // 2. Read back with the SDK: tags and settings.
    let sdk = sdk(&endpoint).await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let vpcs = ec2
        .describe_vpcs()
        .set_filters(Some(owner_filters(&name)))
        .send()
        .await
        .expect("vpcs");
    assert_eq!(vpcs.vpcs().len(), 1);
    let vpc = &vpcs.vpcs()[0];
    let tags = ec2_tags(vpc.tags());
    assert_eq!(
        tags.get("mesh:stack").map(String::as_str),
        Some(name.as_str())
    );
    assert_eq!(tags.get("mesh:env").map(String::as_str), Some("dev"));
    assert_eq!(
        tags.get("mesh:address").map(String::as_str),
        Some("network.main")
    );
    assert_eq!(tags.get("team").map(String::as_str), Some("data-platform"));
    assert_eq!(vpc.cidr_block(), Some("10.40.0.0/16"));
    let subnets = ec2
        .describe_subnets()
        .set_filters(Some(owner_filters(&name)))
        .send()
        .await
        .expect("subnets");
    assert_eq!(subnets.subnets().len(), 4);
    let eks_name = names::eks_cluster(&name, "dev", "main");
    for s in subnets.subnets() {
        let t = ec2_tags(s.tags());
        let addr = t.get("mesh:address").cloned().unwrap_or_default();
        if addr.contains("public") {
            assert_eq!(s.map_public_ip_on_launch(), Some(true), "{addr}");
            assert_eq!(
                t.get("kubernetes.io/role/elb").map(String::as_str),
                Some("1"),
                "{addr}"
            );
        } else {
            assert_eq!(s.map_public_ip_on_launch(), Some(false), "{addr}");
            assert_eq!(
                t.get("kubernetes.io/role/internal-elb").map(String::as_str),
                Some("1"),
                "{addr}"
            );
            assert_eq!(
                t.get(&format!("kubernetes.io/cluster/{eks_name}"))
                    .map(String::as_str),
                Some("shared"),
                "{addr}"
            );
        }
    }
    let eks = aws_sdk_eks::Client::new(&sdk);
    let cluster = eks
        .describe_cluster()
        .name(&eks_name)
        .send()
        .await
        .expect("cluster");
    let cluster = cluster.cluster().expect("cluster");
    assert_eq!(cluster.version(), Some("1.31"));
    assert_eq!(cluster.status().map(|s| s.as_str()), Some("ACTIVE"));
    assert_eq!(
        cluster
            .tags()
            .and_then(|t| t.get("mesh:address"))
            .map(String::as_str),
        Some("cluster.main")
    );
    assert_eq!(
        cluster.resources_vpc_config().map(|v| v.subnet_ids().len()),
        Some(2)
    );
    let ng = eks
        .describe_nodegroup()
        .cluster_name(&eks_name)
        .nodegroup_name("general")
        .send()
        .await
        .expect("ng");
    let ng = ng.nodegroup().expect("ng");
    let scaling = ng.scaling_config().expect("scaling");
    assert_eq!(
        (
            scaling.min_size(),
            scaling.max_size(),
            scaling.desired_size()
        ),
        (Some(1), Some(3), Some(2))
    );
    assert_eq!(
        ng.labels()
            .and_then(|l| l.get("workload"))
            .map(String::as_str),
        Some("general")
    );
    assert_eq!(ng.instance_types(), ["m6i.large".to_owned()]);
    assert_eq!(
        ng.tags()
            .and_then(|t| t.get("mesh:stack"))
            .map(String::as_str),
        Some(name.as_str())
    );
    let ecr = aws_sdk_ecr::Client::new(&sdk);
    let repo_name = names::ecr_repository(&name, "dev", "services");
    let repos = ecr
        .describe_repositories()
        .repository_names(&repo_name)
        .send()
        .await
        .expect("repo");
    let repo = &repos.repositories()[0];
    assert_eq!(
        repo.image_scanning_configuration()
            .map(|c| c.scan_on_push()),
        Some(true)
    );
    assert_eq!(
        repo.image_tag_mutability().map(|m| m.as_str()),
        Some("IMMUTABLE")
    );
    let policy = ecr
        .get_lifecycle_policy()
        .repository_name(&repo_name)
        .send()
        .await
        .expect("lifecycle");
    assert!(
        policy
            .lifecycle_policy_text()
            .unwrap_or_default()
            .contains("\"countNumber\":30")
    );
    let repo_tags = ecr
        .list_tags_for_resource()
        .resource_arn(repo.repository_arn().unwrap_or_default())
        .send()
        .await
        .expect("tags");
    assert!(
        repo_tags
            .tags()
            .iter()
            .any(|t| t.key() == "mesh:address" && t.value() == "registry.services")
    );
    let iam = aws_sdk_iam::Client::new(&sdk);
    let role = iam
        .get_role()
        .role_name(names::iam_role(&name, "dev", "main", "node"))
        .send()
        .await
        .expect("role");
    assert!(
        role.role()
            .is_some_and(|r| r.path().ends_with("/cluster.main.node_role/"))
    );
    let attached = iam
        .list_attached_role_policies()
        .role_name(names::iam_role(&name, "dev", "main", "node"))
        .send()
        .await
        .expect("policies");
    assert_eq!(attached.attached_policies().len(), 3);

    // The private subnets' way out: one NAT gateway (the default when a
    // network has private and public subnets) in the first public subnet,
    // with a tagged Elastic IP, and a private route table sending 0.0.0.0/0
    // through it, associated with both private subnets.
    let ids = subnet_ids(&ec2, &name).await;
    let nats = live_nat_gateways(&ec2, &name).await;
    assert_eq!(nats.len(), 1, "{nats:?}");
    let nat = &nats[0];
    let nat_id = nat.nat_gateway_id().expect("nat id");
    assert_eq!(
        nat.state(),
        Some(&aws_sdk_ec2::types::NatGatewayState::Available)
    );
    assert_eq!(
        nat.subnet_id(),
        Some(ids["public-a"].as_str()),
        "the NAT gateway lives in a public subnet"
    );
    assert_eq!(
        nat.connectivity_type(),
        Some(&aws_sdk_ec2::types::ConnectivityType::Public)
    );
    let t = ec2_tags(nat.tags());
    assert_eq!(
        t.get("mesh:address").map(String::as_str),
        Some("network.main.nat_gateway.us-east-1a")
    );
    assert_eq!(t.get("mesh:env").map(String::as_str), Some("dev"));
    assert_eq!(t.get("team").map(String::as_str), Some("data-platform"));
    let allocation = nat
        .nat_gateway_addresses()
        .iter()
        .find_map(|a| a.allocation_id())
        .expect("the NAT gateway has an Elastic IP");
    let eips = ec2
        .describe_addresses()
        .allocation_ids(allocation)
        .send()
        .await
        .expect("eip");
    let eip = &eips.addresses()[0];
    assert_eq!(eip.domain(), Some(&aws_sdk_ec2::types::DomainType::Vpc));
    let t = ec2_tags(eip.tags());
    assert_eq!(t.get("mesh:stack").map(String::as_str), Some(name.as_str()));
    assert_eq!(t.get("mesh:env").map(String::as_str), Some("dev"));
    assert_eq!(
        t.get("mesh:address").map(String::as_str),
        Some("network.main.nat_eip.us-east-1a")
    );
    assert_eq!(t.get("team").map(String::as_str), Some("data-platform"));
    let tables = route_tables(&ec2, &name).await;
    let private = &tables["network.main.route_table.private-us-east-1a"];
    let mut both = vec![ids["private-a"].clone(), ids["private-b"].clone()];
    both.sort();
    assert_eq!(nat_route(private), (Some(nat_id.to_owned()), both));
    let public = &tables["network.main.route_table.public"];
    let (via_nat, mut public_subnets) = nat_route(public);
    assert_eq!(
        via_nat, None,
        "public subnets go out through the internet gateway"
    );
    let mut want = vec![ids["public-a"].clone(), ids["public-b"].clone()];
    want.sort();
    public_subnets.sort();
    assert_eq!(public_subnets, want);

    // 3. Nothing to do.
    assert_empty(
        &h.plan(&stack, &plan::Options::default()).await,
        "the first apply",
    );

    // 4. Scale a node group and change an ECR setting: updates in place.
    {
        let g = node_group_mut(&mut stack, "main", "general");
        g.desired = 3;
        g.max = 4;
    }
    // (Not scan_on_push true → false: the SDK omits `scanOnPush: false` as the
    // default and moto then keeps the old value; AWS applies the default.)
    let reg = stack.registries.get_mut("services").expect("registry");
    reg.immutable_tags = false;
    reg.keep_last = Some(10);
    let p = h.plan(&stack, &plan::Options::default()).await;
    let expected: BTreeMap<String, Action> = [
        ("cluster.main.node_group.general".to_owned(), Action::Update),
        ("registry.services".to_owned(), Action::Update),
    ]
    .into();
    assert_eq!(changes(&p), expected, "{}", describe(&p));
    h.apply(&stack, &p).await.expect("apply updates");
    let ng = eks
        .describe_nodegroup()
        .cluster_name(&eks_name)
        .nodegroup_name("general")
        .send()
        .await
        .expect("ng");
    let scaling = ng
        .nodegroup()
        .and_then(|g| g.scaling_config())
        .expect("scaling");
    assert_eq!(
        (scaling.max_size(), scaling.desired_size()),
        (Some(4), Some(3))
    );
    let repos = ecr
        .describe_repositories()
        .repository_names(&repo_name)
        .send()
        .await
        .expect("repo");
    assert_eq!(
        repos.repositories()[0]
            .image_tag_mutability()
            .map(|m| m.as_str()),
        Some("MUTABLE")
    );
    let policy = ecr
        .get_lifecycle_policy()
        .repository_name(&repo_name)
        .send()
        .await
        .expect("lifecycle");
    assert!(
        policy
            .lifecycle_policy_text()
            .unwrap_or_default()
            .contains("\"countNumber\":10")
    );
    assert_empty(
        &h.plan(&stack, &plan::Options::default()).await,
        "the updates",
    );

    // 5. Drift made by hand shows as updates: a tag removed, a node group scaled, a label changed.
    let vpc_id = vpc.vpc_id().expect("vpc id");
    ec2.delete_tags()
        .resources(vpc_id)
        .tags(aws_sdk_ec2::types::Tag::builder().key("team").build())
        .send()
        .await
        .expect("delete tag");
    eks.update_nodegroup_config()
        .cluster_name(&eks_name)
        .nodegroup_name("scoring")
        .scaling_config(
            aws_sdk_eks::types::NodegroupScalingConfig::builder()
                .min_size(0)
                .max_size(4)
                .desired_size(4)
                .build(),
        )
        .send()
        .await
        .expect("scale by hand");
    let p = h.plan(&stack, &plan::Options::default()).await;
    let expected: BTreeMap<String, Action> = [
        ("network.main".to_owned(), Action::Update),
        ("cluster.main.node_group.scoring".to_owned(), Action::Update),
    ]
    .into();
    assert_eq!(changes(&p), expected, "{}", describe(&p));
    let drift = p
        .changes
        .iter()
        .find(|c| c.address.as_str() == "cluster.main.node_group.scoring")
        .expect("drift");
    assert_eq!(drift.fields.len(), 1, "{}", describe(&p));
    assert_eq!(drift.fields[0].path, "desired");
    assert_eq!(drift.fields[0].before, Some(Value::Int(4)));
    h.apply(&stack, &p).await.expect("repair drift");
    assert_empty(
        &h.plan(&stack, &plan::Options::default()).await,
        "repairing drift",
    );

    // 6. A Kubernetes version upgrade is an update; moto lacks the call: a clear one-line error.
    if let Some(mesh::stack::Cluster {
        kind: mesh::stack::ClusterKind::Eks(e),
        ..
    }) = stack.clusters.get_mut("main")
    {
        e.version = "1.32".into();
    }
    let p = h.plan(&stack, &plan::Options::default()).await;
    assert_eq!(
        changes(&p),
        [("cluster.main".to_owned(), Action::Update)].into(),
        "{}",
        describe(&p)
    );
    let err = h
        .apply(&stack, &p)
        .await
        .expect_err("moto has no UpdateClusterVersion");
    let msg = one_line(&err);
    assert!(
        msg.starts_with("cluster.main: upgrading Kubernetes 1.31 → 1.32: UpdateClusterVersion: "),
        "{msg}"
    );
    assert!(msg.contains("404"), "{msg}");
    if let Some(mesh::stack::Cluster {
        kind: mesh::stack::ClusterKind::Eks(e),
        ..
    }) = stack.clusters.get_mut("main")
    {
        e.version = "1.31".into();
    }

    // 7. A subnet CIDR change replaces the subnet (and re-associates the route table).
    let net = stack.networks.get_mut("main").expect("network");
    let sub = net
        .subnets
        .iter_mut()
        .find(|s| s.name == "public-b")
        .expect("public-b");
    sub.cidr = "10.40.2.0/24".parse().expect("cidr");
    let p = h.plan(&stack, &plan::Options::default()).await;
    let replace = p
        .changes
        .iter()
        .find(|c| c.address.as_str() == "network.main.subnet.public-b")
        .expect("subnet");
    assert_eq!(
        replace.action,
        Action::Replace {
            forced_by: vec!["cidr".into()]
        },
        "{}",
        describe(&p)
    );
    let expected: BTreeMap<String, Action> = [
        (
            "network.main.subnet.public-b".to_owned(),
            Action::Replace {
                forced_by: vec!["cidr".into()],
            },
        ),
        ("network.main.route_table.public".to_owned(), Action::Update),
    ]
    .into();
    assert_eq!(changes(&p), expected, "{}", describe(&p));
    h.apply(&stack, &p).await.expect("replace subnet");
    assert_empty(
        &h.plan(&stack, &plan::Options::default()).await,
        "replacing the subnet",
    );
    let subnets = ec2
        .describe_subnets()
        .set_filters(Some(owner_filters(&name)))
        .send()
        .await
        .expect("subnets");
    let cidrs: Vec<&str> = subnets
        .subnets()
        .iter()
        .filter_map(|s| s.cidr_block())
        .collect();
    assert!(
        cidrs.contains(&"10.40.2.0/24") && !cidrs.contains(&"10.40.1.0/24"),
        "{cidrs:?}"
    );

    // 8. Removing the registry from the stack deletes it.
    stack.registries.clear();
    let p = h.plan(&stack, &plan::Options::default()).await;
    assert_eq!(
        changes(&p),
        [("registry.services".to_owned(), Action::Delete)].into(),
        "{}",
        describe(&p)
    );
    h.apply(&stack, &p).await.expect("delete registry");
    assert_empty(
        &h.plan(&stack, &plan::Options::default()).await,
        "deleting the registry",
    );

    // 9. Load balancers, security groups and interfaces Kubernetes made in the VPC do not block destroy.
    let k8s = kubernetes_leftovers(&endpoint, vpc_id, &eks_name, &name).await;

    // 10. Destroy leaves nothing.
    h.destroy(&stack).await;
    let left = leftovers(&endpoint, &name).await;
    assert!(left.is_empty(), "left after destroy: {left:?}");
    assert!(
        h.p.observe(&scope(&stack))
            .await
            .expect("observe")
            .is_empty()
    );
    k8s.assert_gone(&endpoint).await;
}

/// What a Kubernetes cloud controller leaves in a VPC.
struct K8sLeftovers {
    lb_arn: String,
    group_id: String,
    eni_id: String,
}

async fn kubernetes_leftovers(
    endpoint: &str,
    vpc_id: &str,
    cluster: &str,
    stack: &str,
) -> K8sLeftovers {
    let sdk = sdk(endpoint).await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let subnets = ec2
        .describe_subnets()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("vpc-id")
                .values(vpc_id)
                .build(),
        )
        .send()
        .await
        .expect("subnets");
    let public: Vec<String> = subnets
        .subnets()
        .iter()
        .filter(|s| s.map_public_ip_on_launch() == Some(true))
        .filter_map(|s| s.subnet_id().map(str::to_owned))
        .collect();
    assert_eq!(public.len(), 2, "public subnets of {stack}");
    let sg = ec2
        .create_security_group()
        .group_name(format!("k8s-elb-{stack}"))
        .description("created by the AWS load balancer controller")
        .vpc_id(vpc_id)
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::SecurityGroup)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key(format!("kubernetes.io/cluster/{cluster}"))
                        .value("owned")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .expect("k8s security group");
    let group_id = sg.group_id().expect("group id").to_owned();
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let lb = elb
        .create_load_balancer()
        .name(format!("k8s-{}", &stack[..stack.len().min(20)]))
        .set_subnets(Some(public.clone()))
        .security_groups(&group_id)
        .tags(
            aws_sdk_elasticloadbalancingv2::types::Tag::builder()
                .key(format!("kubernetes.io/cluster/{cluster}"))
                .value("owned")
                .build(),
        )
        .send()
        .await
        .expect("k8s load balancer");
    let lb_arn = lb.load_balancers()[0]
        .load_balancer_arn()
        .expect("arn")
        .to_owned();
    let eni = ec2
        .create_network_interface()
        .subnet_id(&public[0])
        .description("leaked by the VPC CNI")
        .send()
        .await
        .expect("eni");
    let eni_id = eni
        .network_interface()
        .and_then(|n| n.network_interface_id())
        .expect("eni id")
        .to_owned();
    K8sLeftovers {
        lb_arn,
        group_id,
        eni_id,
    }
}

impl K8sLeftovers {
    async fn assert_gone(&self, endpoint: &str) {
        let sdk = sdk(endpoint).await;
        let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
        let lbs = elb.describe_load_balancers().send().await.expect("lbs");
        assert!(
            !lbs.load_balancers()
                .iter()
                .any(|l| l.load_balancer_arn() == Some(self.lb_arn.as_str())),
            "the Kubernetes load balancer survived destroy"
        );
        let ec2 = aws_sdk_ec2::Client::new(&sdk);
        let groups = ec2.describe_security_groups().send().await.expect("sgs");
        assert!(
            !groups
                .security_groups()
                .iter()
                .any(|g| g.group_id() == Some(self.group_id.as_str())),
            "the Kubernetes security group survived destroy"
        );
        let enis = ec2
            .describe_network_interfaces()
            .send()
            .await
            .expect("enis");
        assert!(
            !enis
                .network_interfaces()
                .iter()
                .any(|n| n.network_interface_id() == Some(self.eni_id.as_str())),
            "the leaked network interface survived destroy"
        );
    }
}

#[tokio::test]
async fn prod_environment_plans_its_own_resources() {
    let endpoint = support::aws::endpoint();
    let h = Harness::new(&endpoint).await;
    let name = unique("prod");
    let stack = platform(&name, "prod");
    let p = h.plan(&stack, &plan::Options::default()).await;
    // prod.toml asks for a NAT gateway per zone: two Elastic IPs, NAT gateways and private route tables.
    assert_eq!(p.summary().add, 21, "{}", describe(&p));
    for zone in ["us-east-1a", "us-east-1b"] {
        for kind in ["nat_eip", "nat_gateway"] {
            let addr = format!("network.main.{kind}.{zone}");
            assert!(
                p.changes.iter().any(|c| c.address.as_str() == addr),
                "{addr} is not planned:\n{}",
                describe(&p)
            );
        }
        let table = format!("network.main.route_table.private-{zone}");
        let private = p
            .changes
            .iter()
            .find(|c| c.address.as_str() == table)
            .unwrap_or_else(|| panic!("{table} is not planned:\n{}", describe(&p)));
        let subnets = private
            .desired
            .as_ref()
            .and_then(|d| d.attrs.get("subnets"))
            .map(|a| a.value.clone());
        let Some(Value::Map(subnets)) = subnets else {
            panic!("{table} has no subnets")
        };
        let private_subnet = if zone.ends_with('a') {
            "private-a"
        } else {
            "private-b"
        };
        assert_eq!(subnets.keys().collect::<Vec<_>>(), [private_subnet]);
    }
    let vpc = p
        .changes
        .iter()
        .find(|c| c.address.as_str() == "network.main")
        .expect("vpc");
    let cidr = vpc
        .desired
        .as_ref()
        .and_then(|d| d.attrs.get("cidr"))
        .map(|a| a.value.clone());
    assert_eq!(cidr, Some(Value::str("10.50.0.0/16")));
    let ng = p
        .changes
        .iter()
        .find(|c| c.address.as_str() == "cluster.main.node_group.scoring")
        .expect("ng");
    let desired = ng
        .desired
        .as_ref()
        .and_then(|d| d.attrs.get("desired"))
        .map(|a| a.value.clone());
    assert_eq!(desired, Some(Value::Int(2)));
}

// ---------------------------------------------------------------- NAT gateways

/// The platform's network alone (the cluster and registry are the lifecycle
/// test's business), with the NAT gateway layout `nat`.
fn network_only(name: &str, nat: NatGateways) -> Stack {
    let mut stack = platform(name, "dev");
    stack.clusters.clear();
    stack.registries.clear();
    set_nat(&mut stack, nat);
    stack
}

fn set_nat(stack: &mut Stack, nat: NatGateways) {
    stack.networks.get_mut("main").expect("network").nat_gateway = nat;
}

/// The planned changes of NAT resources (Elastic IPs, NAT gateways, private route tables).
fn nat_changes(plan: &Plan) -> BTreeMap<String, Action> {
    changes(plan)
        .into_iter()
        .filter(|(a, _)| a.contains(".nat_") || a.contains(".route_table.private-"))
        .collect()
}

/// Applies `plan` the way `mesh apply` does: the engine's graph walk, independent changes in parallel.
async fn apply_in_parallel(endpoint: &str, stack: &Stack, plan: &Plan) {
    let provider: Arc<dyn Provider> = Arc::new(provider_at(endpoint).await);
    let providers = BTreeMap::from([(ProviderId::Aws, provider)]);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let ctx = Arc::new(ApplyContext::new(scope(stack), &plan.live, rx, false));
    let report = mesh::apply::apply(
        plan,
        &providers,
        ctx,
        &mesh::apply::Options { parallelism: 8 },
    )
    .await;
    assert!(report.succeeded(), "{report:?}");
}

async fn owned_addresses(ec2: &aws_sdk_ec2::Client, stack: &str) -> Vec<String> {
    let out = ec2
        .describe_addresses()
        .set_filters(Some(owner_filters(stack)))
        .send()
        .await
        .expect("addresses");
    out.addresses()
        .iter()
        .filter_map(|a| a.allocation_id().map(str::to_owned))
        .collect()
}

/// `per_zone` gives each zone its own NAT gateway and routes each private
/// subnet through its zone's; a NAT gateway whose subnet is replaced is
/// replaced with it and keeps its address; `single` keeps zone a's (and its
/// public IP) for both; `none` removes them and leaves the private subnets
/// without a route out.
#[tokio::test]
async fn nat_gateways_per_zone_single_and_none() {
    let endpoint = moto_endpoint();
    let proxy = FaultProxy::start(&endpoint);
    let h = Harness::new(&proxy.endpoint()).await;
    let name = unique("nat");
    let mut stack = network_only(&name, NatGateways::PerZone);
    let sdk = sdk(&endpoint).await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);

    // 1. per_zone: two of everything.
    let p = h.plan(&stack, &plan::Options::default()).await;
    let expected: BTreeMap<String, Action> = [
        "network.main.nat_eip.us-east-1a",
        "network.main.nat_eip.us-east-1b",
        "network.main.nat_gateway.us-east-1a",
        "network.main.nat_gateway.us-east-1b",
        "network.main.route_table.private-us-east-1a",
        "network.main.route_table.private-us-east-1b",
    ]
    .into_iter()
    .map(|a| (a.to_owned(), Action::Create))
    .collect();
    assert_eq!(nat_changes(&p), expected, "{}", describe(&p));
    h.apply(&stack, &p).await.expect("apply per_zone");
    let ids = subnet_ids(&ec2, &name).await;
    let nats = live_nat_gateways(&ec2, &name).await;
    assert_eq!(nats.len(), 2, "{nats:?}");
    let nat_in = |subnet: &str| {
        nats.iter()
            .find(|g| g.subnet_id() == Some(ids[subnet].as_str()))
            .unwrap_or_else(|| panic!("no NAT gateway in {subnet}: {nats:?}"))
    };
    let (nat_a, nat_b) = (nat_in("public-a"), nat_in("public-b"));
    let allocation = |g: &aws_sdk_ec2::types::NatGateway| {
        g.nat_gateway_addresses()
            .iter()
            .find_map(|a| a.allocation_id().map(str::to_owned))
    };
    assert_ne!(allocation(nat_a), allocation(nat_b), "one Elastic IP each");
    let allocation_a = allocation(nat_a);
    let nat_a_id = nat_a.nat_gateway_id().expect("id").to_owned();
    let nat_b_id = nat_b.nat_gateway_id().expect("id").to_owned();
    let tables = route_tables(&ec2, &name).await;
    assert_eq!(
        nat_route(&tables["network.main.route_table.private-us-east-1a"]),
        (Some(nat_a_id.clone()), vec![ids["private-a"].clone()])
    );
    assert_eq!(
        nat_route(&tables["network.main.route_table.private-us-east-1b"]),
        (Some(nat_b_id.clone()), vec![ids["private-b"].clone()])
    );
    assert_eq!(owned_addresses(&ec2, &name).await.len(), 2);
    assert_empty(&h.plan(&stack, &plan::Options::default()).await, "per_zone");

    // 2. Zone a's public subnet gets a new CIDR: the subnet is replaced, and
    // the NAT gateway in it with it (in the new subnet, with the same Elastic
    // IP); the Elastic IP stays. AWS refuses to delete a subnet a NAT gateway
    // lives in: the proxy answers the first DeleteSubnet as AWS would.
    let net = stack.networks.get_mut("main").expect("network");
    net.subnets
        .iter_mut()
        .find(|s| s.name == "public-a")
        .expect("public-a")
        .cidr = "10.40.3.0/24".parse().expect("cidr");
    let p = h.plan(&stack, &plan::Options::default()).await;
    let replaced = |by: &str| Action::Replace {
        forced_by: vec![by.to_owned()],
    };
    let expected: BTreeMap<String, Action> = [
        ("network.main.subnet.public-a", replaced("cidr")),
        ("network.main.nat_gateway.us-east-1a", replaced("subnet_id")),
        ("network.main.route_table.public", Action::Update),
        (
            "network.main.route_table.private-us-east-1a",
            Action::Update,
        ),
    ]
    .into_iter()
    .map(|(a, x)| (a.to_owned(), x))
    .collect();
    assert_eq!(changes(&p), expected, "{}", describe(&p));
    let dependency_violation = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>DependencyViolation</Code><Message>The subnet has dependencies and cannot be deleted.</Message></Error></Errors><RequestID>r</RequestID></Response>";
    proxy.respond("DeleteSubnet", 1, 400, "text/xml", dependency_violation);
    h.apply(&stack, &p).await.expect("replace the subnet");
    assert_eq!(
        proxy.count("DeleteSubnet"),
        2,
        "retried after the NAT gateway went"
    );
    let ids = subnet_ids(&ec2, &name).await;
    let nats = live_nat_gateways(&ec2, &name).await;
    assert_eq!(nats.len(), 2, "{nats:?}");
    let moved = nats
        .iter()
        .find(|g| g.subnet_id() == Some(ids["public-a"].as_str()))
        .expect("a NAT gateway in the new public-a");
    assert_ne!(moved.nat_gateway_id(), Some(nat_a_id.as_str()));
    assert_eq!(
        allocation(moved),
        allocation_a,
        "the NAT gateway kept its address"
    );
    let nat_a_id = moved.nat_gateway_id().expect("id").to_owned();
    let tables = route_tables(&ec2, &name).await;
    assert_eq!(
        nat_route(&tables["network.main.route_table.private-us-east-1a"]),
        (Some(nat_a_id.clone()), vec![ids["private-a"].clone()])
    );
    assert_eq!(owned_addresses(&ec2, &name).await.len(), 2);
    assert_empty(
        &h.plan(&stack, &plan::Options::default()).await,
        "replacing the subnet",
    );

    // 3. single: zone a's NAT gateway stays and takes private-b over; zone b's go.
    set_nat(&mut stack, NatGateways::Single);
    let p = h.plan(&stack, &plan::Options::default()).await;
    let expected: BTreeMap<String, Action> = [
        (
            "network.main.route_table.private-us-east-1a",
            Action::Update,
        ),
        (
            "network.main.route_table.private-us-east-1b",
            Action::Delete,
        ),
        ("network.main.nat_gateway.us-east-1b", Action::Delete),
        ("network.main.nat_eip.us-east-1b", Action::Delete),
    ]
    .into_iter()
    .map(|(a, x)| (a.to_owned(), x))
    .collect();
    assert_eq!(changes(&p), expected, "{}", describe(&p));
    h.apply(&stack, &p).await.expect("apply single");
    let nats = live_nat_gateways(&ec2, &name).await;
    let left: Vec<&str> = nats.iter().filter_map(|g| g.nat_gateway_id()).collect();
    assert_eq!(left, [nat_a_id.as_str()]);
    let tables = route_tables(&ec2, &name).await;
    assert!(!tables.contains_key("network.main.route_table.private-us-east-1b"));
    let mut both = vec![ids["private-a"].clone(), ids["private-b"].clone()];
    both.sort();
    assert_eq!(
        nat_route(&tables["network.main.route_table.private-us-east-1a"]),
        (Some(nat_a_id.clone()), both)
    );
    assert_eq!(owned_addresses(&ec2, &name).await.len(), 1);
    assert_empty(&h.plan(&stack, &plan::Options::default()).await, "single");

    // 4. none, applied by the engine (the deletes run in parallel: the
    // address is released only once the NAT gateway is gone).
    set_nat(&mut stack, NatGateways::None);
    let p = h.plan(&stack, &plan::Options::default()).await;
    let expected: BTreeMap<String, Action> = [
        "network.main.route_table.private-us-east-1a",
        "network.main.nat_gateway.us-east-1a",
        "network.main.nat_eip.us-east-1a",
    ]
    .into_iter()
    .map(|a| (a.to_owned(), Action::Delete))
    .collect();
    assert_eq!(changes(&p), expected, "{}", describe(&p));
    apply_in_parallel(&endpoint, &stack, &p).await;
    assert!(live_nat_gateways(&ec2, &name).await.is_empty());
    assert!(owned_addresses(&ec2, &name).await.is_empty());
    let tables = route_tables(&ec2, &name).await;
    assert_eq!(
        tables.keys().collect::<Vec<_>>(),
        ["network.main.route_table.public"]
    );
    // The private subnets fall back to the VPC's main table, which has no way out.
    let vpc_id = tables["network.main.route_table.public"]
        .vpc_id()
        .expect("vpc")
        .to_owned();
    let all = ec2
        .describe_route_tables()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("vpc-id")
                .values(&vpc_id)
                .build(),
        )
        .send()
        .await
        .expect("route tables");
    for t in all.route_tables() {
        let (_, subnets) = nat_route(t);
        for private in ["private-a", "private-b"] {
            assert!(
                !subnets.contains(&ids[private]),
                "{private} is still associated with {:?}",
                t.route_table_id()
            );
        }
        let main = t.associations().iter().any(|a| a.main().unwrap_or(false));
        if main {
            assert!(
                !t.routes()
                    .iter()
                    .any(|r| r.destination_cidr_block() == Some("0.0.0.0/0")),
                "the main table routes out: {t:?}"
            );
        }
    }
    assert_empty(&h.plan(&stack, &plan::Options::default()).await, "none");

    // 5. Back to the default, and destroyed by the engine with a NAT gateway in place.
    set_nat(&mut stack, NatGateways::Single);
    let p = h.plan(&stack, &plan::Options::default()).await;
    assert_eq!(nat_changes(&p).len(), 3, "{}", describe(&p));
    h.apply(&stack, &p).await.expect("apply single again");
    assert_eq!(live_nat_gateways(&ec2, &name).await.len(), 1);
    let destroy = h
        .plan(
            &stack,
            &plan::Options {
                destroy: true,
                ..Default::default()
            },
        )
        .await;
    apply_in_parallel(&endpoint, &stack, &destroy).await;
    let left = leftovers(&endpoint, &name).await;
    assert!(left.is_empty(), "left after destroy: {left:?}");
}

/// Right after `CreateNatGateway`, describe calls may not see the NAT
/// gateway yet: the waiter keeps polling instead of failing.
#[tokio::test]
async fn nat_gateway_create_waits_until_it_is_visible() {
    let proxy = FaultProxy::start(&moto_endpoint());
    let h = Harness::new(&proxy.endpoint()).await;
    let stack = network_only(&unique("natw"), NatGateways::Single);
    let p = h.plan(&stack, &plan::Options::default()).await;
    let empty = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><DescribeNatGatewaysResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>r</requestId><natGatewaySet/></DescribeNatGatewaysResponse>";
    proxy.respond("DescribeNatGateways", 2, 200, "text/xml", empty);
    h.apply(&stack, &p).await.expect("apply");
    assert_eq!(proxy.count("CreateNatGateway"), 1);
    assert!(
        proxy.count("DescribeNatGateways") >= 3,
        "DescribeNatGateways polled {} times",
        proxy.count("DescribeNatGateways")
    );
    assert_empty(&h.plan(&stack, &plan::Options::default()).await, "waiting");
    h.destroy(&stack).await;
    let left = leftovers(&moto_endpoint(), &stack.name).await;
    assert!(left.is_empty(), "left after destroy: {left:?}");
}

// ---------------------------------------------------------------- waiters, retries, throttling

/// A network and a cluster with one node group, no registry.
fn small(name: &str) -> Stack {
    let mut stack = platform(name, "dev");
    stack.registries.clear();
    if let Some(mesh::stack::Cluster {
        kind: mesh::stack::ClusterKind::Eks(e),
        ..
    }) = stack.clusters.get_mut("main")
    {
        e.node_groups.retain(|g| g.name == "general");
    }
    stack
}

#[tokio::test]
async fn waits_for_cluster_and_node_group_to_become_active_and_gone() {
    let proxy = FaultProxy::start(&moto_endpoint());
    let h = Harness::new(&proxy.endpoint()).await;
    let stack = small(&unique("wait"));
    proxy.rewrite_status("DescribeCluster", 3, "ACTIVE", "CREATING");
    proxy.rewrite_status("DescribeNodegroup", 2, "ACTIVE", "CREATING");
    let p = h.plan(&stack, &plan::Options::default()).await;
    h.apply(&stack, &p).await.expect("apply through CREATING");
    assert_eq!(proxy.count("CreateCluster"), 1);
    assert!(
        proxy.count("DescribeCluster") >= 4,
        "DescribeCluster polled {} times",
        proxy.count("DescribeCluster")
    );
    assert!(
        proxy.count("DescribeNodegroup") >= 3,
        "DescribeNodegroup polled {} times",
        proxy.count("DescribeNodegroup")
    );
    assert_empty(&h.plan(&stack, &plan::Options::default()).await, "waiting");

    // Deleting: the cluster answers DELETING twice before it is gone.
    proxy.reset();
    let eks_name = names::eks_cluster(&stack.name, "dev", "main");
    let deleting = format!(r#"{{"cluster":{{"name":"{eks_name}","status":"DELETING"}}}}"#);
    let destroy = h
        .plan(
            &stack,
            &plan::Options {
                destroy: true,
                ..Default::default()
            },
        )
        .await;
    // Program the answers only once the destroy plan has observed the live cluster.
    proxy.respond("DescribeCluster", 2, 200, "application/json", deleting);
    h.apply(&stack, &destroy).await.expect("destroy");
    assert_eq!(proxy.count("DeleteCluster"), 1);
    assert!(
        proxy.count("DescribeCluster") >= 3,
        "DescribeCluster polled {} times",
        proxy.count("DescribeCluster")
    );
    assert!(leftovers(&moto_endpoint(), &stack.name).await.is_empty());
}

#[tokio::test]
async fn ctrl_c_stops_a_wait_and_a_rerun_picks_it_up() {
    let proxy = std::sync::Arc::new(FaultProxy::start(&moto_endpoint()));
    let h = Harness::new(&proxy.endpoint()).await;
    let mut stack = small(&unique("intr"));
    if let Some(mesh::stack::Cluster {
        kind: mesh::stack::ClusterKind::Eks(e),
        ..
    }) = stack.clusters.get_mut("main")
    {
        e.node_groups.clear();
    }
    // The cluster stays CREATING until the faults are cleared.
    proxy.rewrite_status("DescribeCluster", 10_000, "ACTIVE", "CREATING");
    let p = h.plan(&stack, &plan::Options::default()).await;
    // Ctrl-C arrives while the cluster is being waited for.
    let tx = h.cancel_tx.clone();
    let watcher = proxy.clone();
    let interrupt = tokio::spawn(async move {
        while watcher.count("DescribeCluster") < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = tx.send(true);
    });
    let err = h.apply(&stack, &p).await.expect_err("interrupted");
    interrupt.await.expect("interrupt task");
    assert!(
        matches!(err, ProviderError::Interrupted { ref address } if address.as_str() == "cluster.main"),
        "{err}"
    );
    assert_eq!(proxy.count("CreateCluster"), 1);

    // The rerun observes the cluster still CREATING: an update of `status` that only waits.
    h.cancel_tx.send_replace(false);
    let p = h.plan(&stack, &plan::Options::default()).await;
    let c = p
        .changes
        .iter()
        .find(|c| c.address.as_str() == "cluster.main")
        .expect("cluster");
    assert_eq!(c.action, Action::Update, "{}", describe(&p));
    assert_eq!(
        c.fields.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        ["status"]
    );
    proxy.clear_faults();
    proxy.rewrite_status("DescribeCluster", 2, "ACTIVE", "CREATING");
    h.apply(&stack, &p).await.expect("rerun waits");
    assert_eq!(
        proxy.count("CreateCluster"),
        1,
        "the rerun must not create again"
    );
    assert_empty(
        &h.plan(&stack, &plan::Options::default()).await,
        "the rerun",
    );
    h.destroy(&stack).await;
    assert!(leftovers(&moto_endpoint(), &stack.name).await.is_empty());
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried() {
    let proxy = FaultProxy::start(&moto_endpoint());
    let h = Harness::new(&proxy.endpoint()).await;
    let stack = small(&unique("thr"));
    let p = h.plan(&stack, &plan::Options::default()).await;
    h.apply(&stack, &p).await.expect("apply");
    proxy.reset();

    proxy.throttle("DescribeVpcs", 3);
    proxy.server_error("DescribeSubnets", 2);
    proxy.service_unavailable("DescribeRouteTables", 1);
    proxy.throttle("ListRoles", 2);
    proxy.throttle("ListClusters", 2);
    proxy.server_error("DescribeCluster", 1);
    proxy.throttle("DescribeRepositories", 2);
    let started = std::time::Instant::now();
    let again = h.plan(&stack, &plan::Options::default()).await;
    assert_empty(&again, "throttled observe");
    assert_eq!(proxy.count("DescribeVpcs"), 4);
    assert_eq!(proxy.count("DescribeSubnets"), 3);
    assert_eq!(proxy.count("DescribeRouteTables"), 2);
    assert_eq!(proxy.count("ListRoles"), 3);
    assert_eq!(proxy.count("ListClusters"), 3);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    // A throttled write is retried too.
    proxy.reset();
    let mut changed = stack.clone();
    node_group_mut(&mut changed, "main", "general").desired = 3;
    let p = h.plan(&changed, &plan::Options::default()).await;
    proxy.throttle("UpdateNodegroupConfig", 2);
    h.apply(&changed, &p).await.expect("throttled update");
    assert_eq!(proxy.count("UpdateNodegroupConfig"), 3);
    h.destroy(&changed).await;
}

#[tokio::test]
async fn too_much_throttling_fails_with_the_code_and_address() {
    let proxy = FaultProxy::start(&moto_endpoint());
    let h = Harness::new(&proxy.endpoint()).await;
    let mut stack = small(&unique("thx"));
    stack.clusters.clear();
    let p = h.plan(&stack, &plan::Options::default()).await;
    proxy.throttle("CreateVpc", 100);
    let err = h.apply(&stack, &p).await.expect_err("throttled for good");
    let msg = one_line(&err);
    assert!(
        msg.starts_with("network.main: CreateVpc: RequestLimitExceeded"),
        "{msg}"
    );
    assert_eq!(proxy.count("CreateVpc"), 5, "max_attempts");
}

#[tokio::test]
async fn permanent_errors_fail_fast_with_the_aws_code_and_the_address() {
    let proxy = FaultProxy::start(&moto_endpoint());
    let h = Harness::new(&proxy.endpoint()).await;
    let mut stack = small(&unique("bad"));
    stack.clusters.clear();
    // A subnet outside the VPC's CIDR (the stack parser refuses this; the API must too).
    let net = stack.networks.get_mut("main").expect("network");
    net.subnets[0].cidr = "10.99.0.0/24".parse().expect("cidr");
    let p = h.plan(&stack, &plan::Options::default()).await;
    let err = h.apply(&stack, &p).await.expect_err("invalid subnet");
    let msg = one_line(&err);
    assert!(
        msg.starts_with("network.main.subnet.public-a: CreateSubnet: InvalidSubnet.Range"),
        "{msg}"
    );
    assert_eq!(
        proxy.count("CreateSubnet"),
        1,
        "a validation error is not retried"
    );
    h.destroy(&stack).await;
    assert!(leftovers(&moto_endpoint(), &stack.name).await.is_empty());
}

// ---------------------------------------------------------------- setup errors: one clear line each

#[tokio::test]
async fn rejected_credentials_give_one_clear_line() {
    let proxy = FaultProxy::start(&moto_endpoint());
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>AuthFailure</Code><Message>AWS was not able to validate the provided access credentials</Message></Error></Errors><RequestID>r</RequestID></Response>";
    proxy.respond("*", 100, 401, "text/xml", body);
    let p = AwsProvider::with_config(Some("us-east-1".into()), test_config(&proxy.endpoint()))
        .await
        .expect("provider");
    let stack = small(&unique("cred"));
    let err = p.observe(&scope(&stack)).await.expect_err("rejected");
    let msg = one_line(&err);
    assert!(msg.contains("AuthFailure"), "{msg}");
    assert!(msg.contains("credentials were rejected"), "{msg}");
}

#[tokio::test]
async fn unreachable_endpoint_gives_one_clear_line() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let mut config = test_config(&format!("http://{addr}"));
    config.max_attempts = 2;
    let p = AwsProvider::with_config(Some("us-east-1".into()), config)
        .await
        .expect("provider");
    let stack = small(&unique("unr"));
    let started = std::time::Instant::now();
    let err = p.observe(&scope(&stack)).await.expect_err("unreachable");
    let msg = one_line(&err);
    assert!(msg.contains("cannot reach the AWS endpoint"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// Runs this test binary again with a scrubbed AWS environment, for the
/// cases that depend on the process environment (missing region, missing
/// credentials); returns the child's stdout.
fn run_child(case: &str, remove: &[&str], endpoint: &str) -> String {
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "--exact",
        "setup_error_child",
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd.env("MESH_AWS_SETUP_CASE", case)
        .env("MESH_AWS_SETUP_ENDPOINT", endpoint);
    for v in remove {
        cmd.env_remove(v);
    }
    cmd.env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    cmd.env("AWS_EC2_METADATA_DISABLED", "true");
    let out = cmd.output().expect("run child");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Helper of `missing_region_and_credentials_give_one_clear_line`: does
/// nothing unless run by it (with `MESH_AWS_SETUP_CASE` set).
#[tokio::test]
async fn setup_error_child() {
    let Ok(case) = std::env::var("MESH_AWS_SETUP_CASE") else {
        return;
    };
    let endpoint = std::env::var("MESH_AWS_SETUP_ENDPOINT").unwrap_or_default();
    let mut config = test_config(&endpoint);
    config.max_attempts = 1;
    let result = match case.as_str() {
        "region" => AwsProvider::with_config(None, config).await.map(|_| ()),
        _ => match AwsProvider::with_config(Some("us-east-1".into()), config).await {
            Ok(p) => p
                .observe(&Scope {
                    stack: "x".into(),
                    env: "dev".into(),
                    root: ".".into(),
                })
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => println!("RESULT: ok"),
        Err(e) => println!("RESULT: {e}"),
    }
}

#[test]
fn missing_region_and_credentials_give_one_clear_line() {
    let endpoint = moto_endpoint();
    let all = [
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ENDPOINT_URL",
    ];
    let region = run_child("region", &all, &endpoint);
    let line = result_line(&region);
    assert!(line.contains("no AWS region"), "{line}");

    let creds = [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ];
    let out = run_child("credentials", &creds, &endpoint);
    let line = result_line(&out);
    assert!(
        line.contains("no usable AWS credentials") || line.contains("no AWS credentials"),
        "{line}"
    );
}

fn result_line(stdout: &str) -> String {
    let lines: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once("RESULT: ").map(|(_, r)| r))
        .collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let line = lines[0].to_owned();
    eprintln!("error as shown: {line}");
    assert_ne!(line, "ok", "expected an error");
    line
}

// ---------------------------------------------------------------- observe cost

#[tokio::test]
async fn observe_makes_a_handful_of_calls_per_kind() {
    let proxy = FaultProxy::start(&moto_endpoint());
    let h = Harness::new(&proxy.endpoint()).await;
    let stack = platform(&unique("cost"), "dev");
    let p = h.plan(&stack, &plan::Options::default()).await;
    h.apply(&stack, &p).await.expect("apply");
    proxy.reset();
    let live = h.p.observe(&scope(&stack)).await.expect("observe");
    assert_eq!(live.len(), 18);
    let calls = proxy.calls();
    let total = proxy.total_requests();
    // 7 EC2 describes (NAT gateways and addresses included), ListRoles + 2
    // ListAttachedRolePolicies, ListClusters + DescribeCluster + ListNodegroups
    // + 2 DescribeNodegroup + ListAddons + DescribeAddon,
    // DescribeSecurityGroupRules, DescribeRepositories + 2 per repository.
    assert!(total <= 21, "{total} calls: {calls:?}");
    assert_eq!(proxy.count("DescribeNatGateways"), 1, "{calls:?}");
    assert_eq!(proxy.count("DescribeAddresses"), 1, "{calls:?}");
    h.destroy(&stack).await;
}

// ---------------------------------------------------------------- images and clusters for the Kubernetes provider

/// Push credentials come from ECR's `GetAuthorizationToken` (decoded, the
/// host from `proxyEndpoint`) and are fetched once per provider; a cluster
/// that does not exist gives no access (and no error), so objects on it plan
/// as creates.
#[tokio::test]
async fn registry_credentials_and_access_to_a_cluster_not_yet_created() {
    let h = Harness::new(&moto_endpoint()).await;
    let sdk = sdk(&moto_endpoint()).await;
    let account = aws_sdk_sts::Client::new(&sdk)
        .get_caller_identity()
        .send()
        .await
        .expect("GetCallerIdentity")
        .account()
        .expect("account")
        .to_owned();
    let ecr_calls = |p: &AwsProvider| {
        p.api_calls()
            .into_iter()
            .find(|(s, _)| *s == mesh::provider::aws::Service::Ecr)
            .map(|(_, n)| n)
            .unwrap_or(0)
    };
    let before = ecr_calls(&h.p);
    let c = h.p.registry_credentials().await.expect("credentials");
    assert_eq!(c.user, "AWS");
    assert_eq!(c.password, format!("{account}-auth-token"));
    assert_eq!(c.host, format!("{account}.dkr.ecr.us-east-1.amazonaws.com"));
    assert!(mesh::provider::aws::is_ecr_host(&c.host));
    assert!(
        !format!("{c:?}").contains(&c.password),
        "Debug hides the password"
    );
    let again = h.p.registry_credentials().await.expect("credentials");
    assert_eq!(again.password, c.password);
    assert_eq!(ecr_calls(&h.p) - before, 1, "one GetAuthorizationToken");

    let missing = names::eks_cluster(&unique("nocluster"), "dev", "main");
    assert!(
        h.p.kube_access(&missing).await.expect("no error").is_none(),
        "a cluster that does not exist gives no access"
    );
}

/// The stack's registry keeps the last N images of each service that pushes
/// to it (one lifecycle rule per service), and a new service shows as an
/// update of the policy.
#[tokio::test]
async fn the_registry_keeps_the_last_images_of_each_service() {
    let h = Harness::new(&moto_endpoint()).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
    let mut stack = mesh::stack::load(&root, Some("dev")).unwrap_or_else(|r| panic!("{r:?}"));
    stack.name = unique("ecr");
    // Only the registry: the network and cluster are the lifecycle test's business.
    stack.networks.clear();
    stack.clusters.clear();
    let reg_name = stack.env.registry.clone().expect("dev names a registry");
    let first = h.plan(&stack, &plan::Options::default()).await;
    let reg = first
        .changes
        .iter()
        .find(|c| c.address.as_str() == format!("registry.{reg_name}"))
        .expect("registry planned");
    assert_eq!(reg.action, Action::Create);
    h.apply(&stack, &first).await.expect("apply");

    let sdk = sdk(&moto_endpoint()).await;
    let ecr = aws_sdk_ecr::Client::new(&sdk);
    let repo_name = names::ecr_repository(&stack.name, "dev", &reg_name);
    let policy = ecr
        .get_lifecycle_policy()
        .repository_name(&repo_name)
        .send()
        .await
        .expect("lifecycle");
    let policy: serde_json::Value =
        serde_json::from_str(policy.lifecycle_policy_text().unwrap_or_default()).expect("json");
    let prefixes: Vec<String> = policy["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter_map(|r| {
            r["selection"]["tagPrefixList"][0]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(prefixes, ["customer-features.", "customer-scoring."]);
    assert_empty(&h.plan(&stack, &plan::Options::default()).await, "apply");

    // A third service: the policy gains its rule.
    let extra = stack.services["customer-features"].clone();
    stack.services.insert("customer-extra".into(), extra);
    let second = h.plan(&stack, &plan::Options::default()).await;
    let changed: Vec<(&str, Action)> = second
        .changes
        .iter()
        .filter(|c| c.address.as_str().starts_with("registry."))
        .map(|c| (c.address.as_str(), c.action.clone()))
        .collect();
    assert_eq!(
        changed,
        [(format!("registry.{reg_name}").as_str(), Action::Update)]
    );
    h.apply(&stack, &second).await.expect("update");
    assert_empty(&h.plan(&stack, &plan::Options::default()).await, "update");
    h.destroy(&stack).await;
}

// ---------------------------------------------------------------- NodePorts on EKS

/// The customer mesh's `dev` environment (EKS from `modules/aws-platform`)
/// named `name`: its NodePorts are `customer-features` 30080 (allowed:
/// the service `customer-scoring` only) and `customer-scoring` 30081
/// (allowed: `0.0.0.0/0`).
fn customer_mesh(name: &str) -> Stack {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
    let mut stack = mesh::stack::load(&root, Some("dev"))
        .unwrap_or_else(|r| panic!("stacks/customer-mesh --env dev does not load: {r:?}"));
    stack.name = name.to_owned();
    stack
}

/// `port → sorted CIDRs` the node security group `group` lets in, read with the SDK.
async fn open_ports(ec2: &aws_sdk_ec2::Client, group: &str) -> BTreeMap<i32, Vec<String>> {
    let out = ec2
        .describe_security_group_rules()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("group-id")
                .values(group)
                .build(),
        )
        .send()
        .await
        .expect("DescribeSecurityGroupRules");
    let mut open: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for r in out.security_group_rules() {
        if r.is_egress() == Some(true) || r.ip_protocol() == Some("-1") {
            continue;
        }
        let (from, to) = (r.from_port().unwrap_or(-1), r.to_port().unwrap_or(-1));
        for port in [30080, 30081] {
            if from <= port && port <= to {
                open.entry(port)
                    .or_default()
                    .push(r.cidr_ipv4().unwrap_or_default().to_owned());
            }
        }
    }
    open.values_mut().for_each(|v| v.sort());
    open
}

#[tokio::test]
async fn nodeports_open_the_node_security_group_only_to_the_allowed_cidrs() {
    let endpoint = support::aws::endpoint();
    let h = Harness::new(&endpoint).await;
    let name = unique("np");
    let mut stack = customer_mesh(&name);
    let vpc_cidr = stack.networks["platform"].cidr.to_string();
    let vpc_key = vpc_cidr.replace('.', "-").replace('/', "_");

    let p = h.plan(&stack, &plan::Options::default()).await;
    let planned = changes(&p);
    let features_rule = format!("expose.customer-features.node_port_rule.{vpc_key}");
    let scoring_rule = "expose.customer-scoring.node_port_rule.0-0-0-0_0";
    for a in [features_rule.as_str(), scoring_rule] {
        assert_eq!(planned.get(a), Some(&Action::Create), "{}", describe(&p));
    }
    assert_eq!(
        planned
            .keys()
            .filter(|a| a.contains(".node_port_rule."))
            .count(),
        2,
        "one rule per allowed CIDR; a service name needs none: {}",
        describe(&p)
    );
    h.apply(&stack, &p).await.expect("apply");
    assert_empty(&h.plan(&stack, &plan::Options::default()).await, "apply");

    // Read back: the node security group is the cluster's (moto creates no
    // EKS cluster security group, so the one mesh gives the cluster).
    let live = h.p.observe(&scope(&stack)).await.expect("observe");
    let group = live
        .iter()
        .find(|l| l.address.as_str() == "cluster.platform")
        .and_then(|l| l.outputs.get("node_security_group"))
        .and_then(Value::as_str)
        .expect("the cluster's node security group")
        .to_owned();
    assert!(group.starts_with("sg-"), "{group}");
    let ec2 = aws_sdk_ec2::Client::new(&sdk(&endpoint).await);
    assert_eq!(
        open_ports(&ec2, &group).await,
        BTreeMap::from([
            (30080, vec![vpc_cidr.clone()]),
            (30081, vec!["0.0.0.0/0".to_owned()]),
        ]),
        "callers named by service get the VPC's CIDR alone; a CIDR opens to itself"
    );

    // `allow` changes: the rules follow, created and deleted one by one.
    let scoring = stack.exposes.get_mut("customer-scoring").expect("expose");
    scoring.allow = ["203.0.113.0/24", "198.51.100.0/24"]
        .iter()
        .map(|c| mesh::stack::Caller::Cidr(c.parse().unwrap()))
        .collect();
    let p = h.plan(&stack, &plan::Options::default()).await;
    assert_eq!(
        changes(&p),
        BTreeMap::from([
            (
                "expose.customer-scoring.node_port_rule.198-51-100-0_24".to_owned(),
                Action::Create
            ),
            (
                "expose.customer-scoring.node_port_rule.203-0-113-0_24".to_owned(),
                Action::Create
            ),
            (scoring_rule.to_owned(), Action::Delete),
        ]),
        "{}",
        describe(&p)
    );
    h.apply(&stack, &p).await.expect("apply allow change");
    assert_eq!(
        open_ports(&ec2, &group).await,
        BTreeMap::from([
            (30080, vec![vpc_cidr.clone()]),
            (
                30081,
                vec!["198.51.100.0/24".to_owned(), "203.0.113.0/24".to_owned()]
            ),
        ])
    );

    // Drift: a rule revoked by hand is planned again.
    let rule = live
        .iter()
        .find(|l| l.address.as_str() == features_rule)
        .expect("the features rule")
        .id
        .clone();
    ec2.revoke_security_group_ingress()
        .group_id(&group)
        .security_group_rule_ids(&rule)
        .send()
        .await
        .expect("RevokeSecurityGroupIngress");
    let p = h.plan(&stack, &plan::Options::default()).await;
    assert_eq!(
        changes(&p),
        BTreeMap::from([(features_rule.clone(), Action::Create)]),
        "{}",
        describe(&p)
    );
    h.apply(&stack, &p).await.expect("apply drift");
    assert_eq!(open_ports(&ec2, &group).await[&30080], vec![vpc_cidr]);

    h.destroy(&stack).await;
    let left = leftovers(&moto_endpoint(), &name).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}
