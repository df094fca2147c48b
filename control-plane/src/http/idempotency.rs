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
use ledger::{Cx, EndUserState};
use sha2::{Digest, Sha256};

use super::extract::parse_json;
use crate::catalog::CatalogView;
use crate::error::ApiError;
use crate::service::{AppState, Change, ClaimHold, KeyHold};
use crate::store::Changes;
use crate::store::LeaseAsk;
use crate::store::{Claim, Env, IdempotencyAnswer, IdempotencyBegin};

/// What an operation answered.
#[derive(Debug)]
pub struct Done {
    pub status: StatusCode,
    pub body: Vec<u8>,
    /// Whether the operation already stored the answer in its own transaction.
    pub stored: bool,
    /// What to keep for replays when it must differ from this first answer (a created
    /// key's answer is kept without its secret).
    pub replay_body: Option<Vec<u8>>,
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
            replay_body: None,
        })
    }

    /// An answer without a body (204).
    pub fn empty(status: StatusCode) -> Done {
        Done {
            status,
            body: Vec::new(),
            stored: false,
            replay_body: None,
        }
    }

    /// A JSON answer whose replays answer `replay` instead (a secret shown once).
    pub fn json_once<T: serde::Serialize, R: serde::Serialize>(
        status: StatusCode,
        value: &T,
        replay: &R,
    ) -> Result<Done, ApiError> {
        let replay =
            serde_json::to_vec(replay).map_err(|error| ApiError::Internal(error.to_string()))?;
        Ok(Done {
            replay_body: Some(replay),
            ..Done::json(status, value)?
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
/// 422 for a key that is not 1 to 255 printable ASCII characters.
pub fn key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| {
        ApiError::bad_request(
            "Idempotency-Key",
            "must be 1 to 255 printable ASCII characters",
        )
    })?;
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

impl Incoming {
    /// The body as JSON (see [`parse_json`]); an empty body reads as `{}` when `empty_ok`.
    ///
    /// # Errors
    /// As [`parse_json`].
    pub fn json<T: serde::de::DeserializeOwned>(&self, empty_ok: bool) -> Result<T, ApiError> {
        parse_json(&self.headers, &self.body, empty_ok)
    }

    /// The body of an action that takes no options: empty, or a JSON object (its fields
    /// are not read).
    ///
    /// # Errors
    /// As [`parse_json`].
    pub fn no_options(&self) -> Result<(), ApiError> {
        self.json::<serde_json::Map<String, serde_json::Value>>(true)
            .map(drop)
    }
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

/// One end user's operation under the request's idempotency key, claimed in the
/// operation's own transaction ([`run_claiming`]): `change` names the end user and the
/// status the answer is stored with (its key is set here), and the answer is what
/// `operation` returns.
pub async fn run_changing<T: serde::Serialize + Send + 'static>(
    state: &AppState,
    request: &Incoming,
    change: Change<'_>,
    operation: impl Operation<T>,
) -> Response {
    run_changing_then(state, request, change, operation, |_: &T| ()).await
}

/// One end user's operation as [`run_changing`] runs it: once per attempt (a clone each).
pub trait Operation<T>:
    FnOnce(&mut EndUserState, &mut Cx<'_>, &CatalogView) -> Result<(T, Changes), ApiError>
    + Clone
    + Send
    + 'static
{
}

impl<T, F> Operation<T> for F where
    F: FnOnce(&mut EndUserState, &mut Cx<'_>, &CatalogView) -> Result<(T, Changes), ApiError>
        + Clone
        + Send
        + 'static
{
}

/// [`run_changing`], calling `committed` with the operation's value once its change has
/// committed (not for an answer replayed to a retry).
pub async fn run_changing_then<T: serde::Serialize + Send + 'static>(
    state: &AppState,
    request: &Incoming,
    change: Change<'_>,
    operation: impl Operation<T>,
    committed: impl Fn(&T) + Sync,
) -> Response {
    let status = StatusCode::from_u16(change.status).unwrap_or(StatusCode::OK);
    let committed = &committed;
    run_claiming(state, change.env, request, |key| {
        let (change, operation) = (change.clone(), operation.clone());
        async move {
            let change = Change {
                idempotency: key.as_ref(),
                ..change
            };
            let value = state.mutate(change, operation).await?;
            committed(&value);
            Done::stored(status, &value)
        }
    })
    .await
}

/// Runs `operation` under the request's idempotency key, if it has one: a lease is
/// taken first (its own transaction), the answer stored after.
pub async fn run<F, Fut>(state: &AppState, env: &Env, request: &Incoming, operation: F) -> Response
where
    F: FnOnce(Option<KeyHold>) -> Fut,
    Fut: Future<Output = Result<Done, ApiError>>,
{
    let outcome = match asked(state, request) {
        Ok(None) => operation(None).await.map(|done| respond(done, false)),
        Ok(Some(asked)) => leased(state, env, &asked, operation).await,
        Err(error) => Err(error),
    };
    outcome.unwrap_or_else(IntoResponse::into_response)
}

/// Like [`run`], for an operation that is one [`AppState::mutate`] and passes the key it
/// is given there: the key is claimed in that operation's own transaction, so a keyed
/// request costs one transaction, as an unkeyed one does (group commit). If the key was
/// taken already (a repeat, or a request on the classic path holding it), the request
/// goes the classic way, calling `operation` again.
pub async fn run_claiming<F, Fut>(
    state: &AppState,
    env: &Env,
    request: &Incoming,
    operation: F,
) -> Response
where
    F: Fn(Option<KeyHold>) -> Fut,
    Fut: Future<Output = Result<Done, ApiError>>,
{
    let asked = match asked(state, request) {
        Ok(Some(asked)) => asked,
        Ok(None) => {
            return operation(None)
                .await
                .map(|done| respond(done, false))
                .unwrap_or_else(IntoResponse::into_response);
        }
        Err(error) => return error.into_response(),
    };
    let claim = Claim {
        key: asked.key.clone(),
        fingerprint: asked.fingerprint,
        now: state.real_now(),
        keep_until: asked.keep_until(state.real_now()),
    };
    let hold = ClaimHold::new(claim);
    let outcome = match operation(Some(KeyHold::Claim(hold.clone()))).await {
        Ok(done) if done.stored => Ok(respond(done, false)),
        Ok(_) => Err(ApiError::Internal(
            "an operation given a claim did not store its answer".into(),
        )),
        Err(_) if hold.was_taken() => leased(state, env, &asked, operation).await,
        // A refusal is the key's answer: stored with the claim when the operation was
        // refused in its transaction; when it was refused before (an unknown feature,
        // say), the classic way stores it now, or finds what another request stored.
        Err(error) if error.is_stored_decision() => settle_refusal(state, env, &asked, error).await,
        Err(error) => Err(error),
    };
    outcome.unwrap_or_else(IntoResponse::into_response)
}

/// A request's idempotency key, with what identifies the request and how long to keep it.
#[derive(Debug)]
struct Asked {
    key: String,
    fingerprint: [u8; 32],
    retention: Duration,
}

impl Asked {
    fn keep_until(&self, now: ledger::Timestamp) -> ledger::Timestamp {
        now.checked_add(ledger::Span::from_millis(
            i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX),
        ))
        .unwrap_or(now)
    }
}

/// The request's key, if it has one.
fn asked(state: &AppState, request: &Incoming) -> Result<Option<Asked>, ApiError> {
    let Some(key) = key(&request.headers)? else {
        return Ok(None);
    };
    let path = request.uri.path();
    let fingerprint: [u8; 32] = Sha256::new()
        .chain_update(request.method.as_str())
        .chain_update([0])
        .chain_update(path)
        .chain_update([0])
        .chain_update(&request.body)
        .finalize()
        .into();
    let retention = if path.starts_with("/v1/usage") {
        state.config().usage_key_retention
    } else {
        state.config().idempotency_retention
    };
    Ok(Some(Asked {
        key,
        fingerprint,
        retention,
    }))
}

/// What taking the key's lease came to: run the operation, or replay this answer.
enum Taken {
    Run,
    Replay(Done),
}

/// Takes the key's lease, waiting (up to `idempotency_wait`) while another request holds
/// it.
async fn take(state: &AppState, env: &Env, asked: &Asked) -> Result<Taken, ApiError> {
    let wait_until = tokio::time::Instant::now() + state.config().idempotency_wait;
    loop {
        let now = state.real_now();
        match state
            .store()
            .idempotency_begin(LeaseAsk {
                env,
                key: &asked.key,
                fingerprint: &asked.fingerprint,
                now,
                lease_ms: LEASE_MILLIS,
                keep_until: asked.keep_until(now),
            })
            .await?
        {
            IdempotencyBegin::Started => return Ok(Taken::Run),
            IdempotencyBegin::Replay { status, body } => {
                let status = StatusCode::from_u16(status)
                    .map_err(|error| ApiError::Internal(error.to_string()))?;
                return Ok(Taken::Replay(Done {
                    status,
                    body,
                    stored: true,
                    replay_body: None,
                }));
            }
            IdempotencyBegin::Mismatch => return Err(ApiError::IdempotencyKeyReused),
            IdempotencyBegin::InFlight if tokio::time::Instant::now() < wait_until => {
                tokio::time::sleep(POLL).await
            }
            IdempotencyBegin::InFlight => return Err(ApiError::IdempotencyKeyInFlight),
        }
    }
}

/// The classic way: lease, run, store the answer (or the refusal).
async fn leased<F, Fut>(
    state: &AppState,
    env: &Env,
    asked: &Asked,
    operation: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(Option<KeyHold>) -> Fut,
    Fut: Future<Output = Result<Done, ApiError>>,
{
    if let Taken::Replay(done) = take(state, env, asked).await? {
        return Ok(respond(done, true));
    }
    let key = asked.key.clone();
    match operation(Some(KeyHold::Leased(key.clone()))).await {
        Ok(done) => {
            if !done.stored {
                let answer = IdempotencyAnswer {
                    key,
                    status: done.status.as_u16(),
                    body: done
                        .replay_body
                        .clone()
                        .unwrap_or_else(|| done.body.clone()),
                };
                state.store().idempotency_finish(env, &answer).await?;
            }
            Ok(respond(done, false))
        }
        Err(error) if error.is_stored_decision() => {
            store_refusal(state, env, key, &error).await?;
            Err(error)
        }
        Err(error) => {
            state.store().idempotency_abandon(env, &key).await?;
            Err(error)
        }
    }
}

/// Stores a refusal as the leased key's answer.
async fn store_refusal(
    state: &AppState,
    env: &Env,
    key: String,
    error: &ApiError,
) -> Result<(), ApiError> {
    let problem = error.problem();
    let body =
        serde_json::to_vec(&problem).map_err(|error| ApiError::Internal(error.to_string()))?;
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
    Ok(())
}

/// A claiming operation's refusal: the key's answer is the refusal if the claim stored
/// it (a replay of it is found) or nothing did (it is stored now); if another request
/// answered the key meanwhile, that answer is the key's.
async fn settle_refusal(
    state: &AppState,
    env: &Env,
    asked: &Asked,
    error: ApiError,
) -> Result<Response, ApiError> {
    match take(state, env, asked).await? {
        Taken::Run => {
            store_refusal(state, env, asked.key.clone(), &error).await?;
            Err(error)
        }
        Taken::Replay(done) => {
            let this = serde_json::to_vec(&error.problem())
                .map_err(|error| ApiError::Internal(error.to_string()))?;
            if done.body == this {
                // Stored by this request's own transaction.
                Err(error)
            } else {
                Ok(respond(done, true))
            }
        }
    }
}

fn respond(done: Done, replayed: bool) -> Response {
    let content_type = if done.status.is_client_error() || done.status.is_server_error() {
        protocol::PROBLEM_CONTENT_TYPE
    } else {
        "application/json"
    };
    let no_content = done.status == StatusCode::NO_CONTENT;
    let mut response = (done.status, done.body).into_response();
    if !no_content {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}
