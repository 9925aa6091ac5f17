//! Enrichment from another mesh service: a `customer-features` runtime serves
//! behaviour lookups, a `customer-scoring` runtime enriches from it over HTTP.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const FEATURES_KEY: &str = "features-key-789";

fn features_bundle() -> BundleDir {
    BundleDir::new(&json!({
        "service": "customer-features",
        "api_keys": [{"env": "MESH_API_KEY_FEATURES"}],
        "datasets": {
            "behavior": {"source": {"csv": "datasets/behavior.csv"}, "key": "customer_id"}
        },
        "endpoints": {"behavior": {"kind": "lookup", "datasets": ["behavior"]}}
    }))
}

fn scoring_service(upstream: SocketAddr, timeout_ms: u64, on_missing: &str) -> Value {
    json!({
        "service": SERVICE,
        "datasets": {
            "customers": {"source": {"csv": "datasets/customers.csv"}, "key": "customer_id"}
        },
        "endpoints": {
            "high-value": {
                "kind": "prediction", "model": "models/high_value.onnx",
                "enrichments": [
                    {"dataset": "customers", "key": "customer_id", "columns": CUSTOMER_COLUMNS},
                    {"lookup": {
                        "url": format!("http://{upstream}/public/api/v1/customer-features/behavior/lookup"),
                        "api_key": {"env": "MESH_FEATURES_KEY"},
                        "timeout_ms": timeout_ms
                     },
                     "key": "customer_id", "columns": BEHAVIOR_COLUMNS, "on_missing": on_missing}
                ]
            },
            "high-value-plain": {"kind": "prediction", "model": "models/high_value.onnx"}
        }
    })
}

#[test]
fn scoring_enriches_from_the_features_service() {
    let fb = features_bundle();
    let features = Server::start_ready(fb.path(), &[("MESH_API_KEY_FEATURES", FEATURES_KEY)]);
    let sb = BundleDir::new(&scoring_service(features.addr, 2000, "error"));
    let scoring = Server::start_ready(sb.path(), &[("MESH_FEATURES_KEY", FEATURES_KEY)]);

    for i in [0usize, 1, 500, 9999] {
        let (_, rows) = read_csv("customers.csv");
        let id = &rows[i][0];
        let remote = scoring.api(
            "high-value",
            "predict",
            &format!(r#"{{"features": {{"customer_id": "{id}"}}}}"#),
        );
        assert_eq!(remote.status, 200, "{}", remote.text());
        let remote = remote.json();
        let explicit = scoring
            .api(
                "high-value-plain",
                "predict",
                &format!(r#"{{"features": {}}}"#, explicit_features(i)),
            )
            .json();
        assert_eq!(
            probas_bits(&remote),
            probas_bits(&explicit),
            "customer {id}"
        );
        assert_eq!(
            remote["result"]["enriched"].as_array().map(Vec::len),
            Some(9)
        );
    }

    // A batch goes upstream as one lookup-endpoints call; unknown keys are per item.
    let r = scoring.api(
        "high-value",
        "predict-multi",
        r#"{"items": [{"features": {"customer_id": "C00001"}}, {"features": {"customer_id": "C00002", "age": 20}},
                      {"features": {"customer_id": "C00003", "total_spend_30d": 1, "orders_90d": 1, "days_since_last_order": 1, "avg_basket": 1}}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let items = r.json()["items"].as_array().expect("items").clone();
    assert!(items.iter().all(|i| i.get("result").is_some()), "{items:?}");
    assert_eq!(
        items[2]["result"]["enriched"].as_array().map(Vec::len),
        Some(5)
    );

    // The upstream counted our calls.
    let metrics = features.get("/metrics").text();
    assert!(
        metrics.contains(
            r#"mesh_requests_total{endpoint="_service",route="lookup-endpoints",code="200"}"#
        ),
        "{metrics}"
    );
    features.assert_no_panic();
    scoring.assert_no_panic();
}

#[test]
fn key_unknown_upstream_is_404_or_nulls() {
    let fb = features_bundle();
    let features = Server::start_ready(fb.path(), &[("MESH_API_KEY_FEATURES", FEATURES_KEY)]);
    // Customer C10001 is in no dataset: give customers a row the features
    // service lacks by sending the customer features explicitly.
    let body = r#"{"features": {"customer_id": "C77777", "age": 30, "gender": "F", "region": "west", "campaign": "none", "loyalty_member": 0}}"#;

    let sb = BundleDir::new(&scoring_service(features.addr, 2000, "error"));
    let scoring = Server::start_ready(sb.path(), &[("MESH_FEATURES_KEY", FEATURES_KEY)]);
    let msg = scoring
        .api("high-value", "predict", body)
        .assert_error(404, "not_found");
    assert!(
        msg.contains("C77777") && msg.contains("lookup service"),
        "{msg}"
    );
    drop(scoring);

    // on_missing = null: the logistic model cannot score missing values: 422.
    let sb = BundleDir::new(&scoring_service(features.addr, 2000, "null"));
    let scoring = Server::start_ready(sb.path(), &[("MESH_FEATURES_KEY", FEATURES_KEY)]);
    let msg = scoring
        .api("high-value", "predict", body)
        .assert_error(422, "undefined_prediction");
    assert!(msg.contains("total_spend_30d"), "{msg}");
}

#[test]
fn failing_upstreams_are_502_and_504() {
    let body = r#"{"features": {"customer_id": "C00001"}}"#;

    // Nothing listening.
    let sb = BundleDir::new(&scoring_service(closed_port(), 2000, "error"));
    let s = Server::start_ready(sb.path(), &[("MESH_FEATURES_KEY", "k")]);
    let msg = s
        .api("high-value", "predict", body)
        .assert_error(502, "upstream_error");
    assert!(msg.contains("unreachable"), "{msg}");
    assert!(!msg.contains("Bearer"), "{msg}");
    drop(s);

    // Never answers: timeout.
    let silent = fake_upstream(Duration::ZERO, 200, None, Duration::from_secs(20));
    let sb = BundleDir::new(&scoring_service(silent, 300, "error"));
    let s = Server::start_ready(sb.path(), &[("MESH_FEATURES_KEY", "k")]);
    let started = std::time::Instant::now();
    s.api("high-value", "predict", body)
        .assert_error(504, "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(s);

    // Answers garbage.
    let garbage = fake_upstream(
        Duration::ZERO,
        200,
        Some("<html>".into()),
        Duration::from_secs(20),
    );
    let sb = BundleDir::new(&scoring_service(garbage, 2000, "error"));
    let s = Server::start_ready(sb.path(), &[("MESH_FEATURES_KEY", "k")]);
    s.api("high-value", "predict", body)
        .assert_error(502, "upstream_error");
    drop(s);

    // Wrong key: the upstream says 403, we say 502 naming it.
    let fb = features_bundle();
    let features = Server::start_ready(fb.path(), &[("MESH_API_KEY_FEATURES", FEATURES_KEY)]);
    let sb = BundleDir::new(&scoring_service(features.addr, 2000, "error"));
    let s = Server::start_ready(sb.path(), &[("MESH_FEATURES_KEY", "wrong")]);
    let msg = s
        .api("high-value", "predict", body)
        .assert_error(502, "upstream_error");
    assert!(msg.contains("403"), "{msg}");
    assert!(!msg.contains("wrong"), "{msg}");
    // Explicit features need no upstream at all.
    let r = s.api(
        "high-value",
        "predict",
        &format!(r#"{{"features": {}}}"#, explicit_features(0)),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    s.assert_no_panic();
}
