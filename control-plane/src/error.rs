//! The one error type of the HTTP API, and its mapping to RFC 9457 problem bodies with
//! the stable codes of SPEC 13. 5xx answers say little; the log says everything.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ledger::Refusal;
use protocol::{FieldError, PROBLEM_CONTENT_TYPE, Problem};

use crate::store::StoreError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 400: the request does not have the documented shape (not JSON, a missing or
    /// unknown field, a wrong type, a malformed query or header).
    #[error("{detail}")]
    BadRequest {
        field: Option<String>,
        detail: String,
    },
    /// 422: the request has the documented shape, but a value breaks a rule the
    /// document cannot state (an expiry before its start, a private webhook address, a
    /// feature that does not exist in a list of keys, …). `field` names it.
    #[error("{detail}")]
    Invalid { field: String, detail: String },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("this key lacks the `{0}` scope")]
    MissingScope(&'static str),
    #[error("{0} not found")]
    NotFound(String),
    #[error("engine refused: {0}")]
    Refused(Refusal),
    #[error("{detail}")]
    ReservationNotActive { status: String, detail: String },
    #[error("{detail}")]
    InvalidTransition { status: String, detail: String },
    #[error("the idempotency key was used with a different request")]
    IdempotencyKeyReused,
    #[error("a request with this idempotency key is still running")]
    IdempotencyKeyInFlight,
    #[error("{0}")]
    Conflict(String),
    #[error("rate limit exceeded")]
    RateLimited { retry_after_secs: u64 },
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("this key already has {limit} sync streams open here")]
    TooManyStreams { limit: usize },
    /// 503: the database is busy or unreachable, or the transaction lost a race that a
    /// retry resolves; nothing of the request was written.
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A value that breaks a rule (422), naming its field.
    pub fn bad_request(field: impl Into<String>, detail: impl Into<String>) -> ApiError {
        ApiError::Invalid {
            field: field.into(),
            detail: detail.into(),
        }
    }

    /// `value`, or 404 naming `what` (an object looked up by id).
    pub fn found<T>(value: Option<T>, what: impl std::fmt::Display) -> Result<T, ApiError> {
        value.ok_or_else(|| ApiError::NotFound(what.to_string()))
    }

    /// A request that does not have the documented shape (400).
    pub fn malformed(field: Option<String>, detail: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            field,
            detail: detail.into(),
        }
    }

    /// The problem body and HTTP status.
    #[allow(
        clippy::too_many_lines,
        reason = "one arm per error: SPEC 13's table of codes, in one place"
    )]
    pub fn problem(&self) -> Problem {
        match self {
            ApiError::BadRequest { field, detail } => {
                let mut problem =
                    Problem::new(400, "invalid_request", "Invalid request", detail.clone());
                problem.field.clone_from(field);
                problem
            }
            ApiError::Invalid { field, detail } => {
                let mut problem =
                    Problem::new(422, "invalid_request", "Invalid request", detail.clone());
                problem.field = Some(field.clone());
                problem
            }
            ApiError::UnsupportedMediaType(detail) => Problem::new(
                415,
                "invalid_request",
                "Unsupported media type",
                detail.clone(),
            ),
            ApiError::Unauthorized => Problem::new(
                401,
                "unauthorized",
                "Unauthorized",
                "send a valid API key as `Authorization: Bearer <key>` or `X-API-Key: <key>`",
            ),
            ApiError::MissingScope(scope) => Problem::new(
                403,
                "missing_scope",
                "Missing scope",
                format!("this key lacks the `{scope}` scope"),
            ),
            ApiError::NotFound(what) => {
                Problem::new(404, "not_found", "Not found", format!("{what} not found"))
            }
            ApiError::Refused(refusal) => refusal_problem(refusal),
            ApiError::ReservationNotActive { status, detail }
            | ApiError::InvalidTransition { status, detail } => {
                let (code, title) = match self {
                    ApiError::ReservationNotActive { .. } => {
                        ("reservation_not_active", "Reservation not active")
                    }
                    _ => ("invalid_transition", "Invalid transition"),
                };
                Problem {
                    current_status: Some(status.clone()),
                    ..Problem::new(409, code, title, detail.clone())
                }
            }
            ApiError::IdempotencyKeyReused => Problem::new(
                409,
                "idempotency_key_reused",
                "Idempotency key reused",
                "this idempotency key was already used with a different method, path or body",
            ),
            ApiError::IdempotencyKeyInFlight => Problem::new(
                409,
                "idempotency_key_in_flight",
                "Idempotency key in flight",
                "a request with this idempotency key is still running; retry later",
            ),
            ApiError::Conflict(detail) => Problem::new(409, "conflict", "Conflict", detail.clone()),
            ApiError::RateLimited { retry_after_secs } => Problem::new(
                429,
                "rate_limited",
                "Too many requests",
                format!("rate limit exceeded; retry after {retry_after_secs} s"),
            ),
            ApiError::TooManyStreams { limit } => Problem::new(
                429,
                "too_many_streams",
                "Too many streams",
                format!(
                    "this key already has {limit} sync streams open on this server (sync.streams_per_key); close one, or use another key"
                ),
            ),
            ApiError::PayloadTooLarge { limit } => Problem::new(
                413,
                "payload_too_large",
                "Payload too large",
                format!("request bodies are limited to {limit} bytes"),
            ),
            ApiError::Unavailable(_) => Problem::new(
                503,
                "unavailable",
                "Temporarily unavailable",
                "the database is busy or unreachable and nothing was written; retry shortly (with the same Idempotency-Key)",
            ),
            ApiError::Internal(_) => Problem::new(
                500,
                "internal",
                "Internal error",
                "something went wrong; it has been logged",
            ),
        }
    }

    /// Whether an idempotent request that ended with this error keeps its answer (SPEC 9:
    /// business refusals do; validation, auth, rate limits and 5xx do not).
    pub fn is_stored_decision(&self) -> bool {
        matches!(self.problem().status, 402 | 404 | 409)
            && !matches!(
                self,
                ApiError::IdempotencyKeyReused | ApiError::IdempotencyKeyInFlight
            )
    }
}

