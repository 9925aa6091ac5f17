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

    // Wrong key: the upstream says 401, we say 502 naming it.
    let fb = features_bundle();
    let features = Server::start_ready(fb.path(), &[("MESH_API_KEY_FEATURES", FEATURES_KEY)]);
    let sb = BundleDir::new(&scoring_service(features.addr, 2000, "error"));
    let s = Server::start_ready(sb.path(), &[("MESH_FEATURES_KEY", "wrong")]);
    let msg = s
        .api("high-value", "predict", body)
        .assert_error(502, "upstream_error");
    assert!(msg.contains("401"), "{msg}");
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

#[test]
fn the_request_timeout_bounds_a_request_whose_upstream_hangs() {
    // The upstream never answers and the enrichment would wait a minute for
    // it: the service's request timeout (300 ms) answers first.
    let silent = fake_upstream(Duration::ZERO, 200, None, Duration::from_secs(60));
    let mut service = scoring_service(silent, 60_000, "error");
    service["limits"] = json!({"request_timeout_ms": 300});
    let sb = BundleDir::new(&service);
    let s = Server::start_ready(sb.path(), &[("MESH_FEATURES_KEY", "k")]);
    let body = r#"{"features": {"customer_id": "C00001"}}"#;
    let msg = s
        .api("high-value", "predict", body)
        .assert_error(504, "request_timeout");
    assert!(msg.contains("300 ms"), "{msg}");
    // A request that needs no upstream is not affected, and the server goes on.
    let r = s.api(
        "high-value",
        "predict",
        &format!(r#"{{"features": {}}}"#, explicit_features(0)),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    s.api("high-value", "predict", body)
        .assert_error(504, "request_timeout");
    // Counted: as 504s of the route, and as timeouts.
    let text = metrics(&s);
    assert_eq!(
        metric(
            &text,
            "mesh_requests_total{endpoint=\"high-value\",route=\"predict\",code=\"504\"}"
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "mesh_request_timeouts_total"),
        Some(2.0),
        "{text}"
    );
    s.assert_no_panic();
}

/// A features service with two lookup endpoints (`demographics`,
/// `behavior`), as in the example stack.
fn two_endpoint_features() -> BundleDir {
    BundleDir::new(&json!({
        "service": "customer-features",
        "api_keys": [{"env": "MESH_API_KEY_FEATURES"}],
        "datasets": {
            "customers": {"source": {"csv": "datasets/customers.csv"}, "key": "customer_id"},
            "behavior": {"source": {"csv": "datasets/behavior.csv"}, "key": "customer_id"}
        },
        "endpoints": {
            "demographics": {"kind": "lookup", "datasets": ["customers"]},
            "behavior": {"kind": "lookup", "datasets": ["behavior"]}
        }
    }))
}

/// A scoring service whose two enrichments both read `upstream`, with every
/// model input they have (no `columns`), each with `cache` when given.
fn scoring_by_id(upstream: SocketAddr, cache: Option<Value>) -> Value {
    let lookup = |endpoint: &str| {
        let mut en = json!({
            "lookup": {
                "url": format!("http://{upstream}/public/api/v1/customer-features/{endpoint}/lookup"),
                "api_key": {"env": "MESH_FEATURES_KEY"}
            },
            "key": "customer_id"
        });
        if let Some(cache) = &cache {
            en["cache"] = cache.clone();
        }
        en
    };
    json!({
        "service": SERVICE,
        "endpoints": {
            "high-value": {
                "kind": "prediction", "model": "models/high_value.onnx",
                "enrichments": [lookup("demographics"), lookup("behavior")]
            },
            "high-value-plain": {"kind": "prediction", "model": "models/high_value.onnx"}
        }
    })
}

const UPSTREAM_CALLS: &str =
    r#"mesh_requests_total{endpoint="_service",route="lookup-endpoints",code="200"}"#;

fn upstream_calls(features: &Server) -> f64 {
    metric(&metrics(features), UPSTREAM_CALLS).unwrap_or(0.0)
}

/// Predicts customer `i` by id and checks it bit for bit against the
/// prediction with every feature sent.
fn assert_by_id_equals_explicit(scoring: &Server, i: usize) {
    let (_, rows) = read_csv("customers.csv");
    let id = &rows[i][0];
    let by_id = scoring.api(
        "high-value",
        "predict",
        &format!(r#"{{"features": {{"customer_id": "{id}"}}}}"#),
    );
    assert_eq!(by_id.status, 200, "{}", by_id.text());
    let explicit = scoring.api(
        "high-value-plain",
        "predict",
        &format!(r#"{{"features": {}}}"#, explicit_features(i)),
    );
    assert_eq!(explicit.status, 200, "{}", explicit.text());
    assert_eq!(
        probas_bits(&by_id.json()),
        probas_bits(&explicit.json()),
        "customer {id}"
    );
    assert_eq!(
        by_id.json()["result"]["enriched"].as_array().map(Vec::len),
        Some(9)
    );
}

#[test]
fn two_enrichments_from_one_service_make_one_upstream_request() {
    let fb = two_endpoint_features();
    let features = Server::start_ready(fb.path(), &[("MESH_API_KEY_FEATURES", FEATURES_KEY)]);
    let sb = BundleDir::new(&scoring_by_id(features.addr, None));
    let scoring = Server::start_ready(sb.path(), &[("MESH_FEATURES_KEY", FEATURES_KEY)]);

    let customers = [0usize, 1, 500, 9999];
    for (n, &i) in customers.iter().enumerate() {
        assert_by_id_equals_explicit(&scoring, i);
        assert_eq!(upstream_calls(&features), (n + 1) as f64);
    }
    // No per-endpoint lookups at all.
    let text = metrics(&features);
    assert!(
        !text.contains(r#"route="lookup-multi",code="200""#),
        "{text}"
    );

    // A batch: one request for all its items and both enrichments.
    let r = scoring.api(
        "high-value",
        "predict-multi",
        r#"{"items": [{"features": {"customer_id": "C00001"}}, {"features": {"customer_id": "C00002", "age": 20}},
                      {"features": {"customer_id": "C00003", "total_spend_30d": 1}}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let items = r.json()["items"].as_array().expect("items").clone();
    assert!(items.iter().all(|i| i.get("result").is_some()), "{items:?}");
    assert_eq!(upstream_calls(&features), (customers.len() + 1) as f64);

    // The scoring service counts the requests it sent.
    let text = metrics(&scoring);
    let sent = format!(
        r#"mesh_upstream_requests_total{{endpoint="high-value",upstream="http://{}/public/api/v1/customer-features",result="ok"}}"#,
        features.addr
    );
    assert_eq!(
        metric(&text, &sent),
        Some((customers.len() + 1) as f64),
        "{text}"
    );
    features.assert_no_panic();
    scoring.assert_no_panic();
}

#[test]
fn concurrent_predictions_for_one_key_share_one_upstream_lookup() {
    // A slow upstream answering both endpoints for customer 0: the 50
    // predictions arrive while the first lookup is in flight.
    let row = explicit_features(0);
    let answer =
        format!(r#"{{"items": [{{"data": {{"demographics": {row}, "behavior": {row}}}}}]}}"#);
    let (upstream, calls) = fake_upstream_counted(
        Duration::from_millis(1500),
        200,
        Some(answer),
        Duration::from_secs(60),
    );
    let sb = BundleDir::new(&scoring_by_id(upstream, None));
    let scoring = Server::start_ready(sb.path(), &[("MESH_FEATURES_KEY", "k")]);
    let explicit = scoring
        .api(
            "high-value-plain",
            "predict",
            &format!(r#"{{"features": {}}}"#, explicit_features(0)),
        )
        .json();
    let (_, rows) = read_csv("customers.csv");
    let body = format!(r#"{{"features": {{"customer_id": "{}"}}}}"#, rows[0][0]);
    let answers: Vec<Response> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..50)
            .map(|_| s.spawn(|| scoring.api("high-value", "predict", &body)))
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect()
    });
    for r in &answers {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(probas_bits(&r.json()), probas_bits(&explicit));
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    scoring.assert_no_panic();
}

#[test]
fn concurrent_predictions_for_different_keys_share_batched_upstream_calls() {
    // The feature service behind a proxy that holds every byte at first: the
    // 50 predictions (50 customers) arrive while the first calls are out.
    let fb = two_endpoint_features();
    let features = Server::start_ready(fb.path(), &[("MESH_API_KEY_FEATURES", FEATURES_KEY)]);
    let proxy = proxy::Proxy::start(features.addr);
    proxy.set(proxy::HANG);
    let sb = BundleDir::new(&scoring_by_id(proxy.addr, None));
    let scoring = Server::start_ready(sb.path(), &[("MESH_FEATURES_KEY", FEATURES_KEY)]);
    let (_, rows) = read_csv("customers.csv");
    let customers: Vec<usize> = (0..50).map(|i| i * 37).collect();
    let answers: Vec<Response> = std::thread::scope(|s| {
        let threads: Vec<_> = customers
            .iter()
            .map(|&i| {
                let body = format!(r#"{{"features": {{"customer_id": "{}"}}}}"#, rows[i][0]);
                let scoring = &scoring;
                s.spawn(move || scoring.api("high-value", "predict", &body))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        proxy.set(proxy::PASS);
        threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect()
    });
    for (r, &i) in answers.iter().zip(&customers) {
        assert_eq!(r.status, 200, "{}", r.text());
        let explicit = scoring.api(
            "high-value-plain",
            "predict",
            &format!(r#"{{"features": {}}}"#, explicit_features(i)),
        );
        assert_eq!(
            probas_bits(&r.json()),
            probas_bits(&explicit.json()),
            "customer {i}"
        );
    }
    // 8 calls out while the upstream held them (one key each), then one for
    // every key that waited: far fewer than 50.
    let calls = upstream_calls(&features);
    assert!(
        (2.0..=9.0).contains(&calls),
        "{calls} upstream calls for 50 predictions"
    );
    features.assert_no_panic();
    scoring.assert_no_panic();
}

#[test]
fn predictions_cut_short_while_their_upstream_calls_hang_leave_no_call_out() {
    // Ten predictions (ten customers) whose upstream calls hang are cut by
    // the request timeout: the requests leading those calls (up to 8) and
    // the ones waiting for them go away mid-call. None of those calls may
    // stay counted as out: once the upstream answers again, a prediction
    // leads a call at once instead of waiting behind 8 calls that are gone.
    let fb = two_endpoint_features();
    let features = Server::start_ready(fb.path(), &[("MESH_API_KEY_FEATURES", FEATURES_KEY)]);
    let proxy = proxy::Proxy::start(features.addr);
    proxy.set(proxy::HANG);
    let mut service = scoring_by_id(proxy.addr, None);
    service["limits"] = json!({"request_timeout_ms": 300});
    let sb = BundleDir::new(&service);
    let scoring = Server::start_ready(sb.path(), &[("MESH_FEATURES_KEY", FEATURES_KEY)]);
    let (_, rows) = read_csv("customers.csv");
    std::thread::scope(|s| {
        for i in 0..10 {
            let body = format!(
                r#"{{"features": {{"customer_id": "{}"}}}}"#,
                rows[i * 37][0]
            );
            let scoring = &scoring;
            s.spawn(move || {
                scoring
                    .api("high-value", "predict", &body)
                    .assert_error(504, "request_timeout");
            });
        }
    });
    proxy.set(proxy::PASS);
    assert_by_id_equals_explicit(&scoring, 5);
    assert_by_id_equals_explicit(&scoring, 6);
    features.assert_no_panic();
    scoring.assert_no_panic();
}

#[test]
fn cached_enrichments_skip_the_upstream_and_give_the_same_answer() {
    let fb = two_endpoint_features();
    let features = Server::start_ready(fb.path(), &[("MESH_API_KEY_FEATURES", FEATURES_KEY)]);
    let cache = json!({"ttl_ms": 600_000, "max_entries": 100});
    let sb = BundleDir::new(&scoring_by_id(features.addr, Some(cache)));
    let scoring = Server::start_ready(sb.path(), &[("MESH_FEATURES_KEY", FEATURES_KEY)]);

    assert_by_id_equals_explicit(&scoring, 7);
    assert_eq!(upstream_calls(&features), 1.0);
    // Warm: no upstream request, the same bits.
    assert_by_id_equals_explicit(&scoring, 7);
    assert_by_id_equals_explicit(&scoring, 7);
    assert_eq!(upstream_calls(&features), 1.0);
    // Another key is a miss again.
    assert_by_id_equals_explicit(&scoring, 8);
    assert_eq!(upstream_calls(&features), 2.0);

    let text = metrics(&scoring);
    for enrichment in ["demographics", "behavior"] {
        for (result, n) in [("hit", 2.0), ("miss", 2.0)] {
            let sample = format!(
                r#"mesh_enrichment_cache_total{{endpoint="high-value",enrichment="{enrichment}",result="{result}"}}"#
            );
            assert_eq!(metric(&text, &sample), Some(n), "{sample}\n{text}");
        }
    }
    features.assert_no_panic();
    scoring.assert_no_panic();
}

#[test]
fn lookup_endpoints_answers_several_endpoints_per_key() {
    let fb = two_endpoint_features();
    let features = Server::start_ready(fb.path(), &[("MESH_API_KEY_FEATURES", FEATURES_KEY)]);
    let auth = format!("Bearer {FEATURES_KEY}");
    let call = |headers: &[(&str, &str)], body: &str| {
        let mut all = vec![("Content-Type", "application/json")];
        all.extend_from_slice(headers);
        request(
            features.addr,
            "POST",
            "/public/api/v1/customer-features/lookup-endpoints",
            &all,
            body.as_bytes(),
        )
    };
    let with_key = [("Authorization", auth.as_str())];
    let r = call(
        &with_key,
        r#"{"endpoints": ["demographics", "behavior"], "items": [{"data": {"customer_id": "C00001"}}, {"data": {"customer_id": "C77777"}}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    // Each row is what that endpoint's own lookup answers.
    for endpoint in ["demographics", "behavior"] {
        let one = request(
            features.addr,
            "POST",
            &format!("/public/api/v1/customer-features/{endpoint}/lookup"),
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &auth),
            ],
            br#"{"data": {"customer_id": "C00001"}}"#,
        );
        assert_eq!(one.status, 200, "{}", one.text());
        assert_eq!(answer["items"][0]["data"][endpoint], one.json()["data"]);
        assert_eq!(answer["items"][1]["data"][endpoint], Value::Null);
    }

    // Same keys as the lookups.
    call(&[], r#"{"endpoints": ["behavior"], "items": []}"#).assert_error(401, "unauthorized");
    call(
        &[("Authorization", "Bearer wrong")],
        r#"{"endpoints": ["behavior"], "items": []}"#,
    )
    .assert_error(401, "unauthorized");

    // Bad requests name their problem.
    let msg = call(
        &with_key,
        r#"{"endpoints": ["behavior", "nope"], "items": [{"data": {"customer_id": "C00001"}}]}"#,
    )
    .assert_error(404, "unknown_endpoint");
    assert!(msg.contains("`nope`"), "{msg}");
    let msg = call(
        &with_key,
        r#"{"endpoints": ["behavior"], "items": [{"data": {"customer_id": "C00001"}}, {"data": {"id": 1}}]}"#,
    )
    .assert_error(400, "missing_key");
    assert!(
        msg.contains("item 1") && msg.contains("customer_id"),
        "{msg}"
    );
    call(&with_key, r#"{"endpoints": [], "items": []}"#).assert_error(400, "invalid_request");
    call(&with_key, r#"{"items": []}"#).assert_error(400, "invalid_request");
    call(&with_key, r#"{"endpoints": ["behavior"]"#).assert_error(400, "malformed_json");
    let msg = call(
        &with_key,
        r#"{"endpoints": ["behavior"], "items": [{"data": {"customer_id": [1]}}]}"#,
    )
    .assert_error(400, "invalid_key");
    assert!(msg.contains("item 0"), "{msg}");
    features.assert_no_panic();
}
