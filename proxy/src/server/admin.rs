//! The admin endpoints (`admin_listen`): health, readiness, Prometheus metrics and the
//! quarantine (list, replay).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::outbox::{Outbox, ReplayError};
use crate::replica::{Freshness, Replica};

/// The admin endpoints' state.
#[derive(Clone)]
pub(super) struct Admin {
    pub(super) replica: Arc<Replica>,
    pub(super) outbox: Arc<Outbox>,
    pub(super) spend_log: Arc<crate::spend_log::SpendLog>,
    pub(super) metrics: Option<PrometheusHandle>,
    pub(super) max_staleness: Duration,
}

/// The admin router.
pub(super) fn router(admin: Admin) -> axum::Router {
    axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(metrics_endpoint))
        .route("/quarantine", axum::routing::get(quarantine_list))
        .route("/quarantine/replay", axum::routing::post(quarantine_replay))
        .with_state(admin)
}

async fn readyz(State(admin): State<Admin>) -> impl IntoResponse {
    match admin.replica.freshness(admin.max_staleness) {
        Freshness::Loading => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
        Freshness::Stale => (StatusCode::OK, "stale"),
        Freshness::Fresh => (StatusCode::OK, "ready"),
    }
}

async fn metrics_endpoint(State(admin): State<Admin>) -> impl IntoResponse {
    let depth = super::unacknowledged(&admin.outbox, &admin.spend_log);
    let quarantined = admin.outbox.quarantine_depth();
    // Exact at the moment of reading (housekeeping only refreshes them every 250 ms), so
    // `qs_proxy_outbox_depth 0` means everything admitted so far has been shipped and
    // acknowledged: outbox records and lease spend alike.
    metrics::gauge!("qs_proxy_outbox_depth")
        .set(f64::from(u32::try_from(depth).unwrap_or(u32::MAX)));
    metrics::gauge!("qs_proxy_quarantine_depth")
        .set(f64::from(u32::try_from(quarantined).unwrap_or(u32::MAX)));
    match &admin.metrics {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (
            StatusCode::OK,
            format!(
                "# metrics recorder not installed\nqs_proxy_outbox_depth {depth}\nqs_proxy_quarantine_depth {quarantined}\n"
            ),
        ),
    }
}

/// A problem answer of the admin endpoints.
fn admin_problem(status: StatusCode, code: &str, detail: impl Into<String>) -> Response {
    let problem = protocol::Problem::new(
        status.as_u16(),
        code,
        status.canonical_reason().unwrap_or("Error"),
        detail,
    );
    (
        status,
        [(
            axum::http::header::CONTENT_TYPE,
            protocol::PROBLEM_CONTENT_TYPE,
        )],
        axum::Json(problem),
    )
        .into_response()
}

/// Quarantined records listed per page by default, and at most.
const QUARANTINE_PAGE: usize = 50;
const QUARANTINE_PAGE_MAX: usize = 500;

/// `?limit=`, `?cursor=` (listing) and `?key=` (replay), read by hand so that a bad
/// value is answered with a problem body.
#[derive(Debug, Default, serde::Deserialize)]
struct QuarantineQuery {
    limit: Option<String>,
    cursor: Option<String>,
    key: Option<String>,
}

/// `GET /quarantine?limit=&cursor=`: records the control plane refused for good, oldest
/// first, with the refusal: `{data, next_cursor, depth}`.
async fn quarantine_list(
    State(admin): State<Admin>,
    query: Result<Query<QuarantineQuery>, QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(rejection) => {
            return admin_problem(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                rejection.body_text(),
            );
        }
    };
    let limit = match query.limit.as_deref().map(str::parse::<usize>) {
        None => QUARANTINE_PAGE,
        Some(Ok(limit)) if (1..=QUARANTINE_PAGE_MAX).contains(&limit) => limit,
        Some(_) => {
            return admin_problem(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("limit must be 1 to {QUARANTINE_PAGE_MAX}"),
            );
        }
    };
    match admin.outbox.quarantined(limit, query.cursor.as_deref()) {
        Ok((data, next_cursor)) => axum::Json(serde_json::json!({
            "data": data,
            "next_cursor": next_cursor,
            "depth": admin.outbox.quarantine_depth(),
        }))
        .into_response(),
        Err(error) => {
            tracing::error!(%error, "listing the quarantine failed");
            admin_problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the quarantine could not be read",
            )
        }
    }
}

/// `POST /quarantine/replay[?key=]`: moves one quarantined record (or all of them) back
/// into the outbox to be shipped again: `{replayed}`.
async fn quarantine_replay(
    State(admin): State<Admin>,
    query: Result<Query<QuarantineQuery>, QueryRejection>,
) -> Response {
    let key = match query {
        Ok(Query(query)) => query.key,
        Err(rejection) => {
            return admin_problem(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                rejection.body_text(),
            );
        }
    };
    let (outbox, replica) = (admin.outbox.clone(), admin.replica.clone());
    let replayed =
        tokio::task::spawn_blocking(move || outbox.replay(&replica, key.as_deref())).await;
    match replayed {
        Ok(Ok(replayed)) => axum::Json(serde_json::json!({ "replayed": replayed })).into_response(),
        Ok(Err(error @ ReplayError::NotFound(_))) => {
            admin_problem(StatusCode::NOT_FOUND, "not_found", error.to_string())
        }
        Ok(Err(error)) => {
            tracing::error!(%error, "replaying the quarantine failed");
            admin_problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the quarantine could not be replayed",
            )
        }
        Err(error) => {
            tracing::error!(%error, "the replay task failed");
            admin_problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the quarantine could not be replayed",
            )
        }
    }
}
