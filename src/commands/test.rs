//! `mesh test`: apply an isolated instance of a stack, send its test
//! queries, and destroy the instance whatever happens; or, with `--live`,
//! send them to what the environment already runs.
//!
//! The teardown cannot be skipped: a failed query, an apply that fails half
//! way, the timeout and a first Ctrl-C all end in a destroy of the instance
//! followed by a sweep by its ownership marks. Only a second Ctrl-C leaves
//! it behind, and then the exact `mesh destroy` command is printed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mesh::apply;
use mesh::engine::Engine;
use mesh::plan;
use mesh::provider::ApplyContext;
use mesh::render;
use mesh::resource::{Live, Value};
use mesh::stack::{SecretRef, Stack, Target, TestQuery};
use mesh::testing::{self, Report, Teardown, TestResult, client};

use super::{fail, load, with_locks};

/// `mesh test` as parsed.
pub(crate) struct Options {
    pub path: PathBuf,
    pub env: String,
    pub live: bool,
    pub keep: bool,
    pub filter: Option<String>,
    pub json: bool,
    pub junit: Option<PathBuf>,
    pub parallelism: usize,
    /// How long one test query may take (`--timeout`).
    pub query_timeout: Duration,
    /// For apply and queries together (`--deadline`); the teardown has no limit.
    pub deadline: Duration,
    pub instance: Option<String>,
}

/// What stops the apply and the queries: Ctrl-C or the timeout.
struct Stop {
    rx: tokio::sync::watch::Receiver<bool>,
    interrupted: Arc<AtomicBool>,
    timed_out: Arc<AtomicBool>,
}

impl Stop {
    /// The first Ctrl-C stops the run (the teardown still runs); the second
    /// exits at once, printing `left` (what to run to clean up), if any, and
    /// giving up its lock file so that command can run.
    fn new(timeout: Duration, left: Option<(String, PathBuf)>) -> Stop {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let tx = Arc::new(tx);
        let interrupted = Arc::new(AtomicBool::new(false));
        let timed_out = Arc::new(AtomicBool::new(false));
        {
            let (tx, interrupted) = (tx.clone(), interrupted.clone());
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_err() {
                    return;
                }
                interrupted.store(true, Ordering::SeqCst);
                let _ = tx.send(true);
                match &left {
                    Some(_) => eprintln!(
                        "Interrupted: destroying the test instance (press Ctrl-C again to leave it behind)."
                    ),
                    None => eprintln!("Interrupted."),
                }
                if tokio::signal::ctrl_c().await.is_ok() {
                    if let Some((cmd, lock)) = &left {
                        let _ = std::fs::remove_file(lock);
                        eprintln!(
                            "Left the test instance behind. Remove everything it created with:\n  {cmd}"
                        );
                    }
                    std::process::exit(130);
                }
            });
        }
        {
            let timed_out = timed_out.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                timed_out.store(true, Ordering::SeqCst);
                let _ = tx.send(true);
            });
        }
        Stop {
            rx,
            interrupted,
            timed_out,
        }
    }

    fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }

    fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::SeqCst)
    }
}

