//! Run with: eval "$(scripts/services env)" && cargo bench --features kubernetes --bench kubernetes_plan
//!
//! What a user waits for when planning 100 services on the `kubernetes`
//! target: the real `mesh plan`, a fresh process each time as a user runs
//! it, against the API test double (in this process, reached through a
//! kubeconfig). A cold plan (every image built to learn its digest), a warm
//! plan (digests remembered in the stack's state folder), then, once `mesh
//! apply` has pushed the images to the registry at `MESH_TEST_REGISTRY` and
//! rolled them out, no-op plans. Prints wall times, the API requests each
//! plan makes, and each median over the floor measured in the same run
//! (`mesh validate` of the same stack: process start and stack loading).
//!
//! The images ship the real runtime: `MESH_RUNTIME_STATIC_BIN`, else the
//! release `mesh-runtime` beside this bench; without one the bench refuses
//! to run.

mod support;

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use kube_double::KubeDouble;
use support::{Series, expect_code, megabytes, mesh, ms, real_runtime, timed};

const SERVICES: usize = 100;
const RUNS: usize = 5;

/// 100 lookup services, each with its own version (so its own bundle and
/// image), each exposed on a ClusterIP to the one before it.
fn stack_toml(name: &str) -> String {
    let mut s = format!(
        "[stack]\nname = \"{name}\"\n\n[environment.bench]\ntarget = \"kubernetes\"\ncluster = \"c\"\n\n\
         [cluster.c]\nkind = \"existing\"\ncontext = \"bench\"\n\n"
    );
    for i in 0..SERVICES {
        let svc = format!("svc-{i:03}");
        let allow = if i == 0 {
            "\"10.0.0.0/8\"".to_owned()
        } else {
            format!("\"svc-{:03}\"", i - 1)
        };
        let _ = write!(
            s,
            "[service.{svc}]\nversion = \"1.0.{i}\"\nreplicas = {}\nresources = {{ cpu = \"100m\", memory = \"128Mi\" }}\n\
             [service.{svc}.dataset.customers]\nfile = \"customers.csv\"\nkey = \"customer_id\"\n\
             [service.{svc}.endpoint.customers]\nkind = \"lookup\"\ndatasets = [\"customers\"]\n\
             [expose.{svc}]\ntype = \"ClusterIP\"\nport = 8080\nallow = [{allow}]\n\n",
            1 + i % 3
        );
    }
    s
}

fn main() {
    let registry = std::env::var("MESH_TEST_REGISTRY").unwrap_or_else(|_| panic!("MESH_TEST_REGISTRY is not set: run `scripts/services start` and `eval \"$(scripts/services env)\"`"));
    let runtime = real_runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("stack");
    std::fs::create_dir_all(&root).expect("stack folder");
    let name = format!("bench{}", std::process::id());
    std::fs::write(root.join("stack.toml"), stack_toml(&name)).expect("stack.toml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/customer-mesh/customers.csv"),
        root.join("customers.csv"),
    )
    .expect("customers.csv");

    // The double serves from this runtime's threads; `mesh` runs as a child process.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let double = rt.block_on(KubeDouble::start());
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, double.kubeconfig_yaml("bench")).expect("kubeconfig");
    let repository = format!("{registry}/bench");
    let envs = [
        ("KUBECONFIG", kubeconfig.to_str().expect("utf-8 path")),
        ("MESH_REGISTRY", repository.as_str()),
        (
            "MESH_RUNTIME_STATIC_BIN",
            runtime.to_str().expect("utf-8 path"),
        ),
    ];
    let path = root.to_str().expect("utf-8 path");
    let run = |args: &[&str], code: i32, what: &str| -> (Duration, u64) {
        let before = double.request_count();
        let (out, t) = timed(mesh(args).envs(envs));
        expect_code(&out, code, what);
        (t, double.request_count() - before)
    };
    let plan = ["plan", path, "--env", "bench", "--detailed-exitcode"];

    println!(
        "kubernetes_plan: {SERVICES} services, runtime {} ({:.1} MB), load {}",
        runtime.display(),
        megabytes(&runtime),
        support::load()
    );
    let floor = support::validate_floor(&root, "bench", RUNS, &envs);
    println!("  floor (mesh validate, same stack): {}", floor.text());
    let (cold, requests) = run(&plan, 2, "cold plan");
    println!(
        "  cold plan (every image built): {:.0} ms ({:.1}x floor), {requests} API requests",
        ms(cold),
        cold.as_secs_f64() / floor.median.as_secs_f64()
    );
    let (warm, requests) = run(&plan, 2, "warm plan");
    println!(
        "  warm plan (digests remembered), empty cluster: {:.0} ms ({:.1}x floor), {requests} API requests",
        ms(warm),
        warm.as_secs_f64() / floor.median.as_secs_f64()
    );
    let (apply, requests) = run(
        &[
            "apply",
            path,
            "--env",
            "bench",
            "--auto-approve",
            "--parallelism",
            "10",
        ],
        0,
        "apply",
    );
    println!(
        "  mesh apply (images pushed, rollouts awaited): {:.1} s, {requests} API requests",
        apply.as_secs_f64()
    );
    let mut times = Vec::new();
    let mut requests = Vec::new();
    for _ in 0..RUNS {
        let (t, n) = run(&plan, 0, "no-op plan");
        times.push(t);
        requests.push(n);
    }
    let noop = Series::of(times);
    println!(
        "  no-op plan ({} live objects): {} = {:.1}x floor; API requests per plan {requests:?}",
        double
            .objects_with_label(&format!("mesh.dev/stack={name}"))
            .len(),
        noop.text(),
        noop.ratio(&floor)
    );
    println!("  load after: {}", support::load());
}
