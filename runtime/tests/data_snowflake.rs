//! Snowflake datasets served by the real `mesh-runtime` against fakesnow:
//! refreshing preloads, coalesced and cached live lookups counted by the
//! runtime's query counters, and the server going away and coming back
//! (through a TCP proxy the test cuts and restores) — the same behaviour and
//! the same `/readyz` and `/metrics` shapes as PostgreSQL's (data_products.rs).
//!
//! Needs `MESH_TEST_SNOWFLAKE_URL` (set by `scripts/test`, which starts
//! fakesnow and makes database MESH_TEST). Without it the tests fail, saying so.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Barrier};

use common::outage::{self, LIMIT, key};
use common::proxy::Proxy;
use common::*;
use serde_json::{Value, json};

/// The variable the connection's password is read from (fakesnow checks none).
const PASSWORD_ENV: &str = "MESH_TEST_SF_PASSWORD";
const PASSWORD: &str = "sf-password-7c1e90";

/// fakesnow's address, for a proxy in front of it.
fn fakesnow() -> SocketAddr {
    let url = snowflake_url();
    url.strip_prefix("http://")
        .and_then(|hp| hp.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("MESH_TEST_SNOWFLAKE_URL must be http://IP:PORT, found {url}"))
}

/// `NAME_<pid>` with `id` (int key), `v` (int), `label` (text), ids `0..rows`.
fn items_table(name: &str, rows: usize) -> String {
    let table = format!("{name}_{}", std::process::id());
    let values: Vec<String> = (0..rows).map(|i| format!("({i}, 0, 'item-{i}')")).collect();
    snowflake_exec(&[
        &format!("CREATE OR REPLACE TABLE {table} (id INT, v INT, label VARCHAR)"),
        &format!("INSERT INTO {table} VALUES {}", values.join(", ")),
    ]);
    table
}

fn connection(addr: SocketAddr, statement_timeout_ms: u64) -> Value {
    json!({"kind": "snowflake", "account": "meshtest", "user": "mesh_reader",
        "password": {"env": PASSWORD_ENV}, "database": "MESH_TEST", "schema": "PUBLIC",
        "url": format!("http://{addr}"), "pool_size": 2, "statement_timeout_ms": statement_timeout_ms})
}

fn start(service: &Value) -> (BundleDir, Server) {
    let b = BundleDir::new(service);
    let s = Server::start_ready(b.path(), &[(PASSWORD_ENV, PASSWORD)]);
    (b, s)
}

