//! Run with: eval "$(scripts/services env)" && cargo bench --features aws --bench aws_plan
//!
//! The cost of a no-op plan against moto: a stack of one network with 100
//! subnets (and one NAT gateway) and 20 ECR registries is applied once, then
//! planned again several times with nothing to do. Prints the AWS API calls
//! one plan makes (counted by the fault proxy in front of moto, per action)
//! and the wall time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aws_fault_proxy::{FaultProxy, moto_endpoint};
use mesh::plan;
use mesh::provider::aws::{AwsConfig, AwsProvider};
use mesh::provider::{ApplyContext, Provider};
use mesh::resource::Scope;
use mesh::stack::{Environment, NatGateways, Network, Registry, Stack, Subnet, Target};

const SUBNETS: usize = 100;
const REGISTRIES: usize = 20;
const RUNS: usize = 5;

fn stack(name: &str) -> Stack {
    let subnets = (0..SUBNETS)
        .map(|i| Subnet {
            name: format!("s{i:03}"),
            zone: if i % 2 == 0 {
                "us-east-1a".into()
            } else {
                "us-east-1b".into()
            },
            cidr: format!("10.60.{i}.0/24").parse().expect("cidr"),
            public: i < 10,
        })
        .collect();
    let network = Network {
        name: "big".into(),
        cidr: "10.60.0.0/16".parse().expect("cidr"),
        subnets,
        tags: BTreeMap::from([("team".to_owned(), "bench".to_owned())]),
        // What the stack language gives a network with public and private subnets.
        nat_gateway: NatGateways::Single,
    };
    let registries = (0..REGISTRIES)
        .map(|i| {
            let name = format!("reg{i:02}");
            (
                name.clone(),
                Registry {
                    name,
                    scan_on_push: true,
                    immutable_tags: i % 2 == 0,
                    keep_last: Some(10),
                },
            )
        })
        .collect();
    Stack {
        name: name.to_owned(),
        root: PathBuf::from("."),
        env: Environment {
            name: "bench".into(),
            target: Target::Aws,
            region: Some("us-east-1".into()),
            cluster: None,
            registry: None,
            namespace: None,
            instance: None,
        },
        networks: BTreeMap::from([("big".to_owned(), network)]),
        clusters: BTreeMap::new(),
        registries,
        connections: BTreeMap::new(),
        services: BTreeMap::new(),
        exposes: BTreeMap::new(),
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let proxy = FaultProxy::start(&moto_endpoint());
    let config = AwsConfig {
        endpoint_url: Some(proxy.endpoint()),
        dependency_timeout: Duration::from_secs(10),
        dependency_backoff: Duration::from_millis(50),
        ..AwsConfig::default()
    };
    let p = AwsProvider::with_config(Some("us-east-1".into()), config.clone())
        .await
        .expect("provider");
    let name = format!("bench{}", std::process::id());
    let stack = stack(&name);
    let scope = Scope {
        stack: stack.name.clone(),
        env: stack.env.name.clone(),
        root: stack.root.clone(),
    };
    let desired = p.desired(&stack).expect("desired");
    let (_tx, rx) = tokio::sync::watch::channel(false);

    let started = Instant::now();
    let live = p.observe(&scope).await.expect("observe");
    let first = plan::diff(
        &stack.name,
        &stack.env.name,
        &desired,
        &live,
        &plan::Options::default(),
    );
    let ctx = ApplyContext::new(scope.clone(), &first.live, rx.clone(), false);
    for c in first.changes.iter().filter(|c| !c.action.is_noop()) {
        p.apply(c, &ctx).await.expect("apply");
    }
    eprintln!(
        "applied {} resources in {:.1}s ({} API requests)",
        first.summary().add,
        started.elapsed().as_secs_f64(),
        proxy.total_requests()
    );

    // Each run is a fresh provider, as each `mesh plan` is a fresh process
    // (the client-side rate limiters start full).
    let mut times = Vec::new();
    let mut requests = Vec::new();
    let mut per_action: BTreeMap<String, usize> = BTreeMap::new();
    for run in 0..RUNS {
        let p = AwsProvider::with_config(Some("us-east-1".into()), config.clone())
            .await
            .expect("provider");
        proxy.reset();
        let started = Instant::now();
        let live = p.observe(&scope).await.expect("observe");
        let plan = plan::diff(
            &stack.name,
            &stack.env.name,
            &desired,
            &live,
            &plan::Options::default(),
        );
        let elapsed = started.elapsed();
        assert!(!plan.has_changes(), "the no-op plan has changes");
        assert_eq!(live.len(), desired.len());
        times.push(elapsed);
        requests.push(proxy.total_requests());
        if run == 0 {
            for c in proxy.calls() {
                *per_action
                    .entry(format!("{}:{}", c.service, c.action))
                    .or_default() += 1;
            }
        }
    }
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "aws_plan: no-op plan of {} resources ({SUBNETS} subnets, {REGISTRIES} registries)",
        desired.len()
    );
    println!("  API requests per plan: {requests:?}");
    for (action, n) in &per_action {
        println!("    {action:<40} {n}");
    }
    println!(
        "  wall time: median {:.0} ms, min {:.0} ms, max {:.0} ms over {RUNS} runs",
        median.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );

    let live = p.observe(&scope).await.expect("observe");
    let destroy = plan::diff(
        &stack.name,
        &stack.env.name,
        &desired,
        &live,
        &plan::Options {
            destroy: true,
            ..Default::default()
        },
    );
    let ctx = ApplyContext::new(scope.clone(), &destroy.live, rx, false);
    for c in &destroy.changes {
        p.apply(c, &ctx).await.expect("destroy");
    }
    assert!(
        p.observe(&scope).await.expect("observe").is_empty(),
        "destroy left resources"
    );
}
