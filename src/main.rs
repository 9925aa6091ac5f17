//! The `mesh` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "mesh",
    version,
    about = "Declarative ML data-mesh services: plan, apply and destroy them locally, on EKS or any Kubernetes cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Check a stack: syntax, types, references, CIDRs, ports, secrets.
    Validate {
        /// The stack folder (holding stack.toml).
        path: PathBuf,
        /// Environment to validate (with its overlay file); default: every declared one.
        #[arg(long)]
        env: Option<String>,
        /// Print errors as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Print the stack's resources and their dependencies, in dependency order.
    Graph {
        /// The stack folder (holding stack.toml).
        path: PathBuf,
        /// Environment whose resources to show (with its overlay file); default: the stack alone.
        #[arg(long)]
        env: Option<String>,
        /// `text` (indented, for people) or `dot` (Graphviz: `| dot -Tsvg`).
        #[arg(long, value_enum, default_value_t = GraphFormat::Text)]
        format: GraphFormat,
    },
    /// Read the live state, diff it against the stack and print what would change.
    Plan {
        /// The stack folder (holding stack.toml).
        path: PathBuf,
        /// The environment to plan (declared in stack.toml; `local` runs on this machine).
        #[arg(long)]
        env: String,
        /// Save the plan; `mesh apply FILE` applies exactly it.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the plan as JSON (versioned schema) instead of text.
        #[arg(long)]
        json: bool,
        /// Exit 0 when there are no changes, 2 when there are, 1 on error.
        #[arg(long)]
        detailed_exitcode: bool,
        /// Plan only these addresses (and what they depend on); repeatable.
        #[arg(long = "target", value_name = "ADDR")]
        targets: Vec<String>,
        /// Force these addresses to be replaced; repeatable.
        #[arg(long = "replace", value_name = "ADDR")]
        replace: Vec<String>,
        /// Plan the destruction of everything.
        #[arg(long)]
        destroy: bool,
    },
    /// Make the live state match the stack (or carry out a saved plan).
    Apply {
        /// A stack folder, or a plan file saved by `mesh plan --out`.
        path: PathBuf,
        /// The environment to apply (needed with a stack folder; refused with a saved plan,
        /// which names its own).
        #[arg(long)]
        env: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        auto_approve: bool,
        /// How many changes may run at once (at least 1).
        #[arg(long, default_value_t = 10, value_parser = at_least_one)]
        parallelism: usize,
        /// Do not wait for rollouts to become ready.
        #[arg(long)]
        no_wait: bool,
        /// Apply only these addresses (and what they depend on); repeatable.
        #[arg(long = "target", value_name = "ADDR")]
        targets: Vec<String>,
        /// Force these addresses to be replaced; repeatable.
        #[arg(long = "replace", value_name = "ADDR")]
        replace: Vec<String>,
        /// After applying, give every caller identity (each service's and
        /// the operator's) a new key without refusing a call: new keys
        /// accepted beside the old, callers switched, old keys removed.
        #[arg(long)]
        rotate_keys: bool,
    },
    /// Tear down everything the stack created in an environment.
    Destroy {
        /// The stack folder (holding stack.toml).
        path: PathBuf,
        /// The environment to tear down.
        #[arg(long)]
        env: String,
        /// A test instance of the environment (`mesh test --keep`, or one left behind).
        #[arg(long)]
        instance: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        auto_approve: bool,
        /// How many deletions may run at once (at least 1).
        #[arg(long, default_value_t = 10, value_parser = at_least_one)]
        parallelism: usize,
        /// Destroy only these addresses (and what depends on them); repeatable.
        #[arg(long = "target", value_name = "ADDR")]
        targets: Vec<String>,
        /// Do not wait for a Kubernetes namespace to finish going (AWS deletions are always awaited).
        #[arg(long)]
        no_wait: bool,
    },
    /// Show the applied environment's outputs: URLs, endpoints, ids, module outputs.
    ///
    /// Exposures' URLs, clusters' endpoints, registries' URLs, networks' ids
    /// and the stack's module outputs, grouped. With NAME, print that one value alone (for scripts). Exit 0 on
    /// success, 1 on an error or an unknown NAME (the known names are
    /// listed), 3 when nothing of the environment is applied.
    Output {
        /// The stack folder (holding stack.toml).
        path: PathBuf,
        /// One output to print bare, by its dotted name, e.g.
        /// `expose.scoring.url`, `cluster.main.endpoint`, `registry.models.url`,
        /// `network.main.vpc_id`, `module.platform.cluster`.
        name: Option<String>,
        /// The environment whose outputs to show.
        #[arg(long)]
        env: String,
        /// A test instance of the environment (`mesh test --keep`).
        #[arg(long)]
        instance: Option<String>,
        /// Print the outputs as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply an isolated instance of the stack, send its test queries and
    /// destroy the instance, whatever happens (exit 0 only when every query
    /// passed and nothing of the instance is left).
    Test {
        /// The stack folder (holding stack.toml and its test queries).
        path: PathBuf,
        /// The environment to test (the instance is a copy of it).
        #[arg(long)]
        env: String,
        /// Query what the environment already runs: nothing is applied or destroyed.
        #[arg(long, conflicts_with_all = ["keep", "instance"])]
        live: bool,
        /// Leave the instance up afterwards (and print how to destroy it).
        #[arg(long)]
        keep: bool,
        /// Only the tests whose `service/endpoint/test` contains PATTERN (`*` matches anything).
        #[arg(long, value_name = "PATTERN")]
        filter: Option<String>,
        /// Print the results as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write the results as JUnit XML, for CI.
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
        /// How many changes, and how many queries, may run at once (at least 1).
        #[arg(long, default_value_t = 8, value_parser = at_least_one)]
        parallelism: usize,
        /// How long each test query may take before it counts as an error
        /// (a duration: 250ms, 5s, 2m).
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
        timeout: std::time::Duration,
        /// How long the apply and the queries may take together before the
        /// run stops; the teardown always runs, without limit (a duration: 90s, 15m).
        #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = duration)]
        deadline: std::time::Duration,
        /// Name the instance (default: test-<random>).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Break a lock left by a killed apply or destroy.
    Unlock {
        /// The stack folder (holding stack.toml).
        path: PathBuf,
        /// The environment whose locks to break.
        #[arg(long)]
        env: String,
    },
    /// Print a shell completion script: `source <(mesh completions bash)`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// A count that must be at least 1 (`--parallelism 0` would run nothing).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{text}` is not a whole number")),
    }
}

/// A command-line duration, as durations are written in stacks (`5s`, `250ms`, `1h30m`).
fn duration(text: &str) -> Result<std::time::Duration, String> {
    match mesh::stack::parse_duration(text) {
        Some(d) if !d.is_zero() => Ok(d),
        Some(_) => Err("a duration of zero leaves no time at all".into()),
        None => Err(format!(
            "`{text}` is not a duration: write a number and a unit (ms, s, m, h, d), e.g. 5s or 1m30s"
        )),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Text,
    Dot,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { path, env, json } => validate(&path, env.as_deref(), json),
        Command::Graph { path, env, format } => graph(&path, env.as_deref(), format),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "mesh", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        command => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            rt.block_on(commands::run(command))
        }
    }
}

