//! plan, apply, destroy, output and unlock.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use mesh::apply;
use mesh::engine::Engine;
use mesh::plan::{self, Plan};
use mesh::provider::ApplyContext;
use mesh::render;
use mesh::resource::Address;
use serde::{Deserialize, Serialize};

use crate::Command;

mod test;

/// A plan saved by `mesh plan --out`.
#[derive(Serialize, Deserialize)]
struct SavedPlan {
    format_version: String,
    stack_path: PathBuf,
    env: String,
    plan: Plan,
}

const SAVED_FORMAT: &str = "mesh-plan/1";

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(1)
}

fn load(path: &Path, env: &str) -> Result<mesh::stack::Stack, ExitCode> {
    mesh::stack::load(path, Some(env)).map_err(|report| {
        eprint!("{}", report.render());
        ExitCode::from(1)
    })
}

fn style() -> render::Style {
    render::Style::from_env(std::io::stdout().is_terminal())
}

fn options(targets: Vec<String>, replace: Vec<String>, destroy: bool) -> plan::Options {
    plan::Options {
        targets: targets.into_iter().map(Address::new).collect(),
        replace: replace.into_iter().map(Address::new).collect(),
        destroy,
    }
}

/// Ctrl-C: the first sets the cancel flag (no new change starts, the ones
/// in flight finish); the second resolves the returned future (abandon the
/// changes in flight), so the caller still releases its locks.
fn cancel_on_ctrl_c() -> (tokio::sync::watch::Receiver<bool>, impl Future<Output = ()>) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (abandon_tx, abandon_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = tx.send(true);
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = abandon_tx.send(());
            }
        }
    });
    (rx, async move {
        // A dropped sender (no second Ctrl-C can come) never abandons.
        if abandon_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    })
}

