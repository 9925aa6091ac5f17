//! The query log over the real runtime: a 10,000-request run of
//! predictions (with generations and a shadow), lookups and multi-endpoint
//! lookups (`lookup-endpoints`, a line per key per endpoint), then a graceful
//! stop; every line is JSON, every query is in it or counted as dropped,
//! every request id is there, redacted values appear nowhere, and
//! authentication failures are logged without the key presented.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{
    BundleDir, Req, SERVICE, Server, bundle_with_operator_verifier, local_service, metric, metrics,
    read_csv, send_all,
};
use serde_json::{Value, json};

const OPERATOR_KEY: &str = "operator-key-7c2e91";
const BATCH_KEY: &str = "batch-key-40aa3f";
const BAD_KEY: &str = "not-a-key-9b8d77";
const REDACTED: [&str; 2] = ["region", "total_spend_30d"];

/// The example service with generations on `high-value` (a shadow too),
/// keys (the operator allowed, `batch` known and refused) and a query log.
fn logged_bundle(sample: f64) -> BundleDir {
    let mut service = local_service();
    let ep = &mut service["endpoints"]["high-value"];
    ep.as_object_mut().expect("endpoint").remove("model");
    ep["generations"] = json!([
        {"name": "v1", "model": "models/high_value.onnx", "weight": 60},
        {"name": "v2", "model": "models/high_value_gbt.onnx", "weight": 40},
        {"name": "gbt-shadow", "model": "models/high_value_gbt.onnx", "shadow": true}
    ]);
    ep["dispatch"] = json!({"key": "customer_id"});
    // What `lookup-endpoints` asks for, one dataset each.
    service["endpoints"]["demographics"] = json!({"kind": "lookup", "datasets": ["customers"]});
    service["endpoints"]["behavior"] = json!({"kind": "lookup", "datasets": ["behavior"]});
    service["api_keys"] = json!([{"caller": "operator", "verifier": {"file": "secrets/operator"}}]);
    service["known_callers"] = json!([{"caller": "batch", "verifier": {"file": "secrets/batch"}}]);
    service["query_log"] = json!({"path": "query.log", "sample": sample, "redact": REDACTED});
    let b = bundle_with_operator_verifier(&service, OPERATOR_KEY);
    std::fs::write(
        b.path().join("secrets/batch"),
        mesh_runtime::auth::verifier("batch", BATCH_KEY),
    )
    .expect("write verifier");
    std::fs::copy(
        common::example_dir().join("high_value_gbt.onnx"),
        b.path().join("models/high_value_gbt.onnx"),
    )
    .expect("copy model");
    b
}

fn customer(i: usize) -> String {
    format!("C{:05}", i % 10_000 + 1)
}

fn stop(mut s: Server) {
    s.signal("TERM");
    assert!(
        s.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        s.log()
    );
}

