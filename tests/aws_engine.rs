//! The `aws` target through the real `mesh` binary (both cloud features):
//! the engine puts the AWS provider (against the moto server at
//! `MESH_TEST_AWS_ENDPOINT`) and the Kubernetes provider for the
//! environment's EKS cluster side by side. Before the cluster exists, the
//! whole stack plans: network, cluster and registry as creates, and every
//! Kubernetes object as a create whose image is known after apply. Once it
//! exists, moto's cluster cannot be reached (its endpoint and CA are random):
//! destroy removes the cloud resources all the same, and says the cluster's
//! objects go with it. Two runs on two machines (two copies of a stack) share
//! the lock in the account (a DynamoDB table).
#![cfg(all(feature = "aws", feature = "kubernetes"))]

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use aws_fault_proxy::{FaultProxy, moto_endpoint};
use serde_json::Value;
use support::aws::{customer_mesh_named, endpoint, leftovers, platform_named};
use support::{show, stand_in_runtime, stderr, stdout, unique};

/// `mesh ARGS` against the AWS endpoint `endpoint` (moto, or a proxy in front of it).
fn mesh(args: &[&str], endpoint: &str, runtime: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh"));
    support::aws::point_at(&mut cmd, endpoint);
    cmd.args(args)
        .env("MESH_RUNTIME_STATIC_BIN", runtime)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null());
    cmd
}

