//! `mesh test` on the local target, through the real `mesh` and
//! `mesh-runtime` binaries: a passing run, a failing expectation, an apply
//! that fails half way and Ctrl-C during the queries each end with nothing
//! of the test instance left (no process, no port, no state folder), while
//! the environment's own services, applied beforehand from the same stack,
//! keep running untouched. The JUnit report is read by a real JUnit parser
//! (Python's `junitparser`).

mod support;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use support::local::{Env, alive, ok, processes_mentioning, runtime_bin};

/// Nothing of any test instance is left, and the environment's own
/// services still run and answer.
fn assert_only_the_environment_is_left(env: &Env, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let state: Vec<String> = std::fs::read_dir(env.stack.join(".mesh"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(state, ["local"], "instance state left behind:\n{stderr}");
    let marker = format!("{}/.mesh/local-", env.stack.display());
    let procs = processes_mentioning(&marker);
    assert!(
        procs.is_empty(),
        "processes of the instance still run: {procs:?}\n{stderr}"
    );
    for p in instance_ports(&stderr) {
        assert!(
            TcpListener::bind(("127.0.0.1", p)).is_ok(),
            "the instance's port {p} is still taken\n{stderr}"
        );
    }
    for pid in &env.pids {
        assert!(alive(*pid), "the environment's runtime {pid} was stopped");
    }
    let (status, body) = post(
        env.ports[1],
        "/public/api/v1/customer-scoring/high-value/predict",
        r#"{"features": {"customer_id": "C00042"}}"#,
    );
    assert_eq!(status, 200, "the environment no longer answers: {body}");
}

/// The instance's ports, from the header (`ports customer-features:31234, ...`).
fn instance_ports(stderr: &str) -> Vec<u16> {
    let Some(line) = stderr.lines().find(|l| l.starts_with("Testing stack")) else {
        return Vec::new();
    };
    line.split([' ', ','])
        .filter_map(|w| w.split_once(':'))
        .filter_map(|(_, p)| p.trim_end_matches(';').parse().ok())
        .collect()
}

fn post(port: u16, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let status = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, buf)
}

/// The JUnit report as a real parser reads it: per suite, its counts and cases.
fn parse_junit(file: &Path) -> Value {
    let python = std::env::var_os("MESH_TEST_JUNIT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/mesh/junit-venv/bin/python"));
    let script = r#"
import json, sys
from junitparser import JUnitXml
xml = JUnitXml.fromfile(sys.argv[1])
suites = []
for s in xml:
    cases = [{"classname": c.classname, "name": c.name,
              "result": [type(r).__name__.lower() for r in c.result]} for c in s]
    suites.append({"name": s.name, "tests": s.tests, "failures": s.failures,
                   "errors": s.errors, "cases": cases})
print(json.dumps({"tests": xml.tests, "failures": xml.failures, "errors": xml.errors, "suites": suites}))
"#;
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): the JUnit check needs Python with junitparser; scripts/test makes it (or set MESH_TEST_JUNIT_PYTHON)",
                python.display()
            )
        });
    ok(&out, "parsing the JUnit report with junitparser");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The cases of a parsed report as `classname/name → results`.
