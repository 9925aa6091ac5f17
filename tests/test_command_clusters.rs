//! `mesh test` on cluster targets, through the real `mesh` binary: the
//! customer mesh's `existing` environment (target `kubernetes`) on the
//! Kubernetes API double, and an `aws` environment whose AWS resources are in
//! moto (`MESH_TEST_AWS_ENDPOINT`) and whose cluster is the double (a cluster
//! of kind `existing`: moto's EKS endpoints answer nothing).
//!
//! Pods never run on the double. A stand-in for the cluster's network
//! (`support::cluster_proxy`, handed to mesh as `http_proxy`) sends the
//! queries for the instance's in-cluster URLs to real `mesh-runtime`s serving
//! the same stack on this machine (its `local` environment, applied first).
//!
//! Every run ends with the instance's namespace and every object labelled
//! with its environment gone from the double, and nothing tagged with it in
//! moto, while the environment itself, applied beforehand with `mesh apply`,
//! keeps all its objects (same uid, same generation) and AWS resources.
#![cfg(feature = "kubernetes")]

mod support;

use std::collections::BTreeMap;
use std::process::{Output, Stdio};
use std::time::Instant;

use kube_double::KubeDouble;
use serde_json::Value;
use support::cluster_proxy::{ClusterProxy, Route};
use support::local::{Env, ok};
use support::{show, stderr, stdout};

/// The stack copy with its `local` environment applied (the runtimes that
/// answer), the double, and the files `mesh` needs to reach it.
struct Cluster {
    local: Env,
    double: KubeDouble,
    files: tempfile::TempDir,
    registry: String,
    /// The stack's name (also its namespace).
    name: String,
    /// The cluster environment under test.
    env: &'static str,
    /// moto's endpoint, for an `aws` environment.
    aws: Option<String>,
}

/// What of an environment is on the double: kind, namespace, name → (uid, generation).
type Objects = BTreeMap<(String, String, String), (String, Option<i64>)>;

impl Cluster {
    /// The customer mesh named `name`, `edit`ed, applied on the local
    /// target; a double with a kubeconfig context `test` pointing at it.
    async fn new(
        name: &str,
        env: &'static str,
        aws: Option<String>,
        edit: impl Fn(String) -> String,
    ) -> Cluster {
        let local = Env::new(|t| {
            edit(t.replace("name = \"customer-mesh\"", &format!("name = \"{name}\"")))
        });
        let files = tempfile::tempdir().unwrap();
        let double = KubeDouble::start().await;
        std::fs::write(
            files.path().join("kubeconfig"),
            double.kubeconfig_yaml("test"),
        )
        .unwrap();
        support::stand_in_runtime(files.path());
        Cluster {
            local,
            double,
            registry: format!(
                "{}/mesh-test-{}",
                support::test_registry(),
                support::unique("c")
            ),
            files,
            name: name.to_owned(),
            env,
            aws,
        }
    }

    /// `mesh VERB STACK --env ENV EXTRA...` against the double (and moto).
    fn command(&self, verb: &str, extra: &[&str]) -> tokio::process::Command {
        tokio::process::Command::from(self.std_command(verb, extra))
    }

    fn std_command(&self, verb: &str, extra: &[&str]) -> std::process::Command {
        let mut cmd = self.local.command_in(verb, self.env, extra);
        cmd.env("KUBECONFIG", self.files.path().join("kubeconfig"))
            .env("MESH_KUBE_CONTEXT", "test")
            .env("MESH_REGISTRY", &self.registry)
            .env(
                "MESH_RUNTIME_STATIC_BIN",
                self.files.path().join("mesh-runtime"),
            )
            // Only the queries' in-cluster URLs go through the proxy.
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env("no_proxy", "127.0.0.1,localhost")
            .stdin(Stdio::null());
        #[cfg(feature = "aws")]
        if let Some(endpoint) = &self.aws {
            support::aws::point_at(&mut cmd, endpoint);
        }
        cmd
    }

    async fn mesh(&self, verb: &str, extra: &[&str]) -> Output {
        self.command(verb, extra).output().await.unwrap()
    }

    /// `mesh test --instance INSTANCE EXTRA...`, its queries through `proxy`.
    fn test_command(
        &self,
        instance: &str,
        proxy: &ClusterProxy,
        extra: &[&str],
    ) -> tokio::process::Command {
        let mut args = vec!["--instance", instance];
        args.extend_from_slice(extra);
        let mut cmd = self.command("test", &args);
        cmd.env("http_proxy", &proxy.url);
        cmd
    }

