//! A warehouse that goes away and comes back, the same story for every
//! warehouse (PostgreSQL in data_products.rs, Snowflake in data_snowflake.rs):
//! what each dataset mode answers meanwhile, and that all of it recovers
//! without a restart.

use std::time::Duration;

use serde_json::{Value, json};

use super::proxy::{HANG, PASS, Proxy, REFUSE};
use super::{SERVICE, Server, lookup_within, metric, metrics, readyz, wait_until};

/// How long one lookup may take before the test calls it a hang.
pub const LIMIT: Duration = Duration::from_secs(15);

/// The lookup body for item `id`.
pub fn key(id: u32) -> String {
    format!(r#"{{"data": {{"id": {id}}}}}"#)
}

/// A service with three lookup endpoints over `query` (rows `{id, label:
/// "item-<id>"}`) on `connection`, one per dataset mode: `pre` (preloaded,
/// refreshed every second, stale after 2 s), `cached` (live, cached) and
/// `plain` (live).
pub fn service(connection: Value, query: &str) -> Value {
    json!({
        "service": SERVICE,
        "connections": {"warehouse": connection},
        "datasets": {
            "pre": {"source": {"sql": {"connection": "warehouse", "query": query}}, "key": "id",
                "mode": "preload", "refresh_secs": 1, "max_staleness_secs": 2},
            "cached": {"source": {"sql": {"connection": "warehouse", "query": query}}, "key": "id",
                "mode": "live", "cache": {"ttl_ms": 600000, "max_entries": 1000}},
            "plain": {"source": {"sql": {"connection": "warehouse", "query": query}}, "key": "id",
                "mode": "live"}
        },
        "endpoints": {
            "pre": {"kind": "lookup", "datasets": ["pre"]},
            "cached": {"kind": "lookup", "datasets": ["cached"]},
            "plain": {"kind": "lookup", "datasets": ["plain"]}
        }
    })
}

/// Runs the outage against `s` (serving [`service`] through `proxy`):
/// refused connections, then a black hole, then the warehouse back, where
/// `relabel` sets every row's label to `new-<id>`. `secret` (the connection's
/// password, when it is not a word the answers may hold for another reason)
/// appears in no answer.
pub fn down_then_back(s: &Server, proxy: &Proxy, secret: Option<&str>, relabel: impl FnOnce()) {
    let leaks = |text: &str| secret.is_some_and(|secret| text.contains(secret));
    // Warm the cache with key 1 (a miss, then a hit).
    for _ in 0..2 {
        let r = lookup_within(s, "cached", &key(1), LIMIT);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let text = metrics(s);
    for (result, n) in [("miss", 1.0), ("hit", 1.0)] {
        let sample = format!(r#"mesh_dataset_cache_total{{dataset="cached",result="{result}"}}"#);
        assert_eq!(metric(&text, &sample), Some(n), "{text}");
    }

    // The warehouse goes away.
    proxy.set(REFUSE);
    let r = lookup_within(s, "pre", &key(5), LIMIT);
    assert_eq!(
        r.status,
        200,
        "preload serves its last snapshot: {}",
        r.text()
    );
    assert_eq!(r.json()["data"]["label"], "item-5");
    let r = lookup_within(s, "cached", &key(1), LIMIT);
    assert_eq!(r.status, 200, "a cache hit answers: {}", r.text());
    let msg = lookup_within(s, "cached", &key(2), LIMIT).assert_error(503, "dataset_unavailable");
    assert!(msg.contains("`cached`"), "{msg}");
    let msg = lookup_within(s, "plain", &key(1), LIMIT).assert_error(503, "dataset_unavailable");
    assert!(!leaks(&msg), "{msg}");
    let text = metrics(s);
    assert_eq!(
        metric(
            &text,
            r#"mesh_dataset_cache_total{dataset="cached",result="hit"}"#
        ),
        Some(2.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            r#"mesh_dataset_queries_total{dataset="plain",result="error"}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );

    // Refreshes fail; after max_staleness the preload is reported stale (and still served).
    wait_until(s, "pre is stale", Duration::from_secs(60), || {
        let ready = readyz(s);
        let ds = &ready["datasets"]["pre"];
        if ds["stale"] == true && ds["last_refresh"]["result"] == "error" {
            Ok(())
        } else {
            Err(ready.to_string())
        }
    });
    let ready = readyz(s);
    assert_eq!(ready["status"], "ready", "{ready}");
    let error = ready["datasets"]["pre"]["last_refresh"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(!error.is_empty() && !leaks(error), "{ready}");
    let text = metrics(s);
    assert_eq!(
        metric(&text, r#"mesh_dataset_stale{dataset="pre"}"#),
        Some(1.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            r#"mesh_dataset_refresh_total{dataset="pre",result="error"}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    assert!(
        metric(&text, r#"mesh_dataset_age_seconds{dataset="pre"}"#).unwrap_or(0.0) >= 2.0,
        "{text}"
    );
    assert_eq!(lookup_within(s, "pre", &key(5), LIMIT).status, 200);

    // A black hole: connections open but nothing comes back. A miss still
    // answers 503, bounded by the statement timeout.
    proxy.set(PASS);
    wait_until(s, "plain recovers", Duration::from_secs(60), || {
        let r = lookup_within(s, "plain", &key(3), LIMIT);
        if r.status == 200 {
            Ok(())
        } else {
            Err(r.text())
        }
    });
    proxy.set(HANG);
    let msg = lookup_within(s, "plain", &key(4), LIMIT).assert_error(503, "dataset_unavailable");
    assert!(msg.contains("did not answer within"), "{msg}");

    // Back: everything recovers without a restart.
    proxy.set(PASS);
    wait_until(s, "live recovers", Duration::from_secs(60), || {
        let r = lookup_within(s, "plain", &key(7), LIMIT);
        let c = lookup_within(s, "cached", &key(8), LIMIT);
        if r.status == 200 && c.status == 200 {
            Ok(())
        } else {
            Err(format!("{} / {}", r.text(), c.text()))
        }
    });
    relabel();
    wait_until(s, "preload fresh again", Duration::from_secs(60), || {
        let ready = readyz(s);
        let r = lookup_within(s, "pre", &key(5), LIMIT);
        if ready["datasets"]["pre"]["stale"] == false && r.json()["data"]["label"] == "new-5" {
            Ok(())
        } else {
            Err(format!("{ready} {}", r.text()))
        }
    });
}
