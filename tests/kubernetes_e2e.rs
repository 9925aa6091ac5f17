//! End to end on the `kubernetes` target, over the real `mesh` binary: the
//! example stack's `existing` environment against the Kubernetes API test
//! double (`tests/kube-double`, run in-process, reached through a kubeconfig
//! file) and the real OCI registry on loopback (`MESH_TEST_REGISTRY`, started
//! by `scripts/services start`).
//!
//! Pods never run here, so the images carry a small stand-in for the runtime
//! binary (`MESH_RUNTIME_STATIC_BIN`); building real runtime images is
//! `tests/image.rs`'s business.
#![cfg(feature = "kubernetes")]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Output;

mod support;

use kube_double::{KubeDouble, Rollout};
use serde_json::{Value, json};

const STACK: &str = "customer-mesh";
const NS: &str = "customer-mesh";

fn registry() -> String {
    support::test_registry()
}

/// A copy of the example stack, a double, and a kubeconfig pointing at it.
struct Cluster {
    dir: tempfile::TempDir,
    stack: PathBuf,
    double: KubeDouble,
    registry: String,
}

impl Cluster {
    async fn new() -> Cluster {
        // A repository path of its own: tests run side by side.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let registry = format!("{}/mesh-e2e-{}-{n}", registry(), std::process::id());
        let dir = tempfile::tempdir().unwrap();
        support::copy_customer_mesh(dir.path());
        let double = KubeDouble::start().await;
        std::fs::write(dir.path().join("kubeconfig"), double.kubeconfig_yaml("e2e")).unwrap();
        // A small stand-in for the runtime binary: the double runs no pods.
        std::fs::write(
            dir.path().join("mesh-runtime"),
            b"#!/bin/sh\n# stand-in runtime for kubernetes_e2e\n",
        )
        .unwrap();
        let stack = dir.path().join("stacks/customer-mesh");
        Cluster {
            dir,
            stack,
            double,
            registry,
        }
    }

    async fn mesh_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.command(args, env).output().await.unwrap()
    }

    /// `mesh ARGS` pointed at the double, with `env` added.
    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh"));
        cmd.args(args)
            .env("KUBECONFIG", self.dir.path().join("kubeconfig"))
            .env("MESH_KUBE_CONTEXT", "e2e")
            .env("MESH_REGISTRY", &self.registry)
            .env(
                "MESH_RUNTIME_STATIC_BIN",
                self.dir.path().join("mesh-runtime"),
            )
            .env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    async fn run(&self, verb: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let stack = self.stack.to_str().unwrap().to_owned();
        let mut args = vec![verb, stack.as_str(), "--env", "existing"];
        args.extend_from_slice(extra);
        self.mesh_env(&args, env).await
    }

    async fn apply(&self, env: &[(&str, &str)]) -> Output {
        self.run("apply", &["--auto-approve"], env).await
    }

    async fn plan_json(&self, env: &[(&str, &str)]) -> (i32, Value, Output) {
        let out = self
            .run("plan", &["--json", "--detailed-exitcode"], env)
            .await;
        let code = out.status.code().unwrap_or(-1);
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("plan --json is not JSON ({e}):\n{}", text(&out)));
        (code, v, out)
    }

    fn object(&self, api_version: &str, kind: &str, name: &str) -> Value {
        self.double
            .object(api_version, kind, NS, name)
            .unwrap_or_else(|| panic!("{kind} {NS}/{name} does not exist in the double"))
    }

    fn edit(&self, rel: &str, f: impl FnOnce(String) -> String) {
        let p = self.dir.path().join(rel);
        let s = std::fs::read_to_string(&p).unwrap();
        let t = f(s.clone());
        assert_ne!(s, t, "editing {rel} changed nothing");
        std::fs::write(p, t).unwrap();
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed: {}", text(out));
}

/// address → action of every change that is not a no-op.
fn changes(plan: &Value) -> Vec<(String, String)> {
    support::local::changed_addresses(plan)
}