#[test]
fn every_query_is_logged_or_counted_redacted_and_without_keys() {
    let b = logged_bundle(1.0);
    let s = Server::start_ready(b.path(), &[]);
    let n = 10_000;
    let auth = (
        "Authorization".to_string(),
        format!("Bearer {OPERATOR_KEY}"),
    );
    let requests: Vec<Req> = (0..n)
        .map(|i| {
            let mut headers = vec![auth.clone()];
            if i % 3 == 0 {
                headers.push(("X-Request-Id".into(), format!("req-{i}")));
            }
            let c = customer(i * 7);
            if i % 10 == 9 {
                let path = format!("/public/api/v1/{SERVICE}/lookup-endpoints");
                (
                    path,
                    headers,
                    format!(
                        "{{\"endpoints\": [\"demographics\", \"behavior\"], \"items\": [{{\"data\": {{\"customer_id\": \"{c}\"}}}}]}}"
                    ),
                )
            } else if i % 10 < 7 {
                let path = format!("/public/api/v1/{SERVICE}/high-value/predict");
                (
                    path,
                    headers,
                    format!("{{\"features\": {{\"customer_id\": \"{c}\"}}}}"),
                )
            } else {
                let path = format!("/public/api/v1/{SERVICE}/customer/lookup");
                (
                    path,
                    headers,
                    format!("{{\"data\": {{\"customer_id\": \"{c}\"}}}}"),
                )
            }
        })
        .collect();
    let answers = send_all(s.addr, requests, 8);
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{}", String::from_utf8_lossy(body));
    }
    // Refused: a key nobody holds (401), a known caller not allowed (403).
    let path = format!("/public/api/v1/{SERVICE}/customer/lookup");
    let body = br#"{"data": {"customer_id": "C00001"}}"#;
    for (key, status) in [(BAD_KEY, 401), (BATCH_KEY, 403)] {
        let r = common::request(
            s.addr,
            "POST",
            &path,
            &[("Content-Type", "application/json"), ("X-API-Key", key)],
            body,
        );
        assert_eq!(r.status, status, "{}", r.text());
    }
    // The shadow scores off the request path, once the machine has idle time.
    let compared = "mesh_shadow_compared_total{endpoint=\"high-value\",generation=\"gbt-shadow\"}";
    common::wait_until(
        &s,
        "a shadow copy compared",
        Duration::from_secs(30),
        || match metric(&metrics(&s), compared) {
            Some(n) if n > 0.0 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let text = metrics(&s);
    let dropped = metric(&text, "mesh_query_log_dropped_total").expect("dropped counter");
    stop(s);

    let log = std::fs::read_to_string(b.path().join("query.log")).expect("query log");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let queries: Vec<&Value> = lines.iter().filter(|l| l["event"] == "query").collect();
    // A `lookup-endpoints` request is a line per endpoint (two).
    let multi = (0..n).filter(|i| i % 10 == 9).count();
    assert_eq!(
        queries.len() as f64 + dropped,
        (n + multi) as f64,
        "queries logged + dropped"
    );
    if dropped == 0.0 {
        let ids: HashSet<&str> = queries
            .iter()
            .filter_map(|l| l["request_id"].as_str())
            .collect();
        for i in (0..n).step_by(3) {
            assert!(ids.contains(format!("req-{i}").as_str()), "req-{i} missing");
        }
        // Every multi-endpoint lookup: a line for each endpoint, its key.
        for i in (0..n).filter(|i| i % 30 == 9) {
            let id = format!("req-{i}");
            let mut endpoints: Vec<&str> = queries
                .iter()
                .filter(|q| q["request_id"] == id.as_str())
                .map(|q| {
                    assert_eq!(q["key"], customer(i * 7).as_str(), "{q}");
                    q["endpoint"].as_str().unwrap_or("")
                })
                .collect();
            endpoints.sort_unstable();
            assert_eq!(endpoints, ["behavior", "demographics"], "{id}");
        }
    }
    for q in &queries {
        assert_eq!(q["status"], 200, "{q}");
        assert_eq!(q["caller"], "operator", "{q}");
        assert!(q["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{q}");
        assert!(q["latency_ms"].is_number(), "{q}");
        match q["kind"].as_str() {
            Some("predict") => {
                let g = q["generation"].as_str().expect("generation");
                assert!(g == "v1" || g == "v2", "{q}");
                assert!(q["key"].as_str().is_some_and(|k| k.starts_with('C')), "{q}");
                assert!(
                    q["prediction"].is_string() && q["probabilities"].is_object(),
                    "{q}"
                );
                for f in REDACTED {
                    assert_eq!(q["features"][f], "[redacted]", "{q}");
                }
                assert!(q["features"]["age"].is_number(), "{q}");
            }
            Some("lookup") => {
                assert!(q["key"].is_string(), "{q}");
                // `customer` has both redacted fields, `demographics` and
                // `behavior` one each.
                let fields: Vec<&str> = REDACTED
                    .into_iter()
                    .filter(|f| q["row"].get(f).is_some())
                    .collect();
                assert!(!fields.is_empty(), "{q}");
                for f in fields {
                    assert_eq!(q["row"][f], "[redacted]", "{q}");
                }
            }
            other => panic!("kind {other:?}: {q}"),
        }
    }
    // Shadow lines: the shadow's answer, compared.
    let shadows: Vec<&Value> = lines.iter().filter(|l| l["event"] == "shadow").collect();
    assert!(!shadows.is_empty(), "no shadow line");
    for l in &shadows {
        assert_eq!(l["generation"], "gbt-shadow");
        assert!(
            l["agrees"].is_boolean() && l["prediction"].is_string(),
            "{l}"
        );
    }
    // No value of a redacted field, for the keys asked: a string value
    // nowhere in the file, a number never after its field's name.
    let asked: HashSet<String> = (0..n).map(|i| customer(i * 7)).collect();
    for (file, field) in [
        ("customers.csv", "region"),
        ("behavior.csv", "total_spend_30d"),
    ] {
        let (header, rows) = read_csv(file);
        let col = header.iter().position(|h| h == field).expect("column");
        let values: HashSet<&str> = rows
            .iter()
            .filter(|r| asked.contains(&r[0]))
            .map(|r| r[col].as_str())
            .collect();
        assert!(!values.is_empty());
        let numeric = values.iter().all(|v| v.parse::<f64>().is_ok());
        if numeric {
            let after = format!("\"{field}\":");
            for (at, _) in log.match_indices(&after) {
                let rest = &log[at + after.len()..];
                assert!(
                    rest.starts_with("\"[redacted]\""),
                    "{field} in the log: {}",
                    &rest[..20.min(rest.len())]
                );
            }
        } else {
            for value in values {
                assert!(
                    !log.contains(&format!("\"{value}\"")),
                    "{value} is in the query log"
                );
            }
        }
    }
    // Authentication failures: logged apart, never with the key.
    let failures: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "auth_failure")
        .collect();
    assert_eq!(failures.len(), 2, "{failures:?}");
    assert!(
        failures
            .iter()
            .any(|l| l["status"] == 401 && l.get("caller").is_none())
    );
    assert!(
        failures
            .iter()
            .any(|l| l["status"] == 403 && l["caller"] == "batch")
    );
    for l in &failures {
        assert_eq!(l["path"], path.as_str());
        assert!(l["reason"].is_string());
    }
    for key in [BAD_KEY, BATCH_KEY, OPERATOR_KEY] {
        assert!(!log.contains(key), "a key is in the query log");
        assert!(
            !log.contains(&key[..12]),
            "part of a key is in the query log"
        );
    }
}

#[test]
fn sample_zero_logs_no_query_but_every_auth_failure() {
    let b = logged_bundle(0.0);
    let s = Server::start_ready(b.path(), &[]);
    let auth = format!("Bearer {OPERATOR_KEY}");
    for i in 0..50 {
        let r = common::request(
            s.addr,
            "POST",
            &format!("/public/api/v1/{SERVICE}/high-value/predict"),
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &auth),
            ],
            format!("{{\"features\": {{\"customer_id\": \"{}\"}}}}", customer(i)).as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = common::request(
        s.addr,
        "POST",
        &format!("/public/api/v1/{SERVICE}/high-value/predict"),
        &[("Content-Type", "application/json"), ("X-API-Key", BAD_KEY)],
        b"{}",
    );
    assert_eq!(r.status, 401);
    stop(s);
    let log = std::fs::read_to_string(b.path().join("query.log")).expect("query log");
    let events: Vec<String> = log
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("json");
            v["event"].as_str().unwrap_or("").to_string()
        })
        .collect();
    assert_eq!(events, vec!["auth_failure".to_string()], "{log}");
}
