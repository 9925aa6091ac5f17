//! Data products against a real PostgreSQL: refreshing preloads swapped whole,
//! freshness in `/readyz` and `/metrics`, the database going away and coming
//! back (through a TCP proxy the test cuts and restores), coalesced and cached
//! live lookups, TLS (`require`, `verify-full`) against a private PostgreSQL
//! with a certificate made here.
//!
//! Needs `MESH_TEST_POSTGRES_URL` (set by `scripts/test`, which starts
//! PostgreSQL) and, for the TLS test, the PostgreSQL server binaries
//! (`/usr/lib/postgresql/*/bin`, Debian package `postgresql`). Without them
//! the tests fail, saying so.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::outage;
use common::proxy::Proxy;
use common::*;
use serde_json::{Value, json};

// ------------------------------------------------------------------ helpers

/// Runs `sql` on the shared PostgreSQL.
fn exec(pg: &Pg, sql: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&pg.host)
            .port(pg.port)
            .user(&pg.user)
            .password(&pg.password)
            .dbname(&pg.database);
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap_or_else(|e| {
            panic!(
                "cannot connect to PostgreSQL at {}:{} ({e}); run `scripts/test` or `scripts/services start`",
                pg.host, pg.port
            )
        });
        tokio::spawn(conn);
        client.batch_execute(sql).await.expect("run SQL");
    });
}

/// A fresh schema name.
fn schema_name() -> String {
    format!(
        "mesh_dp_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    )
}

/// `items` (id integer key, v integer, label text) with ids `0..rows`.
fn items_table(pg: &Pg, schema: &str, rows: usize) {
    exec(
        pg,
        &format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.items (id integer PRIMARY KEY, v integer NOT NULL, label text);
             INSERT INTO {schema}.items SELECT g, 0, 'item-' || g FROM generate_series(0, {}) g;",
            rows - 1
        ),
    );
}

