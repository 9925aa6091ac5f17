//! Run with: eval "$(scripts/services env)" && cargo bench --features kubernetes --bench kubernetes_plan
//!
//! The cost of planning 100 services on the `kubernetes` target against the
//! API test double (in-process): a cold plan (every image built to learn its
//! digest), a warm plan (digests remembered), then, once everything is
//! applied (images pushed to the registry at `MESH_TEST_REGISTRY`), a no-op
//! plan. Prints wall times and the API requests each plan makes.
//!
//! The runtime the images ship is `MESH_RUNTIME_STATIC_BIN`, else the release
//! `mesh-runtime` beside this bench, else a small stand-in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kube_double::KubeDouble;
use mesh::provider::kubernetes::{KubeAccess, KubernetesProvider, Settings};
use mesh::provider::{ApplyContext, Provider};
use mesh::resource::{ProviderId, Scope};
use mesh::stack::{
    Caller, Cluster, ClusterKind, Dataset, DatasetMode, DatasetSource, Duplicates, Endpoint,
    Environment, Expose, ExposeKind, Resources, Service, Stack, Target,
};
use mesh::{apply, plan};

const SERVICES: usize = 100;
const RUNS: usize = 5;

fn stack(name: &str, root: &Path, data: &Path) -> Stack {
    let mut services = BTreeMap::new();
    let mut exposes = BTreeMap::new();
    for i in 0..SERVICES {
        let s = format!("svc-{i:03}");
        let dataset = Dataset {
            name: "customers".into(),
            source: DatasetSource::File(data.to_owned()),
            mode: DatasetMode::Bundle,
            key: "customer_id".into(),
            duplicates: Duplicates::Error,
        };
        services.insert(
            s.clone(),
            Service {
                name: s.clone(),
                // Each service's bundle differs (its version is in service.json), so each image does.
                version: format!("1.0.{i}"),
                replicas: 1 + (i % 3) as u32,
                autoscaling: None,
                resources: Resources {
                    cpu: "100m".into(),
                    memory: "128Mi".into(),
                },
                datasets: BTreeMap::from([("customers".to_owned(), dataset)]),
                endpoints: BTreeMap::from([(
                    "customers".to_owned(),
                    Endpoint::Lookup {
                        datasets: vec!["customers".into()],
                    },
                )]),
                api_keys: Vec::new(),
                request_timeout_ms: None,
                access_log: None,
                tests: Vec::new(),
            },
        );
        let allow = if i == 0 {
            vec![Caller::Cidr("10.0.0.0/8".parse().expect("cidr"))]
        } else {
            vec![Caller::Service(format!("svc-{:03}", i - 1))]
        };
        exposes.insert(
            s.clone(),
            Expose {
                name: s.clone(),
                service: s,
                kind: ExposeKind::ClusterIP { port: 8080 },
                allow,
                tls: None,
            },
        );
    }
    Stack {
        name: name.to_owned(),
        root: root.to_owned(),
        env: Environment {
            name: "bench".into(),
            target: Target::Kubernetes,
            region: None,
            cluster: Some("c".into()),
            registry: None,
            namespace: None,
            instance: None,
        },
        networks: BTreeMap::new(),
        clusters: BTreeMap::from([(
            "c".to_owned(),
            Cluster {
                name: "c".into(),
                kind: ClusterKind::Existing { context: None },
            },
        )]),
        registries: BTreeMap::new(),
        connections: BTreeMap::new(),
        services,
        exposes,
    }
}