fn cases(junit: &Value) -> Vec<(String, Vec<String>)> {
    junit["suites"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["cases"].as_array().unwrap().clone())
        .map(|c| {
            (
                format!(
                    "{}/{}",
                    c["classname"].as_str().unwrap(),
                    c["name"].as_str().unwrap()
                ),
                c["result"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn a_passing_run_reports_every_query_and_leaves_nothing_of_the_instance() {
    let env = Env::new(|t| t);
    let junit = env.stack.join("report.xml");
    let out = env.mesh(&["test", "--junit", junit.to_str().unwrap()]);
    ok(&out, "mesh test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("5 passed, 0 failed"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("customer-scoring")
            && l.contains("by-id")
            && l.contains("passed")),
        "{stdout}"
    );
    assert!(stderr.contains("found nothing left"), "{stderr}");
    assert_eq!(instance_ports(&stderr).len(), 2, "{stderr}");
    // One port policy: the local provider's allocator, below the NodePorts.
    assert!(
        instance_ports(&stderr)
            .iter()
            .all(|p| mesh::provider::local::ports::RANGE.contains(p)),
        "{stderr}"
    );
    assert!(
        instance_ports(&stderr)
            .iter()
            .all(|p| !env.ports.contains(p)),
        "the instance must not use the environment's ports: {stderr}"
    );
    assert_only_the_environment_is_left(&env, &out);

    let report = parse_junit(&junit);
    assert_eq!(report["tests"], 6, "5 queries and the teardown: {report}");
    assert_eq!(report["failures"], 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    let cases = cases(&report);
    assert!(
        cases.contains(&("customer-scoring.high-value/by-id".into(), vec![])),
        "{cases:?}"
    );
    assert!(
        cases.contains(&("mesh.instance/teardown".into(), vec![])),
        "{cases:?}"
    );

    // The same through --json, and --filter keeps the test it is same_as.
    let out = env.mesh(&["test", "--json", "--filter", "*/by-id"]);
    ok(&out, "mesh test --json --filter");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["passed"], 1, "{v}");
    assert_eq!(v["tests"][0]["test"], "by-id", "{v}");
    assert_eq!(v["teardown"]["status"], "destroyed", "{v}");
    assert_eq!(v["teardown"]["left"], serde_json::json!([]), "{v}");
    assert_only_the_environment_is_left(&env, &out);
}

#[test]
fn a_failing_expectation_fails_with_a_field_level_diff_and_is_torn_down() {
    let env = Env::new(|t| t.replace("prediction = \"1\"", "prediction = \"0\""));
    let junit = env.stack.join("report.xml");
    let out = env.mesh(&["test", "--junit", junit.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("4 passed, 1 failed"), "{stdout}");
    assert!(
        stdout.contains("    prediction: expected \"0\", got \"1\""),
        "{stdout}"
    );
    assert_only_the_environment_is_left(&env, &out);

    let report = parse_junit(&junit);
    assert_eq!(report["failures"], 1, "{report}");
    let cases = cases(&report);
    assert!(
        cases.contains(&(
            "customer-scoring.high-value/all-features".into(),
            vec!["failure".into()]
        )),
        "{cases:?}"
    );
}

#[test]
fn an_apply_that_fails_half_way_is_torn_down() {
    let env = Env::new(|t| t);
    // The scoring model is unreadable: its runtime exits at start, after
    // the feature service is already up.
    std::fs::write(
        env.stack
            .join("../../examples/customer-mesh/high_value.onnx"),
        b"not a model",
    )
    .unwrap();
    let junit = env.stack.join("report.xml");
    let out = env.mesh(&["test", "--junit", junit.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("failed      service.customer-scoring"),
        "{stderr}"
    );
    assert!(
        stderr.contains("error: the test instance's apply failed"),
        "{stderr}"
    );
    assert!(stderr.contains("found nothing left"), "{stderr}");
    assert_only_the_environment_is_left(&env, &out);
    let report = parse_junit(&junit);
    let cases = cases(&report);
    assert!(
        cases.contains(&("mesh.instance/apply".into(), vec!["error".into()])),
        "{cases:?}"
    );
}

/// Runs `mesh test` in the background; `on_line` sees each stderr line.
fn run_watching(env: &Env, mut on_line: impl FnMut(&str, u32)) -> (Option<i32>, String) {
    let mut child = env
        .command("test", &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stderr = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        on_line(&line, pid);
        stderr.push_str(&line);
        stderr.push('\n');
    }
    let status = child.wait().unwrap();
    (status.code(), stderr)
}

fn signal(pid: u32, sig: &str) {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
}

/// The pid of the instance's runtime of `service`.
fn instance_pid(stack: &Path, service: &str) -> u32 {
    let mesh = stack.join(".mesh");
    for e in std::fs::read_dir(&mesh).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("local-")
            && let Ok(s) =
                std::fs::read_to_string(e.path().join(format!("services/{service}/state.json")))
        {
            return serde_json::from_str::<Value>(&s).unwrap()["pid"]
                .as_u64()
                .unwrap() as u32;
        }
    }
    panic!("no instance runtime of {service} under {}", mesh.display())
}

#[test]
fn ctrl_c_during_the_queries_tears_the_instance_down() {
    let env = Env::new(|t| t);
    // The feature runtime is frozen once up, so the queries hang in flight
    // until Ctrl-C; it is thawed right after, for the teardown to stop it.
    let mut frozen = None;
    let (code, stderr) = run_watching(&env, |line, mesh_pid| {
        if line.starts_with("service.customer-scoring: starting on") {
            let pid = instance_pid(&env.stack, "customer-features");
            signal(pid, "STOP");
            frozen = Some(pid);
        }
        if line.starts_with("Sending 5 test queries") {
            std::thread::sleep(std::time::Duration::from_millis(300));
            signal(mesh_pid, "INT");
            if let Some(pid) = frozen {
                signal(pid, "CONT");
            }
        }
    });
    assert_eq!(code, Some(130), "{stderr}");
    assert!(frozen.is_some(), "{stderr}");
    assert!(
        stderr.contains("Interrupted: destroying the test instance"),
        "{stderr}"
    );
    assert!(
        stderr.contains("error: interrupted during the test queries"),
        "{stderr}"
    );
    assert!(stderr.contains("found nothing left"), "{stderr}");
    let out = Output {
        status: std::process::ExitStatus::default(),
        stdout: Vec::new(),
        stderr: stderr.into_bytes(),
    };
    assert_only_the_environment_is_left(&env, &out);
}

#[test]
fn a_second_ctrl_c_leaves_the_instance_and_prints_the_command_that_removes_it() {
    let env = Env::new(|t| t);
    let mut frozen = None;
    let (code, stderr) = run_watching(&env, |line, mesh_pid| {
        if line.starts_with("service.customer-scoring: starting on") {
            let pid = instance_pid(&env.stack, "customer-features");
            signal(pid, "STOP");
            frozen = Some(pid);
        }
        if line.starts_with("Sending 5 test queries") {
            std::thread::sleep(std::time::Duration::from_millis(300));
            signal(mesh_pid, "INT");
        }
        // The teardown waits on the frozen runtime: the second Ctrl-C now.
        if line.starts_with("Tearing the test instance down") {
            signal(mesh_pid, "INT");
        }
    });
    if let Some(pid) = frozen {
        signal(pid, "CONT");
    }
    assert_eq!(code, Some(130), "{stderr}");
    let cmd = stderr
        .lines()
        .skip_while(|l| !l.starts_with("Left the test instance behind"))
        .nth(1)
        .unwrap_or_else(|| panic!("no command printed:\n{stderr}"))
        .trim()
        .to_owned();
    assert!(cmd.starts_with("mesh destroy "), "{cmd}");
    assert!(cmd.contains("--env local --instance test-"), "{cmd}");
    // It was left behind, and the printed command removes it.
    assert_eq!(
        std::fs::read_dir(env.stack.join(".mesh")).unwrap().count(),
        2,
        "{stderr}"
    );
    let args: Vec<&str> = cmd.split_whitespace().skip(1).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(&args)
        .env("MESH_RUNTIME_BIN", runtime_bin())
        .output()
        .unwrap();
    ok(&out, &cmd);
    let state: Vec<String> = std::fs::read_dir(env.stack.join(".mesh"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(state, ["local"], "{}", String::from_utf8_lossy(&out.stderr));
    let marker = format!("{}/.mesh/local-", env.stack.display());
    assert!(processes_mentioning(&marker).is_empty());
}

#[test]
fn timeout_and_deadline_take_durations() {
    let stack = Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
    for (flag, bad, says) in [
        ("--timeout", "5", "`5` is not a duration"),
        ("--timeout", "5 min", "`5 min` is not a duration"),
        ("--deadline", "0s", "a duration of zero"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_mesh"))
            .arg("test")
            .arg(&stack)
            .args(["--env", "local", flag, bad])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {bad}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(says),
            "{flag} {bad}: {stderr}"
        );
    }
    let help = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(["test", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("How long each test query may take") && help.contains("[default: 30s]"),
        "{help}"
    );
}

/// Test queries may pin a generation: with the scoring endpoint split 50/50
/// by customer id, one query pinned to each generation for the same
/// customer passes (dispatch alone would send both to the one generation
/// the key picks: without the pin one of them would fail).
#[test]
fn test_queries_pin_a_generation() {
    let pinned = |name: &str| {
        format!(
            "\n[[service.customer-scoring.endpoint.high-value.test]]\nname = \"on-{name}\"\n\
             request = {{ features = {{ customer_id = \"C00042\" }} }}\ngeneration = \"{name}\"\n\
             same_as = \"all-features\"\n"
        )
    };
    let env =
        Env::new(|t| support::generations_toml(&t, Some(50), 50) + &pinned("v1") + &pinned("v2"));
    let out = env.mesh(&["test", "--json", "--filter", "*/on-*"]);
    ok(&out, "mesh test");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["passed"], 2, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_only_the_environment_is_left(&env, &out);
}

/// A generation may read its features from sources of its own: v2 reads
/// behaviour from another feature service (its own `enrich`; that service
/// admits customer-scoring alone, so the lookup presents its key), v1 from
/// the endpoint's. Each pinned query by id equals the same generation's
/// answer with every feature of its own sources sent, and the two sources
/// differ for this customer (7 more orders), so v2 reading the endpoint's
/// sources would fail its query.
#[test]
fn a_generation_reads_its_features_from_its_own_sources() {
    let data = tempfile::tempdir().unwrap();
    let csv = data.path().join("behavior_next.csv");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/customer-mesh/behavior.csv");
    let text = std::fs::read_to_string(example).unwrap();
    let edited = text.replace("C00042,141.32,6,", "C00042,141.32,13,");
    assert_ne!(edited, text, "the example's C00042 behaviour");
    std::fs::write(&csv, edited).unwrap();
    let port = support::local::free_port(&[]);
    let features = |orders: u32| {
        format!(
            "{{ customer_id = \"C00042\", age = 28, gender = \"M\", region = \"west\", campaign = \"spring_sale\", loyalty_member = 1, total_spend_30d = 141.32, orders_90d = {orders}, days_since_last_order = 1, avg_basket = 47.25 }}"
        )
    };
    let query = |name: &str, generation: &str, request: &str, same_as: &str| {
        format!(
            "\n[[service.customer-scoring.endpoint.high-value.test]]\nname = \"{name}\"\n\
             request = {{ features = {request} }}\ngeneration = \"{generation}\"\n{same_as}\n"
        )
    };
    let by_id = "{ customer_id = \"C00042\" }";
    let env = Env::new(|t| {
        let t = support::generations_toml(&t, Some(50), 50).replace(
            "name = \"v2\"\n",
            "name = \"v2\"\nenrich = [\n  { lookup = \"customer-features.demographics\", key = \"customer_id\" },\n  { lookup = \"features-next.behavior\", key = \"customer_id\" },\n]\n",
        );
        format!(
            "{t}\n[service.features-next.dataset.behavior]\nfile = \"{}\"\nkey = \"customer_id\"\n\n\
             [service.features-next.endpoint.behavior]\nkind = \"lookup\"\ndatasets = [\"behavior\"]\n\n\
             [expose.features-next]\ntype = \"NodePort\"\nport = 8080\nnode_port = {port}\nallow = [\"customer-scoring\"]\n{}{}{}",
            csv.display(),
            query("on-v1", "v1", by_id, "same_as = \"all-features\""),
            query("on-v2-all", "v2", &features(13), "prediction = \"1\""),
            query("on-v2", "v2", by_id, "same_as = \"on-v2-all\""),
        )
    });
    let out = env.mesh(&["test", "--json", "--filter", "*/on-*"]);
    ok(&out, "mesh test");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["passed"], 3, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_only_the_environment_is_left(&env, &out);
}
