//! The command line itself, through the real binary: every command's help
//! (snapshots, and every argument explained), the checks on arguments, saved
//! plans recognised by their content and applied from any folder, a targeted
//! destroy, and shell completions.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use support::local::{Env, ok, runtime_bin};

const COMMANDS: [&str; 10] = [
    "validate",
    "graph",
    "plan",
    "apply",
    "destroy",
    "output",
    "test",
    "unlock",
    "completions",
    "help",
];

fn mesh_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(args)
        .current_dir(dir)
        .env("MESH_RUNTIME_BIN", runtime_bin())
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn mesh(args: &[&str]) -> Output {
    mesh_in(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `mesh --help` and `mesh COMMAND --help` for every command, as snapshots;
/// and no argument or option goes without a line saying what it does.
#[test]
fn every_command_and_argument_has_help() {
    let mut all = vec![(String::from("mesh"), mesh(&["--help"]))];
    for c in COMMANDS.iter().filter(|c| **c != "help") {
        all.push((format!("mesh {c}"), mesh(&[c, "--help"])));
    }
    for (what, out) in &all {
        assert_eq!(out.status.code(), Some(0), "{what}: {}", text(out));
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        insta::assert_snapshot!(format!("help_{}", what.replace(' ', "_")), help);
        // Under "Arguments:" and "Options:", an entry is `  NAME  text`: a
        // name alone on its line (its text would follow on the next, more
        // indented) is an entry without help.
        let mut section = false;
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.ends_with(':') && !line.starts_with(' ') {
                section = matches!(*line, "Arguments:" | "Options:" | "Commands:");
                continue;
            }
            if !section || !line.starts_with("  ") || line.starts_with("   ") {
                continue;
            }
            let entry = line.trim();
            let described = entry.contains("  ")
                || lines
                    .get(i + 1)
                    .is_some_and(|next| next.starts_with("          "));
            assert!(described, "{what}: `{entry}` has no help text:\n{help}");
        }
    }
}

#[test]
fn a_parallelism_of_zero_is_an_error() {
    for command in ["apply", "destroy", "test"] {
        let out = mesh(&[
            command,
            "stacks/customer-mesh",
            "--env",
            "local",
            "--parallelism",
            "0",
        ]);
        assert_eq!(out.status.code(), Some(2), "{command}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--parallelism") && err.contains("at least 1"),
            "{command}: {err}"
        );
    }
}

#[test]
fn completions_for_every_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = mesh(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", text(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["plan", "apply", "destroy", "parallelism", "auto-approve"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let out = mesh(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

fn changes(plan: &Value) -> Vec<(String, String)> {
    support::local::changed_addresses(plan)
}

fn plan_json(env: &Env) -> Value {
    let out = env.mesh(&["plan", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A saved plan is a saved plan whatever its name; it applies from any
/// folder (the stack path it holds is absolute); `--env`, `--target` and
/// `--replace` cannot change it and are refused, with nothing changed.
#[test]
fn a_saved_plan_is_known_by_its_content_and_applies_from_anywhere() {
    let env = Env::new(|t| t);
    // A change to plan: the scoring service's version.
    let toml = env.stack.join("stack.toml");
    let before = std::fs::read_to_string(&toml).unwrap();
    let after = before.replacen("version = \"1.0.0\"", "version = \"1.0.1\"", 1);
    assert_ne!(before, after);
    std::fs::write(&toml, after).unwrap();
    let wanted = changes(&plan_json(&env));
    assert!(!wanted.is_empty(), "the edit makes a change");

    // Planned from the stack's parent folder with a relative path, saved
    // under a name without `.json`.
    let parent = env.stack.parent().unwrap();
    let file = env.stack.join("release-42.plan");
    let out = mesh_in(
        parent,
        &[
            "plan",
            "customer-mesh",
            "--env",
            "local",
            "--out",
            file.to_str().unwrap(),
        ],
    );
    ok(&out, "plan --out");

    for extra in [
        ["--env", "local"],
        ["--target", "service.customer-scoring"],
        ["--replace", "service.customer-scoring"],
    ] {
        let mut args = vec!["apply", file.to_str().unwrap()];
        args.extend(extra);
        let out = mesh(&args);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("is a saved plan") && err.contains(extra[0]),
            "{err}"
        );
    }
    assert_eq!(changes(&plan_json(&env)), wanted, "nothing was changed");

    // Applied from another folder altogether.
    let elsewhere = tempfile::tempdir().unwrap();
    ok(
        &mesh_in(elsewhere.path(), &["apply", file.to_str().unwrap()]),
        "apply the saved plan",
    );
    assert!(changes(&plan_json(&env)).is_empty(), "the plan was applied");

    // Any other file is a stack path, not a plan.
    let not_a_plan = env.stack.join("notes.json");
    std::fs::write(&not_a_plan, r#"{"format_version": "something else"}"#).unwrap();
    let out = mesh(&["apply", not_a_plan.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--env"),
        "{}",
        text(&out)
    );
}

/// `mesh destroy --target ADDR` destroys that and what depends on it, and
/// leaves the rest running.
#[test]
fn a_targeted_destroy_leaves_the_rest() {
    let env = Env::new(|t| t);
    let out = env.mesh(&[
        "destroy",
        "--auto-approve",
        "--target",
        "service.customer-scoring",
    ]);
    ok(&out, "destroy --target");
    let creates: Vec<String> = changes(&plan_json(&env))
        .into_iter()
        .filter(|(_, action)| action == "create")
        .map(|(address, _)| address)
        .collect();
    assert!(
        creates.iter().any(|a| a == "service.customer-scoring"),
        "{creates:?}"
    );
    assert!(
        creates.iter().all(|a| !a.contains("customer-features")),
        "the feature service stays: {creates:?}"
    );
    assert!(
        support::local::alive(env.pids[0]),
        "customer-features still runs"
    );
    assert!(
        !support::local::alive(env.pids[1]),
        "customer-scoring is gone"
    );
}
