//! Grants, voids, adjustments, balances and the ledger (SPEC 8, 3).

use axum::Json;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use ledger::{EndUserState, Refusal};
use protocol::{
    Balance, Block, CreateAdjustment, CreateGrant, LedgerEntry, Page, Problem, VoidBlock,
};

use super::extract::{Act, Call, parse_json, query_params};
use super::idempotency::{self, Done, Incoming};
use crate::auth::Scope;
use crate::error::ApiError;
use crate::service::Change;
use crate::store::{Annotations, Changes, EntryFilter};

/// `POST /v1/credits/grants`: turns a confirmed payment (or a gift) into a block.
#[utoipa::path(post, path = "/v1/credits/grants", tag = "credits", request_body = CreateGrant,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes the request safe to retry")),
    responses((status = 201, body = Block), (status = 400, body = Problem), (status = 409, body = Problem)))]
pub async fn create_grant(call: Call, incoming: Incoming) -> Result<Response, ApiError> {
    let (state, caller) = call.scoped(Scope::Write)?;
    let request: CreateGrant = incoming.json(false)?;
    let (end_user, grant) = request.to_ledger()?;
    let annotations = Annotations {
        idempotency_key: None,
        metadata: request.metadata.clone(),
        external_payment_id: request.external_payment_id.clone(),
    };
    let change = Change::new(&caller.env, &end_user, None)
        .created()
        .annotated(annotations);
    let response = idempotency::run_changing(&state, &incoming, change, move |user, cx, _| {
        let (id, changes) = Changes::from_applied(user.grant(cx, grant.clone())?);
        Ok((wire_block(user, &changes, id, &request)?, changes))
    });
    Ok(response.await)
}

/// The granted block as it stands after the operation (settlement may have used some).
fn wire_block(
    user: &EndUserState,
    changes: &Changes,
    id: ledger::BlockId,
    request: &CreateGrant,
) -> Result<Block, ApiError> {
    let block = user
        .blocks()
        .iter()
        .chain(&changes.finished_blocks)
        .find(|block| block.id == id)
        .ok_or_else(|| {
            ApiError::Internal(format!("granted block {id} is missing from the state"))
        })?;
    Ok(Block::new(
        block,
        user.end_user_id(),
        request.external_payment_id.clone(),
        request.metadata.clone(),
    ))
}

/// `POST /v1/credits/blocks/{id}/void`: forfeits a block's unheld remainder.
#[utoipa::path(post, path = "/v1/credits/blocks/{id}/void", tag = "credits", request_body = Option<VoidBlock>,
    params(("id" = String, Path, description = "Block id (blk_…)")),
    responses((status = 200, body = Block), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn void_block(act: Act) -> Result<Response, ApiError> {
    let (state, caller, id, incoming) = act.into_parts();
    caller.require(Scope::Write)?;
    let request: VoidBlock = parse_json(&incoming.headers, &incoming.body, true)?;
    if let Some(reason) = &request.reason {
        protocol::check_reason("reason", reason)?;
    }
    let block_id =
        ledger::BlockId::parse(&id).ok_or_else(|| ApiError::NotFound(format!("block `{id}`")))?;
    let reason = request.reason;
    let reason = &reason;
    let (state, env) = (&state, &caller.env);
    Ok(
        idempotency::run_claiming(state, env, &incoming, |key| async move {
            let stored = state.store().block(env, &block_id.to_string()).await?;
            let stored = ApiError::found(stored, format_args!("block {block_id}"))?;
            let (end_user, annotations) = (stored.end_user_id, stored.annotations);
            // The reason goes on the void's ledger entry.
            let void_annotations = Annotations {
                metadata: reason
                    .as_ref()
                    .map(|reason| serde_json::json!({ "reason": reason })),
                ..Annotations::default()
            };
            let block = state
                .mutate(
                    Change::new(env, &end_user, key.as_ref()).annotated(void_annotations),
                    move |user, cx, _| {
                        let applied =
                            user.void_block(cx, block_id)
                                .map_err(|refusal| match refusal {
                                    Refusal::BlockNotFound(_) => ApiError::Conflict(format!(
                                        "block {block_id} has nothing left to void"
                                    )),
                                    other => other.into(),
                                })?;
                        let (_, changes) = Changes::from_applied(applied);
                        let block = user
                            .blocks()
                            .iter()
                            .chain(&changes.finished_blocks)
                            .find(|block| block.id == block_id)
                            .cloned();
                        let wire = block.map(|block| {
                            Block::new(
                                &block,
                                user.end_user_id(),
                                annotations.external_payment_id.clone(),
                                annotations.metadata.clone(),
                            )
                        });
                        Ok((wire, changes))
                    },
                )
                .await?;
            Done::stored(StatusCode::OK, &block)
        })
        .await,
    )
}

/// `POST /v1/credits/adjustments`: a signed manual correction.
#[utoipa::path(post, path = "/v1/credits/adjustments", tag = "credits", request_body = CreateAdjustment,
    responses((status = 201, body = protocol::Adjustment), (status = 400, body = Problem), (status = 402, body = Problem)))]
