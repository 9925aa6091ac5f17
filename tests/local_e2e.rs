//! End to end on the local target, over the real `mesh` and `mesh-runtime`
//! binaries, real processes and real HTTP on loopback.
//!
//! Each test copies `stacks/customer-mesh` (with `modules/` and the example
//! data) into a temporary folder and moves its NodePorts to free ports, so
//! tests never touch the repository's own `.mesh/` state or each other.

mod support;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;
use support::local::{
    alive, changed_addresses, files_under, free_port, ok, runtime_bin, try_request, try_request_tls,
};

/// A copy of the example stack in a temp dir, on its own ports.
struct Mesh {
    _dir: tempfile::TempDir,
    stack: PathBuf,
    features_port: u16,
    scoring_port: u16,
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
        let features_port = free_port(&[]);
        let scoring_port = free_port(&[features_port]);
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

fn post(url: &str, body: &Value) -> (u16, Value) {
    post_with_key(url, body, None)
}

/// POST with `X-API-Key` when `key` is given.
fn post_with_key(url: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
    support::local::post(url, body, key)
}

/// Nothing applied: `mesh output` says so and exits 3, with or without a
/// NAME, so a script can tell it from an error (1).
#[test]
fn output_before_any_apply_exits_3() {
    let m = Mesh::new();
    for extra in [&[][..], &["--json"], &["expose.customer-scoring.url"]] {
        let out = m.run("output", extra);
        assert_eq!(out.status.code(), Some(3), "output {extra:?}: {out:?}");
        assert!(out.stdout.is_empty(), "output {extra:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("nothing of stack `customer-mesh` is applied in environment `local`")
                && err.contains("mesh apply"),
            "{err}"
        );
    }
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
    assert_eq!(
        urls["exposes"]["customer-scoring"]["port"], m.scoring_port,
        "{urls}"
    );
    // The stack's module outputs, as `${module.M.O}` resolves them.
    assert_eq!(urls["modules"]["platform"]["cluster"], "platform", "{urls}");

    // `mesh output NAME`: the value alone, for scripts.
    let bare = |name: &str| {
        let out = m.run("output", &[name]);
        ok(&out, name);
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        bare("expose.customer-scoring.url"),
        format!("http://127.0.0.1:{}\n", m.scoring_port)
    );
    assert_eq!(
        bare("expose.customer-scoring.endpoints.high-value"),
        format!("{predict_url}\n")
    );
    assert_eq!(bare("module.platform.cluster"), "platform\n");
    // The interactive page the runtime serves (Swagger UI over /openapi.json).
    let docs = bare("expose.customer-scoring.docs");
    let (status, page) = support::local::get_text(docs.trim_end());
    assert_eq!(status, 200, "{docs}: {page}");
    assert!(page.contains("swagger-ui"), "{docs}: {page}");
    // An unknown name: exit 1, nothing on stdout, the known names listed.
    let out = m.run("output", &["expose.customer-scoring.nope"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no output `expose.customer-scoring.nope`")
            && err.contains("expose.customer-scoring.url")
            && err.contains("module.platform.cluster"),
        "{err}"
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
    // A key nobody holds is 401 too; a known caller that is not allowed
    // (customer-features itself) is 403; the operator's is 200.
    let (status, refused) = post_with_key(&lookup_url, &ask, Some("not-the-key"));
    assert_eq!(status, 401, "{refused}");
    assert!(!refused.to_string().contains("not-the-key"), "{refused}");
    let keys = std::path::Path::new(&key_file).parent().unwrap();
    let own = std::fs::read_to_string(keys.join("customer-features")).unwrap();
    let (status, refused) = post_with_key(&lookup_url, &ask, Some(&own));
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
    let (status, row) = post_with_key(&lookup_url, &ask, Some(&operator_key));
    assert_eq!(status, 200, "{row}");
    let mut callers: Vec<String> = std::fs::read_dir(keys)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    callers.sort();
    assert_eq!(
        callers,
        ["customer-features", "customer-scoring", "operator"]
    );
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
    let out = m.apply();
    ok(&out, "apply");
    // The closing lines as the CLI prints them (stderr), with what was done.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Apply complete! Resources: 4 added, 0 changed, 0 destroyed."),
        "{err}"
    );
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

// --- stacks written by the test -------------------------------------------

/// A stack written by the test into a temp dir (with `rows.csv`), run with
/// extra environment variables for mesh.
struct Custom {
    dir: tempfile::TempDir,
    env: std::cell::RefCell<Vec<(String, String)>>,
}

impl Custom {
    fn new(toml: &str) -> Custom {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stack.toml"), toml).unwrap();
        std::fs::write(dir.path().join("rows.csv"), "id,value\nK1,1.5\nK2,2.5\n").unwrap();
        Custom {
            dir,
            env: Default::default(),
        }
    }

    fn root(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn set_env(&self, name: &str, value: &str) {
        let mut env = self.env.borrow_mut();
        env.retain(|(n, _)| n != name);
        env.push((name.to_owned(), value.to_owned()));
    }

    fn run(&self, verb: &str, extra: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh"));
        cmd.arg(verb)
            .arg(self.root())
            .args(["--env", "local"])
            .args(extra)
            .env("MESH_RUNTIME_BIN", runtime_bin())
            .env("NO_COLOR", "1");
        for (n, v) in self.env.borrow().iter() {
            cmd.env(n, v);
        }
        cmd.output().unwrap()
    }

    fn apply(&self) -> Output {
        self.run("apply", &["--auto-approve"])
    }

    fn plan_json(&self) -> (i32, Value) {
        let out = self.run("plan", &["--json", "--detailed-exitcode"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "plan --json is not JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), v)
    }

    fn state(&self, service: &str) -> Value {
        let path = self
            .root()
            .join(format!(".mesh/local/services/{service}/state.json"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }
}

impl Drop for Custom {
    fn drop(&mut self) {
        let _ = self.run("destroy", &["--auto-approve"]);
    }
}

/// `[service.NAME]`: one lookup endpoint `rows` over `rows.csv`.
fn lookup_service(name: &str) -> String {
    format!(
        "[service.{name}.dataset.rows]\nfile = \"rows.csv\"\nkey = \"id\"\n\
         [service.{name}.endpoint.rows]\nkind = \"lookup\"\ndatasets = [\"rows\"]\n\n"
    )
}

/// The `port` each service is planned to get (creates and updates).
fn planned_ports(plan: &Value) -> std::collections::BTreeMap<String, u16> {
    plan["resource_changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["type"] == "local_service")
        .filter_map(|c| {
            let port = c["fields"]
                .as_array()?
                .iter()
                .find(|f| f["path"] == "port")?["after"]
                .as_u64()?;
            Some((
                c["address"]
                    .as_str()?
                    .trim_start_matches("service.")
                    .to_owned(),
                port as u16,
            ))
        })
        .collect()
}

fn in_reserved_range(port: u16) -> bool {
    // Kubernetes NodePorts (30000-32767) and the kernel's ephemeral range.
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    (30000..=32767).contains(&port) || (lo..=hi).contains(&port)
}

#[test]
fn allocated_ports_are_distinct_free_and_stable() {
    // 30 services without a node_port: every one its own port, none in the
    // NodePort or the ephemeral range.
    let mut toml =
        String::from("[stack]\nname = \"ports\"\n[environment.local]\ntarget = \"local\"\n\n");
    for i in 0..30 {
        toml.push_str(&lookup_service(&format!("svc-{i:02}")));
    }
    let m = Custom::new(&toml);
    let (code, plan) = m.plan_json();
    assert_eq!(code, 2, "{plan}");
    let ports = planned_ports(&plan);
    assert_eq!(ports.len(), 30, "{plan}");
    let distinct: BTreeSet<u16> = ports.values().copied().collect();
    assert_eq!(distinct.len(), 30, "two services share a port: {ports:?}");
    for (svc, &p) in &ports {
        assert!(!in_reserved_range(p), "service.{svc} got port {p}");
    }

    // A port taken by another program is not handed out.
    let taken = ports["svc-07"];
    let squatter = TcpListener::bind(("127.0.0.1", taken)).unwrap();
    let (_, plan) = m.plan_json();
    let again = planned_ports(&plan);
    assert_ne!(again["svc-07"], taken, "allocated a port in use");
    assert!(!again.values().any(|&p| p == taken));
    drop(squatter);

    // Applied ports are recorded and stay put when services are added.
    let small = Custom::new(&format!(
        "[stack]\nname = \"ports\"\n[environment.local]\ntarget = \"local\"\n\n{}{}",
        lookup_service("b"),
        lookup_service("d")
    ));
    ok(&small.apply(), "apply b, d");
    let before: Vec<u64> = ["b", "d"]
        .iter()
        .map(|s| small.state(s)["port"].as_u64().unwrap())
        .collect();
    let mut bigger = std::fs::read_to_string(small.root().join("stack.toml")).unwrap();
    for s in ["a", "c", "e"] {
        bigger.push_str(&lookup_service(s));
    }
    std::fs::write(small.root().join("stack.toml"), bigger).unwrap();
    let (code, plan) = small.plan_json();
    assert_eq!(code, 2, "{plan}");
    let mut changed = changed_addresses(&plan);
    changed.sort();
    assert_eq!(
        changed,
        ["a", "c", "e"]
            .iter()
            .map(|s| (format!("service.{s}"), "create".to_owned()))
            .collect::<Vec<_>>()
    );
    ok(&small.apply(), "apply a..e");
    let after: Vec<u64> = ["b", "d"]
        .iter()
        .map(|s| small.state(s)["port"].as_u64().unwrap())
        .collect();
    assert_eq!(before, after);
    let all: BTreeSet<u64> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|s| small.state(s)["port"].as_u64().unwrap())
        .collect();
    assert_eq!(all.len(), 5);
    let (code, plan) = small.plan_json();
    assert_eq!(code, 0, "{plan}");
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[test]
fn a_changed_secret_updates_exactly_the_service_that_uses_it() {
    let toml = format!(
        "[stack]\nname = \"secrets\"\n[environment.local]\ntarget = \"local\"\n\n\
         [service.by-env]\napi_keys = [{{ env = \"MESH_TEST_API_KEY\" }}]\n\n{}\
         [service.by-file]\napi_keys = [{{ file = \"key.txt\" }}]\n\n{}{}",
        lookup_service("by-env"),
        lookup_service("by-file"),
        lookup_service("plain")
    );
    let m = Custom::new(&toml);
    let old_env = "first-env-secret-4711";
    let old_file = "first-file-secret-0815";
    m.set_env("MESH_TEST_API_KEY", old_env);
    std::fs::write(m.root().join("key.txt"), format!("{old_file}\n")).unwrap();
    ok(&m.apply(), "apply");
    let (code, plan) = m.plan_json();
    assert_eq!(code, 0, "{plan}");

    let new_env = "second-env-secret-4712";
    let new_file = "second-file-secret-0816";
    let secrets = [old_env, old_file, new_env, new_file];
    let no_secret_in = |what: &str, text: &str| {
        for s in secrets {
            assert!(!text.contains(s), "{what} contains a secret: {text}");
            assert!(
                !text.contains(&sha256_hex(s)) && !text.contains(&sha256_hex(&format!("{s}\n"))),
                "{what} contains the SHA-256 of a secret: {text}"
            );
        }
    };

    // The env secret changes: only service.by-env is updated.
    m.set_env("MESH_TEST_API_KEY", new_env);
    let (code, plan) = m.plan_json();
    assert_eq!(code, 2, "{plan}");
    assert_eq!(
        changed_addresses(&plan),
        vec![("service.by-env".to_owned(), "update".to_owned())]
    );
    no_secret_in("plan --json", &plan.to_string());
    let human = m.run("plan", &[]);
    no_secret_in("plan", &String::from_utf8_lossy(&human.stdout));
    no_secret_in("plan (stderr)", &String::from_utf8_lossy(&human.stderr));
    let saved = m.root().join("saved.plan");
    ok(
        &m.run("plan", &["--out", saved.to_str().unwrap()]),
        "plan --out",
    );
    no_secret_in("a saved plan", &std::fs::read_to_string(&saved).unwrap());

    // The file secret changes too: both are updated, nothing else.
    std::fs::write(m.root().join("key.txt"), format!("{new_file}\n")).unwrap();
    let (_, plan) = m.plan_json();
    let mut changed = changed_addresses(&plan);
    changed.sort();
    assert_eq!(
        changed,
        vec![
            ("service.by-env".to_owned(), "update".to_owned()),
            ("service.by-file".to_owned(), "update".to_owned())
        ]
    );
    ok(&m.apply(), "apply the new secrets");
    let (code, plan) = m.plan_json();
    assert_eq!(code, 0, "{plan}");

    // The runtimes took the new keys.
    for (svc, old, new) in [
        ("by-env", old_env, new_env),
        ("by-file", old_file, new_file),
    ] {
        let port = m.state(svc)["port"].as_u64().unwrap();
        let url = format!("http://127.0.0.1:{port}/public/api/v1/{svc}/rows/lookup");
        let ask = serde_json::json!({"data": {"id": "K1"}});
        assert_eq!(post_with_key(&url, &ask, Some(new)).0, 200, "{svc}");
        assert_eq!(post_with_key(&url, &ask, Some(old)).0, 401, "{svc}");
    }
    for entry in files_under(&m.root().join(".mesh")) {
        if let Ok(text) = std::fs::read_to_string(&entry) {
            if text.contains(new_env) {
                // Only the secret file handed to the runtime holds it, 0600.
                let mode = std::os::unix::fs::PermissionsExt::mode(
                    &std::fs::metadata(&entry).unwrap().permissions(),
                );
                assert_eq!(mode & 0o777, 0o600, "{}", entry.display());
                assert!(!entry.ends_with("state.json"), "{}", entry.display());
            }
            for s in secrets {
                assert!(
                    !text.contains(&sha256_hex(s)),
                    "{} holds the SHA-256 of a secret",
                    entry.display()
                );
            }
        }
    }
}

#[test]
fn runtimes_get_a_clean_environment_and_secrets_by_file() {
    let toml = format!(
        "[stack]\nname = \"cleanenv\"\n[environment.local]\ntarget = \"local\"\n\n\
         [service.keyed]\napi_keys = [{{ env = \"MESH_TEST_API_KEY\" }}]\n\n{}",
        lookup_service("keyed")
    );
    let m = Custom::new(&toml);
    let aws = [
        ("AWS_ACCESS_KEY_ID", "AKIAMESHTESTNOTREAL01"),
        ("AWS_SECRET_ACCESS_KEY", "mesh-test-aws-secret-do-not-leak"),
        ("AWS_SESSION_TOKEN", "mesh-test-aws-session-token"),
    ];
    for (n, v) in aws {
        m.set_env(n, v);
    }
    let api_key = "mesh-test-api-key-by-file";
    m.set_env("MESH_TEST_API_KEY", api_key);
    ok(&m.apply(), "apply");

    let pid = m.state("keyed")["pid"].as_u64().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ).replace('\0', "\n");
    for (n, v) in aws {
        assert!(
            !environ.contains(n),
            "{n} in the runtime's environment:\n{environ}"
        );
        assert!(
            !environ.contains(v),
            "an AWS secret in the runtime's environment"
        );
    }
    assert!(
        !environ.contains(api_key) && !environ.contains("MESH_TEST_API_KEY"),
        "the API key travels in the environment:\n{environ}"
    );
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .replace('\0', " ");
    assert!(!cmdline.contains(api_key), "{cmdline}");

    // The runtime still has its key: by file.
    let port = m.state("keyed")["port"].as_u64().unwrap();
    let url = format!("http://127.0.0.1:{port}/public/api/v1/keyed/rows/lookup");
    let ask = serde_json::json!({"data": {"id": "K2"}});
    let (status, row) = post_with_key(&url, &ask, Some(api_key));
    assert_eq!(status, 200, "{row}");
    assert_eq!(post(&url, &ask).0, 401);
}

#[test]
fn an_update_refuses_no_connection() {
    let m = Mesh::new();
    ok(&m.apply(), "first apply");
    let key_file = m.stack.join(".mesh/local/access/keys/operator");
    let key = std::fs::read_to_string(&key_file).unwrap();
    let url = format!(
        "http://127.0.0.1:{}/public/api/v1/customer-features/behavior/lookup",
        m.features_port
    );
    let ask = serde_json::json!({"data": {"customer_id": "C00042"}});
    let (status, row) = post_with_key(&url, &ask, Some(&key));
    assert_eq!(status, 200, "{row}");
    assert_ne!(row["data"]["total_spend_30d"].as_f64(), Some(NEW_SPEND));
    let old_pid = m.pid_of("customer-features");

    let request = {
        let (url, key, ask) = (url.clone(), key.clone(), ask.clone());
        move || try_request("POST", &url, Some(&ask), Some(&key))
    };
    let (out, _) = requests_across_an_update(request, || {
        set_spend(&m.stack, NEW_SPEND);
        m.apply()
    });
    ok(&out, "apply after dataset edit");
    // A few more requests against the new runtime alone.
    let (status, row) = post_with_key(&url, &ask, Some(&key));
    assert_eq!(status, 200, "{row}");
    assert!(!alive(old_pid), "the old runtime still runs");
    assert_ne!(m.pid_of("customer-features"), old_pid);
}

/// The `total_spend_30d` of C00042 that [`set_spend`] writes for an update.
const NEW_SPEND: f64 = 99999.0;

/// Edits the example's `behavior.csv`: C00042's `total_spend_30d` becomes `value`.
fn set_spend(stack: &std::path::Path, value: f64) {
    let csv = stack.join("../../examples/customer-mesh/behavior.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("C00042,"))
        .unwrap()
        .to_owned();
    let mut cols: Vec<String> = line.split(',').map(str::to_owned).collect();
    cols[1] = format!("{value:.1}");
    std::fs::write(&csv, text.replace(&line, &cols.join(","))).unwrap();
}

/// Sends `request` (a lookup of C00042's behaviour) in a loop, each on a
/// new connection, while `update` runs (an apply that puts [`NEW_SPEND`]
/// in); asserts that none failed and that both the old and the new runtime
/// answered. Returns what `update` did and the number of requests.
fn requests_across_an_update<T>(
    request: impl Fn() -> Result<(u16, Value), String> + Send + 'static,
    update: impl FnOnce() -> T,
) -> (T, u32)
where
    T: std::fmt::Debug,
{
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok_old, mut ok_new, mut failures) = (0u32, 0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match request() {
                    Ok((200, row)) => {
                        if row["data"]["total_spend_30d"].as_f64() == Some(NEW_SPEND) {
                            ok_new += 1;
                        } else {
                            ok_old += 1;
                        }
                    }
                    Ok((status, body)) => failures.push(format!("{status}: {body}")),
                    Err(e) => failures.push(e),
                }
            }
            (ok_old, ok_new, failures)
        })
    };
    let done = update();
    // Until the new runtime has answered (the apply returned once it was ready).
    std::thread::sleep(std::time::Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok_old, ok_new, failures) = client.join().unwrap();
    let total = failures.len() as u32 + ok_old + ok_new;
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed during the update, e.g. {:?}\nthe update: {done:?}",
        failures.len(),
        &failures[..failures.len().min(5)],
    );
    assert!(ok_old > 0, "no request reached the old runtime");
    assert!(ok_new > 0, "no request reached the new runtime");
    (done, total)
}

/// `tls = { self_signed = true }` on both services: each serves HTTPS
/// only, with a certificate mesh made (checked by a client trusting that
/// certificate alone); the scoring service enriches from the feature
/// service over TLS; an update hands the port over without a failed
/// request, the new runtime serving the same certificate.
#[test]
fn self_signed_tls_serves_https_only_with_the_certificate_mesh_made() {
    let m = Mesh::new();
    let tls = "tls = { self_signed = true }\n";
    let module = m.stack.join("../../modules/lookup-service/module.toml");
    let text = std::fs::read_to_string(&module).unwrap();
    std::fs::write(&module, format!("{text}{tls}")).unwrap();
    let stack_toml = m.stack.join("stack.toml");
    let text = std::fs::read_to_string(&stack_toml).unwrap();
    let edited = text.replace(
        "allow = [\"0.0.0.0/0\"]\n",
        &format!("allow = [\"0.0.0.0/0\"]\n{tls}"),
    );
    assert_ne!(text, edited);
    std::fs::write(&stack_toml, edited).unwrap();
    ok(&m.apply(), "apply");

    // `mesh output`: the https URLs and the certificates to trust.
    let out = m.run("output", &["--json"]);
    ok(&out, "output");
    let urls: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cert = |expose: &str| -> PathBuf {
        let e = &urls["exposes"][expose];
        let port = if expose == "customer-features" {
            m.features_port
        } else {
            m.scoring_port
        };
        assert_eq!(e["url"], format!("https://127.0.0.1:{port}"), "{urls:#}");
        PathBuf::from(
            e["certificate"]
                .as_str()
                .unwrap_or_else(|| panic!("{urls:#}")),
        )
    };
    let (features_cert, scoring_cert) = (cert("customer-features"), cert("customer-scoring"));
    let text = String::from_utf8_lossy(&m.run("output", &[]).stdout).into_owned();
    assert!(
        text.contains(&format!("curl --cacert {}", scoring_cert.display())),
        "{text}"
    );
    // The key never leaves its private folder; plans name no key material.
    let key = features_cert.with_file_name("key.pem");
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&key), 0o600);
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let (code, plan) = m.plan_json();
    assert_eq!(code, 0, "{plan:#}");
    let body = key_pem.lines().find(|l| !l.starts_with("-----")).unwrap();
    assert!(!plan.to_string().contains(body));

    // By id alone, enriched from the feature service over TLS.
    let predict = format!(
        "https://127.0.0.1:{}/public/api/v1/customer-scoring/high-value/predict",
        m.scoring_port
    );
    let by_id = serde_json::json!({"features": {"customer_id": "C00042"}});
    let (status, answer) =
        try_request_tls("POST", &predict, Some(&by_id), None, &scoring_cert).unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["result"]["prediction"], "1", "{answer}");

    // Plain HTTP on the same port gets no HTTP answer.
    let plain = predict.replacen("https://", "http://", 1);
    let refused = try_request("POST", &plain, Some(&by_id), None);
    assert!(
        refused.as_ref().is_err_and(|e| !e.starts_with("connect")),
        "plain HTTP answered (or nothing listened): {refused:?}"
    );
    // A client trusting another certificate refuses this one.
    let wrong = try_request_tls("POST", &predict, Some(&by_id), None, &features_cert);
    assert!(
        wrong.as_ref().is_err_and(|e| e.contains("tls handshake")),
        "{wrong:?}"
    );

    // `mesh test --live` sends the stack's test queries over HTTPS too,
    // trusting the certificates `mesh output` shows.
    let out = m.run("test", &["--live"]);
    ok(&out, "mesh test --live");

    // The operator's lookup over TLS, and across an update (a handover).
    let lookup = format!(
        "https://127.0.0.1:{}/public/api/v1/customer-features/behavior/lookup",
        m.features_port
    );
    let operator =
        std::fs::read_to_string(m.stack.join(".mesh/local/access/keys/operator")).unwrap();
    let ask = serde_json::json!({"data": {"customer_id": "C00042"}});
    let (status, row) =
        try_request_tls("POST", &lookup, Some(&ask), Some(&operator), &features_cert).unwrap();
    assert_eq!(status, 200, "{row}");
    let cert_before = std::fs::read(&features_cert).unwrap();
    let old_pid = m.pid_of("customer-features");
    let request = {
        let (lookup, ask, cert) = (lookup.clone(), ask.clone(), features_cert.clone());
        move || try_request_tls("POST", &lookup, Some(&ask), Some(&operator), &cert)
    };
    let (out, total) = requests_across_an_update(request, || {
        set_spend(&m.stack, NEW_SPEND);
        m.apply()
    });
    ok(&out, "apply after dataset edit");
    assert!(total > 0);
    assert_ne!(m.pid_of("customer-features"), old_pid);
    assert_eq!(std::fs::read(&features_cert).unwrap(), cert_before);
    // The scoring service, updated too (its upstream's data changed nothing
    // in its bundle), still enriches over TLS from the new runtime.
    let (status, answer) =
        try_request_tls("POST", &predict, Some(&by_id), None, &scoring_cert).unwrap();
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn a_failed_update_leaves_the_old_runtime_serving() {
    let m = Custom::new(&format!(
        "[stack]\nname = \"failing\"\n[environment.local]\ntarget = \"local\"\n\n{}",
        lookup_service("svc")
    ));
    ok(&m.apply(), "apply");
    let pid = m.state("svc")["pid"].as_u64().unwrap() as u32;
    let port = m.state("svc")["port"].as_u64().unwrap();
    let url = format!("http://127.0.0.1:{port}/public/api/v1/svc/rows/lookup");
    let ask = serde_json::json!({"data": {"id": "K1"}});

    // A key twice: the new runtime refuses the dataset and exits.
    let csv = m.root().join("rows.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text.push_str("K1,9.5\n");
    std::fs::write(&csv, text).unwrap();
    let out = m.apply();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mesh-runtime exited during start"), "{err}");

    assert!(alive(pid), "the old runtime was stopped");
    assert_eq!(m.state("svc")["pid"].as_u64(), Some(u64::from(pid)));
    let (status, row) = post(&url, &ask);
    assert_eq!(status, 200, "{row}");
    assert_eq!(row["data"]["value"].as_f64(), Some(1.5), "{row}");
    let (code, plan) = m.plan_json();
    assert_eq!(code, 2, "{plan}");
    assert_eq!(
        changed_addresses(&plan),
        vec![("service.svc".to_owned(), "update".to_owned())]
    );
}

/// A stack with a Snowflake connection (fakesnow), its password by
/// `{ env = ... }`, a preload refreshed every second and a live dataset:
/// apply serves both, an UPDATE in Snowflake shows within a refresh, with
/// Snowflake gone the preload answers and turns stale, live misses answer
/// 503 and cache hits 200, all recover when it is back, and destroy leaves
/// nothing. The password is in no plan, in no runtime's argv
/// or environment, and in no file of the state folder but the one handed to
/// the runtime (0600).
#[test]
fn snowflake_datasets_served_refreshed_and_destroyed() {
    use support::fakesnow::{snowflake_exec, snowflake_url};
    use support::tcp_proxy::{PASS, Proxy, REFUSE};
    // Snowflake through a proxy the test cuts and restores.
    let upstream = snowflake_url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("MESH_TEST_SNOWFLAKE_URL is http://IP:PORT");
    let proxy = Proxy::start(upstream);
    let proxy_url = format!("http://{}", proxy.addr);
    let table = format!("e2e_spend_{}", std::process::id());
    snowflake_exec(&[
        &format!("CREATE OR REPLACE TABLE {table} (customer_id INT, spend FLOAT, segment VARCHAR)"),
        &format!(
            "INSERT INTO {table} VALUES (1, 10.5, 'gold'), (2, 20.25, 'silver'), (3, 0.0, NULL)"
        ),
    ]);
    let toml = format!(
        "[stack]\nname = \"sfe2e\"\n[environment.local]\ntarget = \"local\"\n\n\
         [connection.warehouse]\nkind = \"snowflake\"\naccount = \"meshtest\"\nurl = \"{url}\"\n\
         database = \"MESH_TEST\"\nschema = \"PUBLIC\"\nuser = \"mesh_reader\"\n\
         password = {{ env = \"MESH_TEST_SF_PASSWORD\" }}\n\n\
         [service.sf.dataset.spend]\nconnection = \"warehouse\"\nquery = \"select customer_id, spend from {table}\"\n\
         key = \"customer_id\"\nrefresh = \"1s\"\nmax_staleness = \"3s\"\n\
         [service.sf.dataset.segment]\nconnection = \"warehouse\"\nquery = \"select customer_id, segment from {table}\"\n\
         key = \"customer_id\"\nmode = \"live\"\n\
         [service.sf.dataset.cached]\nconnection = \"warehouse\"\nquery = \"select customer_id, segment from {table}\"\n\
         key = \"customer_id\"\nmode = \"live\"\ncache = {{ ttl = \"1m\", max_entries = 100 }}\n\
         [service.sf.endpoint.spend]\nkind = \"lookup\"\ndatasets = [\"spend\"]\n\
         [service.sf.endpoint.segment]\nkind = \"lookup\"\ndatasets = [\"segment\"]\n\
         [service.sf.endpoint.cached]\nkind = \"lookup\"\ndatasets = [\"cached\"]\n",
        url = proxy_url,
    );
    let m = Custom::new(&toml);
    let password = "sf-e2e-password-5e2a77";
    m.set_env("MESH_TEST_SF_PASSWORD", password);

    let human = m.run("plan", &[]);
    ok(&human, "plan");
    let (code, plan) = m.plan_json();
    assert_eq!(code, 2, "{plan}");
    for text in [
        String::from_utf8_lossy(&human.stdout),
        String::from_utf8_lossy(&human.stderr),
        plan.to_string().into(),
    ] {
        assert!(
            !text.contains(password),
            "the password is in a plan: {text}"
        );
    }
    ok(&m.apply(), "apply");

    let port = m.state("sf")["port"].as_u64().unwrap();
    let url =
        |endpoint: &str| format!("http://127.0.0.1:{port}/public/api/v1/sf/{endpoint}/lookup");
    let ask = |id: i64| serde_json::json!({"data": {"customer_id": id}});
    let (status, row) = post(&url("spend"), &ask(2));
    assert_eq!(
        (status, &row["data"]["spend"]),
        (200, &serde_json::json!(20.25)),
        "{row}"
    );
    let (status, row) = post(&url("segment"), &ask(1));
    assert_eq!(
        (status, &row["data"]["segment"]),
        (200, &serde_json::json!("gold")),
        "{row}"
    );
    assert_eq!(post(&url("segment"), &ask(99)).0, 404);

    // An UPDATE in Snowflake: the live dataset sees it at once, the preload
    // within a refresh (1 s) and some slack.
    snowflake_exec(&[&format!(
        "UPDATE {table} SET spend = spend + 100, segment = 'platinum' WHERE customer_id = 2"
    )]);
    let (status, row) = post(&url("segment"), &ask(2));
    assert_eq!(
        (status, &row["data"]["segment"]),
        (200, &serde_json::json!("platinum")),
        "{row}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, row) = post(&url("spend"), &ask(2));
        if status == 200 && row["data"]["spend"] == 120.25 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the preload did not pick up the update within 10 s: {status} {row}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // Snowflake goes away: the preload keeps answering from its last
    // snapshot and turns stale after max_staleness (3 s); a live lookup and
    // a cache miss answer 503, a cache hit 200; all recover by themselves.
    assert_eq!(post(&url("cached"), &ask(2)).0, 200, "primes the cache");
    proxy.set(REFUSE);
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    support::local::wait_for(
        "stale in /readyz",
        std::time::Duration::from_secs(20),
        || match try_request("GET", &readyz, None, None)? {
            (200, r) if r["datasets"]["spend"]["stale"] == true => Ok(()),
            (s, r) => Err(format!("{s} {r}")),
        },
    );
    let (status, row) = post(&url("spend"), &ask(2));
    assert_eq!(
        (status, &row["data"]["spend"]),
        (200, &serde_json::json!(120.25)),
        "{row}"
    );
    let (status, row) = post(&url("cached"), &ask(2));
    assert_eq!(
        (status, &row["data"]["segment"]),
        (200, &serde_json::json!("platinum")),
        "{row}"
    );
    for (endpoint, id) in [("segment", 1), ("cached", 3)] {
        let (status, body) = post(&url(endpoint), &ask(id));
        assert_eq!(status, 503, "{endpoint} {id}: {body}");
        assert_eq!(body["error"]["code"], "dataset_unavailable", "{body}");
        assert!(!body.to_string().contains(password), "{body}");
    }
    proxy.set(PASS);
    support::local::wait_for("recovery", std::time::Duration::from_secs(20), || {
        let fresh = match try_request("GET", &readyz, None, None)? {
            (200, r) => r["datasets"]["spend"]["stale"] == false,
            _ => false,
        };
        match try_request("POST", &url("segment"), Some(&ask(1)), None)? {
            (200, row) if fresh && row["data"]["segment"] == "gold" => Ok(()),
            (s, row) => Err(format!("fresh {fresh}, segment {s} {row}")),
        }
    });

    // The password: not in the runtime's argv or environment, and in the
    // state folder only in the file handed to the runtime.
    let pid = m.state("sf")["pid"].as_u64().unwrap();
    for what in ["cmdline", "environ"] {
        let bytes = std::fs::read(format!("/proc/{pid}/{what}")).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(password),
            "the password is in the runtime's {what}"
        );
    }
    let files = files_under(&m.root().join(".mesh"));
    assert!(
        files.iter().any(|f| f.ends_with("service.json")),
        "no bundle under .mesh: {files:?}"
    );
    let mut holders = Vec::new();
    for entry in &files {
        if std::fs::read_to_string(entry).is_ok_and(|text| text.contains(password)) {
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(entry).unwrap().permissions(),
            );
            assert_eq!(mode & 0o777, 0o600, "{}", entry.display());
            holders.push(entry.clone());
        }
    }
    assert_eq!(holders.len(), 1, "files holding the password: {holders:?}");
    assert!(
        holders[0].parent().is_some_and(|d| d.ends_with("secrets")),
        "{holders:?}"
    );

    let out = m.run("destroy", &["--auto-approve"]);
    ok(&out, "destroy");
    assert!(!alive(pid as u32), "the runtime outlived destroy");
    assert!(
        !m.root().join(".mesh").exists(),
        "destroy must remove the .mesh state folder"
    );
    snowflake_exec(&[&format!("DROP TABLE {table}")]);
}

/// `mesh apply .` from the stack's folder (a relative stack path, as the
/// README runs it) with an `{ env = ... }` secret: the runtime finds the
/// secret file mesh staged for it.
#[test]
fn a_relative_stack_path_with_an_env_secret_applies() {
    let toml = format!(
        "[stack]\nname = \"relative\"\n[environment.local]\ntarget = \"local\"\n\n\
         [service.svc]\napi_keys = [{{ env = \"MESH_TEST_RELATIVE_KEY\" }}]\n\n{}",
        lookup_service("svc")
    );
    let m = Custom::new(&toml);
    let key = "relative-path-key-3e1f";
    let out = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(["apply", ".", "--env", "local", "--auto-approve"])
        .current_dir(m.root())
        .env("MESH_RUNTIME_BIN", runtime_bin())
        .env("MESH_TEST_RELATIVE_KEY", key)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    ok(&out, "apply .");
    let port = m.state("svc")["port"].as_u64().unwrap();
    let url = format!("http://127.0.0.1:{port}/public/api/v1/svc/rows/lookup");
    let ask = serde_json::json!({"data": {"id": "K1"}});
    assert_eq!(post_with_key(&url, &ask, Some(key)).0, 200);
}

/// `mesh apply --rotate-keys` on the local target: 2,000+ calls through
/// customer-scoring (which presents its key to customer-features) across
/// the rotation, none failed; every key is new, the old operator key is
/// refused (401) and the new one accepted; no runtime restarted.
#[test]
fn keys_rotate_without_a_failed_call() {
    let m = Mesh::new();
    ok(&m.apply(), "apply");
    let keys = m.stack.join(".mesh/local/access/keys");
    let read = |caller: &str| std::fs::read_to_string(keys.join(caller)).unwrap();
    let (old_operator, old_scoring) = (read("operator"), read("customer-scoring"));
    let pids = (m.pid_of("customer-features"), m.pid_of("customer-scoring"));
    let predict = format!(
        "http://127.0.0.1:{}/public/api/v1/customer-scoring/high-value/predict",
        m.scoring_port
    );
    let lookup = format!(
        "http://127.0.0.1:{}/public/api/v1/customer-features/behavior/lookup",
        m.features_port
    );
    let by_id = serde_json::json!({"features": {"customer_id": "C00042"}});
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, predict, by_id) = (stop.clone(), predict.clone(), by_id.clone());
        std::thread::spawn(move || {
            let (mut n, mut failures) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || n < 2000 {
                n += 1;
                match try_request("POST", &predict, Some(&by_id), None) {
                    Ok((200, _)) => {}
                    Ok((status, body)) => failures.push(format!("{status}: {body}")),
                    Err(e) => failures.push(e),
                }
            }
            (n, failures)
        })
    };
    let out = m.run("apply", &["--auto-approve", "--rotate-keys"]);
    ok(&out, "apply --rotate-keys");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (n, failures) = load.join().unwrap();
    assert!(n >= 2000, "{n} calls");
    assert!(
        failures.is_empty(),
        "{} of {n} calls failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_ne!(read("operator"), old_operator);
    assert_ne!(read("customer-scoring"), old_scoring);
    let ask = serde_json::json!({"data": {"customer_id": "C00042"}});
    assert_eq!(post_with_key(&lookup, &ask, Some(&old_operator)).0, 401);
    let (status, row) = post_with_key(&lookup, &ask, Some(&read("operator")));
    assert_eq!(status, 200, "{row}");
    assert_eq!(
        (m.pid_of("customer-features"), m.pid_of("customer-scoring")),
        pids,
        "no restart"
    );
    let (code, plan) = m.plan_json();
    assert_eq!(code, 0, "{plan}");
}

/// A release on the local target, through the real binaries: adding a
/// generation, shifting weight and retiring the old one are each one plan
/// line (an update of the scoring service) and one apply. Answers name
/// their generation; a key keeps its generation; the weight shift changes
/// the `split` alone and restarts nothing (same pid); after it, keys move
/// from v1 to v2 only.
#[test]
fn generations_added_shifted_and_retired_each_in_one_apply() {
    let m = Mesh::new();
    ok(&m.apply(), "first apply");
    let original = std::fs::read_to_string(m.stack.join("stack.toml")).unwrap();
    let set = |v1: Option<u32>, v2: u32| {
        std::fs::write(
            m.stack.join("stack.toml"),
            support::generations_toml(&original, v1, v2),
        )
        .unwrap();
    };
    let key = std::fs::read_to_string(m.stack.join(".mesh/local/access/keys/operator")).unwrap();
    let url = format!(
        "http://127.0.0.1:{}/public/api/v1/customer-scoring/high-value/predict",
        m.scoring_port
    );
    let customers: Vec<String> = (1..=300).map(|i| format!("C{i:05}")).collect();
    let generations = || -> Vec<String> {
        customers
            .iter()
            .map(|c| {
                let ask = serde_json::json!({"features": {"customer_id": c}});
                let (status, answer) = post_with_key(&url, &ask, Some(&key));
                assert_eq!(status, 200, "{c}: {answer}");
                answer["result"]["generation"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{c}: no generation in {answer}"))
                    .to_owned()
            })
            .collect()
    };
    let one_update = |step: &str| -> Value {
        let (code, plan) = m.plan_json();
        assert_eq!(code, 2, "{step}: {plan}");
        assert_eq!(
            changed_addresses(&plan),
            [("service.customer-scoring".to_owned(), "update".to_owned())],
            "{step}: {plan}"
        );
        plan["resource_changes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["address"] == "service.customer-scoring")
            .unwrap()["fields"]
            .clone()
    };
    let count = |gens: &[String], name: &str| gens.iter().filter(|g| *g == name).count();

    // Add v2 beside v1 at 10%.
    set(Some(90), 10);
    one_update("add a generation");
    ok(&m.apply(), "apply: add a generation");
    let first = generations();
    assert_eq!(first, generations(), "a key keeps its generation");
    let v2_before = count(&first, "v2");
    assert!(
        (10..=60).contains(&v2_before),
        "v2 serves about 10% of 300 keys, got {v2_before}"
    );
    assert_eq!(count(&first, "v1") + v2_before, customers.len());

    // Shift to 20%: the split alone, in place.
    let pid = m.pid_of("customer-scoring");
    set(Some(80), 20);
    let fields = one_update("shift weight");
    let paths: Vec<&str> = fields
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["path"].as_str())
        .collect();
    assert_eq!(paths, ["split"], "{fields}");
    ok(&m.apply(), "apply: shift weight");
    assert_eq!(
        m.pid_of("customer-scoring"),
        pid,
        "a weight shift restarted the runtime"
    );
    assert!(alive(pid));
    let (code, plan) = m.plan_json();
    assert_eq!(code, 0, "converged after the shift: {plan}");
    let second = generations();
    for (c, (before, after)) in customers.iter().zip(first.iter().zip(&second)) {
        assert!(
            !(before == "v2" && after == "v1"),
            "{c} moved back from v2 to v1"
        );
    }
    let v2_after = count(&second, "v2");
    assert!(
        v2_after > v2_before,
        "no key moved to v2 ({v2_before} -> {v2_after})"
    );

    // Retire v1.
    set(None, 100);
    one_update("retire v1");
    ok(&m.apply(), "apply: retire v1");
    assert!(generations().iter().all(|g| g == "v2"));
    let (code, plan) = m.plan_json();
    assert_eq!(code, 0, "converged: {plan}");
}