mod commands;

fn report_errors(report: &mesh::stack::Report, json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.to_json()).unwrap_or_default()
        );
    } else {
        eprint!("{}", report.render());
    }
    ExitCode::from(1)
}

fn validate(path: &std::path::Path, env: Option<&str>, json: bool) -> ExitCode {
    let envs: Vec<Option<String>> = match env {
        Some(e) => vec![Some(e.to_owned())],
        None => match mesh::stack::environments(path) {
            Ok(list) if !list.is_empty() => list.into_iter().map(Some).collect(),
            Ok(_) => vec![None],
            Err(report) => return report_errors(&report, json),
        },
    };
    for e in &envs {
        match mesh::stack::load(path, e.as_deref()) {
            Ok(stack) => {
                if !json {
                    eprintln!(
                        "ok: stack {} is valid for environment {} (target {:?}): {} networks, {} clusters, {} registries, {} connections, {} services, {} exposures",
                        stack.name,
                        stack.env.name,
                        stack.env.target,
                        stack.networks.len(),
                        stack.clusters.len(),
                        stack.registries.len(),
                        stack.connections.len(),
                        stack.services.len(),
                        stack.exposes.len()
                    );
                }
            }
            Err(report) => return report_errors(&report, json),
        }
    }
    if json {
        println!("{{\"errors\": []}}");
    }
    ExitCode::SUCCESS
}

fn graph(path: &std::path::Path, env: Option<&str>, format: GraphFormat) -> ExitCode {
    let stack = match mesh::stack::load(path, env) {
        Ok(s) => s,
        Err(report) => return report_errors(&report, false),
    };
    let nodes = mesh::graph::stack_graph(&stack);
    match format {
        GraphFormat::Text => {
            for (i, n) in nodes.iter().enumerate() {
                if n.depends_on.is_empty() {
                    println!("{:>3}. {}", i + 1, n.address);
                } else {
                    let deps: Vec<String> = n.depends_on.iter().map(ToString::to_string).collect();
                    println!("{:>3}. {}  <- {}", i + 1, n.address, deps.join(", "));
                }
            }
        }
        GraphFormat::Dot => {
            println!("digraph \"{}\" {{", stack.name);
            println!("  rankdir = LR;");
            for n in &nodes {
                println!("  \"{}\";", n.address);
                for d in &n.depends_on {
                    println!("  \"{}\" -> \"{}\";", n.address, d);
                }
            }
            println!("}}");
        }
    }
    ExitCode::SUCCESS
}
