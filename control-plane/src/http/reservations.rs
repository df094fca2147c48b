//! Reservations (SPEC 7): hold, get, commit, release, extend.

use axum::Json;
use axum::http::StatusCode;
use axum::response::Response;
use ledger::{Refusal, ReservationId, ReservationStatus};
use protocol::{CommitReservation, CreateReservation, ExtendReservation, Problem, Reservation};

use super::extract::{Act, ApiPath, Call};
use super::idempotency::{self, Done, Incoming};
use crate::auth::Scope;
use crate::error::ApiError;
use crate::service::AppState;
use crate::service::Change;
use crate::store::{Changes, Env};

/// `POST /v1/reservations`: holds credits for a long job.
#[utoipa::path(post, path = "/v1/reservations", tag = "reservations", request_body = CreateReservation,
    responses((status = 201, body = Reservation), (status = 400, body = Problem), (status = 402, body = Problem)))]
pub async fn create(call: Call, incoming: Incoming) -> Result<Response, ApiError> {
    let (state, caller) = call.scoped(Scope::Write)?;
    let request: CreateReservation = incoming.json(false)?;
    let (end_user, request) = request.to_ledger()?;
    let change = Change::new(&caller.env, &end_user, None).created();
    let response = idempotency::run_changing(&state, &incoming, change, move |user, cx, _| {
        let (reservation, changes) = Changes::from_applied(user.reserve(cx, request.clone())?);
        Ok((answer(&reservation, user), changes))
    });
    Ok(response.await)
}

/// The answer to a change of `reservation`, just made to `user`: with the version of
/// the state that first includes it, for proxies to know when their replica shows it.
fn answer(reservation: &ledger::Reservation, user: &ledger::EndUserState) -> Reservation {
    Reservation {
        version: Some(user.version()),
        ..Reservation::from(reservation)
    }
}

fn parse_reservation_id(id: &str) -> Result<ReservationId, ApiError> {
    ReservationId::parse(id).ok_or_else(|| ApiError::NotFound(format!("reservation `{id}`")))
}

/// The stored reservation, which must belong to the caller's environment.
async fn stored(
    state: &AppState,
    env: &Env,
    id: ReservationId,
) -> Result<ledger::Reservation, ApiError> {
    state
        .store()
        .reservation(env, &id.to_string())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("reservation {id}")))
}

/// `GET /v1/reservations/{id}`.
#[utoipa::path(get, path = "/v1/reservations/{id}", tag = "reservations", params(("id" = String, Path)),
    responses((status = 200, body = Reservation), (status = 404, body = Problem)))]
pub async fn get(call: Call, ApiPath(id): ApiPath<String>) -> Result<Json<Reservation>, ApiError> {
    let (state, caller) = call.scoped(Scope::Read)?;
    let reservation = stored(&state, &caller.env, parse_reservation_id(&id)?).await?;
    Ok(Json(Reservation::from(&reservation)))
}

/// Which resolution a request asks for.
#[derive(Debug, Clone, Copy)]
enum Resolve {
    Commit(ledger::CommitSize),
    Release,
    Extend(i64),
}

async fn resolve(
    act: Act,
    parse: fn(&Incoming) -> Result<Resolve, ApiError>,
) -> Result<Response, ApiError> {
    let (state, caller, id, incoming) = act.into_parts();
    caller.require(Scope::Write)?;
    let action = parse(&incoming)?;
    let id = parse_reservation_id(&id)?;
    let (state, env, action) = (&state, &caller.env, &action);
    Ok(
        idempotency::run_claiming(state, env, &incoming, |key| async move {
            let action = *action;
            let current = stored(state, env, id).await?;
            if current.status != ReservationStatus::Active {
                return Err(not_active(id, current.status));
            }
            let reservation = state
                .mutate(
                    Change::new(env, &current.end_user_id, key.as_ref()),
                    move |user, cx, _| {
                        let applied = match action {
                            Resolve::Commit(size) => user.commit(cx, id, size),
                            Resolve::Release => user.release(cx, id),
                            Resolve::Extend(ttl) => user.extend(cx, id, ttl),
                        };
                        let applied = applied.map_err(|refusal| match refusal {
                            Refusal::ReservationNotActive { status } => not_active(id, status),
                            other => other.into(),
                        })?;
                        let (reservation, changes) = Changes::from_applied(applied);
                        Ok((answer(&reservation, user), changes))
                    },
                )
                .await?;
            Done::stored(StatusCode::OK, &reservation)
        })
        .await,
    )
}

fn not_active(id: ReservationId, status: ReservationStatus) -> ApiError {
    ApiError::ReservationNotActive {
        status: status.as_str().to_owned(),
        detail: format!("reservation {id} is {status}, not active"),
    }
}

/// `POST /v1/reservations/{id}/commit`: debits the actual cost and releases the rest.
#[utoipa::path(post, path = "/v1/reservations/{id}/commit", tag = "reservations", params(("id" = String, Path)), request_body = Option<CommitReservation>,
    responses((status = 200, body = Reservation), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn commit(act: Act) -> Result<Response, ApiError> {
    resolve(act, |request| {
        let request: CommitReservation = request.json(true)?;
        Ok(Resolve::Commit(request.to_ledger()?))
    })
    .await
}

/// `POST /v1/reservations/{id}/release`: releases everything held.
#[utoipa::path(post, path = "/v1/reservations/{id}/release", tag = "reservations", params(("id" = String, Path)),
    responses((status = 200, body = Reservation), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn release(act: Act) -> Result<Response, ApiError> {
    resolve(act, |request| {
        request.no_options().map(|()| Resolve::Release)
    })
    .await
}

/// `POST /v1/reservations/{id}/extend`: a heartbeat for long jobs.
#[utoipa::path(post, path = "/v1/reservations/{id}/extend", tag = "reservations", params(("id" = String, Path)), request_body = ExtendReservation,
    responses((status = 200, body = Reservation), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn extend(act: Act) -> Result<Response, ApiError> {
    resolve(act, |request| {
        let request: ExtendReservation = request.json(false)?;
        Ok(Resolve::Extend(request.ttl_seconds))
    })
    .await
}
