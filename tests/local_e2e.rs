//! End to end on the local target, over the real `mesh` and `mesh-runtime`
//! binaries, real processes and real HTTP on loopback.
//!
//! Each test copies `stacks/customer-mesh` (with `modules/` and the example
//! data) into a temporary folder and moves its NodePorts to free ports, so
//! tests never touch the repository's own `.mesh/` state or each other.

mod support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

/// A copy of the example stack in a temp dir, on its own ports.
struct Mesh {
    _dir: tempfile::TempDir,
    stack: PathBuf,
    features_port: u16,
    scoring_port: u16,
}

fn free_port() -> u16 {
    // Ask the kernel for a free port in the NodePort range by trying a few.
    for _ in 0..200 {
        let p = 30000 + (rand_u32() % 2767) as u16;
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port found in 30000-32767");
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish() as u32
}

impl Mesh {
    fn new() -> Mesh {
        let runtime = runtime_bin();
        assert!(
            runtime.is_file(),
            "mesh-runtime is not built at {}: run `scripts/test` (it builds the whole workspace) or `cargo build -p mesh-runtime`",
            runtime.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let stack = support::copy_customer_mesh(dir.path());
        let features_port = free_port();
        let mut scoring_port = free_port();
        while scoring_port == features_port {
            scoring_port = free_port();
        }
        let toml = std::fs::read_to_string(stack.join("stack.toml")).unwrap();
        let toml = toml
            .replace("node_port = 30080", &format!("node_port = {features_port}"))
            .replace("node_port = 30081", &format!("node_port = {scoring_port}"));
        std::fs::write(stack.join("stack.toml"), toml).unwrap();
        Mesh {
            _dir: dir,
            stack,
            features_port,
            scoring_port,
        }
    }

    fn mesh(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh"));
        cmd.args(args)
            .env("MESH_RUNTIME_BIN", runtime_bin())
            .env("NO_COLOR", "1");
        cmd.output().unwrap()
    }

    fn run(&self, verb: &str, extra: &[&str]) -> Output {
        let stack = self.stack.to_str().unwrap();
        let mut args = vec![verb, stack, "--env", "local"];
        args.extend_from_slice(extra);
        self.mesh(&args)
    }

    fn apply(&self) -> Output {
        self.run("apply", &["--auto-approve"])
    }

    fn plan_json(&self) -> (i32, Value) {
        let out = self.run("plan", &["--json", "--detailed-exitcode"]);
        let code = out.status.code().unwrap_or(-1);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "plan --json is not JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (code, v)
    }

    fn pid_of(&self, service: &str) -> u32 {
        let state = std::fs::read_to_string(
            self.stack
                .join(format!(".mesh/local/services/{service}/state.json")),
        )
        .unwrap();
        let v: Value = serde_json::from_str(&state).unwrap();
        v["pid"].as_u64().unwrap() as u32
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Never leave processes behind, even when a test fails.
        let _ = self.run("destroy", &["--auto-approve"]);
    }
}

fn runtime_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_RUNTIME_BIN") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_BIN_EXE_mesh")).with_file_name("mesh-runtime")
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    post_with_key(url, body, None)
}

