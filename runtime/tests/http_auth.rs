//! API keys: missing or a key nobody holds → 401, either header works, operational
//! routes stay open, keys given by env or file reference.

mod common;

use common::*;
use serde_json::json;

const PREDICT: &str = "/public/api/v1/customer-scoring/high-value/predict";
const BODY: &[u8] = br#"{"features": {"customer_id": "C00001"}}"#;

#[test]
fn api_keys_by_env_and_file() {
    let mut service = local_service();
    service["api_keys"] = json!([{"env": "MESH_TEST_KEY"}, {"file": "secrets/key2"}]);
    let bundle = BundleDir::new(&service);
    std::fs::create_dir_all(bundle.path().join("secrets")).expect("mkdir");
    std::fs::write(bundle.path().join("secrets/key2"), "file-key-456\n").expect("write");
    let s = Server::start_ready(bundle.path(), &[("MESH_TEST_KEY", "env-key-123")]);
    let ct = ("Content-Type", "application/json");
    let post =
        |headers: &[(&str, &str)], body: &[u8]| request(s.addr, "POST", PREDICT, headers, body);

    let r = post(&[ct], BODY);
    r.assert_error(401, "unauthorized");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    for (auth, status, code) in [
        (("Authorization", "Bearer wrong"), 401, "unauthorized"),
        (("X-API-Key", "env-key-12"), 401, "unauthorized"),
        (("X-API-Key", "env-key-1234"), 401, "unauthorized"),
        (
            ("Authorization", "Basic ZW52LWtleS0xMjM="),
            401,
            "unauthorized",
        ),
    ] {
        let r = post(&[ct, auth], BODY);
        assert_eq!(r.status, status, "{auth:?}: {}", r.text());
        r.assert_error(status, code);
    }
    for auth in [
        ("Authorization", "Bearer env-key-123"),
        ("Authorization", "bearer file-key-456"),
        ("X-API-Key", "env-key-123"),
        ("X-API-Key", "file-key-456"),
    ] {
        let r = post(&[ct, auth], BODY);
        assert_eq!(r.status, 200, "{auth:?}: {}", r.text());
    }
    // Auth comes before anything else: a bad body without a key is a 401.
    post(&[ct], b"{").assert_error(401, "unauthorized");
    // v2 model routes are protected too.
    request(s.addr, "GET", "/v2/models/high-value", &[], b"").assert_error(401, "unauthorized");
    let r = request(
        s.addr,
        "GET",
        "/v2/models/high-value",
        &[("X-API-Key", "env-key-123")],
        b"",
    );
    assert_eq!(r.status, 200);
    // Operational routes are open.
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/v2/health/live",
        "/v2/health/ready",
        "/openapi.json",
    ] {
        assert_eq!(s.get(path).status, 200, "{path}");
    }
    // Keys never reach the log.
    let log = s.log();
    assert!(
        !log.contains("env-key-123") && !log.contains("file-key-456"),
        "{log}"
    );
}

#[test]
fn unresolvable_key_reference_fails_at_start() {
    let mut service = local_service();
    service["api_keys"] = json!([{"env": "MESH_TEST_KEY_THAT_IS_NOT_SET"}]);
    let bundle = BundleDir::new(&service);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-runtime"))
        .args(["serve", "--listen", "127.0.0.1:0", "--bundle"])
        .arg(bundle.path())
        .env_remove("MESH_TEST_KEY_THAT_IS_NOT_SET")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("env:MESH_TEST_KEY_THAT_IS_NOT_SET") && err.contains("not set"),
        "{err}"
    );
}
