//! `demo-upstream`: a stand-in for a customer's API behind the proxy.
//!
//! - `GET|POST /v1/*`: `{"ok": true, "path": ...}`.
//! - `POST /v1/generate`: like an LLM call; answers `x-usage-units` with the tokens it
//!   "used" (the request's `x-tokens` header, default 250).
//! - `GET /healthz`: `ok`.
//!
//! Listens on `DEMO_UPSTREAM_LISTEN` (default `127.0.0.1:8090`; port 0 picks one) and
//! prints the address it bound.

// A command-line program: printing its address is its job.
#![allow(clippy::print_stdout)]

use axum::Json;
use axum::http::{HeaderMap, Uri};
use axum::response::IntoResponse;

async fn any(uri: Uri) -> impl IntoResponse {
    Json(serde_json::json!({"ok": true, "path": uri.path()}))
}

async fn generate(headers: HeaderMap) -> impl IntoResponse {
    let tokens = headers
        .get("x-tokens")
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<u64>().ok())
        .unwrap_or(250);
    let mut answer = HeaderMap::new();
    answer.insert("x-usage-units", tokens.into());
    (
        answer,
        Json(
            serde_json::json!({"ok": true, "completion": "Hello from the demo model.", "tokens": tokens}),
        ),
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let listen =
        std::env::var("DEMO_UPSTREAM_LISTEN").unwrap_or_else(|_| "127.0.0.1:8090".to_owned());
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/v1/generate", axum::routing::post(generate))
        .fallback(any);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!(
        "demo upstream listening on http://{}",
        listener.local_addr()?
    );
    axum::serve(listener, app).await
}