pub(crate) async fn run(command: Command) -> ExitCode {
    match command {
        Command::Plan {
            path,
            env,
            out,
            json,
            detailed_exitcode,
            targets,
            replace,
            destroy,
        } => {
            // A saved plan applies from any folder: every path in it absolute.
            let path = match &out {
                Some(_) => std::fs::canonicalize(&path).unwrap_or(path),
                None => path,
            };
            let stack = match load(&path, &env) {
                Ok(s) => s,
                Err(c) => return c,
            };
            let engine = match Engine::new(stack).await {
                Ok(e) => e,
                Err(e) => return fail(e),
            };
            let plan = match engine.plan(&options(targets, replace, destroy)).await {
                Ok(p) => p,
                Err(e) => return fail(e),
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&render::json(&plan)).unwrap_or_default()
                );
            } else {
                print!("{}", render::human(&plan, style()));
            }
            warn_abandoned(&plan);
            if let Some(out) = out {
                let saved = SavedPlan {
                    format_version: SAVED_FORMAT.into(),
                    stack_path: path.clone(),
                    env: env.clone(),
                    plan: plan.clone(),
                };
                // 0600: a plan names what holds secrets (digests are keyed).
                if let Err(e) = mesh::provider::local::secrets::replace_private(
                    &out,
                    &serde_json::to_vec_pretty(&saved).unwrap_or_default(),
                ) {
                    return fail(format!("cannot write {}: {e}", out.display()));
                }
                eprintln!(
                    "Saved the plan to {}. Apply exactly it with: mesh apply {}",
                    out.display(),
                    out.display()
                );
            }
            if detailed_exitcode && plan.has_changes() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Apply {
            path,
            env,
            auto_approve,
            parallelism,
            no_wait,
            targets,
            replace,
            rotate_keys,
        } => {
            if let Some(saved) = saved_plan(&path) {
                let saved = match saved {
                    Ok(s) => s,
                    Err(e) => return fail(e),
                };
                let given: Vec<&str> = [
                    env.is_some().then_some("--env"),
                    (!targets.is_empty()).then_some("--target"),
                    (!replace.is_empty()).then_some("--replace"),
                    rotate_keys.then_some("--rotate-keys"),
                ]
                .into_iter()
                .flatten()
                .collect();
                if !given.is_empty() {
                    return fail(format!(
                        "{} is a saved plan: it applies exactly what was planned, so {} cannot change it\n  help: make a new plan with `mesh plan ... --out FILE`, or drop {}",
                        path.display(),
                        given.join(" and "),
                        given.join(", ")
                    ));
                }
                return apply_saved(&path, saved, parallelism, no_wait).await;
            }
            let Some(env) = env else {
                return fail(
                    "`mesh apply PATH` needs `--env ENV` (or give a plan file saved by `mesh plan --out`)",
                );
            };
            run_apply(
                &path,
                &env,
                None,
                options(targets, replace, false),
                auto_approve,
                parallelism,
                no_wait,
                rotate_keys,
                "mesh apply",
            )
            .await
        }
        Command::Destroy {
            path,
            env,
            instance,
            auto_approve,
            parallelism,
            targets,
            no_wait,
        } => {
            let everything = targets.is_empty();
            let code = run_apply(
                &path,
                &env,
                instance.as_deref(),
                options(targets, Vec::new(), true),
                auto_approve,
                parallelism,
                no_wait,
                false,
                "mesh destroy",
            )
            .await;
            if code == ExitCode::SUCCESS
                && everything
                && let Ok(stack) = test::load_instance(&path, &env, instance.as_deref())
            {
                // Leave nothing behind: the caller keys (the operator's is no
                // service's), then the state folders once empty.
                let dir = mesh::provider::local::state_dir(&stack.root, &stack.env.name);
                let _ = std::fs::remove_dir_all(dir.join("access"));
                for d in [
                    dir.join("services"),
                    dir.join("exposes"),
                    dir.clone(),
                    stack.root.join(".mesh"),
                ] {
                    let _ = std::fs::remove_dir(d);
                }
            }
            code
        }
        Command::Output {
            path,
            name,
            env,
            instance,
            json,
        } => output(&path, &env, instance.as_deref(), name.as_deref(), json).await,
        Command::Test {
            path,
            env,
            live,
            keep,
            filter,
            json,
            junit,
            parallelism,
            timeout,
            deadline,
            instance,
        } => {
            test::run(test::Options {
                path,
                env,
                live,
                keep,
                filter,
                json,
                junit,
                parallelism,
                query_timeout: timeout,
                deadline,
                instance,
            })
            .await
        }
        Command::Unlock { path, env } => {
            let stack = match load(&path, &env) {
                Ok(s) => s,
                Err(c) => return c,
            };
            let dir = mesh::provider::local::state_dir(&stack.root, &env);
            // The shared lock (a Lease on the cluster), where the environment has one.
            let stack_name = stack.name.clone();
            match Engine::new(stack).await {
                Ok(engine) => match engine.unlock_shared().await {
                    Ok(broken) => {
                        for who in broken {
                            eprintln!("Broke the shared lock held by {who}.");
                        }
                    }
                    Err(e) => eprintln!("warning: the shared lock was not broken: {e}"),
                },
                Err(e) => eprintln!("warning: the shared lock was not checked: {e}"),
            }
            match mesh::lock::break_lock(&dir) {
                Some(h) => {
                    eprintln!(
                        "Broke the lock held by `{}` (pid {} on {}) since {}.",
                        h.command,
                        h.pid,
                        h.host,
                        mesh::lock::format_time(h.since)
                    );
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("No lock file is held for stack {stack_name} (environment {env}).");
                    ExitCode::SUCCESS
                }
            }
        }
        Command::Validate { .. } | Command::Graph { .. } | Command::Completions { .. } => {
            ExitCode::from(1)
        }
    }
}

fn confirm(what: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "error: {what} needs confirmation, but stdin is not a terminal\n  help: pass --auto-approve"
        );
        return false;
    }
    eprint!("Do you want to perform these actions? Only 'yes' will be accepted: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    line.trim() == "yes"
}

