//! The HTTP API: the router, its middleware, and the handlers by area.

pub mod catalog;
pub mod credits;
pub mod extract;
pub mod idempotency;
pub mod leases;
pub mod openapi;
pub mod reservations;
pub mod subscriptions;
pub mod sync;
pub mod tenancy;
pub mod usage;
pub mod webhooks;

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, State};
use axum::http::{HeaderName, HeaderValue, Request, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::service::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "QuotaStack API", description = "Credits, entitlements, metering, reservations and subscriptions."),
    modifiers(&Security),
    security(("bearer" = []), ("api_key" = []))
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("qs_live_… or qs_test_…")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// The API's routes with their OpenAPI description.
pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(tenancy::operator_create_tenant))
        .routes(routes!(tenancy::create_key, tenancy::list_keys))
        .routes(routes!(tenancy::revoke_key))
        .routes(routes!(tenancy::list_events))
        .routes(routes!(tenancy::get_event))
        .routes(routes!(catalog::create_feature, catalog::list_features))
        .routes(routes!(catalog::get_feature, catalog::replace_feature))
        .routes(routes!(catalog::create_plan, catalog::list_plans))
        .routes(routes!(catalog::get_plan, catalog::replace_plan))
        .routes(routes!(catalog::create_variant))
        .routes(routes!(catalog::archive_variant))
        .routes(routes!(catalog::get_settings, catalog::update_settings))
        .routes(routes!(credits::create_grant))
        .routes(routes!(credits::void_block))
        .routes(routes!(credits::create_adjustment))
        .routes(routes!(credits::balance))
        .routes(routes!(credits::ledger))
        .routes(routes!(usage::record_usage))
        .routes(routes!(usage::record_batch))
        .routes(routes!(usage::check))
        .routes(routes!(usage::list))
        .routes(routes!(reservations::create))
        .routes(routes!(reservations::get))
        .routes(routes!(reservations::commit))
        .routes(routes!(reservations::release))
        .routes(routes!(reservations::extend))
        .routes(routes!(leases::create, leases::list))
        .routes(routes!(leases::get))
        .routes(routes!(leases::report))
        .routes(routes!(leases::release))
        .routes(routes!(leases::batch))
        .routes(routes!(subscriptions::create, subscriptions::list))
        .routes(routes!(subscriptions::get))
        .routes(routes!(subscriptions::renew))
        .routes(routes!(subscriptions::pause))
        .routes(routes!(subscriptions::resume))
        .routes(routes!(subscriptions::cancel))
        .routes(routes!(subscriptions::change))
        .routes(routes!(subscriptions::get_clock))
        .routes(routes!(subscriptions::advance_clock))
        .routes(routes!(webhooks::create, webhooks::list))
        .routes(routes!(webhooks::get, webhooks::update, webhooks::delete))
        .routes(routes!(webhooks::test))
        .routes(routes!(webhooks::redeliver))
        .routes(routes!(sync::snapshot))
        .routes(routes!(sync::stream))
        .routes(routes!(sync::nats))
}

/// The OpenAPI document (3.1) of the whole API, with the responses every operation
/// shares (see [`openapi::complete`]).
pub fn openapi() -> serde_json::Value {
    document(&api_router().split_for_parts().1)
}

fn document(openapi: &utoipa::openapi::OpenApi) -> serde_json::Value {
    let mut document = serde_json::to_value(openapi).unwrap_or_default();
    openapi::complete(&mut document);
    document
}

/// The whole application: the API, operational endpoints and middleware.
pub fn app(state: AppState) -> Router {
    app_with(state, Router::new())
}

/// The application with `extra` routes beside the API's (the console), under the same
/// middleware.
pub fn app_with(state: AppState, extra: Router<AppState>) -> Router {
    let (router, openapi) = api_router().split_for_parts();
    let router = router.merge(extra);
    let openapi_json = document(&openapi);
    let limit = state.config().body_limit_bytes;
    let request_id = HeaderName::from_static("x-request-id");
    router
        .route("/openapi.json", axum::routing::get(move || async move { axum::Json(openapi_json.clone()) }))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(metrics_endpoint))
        .fallback(|| async { ApiError::NotFound("route".into()) })
        .method_not_allowed_fallback(|| async { method_not_allowed() })
        .layer(middleware::from_fn(record_metrics))
        .layer(middleware::from_fn_with_state(limit, body_limit_problem))
        .layer(RequestBodyLimitLayer::new(limit))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<axum::body::Body>| {
            let id = request.headers().get("x-request-id").and_then(|value| value.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
        }))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
}

fn method_not_allowed() -> Response {
    let problem = protocol::Problem::new(
        405,
        "invalid_request",
        "Method not allowed",
        "this path does not take that method",
    );
    crate::error::problem_response(&problem)
}

/// `GET /readyz`: ready when the store answers.
async fn readyz(State(state): State<AppState>) -> Response {
    match state.store().environments().await {
        Ok(_) => "ready".into_response(),
        Err(error) => {
            tracing::warn!(%error, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response()
        }
    }
}

/// `GET /metrics`: Prometheus text.
async fn metrics_endpoint(State(state): State<AppState>) -> Response {
    match state.metrics() {
        Some(handle) => {
            let mut response = handle.render().into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        None => (
            StatusCode::NOT_FOUND,
            "metrics are not enabled in this process",
        )
            .into_response(),
    }
}

/// Request counts and latency per route template and status.
async fn record_metrics(request: Request<axum::body::Body>, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [("route", route), ("method", method), ("status", status)];
    metrics::counter!("quotastack_http_requests_total", &labels).increment(1);
    metrics::histogram!("quotastack_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Turns the body-limit layer's bare 413 into a problem body.
async fn body_limit_problem(
    State(limit): State<usize>,
    request: Request<axum::body::Body>,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE
        && response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_none_or(|value| value != protocol::PROBLEM_CONTENT_TYPE)
    {
        return ApiError::PayloadTooLarge { limit }.into_response();
    }
    response
}