/// `GET http://HOST:PORT/PATH` with an `Accept` header; the status code.
fn http_get_status(host_port: &str, path: &str, accept: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(host_port)
        .unwrap_or_else(|e| panic!("cannot reach the registry at {host_port}: {e}"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host_port}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

const EVERY_OBJECT: &[&str] = &[
    "namespace.customer-mesh",
    "digest_key.stack",
    "identity.operator",
    "identity.customer-features",
    "identity.customer-scoring",
    "verifiers.callers",
    "service.customer-features.deployment",
    "service.customer-features.hpa",
    "service.customer-scoring.deployment",
    "service.customer-scoring.hpa",
    "expose.customer-features.service",
    "expose.customer-features.network_policy",
    "expose.customer-scoring.service",
    "expose.customer-scoring.network_policy",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_apply_change_and_destroy_on_an_existing_cluster() {
    let c = Cluster::new().await;

    // Nothing applied yet: `mesh output` says so and exits 3.
    let out = c.run("output", &[], &[]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is applied in environment `existing`"),
        "{}",
        text(&out)
    );

    // Plan: every object is a create.
    let (code, plan, out) = c.plan_json(&[]).await;
    assert_eq!(code, 2, "{}", text(&out));
    let got: BTreeSet<(String, String)> = changes(&plan).into_iter().collect();
    let want: BTreeSet<(String, String)> = EVERY_OBJECT
        .iter()
        .map(|a| (a.to_string(), "create".to_string()))
        .collect();
    assert_eq!(got, want);

    // Apply, then the objects are there with the fields mesh set.
    let out = c.apply(&[]).await;
    ok(&out, "apply");
    let owned = c
        .double
        .objects_with_label(&format!("mesh.dev/stack={STACK}"));
    assert!(owned.len() >= EVERY_OBJECT.len(), "{owned:#?}");

    // `mesh output` lists each exposure with its URL and node port.
    let out = c.run("output", &["--json"], &[]).await;
    ok(&out, "output");
    let urls: Value = serde_json::from_slice(&out.stdout).expect("output --json");
    let scoring = &urls["exposes"]["customer-scoring"];
    assert!(
        scoring["url"]
            .as_str()
            .is_some_and(|u| u.starts_with("http://")),
        "{urls}"
    );
    assert_eq!(scoring["node_port"], 30081, "{urls}");
    assert!(
        scoring["endpoints"]["high-value"]
            .as_str()
            .is_some_and(|u| u.ends_with("/public/api/v1/customer-scoring/high-value/predict")),
        "{urls}"
    );
    // The Service's cluster IP as the double assigned it.
    let service = c.object("v1", "Service", "customer-scoring");
    assert_eq!(
        scoring["cluster_ip"], service["spec"]["clusterIP"],
        "{urls}"
    );
    // The cluster: the API server the kubeconfig names, and its context.
    let cluster = &urls["clusters"]["existing"];
    assert_eq!(
        cluster["endpoint"],
        c.double.url().trim_end_matches('/'),
        "{urls}"
    );
    assert_eq!(cluster["context"], "e2e", "{urls}");
    // Callers of the restricted customer-features need a key: the
    // operator's is in a Secret that exists.
    let secret = urls["exposes"]["customer-features"]["api_key_secret"]
        .as_str()
        .unwrap_or_else(|| panic!("no api_key_secret: {urls}"));
    let (ns, name) = secret.split_once('/').unwrap();
    assert!(
        c.double.object("v1", "Secret", ns, name).is_some(),
        "{secret}"
    );
    assert!(scoring["api_key_secret"].is_null(), "open to all: {urls}");
    // One value, bare, for scripts.
    for (name, want) in [
        ("expose.customer-scoring.node_port", "30081\n".to_owned()),
        (
            "expose.customer-scoring.url",
            format!("{}\n", scoring["url"].as_str().unwrap()),
        ),
        (
            "cluster.existing.endpoint",
            format!("{}\n", cluster["endpoint"].as_str().unwrap()),
        ),
    ] {
        let out = c.run("output", &[name], &[]).await;
        ok(&out, name);
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{name}");
    }

    let dep = c.object("apps/v1", "Deployment", "customer-features");
    let labels = &dep["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/managed-by"], "mesh");
    assert_eq!(labels["mesh.dev/stack"], STACK);
    assert_eq!(labels["mesh.dev/env"], "existing");
    assert_eq!(
        dep["metadata"]["annotations"]["mesh.dev/address"],
        "service.customer-features.deployment"
    );
    let image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap()
        .to_owned();
    let (repository, digest) = image
        .split_once('@')
        .unwrap_or_else(|| panic!("image {image} is not pinned by digest"));
    assert_eq!(
        repository,
        format!("{}/customer-mesh-customer-features", c.registry)
    );
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    // The image is in the registry.
    let (host, path) = repository.split_once('/').unwrap();
    assert_eq!(
        http_get_status(
            host,
            &format!("/v2/{path}/manifests/{digest}"),
            "application/vnd.oci.image.manifest.v1+json"
        ),
        200
    );
    // The autoscaler owns the replica count (min 1).
    assert_eq!(dep["spec"]["replicas"], 1);
    assert_eq!(
        c.object(
            "autoscaling/v2",
            "HorizontalPodAutoscaler",
            "customer-features"
        )["spec"]["minReplicas"],
        1
    );
    let probe = &dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(probe["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(probe["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(dep["spec"]["strategy"]["type"], "RollingUpdate");

    let svc = c.object("v1", "Service", "customer-features");
    assert_eq!(svc["spec"]["type"], "NodePort");
    assert_eq!(svc["spec"]["ports"][0]["nodePort"], 30080);
    assert_eq!(
        c.object("v1", "Service", "customer-scoring")["spec"]["ports"][0]["nodePort"],
        30081
    );

    let np = c.object("networking.k8s.io/v1", "NetworkPolicy", "customer-features");
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"]["mesh.dev/service"],
        "customer-features"
    );
    let from = &np["spec"]["ingress"][0]["from"];
    assert_eq!(from.as_array().unwrap().len(), 1, "{np:#}");
    assert_eq!(
        from[0]["podSelector"]["matchLabels"]["mesh.dev/service"],
        "customer-scoring"
    );
    let np = c.object("networking.k8s.io/v1", "NetworkPolicy", "customer-scoring");
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0]["ipBlock"]["cidr"],
        "0.0.0.0/0"
    );

    let cm = c.object("v1", "ConfigMap", "customer-scoring-config");
    let config: Value = serde_json::from_str(cm["data"]["service.json"].as_str().unwrap()).unwrap();
    let lookup = config.to_string();
    assert!(lookup.contains("http://customer-features.customer-mesh.svc.cluster.local:8080/public/api/v1/customer-features/"), "{config:#}");
    // In a cluster every request is logged (the stack does not say otherwise):
    // the ConfigMap the Deployment mounts over the image's service.json says so.
    assert_eq!(config["access_log"], true, "{config:#}");
    let dep = c.object("apps/v1", "Deployment", "customer-scoring");
    let mounts = &dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"];
    assert!(
        mounts
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "config" && m["subPath"] == "service.json"),
        "{dep:#}"
    );

    // Nothing to do now: no perpetual diff from defaulted or allocated fields.
    let (code, plan, out) = c.plan_json(&[]).await;
    assert_eq!(code, 0, "{}\n{:#}", text(&out), plan);

    // More replicas and a changed dataset: only customer-features' objects change.
    c.edit("stacks/customer-mesh/stack.toml", |s| {
        s.replace("node_port = 30080\n", "node_port = 30080\nreplicas = 2\n")
    });
    c.edit("examples/customer-mesh/customers.csv", |mut s| {
        let last = s.lines().last().unwrap().to_owned();
        let rest = last.split_once(',').map(|(_, r)| r.to_owned()).unwrap();
        s.push_str(&format!(
            "{}C99001,{rest}\n",
            if s.ends_with('\n') { "" } else { "\n" }
        ));
        s
    });
    let (code, plan, out) = c.plan_json(&[]).await;
    assert_eq!(code, 2, "{}", text(&out));
    let got: BTreeSet<(String, String)> = changes(&plan).into_iter().collect();
    let want: BTreeSet<(String, String)> = [
        ("service.customer-features.deployment", "update"),
        ("service.customer-features.hpa", "update"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want, "{plan:#}");
    let dep_change = plan["resource_changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["address"] == "service.customer-features.deployment")
        .unwrap();
    let fields: Vec<&str> = dep_change["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["image"], "{dep_change:#}");
    ok(&c.apply(&[]).await, "apply of the change");
    assert_eq!(
        c.object("apps/v1", "Deployment", "customer-features")["spec"]["replicas"],
        2
    );
    assert_ne!(
        c.object("apps/v1", "Deployment", "customer-features")["spec"]["template"]["spec"]["containers"]
            [0]["image"],
        image.as_str()
    );
    let (code, _, out) = c.plan_json(&[]).await;
    assert_eq!(code, 0, "{}", text(&out));

    // customer-features behind an Ingress, then back to a NodePort: the Ingress is deleted.
    let module = "modules/lookup-service/module.toml";
    c.edit(module, |s| {
        s.replace(
            "type = \"NodePort\"\nport = 8080\nnode_port = \"${input.node_port}\"\n",
            "type = \"Ingress\"\nport = 8080\nhost = \"features.example.test\"\npath = \"/\"\n",
        )
    });
    let (_, plan, _) = c.plan_json(&[]).await;
    let got: BTreeSet<(String, String)> = changes(&plan).into_iter().collect();
    assert!(
        got.contains(&("expose.customer-features.ingress".into(), "create".into())),
        "{got:?}"
    );
    assert!(
        got.contains(&("expose.customer-features.service".into(), "update".into())),
        "{got:?}"
    );
    ok(&c.apply(&[]).await, "apply with an Ingress");
    let ing = c.object("networking.k8s.io/v1", "Ingress", "customer-features");
    assert_eq!(ing["spec"]["rules"][0]["host"], "features.example.test");
    assert_eq!(
        ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"],
        "customer-features"
    );
    assert_eq!(
        c.object("v1", "Service", "customer-features")["spec"]["type"],
        "ClusterIP"
    );
    let (code, _, out) = c.plan_json(&[]).await;
    assert_eq!(code, 0, "{}", text(&out));

    c.edit(module, |s| {
        s.replace(
            "type = \"Ingress\"\nport = 8080\nhost = \"features.example.test\"\npath = \"/\"\n",
            "type = \"NodePort\"\nport = 8080\nnode_port = \"${input.node_port}\"\n",
        )
    });
    let (_, plan, _) = c.plan_json(&[]).await;
    let got: BTreeSet<(String, String)> = changes(&plan).into_iter().collect();
    assert!(
        got.contains(&("expose.customer-features.ingress".into(), "delete".into())),
        "{got:?}"
    );
    ok(&c.apply(&[]).await, "apply without the Ingress");
    assert!(
        c.double
            .object("networking.k8s.io/v1", "Ingress", NS, "customer-features")
            .is_none()
    );
    assert_eq!(
        c.object("v1", "Service", "customer-features")["spec"]["ports"][0]["nodePort"],
        30080
    );

    // Remove customer-features' exposure: its Service and NetworkPolicy are deleted.
    c.edit(module, |s| {
        let start = s.find("[expose.this]").unwrap();
        s[..start].to_owned()
    });
    let (_, plan, _) = c.plan_json(&[]).await;
    let got: BTreeSet<(String, String)> = changes(&plan).into_iter().collect();
    assert!(
        got.contains(&("expose.customer-features.service".into(), "delete".into())),
        "{got:?}"
    );
    assert!(
        got.contains(&(
            "expose.customer-features.network_policy".into(),
            "delete".into()
        )),
        "{got:?}"
    );
    ok(
        &c.apply(&[]).await,
        "apply without customer-features' exposure",
    );
    assert!(
        c.double
            .object("v1", "Service", NS, "customer-features")
            .is_none()
    );

    // Destroy: nothing with the stack's labels remains.
    ok(&c.run("destroy", &["--auto-approve"], &[]).await, "destroy");
    let left = c
        .double
        .objects_with_label(&format!("mesh.dev/stack={STACK}"));
    assert!(left.is_empty(), "left behind: {left:#?}");
    let (code, plan, out) = c.plan_json(&[]).await;
    assert_eq!(code, 2, "{}", text(&out));
    assert!(changes(&plan).iter().all(|(_, a)| a == "create"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rollout_names_the_pod_reason() {
    let c = Cluster::new().await;
    c.double
        .set_rollout(NS, "customer-features", Rollout::ImagePullBackOff);
    let out = c.apply(&[]).await;
    assert!(!out.status.success(), "apply should fail: {}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ImagePullBackOff"), "{stderr}");
    assert!(
        stderr.contains(&format!("kubectl -n {NS} describe pod customer-features-")),
        "{stderr}"
    );

    // The failed rollout shows in the next plan, and --no-wait applies without waiting.
    let (code, plan, out) = c.plan_json(&[]).await;
    assert_eq!(code, 2, "{}", text(&out));
    assert!(
        changes(&plan).contains(&(
            "service.customer-features.deployment".into(),
            "update".into()
        )),
        "{plan:#}"
    );
    let out = c.run("apply", &["--auto-approve", "--no-wait"], &[]).await;
    ok(&out, "apply --no-wait");

    // The image becomes pullable: the next apply waits and succeeds.
    c.double
        .set_rollout(NS, "customer-features", Rollout::Ready);
    ok(&c.apply(&[]).await, "apply after the fix");
    let (code, _, out) = c.plan_json(&[]).await;
    assert_eq!(code, 0, "{}", text(&out));
    ok(&c.run("destroy", &["--auto-approve"], &[]).await, "destroy");
}

/// No container of `pod` (a pod spec) takes anything from a Secret into its
/// environment, nor holds one of `values` in an env var.
fn assert_no_secret_in_env(pod: &Value, values: &[&str]) {
    for c in pod["containers"].as_array().into_iter().flatten() {
        for from in c["envFrom"].as_array().into_iter().flatten() {
            assert!(from["secretRef"].is_null(), "envFrom a Secret: {c:#}");
        }
        for var in c["env"].as_array().into_iter().flatten() {
            assert!(
                var["valueFrom"]["secretKeyRef"].is_null(),
                "an env var from a Secret: {c:#}"
            );
            let value = var["value"].as_str().unwrap_or_default();
            assert!(
                values.iter().all(|v| !value.contains(v)),
                "a secret in env var {}",
                var["name"]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_planned_by_digest_and_never_shown() {
    let c = Cluster::new().await;
    const VAR: &str = "MESH_E2E_SCORING_API_KEY";
    const FIRST: &str = "first-secret-4b1d0c";
    const SECOND: &str = "second-secret-9f3e21";
    c.edit("stacks/customer-mesh/stack.toml", |s| {
        s.replace("[service.customer-scoring]\nversion = \"1.0.0\"\n", &format!("[service.customer-scoring]\nversion = \"1.0.0\"\napi_keys = [{{ env = \"{VAR}\" }}]\n"))
    });

    let plan_text = c.run("plan", &[], &[(VAR, FIRST)]).await;
    let (_, plan, out) = c.plan_json(&[(VAR, FIRST)]).await;
    for o in [&plan_text, &out] {
        let all = text(o);
        assert!(!all.contains(FIRST), "the secret leaked: {all}");
    }
    // Digests are keyed by the stack's key, made at the first apply: the
    // content is known after it (`(sensitive)` from then on, see below).
    assert!(changes(&plan).contains(&("service.customer-scoring.secret".into(), "create".into())));

    let out = c.apply(&[(VAR, FIRST)]).await;
    ok(&out, "apply");
    assert!(!text(&out).contains(FIRST));
    let secret = c.object("v1", "Secret", "customer-scoring-secrets");
    assert!(
        secret["metadata"]["annotations"]["mesh.dev/secret-hash"]
            .as_str()
            .unwrap()
            .starts_with("hmac-sha256:")
    );
    let stored = secret["data"][VAR].as_str().unwrap();
    let encoded = serde_json::to_value(k8s_openapi::ByteString(FIRST.as_bytes().to_vec())).unwrap();
    assert_eq!(stored, encoded.as_str().unwrap());
    // The pods read the Secret as files of a read-only volume (0400), and the
    // runtime's config names those files: no secret is in any environment.
    let dep = c.object("apps/v1", "Deployment", "customer-scoring");
    let pod = &dep["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"].is_object())
        .unwrap_or_else(|| panic!("no secret volume: {pod:#}"));
    assert_eq!(volume["secret"]["secretName"], "customer-scoring-secrets");
    assert_eq!(volume["secret"]["defaultMode"], 0o400, "{volume:#}");
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .unwrap_or_else(|| panic!("the secret volume is not mounted: {pod:#}"));
    assert_eq!(
        (&mount["mountPath"], &mount["readOnly"]),
        (&json!("/var/run/mesh/secrets"), &json!(true)),
        "{mount:#}"
    );
    assert_eq!(pod["securityContext"]["fsGroup"], 65532, "{pod:#}");
    assert_no_secret_in_env(pod, &[FIRST]);
    let cm = c.object("v1", "ConfigMap", "customer-scoring-config");
    let config: Value = serde_json::from_str(cm["data"]["service.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        config["api_keys"],
        json!([{ "file": format!("/var/run/mesh/secrets/{VAR}") }]),
        "{config:#}"
    );
    let (code, _, out) = c.plan_json(&[(VAR, FIRST)]).await;
    assert_eq!(code, 0, "{}", text(&out));

    // A new value: the Secret (and the pods using it) show as updates, the value never.
    let (code, plan, out) = c.plan_json(&[(VAR, SECOND)]).await;
    assert_eq!(code, 2, "{}", text(&out));
    let got: BTreeSet<(String, String)> = changes(&plan).into_iter().collect();
    assert!(
        got.contains(&("service.customer-scoring.secret".into(), "update".into())),
        "{got:?}"
    );
    assert!(
        got.iter()
            .all(|(a, _)| a.starts_with("service.customer-scoring.")),
        "{got:?}"
    );
    let plan_text = c.run("plan", &[], &[(VAR, SECOND)]).await;
    assert!(
        String::from_utf8_lossy(&plan_text.stdout).contains("(sensitive)"),
        "{}",
        text(&plan_text)
    );
    for o in [&plan_text, &out] {
        let all = text(o);
        assert!(
            !all.contains(FIRST) && !all.contains(SECOND),
            "the secret leaked: {all}"
        );
    }
    ok(&c.apply(&[(VAR, SECOND)]).await, "apply of the new secret");
    let (code, _, out) = c.plan_json(&[(VAR, SECOND)]).await;
    assert_eq!(code, 0, "{}", text(&out));

    // Without the variable, plan warns which one is missing (not a value), apply
    // fails naming it, and destroy does not need it.
    let out = c.run("plan", &[], &[]).await;
    ok(&out, "plan without the secret");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(VAR),
        "{}",
        text(&out)
    );
    let out = c.apply(&[]).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(VAR),
        "{}",
        text(&out)
    );
    ok(&c.run("destroy", &["--auto-approve"], &[]).await, "destroy");
    assert!(
        c.double
            .objects_with_label(&format!("mesh.dev/stack={STACK}"))
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_is_one_clear_line() {
    let c = Cluster::new().await;
    // A kubeconfig pointing at a port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(
        c.dir.path().join("kubeconfig"),
        kube_double::kubeconfig_yaml(&format!("http://{dead}"), "e2e"),
    )
    .unwrap();
    let out = c.run("plan", &[], &[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        line.contains(&format!("http://{dead}")) && line.contains("context e2e"),
        "{stderr}"
    );
}

/// The EKS path, through the library: a cluster reached by endpoint and token
/// from an access source; before the cluster exists, live state is empty and
/// every object still plans (nothing fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_still_to_be_created_plans_every_object() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use mesh::provider::Provider;
    use mesh::provider::kubernetes::{AccessSource, KubeAccess, KubernetesProvider, Settings};

    let c = Cluster::new().await;
    let stack =
        mesh::stack::load(&c.stack, Some("existing")).unwrap_or_else(|r| panic!("{}", r.render()));
    let exists = Arc::new(AtomicBool::new(false));
    let url = c.double.url();
    let flag = exists.clone();
    let source: AccessSource = Arc::new(move || {
        let exists = flag.load(Ordering::SeqCst);
        let url = url.clone();
        Box::pin(async move {
            Ok(exists.then(|| KubeAccess {
                endpoint: url,
                ca_pem: String::new(),
                token: "t0ken".into(),
            }))
        })
    });
    let mut settings = Settings::from_env();
    settings.registry = Some(c.registry.clone());
    settings.runtime = Some(c.dir.path().join("mesh-runtime"));
    let p = KubernetesProvider::from_access_source("to-be-created", source, settings)
        .with_state_dir(&stack);
    let scope = mesh::resource::Scope {
        stack: stack.name.clone(),
        env: stack.env.name.clone(),
        root: stack.root.clone(),
    };

    let before = c.double.request_count();
    assert!(p.observe(&scope).await.unwrap().is_empty());
    assert_eq!(
        c.double.request_count(),
        before,
        "nothing is asked of a cluster that does not exist"
    );
    let desired = p.desired(&stack).unwrap();
    let addresses: BTreeSet<&str> = desired.iter().map(|d| d.address.as_str()).collect();
    assert_eq!(addresses, EVERY_OBJECT.iter().copied().collect());

    // Once it exists, the same provider reads it (one list per kind).
    exists.store(true, Ordering::SeqCst);
    assert!(p.observe(&scope).await.unwrap().is_empty());
    assert_eq!(c.double.request_count() - before, 8);
}

/// A namespace that was there before the stack (made by hand, with its own
/// labels) is adopted on apply and given back on destroy: its labels stay,
/// mesh's go, and the namespace is not deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_that_was_there_is_given_back_not_deleted() {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, PostParams};

    let c = Cluster::new().await;
    let namespaces: Api<Namespace> = Api::all(c.double.client());
    let mut ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": { "name": NS, "labels": { "team": "data" } }
    }))
    .unwrap();
    ns = namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let uid = ns.metadata.uid.clone().expect("uid");

    let out = c.apply(&[]).await;
    ok(&out, "apply");
    assert!(
        text(&out).contains("already exists: adopting it"),
        "{}",
        text(&out)
    );
    let (code, _, out) = c.plan_json(&[]).await;
    assert_eq!(code, 0, "{}", text(&out));

    ok(&c.run("destroy", &["--auto-approve"], &[]).await, "destroy");
    assert!(
        c.double
            .objects_with_label(&format!("mesh.dev/stack={STACK}"))
            .is_empty()
    );
    let after = namespaces
        .get(NS)
        .await
        .expect("the namespace is still there");
    assert_eq!(
        after.metadata.uid.as_deref(),
        Some(uid.as_str()),
        "the same one"
    );
    let labels = after.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("team").map(String::as_str), Some("data"));
    assert!(
        labels
            .keys()
            .all(|k| !k.starts_with("mesh.dev/") && k != "app.kubernetes.io/managed-by"),
        "{labels:?}"
    );
    let annotations = after.metadata.annotations.unwrap_or_default();
    assert!(
        annotations.keys().all(|k| !k.starts_with("mesh.dev/")),
        "{annotations:?}"
    );
    // Its objects are gone all the same.
    assert!(
        c.double
            .object("apps/v1", "Deployment", NS, "customer-features")
            .is_none()
    );
    // A new apply creates the stack again in it; a destroy gives it back again.
    ok(&c.apply(&[]).await, "apply again");
    ok(
        &c.run("destroy", &["--auto-approve"], &[]).await,
        "destroy again",
    );
    assert!(namespaces.get(NS).await.is_ok());
}

// ------------------------------------------- the provider through the library

/// The stack at `env`, its scope, and a provider reaching the double through
/// an access source (as on EKS), with images pushed to `registry`
/// (`None`: the environment's own) and credentials from `auth`.
fn library_provider(
    c: &Cluster,
    env: &str,
    registry: Option<String>,
    auth: Option<mesh::provider::kubernetes::RegistryAuthSource>,
) -> (
    mesh::stack::Stack,
    mesh::resource::Scope,
    mesh::provider::kubernetes::KubernetesProvider,
) {
    use std::sync::Arc;

    use mesh::image::RegistryAuth;
    use mesh::provider::kubernetes::{AccessSource, KubeAccess, KubernetesProvider, Settings};

    let stack = mesh::stack::load(&c.stack, Some(env)).unwrap_or_else(|r| panic!("{}", r.render()));
    let scope = mesh::resource::Scope {
        stack: stack.name.clone(),
        env: stack.env.name.clone(),
        root: stack.root.clone(),
    };
    let url = c.double.url();
    let access: AccessSource = Arc::new(move || {
        let url = url.clone();
        Box::pin(async move {
            Ok(Some(KubeAccess {
                endpoint: url,
                ca_pem: String::new(),
                token: "t0ken".into(),
            }))
        })
    });
    let mut settings = Settings::from_env();
    settings.registry = registry;
    settings.registry_auth = RegistryAuth::Anonymous;
    settings.runtime = Some(c.dir.path().join("mesh-runtime"));
    let mut p =
        KubernetesProvider::from_access_source("library", access, settings).with_state_dir(&stack);
    if let Some(auth) = auth {
        p = p.with_registry_auth_source(auth);
    }
    (stack, scope, p)
}

/// Plans (with `extra` live resources, as other providers would report
/// them) and applies every change to a desired object, without waiting.
async fn plan_and_apply(
    p: &mesh::provider::kubernetes::KubernetesProvider,
    stack: &mesh::stack::Stack,
    scope: &mesh::resource::Scope,
    extra: Vec<mesh::resource::Live>,
) -> Result<(), String> {
    use mesh::plan;
    use mesh::provider::{ApplyContext, Provider};

    let desired = p.desired(stack).map_err(|e| e.to_string())?;
    let mut live = p.observe(scope).await.map_err(|e| e.to_string())?;
    live.extend(extra);
    let the_plan = plan::diff(
        &stack.name,
        &stack.env.name,
        &desired,
        &live,
        &plan::Options::default(),
    );
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let ctx = ApplyContext::new(scope.clone(), &the_plan.live, rx, true);
    for ch in the_plan
        .changes
        .iter()
        .filter(|ch| !ch.action.is_noop() && ch.desired.is_some())
    {
        p.apply(ch, &ctx)
            .await
            .map_err(|e| format!("{}: {e}", ch.address))?;
    }
    Ok(())
}

/// Credentials the test registry takes, from a registry-auth source that
/// records the hosts it was asked for.
fn recording_auth_source(
    asked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> mesh::provider::kubernetes::RegistryAuthSource {
    std::sync::Arc::new(move |host: String| {
        asked.lock().unwrap().push(host);
        Box::pin(async {
            Ok(Some(mesh::image::RegistryAuth::Basic {
                user: support::AUTH_USER.into(),
                password: support::AUTH_PASSWORD.into(),
            }))
        })
    })
}

/// `GET http://HOST/PATH` with the test registry's Basic credentials (or
/// none): status and body.
fn registry_get(host: &str, path: &str, with_credentials: bool) -> (u16, String) {
    let basic = serde_json::to_value(k8s_openapi::ByteString(
        format!("{}:{}", support::AUTH_USER, support::AUTH_PASSWORD).into_bytes(),
    ))
    .unwrap();
    let auth = if with_credentials {
        format!("Authorization: Basic {}\r\n", basic.as_str().unwrap())
    } else {
        String::new()
    };
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

fn deployment_image(c: &Cluster, service: &str) -> String {
    c.object("apps/v1", "Deployment", service)["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Images go to a registry that requires credentials with those the
/// provider's registry-auth source gives for its host (on an aws environment:
/// ECR's `GetAuthorizationToken`); without them the push fails in one line
/// that names the registry and shows no password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_pushed_with_the_credentials_of_the_auth_source() {
    use std::sync::{Arc, Mutex};

    let reg = support::auth_registry(support::AUTH_USER, support::AUTH_PASSWORD);
    let c = Cluster::new().await;
    let url = Some(format!("{}/mesh", reg.host));

    // Anonymous: refused by the registry, nothing applied past it.
    let (stack, scope, p) = library_provider(&c, "existing", url.clone(), None);
    let err = plan_and_apply(&p, &stack, &scope, Vec::new())
        .await
        .expect_err("an anonymous push is refused");
    assert!(err.contains(&reg.host) && err.contains("401"), "{err}");
    assert!(!err.contains(support::AUTH_PASSWORD), "{err}");

    // With the source's credentials: pushed, and the Deployment pins the image.
    let asked: Arc<Mutex<Vec<String>>> = Arc::default();
    let auth = recording_auth_source(asked.clone());
    let (stack, scope, p) = library_provider(&c, "existing", url, Some(auth));
    plan_and_apply(&p, &stack, &scope, Vec::new())
        .await
        .expect("apply with credentials");
    {
        let asked = asked.lock().unwrap();
        assert!(
            !asked.is_empty() && asked.iter().all(|h| *h == reg.host),
            "{asked:?}"
        );
    }
    let image = deployment_image(&c, "customer-features");
    let (repository, digest) = image.split_once('@').expect("pinned by digest");
    assert_eq!(
        repository,
        format!("{}/mesh/customer-mesh-customer-features", reg.host)
    );
    let path = repository.split_once('/').unwrap().1;
    let manifest = format!("/v2/{path}/manifests/{digest}");
    assert_eq!(
        registry_get(&reg.host, &manifest, true).0,
        200,
        "the image is there"
    );
    assert_eq!(
        registry_get(&reg.host, &manifest, false).0,
        401,
        "and the registry does require credentials"
    );
}

/// On an aws environment the images go to the stack's registry (ECR): one
/// repository for all services, each image tagged `<service>.<digest hex>`
/// (what the registry's per-service lifecycle rules select), pushed with the
/// auth source's credentials. The registry's URL is the live output of
/// `registry.NAME` — here a registry that requires credentials, standing where
/// ECR's `<account>.dkr.ecr.<region>.amazonaws.com/<repo>` would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_aws_every_service_is_a_tag_in_the_stacks_registry() {
    use mesh::resource::{Address, Live, ProviderId};

    let reg = support::auth_registry(support::AUTH_USER, support::AUTH_PASSWORD);
    let c = Cluster::new().await;
    // Images only: `behavior` bundled, so no warehouse password is needed.
    c.edit("stacks/customer-mesh/dev.toml", |_| String::new());
    let auth = recording_auth_source(Default::default());
    let (stack, scope, p) = library_provider(&c, "dev", None, Some(auth));
    let registry_name = stack.env.registry.clone().expect("dev names a registry");

    // The registry as the aws provider reports it once created.
    let repository = format!("{}/customer-mesh/dev/{registry_name}", reg.host);
    let registry_live = Live::new(
        Address::of("registry", &registry_name),
        "aws_ecr_repository",
        ProviderId::Aws,
        format!("customer-mesh/dev/{registry_name}"),
    )
    .output("url", repository.as_str());
    plan_and_apply(&p, &stack, &scope, vec![registry_live])
        .await
        .expect("apply");

    let mut want_tags = BTreeSet::new();
    for svc in ["customer-features", "customer-scoring"] {
        let image = deployment_image(&c, svc);
        let (repo, digest) = image.split_once('@').expect("pinned by digest");
        assert_eq!(repo, repository, "{svc} is in the stack's repository");
        want_tags.insert(format!("{svc}.{}", digest.trim_start_matches("sha256:")));
    }
    let path = repository.split_once('/').unwrap().1;
    let (status, body) = registry_get(&reg.host, &format!("/v2/{path}/tags/list"), true);
    assert_eq!(status, 200, "{body}");
    let tags: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let got: BTreeSet<String> = tags["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, want_tags);
}

/// A LoadBalancer Service holds its cloud load balancer (the service
/// controller's cleanup finalizer keeps it until the balancer is gone):
/// destroy waits for it, so the network under it can be deleted next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_waits_for_load_balancer_services_to_go() {
    let c = Cluster::new().await;
    c.edit("stacks/customer-mesh/stack.toml", |s| {
        s.replace(
            "[expose.customer-scoring]\ntype = \"NodePort\"\nport = 8080\nnode_port = 30081\n",
            "[expose.customer-scoring]\ntype = \"LoadBalancer\"\nport = 8080\n",
        )
    });
    // A namespace that outlives the stack (adopted, given back on destroy), so
    // only the wait for the Service itself can hold destroy back.
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
        kube::Api::all(c.double.client());
    let ns = serde_json::from_value(serde_json::json!({ "metadata": { "name": NS } })).unwrap();
    namespaces
        .create(&kube::api::PostParams::default(), &ns)
        .await
        .unwrap();
    ok(&c.apply(&[]).await, "apply");
    let svc = c.object("v1", "Service", "customer-scoring");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(
        svc["metadata"]["finalizers"][0],
        "service.kubernetes.io/load-balancer-cleanup"
    );
    let out = c.run("output", &["--json"], &[]).await;
    ok(&out, "output");
    let urls: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        urls["exposes"]["customer-scoring"]["url"]
            .as_str()
            .is_some_and(|u| u.contains(".lb.kube-double.local")),
        "{urls}"
    );

    // The balancer takes 2 s to go once the Service is deleted.
    c.double
        .set_load_balancer_delay(std::time::Duration::from_secs(2));
    ok(&c.run("destroy", &["--auto-approve"], &[]).await, "destroy");
    assert!(
        c.double
            .object("v1", "Service", NS, "customer-scoring")
            .is_none(),
        "destroy returned while the LoadBalancer Service was still there"
    );
    let polled = c
        .double
        .request_log()
        .iter()
        .filter(|r| r.starts_with("GET ") && r.contains("/services/customer-scoring"))
        .count();
    assert!(polled >= 2, "the Service was polled {polled} times");
}

/// A release whose pods never become ready fails the apply, naming the
/// reason; applying the previous stack again rolls the Deployment back to
/// the image it ran before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_release_is_rolled_back_by_applying_the_previous_stack() {
    let c = Cluster::new().await;
    ok(&c.apply(&[]).await, "apply");
    let good = deployment_image(&c, "customer-features");

    // A new dataset: a new image, whose pods crash.
    let csv = "examples/customer-mesh/behavior.csv";
    let before = std::fs::read_to_string(c.dir.path().join(csv)).unwrap();
    let mut lines: Vec<&str> = before.lines().collect();
    lines.truncate(lines.len() - 1);
    std::fs::write(c.dir.path().join(csv), lines.join("\n") + "\n").unwrap();
    let (code, plan, out) = c.plan_json(&[]).await;
    assert_eq!(code, 2, "{}", text(&out));
    let bad = plan["resource_changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|rc| rc["address"] == "service.customer-features.deployment")
        .and_then(|rc| {
            rc["fields"]
                .as_array()?
                .iter()
                .find(|f| f["path"] == "image")?["after"]
                .as_str()
        })
        .unwrap_or_else(|| panic!("no new image in the plan: {plan:#}"))
        .to_owned();
    assert_ne!(bad, good);
    c.double.set_image_rollout(&bad, Rollout::CrashLoop);
    let out = c.apply(&[]).await;
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CrashLoopBackOff"), "{stderr}");
    assert!(
        stderr.contains("apply the previous stack to roll back"),
        "{stderr}"
    );
    assert_eq!(deployment_image(&c, "customer-features"), bad);

    // The previous stack: the old image again, rolled out, and nothing left to do.
    std::fs::write(c.dir.path().join(csv), &before).unwrap();
    let (code, plan, out) = c.plan_json(&[]).await;
    assert_eq!(code, 2, "{}", text(&out));
    let got: BTreeSet<(String, String)> = changes(&plan).into_iter().collect();
    assert!(
        got.contains(&(
            "service.customer-features.deployment".into(),
            "update".into()
        )),
        "{got:?}"
    );
    ok(&c.apply(&[]).await, "apply of the previous stack");
    assert_eq!(deployment_image(&c, "customer-features"), good);
    let dep = c.object("apps/v1", "Deployment", "customer-features");
    assert_eq!(
        dep["status"]["updatedReplicas"], dep["spec"]["replicas"],
        "{dep:#}"
    );
    let (code, _, out) = c.plan_json(&[]).await;
    assert_eq!(code, 0, "{}", text(&out));
}

/// The changes a plan with something to do holds.
async fn planned_changes(c: &Cluster) -> BTreeSet<(String, String)> {
    let (code, plan, out) = c.plan_json(&[]).await;
    assert_eq!(code, 2, "{}", text(&out));
    changes(&plan).into_iter().collect()
}

/// Generations on a cluster (the double): each step is one plan line, the
/// scoring service's Deployment with its ConfigMap. Adding one is a new
/// bundle; a weight shift is its `split` alone, applied to the ConfigMap's
/// `split.json` alone, and rolls nothing out (the Deployment's generation
/// stays); retiring one is a new bundle again; each converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_are_added_shifted_and_retired() {
    let c = Cluster::new().await;
    ok(&c.apply(&[]).await, "apply");
    let rel = "stacks/customer-mesh/stack.toml";
    let original = std::fs::read_to_string(c.dir.path().join(rel)).unwrap();
    // Every step is one line: the Deployment, with its ConfigMap.
    let one_line: BTreeSet<(String, String)> = [(
        "service.customer-scoring.deployment".to_owned(),
        "update".to_owned(),
    )]
    .into();
    let split_of = |c: &Cluster| -> Value {
        let cm = c.object("v1", "ConfigMap", "customer-scoring-config");
        serde_json::from_str(cm["data"]["split.json"].as_str().unwrap_or("null")).unwrap()
    };

    // Add v2 beside v1.
    c.edit(rel, |_| support::generations_toml(&original, Some(90), 10));
    assert_eq!(planned_changes(&c).await, one_line);
    ok(&c.apply(&[]).await, "apply: add a generation");
    assert_eq!(split_of(&c)["high-value"]["v2"], 10);
    let dep = c.object("apps/v1", "Deployment", "customer-scoring");
    let mounted = dep["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == "split");
    assert!(mounted, "{dep:#}");

    // Shift weight: the split alone, applied to the ConfigMap alone.
    c.edit(rel, |_| support::generations_toml(&original, Some(80), 20));
    assert_eq!(planned_changes(&c).await, one_line);
    let (_, plan, _) = c.plan_json(&[]).await;
    let fields: Vec<&str> = plan["resource_changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|ch| ch["action"] != "no-op")
        .flat_map(|ch| ch["fields"].as_array().unwrap())
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["split"], "{plan:#}");
    ok(&c.apply(&[]).await, "apply: shift weight");
    assert_eq!(split_of(&c)["high-value"]["v2"], 20);
    let after = c.object("apps/v1", "Deployment", "customer-scoring");
    assert_eq!(
        after["metadata"]["generation"], dep["metadata"]["generation"],
        "a weight shift rolled the Deployment out"
    );
    let (code, _, out) = c.plan_json(&[]).await;
    assert_eq!(code, 0, "{}", text(&out));

    // Retire v1.
    c.edit(rel, |_| support::generations_toml(&original, None, 100));
    assert_eq!(planned_changes(&c).await, one_line);
    ok(&c.apply(&[]).await, "apply: retire v1");
    assert_eq!(split_of(&c)["high-value"], serde_json::json!({ "v2": 100 }));
    let (code, _, out) = c.plan_json(&[]).await;
    assert_eq!(code, 0, "{}", text(&out));
}

/// The stack's lock is shared through the cluster (a Lease in `default`):
/// an apply from another machine holding it refuses this one, naming the
/// holder; a Lease nobody renewed lapses and is taken over; the Lease is
/// released when the apply ends; `mesh unlock` breaks a held one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_is_a_lease_on_the_cluster() {
    use kube::api::{Api, ApiResource, DynamicObject, PostParams};

    let c = Cluster::new().await;
    let ar = ApiResource {
        group: "coordination.k8s.io".into(),
        version: "v1".into(),
        api_version: "coordination.k8s.io/v1".into(),
        kind: "Lease".into(),
        plural: "leases".into(),
    };
    let leases: Api<DynamicObject> = Api::namespaced_with(c.double.client(), "default", &ar);
    const NAME: &str = "mesh-customer-mesh-existing";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let lease_at = |renewed: u64| -> DynamicObject {
        let t = mesh::lock::format_time(renewed).replace('Z', ".000000Z");
        serde_json::from_value(serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "name": NAME, "namespace": "default", "annotations": {
                "mesh.dev/holder": serde_json::json!({"pid": 4242, "host": "ci-runner-7", "command": "mesh apply", "since": renewed}).to_string()
            } },
            "spec": { "holderIdentity": "mesh apply@ci-runner-7 pid 4242", "leaseDurationSeconds": 60, "acquireTime": t, "renewTime": t },
        }))
        .unwrap()
    };

    // Held elsewhere, renewed just now: refused, nothing applied.
    leases
        .create(&PostParams::default(), &lease_at(now))
        .await
        .unwrap();
    let out = c.apply(&[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("locked on cluster e2e"), "{stderr}");
    assert!(stderr.contains("pid 4242 on ci-runner-7"), "{stderr}");
    assert!(stderr.contains("mesh unlock"), "{stderr}");
    assert!(
        c.double
            .objects_with_label("app.kubernetes.io/managed-by=mesh")
            .is_empty(),
        "nothing is applied while the lock is held elsewhere"
    );

    // `mesh unlock` breaks it, naming who held it.
    let out = c.run("unlock", &[], &[]).await;
    ok(&out, "unlock");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ci-runner-7"),
        "{}",
        text(&out)
    );
    assert!(leases.get_opt(NAME).await.unwrap().is_none());

    // Not renewed for ten minutes: it has lapsed, and this run takes it over.
    leases
        .create(&PostParams::default(), &lease_at(now - 600))
        .await
        .unwrap();
    let before = c.double.request_log().len();
    ok(&c.apply(&[]).await, "apply over a lapsed lock");
    let log: Vec<String> = c.double.request_log()[before..].to_vec();
    let lease_path = format!("/apis/coordination.k8s.io/v1/namespaces/default/leases/{NAME}");
    assert!(
        log.iter()
            .any(|r| r.starts_with("PUT ") && r.contains(&lease_path)),
        "the lapsed Lease is replaced: {log:#?}"
    );
    assert!(
        log.iter()
            .any(|r| r.starts_with("DELETE ") && r.contains(&lease_path)),
        "and released at the end: {log:#?}"
    );
    assert!(leases.get_opt(NAME).await.unwrap().is_none());
    assert!(c.object("apps/v1", "Deployment", "customer-features")["spec"].is_object());

    // Free: plan, apply and destroy take and release it each time.
    ok(&c.run("destroy", &["--auto-approve"], &[]).await, "destroy");
    assert!(leases.get_opt(NAME).await.unwrap().is_none());
}

/// A second Ctrl-C abandons the changes in flight, but the locks are still
/// released: the Lease on the cluster and the lock file on this machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ctrl_c_still_releases_the_locks() {
    use kube::api::{Api, ApiResource, DynamicObject};

    let c = Cluster::new().await;
    // mesh reaches the cluster through a proxy that can hold every byte:
    // then its calls in flight answer neither the first Ctrl-C nor anything.
    let proxy = support::tcp_proxy::Proxy::start(c.double.addr());
    std::fs::write(
        c.dir.path().join("kubeconfig"),
        kube_double::kubeconfig_yaml(&format!("http://{}", proxy.addr), "e2e"),
    )
    .unwrap();
    // Rollouts that take five minutes: the apply is still waiting when interrupted.
    c.double
        .set_rollout_delay(std::time::Duration::from_secs(300));
    let stack = c.stack.to_str().unwrap().to_owned();
    let child = c
        .command(
            &["apply", &stack, "--env", "existing", "--auto-approve"],
            &[],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ar = ApiResource {
        group: "coordination.k8s.io".into(),
        version: "v1".into(),
        api_version: "coordination.k8s.io/v1".into(),
        kind: "Lease".into(),
        plural: "leases".into(),
    };
    let leases: Api<DynamicObject> = Api::namespaced_with(c.double.client(), "default", &ar);
    const LEASE: &str = "mesh-customer-mesh-existing";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // Waiting for a rollout: the Deployment exists and the Lease is held.
    while leases.get_opt(LEASE).await.unwrap().is_none()
        || c.double
            .objects_with_label("app.kubernetes.io/managed-by=mesh")
            .iter()
            .all(|o| o["kind"] != "Deployment")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the apply never got to a rollout"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    proxy.set(support::tcp_proxy::HANG);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let pid = child.id().unwrap().to_string();
    let sigint = || {
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
    };
    assert!(sigint().success());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(sigint().success());
    // The cluster answers again, so the Lease can be given back.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    proxy.set(support::tcp_proxy::PASS);
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("mesh exits after a second Ctrl-C")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("locks are released"), "{err}");
    assert!(
        leases.get_opt(LEASE).await.unwrap().is_none(),
        "the Lease is released"
    );
    let lock_file = mesh::lock::lock_path(&mesh::provider::local::state_dir(&c.stack, "existing"));
    assert!(!lock_file.exists(), "{} is left", lock_file.display());
    // And the next run converges without `mesh unlock`.
    c.double.set_rollout_delay(std::time::Duration::ZERO);
    ok(&c.apply(&[]).await, "apply after the interrupted one");
}

