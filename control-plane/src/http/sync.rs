//! Replication for proxies (scope `sync`): a streamed snapshot of an environment, then a
//! long-lived stream of every change after a cursor, with heartbeats. NDJSON by default;
//! binary frames (`protocol::frames`) for a follower whose `Accept` names them.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use protocol::{NatsFeed, Problem, SyncRecord};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::extract::{Call, parse_query};
use crate::auth::Scope;
use crate::error::ApiError;
use crate::service::feed::{Encoding, catalog_snapshot, heard, line};
use crate::service::{AppState, Caller};

/// How often an idle stream says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How often an idle stream looks for changes committed by other replicas.
const POLL: Duration = Duration::from_millis(250);
/// How often a stream checks that its key still works: a revoked key's streams end
/// within this (plus the key cache's time to live for a revocation made through another
/// replica).
pub const KEY_RECHECK: Duration = Duration::from_secs(1);
/// Lines buffered between the producer and a slow reader.
const BUFFER_LINES: usize = 256;
/// End users read per page of a snapshot, and feed entries per read of a stream.
const PAGE_LEN: u32 = 500;

fn records_body(
    receiver: mpsc::Receiver<Result<Bytes, Infallible>>,
    encoding: Encoding,
) -> Response {
    let mut response = Body::from_stream(ReceiverStream::new(receiver)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(encoding.media_type()),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /v1/sync/snapshot`: the header (cursor and clock), the catalog, every end user's
/// state, and an end line. Streamed page by page. Apply `/v1/sync/stream?cursor=` from
/// the header's cursor afterwards: a state newer than the cursor may appear in both;
/// versions say which is newest.
#[utoipa::path(get, path = "/v1/sync/snapshot", tag = "sync",
    responses((status = 200, description = "NDJSON lines of SyncRecord, or binary frames of them where `Accept` names application/vnd.quotastack.feed-frames", content_type = "application/x-ndjson"), (status = 403, body = Problem)))]
pub async fn snapshot(call: Call, headers: HeaderMap) -> Result<Response, ApiError> {
    let (state, caller) = call.scoped(Scope::Sync)?;
    let encoding = accepted(&headers);
    let open = state.open_stream(&caller)?;
    let env = caller.env.clone();
    // The cursor is read first: anything committed later is in the stream after it.
    let cursor = state.store().last_change(&env).await?;
    state.invalidate(&env);
    let view = state.view(&env).await?;
    let (sender, receiver) = mpsc::channel(BUFFER_LINES);
    let header = SyncRecord::Header {
        cursor,
        clock_offset_ms: view.env.clock_offset_ms,
        now: state.env_now(&view).into(),
    };
    let catalog = SyncRecord::Catalog {
        cursor,
        catalog: catalog_snapshot(&view),
    };
    tokio::spawn(async move {
        let _open = open;
        let sent = send_snapshot(
            &state,
            &caller,
            cursor,
            [header, catalog],
            &sender,
            encoding,
        );
        if let Err(error) = sent.await {
            tracing::warn!(%error, "snapshot stream ended early");
        }
    });
    Ok(records_body(receiver, encoding))
}

fn accepted(headers: &HeaderMap) -> Encoding {
    Encoding::accepted(
        headers
            .get(header::ACCEPT)
            .and_then(|value| value.to_str().ok()),
    )
}

async fn send_snapshot(
    state: &AppState,
    caller: &Caller,
    cursor: i64,
    first: [SyncRecord; 2],
    sender: &mpsc::Sender<Result<Bytes, Infallible>>,
    encoding: Encoding,
) -> Result<(), ApiError> {
    let send = |record: SyncRecord| async move {
        sender
            .send(Ok(line(&record, encoding)?))
            .await
            .map_err(|_| ApiError::Internal("the reader went away".into()))
    };
    for record in first {
        send(record).await?;
    }
    let env = &caller.env;
    let mut after: Option<String> = None;
    let mut count = 0u64;
    let mut recheck_at = tokio::time::Instant::now() + KEY_RECHECK;
    loop {
        if tokio::time::Instant::now() >= recheck_at {
            if !state.key_is_live(caller).await? {
                tracing::info!(key = %caller.key_id, "the key was revoked; ending its snapshot");
                return Ok(());
            }
            recheck_at = tokio::time::Instant::now() + KEY_RECHECK;
        }
        let page = state
            .store()
            .end_user_states(env, after.as_deref(), PAGE_LEN)
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.end_user_id().to_string());
        for user in page {
            count = count.saturating_add(1);
            send(SyncRecord::EndUser {
                cursor,
                end_user_id: user.end_user_id().to_string(),
                version: user.version(),
                state: user.into_parts(),
            })
            .await?;
        }
    }
    send(SyncRecord::End { end_users: count }).await
}

/// `GET /v1/sync/nats`: where this environment's change feed is published on NATS
/// JetStream (its stream is created if it does not exist yet). 404 `nats_not_configured`
/// where the control plane publishes no feed to NATS (follow `/v1/sync/stream`); 503
/// `nats_unavailable` while it cannot reach NATS.
#[utoipa::path(get, path = "/v1/sync/nats", tag = "sync",
    responses((status = 200, body = NatsFeed), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 503, body = Problem)))]
pub async fn nats(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(Scope::Sync)?;
    let Some(client) = state.nats() else {
        return Ok(crate::error::problem_response(&Problem::new(
            404,
            "nats_not_configured",
            "No NATS feed",
            "this control plane publishes the change feed over HTTP only (`sync.nats_url` is not set); follow /v1/sync/stream",
        )));
    };
    let context = async_nats::jetstream::new(client.clone());
    let ensured =
        crate::nats::ensure_stream(&context, &caller.env, state.config().feed_retention).await;
    if let Err(error) = ensured {
        tracing::warn!(%error, "NATS is unreachable");
        let mut response = crate::error::problem_response(&Problem::new(
            503,
            "nats_unavailable",
            "NATS unavailable",
            "the control plane cannot reach NATS now; follow /v1/sync/stream meanwhile",
        ));
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return Ok(response);
    }
    let mut feed = crate::nats::feed_names(&caller.env);
    feed.purged_through = state.store().purged_through(&caller.env).await?;
    Ok(axum::Json(feed).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// The cursor of the snapshot's header, or of the last record applied.
    #[param(minimum = 0)]
    pub cursor: i64,
}

/// `GET /v1/sync/stream?cursor=`: every change after `cursor`, in order, each carrying the
/// new state of what changed and its cursor; a heartbeat at once and every 2 s when idle.
/// A cursor older than the retained feed answers 410 (`cursor_expired`): re-snapshot.
/// The server ends a stream after `sync.stream_max_secs` (default an hour), and when its
/// key is revoked; the follower reconnects from its cursor.
#[utoipa::path(get, path = "/v1/sync/stream", tag = "sync", params(StreamQuery),
    responses((status = 200, description = "NDJSON lines of SyncRecord (or binary frames of them where `Accept` names application/vnd.quotastack.feed-frames), open until the client leaves", content_type = "application/x-ndjson"),
        (status = 410, body = Problem)))]
pub async fn stream(call: Call, uri: Uri, headers: HeaderMap) -> Result<Response, ApiError> {
    let (state, caller) = call.scoped(Scope::Sync)?;
    let encoding = accepted(&headers);
    let query: StreamQuery = parse_query(&uri)?;
    if query.cursor < 0 {
        return Err(ApiError::bad_request("cursor", "must not be negative"));
    }
    let env = caller.env.clone();
    let purged = state.store().purged_through(&env).await?;
    if query.cursor < purged {
        let mut problem = Problem::new(
            410,
            "cursor_expired",
            "Cursor expired",
            format!("changes up to {purged} are no longer kept; take a new snapshot"),
        );
        problem.current_status = Some(purged.to_string());
        let mut response = crate::error::problem_response(&problem);
        *response.status_mut() = StatusCode::GONE;
        return Ok(response);
    }
    let open = state.open_stream(&caller)?;
    let (sender, receiver) = mpsc::channel(BUFFER_LINES);
    tokio::spawn(async move {
        open.at(query.cursor);
        let following = follow(&state, &caller, query.cursor, &sender, &open, encoding);
        if let Err(error) = following.await {
            tracing::debug!(%error, "change stream ended");
        }
    });
    Ok(records_body(receiver, encoding))
}

async fn follow(
    state: &AppState,
    caller: &Caller,
    mut cursor: i64,
    sender: &mpsc::Sender<Result<Bytes, Infallible>>,
    open: &crate::service::StreamGuard,
    encoding: Encoding,
) -> Result<(), ApiError> {
    let env = &caller.env;
    let ends_at = tokio::time::Instant::now() + state.config().stream_max;
    let mut revoked = state.subscribe_revocations();
    let mut recheck_at = tokio::time::Instant::now() + KEY_RECHECK;
    let mut changed = state.subscribe_changes();
    // Commits through other replicas on the same database, where the store hears of them.
    let mut elsewhere = state.store().commits_elsewhere();
    let mut closing = state.closing();
    let send = |record: SyncRecord| async move {
        sender
            .send(Ok(line(&record, encoding)?))
            .await
            .map_err(|_| ApiError::Internal("the reader went away".into()))
    };
    let mut next_heartbeat = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= ends_at {
            // The follower reconnects from its cursor (`sync.stream_max_secs`).
            return Ok(());
        }
        if tokio::time::Instant::now() >= recheck_at {
            if !state.key_is_live(caller).await? {
                tracing::info!(key = %caller.key_id, "the key was revoked; ending its stream");
                return Ok(());
            }
            recheck_at = tokio::time::Instant::now() + KEY_RECHECK;
        }
        if let Some(read) = state.feed_lines(env, cursor, PAGE_LEN, encoding).await? {
            for line in read.lines {
                sender
                    .send(Ok(line.bytes))
                    .await
                    .map_err(|_| ApiError::Internal("the reader went away".into()))?;
            }
            cursor = read.last;
            open.at(cursor);
            continue;
        }
        if tokio::time::Instant::now() >= next_heartbeat {
            let view = state.view(env).await?;
            send(SyncRecord::Heartbeat {
                cursor,
                now: state.env_now(&view).into(),
            })
            .await?;
            next_heartbeat = tokio::time::Instant::now() + HEARTBEAT;
        }
        let wait = POLL
            .min(next_heartbeat.saturating_duration_since(tokio::time::Instant::now()))
            .min(recheck_at.saturating_duration_since(tokio::time::Instant::now()))
            .min(ends_at.saturating_duration_since(tokio::time::Instant::now()));
        tokio::select! {
            _ = changed.changed() => {}
            Some(()) = heard(elsewhere.as_mut()) => {}
            // A key of this process was revoked: check this stream's at once.
            _ = revoked.changed() => recheck_at = tokio::time::Instant::now(),
            () = tokio::time::sleep(wait) => {}
            () = sender.closed() => return Ok(()),
            _ = closing.wait_for(|closing| *closing) => return Ok(()),
        }
    }
}