    async fn test(&self, instance: &str, proxy: &ClusterProxy, extra: &[&str]) -> Output {
        let started = Instant::now();
        let out = self
            .test_command(instance, proxy, extra)
            .output()
            .await
            .unwrap();
        eprintln!(
            "mesh test --env {} {extra:?}: {:.1} s",
            self.env,
            started.elapsed().as_secs_f64()
        );
        out
    }

    /// The instance's namespace.
    fn namespace(&self, instance: &str) -> String {
        format!("{}-{instance}", self.name)
    }

    /// The cluster's network for instance `instance`: its services'
    /// in-cluster URLs lead to the local runtimes of the same services.
    fn proxy(&self, instance: &str) -> ClusterProxy {
        let ns = self.namespace(instance);
        let route = |port: u16, api_key: Option<String>| Route {
            backend: format!("127.0.0.1:{port}"),
            api_key,
        };
        ClusterProxy::start(BTreeMap::from([
            (
                format!("customer-features.{ns}.svc.cluster.local:8080"),
                route(
                    self.local.ports[0],
                    Some(self.local.operator_key("customer-features")),
                ),
            ),
            (
                format!("customer-scoring.{ns}.svc.cluster.local:8080"),
                route(self.local.ports[1], None),
            ),
        ]))
    }

    /// Every object on the double labelled for environment `env` of the stack.
    fn objects(&self, env: &str) -> Objects {
        self.double
            .objects_with_label(&format!("mesh.dev/stack={},mesh.dev/env={env}", self.name))
            .iter()
            .map(|o| {
                let m = &o["metadata"];
                let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
                (
                    (s(&o["kind"]), s(&m["namespace"]), s(&m["name"])),
                    (s(&m["uid"]), m["generation"].as_i64()),
                )
            })
            .collect()
    }

    /// Applies the environment itself; what it put on the double.
    async fn apply_environment(&self) -> Objects {
        let out = self.mesh("apply", &["--auto-approve"]).await;
        ok(&out, "applying the environment itself");
        let objects = self.objects(self.env);
        assert!(
            objects.contains_key(&(
                "Deployment".into(),
                self.name.clone(),
                "customer-scoring".into()
            )),
            "{objects:?}"
        );
        objects
    }

