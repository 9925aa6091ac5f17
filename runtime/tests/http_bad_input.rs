//! Bad input never hurts: every class of bad request gets a 4xx with a JSON
//! reason, the server never panics and keeps answering.

mod common;

use common::*;

fn server() -> (BundleDir, Server) {
    let bundle = BundleDir::new(&local_service());
    let server = Server::start_ready(bundle.path(), &[]);
    (bundle, server)
}

const PREDICT: &str = "/public/api/v1/customer-scoring/high-value/predict";

#[test]
fn malformed_and_misshapen_bodies() {
    let (_b, s) = server();
    for body in [
        "",
        "{",
        "{\"features\": {\"age\": 1,}}",
        "nul",
        "{\"features\": {}} trailing",
        "\u{0}",
    ] {
        s.post(PREDICT, body).assert_error(400, "malformed_json");
    }
    for body in [
        "[]",
        "42",
        "\"x\"",
        "{}",
        "{\"features\": 1}",
        "{\"features\": []}",
        "{\"feature\": {}}",
    ] {
        s.post(PREDICT, body).assert_error(400, "invalid_request");
    }
    // Invalid UTF-8 inside a string.
    let r = request(
        s.addr,
        "POST",
        PREDICT,
        &[("Content-Type", "application/json")],
        b"{\"features\": {\"gender\": \"\xff\"}}",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // Numbers JSON cannot hold as finite floats.
    let msg = s
        .post(
            PREDICT,
            r#"{"features": {"customer_id": "C00001", "age": 1e999}}"#,
        )
        .assert_error(400, "malformed_json");
    assert!(!msg.is_empty());
    s.assert_no_panic();
}

#[test]
fn wrong_content_type_is_415() {
    let (_b, s) = server();
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let r = request(
            s.addr,
            "POST",
            PREDICT,
            &[("Content-Type", ct)],
            br#"{"features": {"customer_id": "C00001"}}"#,
        );
        r.assert_error(415, "unsupported_media_type");
    }
    // With charset, or a +json type, it is fine.
    for ct in [
        "application/json; charset=utf-8",
        "application/vnd.mesh+json",
    ] {
        let r = request(
            s.addr,
            "POST",
            PREDICT,
            &[("Content-Type", ct)],
            br#"{"features": {"customer_id": "C00001"}}"#,
        );
        assert_eq!(r.status, 200, "{ct}: {}", r.text());
    }
}

