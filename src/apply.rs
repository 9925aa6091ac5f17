//! Apply: carry out a plan by walking its dependency graph, independent
//! changes in parallel (bounded), each waited on until ready.
//!
//! On a failure (or Ctrl-C) no new change starts, in-flight ones finish, and
//! the report says exactly what was done and what was not; a rerun converges
//! because the next plan is computed from live state again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::plan::{Action, Change, Plan};
use crate::provider::{ApplyContext, Provider, ProviderError};
use crate::resource::{Address, ProviderId};

/// How one change ended.
#[derive(Debug)]
pub enum Outcome {
    Done { seconds: f64 },
    Failed(ProviderError),
    NotStarted,
}

/// What an apply did, change by change.
#[derive(Debug)]
pub struct Report {
    pub outcomes: Vec<(Address, Action, Outcome)>,
    pub interrupted: bool,
    /// The checks before the first change failed: nothing was changed.
    pub refused: bool,
}

impl Report {
    pub fn succeeded(&self) -> bool {
        !self.interrupted
            && self
                .outcomes
                .iter()
                .all(|(_, _, o)| matches!(o, Outcome::Done { .. }))
    }
    /// (added, changed, destroyed) among the changes that were done.
    pub fn counts(&self) -> (usize, usize, usize) {
        let (mut a, mut c, mut d) = (0, 0, 0);
        for (_, action, o) in &self.outcomes {
            if !matches!(o, Outcome::Done { .. }) {
                continue;
            }
            match action {
                Action::Create => a += 1,
                Action::Update => c += 1,
                Action::Replace { .. } => {
                    a += 1;
                    d += 1;
                }
                Action::Delete => d += 1,
                Action::NoOp => {}
            }
        }
        (a, c, d)
    }
}

/// Deletion order by the kind of the top-level address: exposures go first,
/// networks last.
fn delete_rank(a: &Address) -> usize {
    match a.as_str().split('.').next().unwrap_or("") {
        "expose" => 0,
        "service" => 1,
        "connection" | "namespace" => 2,
        "registry" => 3,
        "cluster" => 4,
        "network" => 5,
        _ => 6,
    }
}

/// For each change, the changes it must wait for.
fn dependencies(changes: &[Change]) -> Vec<BTreeSet<usize>> {
    let index: BTreeMap<&Address, usize> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| (&c.address, i))
        .collect();
    let mut deps = vec![BTreeSet::new(); changes.len()];
    for (i, c) in changes.iter().enumerate() {
        match c.action {
            Action::Delete => {
                for (j, o) in changes.iter().enumerate() {
                    if j == i || o.action != Action::Delete {
                        continue;
                    }
                    let child = o.address.as_str().starts_with(&format!("{}.", c.address));
                    let earlier_rank = delete_rank(&o.address) < delete_rank(&c.address);
                    if child
                        || (earlier_rank
                            && !c.address.as_str().starts_with(&format!("{}.", o.address)))
                    {
                        deps[i].insert(j);
                    }
                }
            }
            _ => {
                if let Some(d) = &c.desired {
                    for a in &d.depends_on {
                        if let Some(&j) = index.get(a) {
                            deps[i].insert(j);
                        }
                    }
                }
                // Deletions of what the stack dropped happen first, so freed
                // names and ports can be reused.
                for (j, o) in changes.iter().enumerate() {
                    if o.action == Action::Delete && o.kind == c.kind {
                        deps[i].insert(j);
                    }
                }
            }
        }
    }
    deps
}

/// Options of one apply.
pub struct Options {
    pub parallelism: usize,
}