pub async fn create_adjustment(call: Call, incoming: Incoming) -> Result<Response, ApiError> {
    let (state, caller) = call.scoped(Scope::Write)?;
    let request: CreateAdjustment = incoming.json(false)?;
    let (end_user, adjust) = request.to_ledger()?;
    let annotations = Annotations {
        metadata: Some(serde_json::json!({ "reason": request.reason })),
        ..Annotations::default()
    };
    let change = Change::new(&caller.env, &end_user, None)
        .created()
        .annotated(annotations);
    let amount = request.amount;
    let response = idempotency::run_changing(&state, &incoming, change, move |user, cx, _| {
        let (created, changes) = Changes::from_applied(user.adjust(cx, adjust.clone())?);
        let entry = changes
            .entries
            .iter()
            .rev()
            .find(|entry| entry.entry_type == ledger::EntryType::Adjust);
        let block = created.and_then(|id| {
            user.blocks()
                .iter()
                .chain(&changes.finished_blocks)
                .find(|block| block.id == id)
                .cloned()
        });
        let answer = protocol::Adjustment {
            id: entry.map(|entry| entry.id.to_string()).unwrap_or_default(),
            end_user_id: user.end_user_id().to_string(),
            amount,
            block: block.map(|block| Block::new(&block, user.end_user_id(), None, None)),
            balance: user.available(None, cx.now)?.get(),
        };
        Ok((answer, changes))
    });
    Ok(response.await)
}

query_params! {
    pub struct BalanceQuery {
        end_user_id: String,
        #[param(pattern = r"^[a-z0-9_.-]{1,64}$")]
        pub feature_key: Option<String>,
    }
}

/// `GET /v1/credits/balance`: totals and every live block in burn order.
#[utoipa::path(get, path = "/v1/credits/balance", tag = "credits", params(BalanceQuery),
    responses((status = 200, body = Balance), (status = 400, body = Problem), (status = 404, body = Problem)))]
pub async fn balance(call: Call, uri: Uri) -> Result<Json<Balance>, ApiError> {
    let (state, caller) = call.scoped(Scope::Read)?;
    let (query, end_user) = BalanceQuery::parse(&uri)?;
    let feature = query
        .feature_key
        .as_deref()
        .map(|key| protocol::feature_key("feature_key", key))
        .transpose()?;
    let env = &caller.env;
    let view = state.view(env).await?;
    if let Some(feature) = &feature
        && view.catalog.feature(feature).is_none()
    {
        return Err(Refusal::FeatureNotFound(feature.clone()).into());
    }
    let now = state.env_now(&view);
    let mut user = state.state(env, &end_user, now).await?;
    if user.next_due(&view.catalog)?.is_some_and(|due| due <= now) {
        // Due work (an expiry, a new window) is done for real before answering, so the
        // blocks shown are the ones that will be stored.
        state
            .mutate(Change::new(env, &end_user, None), |user, cx, _| {
                let (_, changes) = Changes::from_applied(user.advance(cx)?);
                Ok(((), changes))
            })
            .await?;
        user = state.state(env, &end_user, now).await?;
    }
    let mut blocks = Vec::new();
    for block in user.blocks_in_burn_order(feature.as_ref()) {
        let annotations = state
            .store()
            .block(env, &block.id.to_string())
            .await?
            .map(|stored| stored.annotations)
            .unwrap_or_default();
        blocks.push(Block::new(
            block,
            &end_user,
            annotations.external_payment_id,
            annotations.metadata,
        ));
    }
    Ok(Json(Balance {
        end_user_id: end_user.to_string(),
        feature_key: feature.as_ref().map(ToString::to_string),
        available: user.available(feature.as_ref(), now)?.get(),
        held: user.held(feature.as_ref())?.get(),
        debt: user.total_debt(feature.as_ref())?.get(),
        blocks,
    }))
}