fn connection(pg: &Pg, port: u16, extra: Value) -> Value {
    let mut c = json!({"kind": "postgres", "host": pg.host, "port": port, "database": pg.database,
        "user": pg.user, "password": {"env": "MESH_TEST_PG_PASSWORD"}, "pool_size": 2});
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

fn start(pg: &Pg, service: &Value) -> (BundleDir, Server) {
    let b = BundleDir::new(service);
    let s = Server::start_ready(b.path(), &[("MESH_TEST_PG_PASSWORD", pg.password.as_str())]);
    (b, s)
}

// ------------------------------------------------------------------ counting Bind messages

/// A proxy in front of PostgreSQL counting the `Bind` messages clients send:
/// one per execution of a prepared query.
fn pg_proxy(upstream: SocketAddr) -> Proxy {
    Proxy::counting(upstream, || {
        let mut frontend = Frontend::default();
        Box::new(move |bytes: &[u8]| frontend.feed(bytes))
    })
}

/// Splits the frontend (client) side of the PostgreSQL protocol into messages.
#[derive(Default)]
struct Frontend {
    started: bool,
    pending: Vec<u8>,
}

impl Frontend {
    /// Feeds bytes; returns the number of complete `Bind` messages.
    fn feed(&mut self, bytes: &[u8]) -> usize {
        self.pending.extend_from_slice(bytes);
        let mut binds = 0;
        loop {
            if !self.started {
                // Untyped: length, then a code (startup, SSLRequest, GSSENCRequest).
                if self.pending.len() < 8 {
                    return binds;
                }
                let len = u32::from_be_bytes(self.pending[0..4].try_into().expect("4")) as usize;
                let code = u32::from_be_bytes(self.pending[4..8].try_into().expect("4"));
                if self.pending.len() < len {
                    return binds;
                }
                self.pending.drain(..len);
                self.started = !matches!(code, 80877103 | 80877104);
            } else {
                if self.pending.len() < 5 {
                    return binds;
                }
                let len = u32::from_be_bytes(self.pending[1..5].try_into().expect("4")) as usize;
                if self.pending.len() < 1 + len {
                    return binds;
                }
                if self.pending[0] == b'B' {
                    binds += 1;
                }
                self.pending.drain(..1 + len);
            }
        }
    }
}

// ------------------------------------------------------------------ refresh

/// A preload with `refresh_secs` picks up an UPDATE, and a reader during
/// refreshes of a 200,000-row table never sees a partial table: every key is
/// always found, `v` never goes back, `rows` is always the full count.
#[test]
fn refresh_swaps_complete_snapshots_only() {
    const ROWS: usize = 200_000;
    let pg = pg();
    let schema = schema_name();
    items_table(&pg, &schema, ROWS);
    let service = json!({
        "service": SERVICE,
        "connections": {"warehouse": connection(&pg, pg.port, json!({}))},
        "datasets": {"items": {"source": {"sql": {"connection": "warehouse",
            "query": format!("select * from {schema}.items")}}, "key": "id", "mode": "preload",
            "refresh_secs": 1}},
        "endpoints": {"items": {"kind": "lookup", "datasets": ["items"]}}
    });
    let (_b, s) = start(&pg, &service);

    let ready = readyz(&s);
    let ds = &ready["datasets"]["items"];
    assert_eq!(ds["rows"], ROWS, "{ready}");
    assert_eq!(ds["stale"], false, "{ready}");
    assert_eq!(ds["refresh_secs"], 1, "{ready}");

    // Readers: keys spread over the table, the last one included.
    let stop = Arc::new(AtomicBool::new(false));
    let addr = s.addr;
    let readers: Vec<_> = (0..2)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen_v = 0i64;
                let mut reads = 0usize;
                let mut problems = Vec::new();
                let mut i = t;
                while !stop.load(Ordering::SeqCst) {
                    let id = [ROWS - 1, (i * 7919) % ROWS, 0][i % 3];
                    i += 1;
                    let r = request(
                        addr,
                        "POST",
                        &format!("/public/api/v1/{SERVICE}/items/lookup"),
                        &[("Content-Type", "application/json")],
                        format!(r#"{{"data": {{"id": {id}}}}}"#).as_bytes(),
                    );
                    reads += 1;
                    if r.status != 200 {
                        problems.push(format!("id {id}: {} {}", r.status, r.text()));
                        continue;
                    }
                    let v = r.json()["data"]["v"].as_i64().unwrap_or(-1);
                    if v < seen_v {
                        problems.push(format!("id {id}: v went back from {seen_v} to {v}"));
                    }
                    seen_v = v;
                    let ready = request(addr, "GET", "/readyz", &[], b"").json();
                    let rows = &ready["datasets"]["items"]["rows"];
                    if rows != ROWS {
                        problems.push(format!("readyz rows {rows}"));
                    }
                }
                (reads, problems)
            })
        })
        .collect();

    let refreshes = |s: &Server| {
        metric(
            &metrics(s),
            r#"mesh_dataset_refresh_total{dataset="items",result="ok"}"#,
        )
        .unwrap_or(0.0)
    };
    exec(&pg, &format!("UPDATE {schema}.items SET v = 1"));
    wait_until(&s, "the UPDATE is served", Duration::from_secs(60), || {
        let r = s.api(
            "items",
            "lookup",
            &format!(r#"{{"data": {{"id": {}}}}}"#, ROWS / 2),
        );
        match r.json()["data"]["v"].as_i64() {
            Some(1) => Ok(()),
            other => Err(format!("v = {other:?}")),
        }
    });
    // Two more complete refreshes while the readers read.
    let before = refreshes(&s);
    wait_until(&s, "two more refreshes", Duration::from_secs(60), || {
        let now = refreshes(&s);
        if now >= before + 2.0 {
            Ok(())
        } else {
            Err(format!("{now} ok refreshes"))
        }
    });
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        let (reads, problems) = r.join().expect("reader");
        assert!(reads > 0);
        assert!(
            problems.is_empty(),
            "{} problems in {reads} reads: {:?}",
            problems.len(),
            &problems[..problems.len().min(10)]
        );
    }

    let text = metrics(&s);
    assert_eq!(
        metric(&text, r#"mesh_dataset_rows{dataset="items"}"#),
        Some(ROWS as f64),
        "{text}"
    );
    assert!(
        metric(&text, r#"mesh_dataset_age_seconds{dataset="items"}"#).is_some(),
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"mesh_dataset_stale{dataset="items"}"#),
        Some(0.0),
        "{text}"
    );
    let ready = readyz(&s);
    assert_eq!(
        ready["datasets"]["items"]["last_refresh"]["result"], "ok",
        "{ready}"
    );
    s.assert_no_panic();
    exec(&pg, &format!("DROP SCHEMA {schema} CASCADE"));
}

// ------------------------------------------------------------------ the database goes away

/// Through a proxy that is cut and restored: the preload keeps serving its
/// last snapshot and turns stale after `max_staleness_secs`; a live cache hit
/// answers; a live miss gets a 503 JSON answer (refused connections, and a
/// black hole within the statement timeout); everything recovers by itself.
#[test]
fn database_down_then_back() {
    let pg = pg();
    let schema = schema_name();
    items_table(&pg, &schema, 100);
    let upstream: SocketAddr = format!("{}:{}", pg.host, pg.port)
        .parse()
        .expect("pg address");
    let proxy = pg_proxy(upstream);
    let connection = connection(
        &pg,
        proxy.addr.port(),
        json!({"statement_timeout_ms": 1000, "connect_timeout_ms": 1000}),
    );
    let service = outage::service(connection, &format!("select * from {schema}.items"));
    let (_b, s) = start(&pg, &service);
    // The test database's password is its user's name, which errors name
    // rightly; http_postgres.rs checks that the password itself never shows.
    outage::down_then_back(&s, &proxy, None, || {
        exec(
            &pg,
            &format!("UPDATE {schema}.items SET label = 'new-' || id"),
        )
    });
    s.assert_no_panic();
    exec(&pg, &format!("DROP SCHEMA {schema} CASCADE"));
}

// ------------------------------------------------------------------ coalescing

/// 50 concurrent lookups of one uncached key make one query, counted at the
/// proxy (Bind messages), not by the runtime.
#[test]
fn concurrent_live_lookups_of_one_key_make_one_query() {
    let pg = pg();
    let schema = schema_name();
    items_table(&pg, &schema, 10);
    exec(
        &pg,
        &format!(
            "CREATE FUNCTION {schema}.slow(x integer) RETURNS integer LANGUAGE plpgsql VOLATILE AS
             $$ BEGIN PERFORM pg_sleep(1.5); RETURN x; END $$;"
        ),
    );
    let upstream: SocketAddr = format!("{}:{}", pg.host, pg.port)
        .parse()
        .expect("pg address");
    let proxy = pg_proxy(upstream);
    let service = json!({
        "service": SERVICE,
        "connections": {"warehouse": connection(&pg, proxy.addr.port(), json!({}))},
        "datasets": {"slow": {"source": {"sql": {"connection": "warehouse",
            "query": format!("select id, {schema}.slow(v) as v, label from {schema}.items")}},
            "key": "id", "mode": "live"}},
        "endpoints": {"slow": {"kind": "lookup", "datasets": ["slow"]}}
    });
    let (_b, s) = start(&pg, &service);
    let before = proxy.count();
    let barrier = Arc::new(Barrier::new(50));
    let addr = s.addr;
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                request(
                    addr,
                    "POST",
                    &format!("/public/api/v1/{SERVICE}/slow/lookup"),
                    &[("Content-Type", "application/json")],
                    br#"{"data": {"id": 7}}"#,
                )
            })
        })
        .collect();
    for t in threads {
        let r = t.join().expect("thread");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["data"]["label"], "item-7");
    }
    let queries = proxy.count() - before;
    assert_eq!(
        queries, 1,
        "50 concurrent lookups of one key: {queries} queries reached the database"
    );
    s.assert_no_panic();
    exec(&pg, &format!("DROP SCHEMA {schema} CASCADE"));
}

