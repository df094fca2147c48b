//! The quarantine: outbox records the control plane refused for good, kept with the
//! refusal until an operator replays them (admitted usage is never deleted
//! unacknowledged). The records live in sled's `quarantine` tree under their outbox key.

use std::sync::atomic::Ordering;

use ledger::{Credits, EndUserId};
use protocol::{Problem, WireTime};
use serde::{Deserialize, Serialize};

use super::{Op, Outbox, Record, gauge_of};
use crate::disk::{DiskError, OutboxEntry};
use crate::replica::Replica;

/// A record the control plane refused for good, as the quarantine keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub record: Record,
    /// The refusal, when the control plane answered with a problem.
    pub problem: Option<Problem>,
    /// When the record was quarantined (the proxy's wall clock).
    pub quarantined_at: WireTime,
}

/// A quarantined record as the admin endpoint lists it: `key` names it for a replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuarantineEntry {
    pub key: String,
    #[serde(flatten)]
    pub quarantined: Quarantined,
}

/// Why a replay did nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("no quarantined record has the key {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Disk(#[from] DiskError),
}

/// The text of an outbox key (a ULID for every key the outbox makes).
fn key_text(key: &[u8]) -> String {
    <[u8; 16]>::try_from(key).map_or_else(
        |_| String::from_utf8_lossy(key).into_owned(),
        |bytes| ulid::Ulid::from_bytes(bytes).to_string(),
    )
}

/// The outbox key a [`key_text`] names.
fn key_bytes(text: &str) -> Vec<u8> {
    ulid::Ulid::from_string(text).map_or_else(
        |_| text.as_bytes().to_vec(),
        |ulid| ulid.to_bytes().to_vec(),
    )
}

/// Quarantined records moved back per transaction by a replay.
const REPLAY_CHUNK: usize = 500;

