//! `/docs`: the Swagger UI page over `/openapi.json`, its embedded assets,
//! and a "Try it out" prediction from it in headless Chromium, with and
//! without API keys.

mod common;

use std::time::Duration;

use common::webdriver::Browser;
use common::*;
use serde_json::json;

const PREDICT: &str = "/public/api/v1/customer-scoring/high-value/predict";
const OPERATOR_KEY: &str = "operator-key-3e8b41";

#[test]
fn the_page_and_its_assets_are_served_with_types_and_cache_headers() {
    let bundle = BundleDir::new(&local_service());
    let s = Server::start_ready(bundle.path(), &[]);
    let version = mesh_runtime::docs::SWAGGER_UI_VERSION.trim();
    let page = s.get("/docs");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(page.header("cache-control"), Some("no-cache"));
    let html = page.text();
    for asset in ["swagger-ui-bundle.js", "swagger-ui.css"] {
        assert!(
            html.contains(&format!("docs/assets/{asset}?v={version}")),
            "{asset} not in the page:\n{html}"
        );
    }
    for (asset, content_type, starts) in [
        ("swagger-ui-bundle.js", "text/javascript; charset=utf-8", ""),
        ("swagger-ui.css", "text/css; charset=utf-8", ""),
        ("LICENSE", "text/plain; charset=utf-8", "Apache License"),
    ] {
        let r = s.get(&format!("/docs/assets/{asset}?v={version}"));
        assert_eq!(r.status, 200, "{asset}");
        assert_eq!(r.header("content-type"), Some(content_type), "{asset}");
        assert_eq!(
            r.header("cache-control"),
            Some("public, max-age=31536000, immutable"),
            "{asset}"
        );
        assert!(r.body.len() > 1000, "{asset}: {} bytes", r.body.len());
        assert!(r.text().trim_start().starts_with(starts), "{asset}");
    }
    s.get("/docs/assets/nothing.js")
        .assert_error(404, "unknown_asset");
    s.get("/docs/assets/..%2Fservice.json")
        .assert_error(404, "unknown_asset");
}

/// Where the test leaves the screenshot of a "Try it out" answer.
fn screenshot_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// Opens the prediction operation, "Try it out", fills the body, Execute:
/// the answer panel must show a 200 with a prediction. Saves a screenshot.
fn try_a_prediction(browser: &Browser, screenshot: &str) {
    let op = format!(".opblock:has(.opblock-summary-path[data-path=\"{PREDICT}\"])");
    browser
        .wait_for(&format!("{op} .opblock-summary"), Duration::from_secs(30))
        .click();
    browser
        .wait_for(
            &format!("{op} button.try-out__btn"),
            Duration::from_secs(10),
        )
        .click();
    browser
        .wait_for(
            &format!("{op} textarea.body-param__text"),
            Duration::from_secs(10),
        )
        .fill(r#"{"features": {"customer_id": "C00001"}}"#);
    browser
        .wait_for(&format!("{op} button.execute"), Duration::from_secs(10))
        .click();
    let status = browser.wait_text(
        &format!("{op} .live-responses-table .response .response-col_status"),
        Duration::from_secs(30),
        |t| !t.trim().is_empty(),
    );
    let body = browser.text(&format!(
        "{op} .live-responses-table .response-col_description pre"
    ));
    let path = browser.screenshot(&screenshot_path(screenshot));
    println!("screenshot: {}", path.display());
    assert!(
        status.trim().starts_with("200"),
        "status {status}; body:\n{body}"
    );
    let answer: serde_json::Value = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("the response panel is not JSON ({e}):\n{body}"));
    let prediction = answer["result"]["prediction"].as_str();
    assert!(
        prediction.is_some_and(|p| !p.is_empty()),
        "no prediction in {answer}"
    );
}

#[test]
fn try_it_out_predicts_in_headless_chromium() {
    let bundle = BundleDir::new(&local_service());
    let s = Server::start_ready(bundle.path(), &[]);
    let browser = Browser::start();
    browser.goto(&format!("http://{}/docs", s.addr));
    try_a_prediction(&browser, "docs-try-it.png");
    s.assert_no_panic();
}

#[test]
fn try_it_out_with_keys_asks_for_one_and_authorizes_with_it() {
    let mut service = local_service();
    service["api_keys"] = json!([{"caller": "operator", "verifier": {"file": "secrets/operator"}}]);
    let bundle = bundle_with_operator_verifier(&service, OPERATOR_KEY);
    let s = Server::start_ready(bundle.path(), &[]);
    let browser = Browser::start();
    browser.goto(&format!("http://{}/docs", s.addr));
    // openapi.json answers 401 to the page: it asks for a key.
    let input = browser.wait_for("#key-form:not([hidden]) #api-key", Duration::from_secs(30));
    input.fill("not-the-key");
    browser.wait_for("#load", Duration::from_secs(5)).click();
    browser.wait_text("#key-error", Duration::from_secs(10), |t| {
        t.contains("unknown API key")
    });
    input.fill(OPERATOR_KEY);
    browser.wait_for("#load", Duration::from_secs(5)).click();
    // Swagger UI's Authorize holds the key: the button shows it locked.
    browser.wait_for(".auth-wrapper .authorize.locked", Duration::from_secs(30));
    try_a_prediction(&browser, "docs-try-it-keys.png");
    // The key was typed into the page, never served by it.
    assert!(!s.get("/docs").text().contains(OPERATOR_KEY));
    s.assert_no_panic();
}