fn refusal_problem(refusal: &Refusal) -> Problem {
    let detail = refusal.to_string();
    match refusal {
        Refusal::InsufficientBalance { needed, available } => {
            let mut problem =
                Problem::new(402, "insufficient_balance", "Insufficient balance", detail);
            problem.needed = Some(needed.get());
            problem.available = Some(available.get());
            problem
        }
        Refusal::NotInPlan(_) => Problem::new(403, "not_in_plan", "Not in plan", detail),
        Refusal::SubscriptionPaused(_) => {
            Problem::new(403, "subscription_paused", "Subscription paused", detail)
        }
        Refusal::SubscriptionPastDue(_) => Problem::new(
            403,
            "subscription_past_due",
            "Subscription past due",
            detail,
        ),
        Refusal::FeatureNotFound(_) => {
            Problem::new(404, "feature_not_found", "Feature not found", detail)
        }
        Refusal::BlockNotFound(_)
        | Refusal::ReservationNotFound(_)
        | Refusal::SubscriptionNotFound(_)
        | Refusal::LeaseNotFound(_)
        | Refusal::VariantNotFound(_) => Problem::new(404, "not_found", "Not found", detail),
        Refusal::LeaseNotActive { status } => {
            let mut problem = Problem::new(409, "lease_not_active", "Lease not active", detail);
            problem.current_status = Some(status.as_str().to_owned());
            problem
        }
        Refusal::SequenceGap { expected } => {
            let mut problem = Problem::new(409, "sequence_gap", "Sequence gap", detail);
            problem.expected = Some(*expected);
            problem
        }
        Refusal::ReservationNotActive { status } => {
            let mut problem = Problem::new(
                409,
                "reservation_not_active",
                "Reservation not active",
                detail,
            );
            problem.current_status = Some(status.as_str().to_owned());
            problem
        }
        Refusal::InvalidTransition { from, .. } => {
            let mut problem = Problem::new(409, "invalid_transition", "Invalid transition", detail);
            problem.current_status = Some(from.as_str().to_owned());
            problem
        }
        Refusal::BlockAlreadyVoided(_) | Refusal::Conflict(_) => {
            Problem::new(409, "conflict", "Conflict", detail)
        }
        Refusal::Invalid { field, .. } => {
            let mut problem = Problem::new(422, "invalid_request", "Invalid request", detail);
            problem.field = Some((*field).to_owned());
            problem
        }
        Refusal::FeatureNotMetered(_) => {
            Problem::new(422, "invalid_request", "Invalid request", detail)
        }
        Refusal::Overflow => Problem::new(
            422,
            "invalid_request",
            "Invalid request",
            "an amount is too large: the arithmetic overflows",
        ),
        Refusal::CatchingUp { .. } => Problem::new(
            503,
            "catching_up",
            "Catching up",
            format!("{detail}; retry shortly"),
        ),
        Refusal::LimitReached { .. } => Problem::new(422, "limit_reached", "Limit reached", detail),
        Refusal::Invariant(_) => Problem::new(
            500,
            "internal",
            "Internal error",
            "something went wrong; it has been logged",
        ),
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> ApiError {
        match refusal {
            Refusal::Invariant(message) => ApiError::Internal(message),
            other => ApiError::Refused(other),
        }
    }
}

impl From<ledger::Overflow> for ApiError {
    fn from(_: ledger::Overflow) -> ApiError {
        ApiError::Refused(Refusal::Overflow)
    }
}

impl From<FieldError> for ApiError {
    fn from(error: FieldError) -> ApiError {
        ApiError::Invalid {
            detail: error.to_string(),
            field: error.field,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match error {
            StoreError::Conflict(detail) => ApiError::Conflict(detail),
            StoreError::Transient(message) => ApiError::Unavailable(message),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// Renders a problem as a response with the problem media type.
pub fn problem_response(problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(problem).unwrap_or_default();
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
    );
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Internal(message) => tracing::error!(error = %message, "internal error"),
            ApiError::Unavailable(message) => {
                metrics::counter!("quotastack_unavailable_total").increment(1);
                tracing::warn!(error = %message, "transient database error; answered 503");
            }
            _ => {}
        }
        let mut response = problem_response(&self.problem());
        let retry_after_secs = match self {
            ApiError::RateLimited { retry_after_secs } => Some(retry_after_secs),
            ApiError::TooManyStreams { .. } => Some(1),
            ApiError::Refused(Refusal::CatchingUp { .. }) | ApiError::Unavailable(_) => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after_secs
            && let Ok(value) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transient_database_error_answers_503_with_retry_after_and_says_nothing_of_it() {
        let error = ApiError::from(StoreError::Transient(
            "database is locked at /var/lib/quotastack/qs.db".into(),
        ));
        assert!(matches!(error, ApiError::Unavailable(_)));
        let problem = error.problem();
        assert_eq!(
            (problem.status, problem.code.as_str()),
            (503, "unavailable")
        );
        assert!(
            !problem.detail.contains("/var/lib"),
            "no internals in the answer"
        );
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response.headers().get(header::RETRY_AFTER),
            Some(&HeaderValue::from_static("1"))
        );
    }

    #[test]
    fn a_lasting_database_error_answers_500() {
        let error = ApiError::from(StoreError::Fatal("no such table: blocks".into()));
        assert_eq!(error.problem().status, 500);
        assert!(
            error
                .into_response()
                .headers()
                .get(header::RETRY_AFTER)
                .is_none()
        );
    }
}