// ------------------------------------------------------------------ TLS

/// A private PostgreSQL in a temp dir, TLS on, accepting only TLS connections.
struct PrivatePg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

const PRIVATE_PASSWORD: &str = "tls-test-pw-9f3k";

impl PrivatePg {
    fn start(cert_pem: &str, key_pem: &str) -> PrivatePg {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
            .max()
            .unwrap_or_else(|| {
                panic!("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: run `scripts/services start` (it installs them)")
            });
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0\n"))
            .unwrap_or(false);
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        std::fs::write(dir.path().join("pw"), PRIVATE_PASSWORD).expect("pwfile");
        let me = PrivatePg {
            dir,
            bin,
            port: free_low_port(),
            as_postgres,
        };
        if as_postgres {
            me.run(
                Command::new("chown")
                    .args(["-R", "postgres:"])
                    .arg(me.dir.path()),
            );
        }
        let mut initdb = me.pg_cmd("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--auth-local=trust",
            ])
            .arg(format!("--pwfile={}", me.dir.path().join("pw").display()));
        me.run(&mut initdb);
        std::fs::write(data.join("server.crt"), cert_pem).expect("cert");
        std::fs::write(data.join("server.key"), key_pem).expect("key");
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
        )
        .expect("hba");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        if as_postgres {
            me.run(
                Command::new("chown")
                    .args(["-R", "postgres:"])
                    .arg(me.dir.path()),
            );
        }
        let opts = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c ssl=on -c fsync=off",
            me.port,
            me.dir.path().display()
        );
        let mut ctl = me.pg_cmd("pg_ctl");
        ctl.arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(me.dir.path().join("log"))
            .args(["-w", "-t", "60", "-o", &opts, "start"]);
        me.run(&mut ctl);
        me
    }

    fn pg_cmd(&self, tool: &str) -> Command {
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(tool));
            c
        } else {
            Command::new(self.bin.join(tool))
        }
    }

    fn run(&self, cmd: &mut Command) {
        let out = cmd.output().expect("run a PostgreSQL tool");
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
            panic!(
                "{cmd:?} failed: {}{}\nlog:\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let mut ctl = self.pg_cmd("pg_ctl");
        ctl.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = ctl.output();
    }
}

