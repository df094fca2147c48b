//! The usage outbox: every admitted request's usage goes to sled (flushed before the
//! response is released, in `sync` durability) and a shipper sends it to the control
//! plane in batches with per-event idempotency keys, deleting records only once
//! acknowledged. While the control plane is down, records wait and the shipper backs off.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ledger::{Credits, EndUserId};
use protocol::{BatchStatus, CommitReservation, RecordUsage, UsageBatch};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::config::Durability;
use crate::disk::{Acked, Disk, DiskError, Flusher, OutboxEntry};
use crate::replica::Replica;

fn acked_entry(record: &Record, needed: u64) -> Result<OutboxEntry, String> {
    let acked = Acked {
        end_user_id: record.end_user_id.clone(),
        cost: record.pending,
        needed,
        at_ms: wall_ms(),
    };
    let json = serde_json::to_vec(&acked).map_err(|error| error.to_string())?;
    Ok((record.key.as_bytes().to_vec(), json))
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|elapsed| i64::try_from(elapsed.as_millis()).ok())
        .unwrap_or(0)
}

/// Whether an answer means "try again later" rather than "this will never pass": 5xx,
/// rate limiting, a key being rotated (401/403), a request still in flight (409), a
/// timeout. Usage is never dropped for those.
fn retryable_status(status: u16) -> bool {
    status >= 500 || matches!(status, 401 | 403 | 408 | 409 | 425 | 429)
}

/// Whether the control plane refused a call for good (the request itself is invalid).
/// Unreachable, undecodable and retryable answers are not.
fn refused_for_good(error: &client::Error) -> bool {
    error
        .status()
        .is_some_and(|status| status.is_client_error() && !retryable_status(status.as_u16()))
}

/// What the control plane must be told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Usage {
        feature_key: String,
        units: u64,
        timestamp_ms: i64,
    },
    /// Commit a control-plane reservation with the actual units.
    Commit {
        reservation_id: String,
        feature_key: String,
        units: u64,
    },
    /// Release a control-plane reservation (the upstream failed).
    Release { reservation_id: String },
    /// A reservation request got no answer: replay it under its idempotency key (which
    /// finds the hold if it was made, or makes one) and release what it returns.
    Unreserve {
        reserve_key: String,
        feature_key: String,
        units: u64,
        ttl_seconds: i64,
    },
}

/// One outbox record: the operation, its idempotency key and the local spend it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub key: String,
    pub end_user_id: String,
    /// Credits counted in local pending for this record.
    pub pending: i64,
    pub op: Op,
}

/// The outbox: enqueue on the request path, ship in the background.
#[derive(Debug)]
pub struct Outbox {
    disk: Disk,
    flusher: Arc<Flusher>,
    durability: Durability,
    wake: Notify,
    /// Records on disk (sled's own count walks the whole tree).
    depth: AtomicUsize,
    /// Wake the shipper early once this many records wait (else it runs on its interval,
    /// so a busy proxy ships full batches rather than one call per request).
    wake_at: usize,
}

impl Outbox {
    pub fn new(
        disk: Disk,
        flusher: Arc<Flusher>,
        durability: Durability,
        batch_size: usize,
    ) -> Outbox {
        let depth = AtomicUsize::new(disk.outbox_len());
        Outbox {
            disk,
            flusher,
            durability,
            wake: Notify::new(),
            depth,
            wake_at: batch_size.max(1),
        }
    }

