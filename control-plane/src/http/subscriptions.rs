//! Subscriptions (SPEC 10.2) and the test clock (SPEC 10.3).

use axum::Json;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use ledger::{CancelAt, ChangeAt, Refusal, SubscriptionId, VariantId};
use protocol::{
    AdvancePending, AdvanceTestClock, AdvancedTestClock, CancelSubscription, ChangeSubscription,
    CreateSubscription, Page, Problem, RenewSubscription, Subscription, TestClock, WhenWire,
};

use super::credits::page_limit;
use super::extract::{Act, ApiPath, Call, parse_json, query_params};
use super::idempotency::{self, Done, Incoming};
use crate::auth::Scope;
use crate::catalog::CatalogView;
use crate::error::ApiError;
use crate::service::AppState;
use crate::service::Change;
use crate::store::{Changes, Env, Environment, SubscriptionFilter};

/// A variant named by id, `<plan>/<variant>` or an unambiguous key, not archived.
fn resolve_variant(view: &CatalogView, field: &str, text: &str) -> Result<VariantId, ApiError> {
    let record = view
        .find_variant(text)
        .ok_or_else(|| ApiError::bad_request(field, format!("no plan variant `{text}`")))?;
    if record.archived {
        return Err(ApiError::bad_request(
            field,
            format!("plan variant `{text}` is archived"),
        ));
    }
    record
        .id
        .parse()
        .map_err(|error: String| ApiError::Internal(error))
}

fn wire(view: &CatalogView, subscription: &ledger::Subscription) -> Subscription {
    Subscription::new(
        subscription,
        view.catalog.variant(subscription.plan_variant_id),
    )
}

/// `POST /v1/subscriptions`.
#[utoipa::path(post, path = "/v1/subscriptions", tag = "subscriptions", request_body = CreateSubscription,
    responses((status = 201, body = Subscription), (status = 400, body = Problem), (status = 409, body = Problem)))]
pub async fn create(call: Call, incoming: Incoming) -> Result<Response, ApiError> {
    let (state, caller) = call.scoped(Scope::Write)?;
    let request: CreateSubscription = parse_json(&incoming.headers, &incoming.body, false)?;
    let end_user = request.end_user()?;
    let (state, env, request, end_user) = (&state, &caller.env, &request, &end_user);
    Ok(
        idempotency::run_claiming(state, env, &incoming, |key| async move {
            let view = state.view(env).await?;
            let variant = resolve_variant(&view, "plan_variant_id", &request.plan_variant_id)?;
            let subscribe = ledger::SubscribeRequest {
                plan_variant_id: variant,
                trial_days: request.trial_days,
                start_at: request.start_at.map(|time| time.0),
            };
            let subscription = state
                .mutate(
                    Change::new(env, end_user, key.as_ref()).created(),
                    move |user, cx, view| {
                        let (subscription, changes) =
                            Changes::from_applied(user.subscribe(cx, subscribe.clone())?);
                        Ok((wire(view, &subscription), changes))
                    },
                )
                .await?;
            Done::stored(StatusCode::CREATED, &subscription)
        })
        .await,
    )
}

fn parse_subscription_id(id: &str) -> Result<SubscriptionId, ApiError> {
    SubscriptionId::parse(id).ok_or_else(|| ApiError::NotFound(format!("subscription `{id}`")))
}

/// `GET /v1/subscriptions/{id}`.
#[utoipa::path(get, path = "/v1/subscriptions/{id}", tag = "subscriptions", params(("id" = String, Path)),
    responses((status = 200, body = Subscription), (status = 404, body = Problem)))]
pub async fn get(call: Call, ApiPath(id): ApiPath<String>) -> Result<Json<Subscription>, ApiError> {
    let (state, caller) = call.scoped(Scope::Read)?;
    let id = parse_subscription_id(&id)?;
    let subscription = state
        .store()
        .subscription(&caller.env, &id.to_string())
        .await?;
    let subscription = ApiError::found(subscription, format_args!("subscription {id}"))?;
    let view = state.view(&caller.env).await?;
    Ok(Json(wire(&view, &subscription)))
}

query_params! {
    pub struct ListQuery {
        end_user_id: Option<String>,
    } paged
}

