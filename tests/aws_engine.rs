//! The `aws` target through the real `mesh` binary (both cloud features):
//! the engine puts the AWS provider (against the moto server at
//! `MESH_TEST_AWS_ENDPOINT`) and the Kubernetes provider for the
//! environment's EKS cluster side by side. Before the cluster exists, the
//! whole stack plans: network, cluster and registry as creates, and every
//! Kubernetes object as a create whose image is known after apply.
#![cfg(all(feature = "aws", feature = "kubernetes"))]

mod support;

use std::collections::BTreeMap;

use aws_fault_proxy::moto_endpoint;
use serde_json::Value;

#[test]
fn an_aws_environment_plans_cloud_and_cluster_objects_before_the_cluster_exists() {
    let dir = tempfile::tempdir().unwrap();
    let stack = support::copy_customer_mesh(dir.path());
    // A name of its own: moto's state is shared by every test.
    let name = format!("cm{}", std::process::id());
    let file = stack.join("stack.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace("name = \"customer-mesh\"", &format!("name = \"{name}\"")),
    )
    .unwrap();
    let runtime = dir.path().join("mesh-runtime");
    std::fs::write(&runtime, b"#!/bin/sh\n# stand-in runtime\n").unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(["plan", stack.to_str().unwrap(), "--env", "dev"])
        .args(["--json", "--detailed-exitcode"])
        .env("AWS_ENDPOINT_URL", moto_endpoint())
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_PROFILE")
        .env("MESH_RUNTIME_STATIC_BIN", &runtime)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
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
