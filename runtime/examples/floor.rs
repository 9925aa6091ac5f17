//! The floor of the runtime benchmarks: a bare axum server on the same tokio
//! runtime, serde_json and allocator as `mesh-runtime`, answering `POST /echo` with the
//! JSON it was sent (parsed and serialised again) and `GET /ok` with `{}`.
//! Nothing a service does (routing by endpoint, keys, datasets, models,
//! metrics) is in it, so `scenario req/s ÷ floor req/s` is what the service
//! keeps of what this machine's HTTP stack can do in the same run.
//!
//!     cargo build --release -p mesh-runtime --example floor
//!     target/release/examples/floor 127.0.0.1:0     # prints "listening on http://ADDR"

use axum::Json;
use axum::routing::{get, post};
use serde_json::Value;

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let app = axum::Router::new()
                .route("/echo", post(|Json(v): Json<Value>| async move { Json(v) }))
                .route("/ok", get(|| async { Json(serde_json::json!({})) }));
            let listener = tokio::net::TcpListener::bind(&addr).await?;
            eprintln!("listening on http://{}", listener.local_addr()?);
            axum::serve(listener, app).await
        })
}