    /// Writes a record; with `sync` durability, returns once it is on disk.
    ///
    /// # Errors
    /// Storage failures (the caller must not release the response as if recorded).
    pub async fn push(&self, record: &Record) -> Result<(), DiskError> {
        let id = ulid::Ulid::new();
        let json = serde_json::to_vec(record)?;
        self.disk.outbox_put(&id.to_bytes(), &json)?;
        let depth = self.depth.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        let ticket = self.flusher.wrote();
        if self.durability == Durability::Sync {
            self.flusher.durable(ticket).await?;
        }
        metrics::counter!("qs_proxy_outbox_written_total").increment(1);
        if depth >= self.wake_at {
            self.wake.notify_one();
        }
        Ok(())
    }

    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Acquire)
    }

    fn remove(&self, keys: &[Vec<u8>]) -> Result<(), String> {
        self.disk
            .outbox_remove(keys)
            .map_err(|error| error.to_string())?;
        let _ = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |depth| {
                Some(depth.saturating_sub(keys.len()))
            });
        Ok(())
    }

    /// Records left by a previous run, to count their spend as pending again.
    ///
    /// # Errors
    /// Storage failures.
    pub fn restore_pending(&self, replica: &Replica) -> Result<usize, DiskError> {
        let mut count = 0usize;
        for (_, json) in self.disk.outbox_head(usize::MAX)? {
            let record: Record = serde_json::from_slice(&json)?;
            if let Ok(end_user) = EndUserId::new(&record.end_user_id) {
                replica.pending.add(&end_user, Credits::new(record.pending));
            }
            count = count.saturating_add(1);
        }
        Ok(count)
    }

    /// Ships until `stop`, then one last time (bounded) before returning.
    pub async fn ship(
        self: Arc<Self>,
        client: client::Client,
        replica: Arc<Replica>,
        batch_size: usize,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::ZERO;
        loop {
            let wait = if backoff.is_zero() { interval } else { backoff };
            tokio::select! {
                () = self.wake.notified(), if backoff.is_zero() => {}
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), self.ship_once(&client, &replica, batch_size)).await;
                    return;
                }
            }
            match self.ship_once(&client, &replica, batch_size).await {
                Ok(more) => {
                    backoff = Duration::ZERO;
                    metrics::gauge!("qs_proxy_control_plane_up").set(1.0);
                    if more {
                        self.wake.notify_one();
                    }
                }
                Err(error) => {
                    metrics::gauge!("qs_proxy_control_plane_up").set(0.0);
                    backoff = (backoff.saturating_mul(2))
                        .clamp(Duration::from_millis(100), Duration::from_secs(10));
                    tracing::warn!(%error, ?backoff, depth = self.depth(), "shipping usage failed; will retry");
                }
            }
            metrics::gauge!("qs_proxy_outbox_depth")
                .set(f64::from(u32::try_from(self.depth()).unwrap_or(u32::MAX)));
        }
    }

    /// Ships one batch. `Ok(true)` when more records are waiting.
    ///
    /// # Errors
    /// The control plane is unreachable or failing (nothing was deleted that was not
    /// acknowledged).
    pub async fn ship_once(
        &self,
        client: &client::Client,
        replica: &Replica,
        batch_size: usize,
    ) -> Result<bool, String> {
        let head = self
            .disk
            .outbox_head(batch_size)
            .map_err(|error| error.to_string())?;
        if head.is_empty() {
            return Ok(false);
        }
        let full = head.len() >= batch_size;
        let mut usage: Vec<(Vec<u8>, Record)> = Vec::new();
        let mut done: Vec<Vec<u8>> = Vec::new();
        let mut acked: Vec<OutboxEntry> = Vec::new();
        for (key, json) in head {
            let record: Record = match serde_json::from_slice(&json) {
                Ok(record) => record,
                Err(error) => {
                    tracing::error!(%error, "dropping an unreadable outbox record");
                    done.push(key);
                    continue;
                }
            };
            match &record.op {
                Op::Usage { .. } => usage.push((key, record)),
                Op::Commit { .. } | Op::Release { .. } | Op::Unreserve { .. } => {
                    // Resolve reservations in order with the usage before them.
                    if !usage.is_empty() {
                        break;
                    }
                    let resolved = self.resolve(client, replica, &record).await;
                    // What was resolved before must not be sent (and confirmed) twice.
                    let resolved = match resolved {
                        Ok(resolved) => resolved,
                        Err(error) => {
                            self.remove(&done)?;
                            return Err(error);
                        }
                    };
                    match resolved {
                        Some(replacement) => {
                            // The reservation lapsed: charge the actual as plain usage.
                            self.remove(&done)?;
                            let json = serde_json::to_vec(&replacement)
                                .map_err(|error| error.to_string())?;
                            self.disk
                                .outbox_put(&key, &json)
                                .map_err(|error| error.to_string())?;
                            return Ok(true);
                        }
                        None => {
                            done.push(key);
                        }
                    }
                }
            }
        }
        if !usage.is_empty() {
            let events: Vec<RecordUsage> = usage
                .iter()
                .filter_map(|(_, record)| match &record.op {
                    Op::Usage {
                        feature_key,
                        units,
                        timestamp_ms,
                    } => Some(RecordUsage {
                        end_user_id: record.end_user_id.clone(),
                        feature_key: feature_key.clone(),
                        units: *units,
                        timestamp: Some(protocol::WireTime(ledger::Timestamp::from_millis(
                            *timestamp_ms,
                        ))),
                        metadata: None,
                        strict: false,
                        idempotency_key: Some(record.key.clone()),
                    }),
                    Op::Commit { .. } | Op::Release { .. } | Op::Unreserve { .. } => None,
                })
                .collect();
            let answer = client.record_usage_batch(&UsageBatch { events }).await;
            let answer = match answer {
                Ok(answer) => answer,
                Err(error) if !refused_for_good(&error) => {
                    self.remove(&done)?;
                    return Err(error.to_string());
                }
                Err(error) => {
                    // The whole batch was refused as malformed: it will never pass.
                    tracing::error!(%error, count = usage.len(), "the control plane refused a usage batch; dropping it");
                    metrics::counter!("qs_proxy_outbox_rejected_total")
                        .increment(u64::try_from(usage.len()).unwrap_or(u64::MAX));
                    for (key, record) in usage {
                        if let Ok(end_user) = EndUserId::new(&record.end_user_id) {
                            replica
                                .pending
                                .drop_unconfirmed(&end_user, Credits::new(record.pending));
                        }
                        done.push(key);
                    }
                    self.remove(&done)?;
                    return Ok(full);
                }
            };
            for result in answer.results {
                let Some((key, record)) = usage.get(result.index) else {
                    continue;
                };
                let end_user = EndUserId::new(&record.end_user_id).ok();
                match result.status {
                    BatchStatus::Created | BatchStatus::Duplicate => {
                        if let Some(end_user) = &end_user
                            && let Some(needed) = replica.pending.confirm(
                                end_user,
                                Credits::new(record.pending),
                                result.version,
                                || replica.version(end_user),
                            )
                        {
                            acked.push(acked_entry(record, needed)?);
                        }
                        metrics::counter!("qs_proxy_usage_shipped_total").increment(1);
                        done.push(key.clone());
                    }
                    BatchStatus::Error => {
                        let problem = result.error.as_ref();
                        if problem.is_none_or(|problem| retryable_status(problem.status)) {
                            // Keep it; the next round retries.
                            continue;
                        }
                        tracing::error!(key = %record.key, problem = ?problem, "the control plane refused a usage event; dropping it");
                        metrics::counter!("qs_proxy_outbox_rejected_total").increment(1);
                        if let Some(end_user) = &end_user {
                            replica
                                .pending
                                .drop_unconfirmed(end_user, Credits::new(record.pending));
                        }
                        done.push(key.clone());
                    }
                }
            }
        }
        // Acknowledged costs go on disk before their records leave the outbox.
        self.disk
            .acked_put(&acked)
            .map_err(|error| error.to_string())?;
        self.remove(&done)?;
        Ok(full)
    }

    /// Acknowledged costs left by a previous run that the stored replica does not show
    /// yet count as pending again (the others are forgotten).
    ///
    /// # Errors
    /// Storage failures.
    pub fn restore_acked(&self, replica: &Replica) -> Result<usize, DiskError> {
        let mut shown = Vec::new();
        let mut restored = 0usize;
        for (key, json) in self.disk.acked_all()? {
            let acked: Acked = serde_json::from_slice(&json)?;
            let Ok(end_user) = EndUserId::new(&acked.end_user_id) else {
                shown.push(key);
                continue;
            };
            if replica
                .version(&end_user)
                .is_some_and(|held| held >= acked.needed)
            {
                shown.push(key);
            } else {
                replica.pending.restore_confirmed(
                    &end_user,
                    Credits::new(acked.cost),
                    acked.needed,
                );
                restored = restored.saturating_add(1);
            }
        }
        self.disk.acked_remove(&shown)?;
        Ok(restored)
    }

    /// Commits or releases a reservation. `Some(record)` replaces the record when the
    /// reservation lapsed before its commit (the actual is then charged as usage).
    async fn resolve(
        &self,
        client: &client::Client,
        replica: &Replica,
        record: &Record,
    ) -> Result<Option<Record>, String> {
        let keyed = client.with_key(&record.key);
        let end_user = EndUserId::new(&record.end_user_id).ok();
        let outcome = match &record.op {
            Op::Commit {
                reservation_id,
                units,
                ..
            } => {
                keyed
                    .commit_reservation(
                        reservation_id,
                        &CommitReservation {
                            units: Some(*units),
                            amount: None,
                        },
                    )
                    .await
            }
            Op::Release { reservation_id } => keyed.release_reservation(reservation_id).await,
            Op::Unreserve {
                reserve_key,
                feature_key,
                units,
                ttl_seconds,
            } => {
                let found = client
                    .with_key(reserve_key)
                    .reserve(&protocol::CreateReservation {
                        end_user_id: record.end_user_id.clone(),
                        feature_key: feature_key.clone(),
                        units: Some(*units),
                        amount: None,
                        ttl_seconds: Some(*ttl_seconds),
                    })
                    .await;
                match found {
                    Ok(reservation) => keyed.release_reservation(&reservation.id).await,
                    Err(error) => Err(error),
                }
            }
            Op::Usage { .. } => return Ok(None),
        };
        match outcome {
            Ok(reservation) => {
                if let Some(end_user) = &end_user
                    && let Some(needed) = replica.pending.confirm(
                        end_user,
                        Credits::new(record.pending),
                        reservation.version,
                        || replica.version(end_user),
                    )
                {
                    self.disk
                        .acked_put(&[acked_entry(record, needed)?])
                        .map_err(|error| error.to_string())?;
                }
                Ok(None)
            }
            Err(error)
                if !refused_for_good(&error) && error.code() != Some("reservation_not_active") =>
            {
                Err(error.to_string())
            }
            Err(error) => {
                if let (
                    Op::Commit {
                        units, feature_key, ..
                    },
                    Some("reservation_not_active"),
                ) = (&record.op, error.code())
                {
                    tracing::warn!(key = %record.key, "reservation lapsed before its commit; charging the actual as usage");
                    return Ok(Some(Record {
                        key: format!("{}-usage", record.key),
                        end_user_id: record.end_user_id.clone(),
                        pending: record.pending,
                        op: Op::Usage {
                            feature_key: feature_key.clone(),
                            units: *units,
                            timestamp_ms: replica.now().as_millis(),
                        },
                    }));
                }
                tracing::error!(%error, key = %record.key, "the control plane refused a reservation step; dropping it");
                if let Some(end_user) = &end_user {
                    replica
                        .pending
                        .drop_unconfirmed(end_user, Credits::new(record.pending));
                }
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use axum::Json;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    use super::*;

    /// A control plane whose `/v1/usage/batch` answers the given statuses in turn, then
    /// accepts everything.
    async fn fake_control_plane(refusals: Vec<u16>) -> (String, Arc<AtomicU32>) {
        fake_control_plane_at(refusals, 2).await
    }

    async fn fake_control_plane_at(
        refusals: Vec<u16>,
        ack_version: u64,
    ) -> (String, Arc<AtomicU32>) {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let app = axum::Router::new().route(
            "/v1/usage/batch",
            axum::routing::post(move |Json(batch): Json<UsageBatch>| {
                let call = counter.fetch_add(1, Ordering::AcqRel);
                let refusal = refusals
                    .get(usize::try_from(call).unwrap_or(usize::MAX))
                    .copied();
                async move {
                    if let Some(status) = refusal {
                        let problem =
                            protocol::Problem::new(status, "refused", "Refused", "try later");
                        return (
                            StatusCode::from_u16(status).expect("status"),
                            Json(serde_json::to_value(problem).expect("json")),
                        )
                            .into_response();
                    }
                    let results: Vec<protocol::BatchResult> = (0..batch.events.len())
                        .map(|index| protocol::BatchResult {
                            index,
                            status: BatchStatus::Created,
                            id: Some(format!("led_{index}")),
                            cost: Some(1),
                            covered: Some(1),
                            debt: Some(0),
                            version: Some(ack_version),
                            error: None,
                            timestamp_clamped_from: None,
                        })
                        .collect();
                    Json(protocol::UsageBatchRecorded { results }).into_response()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, calls)
    }

    fn usage(key: &str) -> Record {
        Record {
            key: key.into(),
            end_user_id: "u1".into(),
            pending: 1,
            op: Op::Usage {
                feature_key: "api_calls".into(),
                units: 1,
                timestamp_ms: 1_780_000_000_000,
            },
        }
    }

    #[tokio::test]
    async fn usage_waits_through_rate_limits_and_key_rotations_then_ships_once() {
        let dir = tempfile::tempdir().expect("dir");
        let disk = Disk::open(dir.path(), 8).expect("disk");
        let replica = Replica::open(disk.clone(), Arc::default()).expect("replica");
        let outbox = Outbox::new(disk, Flusher::new(), Durability::Interval, 500);
        let (url, calls) = fake_control_plane(vec![429, 401, 503]).await;
        let client = client::Client::new(&url, "qs_test_k")
            .expect("client")
            .retry(client::Retry {
                attempts: 1,
                ..client::Retry::default()
            });
        for key in ["k1", "k2", "k3"] {
            outbox.push(&usage(key)).await.expect("pushed");
            replica
                .pending
                .add(&EndUserId::new("u1").expect("id"), Credits::new(1));
        }
        for _ in 0..3 {
            assert!(outbox.ship_once(&client, &replica, 500).await.is_err());
            assert_eq!(
                outbox.depth(),
                3,
                "nothing is dropped on a temporary refusal"
            );
        }
        assert!(
            !outbox
                .ship_once(&client, &replica, 500)
                .await
                .expect("shipped")
        );
        assert_eq!(outbox.depth(), 0);
        assert_eq!(calls.load(Ordering::Acquire), 4);
        // Acknowledged at version 2: pending until the replica shows it.
        let user = EndUserId::new("u1").expect("id");
        assert_eq!(replica.pending.total(&user), Credits::new(3));
        replica.pending.install(&user, 2, || ());
        assert_eq!(replica.pending.total(&user), Credits::ZERO);
    }

    #[tokio::test]
    async fn a_malformed_batch_refused_for_good_is_dropped_and_its_spend_released() {
        let dir = tempfile::tempdir().expect("dir");
        let disk = Disk::open(dir.path(), 8).expect("disk");
        let replica = Replica::open(disk.clone(), Arc::default()).expect("replica");
        let outbox = Outbox::new(disk, Flusher::new(), Durability::Interval, 500);
        let (url, _calls) = fake_control_plane(vec![400]).await;
        let client = client::Client::new(&url, "qs_test_k").expect("client");
        outbox.push(&usage("bad")).await.expect("pushed");
        let user = EndUserId::new("u1").expect("id");
        replica.pending.add(&user, Credits::new(1));
        outbox
            .ship_once(&client, &replica, 500)
            .await
            .expect("handled");
        assert_eq!(outbox.depth(), 0);
        assert_eq!(replica.pending.total(&user), Credits::ZERO);
    }

    #[tokio::test]
    async fn acknowledged_spend_survives_a_crash_until_the_stored_replica_shows_it() {
        let dir = tempfile::tempdir().expect("dir");
        let user = EndUserId::new("u1").expect("id");
        let (url, _calls) = fake_control_plane_at(vec![], 1).await;
        let client = client::Client::new(&url, "qs_test_k").expect("client");
        {
            let disk = Disk::open(dir.path(), 8).expect("disk");
            let replica = Replica::open(disk.clone(), Arc::default()).expect("replica");
            let outbox = Outbox::new(disk, Flusher::new(), Durability::Interval, 500);
            outbox.push(&usage("k1")).await.expect("pushed");
            replica.pending.add(&user, Credits::new(1));
            outbox
                .ship_once(&client, &replica, 500)
                .await
                .expect("shipped");
            assert_eq!(outbox.depth(), 0, "acknowledged records leave the outbox");
            assert_eq!(replica.pending.total(&user), Credits::new(1));
            // The process dies here, before its replica shows version 1.
        }
        let disk = Disk::open(dir.path(), 8).expect("disk");
        let replica = Replica::open(disk.clone(), Arc::default()).expect("replica");
        let outbox = Outbox::new(disk.clone(), Flusher::new(), Durability::Interval, 500);
        assert_eq!(outbox.restore_acked(&replica).expect("restored"), 1);
        assert_eq!(
            replica.pending.total(&user),
            Credits::new(1),
            "still counted after the crash"
        );

        // The stream brings version 1: pending clears, and the next persist forgets it.
        let catalog_json: protocol::CatalogSnapshot = serde_json::from_value(serde_json::json!({
            "features": [], "plans": [], "variants": [],
            "settings": {"free_plan_variant_id": null, "low_balance_threshold": null}
        }))
        .expect("catalog");
        let catalog = catalog_json.to_ledger().expect("catalog");
        let now = ledger::Timestamp::from_millis(1_780_000_000_000);
        let mut state = ledger::EndUserState::new(user.clone(), now);
        let mut ids = ledger::SequentialIds::default();
        let mut cx = ledger::Cx {
            now,
            catalog: &catalog,
            ids: &mut ids,
        };
        state
            .grant(&mut cx, ledger::GrantRequest::new(Credits::new(5)))
            .expect("grant");
        assert_eq!(state.version(), 1);
        replica
            .apply(protocol::SyncRecord::EndUser {
                cursor: 4,
                end_user_id: "u1".into(),
                version: 1,
                state: state.into_parts(),
            })
            .expect("applied");
        assert_eq!(replica.pending.total(&user), Credits::ZERO);
        replica.persist().expect("persisted");
        assert!(disk.acked_all().expect("read").is_empty());
    }
}
