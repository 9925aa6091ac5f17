//! The access log: with `access_log` on, one JSON line per request on stderr
//! (status, latency, size, the caller's identity, the request id), never a
//! key; off by default.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const OPERATOR_KEY: &str = "operator-key-5d1f0a";
const OPERATOR_BEARER: &str = "Bearer operator-key-5d1f0a";
const PLAIN_KEY: &str = "plain-key-77c2e9";
const PREDICT: &str = "/public/api/v1/customer-scoring/high-value/predict";

/// The JSON lines of a runtime's stderr (its other lines start with a time).
fn access_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A bundle whose service accepts the `operator` (by its verifier) and a plain key.
fn keyed_bundle(access_log: Option<bool>) -> BundleDir {
    let mut service = local_service();
    service["api_keys"] = json!([
        {"caller": "operator", "verifier": {"file": "secrets/operator"}},
        {"env": "MESH_TEST_PLAIN_KEY"}
    ]);
    if let Some(on) = access_log {
        service["access_log"] = json!(on);
    }
    bundle_with_operator_verifier(&service, OPERATOR_KEY)
}

/// A request the test sends and what its line must say.
struct Sent {
    headers: Vec<(&'static str, &'static str)>,
    method: &'static str,
    path: &'static str,
    status: u16,
    caller: Option<&'static str>,
}

#[test]
fn one_json_line_per_request_with_status_caller_and_no_key() {
    let bundle = keyed_bundle(Some(true));
    let s = Server::start_ready(bundle.path(), &[("MESH_TEST_PLAIN_KEY", PLAIN_KEY)]);
    let body = br#"{"features": {"customer_id": "C00001"}}"#;
    let ct = ("Content-Type", "application/json");
    let post = |headers: Vec<(&'static str, &'static str)>, status, caller| Sent {
        headers,
        method: "POST",
        path: PREDICT,
        status,
        caller,
    };
    let get = |path, status| Sent {
        headers: Vec::new(),
        method: "GET",
        path,
        status,
        caller: None,
    };
    let sent = [
        post(
            vec![ct, ("X-API-Key", OPERATOR_KEY), ("X-Request-Id", "req-1")],
            200,
            Some("operator"),
        ),
        post(
            vec![ct, ("Authorization", OPERATOR_BEARER)],
            200,
            Some("operator"),
        ),
        post(vec![ct, ("X-API-Key", PLAIN_KEY)], 200, None),
        post(vec![ct], 401, None),
        post(vec![ct, ("X-API-Key", "not-a-key")], 401, None),
        get("/healthz", 200),
        get("/no/such/route", 404),
    ];
    for r in &sent {
        let body: &[u8] = if r.method == "POST" { body } else { b"" };
        let answer = request(s.addr, r.method, r.path, &r.headers, body);
        assert_eq!(
            answer.status,
            r.status,
            "{} {}: {}",
            r.method,
            r.path,
            answer.text()
        );
    }
    let n = sent.len();
    let mut lines = Vec::new();
    wait_until(&s, "the access log lines", Duration::from_secs(10), || {
        // Without the readiness polls of `start_ready`.
        lines = access_lines(&s.log())
            .into_iter()
            .filter(|l| l["path"] != "/readyz")
            .collect();
        if lines.len() >= n {
            Ok(())
        } else {
            Err(format!("{} of {n} lines", lines.len()))
        }
    });
    assert_eq!(lines.len(), n, "{lines:#?}");
    for (line, r) in lines.iter().zip(&sent) {
        assert_eq!(line["method"], r.method, "{line}");
        assert_eq!(line["path"], r.path, "{line}");
        assert_eq!(line["status"], r.status, "{line}");
        assert_eq!(line["caller"].as_str(), r.caller, "{line}");
        assert!(
            line["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
            "{line}"
        );
        assert!(line["bytes"].as_u64().is_some_and(|b| b > 0), "{line}");
        let time = line["time"].as_str().expect("time");
        assert!(
            time.len() == 24 && time.ends_with('Z') && &time[10..11] == "T",
            "{time}"
        );
    }
    assert_eq!(lines[0]["request_id"], "req-1");
    assert!(lines[1].get("request_id").is_none(), "{}", lines[1]);
    let log = s.log();
    for key in [OPERATOR_KEY, PLAIN_KEY, "not-a-key"] {
        assert!(!log.contains(key), "a key in stderr:\n{log}");
    }
    let text = metrics(&s);
    assert_eq!(
        metric(&text, "mesh_access_log_dropped_total"),
        Some(0.0),
        "{text}"
    );
    s.assert_no_panic();
}

#[test]
fn no_access_log_unless_asked() {
    for access_log in [None, Some(false)] {
        let bundle = keyed_bundle(access_log);
        let s = Server::start_ready(bundle.path(), &[("MESH_TEST_PLAIN_KEY", PLAIN_KEY)]);
        for _ in 0..3 {
            let r = request(
                s.addr,
                "POST",
                PREDICT,
                &[
                    ("Content-Type", "application/json"),
                    ("X-API-Key", OPERATOR_KEY),
                ],
                br#"{"features": {"customer_id": "C00001"}}"#,
            );
            assert_eq!(r.status, 200, "{}", r.text());
        }
        // A line would be written within milliseconds; the last request's is
        // followed by the /metrics answer, so give the writer a moment.
        std::thread::sleep(Duration::from_millis(300));
        let log = s.log();
        assert!(access_lines(&log).is_empty(), "{access_log:?}:\n{log}");
        assert_eq!(
            metric(&metrics(&s), "mesh_access_log_dropped_total"),
            None,
            "{access_log:?}"
        );
    }
}
