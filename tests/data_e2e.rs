//! Data products end to end, through the real `mesh` binary on the local
//! target, against the real PostgreSQL that `scripts/test` starts: the
//! customer mesh's `local-warehouse` environment (`behavior` preloaded from
//! the warehouse and refreshed), and `live` datasets with and without a
//! cache. The database "goes away" through a TCP proxy the test cuts and
//! restores (tests/support/tcp_proxy.rs), never by stopping the shared server.
//!
//! Each test seeds its own schema with `scripts/seed-warehouse` and reads it
//! as a PostgreSQL role of its own, whose password no other part of the
//! test uses, so "the password appears nowhere" can be checked.
//!
//! Needs `MESH_TEST_POSTGRES_URL` (set by `scripts/test`) and `psql`.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use support::local::{
    changed_addresses, files_under, free_port, get_text, ok, post, runtime_bin, try_request,
    wait_for,
};
use support::tcp_proxy::{PASS, Proxy, REFUSE};

// ------------------------------------------------------------------ the warehouse

fn pg_url() -> String {
    std::env::var("MESH_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "MESH_TEST_POSTGRES_URL is not set: run the tests with `scripts/test` (it starts PostgreSQL), \
             or `bash scripts/services start; eval \"$(bash scripts/services env)\"`"
        )
    })
}

/// The server's address, from `postgresql://user:pw@host:port/db`.
fn pg_addr() -> SocketAddr {
    let url = pg_url();
    let hostport = url
        .split_once('@')
        .and_then(|(_, rest)| rest.split('/').next())
        .expect("user@host:port/db in MESH_TEST_POSTGRES_URL");
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    hostport.parse().expect("an IP address and port")
}

fn pg_database() -> String {
    let url = pg_url();
    let db = url.rsplit('/').next().unwrap_or("mesh");
    db.split('?').next().unwrap_or(db).to_owned()
}

