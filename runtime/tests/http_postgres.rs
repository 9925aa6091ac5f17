//! SQL datasets against a real PostgreSQL: `preload` and `live` modes,
//! enrichment equivalence, lookups by text and integer keys.
//!
//! Needs `MESH_TEST_POSTGRES_URL` (set by `scripts/test`, which starts
//! PostgreSQL on 127.0.0.1:15432). Without it the tests fail, saying so.

mod common;

use common::*;
use serde_json::{Value, json};

/// Creates a fresh schema with `behavior` (from the example CSV) and
/// `segments` (integer key); returns the schema name.
fn setup(pg: &Pg) -> String {
    let schema = format!(
        "mesh_rt_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
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
                "cannot connect to PostgreSQL at {}:{} ({e}); run `scripts/test` or start PostgreSQL",
                pg.host, pg.port
            )
        });
        tokio::spawn(conn);
        let mut sql = format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.behavior (customer_id text PRIMARY KEY, total_spend_30d numeric(10,2),
                 orders_90d integer, days_since_last_order bigint, avg_basket double precision);
             CREATE TABLE {schema}.segments (id integer PRIMARY KEY, segment text, score real, vip boolean);
             INSERT INTO {schema}.segments VALUES (1, 'gold', 0.5, true), (2, 'silver', NULL, false);"
        );
        let (_, rows) = read_csv("behavior.csv");
        for chunk in rows.chunks(1000) {
            let values: Vec<String> = chunk
                .iter()
                .map(|r| format!("('{}', {}, {}, {}, {})", r[0], r[1], r[2], r[3], r[4]))
                .collect();
            sql.push_str(&format!("INSERT INTO {schema}.behavior VALUES {};", values.join(",")));
        }
        client.batch_execute(&sql).await.expect("create test tables");
    });
    schema
}

fn bundle(pg: &Pg, schema: &str, port: u16) -> Value {
    json!({
        "service": SERVICE,
        "connections": {"warehouse": {"kind": "postgres", "host": pg.host, "port": port,
            "database": pg.database, "user": pg.user, "password": {"env": "MESH_TEST_PG_PASSWORD"}, "pool_size": 2}},
        "datasets": {
            "customers": {"source": {"csv": "datasets/customers.csv"}, "key": "customer_id"},
            "behavior_pre": {"source": {"sql": {"connection": "warehouse", "query": format!("select * from {schema}.behavior")}},
                "key": "customer_id", "mode": "preload"},
            "behavior_live": {"source": {"sql": {"connection": "warehouse", "query": format!("select * from {schema}.behavior")}},
                "key": "customer_id", "mode": "live"},
            "segments": {"source": {"sql": {"connection": "warehouse", "query": format!("select * from {schema}.segments")}},
                "key": "id", "mode": "live"}
        },
        "endpoints": {
            "hv-preload": {"kind": "prediction", "model": "models/high_value.onnx", "enrichments": [
                {"dataset": "customers", "key": "customer_id", "columns": CUSTOMER_COLUMNS},
                {"dataset": "behavior_pre", "key": "customer_id", "columns": BEHAVIOR_COLUMNS}]},
            "hv-live": {"kind": "prediction", "model": "models/high_value.onnx", "enrichments": [
                {"dataset": "customers", "key": "customer_id", "columns": CUSTOMER_COLUMNS},
                {"dataset": "behavior_live", "key": "customer_id", "columns": BEHAVIOR_COLUMNS}]},
            "hv-plain": {"kind": "prediction", "model": "models/high_value.onnx"},
            "behavior": {"kind": "lookup", "datasets": ["behavior_live"]},
            "behavior-pre": {"kind": "lookup", "datasets": ["behavior_pre"]},
            "segments": {"kind": "lookup", "datasets": ["segments"]}
        }
    })
}