/// A preload with `refresh_secs` picks up an UPDATE at its next refresh, and
/// reports itself as PostgreSQL's preloads do.
#[test]
fn preload_picks_up_an_update_after_a_refresh() {
    let table = items_table("sf_refresh", 20);
    let service = json!({
        "service": SERVICE,
        "connections": {"warehouse": connection(fakesnow(), 5000)},
        "datasets": {"items": {"source": {"sql": {"connection": "warehouse",
            "query": format!("select id, v, label from {table}")}},
            "key": "id", "mode": "preload", "refresh_secs": 1}},
        "endpoints": {"items": {"kind": "lookup", "datasets": ["items"]}}
    });
    let (_b, s) = start(&service);
    let r = lookup_within(&s, "items", &key(5), LIMIT);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"]["label"], "item-5");
    assert_eq!(r.json()["data"]["v"], 0);

    snowflake_exec(&[&format!(
        "UPDATE {table} SET v = id * 10, label = 'new-' || id"
    )]);
    wait_until(&s, "the update is served", LIMIT, || {
        let r = lookup_within(&s, "items", &key(5), LIMIT);
        let data = &r.json()["data"];
        if data["label"] == "new-5" && data["v"] == 50 {
            Ok(())
        } else {
            Err(r.text())
        }
    });
    let ready = readyz(&s);
    let ds = &ready["datasets"]["items"];
    assert_eq!(
        (&ds["source"], &ds["mode"], &ds["rows"], &ds["stale"]),
        (&json!("sql"), &json!("preload"), &json!(20), &json!(false)),
        "{ready}"
    );
    assert_eq!(ds["last_refresh"]["result"], "ok", "{ready}");
    let text = metrics(&s);
    assert!(
        metric(
            &text,
            r#"mesh_dataset_refresh_total{dataset="items",result="ok"}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"mesh_dataset_rows{dataset="items"}"#),
        Some(20.0)
    );
    assert_eq!(
        metric(&text, r#"mesh_dataset_stale{dataset="items"}"#),
        Some(0.0)
    );
    s.assert_no_panic();
    snowflake_exec(&[&format!("DROP TABLE {table}")]);
}

/// 50 concurrent lookups of one key on a cached live dataset send one query
/// to Snowflake, as the runtime's query counters (`/metrics`, `/readyz`) show.
#[test]
fn concurrent_cached_live_lookups_of_one_key_make_one_query() {
    let table = items_table("sf_coalesce", 10);
    let service = json!({
        "service": SERVICE,
        "connections": {"warehouse": connection(fakesnow(), 5000)},
        "datasets": {"items": {"source": {"sql": {"connection": "warehouse",
            "query": format!("select * from {table}")}},
            "key": "id", "mode": "live", "cache": {"ttl_ms": 600000, "max_entries": 100}}},
        "endpoints": {"items": {"kind": "lookup", "datasets": ["items"]}}
    });
    let (_b, s) = start(&service);
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
                    &format!("/public/api/v1/{SERVICE}/items/lookup"),
                    &[("Content-Type", "application/json")],
                    key(7).as_bytes(),
                )
            })
        })
        .collect();
    for t in threads {
        let r = t.join().expect("thread");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["data"]["label"], "item-7");
    }
    let text = metrics(&s);
    let sample = |result: &str| {
        metric(
            &text,
            &format!(r#"mesh_dataset_queries_total{{dataset="items",result="{result}"}}"#),
        )
    };
    assert_eq!(
        (sample("ok"), sample("error")),
        (Some(1.0), Some(0.0)),
        "50 concurrent lookups of one key: queries that reached Snowflake\n{text}"
    );
    let cache = |result: &str| {
        metric(
            &text,
            &format!(r#"mesh_dataset_cache_total{{dataset="items",result="{result}"}}"#),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(cache("hit") + cache("miss"), 50.0, "{text}");
    let ready = readyz(&s);
    assert_eq!(
        ready["datasets"]["items"]["queries_total"],
        json!({"ok": 1, "error": 0}),
        "{ready}"
    );
    // A key not asked before is one more query.
    assert_eq!(lookup_within(&s, "items", &key(3), LIMIT).status, 200);
    assert_eq!(
        readyz(&s)["datasets"]["items"]["queries_total"]["ok"],
        2,
        "{}",
        metrics(&s)
    );
    s.assert_no_panic();
    snowflake_exec(&[&format!("DROP TABLE {table}")]);
}

/// Through a proxy that is cut and restored: the preload keeps serving its
/// last snapshot and turns stale after `max_staleness_secs`; a live cache hit
/// answers; a live miss gets a 503 JSON answer (refused connections, and a
/// black hole within the statement timeout); everything recovers by itself.
#[test]
fn snowflake_down_then_back() {
    let table = items_table("sf_down", 100);
    let proxy = Proxy::start(fakesnow());
    let service = outage::service(
        connection(proxy.addr, 1000),
        &format!("select * from {table}"),
    );
    let (_b, s) = start(&service);
    outage::down_then_back(&s, &proxy, Some(PASSWORD), || {
        snowflake_exec(&[&format!("UPDATE {table} SET label = 'new-' || id")])
    });
    // The same per-dataset shape as PostgreSQL's (data_products.rs).
    let ready = readyz(&s);
    let keys = |name: &str| -> Vec<String> {
        let mut k: Vec<String> = ready["datasets"][name]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    };
    assert_eq!(
        keys("cached"),
        ["cache", "mode", "queries_total", "source", "stale"],
        "{ready}"
    );
    assert_eq!(
        keys("pre"),
        [
            "age_seconds",
            "last_refresh",
            "max_staleness_secs",
            "mode",
            "refresh_secs",
            "refresh_total",
            "rows",
            "source",
            "stale"
        ],
        "{ready}"
    );
    s.assert_no_panic();
    assert!(
        !s.log().contains(PASSWORD),
        "the password leaked into the log"
    );
    snowflake_exec(&[&format!("DROP TABLE {table}")]);
}