/// Carries out `plan`. `providers` must hold every provider the plan names.
pub async fn apply(
    plan: &Plan,
    providers: &BTreeMap<ProviderId, Arc<dyn Provider>>,
    ctx: Arc<ApplyContext>,
    options: &Options,
) -> Report {
    let changes: Vec<Change> = plan
        .changes
        .iter()
        .filter(|c| !c.action.is_noop())
        .cloned()
        .collect();
    if let Some(report) = preflight(&changes, providers, &ctx).await {
        return report;
    }
    let deps = dependencies(&changes);
    let n = changes.len();
    let mut state: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
    let mut started = vec![false; n];
    let mut set: JoinSet<(
        usize,
        Result<Option<crate::resource::Live>, ProviderError>,
        f64,
    )> = JoinSet::new();
    let mut stop = false;
    let mut interrupted = false;
    let mut in_flight: BTreeMap<usize, Instant> = BTreeMap::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(10));
    ticker.tick().await;
    let mut cancel = ctx.cancel.clone();
    let changes = Arc::new(changes);

    loop {
        if !stop {
            for i in 0..n {
                if set.len() >= options.parallelism.max(1) {
                    break;
                }
                if started[i]
                    || !deps[i]
                        .iter()
                        .all(|&j| matches!(state[j], Some(Outcome::Done { .. })))
                {
                    continue;
                }
                started[i] = true;
                let c = &changes[i];
                let Some(provider) = providers.get(&c.provider).cloned() else {
                    state[i] = Some(Outcome::Failed(ProviderError::Invalid {
                        address: c.address.clone(),
                        message: format!("no {} provider in this build", c.provider),
                    }));
                    stop = true;
                    break;
                };
                eprintln!("{}: {}...", c.address, verb(&c.action, false));
                in_flight.insert(i, Instant::now());
                let ctx = ctx.clone();
                let changes = changes.clone();
                set.spawn(async move {
                    let t = Instant::now();
                    let c = &changes[i];
                    let r = provider.apply(c, &ctx).await;
                    if let Ok(Some(live)) = &r {
                        ctx.record(live);
                    }
                    if let Ok(None) = &r {
                        ctx.forget(&c.address);
                    }
                    (i, r, t.elapsed().as_secs_f64())
                });
            }
        }
        if set.is_empty() {
            break;
        }
        tokio::select! {
            joined = set.join_next() => {
                let Some(joined) = joined else { break };
                match joined {
                    Ok((i, result, secs)) => {
                        in_flight.remove(&i);
                        let c = &changes[i];
                        match result {
                            Ok(_) => {
                                eprintln!("{}: {} [{secs:.1}s]", c.address, verb(&c.action, true));
                                state[i] = Some(Outcome::Done { seconds: secs });
                            }
                            Err(e) => {
                                eprintln!("{}: failed after {secs:.1}s: {e}", c.address);
                                state[i] = Some(Outcome::Failed(e));
                                stop = true;
                            }
                        }
                    }
                    Err(join_error) => {
                        eprintln!("error: a change panicked: {join_error}");
                        stop = true;
                    }
                }
            }
            _ = ticker.tick() => {
                for (i, t) in &in_flight {
                    eprintln!("{}: still {}... [{}s elapsed]", changes[*i].address, verb(&changes[*i].action, false), t.elapsed().as_secs());
                }
            }
            changed = cancel.changed(), if !interrupted => {
                if changed.is_ok() && *cancel.borrow() {
                    eprintln!("interrupt: no new changes will start; waiting for {} in flight (press Ctrl-C again to abandon)", set.len());
                    interrupted = true;
                    stop = true;
                }
            }
        }
    }

    let outcomes = changes
        .iter()
        .zip(state)
        .map(|(c, s)| {
            (
                c.address.clone(),
                c.action.clone(),
                s.unwrap_or(Outcome::NotStarted),
            )
        })
        .collect();
    Report {
        outcomes,
        interrupted,
        refused: false,
    }
}

/// Runs every change's [`Provider::preflight`] (concurrently); a report of
/// the failures, changing nothing, when one fails.
async fn preflight(
    changes: &[Change],
    providers: &BTreeMap<ProviderId, Arc<dyn Provider>>,
    ctx: &Arc<ApplyContext>,
) -> Option<Report> {
    let mut set = JoinSet::new();
    for (i, c) in changes.iter().enumerate() {
        let Some(provider) = providers.get(&c.provider).cloned() else {
            continue;
        };
        let (c, ctx) = (c.clone(), ctx.clone());
        set.spawn(async move { (i, provider.preflight(&c, &ctx).await) });
    }
    let mut failed: BTreeMap<usize, ProviderError> = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        if let Ok((i, Err(e))) = joined {
            failed.insert(i, e);
        }
    }
    if failed.is_empty() {
        return None;
    }
    let outcomes = changes
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let o = failed
                .remove(&i)
                .map_or(Outcome::NotStarted, Outcome::Failed);
            (c.address.clone(), c.action.clone(), o)
        })
        .collect();
    Some(Report {
        outcomes,
        interrupted: false,
        refused: true,
    })
}

/// An error's text without the address it starts with (the report names it).
fn strip_address(addr: &Address, e: &ProviderError) -> String {
    let text = e.to_string();
    text.strip_prefix(&format!("{addr}: "))
        .map(str::to_owned)
        .unwrap_or(text)
}

fn verb(a: &Action, done: bool) -> &'static str {
    match (a, done) {
        (Action::Create, false) => "creating",
        (Action::Create, true) => "created",
        (Action::Update, false) => "updating",
        (Action::Update, true) => "updated",
        (Action::Replace { .. }, false) => "replacing",
        (Action::Replace { .. }, true) => "replaced",
        (Action::Delete, false) => "destroying",
        (Action::Delete, true) => "destroyed",
        (Action::NoOp, _) => "unchanged",
    }
}

/// The report for people (stderr).
pub fn render_report(r: &Report) -> String {
    let (a, c, d) = r.counts();
    if r.succeeded() {
        let only_deletes = !r.outcomes.is_empty()
            && r.outcomes
                .iter()
                .all(|(_, action, _)| *action == Action::Delete);
        if only_deletes {
            return format!("Destroy complete! Resources: {d} destroyed.\n");
        }
        return format!("Apply complete! Resources: {a} added, {c} changed, {d} destroyed.\n");
    }
    let mut out = String::new();
    if r.refused {
        out.push_str("Apply refused: nothing was changed.\n");
        for (addr, _, o) in &r.outcomes {
            if let Outcome::Failed(e) = o {
                out.push_str(&format!(
                    "  failed      {addr}: {}\n",
                    strip_address(addr, e)
                ));
            }
        }
        out.push_str("Fix the problems above and apply again.\n");
        return out;
    }
    out.push_str(if r.interrupted {
        "Apply interrupted.\n"
    } else {
        "Apply failed.\n"
    });
    for (addr, action, o) in &r.outcomes {
        let line = match o {
            Outcome::Done { seconds } => format!(
                "  done        {addr} ({}, {seconds:.1}s)",
                verb(action, true)
            ),
            Outcome::Failed(e) => format!("  failed      {addr} ({}): {e}", verb(action, false)),
            Outcome::NotStarted => format!("  not started {addr} ({})", verb(action, false)),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format!("Resources: {a} added, {c} changed, {d} destroyed. Run the same command again to converge.\n"));
    out
}
