//! Run with: eval "$(scripts/services env)" && cargo bench --features aws --bench aws_plan
//!
//! What a user waits for on a no-op plan against moto: a stack of one
//! network with 100 subnets (and one NAT gateway) and 20 ECR registries is
//! applied once with `mesh apply`, then the real `mesh plan` runs several
//! times with nothing to do, a fresh process each time as a user runs it
//! (the providers set up, the stack's desired state, live state read,
//! diffed). Prints the AWS API calls one plan makes (counted by the fault
//! proxy in front of moto, per action), the wall times, and their median
//! over the floor measured in the same run (`mesh validate` of the same
//! stack: process start and stack loading). The stack is destroyed at the end.

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use aws_fault_proxy::{FaultProxy, moto_endpoint};
use support::{Series, expect_code, mesh, ms, timed};

const SUBNETS: usize = 100;
const REGISTRIES: usize = 20;
const RUNS: usize = 5;

fn stack_toml(name: &str) -> String {
    let mut s = format!(
        "[stack]\nname = \"{name}\"\n\n[environment.bench]\ntarget = \"aws\"\nregion = \"us-east-1\"\n\n\
         [network.big]\ncidr = \"10.60.0.0/16\"\ntags = {{ team = \"bench\" }}\nnat_gateway = \"single\"\n\n"
    );
    for i in 0..SUBNETS {
        let zone = if i % 2 == 0 {
            "us-east-1a"
        } else {
            "us-east-1b"
        };
        let _ = write!(
            s,
            "[network.big.subnet.s{i:03}]\nzone = \"{zone}\"\ncidr = \"10.60.{i}.0/24\"\npublic = {}\n\n",
            i < 10
        );
    }
    for i in 0..REGISTRIES {
        let _ = write!(
            s,
            "[registry.reg{i:02}]\nscan_on_push = true\nimmutable_tags = {}\nkeep_last = 10\n\n",
            i % 2 == 0
        );
    }
    s
}

fn main() {
    let proxy = FaultProxy::start(&moto_endpoint());
    let endpoint = proxy.endpoint();
    let envs = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    let name = format!("bench{}", std::process::id());
    std::fs::write(dir.path().join("stack.toml"), stack_toml(&name)).expect("stack.toml");
    let path = dir.path().to_str().expect("utf-8 path");
    let run = |args: &[&str], code: i32, what: &str| -> Duration {
        let (out, t) = timed(mesh(args).env_remove("AWS_PROFILE").envs(envs));
        expect_code(&out, code, what);
        t
    };

    println!(
        "aws_plan: {SUBNETS} subnets, {REGISTRIES} registries; load {}",
        support::load()
    );
    let floor = support::validate_floor(dir.path(), "bench", RUNS, &envs);
    println!("  floor (mesh validate, same stack): {}", floor.text());
    let apply = run(
        &["apply", path, "--env", "bench", "--auto-approve"],
        0,
        "apply",
    );
    println!(
        "  mesh apply: {:.1} s, {} API requests",
        apply.as_secs_f64(),
        proxy.total_requests()
    );

    let mut times = Vec::new();
    let mut requests = Vec::new();
    let mut per_action: BTreeMap<String, usize> = BTreeMap::new();
    for run_no in 0..RUNS {
        proxy.reset();
        times.push(run(
            &["plan", path, "--env", "bench", "--detailed-exitcode"],
            0,
            "no-op plan",
        ));
        requests.push(proxy.total_requests());
        if run_no == 0 {
            for c in proxy.calls() {
                *per_action
                    .entry(format!("{}:{}", c.service, c.action))
                    .or_default() += 1;
            }
        }
    }
    let noop = Series::of(times);
    println!("  no-op plan: API requests per plan {requests:?}");
    for (action, n) in &per_action {
        println!("    {action:<40} {n}");
    }
    println!(
        "  no-op plan wall time: {} = {:.1}x floor (floor median {:.0} ms)",
        noop.text(),
        noop.ratio(&floor),
        ms(floor.median)
    );
    println!("  load after: {}", support::load());

    run(
        &["destroy", path, "--env", "bench", "--auto-approve"],
        0,
        "destroy",
    );
}
