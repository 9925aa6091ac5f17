//! Every route of a running `mesh-runtime`, over real HTTP on loopback.

mod common;

use common::*;
use serde_json::{Value, json};

fn server() -> (BundleDir, Server) {
    let bundle = BundleDir::new(&local_service());
    let server = Server::start_ready(bundle.path(), &[]);
    (bundle, server)
}

#[test]
fn predict_with_enrichment_matches_explicit_features_bit_for_bit() {
    let (_b, s) = server();
    let (_, rows) = read_csv("customers.csv");
    // A spread of customers, including the first and the last.
    let picks: Vec<usize> = (0..rows.len())
        .step_by(197)
        .chain([rows.len() - 1])
        .collect();
    for &i in &picks {
        let id = &rows[i][0];
        let enriched = s.api(
            "high-value",
            "predict",
            &format!(r#"{{"features": {{"customer_id": "{id}"}}}}"#),
        );
        assert_eq!(enriched.status, 200, "{}", enriched.text());
        let enriched = enriched.json();
        let explicit_body = format!(r#"{{"features": {}}}"#, explicit_features(i));
        let explicit = s.api("high-value", "predict", &explicit_body).json();
        let plain = s.api("high-value-plain", "predict", &explicit_body).json();
        assert_eq!(
            probas_bits(&enriched),
            probas_bits(&explicit),
            "customer {id}"
        );
        assert_eq!(probas_bits(&enriched), probas_bits(&plain), "customer {id}");
        assert_eq!(
            enriched["result"]["prediction"],
            explicit["result"]["prediction"]
        );
        assert_eq!(
            enriched["result"]["enriched"].as_array().map(Vec::len),
            Some(9)
        );
        assert_eq!(explicit["result"]["enriched"], json!([]));
    }
    s.assert_no_panic();
}

#[test]
fn predict_answer_shape_and_partial_enrichment() {
    let (_b, s) = server();
    let r = s.api(
        "high-value",
        "predict",
        r#"{"features": {"customer_id": "C00042", "age": 30, "region": "west", "unused": [1, 2]}}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let probas = v["result"]["probas"].as_object().expect("probas");
    assert_eq!(probas.keys().collect::<Vec<_>>(), ["0", "1"]);
    let sum: f64 = probas.values().map(|p| p.as_f64().expect("number")).sum();
    assert!((sum - 1.0).abs() < 1e-5, "{v}");
    let label = v["result"]["prediction"].as_str().expect("label");
    assert!(label == "0" || label == "1");
    // Sent features are not enriched.
    let enriched: Vec<&str> = v["result"]["enriched"]
        .as_array()
        .expect("enriched")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        !enriched.contains(&"age") && !enriched.contains(&"region"),
        "{v}"
    );
    assert!(
        enriched.contains(&"gender") && enriched.contains(&"avg_basket"),
        "{v}"
    );
    assert!(v["timing"]["total"].as_u64().is_some(), "{v}");
}

#[test]
fn predict_multi_gives_per_item_results() {
    let (_b, s) = server();
    let one = s
        .api(
            "high-value",
            "predict",
            r#"{"features": {"customer_id": "C00007"}}"#,
        )
        .json();
    let r = s.api(
        "high-value",
        "predict-multi",
        r#"{"items": [
            {"features": {"customer_id": "C00007"}},
            {"features": {"customer_id": "NOPE"}},
            {"features": {"customer_id": "C00008", "age": "old"}},
            {"features": {}}
        ]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let items = v["items"].as_array().expect("items");
    assert_eq!(items.len(), 4);
    assert_eq!(items[0]["result"], one["result"]);
    assert_eq!(items[1]["error"]["code"], "not_found");
    assert_eq!(items[2]["error"]["code"], "invalid_feature");
    assert!(
        items[2]["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("`age`")
    );
    assert_eq!(items[3]["error"]["code"], "missing_feature");
    let empty = s.api("high-value", "predict-multi", r#"{"items": []}"#);
    assert_eq!(empty.status, 200);
    assert_eq!(empty.json()["items"], json!([]));
}

#[test]
fn lookup_merges_datasets_and_404s_absent_keys() {
    let (_b, s) = server();
    let r = s.api(
        "customer",
        "lookup",
        r#"{"data": {"customer_id": "C00002"}}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"data": {"customer_id": "C00002", "age": 67, "gender": "F", "region": "north",
            "campaign": "loyalty_push", "loyalty_member": 1, "total_spend_30d": 50.4,
            "orders_90d": 2, "days_since_last_order": 3, "avg_basket": 52.89}})
    );
    let msg = s
        .api(
            "customer",
            "lookup",
            r#"{"data": {"customer_id": "C99999"}}"#,
        )
        .assert_error(404, "not_found");
    assert!(msg.contains("C99999"), "{msg}");
    s.api("customer", "lookup", r#"{"data": {}}"#)
        .assert_error(400, "missing_key");
    s.api("customer", "lookup", r#"{"data": {"customer_id": 1.5}}"#)
        .assert_error(400, "invalid_key");

    let r = s.api(
        "customer",
        "lookup-multi",
        r#"{"items": [{"data": {"customer_id": "C00001"}}, {"data": {"customer_id": "X"}}, {"data": {"customer_id": true}}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["items"][0]["data"]["age"], 28);
    assert_eq!(v["items"][1]["error"]["code"], "not_found");
    assert_eq!(v["items"][2]["error"]["code"], "invalid_key");
}

#[test]
fn lookup_answer_feeds_predict_identically() {
    let (_b, s) = server();
    let row = s
        .api(
            "customer",
            "lookup",
            r#"{"data": {"customer_id": "C00123"}}"#,
        )
        .json();
    let features = serde_json::to_string(&row["data"]).expect("json");
    let explicit = s
        .api(
            "high-value-plain",
            "predict",
            &format!(r#"{{"features": {features}}}"#),
        )
        .json();
    let enriched = s
        .api(
            "high-value",
            "predict",
            r#"{"features": {"customer_id": "C00123"}}"#,
        )
        .json();
    assert_eq!(probas_bits(&explicit), probas_bits(&enriched));
}

#[test]
fn open_inference_protocol() {
    let (_b, s) = server();
    assert_eq!(s.get("/v2/health/live").status, 200);
    assert_eq!(s.get("/v2/health/ready").json(), json!({"ready": true}));
    assert_eq!(s.get("/v2/models/high-value/ready").status, 200);
    let meta = s.get("/v2/models/high-value").json();
    assert_eq!(meta["name"], "high-value");
    assert_eq!(meta["versions"], json!(["1.0.0"]));
    let inputs = meta["inputs"].as_array().expect("inputs");
    assert_eq!(inputs.len(), 9);
    let gender = inputs
        .iter()
        .find(|i| i["name"] == "gender")
        .expect("gender");
    assert_eq!(gender["datatype"], "BYTES");
    let age = inputs.iter().find(|i| i["name"] == "age").expect("age");
    assert_eq!(age["datatype"], "FP32");
    assert_eq!(age["shape"], json!([-1, 1]));
    let outputs: Vec<&str> = meta["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .filter_map(|o| o["name"].as_str())
        .collect();
    assert_eq!(outputs, ["label", "probabilities"]);

    // Two rows, explicit tensors; must match the API-node answers.
    let rows: Vec<Value> = [0usize, 41]
        .iter()
        .map(|&i| serde_json::from_str(&explicit_features(i)).expect("features"))
        .collect();
    let inputs: Vec<Value> = inputs
        .iter()
        .map(|spec| {
            let name = spec["name"].as_str().expect("name");
            let data: Vec<Value> = rows.iter().map(|r| r[name].clone()).collect();
            json!({"name": name, "shape": [2, 1], "datatype": spec["datatype"], "data": data})
        })
        .collect();
    let body = json!({"id": "req-1", "inputs": inputs}).to_string();
    let r = s.post("/v2/models/high-value/infer", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["id"], "req-1");
    assert_eq!(v["model_name"], "high-value");
    let probs = v["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .find(|o| o["name"] == "probabilities")
        .expect("probabilities");
    assert_eq!(probs["shape"], json!([2, 2]));
    for (k, i) in [0usize, 41].iter().enumerate() {
        let one = s
            .api(
                "high-value",
                "predict",
                &format!(r#"{{"features": {}}}"#, explicit_features(*i)),
            )
            .json();
        let bits = probas_bits(&one);
        for c in 0..2 {
            let p = probs["data"][k * 2 + c].as_f64().expect("prob") as f32;
            assert_eq!(p.to_bits(), bits[c].1, "row {k} class {c}");
        }
    }

    // Bad tensors are 400s.
    s.post(
        "/v2/models/high-value/infer",
        r#"{"inputs": [{"name": "nope", "shape": [1], "datatype": "FP32", "data": [1]}]}"#,
    )
    .assert_error(400, "invalid_tensor");
    s.post(
        "/v2/models/high-value/infer",
        r#"{"inputs": [{"name": "age", "shape": [2], "datatype": "FP32", "data": [1]}]}"#,
    )
    .assert_error(400, "invalid_tensor");
    s.post(
        "/v2/models/high-value/infer",
        r#"{"inputs": [{"name": "gender", "shape": [1], "datatype": "FP32", "data": [1]}]}"#,
    )
    .assert_error(400, "invalid_tensor");
    s.post(
        "/v2/models/high-value/infer",
        r#"{"inputs": [{"name": "age", "shape": [1], "datatype": "FP32", "data": [1]}]}"#,
    )
    .assert_error(400, "missing_feature");
    s.post("/v2/models/high-value/infer", r#"{"inputs": "x"}"#)
        .assert_error(400, "invalid_request");
    s.get("/v2/models/customer")
        .assert_error(404, "unknown_model");
    s.post("/v2/models/nope/infer", "{}")
        .assert_error(404, "unknown_model");
    s.assert_no_panic();
}

#[test]
fn health_metrics_and_openapi() {
    let (_b, s) = server();
    assert_eq!(s.get("/healthz").json(), json!({"status": "ok"}));
    // Readiness reports each dataset's freshness.
    let ready = s.get("/readyz").json();
    assert_eq!(ready["status"], "ready", "{ready}");
    for ds in ["customers", "behavior"] {
        let d = &ready["datasets"][ds];
        assert_eq!(
            (&d["source"], &d["mode"], &d["rows"], &d["stale"]),
            (
                &json!("csv"),
                &json!("preload"),
                &json!(10000),
                &json!(false)
            ),
            "{ready}"
        );
        assert!(d["age_seconds"].as_f64().is_some(), "{ready}");
    }
    s.api(
        "high-value",
        "predict",
        r#"{"features": {"customer_id": "C00001"}}"#,
    );
    s.api("high-value", "predict", r#"{"features": {}}"#);
    let m = s.get("/metrics");
    assert_eq!(m.status, 200);
    assert!(
        m.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain"))
    );
    let text = m.text();
    assert!(
        text.contains(r#"mesh_requests_total{endpoint="high-value",route="predict",code="200"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"mesh_requests_total{endpoint="high-value",route="predict",code="400"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"mesh_request_duration_seconds_count{endpoint="high-value",route="predict"} 2"#
        ),
        "{text}"
    );
    assert!(text.contains("mesh_ready{service=\"customer-scoring\"} 1"));
    assert!(
        text.contains("mesh_dataset_rows{dataset=\"customers\"} 10000"),
        "{text}"
    );
    assert!(
        text.contains("mesh_dataset_age_seconds{dataset=\"behavior\"} "),
        "{text}"
    );

    let doc = s.get("/openapi.json").json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    for p in [
        "/public/api/v1/customer-scoring/high-value/predict",
        "/public/api/v1/customer-scoring/high-value/predict-multi",
        "/public/api/v1/customer-scoring/customer/lookup",
        "/public/api/v1/customer-scoring/customer/lookup-multi",
        "/public/api/v1/customer-scoring/lookup-endpoints",
        "/v2/models/high-value/infer",
        "/healthz",
    ] {
        assert!(paths.contains_key(p), "missing {p}");
    }
    let multi = &paths["/public/api/v1/customer-scoring/lookup-endpoints"]["post"];
    assert_eq!(
        multi["requestBody"]["content"]["application/json"]["schema"]["properties"]["endpoints"]["items"]
            ["enum"],
        json!(["customer"])
    );
    let features = &doc["components"]["schemas"]["high-valueFeatures"];
    let props = features["properties"].as_object().expect("props");
    for f in CUSTOMER_COLUMNS.iter().chain(&BEHAVIOR_COLUMNS) {
        assert!(props.contains_key(*f), "feature {f} missing");
    }
    assert!(props.contains_key("customer_id"));
    // Enriched features are optional; the plain endpoint requires all nine.
    assert_eq!(features["required"], json!([]));
    let plain = &doc["components"]["schemas"]["high-value-plainFeatures"];
    assert_eq!(plain["required"].as_array().map(Vec::len), Some(9));
}

/// A batch large enough to be scored off the request's worker thread
/// (`scoring::BLOCKING_ROWS`) gives, item for item, what single predictions give.
#[test]
fn a_large_batch_scores_like_single_predictions() {
    let (_b, s) = server();
    let n = mesh_runtime::scoring::BLOCKING_ROWS + 20; // within the test bundle's max_batch (100)
    let ids: Vec<String> = (1..=n).map(|i| format!("C{i:05}")).collect();
    let items: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| json!({"features": {"customer_id": id}}))
        .collect();
    let r = s.api(
        "high-value",
        "predict-multi",
        &json!({ "items": items }).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let got = v["items"].as_array().expect("items");
    assert_eq!(got.len(), n);
    for (i, id) in ids.iter().enumerate().step_by(17) {
        let one = s
            .api(
                "high-value",
                "predict",
                &json!({"features": {"customer_id": id}}).to_string(),
            )
            .json();
        assert_eq!(got[i]["result"], one["result"], "{id}");
    }
}