    /// Nothing of the instance is on the double, and nothing is left of its
    /// local state; the environment's objects are those of `before`, untouched.
    fn assert_only_the_environment_is_left(&self, instance: &str, before: &Objects, out: &Output) {
        let text = show(out);
        let ns = self.namespace(instance);
        assert!(
            self.double.object("v1", "Namespace", "", &ns).is_none(),
            "namespace {ns} is still there\n{text}"
        );
        let env = format!("{}-{instance}", self.env);
        let left = self.objects(&env);
        assert!(
            left.is_empty(),
            "objects labelled mesh.dev/env={env} left: {left:?}\n{text}"
        );
        assert!(
            !self.local.stack.join(".mesh").join(&env).exists(),
            "the instance's state folder is left\n{text}"
        );
        assert_eq!(
            &self.objects(self.env),
            before,
            "the environment's own objects changed\n{text}"
        );
        assert!(
            stderr(out).contains("found nothing left"),
            "the command says the sweep found nothing\n{text}"
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The environment on the double goes with it; in moto it must be destroyed.
        if self.aws.is_some() {
            let _ = self.std_command("destroy", &["--auto-approve"]).output();
        }
    }
}

/// `out` exited with `code`, and says each of `on_stdout` and `on_stderr` there.
fn assert_run(out: &Output, code: i32, on_stdout: &[&str], on_stderr: &[&str]) {
    assert_eq!(out.status.code(), Some(code), "{}", show(out));
    for part in on_stdout {
        assert!(
            stdout(out).contains(part),
            "stdout lacks {part:?}\n{}",
            show(out)
        );
    }
    for part in on_stderr {
        assert!(
            stderr(out).contains(part),
            "stderr lacks {part:?}\n{}",
            show(out)
        );
    }
}

/// Every host the queries asked for is an in-cluster name in the instance's namespace.
fn assert_queries_went_to(proxy: &ClusterProxy, ns: &str) {
    let asked = proxy.asked();
    assert!(!asked.is_empty(), "no query reached the cluster's network");
    let suffix = format!(".{ns}.svc.cluster.local:8080");
    assert!(
        asked.iter().all(|h| h.ends_with(&suffix)),
        "queries outside the instance's namespace {ns}: {asked:?}"
    );
}

/// The header says the instance reuses the environment's cluster and registry.
fn assert_reuses_the_platform(out: &Output, ns: &str) {
    let err = stderr(out);
    let header = err
        .lines()
        .find(|l| l.starts_with("Testing stack"))
        .unwrap_or_else(|| panic!("no header\n{}", show(out)));
    assert!(
        header.contains(&format!(
            "services in namespace {ns} on the environment's cluster"
        )) && header.contains("reused: the instance creates no network, cluster or registry"),
        "{header}"
    );
}

/// A passing run, then a failing expectation: each leaves nothing of its instance.
async fn pass_then_fail(c: &Cluster, before: &Objects) -> Vec<Output> {
    let instance = support::unique("tp");
    let proxy = c.proxy(&instance);
    let out = c.test(&instance, &proxy, &[]).await;
    assert_run(&out, 0, &["5 passed, 0 failed"], &[]);
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("customer-scoring")
                && l.contains("by-id")
                && l.contains("passed")),
        "{}",
        show(&out)
    );
    assert_reuses_the_platform(&out, &c.namespace(&instance));
    assert_queries_went_to(&proxy, &c.namespace(&instance));
    c.assert_only_the_environment_is_left(&instance, before, &out);
    let passed = out;

    let file = c.local.stack.join("stack.toml");
    let toml = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        toml.replace("prediction = \"1\"", "prediction = \"0\""),
    )
    .unwrap();
    let instance = support::unique("tf");
    let proxy = c.proxy(&instance);
    let out = c.test(&instance, &proxy, &[]).await;
    assert_run(
        &out,
        1,
        &[
            "4 passed, 1 failed",
            "    prediction: expected \"0\", got \"1\"",
        ],
        &[],
    );
    assert_queries_went_to(&proxy, &c.namespace(&instance));
    c.assert_only_the_environment_is_left(&instance, before, &out);
    std::fs::write(&file, toml).unwrap();
    vec![passed, out]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kubernetes_an_instance_runs_in_a_namespace_of_its_own_and_leaves_nothing() {
    let c = Cluster::new("customer-mesh", "existing", None, |t| t).await;
    let before = c.apply_environment().await;
    pass_then_fail(&c, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kubernetes_a_query_timeout_and_ctrl_c_still_tear_the_instance_down() {
    let c = Cluster::new("customer-mesh", "existing", None, |t| t).await;
    let before = c.apply_environment().await;

    // The cluster's network takes the queries and never answers.
    let instance = support::unique("tt");
    let proxy = c.proxy(&instance);
    proxy.hold();
    let out = c.test(&instance, &proxy, &["--timeout", "1s"]).await;
    // Each query gives up after --timeout.
    assert_run(
        &out,
        1,
        &["0 passed, 5 failed", "within 1s (--timeout)"],
        &[],
    );
    c.assert_only_the_environment_is_left(&instance, &before, &out);

    // Ctrl-C while the queries hang.
    let instance = support::unique("ti");
    let proxy = c.proxy(&instance);
    proxy.hold();
    let mut child = c
        .test_command(&instance, &proxy, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stderr.take().unwrap()));
    let mut err = String::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.starts_with("Sending 5 test queries") {
            // Let the queries reach the (silent) network first.
            let deadline = Instant::now() + std::time::Duration::from_secs(30);
            while proxy.asked().len() < 5 && Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .unwrap();
        }
        err.push_str(&line);
        err.push('\n');
    }
    let status = child.wait().await.unwrap();
    let out = Output {
        status,
        stdout: Vec::new(),
        stderr: err.into_bytes(),
    };
    assert_run(
        &out,
        130,
        &[],
        &[
            "Interrupted: destroying the test instance",
            "error: interrupted during the test queries",
        ],
    );
    c.assert_only_the_environment_is_left(&instance, &before, &out);
}

#[cfg(feature = "aws")]
mod aws {
    use super::*;
    use aws_fault_proxy::moto_endpoint;
    use support::aws::{customer_mesh_named, leftovers, leftovers_of, platform_named};