impl Outbox {
    /// Moves records refused for good from the outbox into the quarantine (one
    /// transaction) and stops counting their spend as pending: the control plane charged
    /// nothing for them.
    pub(super) fn quarantine(
        &self,
        replica: &Replica,
        refused: Vec<(Vec<u8>, Record, Option<Problem>)>,
    ) -> Result<(), String> {
        if refused.is_empty() {
            return Ok(());
        }
        let quarantined_at = WireTime(ledger::Timestamp::from_millis(replica.wall_ms()));
        let mut entries = Vec::with_capacity(refused.len());
        let mut spends = Vec::with_capacity(refused.len());
        for (key, mut record, problem) in refused {
            // It was sent: replayed, it goes again under its own key, never merged.
            if let Op::Usage { aggregable, .. } = &mut record.op {
                *aggregable = false;
            }
            if let Ok(end_user) = EndUserId::new(&record.end_user_id) {
                spends.push((end_user, Credits::new(record.pending)));
            }
            tracing::error!(
                key = %record.key,
                end_user = %record.end_user_id,
                op = ?record.op,
                problem = ?problem,
                "the control plane refused a record for good; quarantined (GET /quarantine on the admin port lists it, POST /quarantine/replay ships it again)"
            );
            let json = serde_json::to_vec(&Quarantined {
                record,
                problem,
                quarantined_at,
            })
            .map_err(|error| error.to_string())?;
            entries.push((key, json));
        }
        self.disk
            .quarantine_put(&entries)
            .map_err(|error| error.to_string())?;
        for (end_user, spend) in &spends {
            replica.pending.drop_unconfirmed(end_user, *spend);
        }
        let count = entries.len();
        let _ = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |depth| {
                Some(depth.saturating_sub(count))
            });
        let quarantined = self
            .quarantine_depth
            .fetch_add(count, Ordering::AcqRel)
            .saturating_add(count);
        metrics::counter!("qs_proxy_quarantined_total")
            .increment(u64::try_from(count).unwrap_or(u64::MAX));
        metrics::gauge!("qs_proxy_quarantine_depth").set(gauge_of(quarantined));
        Ok(())
    }

    /// Up to `limit` quarantined records, oldest first, after the key `after` when given;
    /// and the key to continue after, when more may follow.
    ///
    /// # Errors
    /// Storage failures.
    pub fn quarantined(
        &self,
        limit: usize,
        after: Option<&str>,
    ) -> Result<(Vec<QuarantineEntry>, Option<String>), DiskError> {
        let after = after.map(key_bytes);
        let stored = self.disk.quarantine_head(limit, after.as_deref())?;
        let full = stored.len() >= limit;
        let mut entries = Vec::with_capacity(stored.len());
        for (key, json) in &stored {
            entries.push(QuarantineEntry {
                key: key_text(key),
                quarantined: serde_json::from_slice(json)?,
            });
        }
        let next = if full {
            stored.last().map(|(key, _)| key_text(key))
        } else {
            None
        };
        Ok((entries, next))
    }

    /// Moves quarantined records back into the outbox to be shipped again: the one named
    /// `key`, or all of them. Their spend counts as pending again until acknowledged.
    /// Returns how many moved.
    ///
    /// # Errors
    /// `NotFound` for a `key` not in the quarantine; storage failures.
    pub fn replay(&self, replica: &Replica, key: Option<&str>) -> Result<usize, ReplayError> {
        let mut moved = 0usize;
        match key {
            Some(text) => {
                let key = key_bytes(text);
                let json = self
                    .disk
                    .quarantine_get(&key)?
                    .ok_or_else(|| ReplayError::NotFound(text.to_owned()))?;
                moved = self.release(replica, &[(key, json)])?;
                if moved == 0 {
                    return Err(ReplayError::NotFound(text.to_owned()));
                }
            }
            None => {
                // One pass in key order: a record quarantined again while this runs keeps
                // its key, behind the cursor, so the pass ends.
                let mut after: Option<Vec<u8>> = None;
                loop {
                    let chunk = self.disk.quarantine_head(REPLAY_CHUNK, after.as_deref())?;
                    let Some((last, _)) = chunk.last() else {
                        break;
                    };
                    after = Some(last.clone());
                    moved = moved.saturating_add(self.release(replica, &chunk)?);
                }
            }
        }
        if moved > 0 {
            tracing::info!(
                records = moved,
                "quarantined records replayed into the outbox"
            );
            self.wake.notify_one();
        }
        Ok(moved)
    }

    /// Moves quarantine entries `(key, quarantined json)` back into the outbox.
    fn release(&self, replica: &Replica, entries: &[OutboxEntry]) -> Result<usize, DiskError> {
        let mut records = Vec::with_capacity(entries.len());
        let mut spends = Vec::with_capacity(entries.len());
        for (key, json) in entries {
            let entry: Quarantined = match serde_json::from_slice(json) {
                Ok(entry) => entry,
                Err(error) => {
                    tracing::error!(%error, key = %key_text(key), "an unreadable quarantine entry stays where it is");
                    continue;
                }
            };
            // Counted before the record can be shipped (and its spend confirmed).
            if let Ok(end_user) = EndUserId::new(&entry.record.end_user_id) {
                let spend = Credits::new(entry.record.pending);
                replica.pending.add(&end_user, spend);
                spends.push((key.clone(), end_user, spend));
            }
            records.push((key.clone(), serde_json::to_vec(&entry.record)?));
        }
        let released = match self.disk.quarantine_release(&records) {
            Ok(released) => released,
            Err(error) => {
                for (_, end_user, spend) in &spends {
                    replica.pending.reduce(end_user, *spend);
                }
                return Err(error);
            }
        };
        // A record another replay took first counts once, there.
        for (key, end_user, spend) in &spends {
            if !released.contains(key) {
                replica.pending.reduce(end_user, *spend);
            }
        }
        let count = released.len();
        self.depth.fetch_add(count, Ordering::AcqRel);
        let left = self
            .quarantine_depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |depth| {
                Some(depth.saturating_sub(count))
            })
            .map_or(0, |before| before.saturating_sub(count));
        metrics::gauge!("qs_proxy_quarantine_depth").set(gauge_of(left));
        Ok(count)
    }
}