#[test]
fn wrong_types_name_the_feature() {
    let (_b, s) = server();
    let cases = [
        (r#"{"customer_id": "C00001", "age": "42"}"#, "age"),
        (r#"{"customer_id": "C00001", "age": "NaN"}"#, "age"),
        (
            r#"{"customer_id": "C00001", "total_spend_30d": "Infinity"}"#,
            "total_spend_30d",
        ),
        (
            r#"{"customer_id": "C00001", "avg_basket": [1.0]}"#,
            "avg_basket",
        ),
        (
            r#"{"customer_id": "C00001", "gender": {"v": "F"}}"#,
            "gender",
        ),
        (r#"{"customer_id": "C00001", "region": true}"#, "region"),
        (r#"{"customer_id": "C00001", "campaign": 1.5}"#, "campaign"),
        (r#"{"customer_id": ["C00001"]}"#, "customer_id"),
    ];
    for (features, name) in cases {
        let msg = s
            .post(PREDICT, &format!(r#"{{"features": {features}}}"#))
            .assert_error(400, "invalid_feature");
        assert!(msg.contains(&format!("`{name}`")), "{features}: {msg}");
    }
    // Unused fields of any type are ignored.
    let r = s.post(
        PREDICT,
        r#"{"features": {"customer_id": "C00001", "zzz": "NaN", "yyy": [1, {"a": null}]}, "extra": 1}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn missing_features_and_keys() {
    let (_b, s) = server();
    // No enrichment on the plain endpoint: the first missing feature is named.
    let msg = s
        .post(
            "/public/api/v1/customer-scoring/high-value-plain/predict",
            r#"{"features": {"age": 30}}"#,
        )
        .assert_error(400, "missing_feature");
    assert!(msg.contains("`gender`"), "{msg}");
    // Enrichable, but no key sent.
    let msg = s
        .post(PREDICT, r#"{"features": {"age": 30}}"#)
        .assert_error(400, "missing_feature");
    assert!(msg.contains("customer_id"), "{msg}");
    // Explicit null counts as not sent.
    let msg = s
        .post(PREDICT, r#"{"features": {"customer_id": null}}"#)
        .assert_error(400, "missing_feature");
    assert!(msg.contains("customer_id"), "{msg}");
    // Unknown key: 404 naming key and dataset.
    let msg = s
        .post(PREDICT, r#"{"features": {"customer_id": "C0"}}"#)
        .assert_error(404, "not_found");
    assert!(msg.contains("\"C0\"") && msg.contains("customers"), "{msg}");
}

#[test]
fn unknown_routes_and_methods() {
    let (_b, s) = server();
    s.post("/public/api/v1/other-service/high-value/predict", "{}")
        .assert_error(404, "unknown_service");
    s.post("/public/api/v1/customer-scoring/nope/predict", "{}")
        .assert_error(404, "unknown_endpoint");
    s.post("/public/api/v1/customer-scoring/high-value/lookup", "{}")
        .assert_error(404, "unknown_route");
    s.post("/public/api/v1/customer-scoring/customer/predict", "{}")
        .assert_error(404, "unknown_route");
    s.post(
        "/public/api/v1/customer-scoring/high-value/predict/extra",
        "{}",
    )
    .assert_error(404, "unknown_route");
    s.get("/nope").assert_error(404, "unknown_route");
    s.get(PREDICT).assert_error(405, "method_not_allowed");
    s.post("/healthz", "{}")
        .assert_error(405, "method_not_allowed");
    s.post("/public/api/v1/customer-scoring/%FF%FE/predict", "{}")
        .assert_error(400, "invalid_path");
    s.assert_no_panic();
}

#[test]
fn oversize_bodies_and_batches() {
    let (_b, s) = server();
    // The bundle sets max_body_bytes = 65536.
    let big = format!(
        r#"{{"features": {{"customer_id": "C00001", "pad": "{}"}}}}"#,
        "x".repeat(70_000)
    );
    s.post(PREDICT, &big).assert_error(413, "payload_too_large");
    // Announced length over the limit, body never sent.
    let r = raw(
        s.addr,
        format!(
            "POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("answer");
    r.assert_error(413, "payload_too_large");
    // Chunked body over the limit.
    let mut chunked = format!(
        "POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n{}\r\n", 8192, "y".repeat(8192)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    raw(s.addr, &chunked)
        .expect("answer")
        .assert_error(413, "payload_too_large");

    // max_batch = 100.
    let item = r#"{"features": {"customer_id": "C00001"}}"#;
    let items = vec![item; 101].join(",");
    let msg = s
        .post(
            "/public/api/v1/customer-scoring/high-value/predict-multi",
            &format!(r#"{{"items": [{items}]}}"#),
        )
        .assert_error(413, "batch_too_large");
    assert!(msg.contains("100"), "{msg}");
    let items = vec![item; 100].join(",");
    let r = s.post(
        "/public/api/v1/customer-scoring/high-value/predict-multi",
        &format!(r#"{{"items": [{items}]}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let keys = vec![r#"{"data": {"customer_id": "C00001"}}"#; 101].join(",");
    s.post(
        "/public/api/v1/customer-scoring/customer/lookup-multi",
        &format!(r#"{{"items": [{keys}]}}"#),
    )
    .assert_error(413, "batch_too_large");
    s.assert_no_panic();
}

#[test]
fn garbage_on_the_wire_does_not_hurt() {
    let (_b, s) = server();
    for bytes in [
        &b"GARBAGE\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: \xff\r\n\r\n",
    ] {
        let _ = raw_with_timeout(s.addr, bytes, std::time::Duration::from_secs(1));
    }
    assert_eq!(s.get("/healthz").status, 200);
    // Deeply nested JSON in an ignored field.
    let deep = format!(
        r#"{{"features": {{"customer_id": "C00001", "x": {}1{}}}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let r = s.post(PREDICT, &deep);
    assert!(r.status == 400 || r.status == 200, "{}", r.text());
    assert_eq!(s.get("/healthz").status, 200);
    s.assert_no_panic();
}
