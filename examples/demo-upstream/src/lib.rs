//! A stand-in for a customer's API behind the proxy (the `demo-upstream` binary serves
//! it; the integration guides run it in process).
//!
//! - `GET|POST /v1/*`: `{"ok": true, "path": ...}`.
//! - `POST /v1/generate`: like an LLM call; answers `x-usage-units` with the tokens it
//!   "used" (the request's `x-tokens` header, default 250), or 502 when the request
//!   carries `x-fail: true` (a model that is down).
//! - `GET /healthz`: `ok`.

use axum::Json;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

async fn any(uri: Uri) -> impl IntoResponse {
    Json(serde_json::json!({"ok": true, "path": uri.path()}))
}

async fn generate(headers: HeaderMap) -> Response {
    if headers
        .get("x-fail")
        .is_some_and(|value| value.as_bytes() == b"true")
    {
        return (StatusCode::BAD_GATEWAY, "the model is down").into_response();
    }
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
        .into_response()
}

/// The demo API's routes.
pub fn app() -> axum::Router {
    axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/v1/generate", axum::routing::post(generate))
        .fallback(any)
}