/// POST with `X-API-Key` when `key` is given.
fn post_with_key(url: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(host).unwrap();
    let body = body.to_string();
    let key = key
        .map(|k| format!("X-API-Key: {k}\r\n"))
        .unwrap_or_default();
    write!(s, "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{key}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let status: u16 = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (_, payload) = buf.split_once("\r\n\r\n").unwrap();
    // Chunked or not, the JSON object is between the first `{` and the last `}`.
    let start = payload.find('{').unwrap_or(0);
    let end = payload.rfind('}').map_or(payload.len(), |i| i + 1);
    (
        status,
        serde_json::from_str(&payload[start..end]).unwrap_or(Value::Null),
    )
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

fn changed_addresses(plan: &Value) -> Vec<(String, String)> {
    plan["resource_changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["action"] != "no-op")
        .map(|c| {
            (
                c["address"].as_str().unwrap().to_owned(),
                c["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn apply_serve_drift_repair_destroy() {
    let m = Mesh::new();
    ok(&m.apply(), "first apply");

    // URLs from `mesh output --json`.
    let out = m.run("output", &["--json"]);
    ok(&out, "output");
    let urls: Value = serde_json::from_slice(&out.stdout).unwrap();
    let predict_url = urls["exposes"]["customer-scoring"]["endpoints"]["high-value"]
        .as_str()
        .unwrap()
        .to_owned();
    let lookup_url = urls["exposes"]["customer-features"]["endpoints"]["behavior"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        predict_url.contains(&m.scoring_port.to_string()),
        "{predict_url}"
    );

    // Only customer-scoring may call customer-features (`allow`): on loopback
    // that is a key per caller. Without one, 401; with the operator's, 200;
    // customer-scoring (allowed from anywhere) needs none.
    assert!(
        urls["exposes"]["customer-scoring"]["api_key_file"].is_null(),
        "{urls}"
    );
    let key_file = urls["exposes"]["customer-features"]["api_key_file"]
        .as_str()
        .unwrap_or_else(|| panic!("no api_key_file for customer-features: {urls}"))
        .to_owned();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "{key_file}");
    let operator_key = std::fs::read_to_string(&key_file).unwrap();
    let ask = serde_json::json!({"data": {"customer_id": "C00042"}});
    let (status, refused) = post(&lookup_url, &ask);
    assert_eq!(status, 401, "{refused}");
    assert_eq!(refused["error"]["code"], "unauthorized", "{refused}");
    let (status, _) = post_with_key(&lookup_url, &ask, Some("not-the-key"));
    assert_eq!(status, 403);
    let (status, row) = post_with_key(&lookup_url, &ask, Some(&operator_key));
    assert_eq!(status, 200, "{row}");
    let keys = std::path::Path::new(&key_file).parent().unwrap();
    let mut callers: Vec<String> = std::fs::read_dir(keys)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    callers.sort();
    assert_eq!(callers, ["customer-scoring", "operator"]);
    let plan_text = String::from_utf8_lossy(&m.run("plan", &[]).stdout).into_owned();
    for k in [
        &key_file,
        &keys.join("customer-scoring").display().to_string(),
    ] {
        let key = std::fs::read_to_string(k).unwrap();
        assert!(!plan_text.contains(&key), "a key in the plan");
    }

    // Predict by id alone: the scoring service enriches from the feature service.
    let (status, by_id) = post(
        &predict_url,
        &serde_json::json!({"features": {"customer_id": "C00042"}}),
    );
    assert_eq!(status, 200, "{by_id}");
    let probas = by_id["result"]["probas"].clone();
    assert!(probas["1"].as_f64().is_some(), "{by_id}");
    assert!(
        by_id["result"]["enriched"].as_array().unwrap().len() >= 5,
        "{by_id}"
    );

    // Nothing to do now.
    let (code, plan) = m.plan_json();
    assert_eq!(code, 0, "{plan}");

    // Edit a dataset: only the feature service changes.
    let csv = m.stack.join("../../examples/customer-mesh/behavior.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("C00042,"))
        .unwrap()
        .to_owned();
    let mut cols: Vec<String> = line.split(',').map(str::to_owned).collect();
    cols[1] = "99999.0".into(); // total_spend_30d
    std::fs::write(&csv, text.replace(&line, &cols.join(","))).unwrap();
    let (code, plan) = m.plan_json();
    assert_eq!(code, 2, "{plan}");
    assert_eq!(
        changed_addresses(&plan),
        vec![("service.customer-features".to_owned(), "update".to_owned())]
    );
    ok(&m.apply(), "apply after dataset edit");
    let (status, row) = post_with_key(
        &lookup_url,
        &serde_json::json!({"data": {"customer_id": "C00042"}}),
        Some(&operator_key),
    );
    assert_eq!(status, 200, "{row}");
    assert_eq!(
        row["data"]["total_spend_30d"].as_f64(),
        Some(99999.0),
        "{row}"
    );
    let (_, after) = post(
        &predict_url,
        &serde_json::json!({"features": {"customer_id": "C00042"}}),
    );
    assert_ne!(
        after["result"]["probas"], probas,
        "a customer spending 99999 must score differently"
    );

    // Kill a runtime: plan shows it, apply repairs it.
    let pid = m.pid_of("customer-features");
    Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status()
        .unwrap();
    for _ in 0..100 {
        if !alive(pid) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (code, plan) = m.plan_json();
    assert_eq!(code, 2, "{plan}");
    assert_eq!(
        changed_addresses(&plan),
        vec![("service.customer-features".to_owned(), "update".to_owned())]
    );
    ok(&m.apply(), "repairing apply");
    let (code, plan) = m.plan_json();
    assert_eq!(code, 0, "{plan}");
    let (status, _) = post(
        &predict_url,
        &serde_json::json!({"features": {"customer_id": "C00042"}}),
    );
    assert_eq!(status, 200);

    // Destroy: no process, no port, nothing left to destroy.
    let pids = [m.pid_of("customer-features"), m.pid_of("customer-scoring")];
    ok(&m.run("destroy", &["--auto-approve"]), "destroy");
    for pid in pids {
        assert!(!alive(pid), "pid {pid} still running after destroy");
    }
    for port in [m.features_port, m.scoring_port] {
        assert!(
            TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} still taken after destroy"
        );
    }
    let out = m.run("plan", &["--destroy", "--detailed-exitcode"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn saved_plan_is_refused_after_a_change_and_applies_when_fresh() {
    let m = Mesh::new();
    let plan_file = m.stack.join("saved.json");
    let out = m.run("plan", &["--out", plan_file.to_str().unwrap()]);
    ok(&out, "plan --out");
    // Something changes the live state in between: another apply.
    ok(&m.apply(), "apply");
    let out = m.mesh(&["apply", plan_file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stale"), "{err}");
    assert!(err.contains("service.customer-features appeared"), "{err}");

    // A fresh saved plan applies.
    let out = m.run("plan", &["--destroy", "--out", plan_file.to_str().unwrap()]);
    ok(&out, "plan --destroy --out");
    ok(
        &m.mesh(&["apply", plan_file.to_str().unwrap()]),
        "apply saved destroy plan",
    );
    let (code, _) = m.plan_json();
    assert_eq!(
        code, 2,
        "everything was destroyed, so everything is to create"
    );
}

#[test]
fn concurrent_apply_is_refused_naming_the_holder() {
    let m = Mesh::new();
    let state = m.stack.join(".mesh/local");
    std::fs::create_dir_all(&state).unwrap();
    // A holder that is alive: this test process.
    let holder = serde_json::json!({"pid": std::process::id(), "host": std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim(), "command": "mesh apply", "since": 1_795_000_000u64});
    std::fs::write(state.join("lock"), holder.to_string()).unwrap();
    let out = m.apply();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert!(err.contains("2026-11-18T11:06:40Z"), "{err}");
    assert!(err.contains("mesh unlock"), "{err}");
    assert!(
        !state.join("services").exists(),
        "nothing may be started while locked"
    );
    ok(&m.run("unlock", &[]), "unlock");
    ok(&m.apply(), "apply after unlock");
}

#[test]
fn failure_mid_apply_reports_and_a_rerun_converges() {
    let m = Mesh::new();
    // Something else holds the scoring service's port.
    let squatter = TcpListener::bind(("127.0.0.1", m.scoring_port)).unwrap();
    let out = m.apply();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Apply failed."), "{err}");
    assert!(
        err.contains("done        service.customer-features"),
        "{err}"
    );
    assert!(
        err.contains("failed      service.customer-scoring"),
        "{err}"
    );
    assert!(err.contains("is taken by another program"), "{err}");
    assert!(err.contains("not started expose.customer-scoring"), "{err}");
    drop(squatter);
    ok(&m.apply(), "rerun");
    let (code, plan) = m.plan_json();
    assert_eq!(code, 0, "{plan}");
}

#[test]
fn destroy_leaves_no_state_behind() {
    let m = Mesh::new();
    ok(&m.apply(), "apply");
    let out = m.run("destroy", &["--auto-approve"]);
    ok(&out, "destroy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Destroy complete! Resources: 4 destroyed."),
        "{err}"
    );
    assert!(
        !m.stack.join(".mesh").exists(),
        "destroy must remove the .mesh state folder"
    );
}