/// Runs SQL with psql as the server's owner; the output, unaligned.
fn psql(sql: &str) -> String {
    let out = Command::new("psql")
        .arg(pg_url())
        .args(["-v", "ON_ERROR_STOP=1", "-qtAc", sql])
        .output()
        .expect("psql (Debian package postgresql-client)");
    ok(&out, &format!("psql {sql}"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A schema of the test's own, filled by `scripts/seed-warehouse`, readable
/// by a role of its own (`<schema>_reader`, password returned). Dropped with
/// the value.
struct Warehouse {
    schema: String,
    role: String,
    password: String,
}

impl Warehouse {
    fn seed(tag: &str) -> Warehouse {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_000;
        let schema = format!("e2e_{tag}_{}_{n}", std::process::id());
        let out = Command::new(repo().join("scripts/seed-warehouse"))
            .arg(&schema)
            .env("MESH_TEST_POSTGRES_URL", pg_url())
            .output()
            .unwrap();
        ok(&out, "scripts/seed-warehouse");
        let role = format!("{schema}_reader");
        let password = format!("pw-{n}-only-here");
        psql(&format!(
            "create role {role} login password '{password}'; \
             grant usage on schema {schema} to {role}; \
             grant select on all tables in schema {schema} to {role}"
        ));
        Warehouse {
            schema,
            role,
            password,
        }
    }

    fn table(&self) -> String {
        format!("{}.behavior_30d", self.schema)
    }
}

impl Drop for Warehouse {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .arg(pg_url())
            .args([
                "-qc",
                &format!(
                    "drop schema if exists {} cascade; drop role if exists {}",
                    self.schema, self.role
                ),
            ])
            .output();
    }
}

// ------------------------------------------------------------------ a stack copy

/// A stack folder the test edits, run with extra environment variables.
struct Stack {
    _dir: tempfile::TempDir,
    root: PathBuf,
    env_name: &'static str,
    vars: Vec<(String, String)>,
}

impl Stack {
    fn mesh(&self, verb: &str, extra: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh"));
        cmd.arg(verb)
            .arg(&self.root)
            .args(["--env", self.env_name])
            .args(extra)
            .env("MESH_RUNTIME_BIN", runtime_bin())
            .env("NO_COLOR", "1");
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    fn set_var(&mut self, name: &str, value: &str) {
        self.vars.retain(|(n, _)| n != name);
        self.vars.push((name.to_owned(), value.to_owned()));
    }

    fn edit(&self, file: &str, from: &str, to: &str) {
        let path = self.root.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} has no `{from}`");
        std::fs::write(&path, text.replace(from, to)).unwrap();
    }

    fn apply(&self) {
        ok(&self.mesh("apply", &["--auto-approve"]), "apply");
    }

    /// `plan --json --detailed-exitcode`: the exit code and what changes.
    fn plan(&self) -> (i32, Vec<(String, String)>) {
        let out = self.mesh("plan", &["--json", "--detailed-exitcode"]);
        let plan: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "plan --json is not JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), changed_addresses(&plan))
    }

    fn state_dir(&self) -> PathBuf {
        self.root.join(".mesh").join(self.env_name)
    }

    fn service_state(&self, service: &str) -> Value {
        let path = self
            .state_dir()
            .join(format!("services/{service}/state.json"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    fn base_url(&self, service: &str) -> String {
        let port = self.service_state(service)["port"].as_u64().unwrap();
        format!("http://127.0.0.1:{port}")
    }
}

impl Stack {
    /// A stack `name` in a new folder, on the local target, with connection
    /// `warehouse` to `wh` through `port` (its password set) and `body`.
    fn on_warehouse(name: &str, wh: &Warehouse, port: u16, body: &str) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let toml = format!(
            r#"[stack]
name = "{name}"

[environment.local]
target = "local"

[connection.warehouse]
kind = "postgres"
host = "127.0.0.1"
port = {port}
database = "{db}"
user = "{user}"
password = {{ env = "WAREHOUSE_PASSWORD" }}
statement_timeout = "2s"

{body}"#,
            db = pg_database(),
            user = wh.role,
        );
        std::fs::write(root.join("stack.toml"), toml).unwrap();
        let mut m = Stack {
            _dir: dir,
            root,
            env_name: "local",
            vars: Vec::new(),
        };
        m.set_var("WAREHOUSE_PASSWORD", &wh.password);
        m
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Never leave processes behind, even when a test fails.
        let _ = self.mesh("destroy", &["--auto-approve"]);
    }
}

fn readyz(base: &str) -> Value {
    try_request("GET", &format!("{base}/readyz"), None, None)
        .map(|(_, v)| v)
        .unwrap_or(Value::Null)
}

/// The value of a `/metrics` sample whose line starts with `prefix`.
fn metric(base: &str, prefix: &str) -> Option<f64> {
    let (_, text) = get_text(&format!("{base}/metrics"));
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn probas_bits(answer: &Value) -> Vec<(String, u64)> {
    answer["result"]["probas"]
        .as_object()
        .unwrap_or_else(|| panic!("no probas in {answer}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap().to_bits()))
        .collect()
}

// ------------------------------------------------------------------ preload

/// The customer mesh copied to a new folder, environment `local-warehouse`,
/// its NodePorts moved to free ports; the scoring service's port.
fn customer_mesh_on_warehouse() -> (Stack, u16) {
    let dir = tempfile::tempdir().unwrap();
    let root = support::copy_customer_mesh(dir.path());
    let m = Stack {
        _dir: dir,
        root,
        env_name: "local-warehouse",
        vars: Vec::new(),
    };
    let features_port = free_port(&[]);
    let scoring_port = free_port(&[features_port]);
    m.edit(
        "stack.toml",
        "node_port = 30080",
        &format!("node_port = {features_port}"),
    );
    m.edit(
        "stack.toml",
        "node_port = 30081",
        &format!("node_port = {scoring_port}"),
    );
    (m, scoring_port)
}

/// The flow both warehouses must pass, on the customer mesh applied with
/// `behavior` preloaded every second (max_staleness 3 s) through `proxy`:
/// an UPDATE (run by `update` with a `SET` clause for C00042) reaches the
/// lookup and the prediction by id, which equals the one with every feature
/// sent; with the warehouse cut off, the last snapshot answers and turns
/// stale in `/readyz` and `/metrics`; back, the next refresh recovers.
fn preload_flow(m: &Stack, scoring_port: u16, proxy: &Proxy, update: &dyn Fn(&str)) {
    let features = m.base_url("customer-features");
    let lookup = format!("{features}/public/api/v1/customer-features/behavior/lookup");
    let predict = format!(
        "http://127.0.0.1:{scoring_port}/public/api/v1/customer-scoring/high-value/predict"
    );
    let key_file = m.state_dir().join("access/keys/operator");
    let key = std::fs::read_to_string(&key_file)
        .unwrap_or_else(|e| panic!("operator key {}: {e}", key_file.display()));
    let ask = json!({"data": {"customer_id": "C00042"}});
    let orders = |want: i64| -> Result<(), String> {
        let (status, row) = try_request("POST", &lookup, Some(&ask), Some(&key))?;
        match row["data"]["orders_90d"].as_i64() {
            Some(n) if status == 200 && n == want => Ok(()),
            _ => Err(format!("{status} {row}")),
        }
    };
    let stale = |want: bool| -> Result<(), String> {
        let r = readyz(&features);
        if r["datasets"]["behavior"]["stale"] == want {
            Ok(())
        } else {
            Err(r.to_string())
        }
    };
    wait_for("the warehouse row", Duration::from_secs(5), || orders(6));
    let by_id = json!({"features": {"customer_id": "C00042"}});
    let (status, before) = post(&predict, &by_id, None);
    assert_eq!(status, 200, "{before}");
    let ready = readyz(&features);
    assert_eq!(ready["datasets"]["behavior"]["stale"], false, "{ready}");
    assert_eq!(ready["datasets"]["behavior"]["refresh_secs"], 1, "{ready}");

    // The warehouse changes: within a refresh (+ slack), so do the lookup
    // and the prediction by id, which equals the one with every feature sent.
    update(
        "total_spend_30d = 2400.5, orders_90d = 40, days_since_last_order = 0, avg_basket = 180.25",
    );
    let (_, took) = wait_for("the UPDATE in the lookup", Duration::from_secs(10), || {
        orders(40)
    });
    eprintln!("UPDATE visible after {took:?} (refresh 1s)");
    let (status, after) = post(&predict, &by_id, None);
    assert_eq!(status, 200, "{after}");
    assert_ne!(
        probas_bits(&before),
        probas_bits(&after),
        "{before} {after}"
    );
    let all = json!({"features": {"customer_id": "C00042", "age": 28, "gender": "M",
        "region": "west", "campaign": "spring_sale", "loyalty_member": 1,
        "total_spend_30d": 2400.5, "orders_90d": 40, "days_since_last_order": 0,
        "avg_basket": 180.25}});
    let (status, sent) = post(&predict, &all, None);
    assert_eq!(status, 200, "{sent}");
    assert_eq!(probas_bits(&after), probas_bits(&sent), "{after} {sent}");
    assert_eq!(after["result"]["prediction"], sent["result"]["prediction"]);

    // The warehouse goes away: the last snapshot keeps answering, and after
    // max_staleness (3s) the dataset is reported stale.
    proxy.set(REFUSE);
    let (_, took) = wait_for("stale in /readyz", Duration::from_secs(20), || stale(true));
    eprintln!("stale after {took:?} without the warehouse (max_staleness 3s)");
    orders(40).expect("the last snapshot still answers");
    let failed = metric(
        &features,
        "mesh_dataset_refresh_total{dataset=\"behavior\",result=\"error\"}",
    )
    .expect("refresh errors in /metrics");
    assert!(failed >= 1.0, "{failed}");
    let age = metric(&features, "mesh_dataset_age_seconds{dataset=\"behavior\"}")
        .expect("age in /metrics");
    assert!(age >= 3.0, "age {age}");
    let gauge = metric(&features, "mesh_dataset_stale{dataset=\"behavior\"}");
    assert_eq!(gauge, Some(1.0));

    // It comes back: the next refresh picks up what changed meanwhile.
    update("orders_90d = 41");
    proxy.set(PASS);
    let (_, took) = wait_for("recovery", Duration::from_secs(20), || orders(41));
    eprintln!("recovered {took:?} after the warehouse came back");
    wait_for("fresh in /readyz", Duration::from_secs(5), || stale(false));
}

/// The customer mesh's `local-warehouse` environment: `behavior` preloaded
/// from PostgreSQL every second. An UPDATE reaches the lookup and the
/// prediction by id within a refresh; with the database gone, lookups keep
/// answering from the last snapshot and `/readyz` and `/metrics` turn stale;
/// with it back, the next refresh recovers. A password, refresh or query
/// change plans as an update of `customer-features` alone; the password is
/// in no plan, log, argv or bundle file.
#[test]
fn warehouse_preload_refreshes_survives_an_outage_and_recovers() {
    let wh = Warehouse::seed("pre");
    let proxy = Proxy::start(pg_addr());
    let (mut m, scoring_port) = customer_mesh_on_warehouse();
    for (from, to) in [
        (
            "port = 15432".to_owned(),
            format!("port = {}", proxy.addr.port()),
        ),
        (
            "database = \"mesh\"".to_owned(),
            format!("database = \"{}\"", pg_database()),
        ),
        (
            "user = \"mesh\"".to_owned(),
            format!("user = \"{}\"", wh.role),
        ),
        (
            "from behavior_30d".to_owned(),
            format!("from {}", wh.table()),
        ),
        (
            "refresh = \"10s\"".to_owned(),
            "refresh = \"1s\"".to_owned(),
        ),
        (
            "max_staleness = \"1m\"".to_owned(),
            "max_staleness = \"3s\"".to_owned(),
        ),
    ] {
        m.edit("local-warehouse.toml", &from, &to);
    }
    m.set_var("WAREHOUSE_PASSWORD", &wh.password);
    m.apply();
    let ready = readyz(&m.base_url("customer-features"));
    assert_eq!(ready["datasets"]["behavior"]["rows"], 10000, "{ready}");
    preload_flow(&m, scoring_port, &proxy, &|set| {
        psql(&format!(
            "update {} set {set} where customer_id = 'C00042'",
            wh.table()
        ));
    });

    // The password is nowhere but in the runtime's 0600 secret file.
    let (code, changes) = m.plan();
    assert_eq!((code, changes.clone()), (0, vec![]), "{changes:?}");
    let human = m.mesh("plan", &[]);
    for text in [
        String::from_utf8_lossy(&human.stdout),
        String::from_utf8_lossy(&human.stderr),
    ] {
        assert!(!text.contains(&wh.password), "plan shows the password");
    }
    let pid = m.service_state("customer-features")["pid"]
        .as_u64()
        .unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(&wh.password));
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains(&wh.password));
    let mut holders = Vec::new();
    for f in files_under(&m.root.join(".mesh")) {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
        if text.contains(&wh.password) {
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&f).unwrap().permissions(),
            );
            assert_eq!(mode & 0o777, 0o600, "{}", f.display());
            assert!(
                f.components().any(|c| c.as_os_str() == "secrets"),
                "{} holds the password",
                f.display()
            );
            holders.push(f);
        }
    }
    assert_eq!(holders.len(), 1, "{holders:?}");

    // Each of a new password, refresh and query updates customer-features alone.
    let only_features = vec![("service.customer-features".to_owned(), "update".to_owned())];
    m.set_var("WAREHOUSE_PASSWORD", "another-password-entirely");
    assert_eq!(m.plan(), (2, only_features.clone()), "password");
    m.set_var("WAREHOUSE_PASSWORD", &wh.password);
    assert_eq!(m.plan().0, 0);
    m.edit(
        "local-warehouse.toml",
        "refresh = \"1s\"",
        "refresh = \"2s\"",
    );
    assert_eq!(m.plan(), (2, only_features.clone()), "refresh");
    m.edit(
        "local-warehouse.toml",
        "refresh = \"2s\"",
        "refresh = \"1s\"",
    );
    m.edit(
        "local-warehouse.toml",
        "select customer_id,",
        "select customer_id as customer_id,",
    );
    assert_eq!(m.plan(), (2, only_features), "query");
}

// ------------------------------------------------------------------ live

/// `live` datasets, one without and one with a cache: a lookup queries the
/// warehouse (an UPDATE shows at once without the cache, after the ttl with
/// it); with the database gone, the uncached lookup and a cache miss answer
/// 503 with a JSON reason in time, a cache hit still answers; with it back,
/// lookups recover by themselves.
#[test]
fn live_datasets_with_and_without_cache_across_an_outage() {
    let wh = Warehouse::seed("live");
    let proxy = Proxy::start(pg_addr());
    let table = wh.table();
    let body = format!(
        r#"[service.features.dataset.plain]
connection = "warehouse"
query = "select customer_id, orders_90d from {table}"
key = "customer_id"
mode = "live"

[service.features.dataset.cached]
connection = "warehouse"
query = "select customer_id, orders_90d from {table}"
key = "customer_id"
mode = "live"
cache = {{ ttl = "1m", max_entries = 100 }}

[service.features.endpoint.plain]
kind = "lookup"
datasets = ["plain"]

[service.features.endpoint.cached]
kind = "lookup"
datasets = ["cached"]
"#
    );
    let m = Stack::on_warehouse("live-e2e", &wh, proxy.addr.port(), &body);
    m.apply();
    let base = m.base_url("features");
    let url = |ep: &str| format!("{base}/public/api/v1/features/{ep}/lookup");
    let ask = |id: &str| json!({"data": {"customer_id": id}});
    let orders = |ep: &str, id: &str| {
        let (status, row) = post(&url(ep), &ask(id), None);
        assert_eq!(status, 200, "{ep} {id}: {row}");
        row["data"]["orders_90d"].as_i64().unwrap()
    };
    assert_eq!(orders("plain", "C00042"), 6);
    assert_eq!(orders("cached", "C00042"), 6);
    let (status, missing) = post(&url("plain"), &ask("C99999"), None);
    assert_eq!(status, 404, "{missing}");

    psql(&format!(
        "update {table} set orders_90d = 7 where customer_id = 'C00042'"
    ));
    assert_eq!(
        orders("plain", "C00042"),
        7,
        "uncached sees the UPDATE at once"
    );
    assert_eq!(
        orders("cached", "C00042"),
        6,
        "cached keeps its row for the ttl"
    );

    proxy.set(REFUSE);
    let started = std::time::Instant::now();
    let (status, body) = post(&url("plain"), &ask("C00042"), None);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "dataset_unavailable", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("plain"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        orders("cached", "C00042"),
        6,
        "a cache hit answers without the database"
    );
    let (status, body) = post(&url("cached"), &ask("C00043"), None);
    assert_eq!(status, 503, "a cache miss: {body}");
    let text = body.to_string();
    assert!(!text.contains(&wh.password), "{text}");

    proxy.set(PASS);
    wait_for(
        "live recovery",
        Duration::from_secs(15),
        || match try_request("POST", &url("plain"), Some(&ask("C00042")), None)? {
            (200, row) if row["data"]["orders_90d"] == 7 => Ok(()),
            (s, row) => Err(format!("{s} {row}")),
        },
    );
    assert_eq!(orders("cached", "C00043"), 5);
}

// ------------------------------------------------------------------ preflight

/// A dataset that cannot load refuses the whole apply before anything
/// starts (the service beside it too), with an error naming the dataset and
/// the cause: an unknown connection (a stack error, at its line), a query
/// that fails, a key column the query does not have, a database that does
/// not answer. The password is in none of the messages.
#[test]
fn a_dataset_that_cannot_load_refuses_the_apply_and_changes_nothing() {
    let wh = Warehouse::seed("pre_flight");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // dropped at once: nothing listens there
    let table = wh.table();
    let cases: [(&str, String, u16, &str, &[&str]); 4] = [
        (
            "unknown connection",
            format!("select customer_id, orders_90d from {table}"),
            pg_addr().port(),
            "connection = \"warehouse\"\nquery",
            &[
                "service.features.dataset.spend refers to undefined connection `warehouse-typo`",
                "stack.toml:17:14",
            ],
        ),
        (
            "a query that fails",
            format!("select customer_id, orders_90d from {table}_missing"),
            pg_addr().port(),
            "",
            &["dataset `spend`", "does not exist"],
        ),
        (
            "no key column",
            format!("select orders_90d from {table}"),
            pg_addr().port(),
            "",
            &["dataset `spend`", "customer_id"],
        ),
        (
            "unreachable",
            format!("select customer_id, orders_90d from {table}"),
            closed,
            "",
            &["dataset `spend`", &format!("127.0.0.1:{closed}")],
        ),
    ];
    for (case, query, port, break_connection, expect) in cases {
        let mut body = format!(
            r#"[service.features.dataset.spend]
connection = "warehouse"
query = "{query}"
key = "customer_id"
mode = "preload"

[service.features.endpoint.spend]
kind = "lookup"
datasets = ["spend"]

[service.other.dataset.rows]
file = "rows.csv"
key = "customer_id"

[service.other.endpoint.rows]
kind = "lookup"
datasets = ["rows"]
"#
        );
        if !break_connection.is_empty() {
            body = body.replace(break_connection, "connection = \"warehouse-typo\"\nquery");
        }
        let m = Stack::on_warehouse("preflight", &wh, port, &body);
        std::fs::write(m.root.join("rows.csv"), "customer_id,x\nC1,1\n").unwrap();
        let out = m.mesh("apply", &["--auto-approve"]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{case}: apply succeeded\n{stderr}");
        for e in expect {
            assert!(stderr.contains(e), "{case}: no `{e}` in:\n{stderr}");
        }
        if break_connection.is_empty() {
            assert!(
                stderr.contains("Apply refused: nothing was changed"),
                "{case}: {stderr}"
            );
            assert!(stderr.contains("service.features"), "{case}: {stderr}");
        }
        assert!(!stderr.contains(&wh.password), "{case}: {stderr}");
        let started = files_under(&m.state_dir())
            .into_iter()
            .filter(|f| f.ends_with("state.json"))
            .collect::<Vec<_>>();
        assert!(started.is_empty(), "{case}: {started:?}");
    }
}

// ------------------------------------------------------------------ bundle

/// A query in mode `bundle` is run once at apply and frozen into the
/// service's bundle: the service answers with the database gone, a later
/// UPDATE does not show, the bundle holds the rows but neither the
/// connection nor its password, the next plan is empty; a changed query is
/// an update that freezes the rows again.
#[test]
fn a_query_in_mode_bundle_is_frozen_at_apply() {
    let wh = Warehouse::seed("frozen");
    let proxy = Proxy::start(pg_addr());
    let table = wh.table();
    let body = format!(
        r#"[service.features.dataset.spend]
connection = "warehouse"
query = "select customer_id, total_spend_30d, orders_90d from {table}"
key = "customer_id"
mode = "bundle"

[service.features.endpoint.spend]
kind = "lookup"
datasets = ["spend"]
"#
    );
    let m = Stack::on_warehouse("frozen", &wh, proxy.addr.port(), &body);
    m.apply();
    let url = format!(
        "{}/public/api/v1/features/spend/lookup",
        m.base_url("features")
    );
    let ask = json!({"data": {"customer_id": "C00042"}});
    let (status, row) = post(&url, &ask, None);
    assert_eq!(status, 200, "{row}");
    assert_eq!(row["data"]["orders_90d"], 6, "{row}");
    assert_eq!(row["data"]["total_spend_30d"], 141.32, "{row}");

    proxy.set(REFUSE);
    psql(&format!(
        "update {table} set orders_90d = 60 where customer_id = 'C00042'"
    ));
    let (status, row) = post(&url, &ask, None);
    assert_eq!(
        (status, &row["data"]["orders_90d"]),
        (200, &json!(6)),
        "{row}"
    );
    let ready = readyz(&m.base_url("features"));
    assert_eq!(ready["datasets"]["spend"]["rows"], 10000, "{ready}");
    assert_eq!(ready["datasets"]["spend"]["source"], "csv", "{ready}");

    let files = files_under(&m.state_dir().join("services/features"));
    let frozen = files
        .iter()
        .find(|f| f.ends_with("bundle/datasets/spend.frozen.csv"))
        .unwrap_or_else(|| panic!("no frozen rows in {files:?}"));
    let text = std::fs::read_to_string(frozen).unwrap();
    assert_eq!(text.lines().count(), 10001);
    assert!(
        text.starts_with("customer_id,total_spend_30d,orders_90d\n"),
        "{}",
        &text[..80]
    );
    let service_json = files
        .iter()
        .find(|f| f.ends_with("bundle/service.json"))
        .expect("service.json");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(service_json).unwrap()).unwrap();
    assert!(
        config["connections"]
            .as_object()
            .is_none_or(|c| c.is_empty()),
        "{config}"
    );
    for f in &files {
        let t = String::from_utf8_lossy(&std::fs::read(f).unwrap()).into_owned();
        if t.contains(&wh.password) {
            assert!(
                f.components().any(|c| c.as_os_str() == "secrets"),
                "{} holds the password",
                f.display()
            );
        }
    }
    assert_eq!(m.plan(), (0, vec![]));

    // A new query: an update, frozen again from the database (back now).
    proxy.set(PASS);
    m.edit(
        "stack.toml",
        "total_spend_30d, orders_90d from",
        "orders_90d, total_spend_30d from",
    );
    assert_eq!(
        m.plan(),
        (
            2,
            vec![("service.features".to_owned(), "update".to_owned())]
        )
    );
    m.apply();
    let url = format!(
        "{}/public/api/v1/features/spend/lookup",
        m.base_url("features")
    );
    let (status, row) = post(&url, &ask, None);
    assert_eq!(
        (status, &row["data"]["orders_90d"]),
        (200, &json!(60)),
        "{row}"
    );
}

// ------------------------------------------------------------------ snowflake

/// The preload flow of the customer mesh with `behavior` read from
/// Snowflake (fakesnow, through a proxy the test cuts): an UPDATE reaches
/// the lookup and the prediction by id (equal to the one with every feature
/// sent) within a refresh; with Snowflake gone the last snapshot answers and
/// turns stale; with it back the next refresh recovers.
#[test]
fn snowflake_preload_reaches_the_prediction_and_survives_an_outage() {
    use support::fakesnow::{snowflake_exec, snowflake_url};
    let upstream: SocketAddr = snowflake_url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("MESH_TEST_SNOWFLAKE_URL is http://IP:PORT");
    let proxy = Proxy::start(upstream);
    let table = format!("e2e_behavior_{}", std::process::id());
    let rows: Vec<String> =
        std::fs::read_to_string(repo().join("examples/customer-mesh/behavior.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .take(100)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                format!("('{}', {}, {}, {}, {})", f[0], f[1], f[2], f[3], f[4])
            })
            .collect();
    snowflake_exec(&[
        &format!(
            "CREATE OR REPLACE TABLE {table} (customer_id VARCHAR, total_spend_30d DOUBLE, \
             orders_90d INT, days_since_last_order INT, avg_basket DOUBLE)"
        ),
        &format!("INSERT INTO {table} VALUES {}", rows.join(", ")),
    ]);

    let (mut m, scoring_port) = customer_mesh_on_warehouse();
    m.edit(
        "stack.toml",
        "kind = \"postgres\"\nhost = \"warehouse.internal\"\nport = 5432\ndatabase = \"analytics\"\nuser = \"mesh_reader\"",
        &format!(
            "kind = \"snowflake\"\naccount = \"meshtest\"\nurl = \"http://{}\"\n\
             database = \"MESH_TEST\"\nschema = \"PUBLIC\"\nuser = \"mesh_reader\"",
            proxy.addr
        ),
    );
    std::fs::write(
        m.root.join("local-warehouse.toml"),
        format!(
            "[service.customer-features.dataset.behavior]\nconnection = \"warehouse\"\n\
             query = \"select customer_id, total_spend_30d, orders_90d, days_since_last_order, avg_basket from {table}\"\n\
             mode = \"preload\"\nrefresh = \"1s\"\nmax_staleness = \"3s\"\n"
        ),
    )
    .unwrap();
    let password = "sf-customer-mesh-pw-81c3";
    m.set_var("WAREHOUSE_PASSWORD", password);
    m.apply();

    preload_flow(&m, scoring_port, &proxy, &|set| {
        snowflake_exec(&[&format!(
            "UPDATE {table} SET {set} WHERE customer_id = 'C00042'"
        )]);
    });
    let out = m.mesh("plan", &[]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(password));
    drop(m);
    snowflake_exec(&[&format!("DROP TABLE {table}")]);
}
