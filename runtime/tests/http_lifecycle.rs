//! Start, readiness, `check`, and graceful shutdown of the real binary.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Writes a CSV of `rows` customers-like rows.
fn write_big_csv(path: &std::path::Path, rows: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    writeln!(f, "customer_id,age,gender,region,campaign,loyalty_member").expect("write");
    for i in 0..rows {
        writeln!(
            f,
            "B{i:08},{},{},north,none,{}",
            18 + i % 60,
            ["F", "M"][i % 2],
            i % 2
        )
        .expect("write");
    }
    f.flush().expect("flush");
}

#[test]
fn healthz_at_once_ready_only_after_loading() {
    let mut service = local_service();
    service["datasets"]["big"] =
        json!({"source": {"csv": "datasets/big.csv"}, "key": "customer_id"});
    service["endpoints"]["big"] = json!({"kind": "lookup", "datasets": ["big"]});
    let bundle = BundleDir::new(&service);
    write_big_csv(&bundle.path().join("datasets/big.csv"), 1_000_000);

    let s = Server::start(bundle.path(), &[]);
    // Liveness at once; readiness, models and the API not before loading.
    assert_eq!(s.get("/healthz").status, 200);
    assert_eq!(s.get("/v2/health/live").status, 200);
    s.get("/readyz").assert_error(503, "not_ready");
    assert_eq!(s.get("/v2/health/ready").status, 503);
    s.api(
        "high-value",
        "predict",
        r#"{"features": {"customer_id": "C00001"}}"#,
    )
    .assert_error(503, "not_ready");
    s.get("/openapi.json").assert_error(503, "not_ready");
    assert!(
        s.get("/metrics")
            .text()
            .contains("mesh_ready{service=\"customer-scoring\"} 0")
    );

    s.wait_ready();
    assert_eq!(s.get("/v2/health/ready").status, 200);
    let r = s.api("big", "lookup", r#"{"data": {"customer_id": "B00999999"}}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"]["age"], 18 + 999_999 % 60);
    let r = s.api(
        "high-value",
        "predict",
        r#"{"features": {"customer_id": "C00001"}}"#,
    );
    assert_eq!(r.status, 200);
    // One log line per phase, with timings.
    let log = s.log();
    for phase in [
        "bundle ",
        "listening on",
        "dataset `big`: 1000000 rows",
        "endpoint `high-value`",
        "ready in",
    ] {
        assert!(log.contains(phase), "no `{phase}` in log:\n{log}");
    }
}

#[test]
fn sigterm_finishes_in_flight_requests() {
    // An upstream that takes 1.5 s makes a request stay in flight.
    let answer = json!({"items": [{"data": {"behavior": {"customer_id": "C00001",
        "total_spend_30d": 0.0, "orders_90d": 1, "days_since_last_order": 13, "avg_basket": 18.12}}}]})
    .to_string();
    let (slow, upstream_calls) = fake_upstream_counted(
        Duration::from_millis(1500),
        200,
        Some(answer),
        Duration::from_secs(30),
    );
    let mut service = local_service();
    service["endpoints"]["slow"] = json!({
        "kind": "prediction", "model": "models/high_value.onnx",
        "enrichments": [
            {"dataset": "customers", "key": "customer_id", "columns": CUSTOMER_COLUMNS},
            {"lookup": {"url": format!("http://{slow}/public/api/v1/f/behavior/lookup")},
             "key": "customer_id", "columns": BEHAVIOR_COLUMNS}
        ]
    });
    let bundle = BundleDir::new(&service);
    let mut s = Server::start_ready(bundle.path(), &[]);
    let addr = s.addr;
    let in_flight = std::thread::spawn(move || {
        request(
            addr,
            "POST",
            "/public/api/v1/customer-scoring/slow/predict",
            &[("Content-Type", "application/json")],
            br#"{"features": {"customer_id": "C00001"}}"#,
        )
    });
    // Signal once the request is in flight (waiting on the upstream).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while upstream_calls.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "request never reached the upstream"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    s.signal("TERM");
    let r = in_flight.join().expect("request thread");
    assert_eq!(r.status, 200, "{}", r.text());
    let explicit = s_free_predict(&bundle);
    assert_eq!(probas_bits(&r.json()), explicit);
    let status = s.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        s.log()
    );
    let log = s.log();
    assert!(log.contains("SIGTERM") && log.contains("stopped"), "{log}");
    // New connections are refused once stopped.
    assert!(try_request(addr, "GET", "/healthz", &[], b"").is_err());
}

