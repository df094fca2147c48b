//! Usage metering (SPEC 6) and entitlement checks (SPEC 5).

use std::collections::BTreeMap;

use axum::Json;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use ledger::{Credits, EndUserId, Refusal};
use protocol::{
    BatchResult, BatchStatus, DecisionSource, EntitlementCheck, Page, Problem, RecordUsage,
    UsageBatch, UsageBatchRecorded, UsageRecorded,
};
use sha2::{Digest, Sha256};

use super::extract::{Call, parse_json, query_params};
use super::idempotency::{self, Done, Incoming};
use crate::auth::Scope;
use crate::error::ApiError;
use crate::service::AppState;
use crate::service::Change;
use crate::store::{Annotations, Changes, UsageKeyRecord};

/// `POST /v1/usage`: records usage that happened.
#[utoipa::path(post, path = "/v1/usage", tag = "usage", request_body = RecordUsage,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes the event exactly-once (kept 35 days)")),
    responses((status = 201, body = UsageRecorded), (status = 400, body = Problem), (status = 402, body = Problem), (status = 404, body = Problem)))]
pub async fn record_usage(call: Call, incoming: Incoming) -> Result<Response, ApiError> {
    let (state, caller) = call.scoped(Scope::Write)?;
    let request: RecordUsage = parse_json(&incoming.headers, &incoming.body, false)?;
    if request.idempotency_key.is_some() {
        return Err(ApiError::bad_request(
            "idempotency_key",
            "is for batch events; send the `Idempotency-Key` header instead",
        ));
    }
    let (state, env, request) = (&state, &caller.env, &request);
    Ok(
        idempotency::run_claiming(state, env, &incoming, |key| async move {
            let view = state.view(env).await?;
            let protocol::ParsedUsage {
                end_user,
                usage,
                timestamp,
                clamped_from,
            } = request.to_ledger("", state.env_now(&view))?;
            let annotations = Annotations {
                metadata: request.metadata.clone(),
                ..Annotations::default()
            };
            let who = end_user.clone();
            let answer = state
                .mutate(
                    Change::new(env, &end_user, key.as_ref())
                        .created()
                        .annotated(annotations),
                    move |user, cx, _| {
                        let (outcome, changes) =
                            Changes::from_applied(user.record_usage(cx, usage.clone())?);
                        let answer = recorded(
                            &who,
                            &usage,
                            &outcome,
                            (timestamp, clamped_from),
                            user.version(),
                        );
                        Ok((answer, changes))
                    },
                )
                .await?;
            Done::stored(StatusCode::CREATED, &answer)
        })
        .await,
    )
}

fn recorded(
    end_user: &EndUserId,
    usage: &ledger::UsageRequest,
    outcome: &ledger::UsageOutcome,
    (timestamp, clamped_from): (ledger::Timestamp, Option<ledger::Timestamp>),
    version: u64,
) -> UsageRecorded {
    UsageRecorded {
        id: outcome.entry_id.to_string(),
        end_user_id: end_user.to_string(),
        feature_key: usage.feature_key.to_string(),
        units: usage.units.get(),
        cost: outcome.cost.get(),
        covered: outcome.covered.get(),
        debt: outcome.debt.get(),
        balance: outcome.balance.get(),
        timestamp: timestamp.into(),
        version: Some(version),
        timestamp_clamped_from: clamped_from.map(protocol::WireTime),
    }
}

/// A usage event's fingerprint: what makes a repeat "the same event".
/// What a batch event's fingerprint covers, in the order of its JSON (keys sorted, as
/// the JSON object it was first written as had them): stored fingerprints depend on
/// these bytes, so they must never change.
#[derive(serde::Serialize)]
struct Canonical<'a> {
    end_user_id: &'a str,
    feature_key: &'a str,
    metadata: &'a Option<serde_json::Value>,
    strict: bool,
    timestamp: &'a Option<protocol::WireTime>,
    units: u64,
}

/// A batch event's fingerprint: SHA-256 of its canonical JSON, written straight into the
/// hash (a batch takes 500 of them).
fn event_fingerprint(event: &RecordUsage) -> Result<[u8; 32], ApiError> {
    let canonical = Canonical {
        end_user_id: &event.end_user_id,
        feature_key: &event.feature_key,
        metadata: &event.metadata,
        strict: event.strict,
        timestamp: &event.timestamp,
        units: event.units,
    };
    let mut hash = Sha256::new();
    serde_json::to_writer(&mut hash, &canonical)
        .map_err(|error| ApiError::Internal(format!("fingerprinting a usage event: {error}")))?;
    Ok(hash.finalize().into())
}

fn error_result(index: usize, error: &ApiError) -> BatchResult {
    problem_result(index, error.problem())
}

