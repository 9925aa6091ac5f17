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
fn openapi_is_behind_the_keys_when_the_service_requires_them() {
    let mut service = local_service();
    service["api_keys"] = json!([
        {"caller": "operator", "verifier": {"file": "secrets/operator"}},
        {"env": "MESH_TEST_KEY"}
    ]);
    service["known_callers"] = json!([{"caller": "other", "verifier": {"file": "secrets/other"}}]);
    let bundle = BundleDir::new(&service);
    std::fs::create_dir_all(bundle.path().join("secrets")).expect("mkdir");
    for (caller, key) in [("operator", "operator-key-1"), ("other", "other-key-2")] {
        std::fs::write(
            bundle.path().join("secrets").join(caller),
            mesh_runtime::auth::verifier(caller, key),
        )
        .expect("write verifier");
    }
    let s = Server::start_ready(bundle.path(), &[("MESH_TEST_KEY", "env-key-123")]);
    let get = |headers: &[(&str, &str)]| request(s.addr, "GET", "/openapi.json", headers, b"");
    // The same rules as the endpoints: no key or nobody's 401, a known caller not allowed 403.
    let r = get(&[]);
    r.assert_error(401, "unauthorized");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    get(&[("X-API-Key", "nobodys")]).assert_error(401, "unauthorized");
    get(&[("X-API-Key", "other-key-2")]).assert_error(403, "forbidden");
    for auth in [
        ("X-API-Key", "operator-key-1"),
        ("Authorization", "Bearer operator-key-1"),
        ("X-API-Key", "env-key-123"),
    ] {
        let r = get(&[auth]);
        assert_eq!(r.status, 200, "{auth:?}: {}", r.text());
        let doc = r.json();
        assert!(doc["paths"][PREDICT].is_object(), "{doc}");
        let scheme = &doc["components"]["securitySchemes"]["apiKey"];
        assert_eq!(
            (&scheme["type"], &scheme["in"], &scheme["name"]),
            (&json!("apiKey"), &json!("header"), &json!("X-API-Key")),
            "{doc}"
        );
        assert!(doc["security"].to_string().contains("apiKey"), "{doc}");
    }
    // The /docs page itself is public and holds no key.
    let page = s.get("/docs");
    assert_eq!(page.status, 200);
    for key in ["operator-key-1", "env-key-123", "hmac-sha256"] {
        assert!(!page.text().contains(key), "{key} in the page");
    }
}

#[test]
fn openapi_is_public_when_the_service_takes_no_keys() {
    let bundle = BundleDir::new(&local_service());
    let s = Server::start_ready(bundle.path(), &[]);
    let r = s.get("/openapi.json");
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert!(doc["paths"][PREDICT].is_object());
    // Nothing to authorize with.
    assert!(doc.get("security").is_none(), "{doc}");
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
