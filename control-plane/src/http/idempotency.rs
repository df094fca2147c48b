//! Idempotency keys (SPEC 9): the first request with a key runs and its decision is
//! stored; a repeat with the same method, path and body replays it; a different request
//! with the key answers 409; a repeat while the first still runs waits, then replays or
//! answers 409.

use std::future::Future;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::service::AppState;
use crate::store::{Env, IdempotencyAnswer, IdempotencyBegin};

/// What an operation answered.
#[derive(Debug)]
pub struct Done {
    pub status: StatusCode,
    pub body: Vec<u8>,
    /// Whether the operation already stored the answer in its own transaction.
    pub stored: bool,
}

impl Done {
    /// A JSON answer that the operation did not store itself.
    pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Result<Done, ApiError> {
        let body =
            serde_json::to_vec(value).map_err(|error| ApiError::Internal(error.to_string()))?;
        Ok(Done {
            status,
            body,
            stored: false,
        })
    }

    /// A JSON answer already stored with the mutation.
    pub fn stored<T: serde::Serialize>(status: StatusCode, value: &T) -> Result<Done, ApiError> {
        Ok(Done {
            stored: true,
            ..Done::json(status, value)?
        })
    }
}

/// How long a first request may hold its key before a repeat may take over.
const LEASE_MILLIS: i64 = 30_000;
/// How often a waiting repeat looks again.
const POLL: Duration = Duration::from_millis(20);

/// The request's `Idempotency-Key`, validated.
///
/// # Errors
/// 400 for a key that is not 1 to 255 printable ASCII characters.
pub fn key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::bad_request("Idempotency-Key", "must be printable ASCII"))?;
    protocol::check_idempotency_key("Idempotency-Key", text)?;
    Ok(Some(text.to_owned()))
}

/// A mutating request as idempotency sees it: method, path, headers and the raw body.
#[derive(Debug)]
pub struct Incoming {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl FromRequest<AppState> for Incoming {
    type Rejection = ApiError;

    async fn from_request(request: Request<Body>, state: &AppState) -> Result<Incoming, ApiError> {
        let (parts, body) = request.into_parts();
        let body = Bytes::from_request(Request::from_parts(parts.clone(), body), state)
            .await
            .map_err(|rejection| match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge {
                    limit: state.config().body_limit_bytes,
                },
                _ => ApiError::BadRequest {
                    field: None,
                    detail: rejection.body_text(),
                },
            })?;
        Ok(Incoming {
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            body,
        })
    }
}

/// Runs `operation` under the request's idempotency key, if it has one.
pub async fn run<F, Fut>(state: &AppState, env: &Env, request: &Incoming, operation: F) -> Response
where
    F: FnOnce(Option<String>) -> Fut,
    Fut: Future<Output = Result<Done, ApiError>>,
{
    let path = request.uri.path();
    match run_inner(
        state,
        env,
        &request.headers,
        &request.method,
        path,
        &request.body,
        operation,
    )
    .await
    {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn run_inner<F, Fut>(
    state: &AppState,
    env: &Env,
    headers: &HeaderMap,
    method: &Method,
    path: &str,
    body: &[u8],
    operation: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(Option<String>) -> Fut,
    Fut: Future<Output = Result<Done, ApiError>>,
{
    let Some(key) = key(headers)? else {
        return Ok(respond(operation(None).await?, false));
    };
    let fingerprint: [u8; 32] = Sha256::new()
        .chain_update(method.as_str())
        .chain_update([0])
        .chain_update(path)
        .chain_update([0])
        .chain_update(body)
        .finalize()
        .into();
    let retention = if path.starts_with("/v1/usage") {
        state.config().usage_key_retention
    } else {
        state.config().idempotency_retention
    };
    let wait_until = tokio::time::Instant::now() + state.config().idempotency_wait;
    loop {
        let now = state.real_now();
        let keep_until = now
            .checked_add(ledger::Span::from_millis(
                i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
            ))
            .unwrap_or(now);
        match state
            .store()
            .idempotency_begin(env, &key, &fingerprint, now, LEASE_MILLIS, keep_until)
            .await?
        {
            IdempotencyBegin::Started => break,
            IdempotencyBegin::Replay { status, body } => {
                let status = StatusCode::from_u16(status)
                    .map_err(|error| ApiError::Internal(error.to_string()))?;
                return Ok(respond(
                    Done {
                        status,
                        body,
                        stored: true,
                    },
                    true,
                ));
            }
            IdempotencyBegin::Mismatch => return Err(ApiError::IdempotencyKeyReused),
            IdempotencyBegin::InFlight if tokio::time::Instant::now() < wait_until => {
                tokio::time::sleep(POLL).await
            }
            IdempotencyBegin::InFlight => return Err(ApiError::IdempotencyKeyInFlight),
        }
    }
    match operation(Some(key.clone())).await {
        Ok(done) => {
            if !done.stored {
                let answer = IdempotencyAnswer {
                    key,
                    status: done.status.as_u16(),
                    body: done.body.clone(),
                };
                state.store().idempotency_finish(env, &answer).await?;
            }
            Ok(respond(done, false))
        }
        Err(error) if error.is_stored_decision() => {
            let problem = error.problem();
            let body = serde_json::to_vec(&problem)
                .map_err(|error| ApiError::Internal(error.to_string()))?;
            state
                .store()
                .idempotency_finish(
                    env,
                    &IdempotencyAnswer {
                        key,
                        status: problem.status,
                        body,
                    },
                )
                .await?;
            Err(error)
        }
        Err(error) => {
            state.store().idempotency_abandon(env, &key).await?;
            Err(error)
        }
    }
}

fn respond(done: Done, replayed: bool) -> Response {
    let content_type = if done.status.is_client_error() || done.status.is_server_error() {
        protocol::PROBLEM_CONTENT_TYPE
    } else {
        "application/json"
    };
    let mut response = (done.status, done.body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}