/// A batch event's answer when it was refused or failed.
fn problem_result(index: usize, problem: protocol::Problem) -> BatchResult {
    BatchResult {
        index,
        status: BatchStatus::Error,
        id: None,
        cost: None,
        covered: None,
        debt: None,
        version: None,
        error: Some(problem),
        timestamp_clamped_from: None,
    }
}

/// One batch event, checked and ready for its end user's transaction.
struct Prepared {
    index: usize,
    key: String,
    fingerprint: [u8; 32],
    metadata: Option<serde_json::Value>,
    usage: ledger::UsageRequest,
    timestamp: ledger::Timestamp,
    clamped_from: Option<ledger::Timestamp>,
}

/// `POST /v1/usage/batch`: up to 1000 independent events, each with its own idempotency
/// key. Each end user's events are applied in one transaction.
#[utoipa::path(post, path = "/v1/usage/batch", tag = "usage", request_body = UsageBatch,
    responses((status = 200, body = UsageBatchRecorded), (status = 400, body = Problem)))]
pub async fn record_batch(call: Call, incoming: Incoming) -> Result<Response, ApiError> {
    let Call { state, caller } = call;
    if !(crate::auth::allows(&caller.scopes, Scope::Write)
        || crate::auth::allows(&caller.scopes, Scope::Sync))
    {
        return Err(ApiError::MissingScope("write"));
    }
    let batch: UsageBatch = parse_json(&incoming.headers, &incoming.body, false)?;
    if batch.events.is_empty() || batch.events.len() > protocol::BATCH_EVENTS_MAX {
        return Err(ApiError::bad_request(
            "events",
            format!("must hold 1 to {} events", protocol::BATCH_EVENTS_MAX),
        ));
    }
    let (state, env) = (&state, &caller.env);
    Ok(idempotency::run(state, env, &incoming, |_key| async move {
        let results = apply_batch(state, env, &batch).await?;
        Done::json(StatusCode::OK, &UsageBatchRecorded { results })
    })
    .await)
}

/// A batch event parsed, with its (required) idempotency key.
fn parse_batch_event(
    event: &protocol::RecordUsage,
    index: usize,
    now: ledger::Timestamp,
) -> Result<(protocol::ParsedUsage, String), ApiError> {
    let prefix = format!("events[{index}].");
    let parsed = event.to_ledger(&prefix, now)?;
    let key = event.idempotency_key.clone().ok_or_else(|| {
        ApiError::bad_request(
            format!("{prefix}idempotency_key"),
            "is required for batch events",
        )
    })?;
    Ok((parsed, key))
}

/// What one applied batch event answers: recorded, or its refusal.
fn applied_result(index: usize, outcome: Result<UsageRecorded, Problem>) -> BatchResult {
    match outcome {
        Ok(answer) => BatchResult {
            index,
            status: BatchStatus::Created,
            id: Some(answer.id),
            cost: Some(answer.cost),
            covered: Some(answer.covered),
            debt: Some(answer.debt),
            version: answer.version,
            error: None,
            timestamp_clamped_from: answer.timestamp_clamped_from,
        },
        Err(problem) => problem_result(index, problem),
    }
}