#[allow(clippy::too_many_arguments)]
async fn run_apply(
    path: &Path,
    env: &str,
    instance: Option<&str>,
    opts: plan::Options,
    auto_approve: bool,
    parallelism: usize,
    no_wait: bool,
    rotate_keys: bool,
    command: &str,
) -> ExitCode {
    let stack = match test::load_instance(path, env, instance) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let stack_path = path.display().to_string();
    with_locks(stack, &stack_path, command, async |engine: &Engine| {
        let started = std::time::Instant::now();
        let plan = match engine.plan(&opts).await {
            Ok(p) => p,
            Err(e) => return fail(e),
        };
        eprintln!(
            "planned in {:.0} ms",
            started.elapsed().as_secs_f64() * 1000.0
        );
        print!("{}", render::human(&plan, style()));
        warn_abandoned(&plan);
        if plan.has_changes() {
            if !auto_approve && !confirm(command) {
                eprintln!("Cancelled: nothing was changed.");
                return ExitCode::from(1);
            }
            let code = execute(engine, &plan, parallelism, no_wait).await;
            if code != ExitCode::SUCCESS {
                return code;
            }
        }
        if rotate_keys {
            return rotate(engine).await;
        }
        ExitCode::SUCCESS
    })
    .await
}

/// `mesh apply --rotate-keys`: each provider rotates its caller keys.
async fn rotate(engine: &Engine) -> ExitCode {
    let (cancel, abandon) = cancel_on_ctrl_c();
    let ctx = ApplyContext::new(engine.scope.clone(), &[], cancel, false);
    let rotating = async {
        for provider in engine.providers.values() {
            match provider.rotate_keys(&engine.stack, &ctx).await {
                Ok(rotated) if rotated.is_empty() => {}
                Ok(rotated) => eprintln!("Rotated the keys of {}.", rotated.join(", ")),
                Err(e) => return fail(e),
            }
        }
        ExitCode::SUCCESS
    };
    tokio::select! {
        code = rotating => code,
        () = abandon => {
            eprintln!(
                "Abandoned the key rotation (second Ctrl-C); the locks are released. Run `mesh apply --rotate-keys` again to finish it."
            );
            ExitCode::from(130)
        }
    }
}