    /// `mesh test` of a stack on moto (no cluster needed).
    async fn test_on_moto(stack: &std::path::Path, env: &str, instance: &str) -> Output {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mesh"));
        cmd.arg("test")
            .arg(stack)
            .args(["--env", env, "--instance", instance])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        support::aws::point_at(&mut cmd, &support::aws::endpoint());
        let started = Instant::now();
        let out = tokio::process::Command::from(cmd).output().await.unwrap();
        eprintln!(
            "mesh test --env {env} (moto): {:.1} s",
            started.elapsed().as_secs_f64()
        );
        out
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_aws_an_instance_deploys_onto_the_environments_cluster_and_registry() {
        let name = support::unique("ct");
        let registry = format!("{}/mesh-test-{name}", support::test_registry());
        // An aws environment: its network, EKS cluster and ECR registry in
        // moto (module.platform), its services on the double.
        let cloud = format!(
            "\n[environment.cloud]\ntarget = \"aws\"\nregion = \"us-east-1\"\ncluster = \"existing\"\nregistry = \"{registry}\"\n"
        );
        let c = Cluster::new(&name, "cloud", Some(support::aws::endpoint()), move |t| {
            t + &cloud
        })
        .await;
        let before = c.apply_environment().await;
        let moto = moto_endpoint();
        let cloud_before = sorted(leftovers_of(&moto, &name, Some("cloud")).await);
        assert!(
            cloud_before.iter().any(|r| r.starts_with("vpc-")),
            "the environment's network is in moto: {cloud_before:?}"
        );

        for out in pass_then_fail(&c, &before).await {
            // The instance builds no network, cluster or registry.
            for platform in ["network.platform", "cluster.platform", "registry.platform"] {
                assert!(
                    !stderr(&out).contains(platform),
                    "the instance plans {platform}\n{}",
                    show(&out)
                );
            }
        }
        let instances: Vec<String> = leftovers(&moto, &name)
            .await
            .into_iter()
            .filter(|r| !cloud_before.contains(r))
            .collect();
        assert!(
            instances.is_empty(),
            "left in moto besides the environment's own: {instances:?}"
        );
        assert_eq!(
            sorted(leftovers_of(&moto, &name, Some("cloud")).await),
            cloud_before,
            "the environment's AWS resources changed"
        );
        let out = c.mesh("destroy", &["--auto-approve"]).await;
        ok(&out, "destroying the environment");
        assert_eq!(leftovers(&moto, &name).await, Vec::<String>::new());
    }

    #[tokio::test]
    async fn on_aws_an_instance_of_a_stack_with_services_needs_the_environment_applied() {
        let dir = tempfile::tempdir().unwrap();
        let name = support::unique("na");
        let stack = customer_mesh_named(dir.path(), &name);
        let out = test_on_moto(&stack, "dev", &support::unique("t")).await;
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let err = stderr(&out);
        assert!(
            err.contains("help: apply the environment first: `mesh apply ")
                && err.contains(&format!(
                    "{} --env dev`",
                    stack.file_name().unwrap().to_string_lossy()
                )),
            "{}",
            show(&out)
        );
        assert!(
            stderr(&out).contains("environment `dev`'s registry.platform"),
            "{}",
            show(&out)
        );
        assert_eq!(
            leftovers(&moto_endpoint(), &name).await,
            Vec::<String>::new(),
            "nothing is created: {}",
            show(&out)
        );
    }

    #[tokio::test]
    async fn on_aws_an_instance_of_a_platform_stack_builds_and_removes_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let name = support::unique("pt");
        let stack = platform_named(dir.path(), &name);
        let instance = support::unique("t");
        let out = test_on_moto(&stack, "dev", &instance).await;
        ok(&out, "mesh test of a platform stack");
        let err = stderr(&out);
        assert!(
            err.contains("a platform stack (no services): the instance builds its own network, cluster and registry")
                && err.contains(&format!("tagged mesh:env=dev-{instance}")),
            "{}",
            show(&out)
        );
        for created in ["network.main", "cluster.main", "registry.services"] {
            assert!(
                err.lines()
                    .any(|l| l.contains("create") && l.contains(created)),
                "the instance builds {created}: {}",
                show(&out)
            );
        }
        assert!(err.contains("found nothing left"), "{}", show(&out));
        assert_eq!(
            leftovers_of(&moto_endpoint(), &name, Some(&format!("dev-{instance}"))).await,
            Vec::<String>::new()
        );
        assert_eq!(
            leftovers(&moto_endpoint(), &name).await,
            Vec::<String>::new()
        );
    }
}