// ------------------------------------------------ convergence and drift (issue 10)

/// A JSON merge patch by another field manager, as `kubectl patch --type merge` sends it.
/// A service's ConfigMap is part of its Deployment's resource: with the
/// Deployment deleted by hand, the ConfigMap left stands for it, so the plan
/// is one line (that Deployment) and one apply brings it back; a ConfigMap
/// deleted by hand is planned as the Deployment's `config` and made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_or_configmap_deleted_by_hand_is_one_line_and_one_apply() {
    use kube::api::{Api, DeleteParams, DynamicObject};
    let c = Cluster::new().await;
    ok(&c.apply(&[]).await, "apply");
    let one_line: BTreeSet<(String, String)> = [(
        "service.customer-scoring.deployment".to_owned(),
        "update".to_owned(),
    )]
    .into();
    for (kind, name) in [
        ("Deployment", "customer-scoring"),
        ("ConfigMap", "customer-scoring-config"),
    ] {
        let ar = match kind {
            "Deployment" => {
                kube::api::ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&())
            }
            _ => kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::ConfigMap>(&()),
        };
        let api: Api<DynamicObject> = Api::namespaced_with(c.double.client(), NS, &ar);
        api.delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("deleting {kind} {name}: {e}"));
        assert_eq!(planned_changes(&c).await, one_line, "{kind} deleted");
        ok(&c.apply(&[]).await, "apply");
        let (code, _, out) = c.plan_json(&[]).await;
        assert_eq!(code, 0, "{kind}: {}", text(&out));
        let cm = c.object("v1", "ConfigMap", "customer-scoring-config");
        assert!(cm["data"]["service.json"].is_string(), "{cm:#}");
        let dep = c.object("apps/v1", "Deployment", "customer-scoring");
        assert_eq!(dep["metadata"]["name"], "customer-scoring");
    }
}

