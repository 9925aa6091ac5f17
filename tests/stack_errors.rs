//! The stack error corpus, run through the real `mesh` binary.
//!
//! Each folder `tests/data/stack/<case>/` is a small stack: `stack.toml`,
//! optional `<env>.toml` overlays, an optional local `modules/` folder and
//! placeholder data files, and an optional `args` file with extra arguments
//! for `mesh validate` (e.g. `--env dev`). Beside it, `expected.stderr` is
//! the exact output of `mesh validate tests/data/stack/<case> <args>` run from
//! the repository root, and `expected.code` its exit code.
//!
//! To add a case, write the stack and run
//!
//!     MESH_BLESS=1 cargo test -p mesh --test stack_errors
//!
//! which (re)writes every `expected.stderr` and `expected.code`; then read
//! the new output by eye: the line and column must point at the offending
//! token, the message must be right and the help actionable.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `mesh ARGS` from the repository root, so paths in the output are stable.
fn mesh(args: &[String]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("running mesh {}: {e}", args.join(" ")));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Every case folder, by name.
fn cases() -> Vec<String> {
    let dir = repo().join("tests/data/stack");
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|d| d.ok())
        .filter(|d| d.path().is_dir())
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

fn bless() -> bool {
    std::env::var("MESH_BLESS").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The `mesh validate` arguments of a case.
fn validate_args(case: &str, dir: &Path) -> Vec<String> {
    let mut out = args(&["validate", &format!("tests/data/stack/{case}")]);
    if let Ok(extra) = std::fs::read_to_string(dir.join("args")) {
        out.extend(extra.split_whitespace().map(str::to_owned));
    }
    out
}

#[test]
fn corpus() {
    let bless = bless();
    let mut failures: Vec<String> = Vec::new();
    let mut codes_seen: BTreeSet<String> = BTreeSet::new();
    let (mut good, mut bad) = (0, 0);
    for case in cases() {
        let dir = repo().join("tests/data/stack").join(&case);
        let argv = validate_args(&case, &dir);
        let cmd = format!("mesh {}", argv.join(" "));
        let run = mesh(&argv);
        if bless {
            std::fs::write(dir.join("expected.stderr"), &run.stderr)
                .expect("writing expected.stderr");
            std::fs::write(dir.join("expected.code"), format!("{}\n", run.code))
                .expect("writing expected.code");
        }
        let mut problems: Vec<String> = Vec::new();

        match read(&dir.join("expected.code")).map(|c| c.trim().parse::<i32>()) {
            Some(Ok(code)) if code == run.code => {}
            Some(Ok(code)) => {
                problems.push(format!("exit code: expected {code}, got {}", run.code))
            }
            Some(Err(e)) => problems.push(format!("expected.code is not a number: {e}")),
            None => problems.push("no expected.code (run with MESH_BLESS=1 to write it)".into()),
        }
        match read(&dir.join("expected.stderr")) {
            Some(expected) if expected == run.stderr => {}
            Some(expected) => problems.push(format!(
                "stderr differs (- expected, + actual):\n{}",
                diff(&expected, &run.stderr)
            )),
            None => problems.push("no expected.stderr (run with MESH_BLESS=1 to write it)".into()),
        }

        if run.code == 0 {
            good += 1;
            if run.stderr.contains("error") {
                problems.push(format!(
                    "exit code 0 but stderr mentions an error:\n{}",
                    run.stderr
                ));
            }
        } else {
            bad += 1;
            problems.extend(check_diagnostics(&run.stderr, &mut codes_seen));
            problems.extend(check_json(&argv, &run.stderr));
        }

        if !problems.is_empty() {
            let mut msg = format!("case {case} ({cmd}):\n");
            for p in problems {
                let _ = writeln!(msg, "  {}", p.replace('\n', "\n  "));
            }
            failures.push(msg);
        }
    }

    // Every error class the stack language promises has at least one case.
    let required = [
        "syntax",
        "unknown-key",
        "wrong-type",
        "missing-field",
        "dangling-reference",
        "cycle",
        "invalid-cidr",
        "overlapping-cidr",
        "subnet-outside-network",
        "nat-gateway-placement",
        "caller-not-allowed",
        "duplicate",
        "port-out-of-range",
        "port-conflict",
        "inline-secret",
        "unknown-environment",
    ];
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|c| !codes_seen.contains(*c))
        .collect();
    if !missing.is_empty() {
        failures.push(format!(
            "no case produces these error classes: {}",
            missing.join(", ")
        ));
    }
    if good == 0 {
        failures.push("no good case (exit code 0) in tests/data/stack".into());
    }
    assert!(
        failures.is_empty(),
        "{} of {} stack cases ({good} good, {bad} bad) failed:\n\n{}\nIf the new output is right, run `MESH_BLESS=1 cargo test -p mesh --test stack_errors` and review the changed expected.stderr files.",
        failures.len(),
        good + bad,
        failures.join("\n")
    );
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Every diagnostic in `stderr` names a location (`--> path:LINE:COL`),
/// shows the line with the span underlined, and gives a `= help:` hint.
fn check_diagnostics(stderr: &str, codes: &mut BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    let blocks: Vec<&str> = stderr
        .split("\n\n")
        .filter(|b| b.starts_with("error["))
        .collect();
    if blocks.is_empty() {
        problems.push(format!(
            "failed without an `error[...]` diagnostic:\n{stderr}"
        ));
    }
    for b in &blocks {
        let head = b.lines().next().unwrap_or_default();
        if let Some(code) = head
            .strip_prefix("error[")
            .and_then(|r| r.split_once(']'))
            .map(|x| x.0)
        {
            codes.insert(code.to_owned());
        }
        let located = b.lines().any(|l| {
            l.trim_start()
                .strip_prefix("--> ")
                .and_then(|loc| {
                    loc.rsplitn(3, ':')
                        .collect::<Vec<_>>()
                        .get(..2)
                        .map(|lc| lc.iter().all(|n| n.parse::<usize>().is_ok()))
                })
                .unwrap_or(false)
        });
        let underlined = b
            .lines()
            .any(|l| l.trim_start().starts_with('|') && l.contains('^'));
        let helped = b.lines().any(|l| l.trim_start().starts_with("= help: "));
        for (ok, what) in [
            (located, "a `--> path:LINE:COL` line"),
            (underlined, "an underline (`^`)"),
            (helped, "a `= help:` line"),
        ] {
            if !ok {
                problems.push(format!("diagnostic `{head}` lacks {what}"));
            }
        }
    }
    let summary = format!(
        "error: stack has {} error{}\n",
        blocks.len(),
        if blocks.len() == 1 { "" } else { "s" }
    );
    if !stderr.ends_with(&summary) {
        problems.push(format!("stderr does not end with `{}`", summary.trim_end()));
    }
    problems
}

/// `--json` lists the same errors, each with a location and a hint.
fn check_json(argv: &[String], stderr: &str) -> Vec<String> {
    let mut json_args = argv.to_vec();
    json_args.push("--json".into());
    let run = mesh(&json_args);
    let mut problems = Vec::new();
    if run.code != 1 {
        problems.push(format!("--json: exit code {}, expected 1", run.code));
    }
    let value: serde_json::Value = match serde_json::from_str(&run.stdout) {
        Ok(v) => v,
        Err(e) => return vec![format!("--json output does not parse: {e}\n{}", run.stdout)],
    };
    let Some(errors) = value["errors"].as_array() else {
        return vec![format!(
            "--json output has no `errors` array:\n{}",
            run.stdout
        )];
    };
    let text_codes: Vec<&str> = stderr
        .lines()
        .filter_map(|l| {
            l.strip_prefix("error[")
                .and_then(|r| r.split_once(']'))
                .map(|x| x.0)
        })
        .collect();
    let json_codes: Vec<&str> = errors
        .iter()
        .map(|e| e["code"].as_str().unwrap_or("?"))
        .collect();
    if json_codes != text_codes {
        problems.push(format!(
            "--json lists {json_codes:?}, the text output {text_codes:?}"
        ));
    }
    for e in errors {
        if e["location"]["line"].as_u64().is_none() || e["help"].as_str().is_none() {
            problems.push(format!("--json error without location or help: {e}"));
        }
    }
    problems
}

/// A line diff (longest common subsequence), `-` expected, `+` actual.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            let _ = writeln!(out, "  {}", a[i]);
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            let _ = writeln!(out, "- {}", a[i]);
            i += 1;
        } else {
            let _ = writeln!(out, "+ {}", b[j]);
            j += 1;
        }
    }
    if expected.ends_with('\n') != actual.ends_with('\n') {
        out.push_str("(the final newline differs)\n");
    }
    out
}

