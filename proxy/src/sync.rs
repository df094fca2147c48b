//! The follower: snapshot once (unless a complete copy is on disk), then follow the change
//! stream from the cursor forever, reconnecting with backoff; a `410` (cursor older than
//! the feed keeps) takes a fresh snapshot.

use std::sync::Arc;
use std::time::Duration;

use protocol::SyncRecord;
use tokio::sync::watch;

use crate::replica::Replica;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A stream silent this long is considered dead and reopened (heartbeats come every 2 s).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Follows the control plane until `stop` turns true.
pub async fn follow(
    replica: Arc<Replica>,
    client: client::Client,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let outcome = tokio::select! {
            outcome = session(&replica, &client) => outcome,
            _ = stop.changed() => return,
        };
        match outcome {
            Ok(()) => backoff = BACKOFF_MIN,
            Err(error) => {
                metrics::counter!("qs_proxy_sync_errors_total").increment(1);
                tracing::warn!(%error, "replication interrupted; retrying");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = backoff.saturating_mul(2).min(BACKOFF_MAX);
    }
}

/// One connection: a snapshot if needed, then the stream until it breaks.
async fn session(replica: &Replica, client: &client::Client) -> Result<(), String> {
    let cursor = match replica.cursor() {
        Some(cursor) => cursor,
        None => snapshot(replica, client).await?,
    };
    let mut lines = match client.sync_stream(cursor).await {
        Ok(lines) => lines,
        Err(error) if error.code() == Some("cursor_expired") => {
            tracing::warn!(
                cursor,
                "cursor expired at the control plane; taking a new snapshot"
            );
            snapshot(replica, client).await?;
            return Ok(());
        }
        Err(error) => return Err(error.to_string()),
    };
    loop {
        let record = tokio::time::timeout(READ_TIMEOUT, lines.next())
            .await
            .map_err(|_| "the stream went silent".to_owned())?
            .map_err(|error| error.to_string())?;
        let Some(record) = record else {
            return Err("the control plane closed the stream".into());
        };
        apply(replica, record)?;
    }
}

fn apply(replica: &Replica, record: SyncRecord) -> Result<(), String> {
    if let SyncRecord::EndUser { cursor, .. } = &record {
        metrics::gauge!("qs_proxy_replica_cursor").set(f64_of(*cursor));
    }
    replica.apply(record).map_err(|error| error.to_string())
}

#[allow(clippy::cast_precision_loss, clippy::as_conversions)]
fn f64_of(value: i64) -> f64 {
    value as f64
}

/// Takes a whole snapshot; returns its cursor.
async fn snapshot(replica: &Replica, client: &client::Client) -> Result<i64, String> {
    let started = std::time::Instant::now();
    let mut lines = client
        .sync_snapshot()
        .await
        .map_err(|error| error.to_string())?;
    replica
        .begin_snapshot()
        .map_err(|error| error.to_string())?;
    let mut cursor = None;
    loop {
        let record = tokio::time::timeout(READ_TIMEOUT, lines.next())
            .await
            .map_err(|_| "the snapshot went silent".to_owned())?
            .map_err(|error| error.to_string())?
            .ok_or_else(|| "the snapshot ended without its end line".to_owned())?;
        if let SyncRecord::Header { cursor: at, .. } = &record {
            cursor = Some(*at);
        }
        let end = matches!(record, SyncRecord::End { .. });
        apply(replica, record)?;
        if end {
            let cursor = cursor.ok_or_else(|| "the snapshot had no header".to_owned())?;
            replica.finish_snapshot(cursor);
            tracing::info!(
                cursor,
                end_users = replica.user_count(),
                elapsed_ms = started.elapsed().as_millis(),
                "snapshot loaded"
            );
            return Ok(cursor);
        }
    }
}