/// `GET /v1/subscriptions`: ordered by id, optionally for one end user.
#[utoipa::path(get, path = "/v1/subscriptions", tag = "subscriptions", params(ListQuery),
    responses((status = 200, body = Page<Subscription>), (status = 400, body = Problem)))]
pub async fn list(call: Call, uri: Uri) -> Result<Json<Page<Subscription>>, ApiError> {
    let (state, caller) = call.scoped(Scope::Read)?;
    let (query, _) = ListQuery::parse(&uri)?;
    let limit = page_limit(query.limit)?;
    if let Some(cursor) = &query.cursor
        && SubscriptionId::parse(cursor).is_none()
    {
        return Err(ApiError::bad_request(
            "cursor",
            "is not a cursor from this list",
        ));
    }
    let rows = state
        .store()
        .subscriptions(
            &caller.env,
            SubscriptionFilter {
                end_user_id: query.end_user_id.as_deref(),
                after: query.cursor.as_deref(),
                limit,
            },
        )
        .await?;
    let view = state.view(&caller.env).await?;
    let next_cursor = (rows.len() == usize::try_from(limit).unwrap_or(usize::MAX))
        .then(|| rows.last().map(|row| row.id.to_string()))
        .flatten();
    Ok(Json(Page {
        data: rows.iter().map(|row| wire(&view, row)).collect(),
        next_cursor,
    }))
}

/// A lifecycle operation.
#[derive(Debug, Clone)]
enum Lifecycle {
    Renew(u32),
    Pause,
    Resume,
    Cancel(CancelAt, bool),
    Change(String, Option<ChangeAt>),
}

impl Lifecycle {
    fn name(&self) -> &'static str {
        match self {
            Lifecycle::Renew(_) => "renew",
            Lifecycle::Pause => "pause",
            Lifecycle::Resume => "resume",
            Lifecycle::Cancel(..) => "cancel",
            Lifecycle::Change(..) => "change",
        }
    }
}

async fn lifecycle(
    act: Act,
    parse: impl FnOnce(&Incoming) -> Result<Lifecycle, ApiError>,
) -> Result<Response, ApiError> {
    let (state, caller, id, incoming) = act.into_parts();
    caller.require(Scope::Write)?;
    let operation = parse(&incoming)?;
    let id = parse_subscription_id(&id)?;
    let (state, env, operation) = (&state, &caller.env, &operation);
    Ok(
        idempotency::run_claiming(state, env, &incoming, |key| async move {
            let operation = operation.clone();
            let current = state.store().subscription(env, &id.to_string()).await?;
            let current = ApiError::found(current, format_args!("subscription {id}"))?;
            if current.status.is_terminal() {
                return Err(ApiError::InvalidTransition {
                    status: current.status.as_str().to_owned(),
                    detail: format!(
                        "cannot {} a subscription that is {}",
                        operation.name(),
                        current.status
                    ),
                });
            }
            let view = state.view(env).await?;
            let target = match &operation {
                Lifecycle::Change(text, _) => {
                    Some(resolve_variant(&view, "plan_variant_id", text)?)
                }
                _ => None,
            };
            let subscription = state
                .mutate(
                    Change::new(env, &current.end_user_id, key.as_ref()),
                    move |user, cx, view| {
                        let applied = match (&operation, target) {
                            (Lifecycle::Renew(periods), _) => user.renew(cx, id, *periods),
                            (Lifecycle::Pause, _) => user.pause(cx, id),
                            (Lifecycle::Resume, _) => user.resume(cx, id),
                            (Lifecycle::Cancel(at, revoke), _) => user.cancel(cx, id, *at, *revoke),
                            (Lifecycle::Change(_, at), Some(variant)) => {
                                user.change(cx, id, variant, *at)
                            }
                            (Lifecycle::Change(..), None) => {
                                return Err(ApiError::Internal("change without a variant".into()));
                            }
                        };
                        let applied = applied.map_err(|refusal| match refusal {
                            // Due work may have ended it just now.
                            Refusal::SubscriptionNotFound(_) => ApiError::InvalidTransition {
                                status: "ended".into(),
                                detail: format!("subscription {id} has just ended"),
                            },
                            other => other.into(),
                        })?;
                        let (subscription, changes) = Changes::from_applied(applied);
                        Ok((wire(view, &subscription), changes))
                    },
                )
                .await?;
            Done::stored(StatusCode::OK, &subscription)
        })
        .await,
    )
}