query_params! {
    pub struct LedgerQuery {
        end_user_id: Option<String>,
        /// `grant`, `debit`, `hold`, `commit`, `release`, `expire`, `void`, `adjust`, `settle`.
        #[serde(rename = "type")]
        #[param(pattern = r"^(grant|debit|hold|commit|release|expire|void|adjust|settle)$")]
        pub entry_type: Option<String>,
        /// Entries created at or after this instant.
        #[param(value_type = Option<String>, format = DateTime)]
        pub from: Option<protocol::WireTime>,
        /// Entries created before this instant.
        #[param(value_type = Option<String>, format = DateTime)]
        pub to: Option<protocol::WireTime>,
    } paged
}

const ENTRY_TYPES: [&str; 9] = [
    "grant", "debit", "hold", "commit", "release", "expire", "void", "adjust", "settle",
];

/// Reads `?limit=` (default 50, at most 500).
///
/// # Errors
/// 400 outside 1..=500.
pub fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    let limit = limit.unwrap_or(protocol::PAGE_LIMIT_DEFAULT);
    if !(1..=protocol::PAGE_LIMIT_MAX).contains(&limit) {
        return Err(ApiError::bad_request(
            "limit",
            format!("must be 1 to {}", protocol::PAGE_LIMIT_MAX),
        ));
    }
    Ok(limit)
}

/// Reads a numeric cursor.
///
/// # Errors
/// 400 for a cursor this API did not hand out.
pub fn seq_cursor(cursor: Option<&str>) -> Result<Option<i64>, ApiError> {
    cursor
        .map(|text| {
            text.parse::<i64>()
                .map_err(|_| ApiError::bad_request("cursor", "is not a cursor from this list"))
        })
        .transpose()
}

/// `GET /v1/ledger`: entries, newest first.
#[utoipa::path(get, path = "/v1/ledger", tag = "credits", params(LedgerQuery),
    responses((status = 200, body = Page<LedgerEntry>), (status = 400, body = Problem)))]
pub async fn ledger(call: Call, uri: Uri) -> Result<Json<Page<LedgerEntry>>, ApiError> {
    let (state, caller) = call.scoped(Scope::Read)?;
    let (query, _) = LedgerQuery::parse(&uri)?;
    if let Some(entry_type) = &query.entry_type
        && !ENTRY_TYPES.contains(&entry_type.as_str())
    {
        return Err(ApiError::bad_request(
            "type",
            format!("`{entry_type}` is not one of {}", ENTRY_TYPES.join(", ")),
        ));
    }
    let limit = page_limit(query.limit)?;
    let filter = EntryFilter {
        end_user_id: query.end_user_id,
        entry_type: query.entry_type,
        from: query.from.map(|time| time.0),
        to: query.to.map(|time| time.0),
        before_seq: seq_cursor(query.cursor.as_deref())?,
        limit,
    };
    let rows = state.store().entries(&caller.env, &filter).await?;
    let next_cursor = (rows.len() == usize::try_from(limit).unwrap_or(usize::MAX))
        .then(|| rows.last().map(|(seq, _)| seq.to_string()))
        .flatten();
    Ok(Json(Page {
        data: rows.into_iter().map(|(_, entry)| entry).collect(),
        next_cursor,
    }))
}