#[test]
fn sql_datasets_preload_and_live() {
    let pg = pg();
    let schema = setup(&pg);
    let b = BundleDir::new(&bundle(&pg, &schema, pg.port));
    let s = Server::start_ready(b.path(), &[("MESH_TEST_PG_PASSWORD", pg.password.as_str())]);

    let (_, rows) = read_csv("customers.csv");
    for i in [0usize, 1, 2, 777, 9999] {
        let id = &rows[i][0];
        let only_key = format!(r#"{{"features": {{"customer_id": "{id}"}}}}"#);
        let explicit = s
            .api(
                "hv-plain",
                "predict",
                &format!(r#"{{"features": {}}}"#, explicit_features(i)),
            )
            .json();
        for ep in ["hv-preload", "hv-live"] {
            let r = s.api(ep, "predict", &only_key);
            assert_eq!(r.status, 200, "{ep}: {}", r.text());
            assert_eq!(
                probas_bits(&r.json()),
                probas_bits(&explicit),
                "{ep} customer {id}"
            );
        }
    }

    // Live and preloaded lookups give the CSV's values.
    for ep in ["behavior", "behavior-pre"] {
        let r = s.api(ep, "lookup", r#"{"data": {"customer_id": "C00002"}}"#);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json(),
            json!({"data": {"customer_id": "C00002", "total_spend_30d": 50.4, "orders_90d": 2,
                "days_since_last_order": 3, "avg_basket": 52.89}}),
            "{ep}"
        );
        s.api(ep, "lookup", r#"{"data": {"customer_id": "C0"}}"#)
            .assert_error(404, "not_found");
    }
    // Integer keys: by number or by text; typed values and nulls.
    let r = s.api("segments", "lookup", r#"{"data": {"id": 1}}"#);
    assert_eq!(
        r.json(),
        json!({"data": {"id": 1, "segment": "gold", "score": 0.5, "vip": true}})
    );
    let r = s.api("segments", "lookup", r#"{"data": {"id": "2"}}"#);
    assert_eq!(
        r.json(),
        json!({"data": {"id": "2", "segment": "silver", "score": null, "vip": false}})
    );
    s.api("segments", "lookup", r#"{"data": {"id": "two"}}"#)
        .assert_error(404, "not_found");
    s.api("segments", "lookup", r#"{"data": {"id": 99999999999}}"#)
        .assert_error(404, "not_found");
    let r = s.api(
        "segments",
        "lookup-multi",
        r#"{"items": [{"data": {"id": 1}}, {"data": {"id": 3}}, {"data": {"id": 2}}]}"#,
    );
    let v = r.json();
    assert_eq!(v["items"][0]["data"]["segment"], "gold");
    assert_eq!(v["items"][1]["error"]["code"], "not_found");
    assert_eq!(v["items"][2]["data"]["segment"], "silver");

    // Concurrent live requests share the small pool.
    let addr = s.addr;
    let threads: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                for k in 0..20 {
                    let id = format!("C{:05}", 1 + t * 100 + k);
                    let r = request(
                        addr,
                        "POST",
                        "/public/api/v1/customer-scoring/hv-live/predict",
                        &[("Content-Type", "application/json")],
                        format!(r#"{{"features": {{"customer_id": "{id}"}}}}"#).as_bytes(),
                    );
                    assert_eq!(r.status, 200, "{}", r.text());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    s.assert_no_panic();
}

#[test]
fn unreachable_database_fails_check_without_leaking_the_password() {
    let pg = pg();
    let b = BundleDir::new(&bundle(&pg, "nowhere", closed_port().port()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-runtime"))
        .args(["check", "--bundle"])
        .arg(b.path())
        .env("MESH_TEST_PG_PASSWORD", "s3cret-pw")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("connection `warehouse`: cannot connect"),
        "{err}"
    );
    assert!(!err.contains("s3cret-pw"), "{err}");
    // Offline check skips the database.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-runtime"))
        .args(["check", "--offline", "--bundle"])
        .arg(b.path())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_query_fails_start_with_the_database_message() {
    let pg = pg();
    let mut cfg = bundle(&pg, "no_such_schema_here", pg.port);
    cfg["endpoints"] = json!({"segments": {"kind": "lookup", "datasets": ["segments"]}});
    let b = BundleDir::new(&cfg);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-runtime"))
        .args(["serve", "--listen", "127.0.0.1:0", "--bundle"])
        .arg(b.path())
        .env("MESH_TEST_PG_PASSWORD", &pg.password)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no_such_schema_here"), "{err}");
}