/// The environments `stacks/customer-mesh` declares.
fn seed_environments() -> Vec<String> {
    let path: PathBuf = repo().join("stacks/customer-mesh");
    mesh::stack::environments(&path)
        .unwrap_or_else(|r| panic!("stacks/customer-mesh does not load:\n{}", r.render()))
}

#[test]
fn seed_stack_validates_for_every_environment() {
    let envs = seed_environments();
    for required in ["local", "dev", "prod"] {
        assert!(
            envs.iter().any(|e| e == required),
            "stacks/customer-mesh must declare environment `{required}`, declares {envs:?}"
        );
    }
    let mut failures = Vec::new();
    for env in &envs {
        let run = mesh(&args(&["validate", "stacks/customer-mesh", "--env", env]));
        if run.code != 0 {
            failures.push(format!(
                "--env {env}: exit code {}\n{}",
                run.code, run.stderr
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "mesh validate stacks/customer-mesh failed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn seed_stack_graph_is_in_dependency_order() {
    let run = mesh(&args(&["graph", "stacks/customer-mesh", "--env", "dev"]));
    assert_eq!(
        run.code, 0,
        "mesh graph stacks/customer-mesh --env dev failed:\n{}",
        run.stderr
    );
    // Lines look like `  3. cluster.platform  <- network.platform`.
    let order: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| {
            l.split_once(". ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
        })
        .collect();
    let position = |addr: &str| {
        order
            .iter()
            .position(|a| *a == addr)
            .unwrap_or_else(|| panic!("`{addr}` is not in the graph:\n{}", run.stdout))
    };
    let expected = [
        "network.platform",
        "cluster.platform",
        "service.customer-features",
        "service.customer-scoring",
    ];
    for pair in expected.windows(2) {
        assert!(
            position(pair[0]) < position(pair[1]),
            "`{}` must come before `{}`:\n{}",
            pair[0],
            pair[1],
            run.stdout
        );
    }
}
