//! Leases (SPEC 12.1): credits held for one proxy (its `holder`), spent in sequence-
//! numbered reports, released at the end or expired. Creating, reporting and releasing
//! need a key with both the `sync` and the `write` scope (a proxy's key); reading needs
//! `read` or `sync`.

use std::collections::BTreeMap;

use axum::Json;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use ledger::{Cx, EndUserState, LeaseId};
use ledger::{EndUserId, LeaseReport, LeaseRequest, Refusal};
use protocol::{
    CreateLease, LEASE_BATCH_MAX, Lease, LeaseBatch, LeaseBatchAnswer, LeaseBatchResult,
    LeaseOperation, Page, Problem, ReportLease,
};

use super::credits::page_limit;
use super::extract::{Act, ApiPath, Call, parse_json, query_params};
use super::idempotency::{self, Done, Incoming};
use crate::auth::Scope;
use crate::catalog::CatalogView;
use crate::error::ApiError;
use crate::service::Change;
use crate::service::{AppState, Caller};
use crate::store::{Changes, Env, LeaseFilter};

/// A proxy's key: `sync` and `write`.
fn require_holder(caller: &Caller) -> Result<(), ApiError> {
    caller.require(Scope::Sync)?;
    caller.require(Scope::Write)
}

/// `read` or `sync`.
fn require_reader(caller: &Caller) -> Result<(), ApiError> {
    caller
        .require(Scope::Read)
        .or_else(|_| caller.require(Scope::Sync))
}

/// `POST /v1/leases`: holds as much of `amount` as is available for `holder`.
#[utoipa::path(post, path = "/v1/leases", tag = "leases", request_body = CreateLease,
    responses((status = 201, body = Lease), (status = 402, body = Problem), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn create(call: Call, incoming: Incoming) -> Result<Response, ApiError> {
    let Call { state, caller } = call;
    require_holder(&caller)?;
    let request: CreateLease = incoming.json(false)?;
    let (end_user, request) = request.to_ledger()?;
    let change = Change::new(&caller.env, &end_user, None).created();
    let take = move |user: &mut EndUserState, cx: &mut Cx<'_>, _: &CatalogView| {
        let (lease, changes) = Changes::from_applied(user.take_lease(cx, request.clone())?);
        // A repeated `request_id`: the earlier lease, nothing held.
        let replayed = changes.entries.is_empty();
        Ok((Lease::created(&lease, user, cx.now, replayed), changes))
    };
    // The owner is remembered once the lease is committed, as the batch path does.
    let remember = |lease: &Lease| state.remember_lease_owner(&caller.env, &lease.id, &end_user);
    let response = idempotency::run_changing_then(&state, &incoming, change, take, remember);
    Ok(response.await)
}

fn parse_lease_id(id: &str) -> Result<LeaseId, ApiError> {
    LeaseId::parse(id).ok_or_else(|| ApiError::NotFound(format!("lease `{id}`")))
}

/// The end user a lease of `env` belongs to (remembered, else read from the store).
async fn owner(state: &AppState, env: &Env, id: LeaseId) -> Result<EndUserId, ApiError> {
    if let Some(end_user) = state.lease_owner(env, id) {
        return Ok(end_user);
    }
    let lease = state.store().lease(env, &id.to_string()).await?;
    let lease = ApiError::found(lease, format_args!("lease {id}"))?;
    state.remember_lease_owner(env, &id.to_string(), &lease.end_user_id);
    Ok(lease.end_user_id)
}

/// A report, or a release (a final report).
#[derive(Debug, Clone, Copy)]
enum Step {
    Report,
    Release,
}

async fn report_or_release(act: Act, step: Step) -> Result<Response, ApiError> {
    let (state, caller, id, incoming) = act.into_parts();
    require_holder(&caller)?;
    let request: ReportLease = parse_json(&incoming.headers, &incoming.body, false)?;
    let (id, report) = (parse_lease_id(&id)?, request.to_ledger());
    // Values out of range are refused before the lease is looked for.
    report.check().map_err(ApiError::Refused)?;
    let (state, env) = (&state, &caller.env);
    Ok(
        idempotency::run_claiming(state, env, &incoming, |key| async move {
            let end_user = owner(state, env, id).await?;
            let keep_until = report_keys_kept_until(state)?;
            let lease = state
                .mutate(
                    Change::new(env, &end_user, key.as_ref()),
                    move |user, cx, _| {
                        let applied = match step {
                            Step::Report => user.report_lease(cx, id, report)?,
                            Step::Release => user.release_lease(cx, id, report)?,
                        };
                        let (reported, mut changes) = Changes::from_applied(applied);
                        remember_report(&mut changes, (id, &report, &reported), keep_until);
                        Ok((Lease::reported(&reported, user, cx.now), changes))
                    },
                )
                .await?;
            Done::stored(StatusCode::OK, &lease)
        })
        .await,
    )
}

