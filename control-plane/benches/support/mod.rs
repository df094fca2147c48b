//! What the store benchmarks (P4, P5, the console's) share: a release control plane
//! through its router (the API and the console) in process, on a durable database, with one tenant and the `api_calls` feature.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::request::Builder;
use control_plane::clock::SystemClock;
use control_plane::config::{Config, DatabaseUrl, Synchronous};
use control_plane::service::AppState;
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

/// The allocator the control plane's binary uses (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The runtime every store benchmark runs in: two worker threads, like the machine's
/// two cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A numeric knob from the environment.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Sends one request with the tenant's key (and a JSON body); panics unless it succeeds.
/// Returns the answer's JSON (`null` when it has none).
pub async fn send(
    app: &axum::Router,
    key: &str,
    request: Builder,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let answer = send_text(
        app,
        key,
        request,
        body.map(|body| Bytes::from(body.to_string())),
    )
    .await;
    serde_json::from_slice(&answer).unwrap_or(serde_json::Value::Null)
}

/// [`send`] with the JSON body already written and the answer left unparsed (so that a
/// measured loop does not count the client's work).
pub async fn send_text(
    app: &axum::Router,
    key: &str,
    request: Builder,
    body: Option<Bytes>,
) -> Bytes {
    let request = request.header("authorization", format!("Bearer {key}"));
    let request = match body {
        Some(body) => request
            .header("content-type", "application/json")
            .body(Body::from(body)),
        None => request.body(Body::empty()),
    };
    let response = app
        .clone()
        .oneshot(request.expect("request"))
        .await
        .expect("response");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    bytes
}

/// A control plane on `database` (`synchronous = full`, no rate limit; `configure` may
/// change more) with one tenant and the metered `api_calls` feature: the router and the
/// tenant's sandbox key.
pub async fn setup(
    database: DatabaseUrl,
    configure: impl FnOnce(&mut Config),
) -> (axum::Router, String) {
    let mut config = Config::for_tests();
    config.database = database;
    config.synchronous = Synchronous::Full;
    config.rate_limit_per_second = 10_000_000;
    config.rate_limit_burst = 10_000_000;
    configure(&mut config);
    let store = control_plane::open_store(&config).await.expect("store");
    let state = AppState::new(config, store, Arc::new(SystemClock), None);
    let app = control_plane::http::app_with(state.clone(), control_plane::console::router(&state));
    let key = control_plane::http::tenancy::create_tenant(&state, "bench")
        .await
        .expect("tenant")
        .api_keys
        .test;
    send(
        &app,
        &key,
        axum::http::Request::post("/v1/features"),
        Some(json!({"key": "api_calls", "name": "API calls", "type": "metered"})),
    )
    .await;
    (app, key)
}