pub(crate) async fn run(o: Options) -> ExitCode {
    let stack = match load(&o.path, &o.env) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let (reported, _) = testing::select(&stack, o.filter.as_deref());
    if let Some(f) = &o.filter
        && reported.is_empty()
    {
        let all: Vec<String> = stack.tests().map(testing::id).collect();
        return fail(format!(
            "no test query matches `{f}`\n  help: tests of stack {}: {}",
            stack.name,
            if all.is_empty() {
                "none".into()
            } else {
                all.join(", ")
            }
        ));
    }
    if o.live {
        return live(stack, &o).await;
    }
    let name = match &o.instance {
        Some(n) => n.clone(),
        None => instance_name(),
    };
    if let Err(e) = check_instance_name(&name) {
        return fail(e);
    }
    // Its NodePorts are dropped: on the local target each service gets a
    // port from the local provider's allocator, as any other service does.
    let inst = stack.instance(&name);
    let destroy_cmd = format!(
        "mesh destroy {} --env {} --instance {name} --auto-approve",
        o.path.display(),
        o.env
    );
    eprintln!("{}", header(&inst, &name));
    let lock = mesh::lock::lock_path(&mesh::provider::local::state_dir(
        &inst.root,
        &inst.env.name,
    ));
    let stop = Stop::new(o.deadline, Some((destroy_cmd.clone(), lock)));
    let started = Instant::now();
    let mut results: Vec<TestResult> = Vec::new();
    let mut aborted: Option<String> = None;
    let mut teardown: Option<Teardown> = None;
    let stack_path = o.path.display().to_string();
    let locked = with_locks(
        inst.clone(),
        &stack_path,
        "mesh test",
        async |engine: &Engine| {
            match apply_instance(engine, o.parallelism, &stop).await {
                Ok(()) => match queries(engine, &reported, &o, stop.rx.clone()).await {
                    Ok(r) => results = r,
                    Err(e) => aborted = Some(e),
                },
                Err(e) => aborted = Some(e),
            }
            if stop.interrupted() && aborted.is_none() {
                aborted = Some("interrupted during the test queries".into());
            } else if stop.timed_out() && aborted.is_none() {
                aborted = Some(format!(
                    "the --deadline of {} passed during the test queries",
                    mesh::stack::duration_text(o.deadline)
                ));
            }
            if o.keep && !stop.interrupted() {
                teardown = Some(Teardown {
                    status: "kept".into(),
                    left: Vec::new(),
                    destroy_command: Some(destroy_cmd.clone()),
                });
                return ExitCode::SUCCESS;
            }
            teardown = Some(destroy_instance(engine, o.parallelism).await);
            ExitCode::SUCCESS
        },
    )
    .await;
    if locked != ExitCode::SUCCESS {
        // Nothing was applied: the locks or the providers refused first.
        return locked;
    }
    if let Some(t) = &mut teardown {
        if t.status == "kept" {
            eprintln!(
                "Kept the test instance {name} (`--keep`). Its URLs: `mesh output {} --env {} --instance {name}`; remove it with:\n  {destroy_cmd}",
                o.path.display(),
                o.env
            );
        } else {
            sweep_local(&inst, t);
            if t.clean() {
                eprintln!(
                    "Teardown: destroyed the test instance {name}; a sweep by its ownership marks ({}) found nothing left.",
                    marks(&inst)
                );
            } else {
                t.destroy_command = Some(destroy_cmd.clone());
                eprintln!(
                    "error: the teardown of test instance {name} left {} behind:",
                    t.left.len()
                );
                for l in &t.left {
                    eprintln!("  - {l}");
                }
                eprintln!("  help: remove it with `{destroy_cmd}`");
            }
        }
    }
    let report = Report {
        stack: &stack.name,
        env: &o.env,
        instance: Some(&name),
        results: &results,
        teardown: teardown.as_ref(),
        elapsed: started.elapsed(),
        aborted: aborted.as_deref(),
    };
    finish(&report, &o, stop.interrupted())
}