/// A free port below the ephemeral range.
fn free_low_port() -> u16 {
    let seed =
        std::process::id() as usize * 7919 + Instant::now().elapsed().subsec_nanos() as usize;
    for i in 0..2000 {
        let port = 20000 + ((seed + i * 13) % 12000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-32000");
}

/// A CA named `ca_name` and a server certificate for `localhost` signed by
/// it; PEMs.
fn certificates(ca_name: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("server key");
    let server = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    let cert = server.signed_by(&key, &issuer).expect("server cert");
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

fn tls_service(port: u16, host: &str, extra: Value) -> Value {
    let mut conn = json!({"kind": "postgres", "host": host, "port": port, "database": "postgres",
        "user": "postgres", "password": {"env": "MESH_TEST_PG_PASSWORD"}});
    if let (Some(c), Some(extra)) = (conn.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    json!({
        "service": SERVICE,
        "connections": {"db": conn},
        "datasets": {
            "tls": {"source": {"sql": {"connection": "db",
                "query": "select 1 as id, ssl, version from pg_stat_ssl where pid = pg_backend_pid()"}},
                "key": "id", "mode": "preload"},
            "tls_live": {"source": {"sql": {"connection": "db",
                "query": "select 1 as id, ssl as live_ssl from pg_stat_ssl where pid = pg_backend_pid()"}},
                "key": "id", "mode": "live"}
        },
        "endpoints": {"tls": {"kind": "lookup", "datasets": ["tls", "tls_live"]}}
    })
}

fn check(bundle: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-runtime"))
        .args(["check", "--bundle"])
        .arg(bundle)
        .env("MESH_TEST_PG_PASSWORD", PRIVATE_PASSWORD)
        .output()
        .expect("run mesh-runtime check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `require` encrypts; `verify-full` checks the chain against `ca_file` and
/// the host name; a wrong CA, a wrong host name and a plain connection to a
/// TLS-only server fail with clear errors that never hold the password.
#[test]
fn postgres_over_tls() {
    let (ca, cert, key) = certificates("mesh test CA");
    let (other_ca, _, _) = certificates("another CA");
    // A CA with the same name but another key: the signature does not match.
    let (impostor_ca, _, _) = certificates("mesh test CA");
    let server = PrivatePg::start(&cert, &key);

    for (name, host, extra) in [
        ("require", "127.0.0.1", json!({"sslmode": "require"})),
        (
            "verify-full",
            "localhost",
            json!({"sslmode": "verify-full", "ca_file": "ca.pem"}),
        ),
    ] {
        let b = BundleDir::new(&tls_service(server.port, host, extra));
        std::fs::write(b.path().join("ca.pem"), &ca).expect("ca");
        let s = Server::start_ready(b.path(), &[("MESH_TEST_PG_PASSWORD", PRIVATE_PASSWORD)]);
        let r = s.api("tls", "lookup", r#"{"data": {"id": 1}}"#);
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let v = r.json();
        assert_eq!(v["data"]["ssl"], true, "{name}: {v}");
        assert_eq!(v["data"]["live_ssl"], true, "{name}: {v}");
        assert!(
            v["data"]["version"]
                .as_str()
                .unwrap_or("")
                .starts_with("TLS"),
            "{name}: {v}"
        );
        s.assert_no_panic();
    }

    // verify-full with an absolute ca_file path works too.
    let b = BundleDir::new(&json!({}));
    let ca_path = b.path().join("abs-ca.pem");
    std::fs::write(&ca_path, &ca).expect("ca");
    b.write_service(&tls_service(
        server.port,
        "localhost",
        json!({"sslmode": "verify-full", "ca_file": ca_path}),
    ));
    let (ok, err) = check(b.path());
    assert!(ok, "{err}");

    let failures = [
        (
            "wrong CA",
            "localhost",
            json!({"sslmode": "verify-full", "ca_file": "other.pem"}),
            "not signed by a trusted",
        ),
        (
            "impostor CA",
            "localhost",
            json!({"sslmode": "verify-full", "ca_file": "impostor.pem"}),
            "not signed by a trusted",
        ),
        (
            "wrong host",
            "127.0.0.1",
            json!({"sslmode": "verify-full", "ca_file": "ca.pem"}),
            "not valid for",
        ),
        (
            "missing CA file",
            "localhost",
            json!({"sslmode": "verify-full", "ca_file": "nope.pem"}),
            "nope.pem",
        ),
        (
            "no TLS",
            "127.0.0.1",
            json!({"sslmode": "disable"}),
            "no encryption",
        ),
    ];
    for (case, host, extra, expected) in failures {
        let b = BundleDir::new(&tls_service(server.port, host, extra));
        std::fs::write(b.path().join("ca.pem"), &ca).expect("ca");
        std::fs::write(b.path().join("other.pem"), &other_ca).expect("ca");
        std::fs::write(b.path().join("impostor.pem"), &impostor_ca).expect("ca");
        let (ok, err) = check(b.path());
        assert!(!ok, "{case}: check passed");
        assert!(err.contains("connection `db`"), "{case}: {err}");
        assert!(
            err.contains(expected),
            "{case}: expected `{expected}` in: {err}"
        );
        assert!(!err.contains(PRIVATE_PASSWORD), "{case}: {err}");
    }
}
