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
use crate::disk::{Disk, DiskError, Flusher};
use crate::replica::Replica;

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
            self.flusher.durable(ticket).await;
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
                Op::Commit { .. } | Op::Release { .. } => {
                    // Resolve reservations in order with the usage before them.
                    if !usage.is_empty() {
                        break;
                    }
                    match self.resolve(client, replica, &record).await? {
                        Some(replacement) => {
                            // The reservation lapsed: charge the actual as plain usage.
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
                    Op::Commit { .. } | Op::Release { .. } => None,
                })
                .collect();
            let answer = client.record_usage_batch(&UsageBatch { events }).await;
            let answer = match answer {
                Ok(answer) => answer,
                Err(error) if error.is_unavailable() => return Err(error.to_string()),
                Err(error) => {
                    // The whole batch was refused (a bad key, say): it will never pass.
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
                        if let Some(end_user) = &end_user {
                            replica.pending.confirm(
                                end_user,
                                Credits::new(record.pending),
                                result.version,
                                replica.version(end_user),
                            );
                        }
                        metrics::counter!("qs_proxy_usage_shipped_total").increment(1);
                        done.push(key.clone());
                    }
                    BatchStatus::Error => {
                        let problem = result.error.as_ref();
                        if problem.is_some_and(|problem| problem.status >= 500) {
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
        self.remove(&done)?;
        Ok(full)
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
            Op::Usage { .. } => return Ok(None),
        };
        match outcome {
            Ok(_) => {
                if let Some(end_user) = &end_user {
                    replica.pending.confirm(
                        end_user,
                        Credits::new(record.pending),
                        None,
                        replica.version(end_user),
                    );
                }
                Ok(None)
            }
            Err(error) if error.is_unavailable() => Err(error.to_string()),
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