/// How long a taken report's key is remembered: as long as usage event keys
/// (`idempotency.usage_retention_days`), by the real clock as they are purged.
fn report_keys_kept_until(state: &AppState) -> Result<ledger::Timestamp, ApiError> {
    Ok(state.real_now().checked_add(ledger::Span::from_millis(
        i64::try_from(state.config().usage_key_retention.as_millis()).unwrap_or(i64::MAX),
    ))?)
}

/// Remembers a report taken anew with requests in it under the usage event key a proxy
/// gives that report's spend when it finds the lease gone (`{lease}-{sequence}`,
/// `to_usage` in proxy/src/leases.rs): a report taken whose answer never reached the
/// proxy's disk is sent again after a restart, and if the lease ended more than an hour
/// before (ended leases are kept that long) the proxy charges it as usage instead; that
/// event then answers as a duplicate rather than charging the spend a second time. A
/// key the tenant's own usage events took first stays theirs (the store ignores this
/// one then).
fn remember_report(
    changes: &mut Changes,
    (id, report, reported): (LeaseId, &LeaseReport, &ledger::LeaseReported),
    keep_until: ledger::Timestamp,
) {
    let spent = report.requests > 0 || report.units > 0 || report.cost.is_positive();
    if reported.replayed || !spent {
        return;
    }
    let result = serde_json::json!({
        "lease_id": id.to_string(),
        "sequence": report.sequence,
        "cost": report.cost.get(),
    });
    changes.usage_keys.push(crate::store::UsageKeyRecord {
        key: format!("{id}-{}", report.sequence),
        fingerprint: crate::store::LEASE_REPORT_FINGERPRINT,
        entry_id: String::new(),
        result: result.to_string(),
        keep_until,
    });
}

/// `POST /v1/leases/{id}/report`: what the holder spent since its last report (`cost`
/// debited from the hold, `units` counted), with an optional top-up and extension.
/// Exactly once by `sequence`; a gap answers 409 `sequence_gap` with `expected`.
#[utoipa::path(post, path = "/v1/leases/{id}/report", tag = "leases", params(("id" = String, Path)), request_body = ReportLease,
    responses((status = 200, body = Lease), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn report(act: Act) -> Result<Response, ApiError> {
    report_or_release(act, Step::Report).await
}

/// `POST /v1/leases/{id}/release`: a final report, then the rest of the hold goes back.
#[utoipa::path(post, path = "/v1/leases/{id}/release", tag = "leases", params(("id" = String, Path)), request_body = ReportLease,
    responses((status = 200, body = Lease), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn release(act: Act) -> Result<Response, ApiError> {
    report_or_release(act, Step::Release).await
}

/// One operation of a batch, checked and ready for its end user's transaction.
#[derive(Debug, Clone)]
enum Prepared {
    Create(LeaseRequest),
    Step(Step, LeaseId, LeaseReport),
}

/// `POST /v1/leases/batch`: up to 500 creations, reports and releases, each answered as
/// its own endpoint would (201, 200 or a problem) in `results`; a refused operation does
/// not stop the others. Each end user's operations run in order, and all end users' in
/// one transaction. Creations are made idempotent by their `request_id`, reports and
/// releases by their sequence; an `Idempotency-Key` covers the whole batch.
#[utoipa::path(post, path = "/v1/leases/batch", tag = "leases", request_body = LeaseBatch,
    responses((status = 200, body = LeaseBatchAnswer), (status = 400, body = Problem), (status = 403, body = Problem)))]
pub async fn batch(call: Call, incoming: Incoming) -> Result<Response, ApiError> {
    let Call { state, caller } = call;
    require_holder(&caller)?;
    let batch: LeaseBatch = parse_json(&incoming.headers, &incoming.body, false)?;
    if batch.operations.is_empty() || batch.operations.len() > LEASE_BATCH_MAX {
        return Err(ApiError::bad_request(
            "operations",
            format!("must hold 1 to {LEASE_BATCH_MAX} operations"),
        ));
    }
    check_batch(&batch)?;
    let (state, env) = (&state, &caller.env);
    Ok(idempotency::run(state, env, &incoming, |_key| async move {
        let results = apply_batch(state, env, &batch).await?;
        Done::json(StatusCode::OK, &LeaseBatchAnswer { results })
    })
    .await)
}