/// Runs `body` holding the stack's locks: the lock file of this machine,
/// then the shared locks of the environment's providers (a Lease on the
/// cluster), released when it returns.
async fn with_locks(
    stack: mesh::stack::Stack,
    stack_path: &str,
    command: &str,
    body: impl AsyncFnOnce(&Engine) -> ExitCode,
) -> ExitCode {
    let env = stack.env.name.clone();
    let state_dir = mesh::provider::local::state_dir(&stack.root, &env);
    let _lock = match mesh::lock::acquire(&state_dir, &stack.name, &env, stack_path, command) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let engine = match Engine::new(stack).await {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let shared = match engine.lock_shared(&mesh::lock::this_holder(command)).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let code = body(&engine).await;
    release(shared).await;
    code
}

/// Says on stderr that a destroy leaves Kubernetes objects to their cluster, and why.
fn warn_abandoned(plan: &Plan) {
    if let Some(a) = &plan.abandoned {
        eprintln!("warning: {}", render::abandoned_line(a));
    }
}

/// Gives up the shared locks taken by [`Engine::lock_shared`].
async fn release(shared: Vec<Box<dyn mesh::provider::SharedLock>>) {
    for l in shared {
        l.release().await;
    }
}

async fn execute(engine: &Engine, plan: &Plan, parallelism: usize, no_wait: bool) -> ExitCode {
    let (cancel, abandon) = cancel_on_ctrl_c();
    let ctx = Arc::new(ApplyContext::new(
        engine.scope.clone(),
        &plan.live,
        cancel,
        no_wait,
    ));
    let opts = apply::Options { parallelism };
    let applying = apply::apply(plan, &engine.providers, ctx, &opts);
    let report = tokio::select! {
        report = applying => report,
        () = abandon => {
            eprintln!(
                "Abandoned the changes in flight (second Ctrl-C); the locks are released. Run the same command again to converge."
            );
            return ExitCode::from(130);
        }
    };
    eprint!("{}", apply::render_report(&report));
    if report.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `path` read as a plan saved by `mesh plan --out`, recognised by its
/// content (whatever its name): `None` when it is not one (a stack folder, a
/// stack file), an error when it claims to be one but cannot be read.
fn saved_plan(path: &Path) -> Option<Result<SavedPlan, String>> {
    if !path.is_file() {
        return None;
    }
    let text = std::fs::read(path).ok()?;
    #[derive(Deserialize)]
    struct Header {
        format_version: String,
    }
    let header: Header = serde_json::from_slice(&text).ok()?;
    if !header.format_version.starts_with("mesh-plan/") {
        return None;
    }
    if header.format_version != SAVED_FORMAT {
        return Some(Err(format!(
            "{} has plan format {}, this mesh reads {SAVED_FORMAT}",
            path.display(),
            header.format_version
        )));
    }
    Some(
        serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not a readable saved mesh plan: {e}", path.display())),
    )
}

async fn apply_saved(file: &Path, saved: SavedPlan, parallelism: usize, no_wait: bool) -> ExitCode {
    let stack = match load(&saved.stack_path, &saved.env) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let stack_path = saved.stack_path.display().to_string();
    with_locks(
        stack,
        &stack_path,
        "mesh apply (saved plan)",
        async |engine: &Engine| {
            let live = match engine.observe_for(&saved.plan).await {
                Ok(l) => l,
                Err(e) => return fail(e),
            };
            if plan::live_digest(&live) != saved.plan.live_digest {
                let diffs = plan::live_differences(&saved.plan.live, &live);
                eprintln!(
                    "error: the saved plan {} is stale: the live state changed since it was made:",
                    file.display()
                );
                for d in &diffs {
                    eprintln!("  - {d}");
                }
                eprintln!(
                    "  help: run `mesh plan {} --env {} --out {}` again and review the new plan",
                    saved.stack_path.display(),
                    saved.env,
                    file.display()
                );
                return ExitCode::from(1);
            }
            print!("{}", render::human(&saved.plan, style()));
            warn_abandoned(&saved.plan);
            if !saved.plan.has_changes() {
                return ExitCode::SUCCESS;
            }
            execute(engine, &saved.plan, parallelism, no_wait).await
        },
    )
    .await
}

/// `mesh output`'s exit code when nothing of the environment is applied.
const NOTHING_APPLIED: u8 = 3;

async fn output(
    path: &Path,
    env: &str,
    instance: Option<&str>,
    name: Option<&str>,
    json: bool,
) -> ExitCode {
    let stack = match test::load_instance(path, env, instance) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let engine = match Engine::new(stack).await {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let outputs = match engine.outputs().await {
        Ok(Some(o)) => o,
        Ok(None) => {
            let env = engine.stack.env.name.as_str();
            eprintln!(
                "error: nothing of stack `{}` is applied in environment `{env}`\n  help: run `mesh apply {} --env {env}` first",
                engine.stack.name,
                path.display()
            );
            return ExitCode::from(NOTHING_APPLIED);
        }
        Err(e) => return fail(e),
    };
    if let Some(name) = name {
        let Some(value) = outputs.get(name) else {
            let known = outputs.names();
            return fail(format_args!(
                "no output `{name}`; the outputs are:\n  {}",
                known.join("\n  ")
            ));
        };
        if json {
            println!("{}", serde_json::to_string(&value).unwrap_or_default());
        } else {
            println!("{}", mesh::output::text(&value));
        }
        return ExitCode::SUCCESS;
    }
    if json {
        let all = outputs.to_json(&engine.stack.name, env);
        println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
    } else {
        print!("{}", outputs.render());
    }
    ExitCode::SUCCESS
}