fn runtime(dir: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_RUNTIME_STATIC_BIN") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/release/deps/kubernetes_plan-HASH → target/release/mesh-runtime
        if let Some(p) = exe
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("mesh-runtime"))
            .filter(|p| p.is_file())
        {
            return p;
        }
    }
    let p = dir.join("mesh-runtime");
    std::fs::write(&p, b"#!/bin/sh\n# stand-in\n").expect("stand-in runtime");
    p
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let registry = std::env::var("MESH_TEST_REGISTRY").unwrap_or_else(|_| panic!("MESH_TEST_REGISTRY is not set: run `scripts/services start` and `eval \"$(scripts/services env)\"`"));
    let dir = tempfile::tempdir().expect("temp dir");
    let data =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/customer-mesh/customers.csv");
    let name = format!("bench{}", std::process::id());
    let stack = stack(&name, dir.path(), &data);
    let runtime = runtime(dir.path());
    let runtime_size = std::fs::metadata(&runtime).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "{SERVICES} services; runtime {} ({:.1} MB)",
        runtime.display(),
        runtime_size as f64 / 1e6
    );

    let double = KubeDouble::start().await;
    let mut settings = Settings::from_env();
    settings.registry = Some(format!("{registry}/bench"));
    settings.runtime = Some(runtime);
    let access = KubeAccess {
        endpoint: double.url(),
        ca_pem: String::new(),
        token: "bench".into(),
    };
    let provider = KubernetesProvider::from_access(&access, settings)
        .await
        .expect("provider")
        .with_state_dir(&stack);
    let scope = Scope {
        stack: stack.name.clone(),
        env: stack.env.name.clone(),
        root: stack.root.clone(),
    };

    let plan_once = |label: &'static str| {
        let provider = &provider;
        let stack = &stack;
        let scope = &scope;
        let double = &double;
        async move {
            let before = double.request_count();
            let started = Instant::now();
            let desired = provider.desired(stack).expect("desired");
            let desired_time = started.elapsed();
            let desired = mesh::graph::topo_order(desired).unwrap_or_else(|_| panic!("cycle"));
            let live = provider.observe(scope).await.expect("observe");
            let p = plan::diff(
                &stack.name,
                &stack.env.name,
                &desired,
                &live,
                &plan::Options::default(),
            );
            let total = started.elapsed();
            let requests = double.request_count() - before;
            eprintln!(
                "{label}: {:.0} ms (desired {:.0} ms), {requests} API requests, {} objects, {} changes",
                total.as_secs_f64() * 1000.0,
                desired_time.as_secs_f64() * 1000.0,
                desired.len(),
                p.changes.iter().filter(|c| !c.action.is_noop()).count()
            );
            (p, total, requests)
        }
    };

    let (first, _, _) = plan_once("cold plan (every image built)").await;
    let (first, _, _) = {
        let _ = first;
        plan_once("warm plan (digests remembered), empty cluster").await
    };

    let before = double.request_count();
    let started = Instant::now();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let ctx = Arc::new(ApplyContext::new(scope.clone(), &first.live, rx, false));
    let providers: BTreeMap<ProviderId, Arc<dyn Provider>> = BTreeMap::from([(
        ProviderId::Kubernetes,
        Arc::new(provider) as Arc<dyn Provider>,
    )]);
    let report = apply::apply(&first, &providers, ctx, &apply::Options { parallelism: 10 }).await;
    assert!(report.succeeded(), "{}", apply::render_report(&report));
    eprintln!(
        "apply of {} objects (images pushed, rollouts awaited): {:.1} s, {} API requests",
        first.summary().add,
        started.elapsed().as_secs_f64(),
        double.request_count() - before
    );
    let provider = providers
        .get(&ProviderId::Kubernetes)
        .expect("provider")
        .clone();

    let mut times = Vec::new();
    let mut requests = 0;
    for _ in 0..RUNS {
        let before = double.request_count();
        let started = Instant::now();
        let desired = mesh::graph::topo_order(provider.desired(&stack).expect("desired"))
            .unwrap_or_else(|_| panic!("cycle"));
        let live = provider.observe(&scope).await.expect("observe");
        let p = plan::diff(
            &stack.name,
            &stack.env.name,
            &desired,
            &live,
            &plan::Options::default(),
        );
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        requests = double.request_count() - before;
        assert!(
            !p.has_changes(),
            "the no-op plan has changes: {:#?}",
            p.changes
                .iter()
                .filter(|c| !c.action.is_noop())
                .map(|c| (&c.address, &c.reason))
                .collect::<Vec<_>>()
        );
    }
    times.sort_by(f64::total_cmp);
    eprintln!(
        "no-op plan of {SERVICES} services ({} live objects): median {:.0} ms, min {:.0} ms, max {:.0} ms over {RUNS} runs; {requests} API requests each",
        double
            .objects_with_label(&format!("mesh.dev/stack={name}"))
            .len(),
        times[RUNS / 2],
        times[0],
        times[RUNS - 1]
    );
}