/// A batch whose operations do not have the documented shape (values out of range) is
/// refused whole, naming the operation's field: only what the state decides (a lease not
/// found, nothing left to hold) is answered per operation.
fn check_batch(batch: &LeaseBatch) -> Result<(), ApiError> {
    for (index, operation) in batch.operations.iter().enumerate() {
        let (field, detail) = match operation {
            LeaseOperation::Create(create) => match create.to_ledger() {
                Ok(_) => continue,
                Err(error) => (error.field.clone(), error.to_string()),
            },
            LeaseOperation::Report(step) | LeaseOperation::Release(step) => {
                match step.report().to_ledger().check() {
                    Ok(()) => continue,
                    Err(refusal) => {
                        let field = match &refusal {
                            ledger::Refusal::Invalid { field, .. } => (*field).to_owned(),
                            _ => "operations".to_owned(),
                        };
                        (field, refusal.to_string())
                    }
                }
            }
        };
        return Err(ApiError::Invalid {
            field: format!("operations[{index}].{field}"),
            detail,
        });
    }
    Ok(())
}

/// A batch operation's problem, its field named within the batch.
fn batch_error(index: usize, error: &ApiError) -> LeaseBatchResult {
    let mut problem = error.problem();
    if let Some(field) = problem.field.as_mut() {
        *field = format!("operations[{index}].{field}");
    }
    LeaseBatchResult {
        index,
        status: problem.status,
        lease: None,
        error: Some(problem),
    }
}

async fn apply_batch(
    state: &AppState,
    env: &Env,
    batch: &LeaseBatch,
) -> Result<Vec<LeaseBatchResult>, ApiError> {
    let mut results: Vec<Option<LeaseBatchResult>> = vec![None; batch.operations.len()];
    let mut groups: BTreeMap<EndUserId, Vec<(usize, Prepared)>> = BTreeMap::new();
    let keep_until = report_keys_kept_until(state)?;
    for (index, operation) in batch.operations.iter().enumerate() {
        let prepared = match operation {
            LeaseOperation::Create(create) => create
                .to_ledger()
                .map(|(end_user, request)| (end_user, Prepared::Create(request)))
                .map_err(ApiError::from),
            LeaseOperation::Report(step) | LeaseOperation::Release(step) => {
                let which = if matches!(operation, LeaseOperation::Report(_)) {
                    Step::Report
                } else {
                    Step::Release
                };
                match parse_lease_id(&step.lease_id) {
                    Ok(id) => owner(state, env, id).await.map(|end_user| {
                        (
                            end_user,
                            Prepared::Step(which, id, step.report().to_ledger()),
                        )
                    }),
                    Err(error) => Err(error),
                }
            }
        };
        match prepared {
            Ok((end_user, prepared)) => groups.entry(end_user).or_default().push((index, prepared)),
            Err(error) => results[index] = Some(batch_error(index, &error)),
        }
    }
    let users: Vec<_> = groups
        .into_iter()
        .map(|(end_user, operations)| {
            let apply = move |user: &mut ledger::EndUserState,
                              cx: &mut ledger::Cx<'_>,
                              _: &crate::catalog::CatalogView| {
                apply_operations(user, cx, &operations, keep_until)
            };
            (end_user, apply)
        })
        .collect();
    for (end_user, outcomes) in state.mutate_many(env, users).await? {
        for (index, outcome) in outcomes {
            results[index] = Some(match outcome {
                Ok((status, lease)) => {
                    if status == StatusCode::CREATED {
                        state.remember_lease_owner(env, &lease.id, &end_user);
                    }
                    LeaseBatchResult {
                        index,
                        status: status.as_u16(),
                        lease: Some(lease),
                        error: None,
                    }
                }
                Err(error) => batch_error(index, &error),
            });
        }
    }
    results
        .into_iter()
        .enumerate()
        .map(|(index, result)| {
            result.ok_or_else(|| {
                ApiError::Internal(format!("lease batch operation {index} has no result"))
            })
        })
        .collect()
}

type Outcomes = Vec<(usize, Result<(StatusCode, Lease), ApiError>)>;