async fn apply_batch(
    state: &AppState,
    env: &crate::store::Env,
    batch: &UsageBatch,
) -> Result<Vec<BatchResult>, ApiError> {
    let view = state.view(env).await?;
    let now = state.env_now(&view);
    // Keys are purged by the real clock (the environment's test clock may run ahead).
    let keep_until = state.real_now().checked_add(ledger::Span::from_millis(
        i64::try_from(state.config().usage_key_retention.as_millis()).unwrap_or(i64::MAX),
    ))?;
    let mut results: Vec<Option<BatchResult>> = vec![None; batch.events.len()];
    let mut groups: BTreeMap<EndUserId, Vec<Prepared>> = BTreeMap::new();
    let mut first_in_batch: BTreeMap<String, (usize, [u8; 32])> = BTreeMap::new();
    // Events repeating an earlier event of the same batch: (index, first index).
    let mut repeats: Vec<(usize, usize)> = Vec::new();
    // Keys recorded by earlier requests, looked up all at once.
    let keys: Vec<String> = batch
        .events
        .iter()
        .filter_map(|event| event.idempotency_key.clone())
        .collect();
    let recorded_keys = state.store().usage_keys(env, &keys).await?;
    for (index, event) in batch.events.iter().enumerate() {
        let (
            protocol::ParsedUsage {
                end_user,
                usage,
                timestamp,
                clamped_from,
            },
            key,
        ) = match parse_batch_event(event, index, now) {
            Ok(parsed) => parsed,
            Err(error) => {
                results[index] = Some(error_result(index, &error));
                continue;
            }
        };
        let fingerprint = event_fingerprint(event)?;
        if let Some((first, first_fingerprint)) = first_in_batch.get(&key) {
            if *first_fingerprint == fingerprint {
                repeats.push((index, *first));
            } else {
                results[index] = Some(error_result(index, &ApiError::IdempotencyKeyReused));
            }
            continue;
        }
        first_in_batch.insert(key.clone(), (index, fingerprint));
        if let Some(stored) = recorded_keys.get(&key) {
            // A lease report's key: the proxy charges that report's spend as usage
            // when it finds the lease gone, and the report was taken already.
            let reported = stored.fingerprint == crate::store::LEASE_REPORT_FINGERPRINT;
            results[index] = Some(if stored.fingerprint == fingerprint || reported {
                duplicate_of(index, &stored.result)
            } else {
                error_result(index, &ApiError::IdempotencyKeyReused)
            });
            continue;
        }
        groups.entry(end_user).or_default().push(Prepared {
            index,
            key,
            fingerprint,
            metadata: event.metadata.clone(),
            usage,
            timestamp,
            clamped_from,
        });
    }
    // Every end user's events of the batch in one transaction (events are independent:
    // a refused event is an error result, not a rollback).
    let users: Vec<_> = groups
        .into_iter()
        .map(|(end_user, events)| {
            let owner = end_user.clone();
            let apply = move |user: &mut ledger::EndUserState,
                              cx: &mut ledger::Cx<'_>,
                              _: &crate::catalog::CatalogView| {
                apply_events(user, cx, &owner, &events, keep_until)
            };
            (end_user, apply)
        })
        .collect();
    for (_, outcomes) in state.mutate_many(env, users).await? {
        for (index, outcome) in outcomes {
            results[index] = Some(applied_result(index, outcome));
        }
    }
    for (index, first) in repeats {
        let original = results[first].clone();
        results[index] = original.map(|original| match original.status {
            BatchStatus::Created | BatchStatus::Duplicate => BatchResult {
                index,
                status: BatchStatus::Duplicate,
                ..original
            },
            BatchStatus::Error => BatchResult { index, ..original },
        });
    }
    Ok(results
        .into_iter()
        .enumerate()
        .map(|(index, result)| {
            result.unwrap_or_else(|| {
                error_result(index, &ApiError::Internal("event was not processed".into()))
            })
        })
        .collect())
}

/// The outcome of each of one end user's batch events, by index.
type EventOutcomes = Vec<(usize, Result<UsageRecorded, protocol::Problem>)>;

/// Records one end user's batch events in order; a refused event is an error outcome.
/// Each recorded event's changes carry its own key and metadata (kept on its entry).
fn apply_events(
    user: &mut ledger::EndUserState,
    cx: &mut ledger::Cx<'_>,
    end_user: &EndUserId,
    events: &[Prepared],
    keep_until: ledger::Timestamp,
) -> Result<(EventOutcomes, Vec<Changes>), ApiError> {
    let mut all = Vec::with_capacity(events.len());
    let mut outcomes = Vec::with_capacity(events.len());
    for event in events {
        match user.record_usage(cx, event.usage.clone()) {
            Ok(applied) => {
                let (outcome, mut changes) = Changes::from_applied(applied);
                let answer = recorded(
                    end_user,
                    &event.usage,
                    &outcome,
                    (event.timestamp, event.clamped_from),
                    user.version(),
                );
                changes.usage_keys.push(UsageKeyRecord {
                    key: event.key.clone(),
                    fingerprint: event.fingerprint,
                    entry_id: answer.id.clone(),
                    result: serde_json::to_string(&answer)
                        .map_err(|error| ApiError::Internal(error.to_string()))?,
                    keep_until,
                });
                changes.annotations = Annotations {
                    idempotency_key: Some(event.key.clone()),
                    metadata: event.metadata.clone(),
                    external_payment_id: None,
                };
                all.push(changes);
                outcomes.push((event.index, Ok(answer)));
            }
            Err(Refusal::Invariant(message)) => return Err(ApiError::Internal(message)),
            Err(refusal) => outcomes.push((event.index, Err(ApiError::from(refusal).problem()))),
        }
    }
    Ok((outcomes, all))
}

/// A duplicate of an earlier event: its original entry id and amounts.
fn duplicate_of(index: usize, original: &str) -> BatchResult {
    let original: serde_json::Value = match serde_json::from_str(original) {
        Ok(original) => original,
        Err(error) => {
            return error_result(
                index,
                &ApiError::Internal(format!("the stored answer of this event's key: {error}")),
            );
        }
    };
    let number = |name: &str| original.get(name).and_then(serde_json::Value::as_i64);
    BatchResult {
        index,
        status: BatchStatus::Duplicate,
        id: original
            .get("id")
            .and_then(|id| id.as_str())
            .map(str::to_owned),
        cost: number("cost"),
        covered: number("covered"),
        debt: number("debt"),
        version: original.get("version").and_then(serde_json::Value::as_u64),
        error: None,
        timestamp_clamped_from: original
            .get("timestamp_clamped_from")
            .cloned()
            .and_then(|value| serde_json::from_value(value).ok()),
    }
}