/// Sends the queries to what the environment runs now.
async fn live(stack: Stack, o: &Options) -> ExitCode {
    let stop = Stop::new(o.deadline, None);
    let started = Instant::now();
    let engine = match Engine::new(stack).await {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let (reported, _) = testing::select(&engine.stack, o.filter.as_deref());
    eprintln!(
        "Testing what runs in environment {} of stack {} (--live: nothing is applied or destroyed).",
        o.env, engine.stack.name
    );
    let (results, aborted) = match queries(&engine, &reported, o, stop.rx.clone()).await {
        Ok(r) => (r, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let aborted = aborted.or_else(|| {
        stop.interrupted()
            .then(|| "interrupted during the test queries".to_owned())
    });
    let report = Report {
        stack: &engine.stack.name,
        env: &o.env,
        instance: None,
        results: &results,
        teardown: None,
        elapsed: started.elapsed(),
        aborted: aborted.as_deref(),
    };
    finish(&report, o, stop.interrupted())
}

/// Prints the results (stdout), writes the JUnit file, and says how it went.
fn finish(report: &Report<'_>, o: &Options, interrupted: bool) -> ExitCode {
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&testing::json(report)).unwrap_or_default()
        );
    } else if !report.results.is_empty() {
        print!("{}", testing::table(report.results));
    }
    if let Some(file) = &o.junit
        && let Err(e) = std::fs::write(file, testing::junit(report))
    {
        eprintln!(
            "error: cannot write the JUnit report {}: {e}",
            file.display()
        );
        return ExitCode::from(1);
    }
    if let Some(reason) = report.aborted {
        eprintln!("error: {reason}");
    }
    if report.results.is_empty() && report.aborted.is_none() {
        eprintln!(
            "note: stack {} declares no test queries: add [[service.S.endpoint.E.test]] tables",
            report.stack
        );
    }
    if interrupted {
        ExitCode::from(130)
    } else if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Plans and applies the instance; why it did not come up, if it did not.
async fn apply_instance(engine: &Engine, parallelism: usize, stop: &Stop) -> Result<(), String> {
    let plan = engine
        .plan(&plan::Options::default())
        .await
        .map_err(|e| format!("planning the test instance: {e}"))?;
    eprint!(
        "{}",
        render::human(
            &plan,
            render::Style::from_env(std::io::stderr().is_terminal())
        )
    );
    let ctx = Arc::new(ApplyContext::new(
        engine.scope.clone(),
        &plan.live,
        stop.rx.clone(),
        false,
    ));
    let report = apply::apply(
        &plan,
        &engine.providers,
        ctx,
        &apply::Options { parallelism },
    )
    .await;
    eprint!("{}", apply::render_report(&report));
    if stop.interrupted() {
        Err("interrupted while applying the test instance".into())
    } else if stop.timed_out() {
        Err("the --deadline passed while applying the test instance".into())
    } else if !report.succeeded() {
        Err("the test instance's apply failed".into())
    } else {
        Ok(())
    }
}

/// Sends the reported tests (and those they are `same_as`) and checks the answers.
async fn queries(
    engine: &Engine,
    reported: &[&TestQuery],
    o: &Options,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<TestResult>, String> {
    let live = engine
        .observe()
        .await
        .map_err(|e| format!("reading where the services are: {e}"))?;
    let urls = testing::service_urls(&engine.stack, &live);
    // On a cluster, the operator's key is a Secret there.
    let mut operator_key = None;
    for provider in engine.providers.values() {
        if let Some(k) = provider
            .caller_key(&engine.stack, mesh::provider::local::access::OPERATOR)
            .await
            .map_err(|e| format!("reading the operator's key: {e}"))?
        {
            operator_key = Some(k);
        }
    }
    let (_, sent) = testing::select(&engine.stack, o.filter.as_deref());
    let mut requests = Vec::new();
    let mut unreachable = BTreeMap::new();
    for t in sent {
        let Some(base) = urls.get(&t.service) else {
            unreachable.insert(
                testing::id(t),
                Err(format!(
                    "service {} is not running in environment {}",
                    t.service, engine.stack.env.name
                )),
            );
            continue;
        };
        requests.push(client::Request {
            id: testing::id(t),
            url: testing::url(base, t),
            body: t.request.clone(),
            api_key: api_key(&engine.stack, &live, &t.service, operator_key.as_deref()),
            generation: t.generation.clone(),
            ca_file: exposure_output(&engine.stack, &live, &t.service, "certificate")
                .map(PathBuf::from),
        });
    }
    eprintln!(
        "Sending {} test quer{} ({} at a time)...",
        requests.len(),
        if requests.len() == 1 { "y" } else { "ies" },
        o.parallelism
    );
    let mut answers = client::send_all(requests, o.parallelism, o.query_timeout, stop).await;
    answers.extend(unreachable);
    Ok(testing::evaluate(reported, &answers))
}

/// An output of the first local exposure of `service` that has it
/// (`api_key_file`, `certificate`).
fn exposure_output<'a>(
    stack: &Stack,
    live: &'a [Live],
    service: &str,
    output: &str,
) -> Option<&'a str> {
    stack
        .exposes
        .iter()
        .filter(|(_, e)| e.service == service)
        .find_map(|(name, _)| {
            live.iter()
                .find(|l| l.address.as_str() == format!("expose.{name}"))
                .and_then(|l| l.outputs.get(output))
                .and_then(Value::as_str)
        })
}