/// One end user's operations of a batch, in order; a refused one changes nothing and
/// is answered with its problem.
fn apply_operations(
    user: &mut ledger::EndUserState,
    cx: &mut ledger::Cx<'_>,
    operations: &[(usize, Prepared)],
    keep_until: ledger::Timestamp,
) -> Result<(Outcomes, Vec<Changes>), ApiError> {
    let mut all = Vec::with_capacity(operations.len());
    let mut outcomes = Vec::with_capacity(operations.len());
    for (index, operation) in operations {
        let applied = match operation {
            Prepared::Create(request) => user.take_lease(cx, request.clone()).map(|applied| {
                let (lease, changes) = Changes::from_applied(applied);
                let answer = Lease::created(&lease, user, cx.now, changes.entries.is_empty());
                (StatusCode::CREATED, answer, changes)
            }),
            Prepared::Step(step, id, report) => {
                let applied = match step {
                    Step::Report => user.report_lease(cx, *id, *report),
                    Step::Release => user.release_lease(cx, *id, *report),
                };
                applied.map(|applied| {
                    let (reported, mut changes) = Changes::from_applied(applied);
                    remember_report(&mut changes, (*id, report, &reported), keep_until);
                    (
                        StatusCode::OK,
                        Lease::reported(&reported, user, cx.now),
                        changes,
                    )
                })
            }
        };
        match applied {
            Ok((status, answer, changes)) => {
                all.push(changes);
                outcomes.push((*index, Ok((status, answer))));
            }
            Err(Refusal::Invariant(message)) => return Err(ApiError::Internal(message)),
            Err(refusal) => outcomes.push((*index, Err(ApiError::from(refusal)))),
        }
    }
    Ok((outcomes, all))
}

/// `GET /v1/leases/{id}`.
#[utoipa::path(get, path = "/v1/leases/{id}", tag = "leases", params(("id" = String, Path)),
    responses((status = 200, body = Lease), (status = 404, body = Problem)))]
pub async fn get(call: Call, ApiPath(id): ApiPath<String>) -> Result<Json<Lease>, ApiError> {
    let Call { state, caller } = call;
    require_reader(&caller)?;
    let id = parse_lease_id(&id)?;
    let lease = state.store().lease(&caller.env, &id.to_string()).await?;
    let lease = ApiError::found(lease, format_args!("lease {id}"))?;
    Ok(Json(Lease::from(&lease)))
}

query_params! {
    pub struct ListQuery {
        end_user_id: Option<String>,
        /// One holder's leases (a proxy's).
        #[param(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9_.:-]+$")]
        pub holder: Option<String>,
        /// `active` for active ones only.
        #[param(pattern = r"^active$")]
        pub status: Option<String>,
    } paged
}

/// `GET /v1/leases?end_user_id=…&holder=…`: leases in id order, by end user and/or
/// holder (one of them is needed).
#[utoipa::path(get, path = "/v1/leases", tag = "leases", params(ListQuery),
    responses((status = 200, body = Page<Lease>), (status = 422, body = Problem)))]
pub async fn list(call: Call, uri: Uri) -> Result<Json<Page<Lease>>, ApiError> {
    let Call { state, caller } = call;
    require_reader(&caller)?;
    let (query, _) = ListQuery::parse(&uri)?;
    if let Some(holder) = &query.holder {
        protocol::holder("holder", holder)?;
    }
    if query.end_user_id.is_none() && query.holder.is_none() {
        return Err(ApiError::bad_request(
            "end_user_id",
            "name an end user (`end_user_id`) or a holder (`holder`)",
        ));
    }
    let active_only = match query.status.as_deref() {
        None => false,
        Some("active") => true,
        Some(_) => return Err(ApiError::bad_request("status", "only `active` is a filter")),
    };
    if let Some(cursor) = &query.cursor
        && LeaseId::parse(cursor).is_none()
    {
        return Err(ApiError::bad_request(
            "cursor",
            "is not a cursor from this list",
        ));
    }
    let limit = page_limit(query.limit)?;
    let leases = state
        .store()
        .leases(
            &caller.env,
            &LeaseFilter {
                end_user_id: query.end_user_id,
                holder: query.holder,
                active_only,
                after: query.cursor,
                limit,
            },
        )
        .await?;
    let next_cursor = (leases.len() == usize::try_from(limit).unwrap_or(usize::MAX))
        .then(|| leases.last().map(|lease| lease.id.to_string()))
        .flatten();
    Ok(Json(Page {
        data: leases.iter().map(Lease::from).collect(),
        next_cursor,
    }))
}