query_params! {
    pub struct CheckQuery {
        end_user_id: String,
        /// How many units the end user would use (1 when not given).
        #[param(minimum = 1, maximum = 1_000_000_000_000_u64)]
        pub units: Option<u64>,
        #[param(pattern = r"^[a-z0-9_.-]{1,64}$")]
        pub feature_key: String,
    }
}

/// `GET /v1/entitlements/check`: may the end user do `units` of the feature now?
#[utoipa::path(get, path = "/v1/entitlements/check", tag = "entitlements", params(CheckQuery),
    responses((status = 200, body = EntitlementCheck), (status = 400, body = Problem), (status = 404, body = Problem)))]
pub async fn check(call: Call, uri: Uri) -> Result<Json<EntitlementCheck>, ApiError> {
    let (state, caller) = call.scoped(Scope::Read)?;
    let (query, end_user) = CheckQuery::parse(&uri)?;
    let feature = protocol::feature_key("feature_key", &query.feature_key)?;
    let units = protocol::units("units", query.units.unwrap_or(1))?;
    let view = state.view(&caller.env).await?;
    let now = state.env_now(&view);
    let user = state.state(&caller.env, &end_user, now).await?;
    let decision = user.decide(&view.catalog, &feature, units, Credits::ZERO, now)?;
    let plan = decision.plan_id.and_then(|id| view.plan_key(id));
    metrics::counter!("quotastack_checks_total", "allowed" => if decision.allowed { "true" } else { "false" }).increment(1);
    Ok(Json(EntitlementCheck::new(
        &decision,
        &end_user,
        &feature,
        units,
        plan,
        DecisionSource::Ledger,
        now,
    )))
}

query_params! {
    pub struct ListQuery {
        end_user_id: String,
    }
}

/// `GET /v1/entitlements`: every feature's answer for one end user (for UIs).
#[utoipa::path(get, path = "/v1/entitlements", tag = "entitlements", params(ListQuery),
    responses((status = 200, body = Page<EntitlementCheck>), (status = 400, body = Problem)))]
pub async fn list(call: Call, uri: Uri) -> Result<Json<Page<EntitlementCheck>>, ApiError> {
    let (state, caller) = call.scoped(Scope::Read)?;
    let (_query, end_user) = ListQuery::parse(&uri)?;
    let view = state.view(&caller.env).await?;
    let now = state.env_now(&view);
    let user = state.state(&caller.env, &end_user, now).await?;
    let mut data = Vec::new();
    for feature in view.catalog.features.keys() {
        let decision = user.decide(
            &view.catalog,
            feature,
            ledger::Units::ONE,
            Credits::ZERO,
            now,
        )?;
        let plan = decision.plan_id.and_then(|id| view.plan_key(id));
        data.push(EntitlementCheck::new(
            &decision,
            &end_user,
            feature,
            ledger::Units::ONE,
            plan,
            DecisionSource::Ledger,
            now,
        ));
    }
    Ok(Json(Page {
        data,
        next_cursor: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fingerprint as first written (a JSON object built, then printed): stored
    /// fingerprints were made so, and a retry after an upgrade must still match them.
    fn fingerprint_as_first_written(event: &RecordUsage) -> [u8; 32] {
        let canonical = serde_json::json!({
            "end_user_id": event.end_user_id, "feature_key": event.feature_key, "units": event.units,
            "timestamp": event.timestamp, "strict": event.strict, "metadata": event.metadata,
        });
        Sha256::digest(canonical.to_string().as_bytes()).into()
    }

    #[test]
    fn event_fingerprints_keep_their_bytes() {
        let events = [
            serde_json::json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 1}),
            serde_json::json!({"end_user_id": "ü \"quoted\"\n", "feature_key": "tokens", "units": 1_000_000_000_000_u64,
                "timestamp": "2026-11-24T10:00:00+02:00", "strict": true, "idempotency_key": "k",
                "metadata": {"b": 1, "a": {"z": [1, "x", null, false], "c": -5}, "": "empty"}}),
            serde_json::json!({"end_user_id": "u2", "feature_key": "f", "units": 7, "metadata": null, "strict": false}),
            serde_json::json!({"end_user_id": "u3", "feature_key": "f", "units": 7, "metadata": [1, {"y": 2, "x": 1}]}),
        ];
        let mut seen = std::collections::HashSet::new();
        for event in events {
            let event: RecordUsage = serde_json::from_value(event).expect("event");
            let fingerprint = event_fingerprint(&event).expect("fingerprint");
            assert_eq!(
                fingerprint,
                fingerprint_as_first_written(&event),
                "{event:?}"
            );
            assert!(seen.insert(fingerprint));
        }
    }
}