/// Probabilities of customer C00001 from a fresh server, all features sent.
fn s_free_predict(bundle: &BundleDir) -> Vec<(String, u32)> {
    let s = Server::start_ready(bundle.path(), &[]);
    let r = s.api(
        "high-value-plain",
        "predict",
        &format!(r#"{{"features": {}}}"#, explicit_features(0)),
    );
    probas_bits(&r.json())
}

#[test]
fn sigint_while_idle_exits_cleanly() {
    let bundle = BundleDir::new(&local_service());
    let mut s = Server::start_ready(bundle.path(), &[]);
    s.signal("INT");
    let status = s.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
}

fn check(bundle: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-runtime"))
        .args(["check", "--bundle"])
        .arg(bundle)
        .output()
        .expect("run check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_good_bundles_and_explains_bad_ones() {
    let bundle = BundleDir::new(&local_service());
    let (ok, out, err) = check(bundle.path());
    assert!(ok, "{err}");
    assert!(out.contains("ok: service `customer-scoring`"), "{out}");

    // Unknown field.
    let mut bad = local_service();
    bad["datasets"]["customers"]["keys"] = json!("x");
    bundle.write_service(&bad);
    let (ok, _, err) = check(bundle.path());
    assert!(!ok);
    assert!(err.contains("unknown field `keys`"), "{err}");

    // Dangling references, all reported.
    let mut bad = local_service();
    bad["endpoints"]["customer"]["datasets"] = json!(["nope"]);
    bad["endpoints"]["high-value"]["enrichments"][0]["dataset"] = json!("gone");
    bundle.write_service(&bad);
    let (ok, _, err) = check(bundle.path());
    assert!(!ok);
    assert!(
        err.contains("unknown dataset `nope`") && err.contains("unknown dataset `gone`"),
        "{err}"
    );

    // Enrichment column that is not a model input.
    let mut bad = local_service();
    bad["endpoints"]["high-value"]["enrichments"][0]["columns"] = json!(["age", "customer_id"]);
    bundle.write_service(&bad);
    let (ok, _, err) = check(bundle.path());
    assert!(!ok);
    assert!(err.contains("`customer_id` is not a model input"), "{err}");

    // Missing model file.
    let mut bad = local_service();
    bad["endpoints"]["high-value"]["model"] = json!("models/missing.onnx");
    bundle.write_service(&bad);
    let (ok, _, err) = check(bundle.path());
    assert!(!ok);
    assert!(err.contains("missing.onnx"), "{err}");

    // Duplicate keys.
    std::fs::write(
        bundle.path().join("datasets/customers.csv"),
        "customer_id,age,gender,region,campaign,loyalty_member\nC1,30,F,north,none,0\nC1,31,F,north,none,0\n",
    )
    .expect("write");
    bundle.write_service(&local_service());
    let (ok, _, err) = check(bundle.path());
    assert!(!ok);
    assert!(
        err.contains("line 3") && err.contains("duplicate key \"C1\""),
        "{err}"
    );

    // Not JSON at all.
    std::fs::write(bundle.path().join("service.json"), "service = 1").expect("write");
    let (ok, _, err) = check(bundle.path());
    assert!(!ok);
    assert!(err.contains("service.json"), "{err}");
}