/// The key this machine's operator presents to `service`, if it demands
/// one: the local target's operator key, the cluster's (`cluster_key`),
/// else the service's first key.
fn api_key(
    stack: &Stack,
    live: &[Live],
    service: &str,
    cluster_key: Option<&str>,
) -> Option<String> {
    let operator_key = exposure_output(stack, live, service, "api_key_file").map(PathBuf::from);
    if let Some(file) = operator_key {
        return std::fs::read_to_string(file)
            .ok()
            .map(|k| k.trim().to_owned());
    }
    if let Some(key) = cluster_key
        && mesh::provider::local::access::restricted_to(stack, service).is_some()
    {
        return Some(key.to_owned());
    }
    match stack.services.get(service)?.api_keys.first()? {
        SecretRef::Env(var) => std::env::var(var).ok(),
        SecretRef::File(p) => std::fs::read_to_string(p).ok().map(|k| k.trim().to_owned()),
    }
}

/// Destroys everything of the instance (found by its ownership marks, so
/// what a half-failed apply left is found too), then sweeps by those marks.
async fn destroy_instance(engine: &Engine, parallelism: usize) -> Teardown {
    let destroy = plan::Options {
        destroy: true,
        ..plan::Options::default()
    };
    let mut status = "destroyed";
    // A second pass picks up what a transient failure left.
    for pass in 0..2 {
        let plan = match engine.plan(&destroy).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: planning the teardown: {e}");
                status = "failed";
                continue;
            }
        };
        if !plan.has_changes() {
            status = "destroyed";
            break;
        }
        if pass == 0 {
            eprintln!("Tearing the test instance down...");
        }
        // Never cancelled: only a second Ctrl-C (which exits) stops it.
        let (_keep, never) = tokio::sync::watch::channel(false);
        let ctx = Arc::new(ApplyContext::new(
            engine.scope.clone(),
            &plan.live,
            never,
            false,
        ));
        let report = apply::apply(
            &plan,
            &engine.providers,
            ctx,
            &apply::Options { parallelism },
        )
        .await;
        eprint!("{}", apply::render_report(&report));
        if report.succeeded() {
            status = "destroyed";
            break;
        }
        status = "failed";
    }
    let left = match engine.observe().await {
        Ok(live) => live.iter().map(|l| l.address.to_string()).collect(),
        Err(e) => vec![format!("(the sweep could not read the live state: {e})")],
    };
    Teardown {
        status: status.into(),
        left,
        destroy_command: None,
    }
}

/// After the locks are given back: the instance's local state folder goes,
/// and no process may still run from it.
fn sweep_local(inst: &Stack, t: &mut Teardown) {
    let dir = mesh::provider::local::state_dir(&inst.root, &inst.env.name);
    if t.left.is_empty() && t.status == "destroyed" {
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            t.left.push(format!("state folder {} ({e})", dir.display()));
        }
        // The stack's `.mesh` folder, if the instance was all it held.
        let _ = std::fs::remove_dir(inst.root.join(".mesh"));
    }
    if dir.exists() && !t.left.iter().any(|l| l.starts_with("state folder")) {
        t.left.push(format!("state folder {}", dir.display()));
    }
    for pid in processes_under(&dir) {
        t.left
            .push(format!("process {pid} running from {}", dir.display()));
    }
}