async fn merge_patch_as(c: &Cluster, kind: &str, name: &str, manager: &str, patch: Value) {
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    let ar = match kind {
        "ConfigMap" => kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::ConfigMap>(&()),
        "Secret" => kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::Secret>(&()),
        "Deployment" => {
            kube::api::ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&())
        }
        other => panic!("no kind {other}"),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(c.double.client(), NS, &ar);
    let pp = PatchParams {
        field_manager: Some(manager.into()),
        ..Default::default()
    };
    let p = if kind == "Deployment" {
        Patch::Strategic(patch)
    } else {
        Patch::Merge(patch)
    };
    api.patch(name, &pp, &p)
        .await
        .unwrap_or_else(|e| panic!("patching {kind} {name}: {e}"));
}

fn managers_of(obj: &Value) -> Vec<(String, String)> {
    obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["manager"].as_str().unwrap_or_default().to_owned(),
                e["operation"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Keys, containers and labels another field manager adds to what mesh
/// declares as wholly its own (a ConfigMap's and a Secret's data, the pod
/// template's containers and labels) show in the plan and are gone after one
/// apply; the next plan is empty. Server-side apply alone keeps them: they
/// belong to the other manager.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_added_by_another_manager_are_planned_and_removed_by_one_apply() {
    const VAR: &str = "MESH_E2E_SCORING_API_KEY";
    let c = Cluster::new().await;
    c.edit("stacks/customer-mesh/stack.toml", |s| {
        s.replace("[service.customer-scoring]\nversion = \"1.0.0\"\n", &format!("[service.customer-scoring]\nversion = \"1.0.0\"\napi_keys = [{{ env = \"{VAR}\" }}]\n"))
    });
    let env = [(VAR, "a-key-7d1c")];
    ok(&c.apply(&env).await, "apply");

    merge_patch_as(
        &c,
        "ConfigMap",
        "customer-scoring-config",
        "kubectl-patch",
        serde_json::json!({ "data": { "x": "y" } }),
    )
    .await;
    merge_patch_as(
        &c,
        "Secret",
        "customer-scoring-secrets",
        "kubectl-patch",
        serde_json::json!({ "data": { "EXTRA": "c3RyYXk=" } }),
    )
    .await;
    merge_patch_as(
        &c,
        "Deployment",
        "customer-features",
        "kubectl-patch",
        serde_json::json!({ "spec": { "template": {
            "metadata": { "labels": { "injected": "yes" } },
            "spec": { "containers": [{ "name": "sidecar", "image": "busybox:1.36" }] },
        } } }),
    )
    .await;
    // The other manager owns what it added (an Update entry), as on a real server.
    let cm = c.object("v1", "ConfigMap", "customer-scoring-config");
    assert!(
        managers_of(&cm).contains(&("kubectl-patch".into(), "Update".into())),
        "{cm:#}"
    );

    let (code, plan, out) = c.plan_json(&env).await;
    assert_eq!(code, 2, "{}", text(&out));
    let got: BTreeSet<(String, String)> = changes(&plan).into_iter().collect();
    let want: BTreeSet<(String, String)> = [
        ("service.customer-scoring.deployment", "update"),
        ("service.customer-scoring.secret", "update"),
        ("service.customer-features.deployment", "update"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want, "{plan:#}");

    ok(&c.apply(&env).await, "apply repairing the edits");
    let cm = c.object("v1", "ConfigMap", "customer-scoring-config");
    let keys: Vec<&String> = cm["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["service.json"], "{cm:#}");
    let secret = c.object("v1", "Secret", "customer-scoring-secrets");
    let keys: Vec<&String> = secret["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys, [VAR], "{secret:#}");
    let dep = c.object("apps/v1", "Deployment", "customer-features");
    let containers: Vec<&str> = dep["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(containers, ["runtime"], "{dep:#}");
    assert!(
        dep["spec"]["template"]["metadata"]["labels"]
            .get("injected")
            .is_none(),
        "{dep:#}"
    );

    let (code, plan, out) = c.plan_json(&env).await;
    assert_eq!(code, 0, "{}\n{plan:#}", text(&out));
}

/// A Secret whose value is edited by hand (its `mesh.dev/secret-hash`
/// annotation left as it was) shows as an update and is put back by apply;
/// neither value is ever printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_edited_by_hand_is_planned_and_repaired() {
    const VAR: &str = "MESH_E2E_SCORING_API_KEY";
    const VALUE: &str = "the-real-key-51ab";
    const TAMPERED: &str = "tampered-by-hand-0c2e";
    let c = Cluster::new().await;
    c.edit("stacks/customer-mesh/stack.toml", |s| {
        s.replace("[service.customer-scoring]\nversion = \"1.0.0\"\n", &format!("[service.customer-scoring]\nversion = \"1.0.0\"\napi_keys = [{{ env = \"{VAR}\" }}]\n"))
    });
    let env = [(VAR, VALUE)];
    ok(&c.apply(&env).await, "apply");
    let (code, _, out) = c.plan_json(&env).await;
    assert_eq!(code, 0, "{}", text(&out));

    let tampered =
        serde_json::to_value(k8s_openapi::ByteString(TAMPERED.as_bytes().to_vec())).unwrap();
    merge_patch_as(
        &c,
        "Secret",
        "customer-scoring-secrets",
        "kubectl-edit",
        serde_json::json!({ "data": { VAR: tampered } }),
    )
    .await;

    let (code, plan, out) = c.plan_json(&env).await;
    assert_eq!(code, 2, "{}", text(&out));
    assert!(
        changes(&plan).contains(&("service.customer-scoring.secret".into(), "update".into())),
        "{plan:#}"
    );
    let human = c.run("plan", &[], &env).await;
    for o in [&human, &out] {
        let all = text(o);
        assert!(
            !all.contains(VALUE)
                && !all.contains(TAMPERED)
                && !all.contains(tampered.as_str().unwrap()),
            "a secret value leaked: {all}"
        );
    }
    ok(&c.apply(&env).await, "apply repairing the Secret");
    let secret = c.object("v1", "Secret", "customer-scoring-secrets");
    let want = serde_json::to_value(k8s_openapi::ByteString(VALUE.as_bytes().to_vec())).unwrap();
    assert_eq!(secret["data"][VAR], want, "{secret:#}");
    let (code, plan, out) = c.plan_json(&env).await;
    assert_eq!(code, 0, "{}\n{plan:#}", text(&out));
}

/// Images pushed with `MESH_REGISTRY_USER`/`MESH_REGISTRY_PASSWORD` are
/// pulled with the same credentials: a `kubernetes.io/dockerconfigjson`
/// Secret mesh owns, named in every Deployment's `imagePullSecrets`, planned
/// by digest only (the password is never shown), removed by destroy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_from_a_private_registry_are_pulled_with_a_pull_secret() {
    const USER: &str = "puller";
    const PASSWORD: &str = "pull-password-3e9a71";
    let reg = support::auth_registry(USER, PASSWORD);
    let c = Cluster::new().await;
    let url = format!("{}/mesh", reg.host);
    let env = [
        ("MESH_REGISTRY", url.as_str()),
        ("MESH_REGISTRY_USER", USER),
        ("MESH_REGISTRY_PASSWORD", PASSWORD),
    ];
    let (code, plan, out) = c.plan_json(&env).await;
    assert_eq!(code, 2, "{}", text(&out));
    assert!(
        changes(&plan).contains(&("pull_secret.registry".into(), "create".into())),
        "{plan:#}"
    );
    let human = c.run("plan", &[], &env).await;
    let basic = serde_json::to_value(k8s_openapi::ByteString(
        format!("{USER}:{PASSWORD}").into_bytes(),
    ))
    .unwrap();
    for o in [&human, &out] {
        let all = text(o);
        assert!(
            !all.contains(PASSWORD) && !all.contains(basic.as_str().unwrap()),
            "the registry password leaked: {all}"
        );
    }

    let out = c.apply(&env).await;
    ok(&out, "apply");
    assert!(!text(&out).contains(PASSWORD), "{}", text(&out));
    let secret = c.object("v1", "Secret", "mesh-registry");
    assert_eq!(
        secret["type"], "kubernetes.io/dockerconfigjson",
        "{secret:#}"
    );
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "mesh"
    );
    assert_eq!(secret["metadata"]["labels"]["mesh.dev/stack"], STACK);
    let encoded = secret["data"][".dockerconfigjson"].as_str().unwrap();
    let decoded: k8s_openapi::ByteString =
        serde_json::from_value(Value::String(encoded.to_owned())).unwrap();
    let config: Value = serde_json::from_slice(&decoded.0).unwrap();
    let entry = &config["auths"][reg.host.as_str()];
    assert_eq!(entry["username"], USER, "{config:#}");
    assert_eq!(entry["password"], PASSWORD);
    assert_eq!(entry["auth"], basic);
    for svc in ["customer-features", "customer-scoring"] {
        let dep = c.object("apps/v1", "Deployment", svc);
        assert_eq!(
            dep["spec"]["template"]["spec"]["imagePullSecrets"],
            serde_json::json!([{ "name": "mesh-registry" }]),
            "{svc}: {dep:#}"
        );
    }
    let (code, plan, out) = c.plan_json(&env).await;
    assert_eq!(code, 0, "{}\n{plan:#}", text(&out));

    // A new password: the pull Secret is an update, the password never shown.
    let env2 = [
        ("MESH_REGISTRY", url.as_str()),
        ("MESH_REGISTRY_USER", USER),
        ("MESH_REGISTRY_PASSWORD", "another-password-77"),
    ];
    let (code, plan, out) = c.plan_json(&env2).await;
    assert_eq!(code, 2, "{}", text(&out));
    assert!(
        changes(&plan).contains(&("pull_secret.registry".into(), "update".into())),
        "{plan:#}"
    );
    assert!(!text(&out).contains("another-password-77"));

    ok(
        &c.run("destroy", &["--auto-approve"], &env).await,
        "destroy",
    );
    assert!(
        c.double
            .object("v1", "Secret", NS, "mesh-registry")
            .is_none()
    );
}

/// An Ingress under a path other than `/`: the runtime serves under that
/// base path (its bundle config says so) while the probes stay at the root,
/// and the URLs `mesh output` prints answer. The image's own bundle and the
/// ConfigMap's `service.json` are served by the real runtime here, since the
/// double runs no pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingress_under_a_path_serves_the_urls_mesh_output_prints() {
    let c = Cluster::new().await;
    let module = "modules/lookup-service/module.toml";
    c.edit(module, |s| {
        s.replace(
            "type = \"NodePort\"\nport = 8080\nnode_port = \"${input.node_port}\"\n",
            "type = \"Ingress\"\nport = 8080\nhost = \"features.example.test\"\npath = \"/features\"\n",
        )
    });
    ok(&c.apply(&[]).await, "apply");
    let (code, _, out) = c.plan_json(&[]).await;
    assert_eq!(code, 0, "{}", text(&out));
    let cm = c.object("v1", "ConfigMap", "customer-features-config");
    let config: Value = serde_json::from_str(cm["data"]["service.json"].as_str().unwrap()).unwrap();
    assert_eq!(config["base_path"], "/features", "{config:#}");
    let dep = c.object("apps/v1", "Deployment", "customer-features");
    let container = &dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");

    let out = c.run("output", &["--json"], &[]).await;
    ok(&out, "output");
    let urls: Value = serde_json::from_slice(&out.stdout).unwrap();
    let lookup = urls["exposes"]["customer-features"]["endpoints"]["demographics"]
        .as_str()
        .unwrap_or_else(|| panic!("{urls:#}"))
        .to_owned();
    let path = lookup
        .strip_prefix("http://features.example.test")
        .unwrap_or_else(|| panic!("{lookup}"));
    assert!(path.starts_with("/features/"), "{lookup}");

    // The runtime, with the ConfigMap's service.json, answers that path (as
    // the Ingress forwards it, unchanged) and its probes at the root; the
    // service admits only customer-scoring, so the operator's key.
    let port = free_port();
    let root = c.dir.path().join("pod-features");
    let _runtime = Reaped(serve_as_pod(&c, "customer-features", &root, port, &[]));
    let host = format!("127.0.0.1:{port}");
    assert_eq!(http_get_status(&host, "/healthz", "*/*"), 200);
    assert_eq!(http_get_status(&host, "/readyz", "*/*"), 200);
    let key = secret_values(&c, "mesh-key-operator")["operator"].clone();
    let (status, body) = support::local::post(
        &format!("http://{host}{path}"),
        &json!({"data": {"customer_id": "C00042"}}),
        Some(&key),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body["data"].get("age").is_some(), "{body}");
}

/// The status of `GET /PATH`, or `None` when nothing answers yet.
fn http_get_status_opt(host_port: &str, path: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(host_port).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split_whitespace().nth(1).and_then(|c| c.parse().ok())
}

/// A free loopback port below the ephemeral range (30000-32767).
fn free_port() -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id();
    for i in 0..400u32 {
        let p = 30000 + ((seed.wrapping_add(i.wrapping_mul(7919))) % 2767) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port found in 30000-32767");
}

/// With `behavior` read from the warehouse, a new warehouse password, a new
/// refresh interval and a new query each plan as updates of customer-features'
/// objects alone (customer-scoring untouched), and the password is shown in
/// no plan; each applied, the next plan is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warehouse_password_refresh_or_query_change_updates_only_its_service() {
    let c = Cluster::new().await;
    const FIRST: &str = "warehouse-pw-1-7c2f";
    const SECOND: &str = "warehouse-pw-2-91ab";
    std::fs::write(
        c.stack.join("existing.toml"),
        "[service.customer-features.dataset.behavior]\n\
         connection = \"warehouse\"\n\
         query = \"select customer_id, total_spend_30d, orders_90d, days_since_last_order, avg_basket from behavior_30d\"\n\
         mode = \"preload\"\n\
         refresh = \"5m\"\n",
    )
    .unwrap();
    let first = [("WAREHOUSE_PASSWORD", FIRST)];
    ok(&c.apply(&first).await, "apply");
    let (code, _, out) = c.plan_json(&first).await;
    assert_eq!(code, 0, "{}", text(&out));

    let only_features = |plan: &Value, what: &str| {
        let got = changes(plan);
        assert!(!got.is_empty(), "{what}: no change planned");
        assert!(
            got.iter().all(
                |(a, action)| a.starts_with("service.customer-features.") && action == "update"
            ),
            "{what}: {got:?}"
        );
    };
    let second = [("WAREHOUSE_PASSWORD", SECOND)];
    let (code, plan, out) = c.plan_json(&second).await;
    assert_eq!(code, 2, "{}", text(&out));
    only_features(&plan, "password");
    assert!(
        changes(&plan).contains(&("service.customer-features.secret".into(), "update".into())),
        "{plan}"
    );
    let human = c.run("plan", &[], &second).await;
    for o in [&human, &out] {
        let all = text(o);
        assert!(!all.contains(FIRST) && !all.contains(SECOND), "{all}");
    }
    ok(&c.apply(&second).await, "apply the new password");
    assert_eq!(c.plan_json(&second).await.0, 0);

    for (what, from, to) in [
        ("refresh", "refresh = \"5m\"", "refresh = \"10m\""),
        (
            "query",
            "from behavior_30d",
            "from behavior_30d where orders_90d >= 0",
        ),
    ] {
        c.edit("stacks/customer-mesh/existing.toml", |s| {
            s.replace(from, to)
        });
        let (code, plan, out) = c.plan_json(&second).await;
        assert_eq!(code, 2, "{what}: {}", text(&out));
        only_features(&plan, what);
        ok(&c.apply(&second).await, what);
        assert_eq!(c.plan_json(&second).await.0, 0, "{what}");
    }
    ok(
        &c.run("destroy", &["--auto-approve"], &second).await,
        "destroy",
    );
}

/// The edge of a cluster: a LoadBalancer's CIDR `allow` as source ranges
/// (and the client's address kept), an Ingress's as the controller's
/// source-range annotation, TLS on Ingresses from a Secret or a
/// cert-manager issuer (`mesh output` prints https), and every pod with a
/// restrictive security context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cidr_allow_and_tls_reach_the_edge_and_pods_run_restricted() {
    let c = Cluster::new().await;
    c.edit("stacks/customer-mesh/stack.toml", |s| {
        s.replace(
            "[expose.customer-scoring]\ntype = \"NodePort\"\nport = 8080\nnode_port = 30081\nallow = [\"0.0.0.0/0\"]\n",
            "[expose.customer-scoring]\ntype = \"LoadBalancer\"\nport = 8080\nallow = [\"203.0.113.0/24\", \"198.51.100.7/32\"]\n\n\
             [expose.scoring-edge]\nservice = \"customer-scoring\"\ntype = \"Ingress\"\nhost = \"scoring.example.test\"\n\
             allow = [\"10.20.0.0/16\"]\ntls = { secret = \"scoring-cert\" }\n\n\
             [expose.features-edge]\nservice = \"customer-features\"\ntype = \"Ingress\"\nhost = \"features.example.test\"\n\
             allow = [\"customer-scoring\"]\ntls = { issuer = \"letsencrypt\" }\n",
        )
    });
    ok(&c.apply(&[]).await, "apply");
    let (code, _, out) = c.plan_json(&[]).await;
    assert_eq!(code, 0, "a second plan is not empty: {}", text(&out));

    let svc = c.object("v1", "Service", "customer-scoring");
    assert_eq!(
        svc["spec"]["loadBalancerSourceRanges"],
        json!(["203.0.113.0/24", "198.51.100.7/32"]),
        "{svc:#}"
    );
    assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local", "{svc:#}");
    // No certificate on a kubernetes target's load balancer.
    let annotations = &svc["metadata"]["annotations"];
    assert!(
        annotations
            .get("service.beta.kubernetes.io/aws-load-balancer-ssl-cert")
            .is_none(),
        "{svc:#}"
    );

    let ing = c.object("networking.k8s.io/v1", "Ingress", "scoring-edge");
    let a = &ing["metadata"]["annotations"];
    assert_eq!(
        a["nginx.ingress.kubernetes.io/whitelist-source-range"], "10.20.0.0/16",
        "{ing:#}"
    );
    // The ALB controller's annotation is for aws environments only.
    assert!(a.get("alb.ingress.kubernetes.io/inbound-cidrs").is_none());
    assert_eq!(
        ing["spec"]["tls"],
        json!([{ "hosts": ["scoring.example.test"], "secretName": "scoring-cert" }])
    );
    let ing = c.object("networking.k8s.io/v1", "Ingress", "features-edge");
    let a = &ing["metadata"]["annotations"];
    assert_eq!(
        a["cert-manager.io/cluster-issuer"], "letsencrypt",
        "{ing:#}"
    );
    // Services only in `allow`: no source range at the edge (the NetworkPolicy holds).
    assert!(
        a.get("nginx.ingress.kubernetes.io/whitelist-source-range")
            .is_none()
    );
    assert_eq!(
        ing["spec"]["tls"],
        json!([{ "hosts": ["features.example.test"], "secretName": "features-edge-tls" }])
    );

    for name in ["customer-features", "customer-scoring"] {
        let dep = c.object("apps/v1", "Deployment", name);
        let pod = &dep["spec"]["template"]["spec"];
        let sc = &pod["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{name}: {sc}");
        assert_eq!(sc["runAsUser"], 65532, "{name}: {sc}");
        assert_eq!(sc["runAsGroup"], 65532, "{name}: {sc}");
        assert_eq!(sc["fsGroup"], 65532, "{name}: {sc}");
        assert_eq!(
            sc["seccompProfile"]["type"], "RuntimeDefault",
            "{name}: {sc}"
        );
        let csc = &pod["containers"][0]["securityContext"];
        assert_eq!(csc["readOnlyRootFilesystem"], true, "{name}: {csc}");
        assert_eq!(csc["allowPrivilegeEscalation"], false, "{name}: {csc}");
        assert_eq!(csc["runAsNonRoot"], true, "{name}: {csc}");
        assert_eq!(csc["capabilities"]["drop"], json!(["ALL"]), "{name}: {csc}");
        // Nothing writable is needed: the only volumes are read-only mounts.
        for m in pod["containers"][0]["volumeMounts"].as_array().unwrap() {
            assert_eq!(m["readOnly"], true, "{name}: {m}");
        }
    }

    let out = c.run("output", &["--json"], &[]).await;
    ok(&out, "output");
    let urls: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        urls["exposes"]["scoring-edge"]["url"], "https://scoring.example.test",
        "{urls:#}"
    );
    assert_eq!(
        urls["exposes"]["features-edge"]["url"], "https://features.example.test",
        "{urls:#}"
    );
    assert!(
        urls["exposes"]["customer-scoring"]["url"]
            .as_str()
            .is_some_and(|u| u.starts_with("http://")),
        "{urls:#}"
    );

    // Dropping the CIDRs and TLS is planned (the edge fields are compared)
    // and applied.
    c.edit("stacks/customer-mesh/stack.toml", |s| {
        s.replace("tls = { secret = \"scoring-cert\" }\n", "")
            .replace("allow = [\"10.20.0.0/16\"]\n", "allow = []\n")
    });
    let (code, plan, out) = c.plan_json(&[]).await;
    assert_eq!(code, 2, "{}", text(&out));
    assert!(
        changes(&plan).contains(&("expose.scoring-edge.ingress".into(), "update".into())),
        "{plan:#}"
    );
    ok(&c.apply(&[]).await, "apply without TLS");
    let ing = c.object("networking.k8s.io/v1", "Ingress", "scoring-edge");
    assert!(ing["spec"].get("tls").is_none(), "{ing:#}");
    assert!(
        ing["metadata"]["annotations"]
            .get("nginx.ingress.kubernetes.io/whitelist-source-range")
            .is_none(),
        "{ing:#}"
    );
}

/// Secret `name`'s values, decoded.
fn secret_values(c: &Cluster, name: &str) -> std::collections::BTreeMap<String, String> {
    let s = c.object("v1", "Secret", name);
    s["data"]
        .as_object()
        .unwrap_or_else(|| panic!("Secret {name} has no data: {s:#}"))
        .iter()
        .map(|(k, v)| {
            let b: k8s_openapi::ByteString = serde_json::from_value(v.clone()).unwrap();
            (k.clone(), String::from_utf8(b.0).unwrap())
        })
        .collect()
}

/// The mounted Secret volumes of a Deployment's pods: (Secret, mount path).
fn secret_mounts(c: &Cluster, deployment: &str) -> Vec<(String, String)> {
    let dep = c.object("apps/v1", "Deployment", deployment);
    let pod = &dep["spec"]["template"]["spec"];
    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| {
            let v = volumes.iter().find(|v| v["name"] == m["name"])?;
            Some((
                v["secret"]["secretName"].as_str()?.to_owned(),
                m["mountPath"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// What a kubelet does for the pods the double does not run: each Secret
/// volume of `deployment` as files under `root` + its mount path, replaced
/// whole (as the kubelet's atomic writer does) when the Secret changes.
fn sync_volumes(c: &Cluster, deployment: &str, root: &std::path::Path) {
    for (secret, path) in secret_mounts(c, deployment) {
        let dir = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        for (k, v) in secret_values(c, &secret) {
            let tmp = dir.join(format!(".{k}.tmp"));
            std::fs::write(&tmp, v).unwrap();
            std::fs::rename(&tmp, dir.join(k)).unwrap();
        }
    }
}

/// A real runtime for `service` as its pods would run it: the config of its
/// ConfigMap, the mounted files under `root`, the example's data files as
/// the image's bundle, in-cluster URLs led to `upstreams` (host → port).
fn serve_as_pod(
    c: &Cluster,
    service: &str,
    root: &std::path::Path,
    port: u16,
    upstreams: &[(&str, u16)],
) -> std::process::Child {
    let cm = c.object("v1", "ConfigMap", &format!("{service}-config"));
    let mut config = cm["data"]["service.json"].as_str().unwrap().replace(
        "\"/var/run/mesh/",
        &format!("\"{}/var/run/mesh/", root.display()),
    );
    for (host, port) in upstreams {
        config = config.replace(
            &format!("http://{host}.{NS}.svc.cluster.local:8080"),
            &format!("http://127.0.0.1:{port}"),
        );
    }
    let bundle = root.join("bundle");
    let examples = c.dir.path().join("examples/customer-mesh");
    for (rel, from) in [
        ("datasets/demographics.csv", "customers.csv"),
        ("datasets/behavior.csv", "behavior.csv"),
        ("models/high-value.onnx", "high_value.onnx"),
    ] {
        if config.contains(&format!("\"{rel}\"")) {
            let to = bundle.join(rel);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(examples.join(from), to).unwrap();
        }
    }
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("service.json"), &config).unwrap();
    sync_volumes(c, service, root);
    let log = std::fs::File::create(root.join("runtime.log")).unwrap();
    let child = std::process::Command::new(support::local::runtime_bin())
        .args(["serve", "--bundle"])
        .arg(&bundle)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_clear()
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    support::local::wait_for(
        &format!("{service} ready on {port}"),
        std::time::Duration::from_secs(60),
        || match http_get_status_opt(&format!("127.0.0.1:{port}"), "/readyz") {
            Some(200) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    child
}

/// Kills a runtime when the test ends, however it ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sha256` hex and base64 of `value`: what a bare digest of it would look like.
fn bare_digests(value: &str) -> [String; 2] {
    use sha2::Digest;
    let d = sha2::Sha256::digest(value.as_bytes());
    let b64 = serde_json::to_value(k8s_openapi::ByteString(d.to_vec())).unwrap();
    [hex::encode(d), b64.as_str().unwrap().to_owned()]
}

/// `allow` holds on a cluster whatever its CNI does: one key per identity
/// (each service's and the operator's) as Secrets made at apply and never
/// planned, mounted only into the pods that need them (a caller its own
/// key, the called service the verifiers); two real runtimes given those
/// files answer 401 without or with an unknown key, 403 to a known caller
/// that is not allowed, 200 to an allowed one; `mesh apply --rotate-keys`
/// fails none of 2,000+ calls made across it and the old key is refused
/// after; and no output holds a bare SHA-256 of any secret value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_keys_are_mounted_where_needed_enforced_and_rotated() {
    let c = Cluster::new().await;
    const VAR: &str = "MESH_E2E_SCORING_API_KEY";
    const PASSWORD: &str = "scoring-key-5e1f0a";
    let env = [(VAR, PASSWORD), ("MESH_KEY_PROPAGATION_SECS", "3")];
    c.edit("stacks/customer-mesh/stack.toml", |s| {
        s.replace("[service.customer-scoring]\nversion = \"1.0.0\"\n", &format!("[service.customer-scoring]\nversion = \"1.0.0\"\napi_keys = [{{ env = \"{VAR}\" }}]\n"))
    });
    let mut outputs: Vec<String> = Vec::new();

    // Planned as resources, with no value.
    let plan_text = c.run("plan", &[], &env).await;
    ok(&plan_text, "plan");
    let (_, plan, out) = c.plan_json(&env).await;
    let planned = changes(&plan);
    for address in [
        "identity.operator",
        "identity.customer-scoring",
        "identity.customer-features",
        "verifiers.callers",
        "digest_key.stack",
    ] {
        assert!(
            planned.contains(&(address.into(), "create".into())),
            "{address} not planned: {planned:?}"
        );
    }
    outputs.extend([text(&plan_text), text(&out)]);
    let out = c.apply(&env).await;
    ok(&out, "apply");
    outputs.push(text(&out));

    // A key per identity; each pod mounts exactly what it needs.
    let key_of = |caller: &str| secret_values(&c, &format!("mesh-key-{caller}"))[caller].clone();
    let keys: Vec<String> = ["operator", "customer-scoring", "customer-features"]
        .iter()
        .map(|caller| key_of(caller))
        .collect();
    for k in &keys {
        assert_eq!(k.len(), 64, "a 256-bit key, hex");
    }
    let verifiers = secret_values(&c, "mesh-verifiers");
    assert_eq!(verifiers.len(), 3, "{verifiers:?}");
    assert!(
        keys.iter()
            .all(|k| verifiers.values().all(|v| !v.contains(k.as_str())))
    );
    assert_eq!(
        secret_mounts(&c, "customer-scoring"),
        [
            (
                "customer-scoring-secrets".into(),
                "/var/run/mesh/secrets".into()
            ),
            (
                "mesh-key-customer-scoring".into(),
                "/var/run/mesh/keys/keys".into()
            ),
        ],
        "the caller: its own key, no verifier"
    );
    assert_eq!(
        secret_mounts(&c, "customer-features"),
        [(
            "mesh-verifiers".into(),
            "/var/run/mesh/keys/verifiers".into()
        )],
        "the called service: the verifiers, no key"
    );
    for o in c
        .double
        .objects_with_label(&format!("mesh.dev/stack={STACK}"))
    {
        assert!(
            !o.to_string().contains("\"mesh-key-operator\"") || o["kind"] == "Secret",
            "the operator's key is mounted: {o:#}"
        );
    }
    let (code, _, out) = c.plan_json(&env).await;
    assert_eq!(code, 0, "nothing to change after apply: {}", text(&out));
    let saved = c.dir.path().join("saved-plan.json");
    let out = c
        .run("plan", &["--out", saved.to_str().unwrap()], &env)
        .await;
    ok(&out, "plan --out");
    outputs.push(text(&out));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&saved).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the saved plan is private");
    outputs.push(std::fs::read_to_string(&saved).unwrap());
    let out = c.run("output", &["--json"], &env).await;
    ok(&out, "output");
    let urls: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        urls["exposes"]["customer-features"]["api_key_secret"],
        format!("{NS}/mesh-key-operator"),
        "{urls:#}"
    );
    outputs.push(text(&out));

    // Two runtimes with the files as mounted: customer-scoring calls
    // customer-features with its own key.
    let features_root = c.dir.path().join("pod-features");
    let scoring_root = c.dir.path().join("pod-scoring");
    let (fp, sp) = (free_port(), free_port());
    let _features = Reaped(serve_as_pod(
        &c,
        "customer-features",
        &features_root,
        fp,
        &[],
    ));
    let _scoring = Reaped(serve_as_pod(
        &c,
        "customer-scoring",
        &scoring_root,
        sp,
        &[("customer-features", fp)],
    ));
    let lookup = format!("http://127.0.0.1:{fp}/public/api/v1/customer-features/behavior/lookup");
    let predict =
        format!("http://127.0.0.1:{sp}/public/api/v1/customer-scoring/high-value/predict");
    let ask = json!({"data": {"customer_id": "C00042"}});
    let by_id = json!({"features": {"customer_id": "C00042"}});
    let post = support::local::post;
    let (status, body) = post(&lookup, &ask, None);
    assert_eq!(
        (status, &body["error"]["code"]),
        (401, &json!("unauthorized")),
        "{body}"
    );
    let (status, body) = post(&lookup, &ask, Some("a-key-nobody-holds"));
    assert_eq!(status, 401, "{body}");
    let (status, body) = post(&lookup, &ask, Some(&key_of("customer-features")));
    assert_eq!(
        (status, &body["error"]["code"]),
        (403, &json!("forbidden")),
        "{body}"
    );
    assert!(!body.to_string().contains(&key_of("customer-features")));
    let (status, body) = post(&lookup, &ask, Some(&key_of("operator")));
    assert_eq!(status, 200, "the operator: {body}");
    let (status, body) = post(&predict, &by_id, Some(PASSWORD));
    assert_eq!(
        status, 200,
        "the allowed caller, through its runtime: {body}"
    );

    // Rotation under load: every call succeeds; the kubelet stand-in keeps
    // the pods' files in step with the Secrets.
    let old_operator = key_of("operator");
    let old_scoring = key_of("customer-scoring");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, predict, by_id) = (stop.clone(), predict.clone(), by_id.clone());
        std::thread::spawn(move || {
            let (mut n, mut failures) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || n < 2000 {
                n += 1;
                match support::local::try_request("POST", &predict, Some(&by_id), Some(PASSWORD)) {
                    Ok((200, _)) => {}
                    Ok((status, body)) => failures.push(format!("{status}: {body}")),
                    Err(e) => failures.push(e),
                }
            }
            (n, failures)
        })
    };
    let rotating = std::sync::atomic::AtomicBool::new(true);
    let (out, ()) = tokio::join!(
        async {
            let out = c
                .run("apply", &["--auto-approve", "--rotate-keys"], &env)
                .await;
            rotating.store(false, std::sync::atomic::Ordering::SeqCst);
            out
        },
        async {
            while rotating.load(std::sync::atomic::Ordering::SeqCst) {
                sync_volumes(&c, "customer-features", &features_root);
                sync_volumes(&c, "customer-scoring", &scoring_root);
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    );
    ok(&out, "apply --rotate-keys");
    outputs.push(text(&out));
    sync_volumes(&c, "customer-features", &features_root);
    sync_volumes(&c, "customer-scoring", &scoring_root);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (n, failures) = load.join().unwrap();
    assert!(n >= 2000, "{n} calls");
    assert!(
        failures.is_empty(),
        "{} of {n} calls failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_ne!(key_of("operator"), old_operator, "rotated");
    assert_ne!(key_of("customer-scoring"), old_scoring, "rotated");
    let (status, _) = post(&lookup, &ask, Some(&old_operator));
    assert_eq!(status, 401, "the old key is refused");
    let (status, body) = post(&lookup, &ask, Some(&key_of("operator")));
    assert_eq!(status, 200, "the new key: {body}");
    let (code, _, out) = c.plan_json(&env).await;
    assert_eq!(code, 0, "a rotation leaves nothing to plan: {}", text(&out));

    // No bare SHA-256 of any secret value anywhere.
    for o in c
        .double
        .objects_with_label(&format!("mesh.dev/stack={STACK}"))
    {
        outputs.push(o.to_string());
    }
    for root in [&features_root, &scoring_root] {
        outputs.push(std::fs::read_to_string(root.join("runtime.log")).unwrap());
    }
    let mut values = vec![PASSWORD.to_owned(), old_operator, old_scoring];
    values.extend(keys);
    values.extend(["operator", "customer-scoring", "customer-features"].map(key_of));
    for v in &values {
        for d in bare_digests(v) {
            for o in &outputs {
                assert!(
                    !o.contains(&d),
                    "a bare SHA-256 of a secret value: {d} in\n{o}"
                );
            }
        }
    }
    ok(
        &c.run("destroy", &["--auto-approve"], &env).await,
        "destroy",
    );
}
