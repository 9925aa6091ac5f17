//! `/docs`: an interactive page over `/openapi.json` (Swagger UI, "Try it
//! out"), and the Swagger UI files it loads under `/docs/assets/`.
//!
//! The files are those of the npm package `swagger-ui-dist` at the version
//! in `assets/swagger-ui/VERSION`, vendored by `scripts/update-docs-assets`
//! and embedded in the binary: nothing is fetched at run time. The page
//! holds no secret: when the service requires keys it asks for one (see
//! `assets/docs.html`), and `/openapi.json` is behind the same keys as the
//! endpoints.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::AppError;

/// The vendored `swagger-ui-dist` version.
pub const SWAGGER_UI_VERSION: &str = include_str!("../assets/swagger-ui/VERSION");

static PAGE: LazyLock<String> = LazyLock::new(|| {
    include_str!("../assets/docs.html").replace("SWAGGER_UI_VERSION", SWAGGER_UI_VERSION.trim())
});

/// `(name, content type, bytes)` of every file under `/docs/assets/`.
const ASSETS: [(&str, &str, &[u8]); 3] = [
    (
        "swagger-ui-bundle.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/swagger-ui/swagger-ui-bundle.js"),
    ),
    (
        "swagger-ui.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/swagger-ui/swagger-ui.css"),
    ),
    (
        "LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../assets/swagger-ui/LICENSE"),
    ),
];

/// Assets are named with `?v=VERSION` by the page, so they may be cached for a year.
const ASSET_CACHE: &str = "public, max-age=31536000, immutable";

/// `GET /docs`: the page; revalidated on every load (it names the asset version).
pub async fn page() -> Response {
    with_headers(
        PAGE.as_str().to_owned().into_response(),
        "text/html; charset=utf-8",
        "no-cache",
    )
}

/// `GET /docs/assets/{file}`.
pub async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some(&(_, content_type, bytes)) => {
            with_headers(bytes.into_response(), content_type, ASSET_CACHE)
        }
        None => AppError::not_found(
            "unknown_asset",
            format!("no asset `{file}` under /docs/assets"),
        )
        .into_response(),
    }
}

fn with_headers(
    mut response: Response,
    content_type: &'static str,
    cache: &'static str,
) -> Response {
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}