/// Processes whose command line names a path under `dir` (a local
/// runtime started from the instance's bundle).
fn processes_under(dir: &Path) -> Vec<u32> {
    let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let needles: BTreeSet<String> = [dir, canonical.as_path()]
        .iter()
        .map(|d| format!("{}/", d.display()))
        .collect();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let zombie = std::fs::read_to_string(e.path().join("stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        });
        if !zombie && needles.iter().any(|n| cmd.contains(n.as_str())) {
            out.push(pid);
        }
    }
    out
}

/// The ownership marks the sweep looks for, for people.
fn marks(inst: &Stack) -> String {
    match inst.env.target {
        Target::Local => format!(
            "local state {}, processes",
            mesh::provider::local::state_dir(&inst.root, &inst.env.name).display()
        ),
        Target::Kubernetes => format!(
            "objects labelled mesh.dev/env={} in namespace {}",
            inst.env.name,
            inst.env.namespace.as_deref().unwrap_or_default()
        ),
        Target::Aws => format!(
            "resources tagged mesh:env={}, objects labelled mesh.dev/env={}",
            inst.env.name, inst.env.name
        ),
    }
}

/// What the instance is and what it shares with the environment.
fn header(inst: &Stack, name: &str) -> String {
    let env = inst
        .env
        .instance
        .as_ref()
        .map_or(inst.env.name.as_str(), |i| i.of.as_str());
    let head = format!(
        "Testing stack {} in instance {name} of environment {env}",
        inst.name
    );
    match inst.env.target {
        Target::Local => {
            // The ports the local provider allocates for the instance.
            let ports: Vec<String> = mesh::provider::local::service_ports(inst)
                .iter()
                .map(|(service, p)| format!("{service}:{p}"))
                .collect();
            format!(
                "{head}: state in {}, ports {}; the environment's own services are not touched.",
                mesh::provider::local::state_dir(&inst.root, &inst.env.name).display(),
                if ports.is_empty() {
                    "allocated".into()
                } else {
                    ports.join(", ")
                }
            )
        }
        Target::Kubernetes | Target::Aws if inst.reuses_platform() => format!(
            "{head}: services in namespace {} on the environment's cluster {} and registry {} (reused: the instance creates no network, cluster or registry).",
            inst.env.namespace.as_deref().unwrap_or_default(),
            inst.env.cluster.as_deref().unwrap_or("(current context)"),
            inst.env.registry.as_deref().unwrap_or("(MESH_REGISTRY)"),
        ),
        Target::Kubernetes => format!(
            "{head}: a stack without services, applied in namespace {}.",
            inst.env.namespace.as_deref().unwrap_or_default()
        ),
        Target::Aws => format!(
            "{head}: a platform stack (no services): the instance builds its own network, cluster and registry, named and tagged mesh:env={}.",
            inst.env.name
        ),
    }
}

/// `test-` and six random hex digits.
fn instance_name() -> String {
    use std::io::Read;
    let mut b = [0u8; 3];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if !random {
        let n = std::process::id() ^ (mesh::lock::now() as u32);
        b = [n as u8, (n >> 8) as u8, (n >> 16) as u8];
    }
    format!("test-{}", hex::encode(b))
}

fn check_instance_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 30
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid instance name `{name}`\n  help: use lowercase letters, digits and `-`, starting with a letter, at most 30 characters"
        ))
    }
}

/// Loads the stack at `path` as instance `instance` of `env` (`--instance`).
pub(crate) fn load_instance(
    path: &Path,
    env: &str,
    instance: Option<&str>,
) -> Result<Stack, ExitCode> {
    let stack = load(path, env)?;
    match instance {
        None => Ok(stack),
        Some(name) => {
            check_instance_name(name).map_err(fail)?;
            Ok(stack.instance(name))
        }
    }
}
