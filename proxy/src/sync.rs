//! The follower: snapshot once (unless a complete copy is on disk), then follow the change
//! feed from the cursor forever, reconnecting with backoff; a `410` (cursor older than
//! the feed keeps) takes a fresh snapshot.
//!
//! With `sync.nats_url` set the feed is followed from NATS JetStream, where the control
//! plane publishes it. While NATS cannot be reached (or the control plane publishes
//! nothing there) the proxy follows the HTTP stream instead, and tries NATS again every
//! `NATS_RETRY`. Either way the records and the cursor are the same, so switching loses
//! nothing.

use std::sync::Arc;
use std::time::Duration;

use protocol::SyncRecord;
use protocol::frames::Frame;
use tokio::sync::watch;

use crate::replica::Replica;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A stream silent this long is considered dead and reopened (heartbeats come every 2 s
/// over HTTP, every second over NATS).
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the proxy follows the HTTP stream before it tries NATS again.
const NATS_RETRY: Duration = Duration::from_secs(30);
/// How often a follower over NATS checks that its connection is up.
const NATS_CHECK: Duration = Duration::from_secs(1);
/// How long connecting to NATS may take.
const NATS_CONNECT: Duration = Duration::from_secs(2);

/// Follows the control plane until `stop` turns true: over NATS from `nats_url` where one
/// is given (falling back to HTTP while it fails), else over HTTP.
pub async fn follow(
    replica: Arc<Replica>,
    client: client::Client,
    nats_url: Option<String>,
    mut stop: watch::Receiver<bool>,
) {
    let mut nats = nats_url.map(|url| Nats {
        url,
        connection: None,
    });
    let mut backoff = BACKOFF_MIN;
    loop {
        let outcome = tokio::select! {
            outcome = session(&replica, &client, nats.as_mut()) => outcome,
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

/// The NATS side of following: where, and the connection once made.
struct Nats {
    url: String,
    connection: Option<async_nats::Client>,
}

/// Why the feed could not be followed over NATS.
enum Unavailable {
    /// The stream no longer holds what follows the cursor: take a new snapshot.
    Expired,
    /// NATS is unreachable, or the control plane publishes nothing there: use HTTP.
    Fallback(String),
}

impl Nats {
    async fn open(
        &mut self,
        client: &client::Client,
        cursor: i64,
    ) -> Result<(client::nats::NatsLines, async_nats::Client), Unavailable> {
        let connection = match &self.connection {
            Some(connection) => {
                // A connection that dropped reconnects on its own; meanwhile, HTTP.
                if connection.connection_state() != async_nats::connection::State::Connected {
                    return Err(Unavailable::Fallback("NATS is disconnected".into()));
                }
                connection.clone()
            }
            None => {
                let connection = async_nats::ConnectOptions::new()
                    .name("quotastack-proxy")
                    .connection_timeout(NATS_CONNECT)
                    .connect(self.url.as_str())
                    .await
                    .map_err(|error| Unavailable::Fallback(format!("connecting: {error}")))?;
                self.connection = Some(connection.clone());
                connection
            }
        };
        let feed = client
            .sync_nats()
            .await
            .map_err(|error| Unavailable::Fallback(error.to_string()))?;
        let lines = client::nats::NatsLines::open(&connection, &feed, cursor)
            .await
            .map_err(|error| match error {
                client::nats::NatsError::CursorExpired { .. } => Unavailable::Expired,
                other => Unavailable::Fallback(other.to_string()),
            })?;
        Ok((lines, connection))
    }
}

/// One connection: a snapshot if needed, then the feed until it breaks.
async fn session(
    replica: &Replica,
    client: &client::Client,
    nats: Option<&mut Nats>,
) -> Result<(), String> {
    let cursor = match replica.cursor() {
        Some(cursor) => cursor,
        None => snapshot(replica, client).await?,
    };
    let Some(nats) = nats else {
        return follow_http(replica, client, cursor).await;
    };
    match nats.open(client, cursor).await {
        Ok((lines, connection)) => {
            replica.set_over_nats(true);
            let Err(reason) = follow_nats(replica, client, lines, &connection).await else {
                return Ok(());
            };
            // NATS stopped delivering (silent, disconnected or broken; a control plane
            // whose publisher is stuck looks the same): the HTTP stream for a while.
            replica.set_over_nats(false);
            tracing::warn!(%reason, "the feed over NATS stopped; following the HTTP stream meanwhile");
            let Some(cursor) = replica.cursor() else {
                return Err(reason);
            };
            follow_http_for_a_while(replica, client, cursor).await
        }
        Err(Unavailable::Expired) => {
            tracing::warn!(
                cursor,
                "the NATS stream no longer holds this cursor; taking a new snapshot"
            );
            snapshot(replica, client).await?;
            Ok(())
        }
        Err(Unavailable::Fallback(reason)) => {
            replica.set_over_nats(false);
            tracing::warn!(%reason, "cannot follow the feed over NATS; following the HTTP stream meanwhile");
            follow_http_for_a_while(replica, client, cursor).await
        }
    }
}

/// Follows the HTTP stream for `NATS_RETRY`, then returns so that NATS is tried again
/// from the cursor the HTTP stream reached.
async fn follow_http_for_a_while(
    replica: &Replica,
    client: &client::Client,
    cursor: i64,
) -> Result<(), String> {
    match tokio::time::timeout(NATS_RETRY, follow_http(replica, client, cursor)).await {
        Ok(outcome) => outcome,
        Err(_) => Ok(()),
    }
}

async fn follow_nats(
    replica: &Replica,
    client: &client::Client,
    mut lines: client::nats::NatsLines,
    connection: &async_nats::Client,
) -> Result<(), String> {
    let mut check = tokio::time::interval(NATS_CHECK);
    let mut heard = tokio::time::Instant::now();
    let mut catch_ups = 0;
    loop {
        // `NatsLines::next` is cancel-safe: a record it had not returned yet stays queued.
        let record = tokio::select! {
            record = lines.next() => record,
            _ = check.tick() => {
                if connection.connection_state() != async_nats::connection::State::Connected {
                    // Back to HTTP at once rather than after the read timeout.
                    return Err("the NATS connection dropped".into());
                }
                if heard.elapsed() > READ_TIMEOUT {
                    return Err("the NATS feed went silent".into());
                }
                continue;
            }
        };
        heard = tokio::time::Instant::now();
        if lines.catch_ups() > catch_ups {
            metrics::counter!("qs_proxy_nats_catch_ups_total")
                .increment(lines.catch_ups().saturating_sub(catch_ups));
            catch_ups = lines.catch_ups();
        }
        match record {
            Ok(record) => apply(replica, record)?,
            Err(client::nats::NatsError::CursorExpired { cursor, .. }) => {
                tracing::warn!(
                    cursor,
                    "the NATS stream skipped past this cursor; taking a new snapshot"
                );
                snapshot(replica, client).await?;
                return Ok(());
            }
            Err(error) => return Err(error.to_string()),
        }
    }
}

async fn follow_http(
    replica: &Replica,
    client: &client::Client,
    cursor: i64,
) -> Result<(), String> {
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
        let record = tokio::time::timeout(READ_TIMEOUT, lines.next_frame())
            .await
            .map_err(|_| "the stream went silent".to_owned())?
            .map_err(|error| error.to_string())?;
        let Some(record) = record else {
            return Err("the control plane closed the stream".into());
        };
        apply(replica, record)?;
    }
}

fn apply(replica: &Replica, record: Frame) -> Result<(), String> {
    if let Frame::EndUser(frame) = &record {
        metrics::gauge!("qs_proxy_replica_cursor").set(f64_of(frame.cursor));
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
        let record = tokio::time::timeout(READ_TIMEOUT, lines.next_frame())
            .await
            .map_err(|_| "the snapshot went silent".to_owned())?
            .map_err(|error| error.to_string())?
            .ok_or_else(|| "the snapshot ended without its end line".to_owned())?;
        if let Frame::Record(header) = &record
            && let SyncRecord::Header { cursor: at, .. } = **header
        {
            cursor = Some(at);
        }
        let end = matches!(&record, Frame::Record(end) if matches!(**end, SyncRecord::End { .. }));
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