fn run(args: &[&str], endpoint: &str, runtime: &Path) -> Output {
    mesh(args, endpoint, runtime).output().unwrap()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

#[test]
fn an_aws_environment_plans_cloud_and_cluster_objects_before_the_cluster_exists() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("cm{}", std::process::id());
    let stack = customer_mesh_named(dir.path(), &name);
    let runtime = stand_in_runtime(dir.path());

    let out = run(
        &[
            "plan",
            stack.to_str().unwrap(),
            "--env",
            "dev",
            "--json",
            "--detailed-exitcode",
        ],
        &endpoint(),
        &runtime,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    let plan: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("plan --json is not JSON ({e}): {stderr}"));
    let changes: BTreeMap<&str, &Value> = plan["resource_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["address"].as_str().unwrap(), c))
        .collect();
    let action = |a: &str| {
        changes
            .get(a)
            .unwrap_or_else(|| panic!("{a} is not in the plan: {:?}", changes.keys()))["action"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    for a in [
        "network.platform",
        "cluster.platform",
        "cluster.platform.node_group.general",
        "registry.platform",
        "service.customer-features.deployment",
        "service.customer-scoring.deployment",
        "expose.customer-features.network_policy",
        "expose.customer-scoring.service",
    ] {
        assert_eq!(action(a), "create", "{a}");
    }
    assert_eq!(action(&format!("namespace.{name}")), "create");
    assert_eq!(
        changes["service.customer-features.deployment"]["provider"],
        "kubernetes"
    );
    assert_eq!(changes["registry.platform"]["provider"], "aws");

    let field = |a: &str, path: &str| -> Value {
        changes[a]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"] == path)
            .cloned()
            .unwrap_or_else(|| panic!("{a} has no field {path}: {}", changes[a]))
    };
    // The image goes to the registry this plan creates: its URL is known after apply.
    let repo = field("service.customer-features.deployment", "image_repository");
    assert_eq!(repo["after_unknown"], true, "{repo}");
    let digest = field("service.customer-features.deployment", "image_digest");
    assert!(
        digest["after"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{digest}"
    );
    // One lifecycle rule per service that pushes to the registry.
    assert_eq!(
        field("registry.platform", "keep_last_per")["after"],
        serde_json::json!(["customer-features", "customer-scoring"])
    );
}

/// The cloud part of a customer-mesh copy, applied through the binary:
/// network, EKS cluster (with its node group and roles) and registry.
fn apply_cloud_part(stack: &Path, runtime: &Path) {
    let out = run(
        &[
            "apply",
            stack.to_str().unwrap(),
            "--env",
            "dev",
            "--auto-approve",
            "--target",
            "network.platform",
            "--target",
            "cluster.platform",
            "--target",
            "registry.platform",
        ],
        &endpoint(),
        runtime,
    );
    assert!(out.status.success(), "apply: {}", show(&out));
}

#[tokio::test]
async fn destroy_removes_the_cloud_resources_when_the_cluster_cannot_be_reached() {
    let dir = tempfile::tempdir().unwrap();
    let name = unique("cu");
    let stack = customer_mesh_named(dir.path(), &name);
    let runtime = stand_in_runtime(dir.path());
    apply_cloud_part(&stack, &runtime);
    assert!(!leftovers(&moto_endpoint(), &name).await.is_empty());

    // The cluster exists, but its API cannot be reached (moto's endpoint and
    // CA are random): its objects cannot be listed, let alone deleted.
    let path = stack.to_str().unwrap();

    // `mesh output` shows the cloud's outputs all the same, as the SDK reads them.
    let out = run(
        &["output", path, "--env", "dev", "--json"],
        &endpoint(),
        &runtime,
    );
    assert!(out.status.success(), "output: {}", show(&out));
    assert!(stderr(&out).contains("not read"), "{}", show(&out));
    let outputs: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", show(&out)));
    let sdk = support::aws::sdk(&moto_endpoint()).await;
    let eks_name = mesh::provider::aws::names::eks_cluster(&name, "dev", "platform");
    let eks = aws_sdk_eks::Client::new(&sdk)
        .describe_cluster()
        .name(&eks_name)
        .send()
        .await
        .expect("DescribeCluster")
        .cluster
        .expect("cluster");
    let cluster = &outputs["clusters"]["platform"];
    assert_eq!(cluster["name"], eks_name, "{outputs:#}");
    assert_eq!(cluster["endpoint"], eks.endpoint().unwrap(), "{outputs:#}");
    assert_eq!(cluster["arn"], eks.arn().unwrap(), "{outputs:#}");
    let repo_name = mesh::provider::aws::names::ecr_repository(&name, "dev", "platform");
    let repos = aws_sdk_ecr::Client::new(&sdk)
        .describe_repositories()
        .repository_names(&repo_name)
        .send()
        .await
        .expect("DescribeRepositories");
    let registry = &outputs["registries"]["platform"];
    assert_eq!(
        registry["url"],
        repos.repositories()[0].repository_uri().unwrap(),
        "{outputs:#}"
    );
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let tagged = |k: &str, v: &str| {
        aws_sdk_ec2::types::Filter::builder()
            .name(format!("tag:{k}"))
            .values(v)
            .build()
    };
    let vpcs = ec2
        .describe_vpcs()
        .filters(tagged("mesh:stack", &name))
        .send()
        .await
        .expect("DescribeVpcs");
    let network = &outputs["networks"]["platform"];
    assert_eq!(
        network["vpc_id"],
        vpcs.vpcs()[0].vpc_id().unwrap(),
        "{outputs:#}"
    );
    assert_eq!(network["cidr"], "10.40.0.0/16", "{outputs:#}");
    for subnet in ["public-a", "public-b"] {
        let found = ec2
            .describe_subnets()
            .filters(tagged(
                "mesh:address",
                &format!("network.platform.subnet.{subnet}"),
            ))
            .filters(tagged("mesh:stack", &name))
            .send()
            .await
            .expect("DescribeSubnets");
        assert_eq!(
            network["subnet_ids"][subnet],
            found.subnets()[0].subnet_id().unwrap(),
            "{outputs:#}"
        );
    }
    let igws = ec2
        .describe_internet_gateways()
        .filters(tagged("mesh:stack", &name))
        .send()
        .await
        .expect("DescribeInternetGateways");
    assert_eq!(
        network["internet_gateway_id"],
        igws.internet_gateways()[0].internet_gateway_id().unwrap(),
        "{outputs:#}"
    );
    assert_eq!(outputs["modules"]["platform"]["registry"], "platform");
    // One value, bare.
    let out = run(
        &["output", path, "--env", "dev", "registry.platform.url"],
        &endpoint(),
        &runtime,
    );
    assert!(out.status.success(), "output NAME: {}", show(&out));
    assert_eq!(
        stdout(&out),
        format!("{}\n", registry["url"].as_str().unwrap())
    );
    let plan = run(
        &["plan", path, "--env", "dev", "--destroy", "--json"],
        &endpoint(),
        &runtime,
    );
    assert!(plan.status.success(), "plan --destroy: {}", show(&plan));
    let json: Value = serde_json::from_slice(&plan.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", show(&plan)));
    let abandoned = &json["abandoned"];
    assert_eq!(abandoned["cluster"], "cluster.platform", "{json}");
    assert_eq!(abandoned["cluster_exists"], true, "{json}");
    assert!(
        abandoned["reason"]
            .as_str()
            .is_some_and(|r| r.contains("cannot be reached")),
        "{json}"
    );
    let objects: Vec<&str> = abandoned["objects"]
        .as_array()
        .unwrap_or_else(|| panic!("no abandoned objects: {json}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        objects.contains(&"service.customer-scoring.deployment"),
        "{objects:?}"
    );

    let out = run(
        &["destroy", path, "--env", "dev", "--auto-approve"],
        &endpoint(),
        &runtime,
    );
    assert!(out.status.success(), "destroy: {}", show(&out));
    let text = show(&out);
    assert!(
        stderr(&out).contains("cannot be reached"),
        "says why the cluster's objects were not read: {text}"
    );
    assert!(
        stdout(&out).contains("not deleted one by one")
            && stderr(&out).contains("not deleted one by one"),
        "plan and stderr say the objects go with the cluster: {text}"
    );
    assert!(
        stdout(&out).contains("service.customer-scoring.deployment"),
        "names the abandoned objects: {text}"
    );
    let left = leftovers(&moto_endpoint(), &name).await;
    assert!(left.is_empty(), "left behind: {left:?}\n{text}");
}

#[tokio::test]
async fn destroy_removes_the_cloud_resources_after_the_cluster_was_deleted_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let name = unique("cd");
    let stack = customer_mesh_named(dir.path(), &name);
    let runtime = stand_in_runtime(dir.path());
    apply_cloud_part(&stack, &runtime);

    // Someone deletes the node group and the cluster in the console.
    let sdk = support::aws::sdk(&moto_endpoint()).await;
    let eks = aws_sdk_eks::Client::new(&sdk);
    let cluster = mesh::provider::aws::names::eks_cluster(&name, "dev", "platform");
    let groups = eks
        .list_nodegroups()
        .cluster_name(&cluster)
        .send()
        .await
        .expect("ListNodegroups");
    for g in groups.nodegroups() {
        eks.delete_nodegroup()
            .cluster_name(&cluster)
            .nodegroup_name(g)
            .send()
            .await
            .expect("DeleteNodegroup");
    }
    eks.delete_cluster()
        .name(&cluster)
        .send()
        .await
        .expect("DeleteCluster");

    let out = run(
        &[
            "destroy",
            stack.to_str().unwrap(),
            "--env",
            "dev",
            "--auto-approve",
        ],
        &endpoint(),
        &runtime,
    );
    let text = show(&out);
    assert!(out.status.success(), "destroy: {text}");
    assert!(
        stderr(&out).contains("cluster.platform no longer exists")
            && stdout(&out).contains("not deleted one by one"),
        "says the cluster's objects went with it: {text}"
    );
    let left = leftovers(&moto_endpoint(), &name).await;
    assert!(left.is_empty(), "left behind: {left:?}\n{text}");
}

/// Waits (at most a minute) until `proxy` has seen `n` calls of `action` from `child`.
fn wait_for_calls(proxy: &FaultProxy, action: &str, n: usize, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.count(action) < n {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("the run ended ({status}) before calling {action}: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "no {action} call within a minute"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lock item of `stack`/`env` in the account's lock table, if any.
async fn lock_item(stack: &str, env: &str) -> Option<BTreeMap<String, String>> {
    let sdk = support::aws::sdk(&moto_endpoint()).await;
    let ddb = aws_sdk_dynamodb::Client::new(&sdk);
    let out = ddb
        .get_item()
        .table_name("mesh-locks")
        .key(
            "id",
            aws_sdk_dynamodb::types::AttributeValue::S(format!("{stack}/{env}")),
        )
        .consistent_read(true)
        .send()
        .await
        .expect("GetItem mesh-locks");
    out.item().map(|item| {
        item.iter()
            .map(|(k, v)| {
                let v = match v {
                    aws_sdk_dynamodb::types::AttributeValue::S(s) => s.clone(),
                    aws_sdk_dynamodb::types::AttributeValue::N(n) => n.clone(),
                    other => format!("{other:?}"),
                };
                (k.clone(), v)
            })
            .collect()
    })
}

/// Writes the lock item of `stack`/`env` as another machine's run would.
async fn put_foreign_lock(stack: &str, env: &str, host: &str, expires: u64) {
    use aws_sdk_dynamodb::types::AttributeValue::{N, S};
    let sdk = support::aws::sdk(&moto_endpoint()).await;
    let ddb = aws_sdk_dynamodb::Client::new(&sdk);
    let holder = serde_json::json!({
        "pid": 4242, "host": host, "command": "mesh apply", "since": 1_795_000_000u64,
    });
    ddb.put_item()
        .table_name("mesh-locks")
        .item("id", S(format!("{stack}/{env}")))
        .item("holder", S(holder.to_string()))
        .item("token", S("foreign".into()))
        .item("expires", N(expires.to_string()))
        .send()
        .await
        .expect("PutItem mesh-locks");
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn two_machines_applying_a_cloud_only_stack_share_the_lock_in_the_account() {
    let name = unique("pl");
    // Two checkouts of the same stack (two machines): their lock files differ.
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (
        platform_named(one.path(), &name),
        platform_named(two.path(), &name),
    );
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let runtime = stand_in_runtime(one.path());
    let moto = moto_endpoint();
    // B's runs: straight through the proxy the tests share (the add-on API is simulated there).
    let aws = endpoint();
    let host = hostname();

    // A goes through a proxy that holds it once it reads live state, i.e.
    // while it holds the lock.
    let proxy = FaultProxy::start(&moto);
    proxy.hold("DescribeVpcs");
    let mut first = mesh(
        &["apply", a, "--env", "dev", "--auto-approve"],
        &proxy.endpoint(),
        &runtime,
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    wait_for_calls(&proxy, "DescribeVpcs", 1, &mut first);
    let item = lock_item(&name, "dev")
        .await
        .expect("A holds the lock item");
    assert!(
        item["holder"].contains(&format!("\"pid\":{}", first.id())),
        "{item:?}"
    );

    // B, on the other machine, is refused and told who holds the lock.
    let refused = run(
        &["apply", b, "--env", "dev", "--auto-approve"],
        &aws,
        &runtime,
    );
    let text = show(&refused);
    assert_eq!(refused.status.code(), Some(1), "{text}");
    for part in [
        format!("stack {name} (environment dev) is locked"),
        "`mesh apply`".to_owned(),
        format!("pid {} on {host}", first.id()),
        "since 20".to_owned(),
        "mesh-locks".to_owned(),
        format!("mesh unlock {b} --env dev"),
    ] {
        assert!(stderr(&refused).contains(&part), "missing {part:?}: {text}");
    }
    assert!(
        leftovers(&moto, &name).await.is_empty(),
        "B changed nothing: {text}"
    );

    // A runs to the end and gives the lock back.
    proxy.release("DescribeVpcs");
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "A: {}", show(&first));
    assert!(!leftovers(&moto, &name).await.is_empty());
    assert_eq!(lock_item(&name, "dev").await, None, "released at the end");
    let again = run(
        &["apply", b, "--env", "dev", "--auto-approve"],
        &aws,
        &runtime,
    );
    assert!(again.status.success(), "B after A: {}", show(&again));
    assert!(stdout(&again).contains("No changes"), "{}", show(&again));

    // A destroy killed while it holds the lock: its lock stays, and says
    // that its process is gone; `mesh unlock` breaks it, naming it.
    proxy.hold("DescribeVpcs");
    let seen = proxy.count("DescribeVpcs");
    let mut killed = mesh(
        &["destroy", a, "--env", "dev", "--auto-approve"],
        &proxy.endpoint(),
        &runtime,
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    wait_for_calls(&proxy, "DescribeVpcs", seen + 1, &mut killed);
    let killed_pid = killed.id();
    killed.kill().unwrap();
    killed.wait().unwrap();
    let refused = run(
        &["destroy", b, "--env", "dev", "--auto-approve"],
        &aws,
        &runtime,
    );
    let text = show(&refused);
    assert_eq!(refused.status.code(), Some(1), "{text}");
    assert!(
        stderr(&refused).contains(&format!("`mesh destroy` (pid {killed_pid} on {host})"))
            && stderr(&refused).contains("no longer running")
            && stderr(&refused).contains("lapses at"),
        "{text}"
    );
    let unlocked = run(&["unlock", b, "--env", "dev"], &aws, &runtime);
    assert!(unlocked.status.success(), "{}", show(&unlocked));
    assert!(
        stderr(&unlocked).contains(&format!(
            "Broke the shared lock held by `mesh destroy` (pid {killed_pid} on {host})"
        )),
        "{}",
        show(&unlocked)
    );
    let destroyed = run(
        &["destroy", b, "--env", "dev", "--auto-approve"],
        &aws,
        &runtime,
    );
    assert!(destroyed.status.success(), "{}", show(&destroyed));
    let left = leftovers(&moto, &name).await;
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(lock_item(&name, "dev").await, None);

    // Another machine's lock: refused while it is renewed; taken over once it lapsed.
    put_foreign_lock(&name, "dev", "ci-runner-7", now() + 600).await;
    let refused = run(
        &["destroy", b, "--env", "dev", "--auto-approve"],
        &aws,
        &runtime,
    );
    let text = show(&refused);
    assert_eq!(refused.status.code(), Some(1), "{text}");
    assert!(
        stderr(&refused)
            .contains("`mesh apply` (pid 4242 on ci-runner-7) since 2026-11-18T11:06:40Z")
            && !stderr(&refused).contains("no longer running"),
        "{text}"
    );
    put_foreign_lock(&name, "dev", "ci-runner-7", now() - 1).await;
    let taken = run(
        &["destroy", b, "--env", "dev", "--auto-approve"],
        &aws,
        &runtime,
    );
    let text = show(&taken);
    assert!(taken.status.success(), "{text}");
    assert!(
        stderr(&taken).contains("lapsed") && stderr(&taken).contains("pid 4242 on ci-runner-7"),
        "says whose lapsed lock it took over: {text}"
    );
    assert_eq!(lock_item(&name, "dev").await, None);
}

/// Every EKS cluster mesh creates gets the VPC CNI add-on with its
/// network-policy agent on, so the NetworkPolicies written from `allow`
/// are enforced. moto does not serve the add-on API: the fault proxy
/// answers those calls (simulated, see `aws_fault_proxy::addons`).
#[tokio::test]
async fn eks_clusters_get_the_vpc_cni_with_network_policy_and_its_drift_is_an_update() {
    let dir = tempfile::tempdir().unwrap();
    let name = unique("np");
    let stack = platform_named(dir.path(), &name);
    let path = stack.to_str().unwrap();
    let runtime = stand_in_runtime(dir.path());
    let proxy = FaultProxy::start(&moto_endpoint());
    let ep = proxy.endpoint();
    let addon_address = "cluster.main.addon.vpc-cni";

    let plan = run(&["plan", path, "--env", "dev", "--json"], &ep, &runtime);
    assert!(plan.status.success(), "plan: {}", show(&plan));
    let json: Value = serde_json::from_slice(&plan.stdout).unwrap();
    let planned = json["resource_changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["address"] == addon_address)
        .unwrap_or_else(|| panic!("{addon_address} is not planned: {json}"));
    assert_eq!(planned["action"], "create", "{planned}");
    assert_eq!(planned["type"], "aws_eks_addon", "{planned}");

    let out = run(
        &["apply", path, "--env", "dev", "--auto-approve"],
        &ep,
        &runtime,
    );
    assert!(out.status.success(), "apply: {}", show(&out));

    // Read back through the SDK (and the proxy).
    let eks = aws_sdk_eks::Client::new(&support::aws::sdk(&ep).await);
    let cluster = mesh::provider::aws::names::eks_cluster(&name, "dev", "main");
    let describe = || async {
        eks.describe_addon()
            .cluster_name(&cluster)
            .addon_name("vpc-cni")
            .send()
            .await
    };
    let addon = describe()
        .await
        .expect("DescribeAddon")
        .addon
        .expect("addon");
    assert_eq!(addon.status().map(|s| s.as_str()), Some("ACTIVE"));
    assert_eq!(
        addon.configuration_values(),
        Some(r#"{"enableNetworkPolicy":"true"}"#)
    );
    assert_eq!(
        addon
            .tags()
            .and_then(|t| t.get("mesh:address"))
            .map(String::as_str),
        Some(addon_address)
    );

    // Someone turns network policy off by hand: the plan shows an update of the add-on alone.
    eks.update_addon()
        .cluster_name(&cluster)
        .addon_name("vpc-cni")
        .configuration_values(r#"{"enableNetworkPolicy":"false"}"#)
        .send()
        .await
        .expect("UpdateAddon");
    let plan = run(
        &[
            "plan",
            path,
            "--env",
            "dev",
            "--json",
            "--detailed-exitcode",
        ],
        &ep,
        &runtime,
    );
    assert_eq!(plan.status.code(), Some(2), "plan: {}", show(&plan));
    let json: Value = serde_json::from_slice(&plan.stdout).unwrap();
    let changed: Vec<&Value> = json["resource_changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["action"] != "no-op")
        .collect();
    assert_eq!(changed.len(), 1, "only the add-on drifted: {changed:?}");
    assert_eq!(changed[0]["address"], addon_address);
    assert_eq!(changed[0]["action"], "update");
    let field = changed[0]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "configuration")
        .unwrap_or_else(|| panic!("no configuration field: {}", changed[0]));
    assert_eq!(field["before"], r#"{"enableNetworkPolicy":"false"}"#);
    assert_eq!(field["after"], r#"{"enableNetworkPolicy":"true"}"#);
    assert_eq!(field["forces_replacement"], false, "{field}");

    let before = proxy.count("UpdateAddon");
    let out = run(
        &["apply", path, "--env", "dev", "--auto-approve"],
        &ep,
        &runtime,
    );
    assert!(out.status.success(), "apply: {}", show(&out));
    assert_eq!(proxy.count("UpdateAddon"), before + 1, "updated in place");
    assert_eq!(proxy.count("CreateAddon"), 1, "not created again");
    let addon = describe()
        .await
        .expect("DescribeAddon")
        .addon
        .expect("addon");
    assert_eq!(
        addon.configuration_values(),
        Some(r#"{"enableNetworkPolicy":"true"}"#)
    );

    // Destroy deletes the add-on, then the cluster.
    let out = run(
        &["destroy", path, "--env", "dev", "--auto-approve"],
        &ep,
        &runtime,
    );
    assert!(out.status.success(), "destroy: {}", show(&out));
    let err = describe().await.expect_err("the add-on is gone");
    assert_eq!(
        aws_sdk_eks::error::ProvideErrorMetadata::code(&err),
        Some("ResourceNotFoundException"),
        "{err:?}"
    );
    let calls: Vec<String> = proxy.calls().into_iter().map(|c| c.action).collect();
    let at = |a: &str| calls.iter().position(|c| c == a);
    assert!(
        at("DeleteAddon").is_some() && at("DeleteAddon") < at("DeleteCluster"),
        "the add-on is deleted before the cluster: {calls:?}"
    );
    let left = leftovers(&moto_endpoint(), &name).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}