/// The body of a step that takes no options, read as `step`.
fn no_options(step: Lifecycle) -> impl FnOnce(&Incoming) -> Result<Lifecycle, ApiError> {
    move |request| request.no_options().map(|()| step)
}

fn when(at: WhenWire) -> (CancelAt, ChangeAt) {
    match at {
        WhenWire::PeriodEnd => (CancelAt::PeriodEnd, ChangeAt::PeriodEnd),
        WhenWire::Immediate => (CancelAt::Immediate, ChangeAt::Immediate),
    }
}

/// `POST /v1/subscriptions/{id}/renew`: records payment for coming periods.
#[utoipa::path(post, path = "/v1/subscriptions/{id}/renew", tag = "subscriptions", params(("id" = String, Path)), request_body = Option<RenewSubscription>,
    responses((status = 200, body = Subscription), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn renew(act: Act) -> Result<Response, ApiError> {
    lifecycle(act, |request| {
        let request: RenewSubscription = request.json(true)?;
        Ok(Lifecycle::Renew(request.periods))
    })
    .await
}

/// `POST /v1/subscriptions/{id}/pause`.
#[utoipa::path(post, path = "/v1/subscriptions/{id}/pause", tag = "subscriptions", params(("id" = String, Path)),
    responses((status = 200, body = Subscription), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn pause(act: Act) -> Result<Response, ApiError> {
    lifecycle(act, no_options(Lifecycle::Pause)).await
}

/// `POST /v1/subscriptions/{id}/resume`.
#[utoipa::path(post, path = "/v1/subscriptions/{id}/resume", tag = "subscriptions", params(("id" = String, Path)),
    responses((status = 200, body = Subscription), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn resume(act: Act) -> Result<Response, ApiError> {
    lifecycle(act, no_options(Lifecycle::Resume)).await
}

/// `POST /v1/subscriptions/{id}/cancel`.
#[utoipa::path(post, path = "/v1/subscriptions/{id}/cancel", tag = "subscriptions", params(("id" = String, Path)), request_body = Option<CancelSubscription>,
    responses((status = 200, body = Subscription), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn cancel(act: Act) -> Result<Response, ApiError> {
    lifecycle(act, |request| {
        let request: CancelSubscription = request.json(true)?;
        Ok(Lifecycle::Cancel(
            when(request.at).0,
            request.revoke_credits,
        ))
    })
    .await
}

/// `POST /v1/subscriptions/{id}/change`: upgrade (now by default) or downgrade (at period end).
#[utoipa::path(post, path = "/v1/subscriptions/{id}/change", tag = "subscriptions", params(("id" = String, Path)), request_body = ChangeSubscription,
    responses((status = 200, body = Subscription), (status = 400, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn change(act: Act) -> Result<Response, ApiError> {
    lifecycle(act, |request| {
        let request: ChangeSubscription = request.json(false)?;
        Ok(Lifecycle::Change(
            request.plan_variant_id,
            request.at.map(|at| when(at).1),
        ))
    })
    .await
}

fn test_clock(view: &CatalogView, state: &AppState) -> TestClock {
    TestClock {
        now: state.env_now(view).into(),
        offset_seconds: view.env.clock_offset_ms / 1000,
    }
}

/// `GET /v1/test-clock`: the environment's instant (`live` always shows the real clock).
#[utoipa::path(get, path = "/v1/test-clock", tag = "test clock", responses((status = 200, body = TestClock)))]
pub async fn get_clock(call: Call) -> Result<Json<TestClock>, ApiError> {
    let (state, caller) = call.scoped(Scope::Read)?;
    let view = state.view(&caller.env).await?;
    Ok(Json(test_clock(&view, &state)))
}

/// The longest one call may move a test clock (a year and a day: a yearly renewal fits).
pub const ADVANCE_SECS_MAX: i64 = 366 * 86_400;

/// How long (real time) one advance works at most on the due work and webhooks it brings
/// before it answers; the rest runs in the background and the answer says so.
pub const ADVANCE_BUDGET: std::time::Duration = std::time::Duration::from_secs(20);

/// `POST /v1/test-clock/advance`: moves the `test` environment's clock forward and runs
/// every job due in between before answering.
#[utoipa::path(post, path = "/v1/test-clock/advance", tag = "test clock", request_body = AdvanceTestClock,
    responses((status = 200, body = AdvancedTestClock), (status = 400, body = Problem), (status = 409, body = Problem)))]
pub async fn advance_clock(call: Call, incoming: Incoming) -> Result<Response, ApiError> {
    let (state, caller) = call.scoped(Scope::Write)?;
    if caller.env.environment != Environment::Test {
        return Err(ApiError::Conflict(
            "the live environment always uses the real clock; use a qs_test_ key".into(),
        ));
    }
    let request: AdvanceTestClock = parse_json(&incoming.headers, &incoming.body, false)?;
    let (state, env) = (&state, &caller.env);
    Ok(idempotency::run(state, env, &incoming, |_key| async move {
        let clock = advance(state, env, request).await?;
        Done::json(StatusCode::OK, &clock)
    })
    .await)
}

/// The step an advance request asks for, in milliseconds, checked against the bound.
fn advance_step(request: AdvanceTestClock, now: ledger::Timestamp) -> Result<i64, ApiError> {
    let (field, step_ms) = match (request.seconds, request.to) {
        (Some(seconds), None) => {
            if seconds <= 0 {
                return Err(ApiError::bad_request(
                    "seconds",
                    "must be positive: the clock only moves forward",
                ));
            }
            ("seconds", seconds.saturating_mul(1000))
        }
        (None, Some(to)) => {
            let step = to.0.since(now)?.as_millis();
            if step <= 0 {
                return Err(ApiError::bad_request(
                    "to",
                    "must be after the clock's current time: it only moves forward",
                ));
            }
            ("to", step)
        }
        _ => {
            return Err(ApiError::bad_request(
                "seconds",
                "give exactly one of `seconds` and `to`",
            ));
        }
    };
    if step_ms > ADVANCE_SECS_MAX.saturating_mul(1000) {
        return Err(ApiError::bad_request(
            field,
            format!(
                "moves the clock by at most {ADVANCE_SECS_MAX} seconds (366 days) a call; advance in several calls"
            ),
        ));
    }
    Ok(step_ms)
}

async fn advance(
    state: &AppState,
    env: &Env,
    request: AdvanceTestClock,
) -> Result<AdvancedTestClock, ApiError> {
    let view = state.view(env).await?;
    let step_ms = advance_step(request, state.env_now(&view))?;
    if view.env.clock_offset_ms.checked_add(step_ms).is_none() {
        return Err(ApiError::bad_request("seconds", "is too large"));
    }
    // Applied atomically in the store, so a concurrent settings change or advance is
    // never undone.
    state.store().advance_clock(env, step_ms).await?;
    state.catalog_changed(env).await?;
    let deadline = tokio::time::Instant::now() + ADVANCE_BUDGET;
    // Due work first (it writes the events to deliver), then the deliveries with their
    // retries, each as of the instant it fell due.
    let due = crate::jobs::run_due(state, env, deadline).await?;
    let target = state.env_now(&*state.view(env).await?);
    let settled = crate::webhooks::settle(state.deliveries(), env, target, deadline, true).await?;
    let view = state.view(env).await?;
    let now = state.env_now(&view);
    let end_users = if due.finished {
        0
    } else {
        let limit = state.config().jobs_batch_len_max;
        u64::try_from(state.store().due_end_users(env, now, limit).await?.len()).unwrap_or(u64::MAX)
    };
    Ok(AdvancedTestClock {
        now: now.into(),
        offset_seconds: view.env.clock_offset_ms / 1000,
        settled: end_users == 0 && settled.pending == 0 && due.failed == 0,
        pending: AdvancePending {
            end_users,
            webhook_deliveries: settled.pending,
            failed_end_users: u64::try_from(due.failed).unwrap_or(u64::MAX),
        },
        webhook_attempts: u64::try_from(settled.attempts).unwrap_or(u64::MAX),
    })
}
