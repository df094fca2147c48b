//! Everything the proxy keeps on disk, behind one small type so the storage engine (sled
//! 0.34, whose stable line is unmaintained) can be swapped without touching the rest.
//!
//! Four trees: `replica` (end user states in buckets, the catalog, the clock offset and
//! the cursor, written together in one atomic batch per change), `outbox` (usage not yet
//! acknowledged by the control plane, keyed by a time-ordered id), `acked` (acknowledged
//! costs the stored replica does not show yet) and `quarantine` (outbox records the
//! control plane refused for good, with the refusal, kept under their outbox key until an
//! operator replays them). A record moves between `outbox` and `quarantine` in one sled
//! transaction: it is always in exactly one of them. Records reach `outbox` from the
//! usage log (`crate::usage_log`) in one transaction with the log position they reach
//! (`usage_log` tree), so a crash leaves a record counted in exactly one of the two.
//!
//! sled keeps writes in memory until a flush; a killed process loses what was not
//! flushed. The replica does not need every write on disk (it resumes from whatever
//! cursor was stored with the states); the outbox flushes after each hand-on from the
//! usage log, before the log deletes what it handed on. Requests wait on the logs'
//! syncs, never sled's: [`Flusher`] shares one sync among all writers waiting at the
//! same time (group commit).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::watch;

/// A failure of the local store.
#[derive(Debug, thiserror::Error)]
#[error("local store: {0}")]
pub struct DiskError(String);

impl DiskError {
    pub fn new(message: String) -> DiskError {
        DiskError(message)
    }
}

impl From<sled::Error> for DiskError {
    fn from(error: sled::Error) -> DiskError {
        DiskError(error.to_string())
    }
}

impl From<serde_json::Error> for DiskError {
    fn from(error: serde_json::Error) -> DiskError {
        DiskError(format!("corrupt record: {error}"))
    }
}

fn transaction_error(error: TransactionError<()>) -> DiskError {
    match error {
        TransactionError::Abort(()) => DiskError("transaction aborted".into()),
        TransactionError::Storage(error) => DiskError::from(error),
    }
}

/// The key of the usage log's handed-on position.
const HANDED_ON: &[u8] = b"handed_on";

/// The proxy's sled database.
#[derive(Clone)]
pub struct Disk {
    db: sled::Db,
    replica: sled::Tree,
    outbox: sled::Tree,
    /// Usage the control plane acknowledged that the stored replica may not show yet.
    acked: sled::Tree,
    /// Outbox records refused for good, waiting for an operator.
    quarantine: sled::Tree,
    /// What requests spent from leases, not yet acknowledged: keyed by lease id, report
    /// sequence and a time-ordered id (see [`LeaseSpendKey`]).
    lease_spend: sled::Tree,
    /// Where the usage log was handed on to the outbox up to (`handed_on`), written in
    /// the transaction that wrote those records to the outbox.
    usage_log: sled::Tree,
    /// The leases this proxy holds or held with spend left to report: id → end user and
    /// feature (to charge that spend as usage if the lease is gone).
    leases: sled::Tree,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk").finish_non_exhaustive()
    }
}

/// Keys of the replica tree.
/// Keys of the replica tree. The layout's own names (`r/`): an older build, which reads
/// `m/cursor` and `m/complete` and knows nothing of `m/format`, finds no complete copy
/// in a tree this layout wrote and takes a snapshot (clearing the tree) instead of
/// serving a copy without its end users; and what it writes cannot move this layout's
/// cursor past its states if the newer build comes back.
const CURSOR: &[u8] = b"r/cursor";
const CATALOG: &[u8] = b"r/catalog";
const CLOCK: &[u8] = b"r/clock";
const COMPLETE: &[u8] = b"r/complete";
const HEARD: &[u8] = b"r/heard";
const FORMAT: &[u8] = b"m/format";
const BUCKET_PREFIX: &[u8] = b"b/";

/// The replica tree's layout, stored with every write: a copy in another layout (an
/// earlier build's one key per end user in JSON, or a later change to the encoded
/// state) is dropped at start for a new snapshot rather than misread. Bump it whenever
/// the layout or `ledger::StateParts`' encoding changes (`replica`'s tests pin the
/// encoding of a known state).
pub const REPLICA_FORMAT: u8 = 2;

/// A cost the control plane acknowledged, kept on disk until the stored replica shows the
/// state `needed` (so a crash in between does not forget it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Acked {
    pub end_user_id: String,
    pub cost: i64,
    pub needed: u64,
    /// Wall-clock ms when acknowledged (very old entries are dropped).
    pub at_ms: i64,
}

/// What one request spent from a lease: its units and cost (16 bytes on disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSpend {
    pub units: u64,
    pub cost: i64,
}

impl LeaseSpend {
    fn bytes(self) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.units.to_be_bytes());
        bytes[8..].copy_from_slice(&self.cost.to_be_bytes());
        bytes
    }

    fn from_bytes(bytes: &[u8]) -> Result<LeaseSpend, DiskError> {
        let units: [u8; 8] = bytes
            .get(..8)
            .and_then(|slice| slice.try_into().ok())
            .ok_or_else(|| DiskError("corrupt lease spend".into()))?;
        let cost: [u8; 8] = bytes
            .get(8..16)
            .and_then(|slice| slice.try_into().ok())
            .ok_or_else(|| DiskError("corrupt lease spend".into()))?;
        Ok(LeaseSpend {
            units: u64::from_be_bytes(units),
            cost: i64::from_be_bytes(cost),
        })
    }
}

/// Where a lease spend record sits: the lease id's bytes and a NUL, the report sequence
/// it belongs to (big-endian, so a lease's records sort by sequence) and a time-ordered
/// id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSpendKey {
    pub lease: String,
    pub sequence: u64,
    pub id: [u8; 16],
}

fn lease_prefix(lease: &str) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(lease.len().saturating_add(25));
    prefix.extend_from_slice(lease.as_bytes());
    prefix.push(0);
    prefix
}

impl LeaseSpendKey {
    fn bytes(&self) -> Vec<u8> {
        let mut key = lease_prefix(&self.lease);
        key.extend_from_slice(&self.sequence.to_be_bytes());
        key.extend_from_slice(&self.id);
        key
    }

    fn parse(key: &[u8]) -> Result<(String, u64), DiskError> {
        let corrupt = || DiskError("corrupt lease spend key".into());
        let nul = key.iter().position(|byte| *byte == 0).ok_or_else(corrupt)?;
        let lease = String::from_utf8(key[..nul].to_vec()).map_err(|_| corrupt())?;
        let sequence: [u8; 8] = key
            .get(nul.saturating_add(1)..nul.saturating_add(9))
            .and_then(|slice| slice.try_into().ok())
            .ok_or_else(corrupt)?;
        Ok((lease, u64::from_be_bytes(sequence)))
    }
}

/// Which end user and feature a lease is for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseMeta {
    pub end_user_id: String,
    pub feature_key: String,
}

/// An outbox record as stored: its key and its JSON.
pub type OutboxEntry = (Vec<u8>, Vec<u8>);

/// One change to the replica, applied atomically with the cursor.
#[derive(Debug, Clone)]
pub enum ReplicaWrite {
    /// A bucket of end user states, as `replica` encodes it.
    Bucket {
        bucket: u16,
        bytes: Vec<u8>,
    },
    Catalog(Vec<u8>),
    Clock(i64),
    Cursor(i64),
    /// The snapshot finished: the stored state is complete as of the cursor.
    Complete(bool),
    /// Wall-clock milliseconds when the control plane was last heard from.
    Heard(i64),
}

/// What a restart finds on disk.
#[derive(Debug, Default)]
pub struct Stored {
    /// The tree holds a copy in another layout ([`REPLICA_FORMAT`]): nothing else was
    /// read.
    pub outdated: bool,
    pub complete: bool,
    pub cursor: Option<i64>,
    pub clock_offset_ms: i64,
    pub heard_ms: Option<i64>,
    pub catalog: Option<Vec<u8>>,
    /// The buckets of end user states.
    pub buckets: Vec<Vec<u8>>,
}

fn bucket_key(bucket: u16) -> [u8; 4] {
    let [high, low] = bucket.to_be_bytes();
    [BUCKET_PREFIX[0], BUCKET_PREFIX[1], high, low]
}

fn i64_of(bytes: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(bytes.try_into().ok()?))
}

impl Disk {
    /// Opens (or creates) the database in `dir`; sled locks it against a second process.
    ///
    /// # Errors
    /// The directory cannot be used.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Disk, DiskError> {
        std::fs::create_dir_all(dir)
            .map_err(|error| DiskError(format!("{}: {error}", dir.display())))?;
        // sled locks the directory; a previous owner in this process (a restart in
        // place) releases it when its background flusher notices, within a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let db = loop {
            let opened = sled::Config::new()
                .path(dir)
                .cache_capacity(cache_mb.saturating_mul(1024 * 1024))
                .flush_every_ms(Some(500))
                .open();
            match opened {
                Ok(db) => break db,
                Err(error)
                    if error.to_string().contains("lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(error) => {
                    return Err(DiskError(format!("{}: {error}", dir.display())));
                }
            }
        };
        let replica = db.open_tree("replica")?;
        let outbox = db.open_tree("outbox")?;
        let acked = db.open_tree("acked")?;
        let quarantine = db.open_tree("quarantine")?;
        let lease_spend = db.open_tree("lease_spend")?;
        let leases = db.open_tree("leases")?;
        let usage_log = db.open_tree("usage_log")?;
        Ok(Disk {
            db,
            replica,
            outbox,
            acked,
            quarantine,
            lease_spend,
            usage_log,
            leases,
        })
    }

    /// Applies replica writes in one atomic batch.
    ///
    /// # Errors
    /// sled failures.
    pub fn write_replica(&self, writes: &[ReplicaWrite]) -> Result<(), DiskError> {
        let mut batch = sled::Batch::default();
        for write in writes {
            match write {
                ReplicaWrite::Bucket { bucket, bytes } => {
                    batch.insert(&bucket_key(*bucket), bytes.as_slice());
                }
                ReplicaWrite::Catalog(json) => batch.insert(CATALOG, json.as_slice()),
                ReplicaWrite::Clock(offset) => batch.insert(CLOCK, &offset.to_be_bytes()),
                ReplicaWrite::Cursor(cursor) => batch.insert(CURSOR, &cursor.to_be_bytes()),
                ReplicaWrite::Complete(done) => batch.insert(COMPLETE, &[u8::from(*done)]),
                ReplicaWrite::Heard(at) => batch.insert(HEARD, &at.to_be_bytes()),
            }
        }
        batch.insert(FORMAT, &[REPLICA_FORMAT]);
        self.replica.apply_batch(batch)?;
        Ok(())
    }

    /// Drops the replica (before a fresh snapshot after `410`).
    ///
    /// # Errors
    /// sled failures.
    pub fn clear_replica(&self) -> Result<(), DiskError> {
        self.replica.clear()?;
        Ok(())
    }

    /// Everything the replica tree holds.
    ///
    /// # Errors
    /// sled failures.
    pub fn load_replica(&self) -> Result<Stored, DiskError> {
        let format = self.replica.get(FORMAT)?;
        if format.as_deref() != Some(&[REPLICA_FORMAT][..]) {
            return Ok(Stored {
                outdated: !self.replica.is_empty(),
                ..Stored::default()
            });
        }
        let mut stored = Stored {
            outdated: false,
            complete: self
                .replica
                .get(COMPLETE)?
                .is_some_and(|value| value.as_ref() == [1]),
            cursor: self.replica.get(CURSOR)?.and_then(|value| i64_of(&value)),
            clock_offset_ms: self
                .replica
                .get(CLOCK)?
                .and_then(|value| i64_of(&value))
                .unwrap_or(0),
            heard_ms: self.replica.get(HEARD)?.and_then(|value| i64_of(&value)),
            catalog: self.replica.get(CATALOG)?.map(|value| value.to_vec()),
            buckets: Vec::new(),
        };
        for item in self.replica.scan_prefix(BUCKET_PREFIX) {
            let (_, value) = item?;
            stored.buckets.push(value.to_vec());
        }
        Ok(stored)
    }

    /// Writes one raw key to the replica tree (tests of other layouts).
    #[cfg(test)]
    pub(crate) fn replica_raw_insert(&self, key: &[u8], value: &[u8]) {
        self.replica.insert(key, value).expect("insert");
    }

    /// One bucket of end user states, if stored.
    ///
    /// # Errors
    /// sled failures.
    pub fn replica_bucket(&self, bucket: u16) -> Result<Option<Vec<u8>>, DiskError> {
        Ok(self
            .replica
            .get(bucket_key(bucket))?
            .map(|value| value.to_vec()))
    }

    /// Adds an outbox record under a time-ordered key.
    ///
    /// # Errors
    /// sled failures.
    pub fn outbox_put(&self, key: &[u8], json: &[u8]) -> Result<(), DiskError> {
        self.outbox.insert(key, json)?;
        Ok(())
    }

    /// Writes records the usage log held (`(outbox key, record json)`) to the outbox,
    /// with the log position they reach (`handed_on`), in one transaction: a crash
    /// leaves both or neither.
    ///
    /// # Errors
    /// sled failures (then nothing was written).
    pub fn outbox_absorb(
        &self,
        records: &[([u8; 16], Vec<u8>)],
        handed_on: crate::usage_log::Position,
    ) -> Result<(), DiskError> {
        (&self.outbox, &self.usage_log)
            .transaction(|(outbox, usage_log)| {
                for (key, json) in records {
                    outbox.insert(&key[..], json.as_slice())?;
                }
                usage_log.insert(HANDED_ON, &handed_on.to_bytes()[..])?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)
    }

    /// How far the usage log has been handed on to the outbox (`None`: never).
    ///
    /// # Errors
    /// sled failures, or a position that is not one.
    pub fn usage_log_handed_on(&self) -> Result<Option<crate::usage_log::Position>, DiskError> {
        match self.usage_log.get(HANDED_ON)? {
            None => Ok(None),
            Some(bytes) => crate::usage_log::Position::from_bytes(&bytes)
                .map(Some)
                .ok_or_else(|| DiskError("corrupt usage log position".into())),
        }
    }

    /// Up to `limit` outbox records in key order.
    ///
    /// # Errors
    /// sled failures.
    pub fn outbox_head(&self, limit: usize) -> Result<Vec<OutboxEntry>, DiskError> {
        let mut records = Vec::new();
        for item in self.outbox.iter().take(limit) {
            let (key, value) = item?;
            records.push((key.to_vec(), value.to_vec()));
        }
        Ok(records)
    }

    /// Removes acknowledged records.
    ///
    /// # Errors
    /// sled failures.
    pub fn outbox_remove(&self, keys: &[Vec<u8>]) -> Result<(), DiskError> {
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key.as_slice());
        }
        self.outbox.apply_batch(batch)?;
        Ok(())
    }

    /// The last outbox record's key, if any.
    ///
    /// # Errors
    /// sled failures.
    pub fn outbox_last_key(&self) -> Result<Option<Vec<u8>>, DiskError> {
        Ok(self.outbox.last()?.map(|(key, _)| key.to_vec()))
    }

    /// Removes the records `removed` and writes `written`, all or nothing (one sled
    /// batch): how aggregated usage replaces its parts.
    ///
    /// # Errors
    /// sled failures (then nothing changed).
    pub fn outbox_replace(
        &self,
        removed: &[Vec<u8>],
        written: &[OutboxEntry],
    ) -> Result<(), DiskError> {
        let mut batch = sled::Batch::default();
        for key in removed {
            batch.remove(key.as_slice());
        }
        for (key, json) in written {
            batch.insert(key.as_slice(), json.as_slice());
        }
        self.outbox.apply_batch(batch)?;
        Ok(())
    }

    /// Notes acknowledged records (kept until the stored replica shows them).
    ///
    /// # Errors
    /// sled failures.
    pub fn acked_put(&self, entries: &[OutboxEntry]) -> Result<(), DiskError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (key, json) in entries {
            batch.insert(key.as_slice(), json.as_slice());
        }
        self.acked.apply_batch(batch)?;
        Ok(())
    }

    /// Every acknowledged record still kept.
    ///
    /// # Errors
    /// sled failures.
    pub fn acked_all(&self) -> Result<Vec<OutboxEntry>, DiskError> {
        let mut entries = Vec::new();
        for item in &self.acked {
            let (key, value) = item?;
            entries.push((key.to_vec(), value.to_vec()));
        }
        Ok(entries)
    }

    /// Forgets acknowledged records the stored replica shows.
    ///
    /// # Errors
    /// sled failures.
    pub fn acked_remove(&self, keys: &[Vec<u8>]) -> Result<(), DiskError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key.as_slice());
        }
        self.acked.apply_batch(batch)?;
        Ok(())
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Moves outbox records into the quarantine: each `(key, json)` is inserted there
    /// under its outbox key and removed from the outbox, all in one transaction.
    ///
    /// # Errors
    /// sled failures (then nothing moved).
    pub fn quarantine_put(&self, entries: &[OutboxEntry]) -> Result<(), DiskError> {
        if entries.is_empty() {
            return Ok(());
        }
        (&self.outbox, &self.quarantine)
            .transaction(|(outbox, quarantine)| {
                for (key, json) in entries {
                    outbox.remove(key.as_slice())?;
                    quarantine.insert(key.as_slice(), json.as_slice())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)
    }

    /// Up to `limit` quarantined entries, oldest first, after the key `after` (exclusive)
    /// when given.
    ///
    /// # Errors
    /// sled failures.
    pub fn quarantine_head(
        &self,
        limit: usize,
        after: Option<&[u8]>,
    ) -> Result<Vec<OutboxEntry>, DiskError> {
        let items = match after {
            Some(after) => self
                .quarantine
                .range::<&[u8], _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => self.quarantine.iter(),
        };
        let mut entries = Vec::new();
        for item in items.take(limit) {
            let (key, value) = item?;
            entries.push((key.to_vec(), value.to_vec()));
        }
        Ok(entries)
    }

    /// One quarantined entry.
    ///
    /// # Errors
    /// sled failures.
    pub fn quarantine_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DiskError> {
        Ok(self.quarantine.get(key)?.map(|value| value.to_vec()))
    }

    /// Moves quarantined entries back into the outbox: each `(key, record json)` is
    /// removed from the quarantine and written to the outbox under the same key, in one
    /// transaction. Keys no longer in the quarantine are skipped (a concurrent replay took
    /// them); returns the keys that moved.
    ///
    /// # Errors
    /// sled failures (then nothing moved).
    pub fn quarantine_release(&self, entries: &[OutboxEntry]) -> Result<Vec<Vec<u8>>, DiskError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        (&self.outbox, &self.quarantine)
            .transaction(|(outbox, quarantine)| {
                let mut moved = Vec::new();
                for (key, json) in entries {
                    if quarantine.remove(key.as_slice())?.is_some() {
                        outbox.insert(key.as_slice(), json.as_slice())?;
                        moved.push(key.clone());
                    }
                }
                Ok::<_, ConflictableTransactionError<()>>(moved)
            })
            .map_err(transaction_error)
    }

    pub fn quarantine_len(&self) -> usize {
        self.quarantine.len()
    }

    /// Records what one request spent from a lease (durable after the next flush).
    ///
    /// # Errors
    /// sled failures.
    pub fn lease_spend_put(&self, key: &LeaseSpendKey, spend: LeaseSpend) -> Result<(), DiskError> {
        self.lease_spend.insert(key.bytes(), &spend.bytes()[..])?;
        Ok(())
    }

    /// What was spent from `lease` under report `sequence`, with the records' keys.
    ///
    /// # Errors
    /// sled failures, a corrupt record.
    pub fn lease_spend_of(
        &self,
        lease: &str,
        sequence: u64,
    ) -> Result<(Vec<Vec<u8>>, Vec<LeaseSpend>), DiskError> {
        let mut prefix = lease_prefix(lease);
        prefix.extend_from_slice(&sequence.to_be_bytes());
        let mut keys = Vec::new();
        let mut spends = Vec::new();
        for item in self.lease_spend.scan_prefix(&prefix) {
            let (key, value) = item?;
            spends.push(LeaseSpend::from_bytes(&value)?);
            keys.push(key.to_vec());
        }
        Ok((keys, spends))
    }

    /// Every lease with spend on disk, and the report sequences it is under, ascending.
    ///
    /// # Errors
    /// sled failures, a corrupt key.
    pub fn lease_spend_index(&self) -> Result<Vec<(String, Vec<u64>)>, DiskError> {
        let mut index: Vec<(String, Vec<u64>)> = Vec::new();
        for item in self.lease_spend.iter() {
            let (key, _) = item?;
            let (lease, sequence) = LeaseSpendKey::parse(&key)?;
            match index.last_mut() {
                Some((last, sequences)) if *last == lease => {
                    if sequences.last() != Some(&sequence) {
                        sequences.push(sequence);
                    }
                }
                _ => index.push((lease, vec![sequence])),
            }
        }
        Ok(index)
    }

    /// Lease spend records not yet acknowledged (walks the tree: for scrapes and tests).
    pub fn lease_spend_len(&self) -> usize {
        self.lease_spend.len()
    }

    /// Removes acknowledged spend records.
    ///
    /// # Errors
    /// sled failures.
    pub fn lease_spend_remove(&self, keys: &[Vec<u8>]) -> Result<(), DiskError> {
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key.as_slice());
        }
        self.lease_spend.apply_batch(batch)?;
        Ok(())
    }

    /// Remembers which end user and feature a lease is for.
    ///
    /// # Errors
    /// sled failures.
    pub fn lease_put(&self, lease: &str, meta: &LeaseMeta) -> Result<(), DiskError> {
        self.leases
            .insert(lease.as_bytes(), serde_json::to_vec(meta)?)?;
        Ok(())
    }

    /// # Errors
    /// sled failures, a corrupt record.
    pub fn lease_get(&self, lease: &str) -> Result<Option<LeaseMeta>, DiskError> {
        self.leases
            .get(lease.as_bytes())?
            .map(|json| serde_json::from_slice(&json).map_err(DiskError::from))
            .transpose()
    }

    /// Every lease remembered (a restart reports their spend and releases them).
    ///
    /// # Errors
    /// sled failures, a corrupt record.
    pub fn leases_all(&self) -> Result<Vec<(String, LeaseMeta)>, DiskError> {
        self.leases
            .iter()
            .map(|item| {
                let (key, json) = item?;
                Ok((
                    String::from_utf8_lossy(&key).into_owned(),
                    serde_json::from_slice(&json)?,
                ))
            })
            .collect()
    }

    /// # Errors
    /// sled failures.
    pub fn lease_forget(&self, lease: &str) -> Result<(), DiskError> {
        self.leases.remove(lease.as_bytes())?;
        Ok(())
    }

    /// Writes everything to disk (one fsync).
    ///
    /// # Errors
    /// sled failures.
    pub fn flush(&self) -> Result<(), DiskError> {
        self.db.flush()?;
        Ok(())
    }
}

/// What a [`Flusher`] makes durable: the outbox's usage log, or the spend log (or sled).
pub trait Flush: Send + Sync + 'static {
    /// # Errors
    /// The disk refused the flush.
    fn flush(&self) -> Result<(), DiskError>;
}

impl Flush for Disk {
    fn flush(&self) -> Result<(), DiskError> {
        Disk::flush(self)
    }
}

impl Flush for crate::outbox::Outbox {
    /// The outbox's records go to its usage log first.
    fn flush(&self) -> Result<(), DiskError> {
        self.log().sync()
    }
}

impl Flush for crate::spend_log::SpendLog {
    fn flush(&self) -> Result<(), DiskError> {
        self.sync()
    }
}

/// Group commit (for the usage log, and for the spend log): a writer bumps the written count
/// and waits until a flush that started after its write has finished. One flush serves
/// everyone waiting.
///
/// The flushes run on a thread of their own ([`Flusher::run`] starts it): a request in
/// `sync` durability waits for a wake-up, an fsync and a wake-up, never for its turn on
/// the background runtime behind a feed record being applied or a report being sent.
#[derive(Debug)]
pub struct Flusher {
    written: AtomicU64,
    flushed: watch::Sender<u64>,
    wake: Mutex<Wake>,
    woken: Condvar,
    /// The writes up to this ticket were in a flush that failed: their waiters get an
    /// error instead of waiting for ever (later writes wait for the next flush).
    failed_through: AtomicU64,
    /// The flusher has ended (or never started): every waiter gets an error.
    ended: std::sync::atomic::AtomicBool,
}

/// What the flushing thread is asked, under [`Flusher::wake`].
#[derive(Debug, Default)]
struct Wake {
    /// A writer waits for a flush.
    wanted: bool,
    /// Flush once more and end.
    stop: bool,
}

impl Flusher {
    pub fn new() -> Arc<Flusher> {
        Arc::new(Flusher {
            written: AtomicU64::new(0),
            flushed: watch::Sender::new(0),
            wake: Mutex::new(Wake::default()),
            woken: Condvar::new(),
            failed_through: AtomicU64::new(0),
            ended: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn asked(&self) -> MutexGuard<'_, Wake> {
        self.wake.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ask(&self, ask: impl FnOnce(&mut Wake)) {
        ask(&mut self.asked());
        self.woken.notify_one();
    }

    /// Notes a write; the returned ticket is durable once [`Flusher::durable`] returns.
    pub fn wrote(&self) -> u64 {
        self.written
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1)
    }

    /// Waits until the write `ticket` is on disk.
    ///
    /// # Errors
    /// The flush failed (a full or read-only disk, say).
    pub async fn durable(&self, ticket: u64) -> Result<(), DiskError> {
        let mut flushed = self.flushed.subscribe();
        if *flushed.borrow() >= ticket {
            return Ok(());
        }
        let asked = std::time::Instant::now();
        self.ask(|wake| wake.wanted = true);
        let outcome = flushed
            .wait_for(|done| {
                *done >= ticket
                    || self.failed_through.load(Ordering::Acquire) >= ticket
                    || self.ended.load(Ordering::Acquire)
            })
            .await
            .map(|done| *done >= ticket);
        // What `sync` durability adds to a request: the rest of a flush under way (it
        // may not cover this write), its own, and the wake-ups either side.
        metrics::histogram!("qs_proxy_flush_wait_seconds").record(asked.elapsed().as_secs_f64());
        match outcome {
            Ok(true) => Ok(()),
            Ok(false) => Err(DiskError("usage could not be flushed to disk".into())),
            Err(_) => Err(DiskError("the usage flusher stopped".into())),
        }
    }

    /// Flushes on demand (sync durability) and every `interval` regardless, on a thread
    /// of its own, until `stop` turns (or its sender goes): then a last flush, and
    /// whoever still waits gets an error.
    pub async fn run(
        self: Arc<Self>,
        disk: Arc<dyn Flush>,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let flusher = Arc::clone(&self);
        let thread = std::thread::Builder::new()
            .name("qs-flush".into())
            .spawn(move || flusher.flush_loop(&disk, interval));
        let thread = match thread {
            Ok(thread) => thread,
            Err(error) => {
                tracing::error!(%error, "cannot start the usage flushing thread");
                self.end();
                return;
            }
        };
        let _ = stop.changed().await;
        self.ask(|wake| wake.stop = true);
        if !matches!(
            tokio::task::spawn_blocking(move || thread.join()).await,
            Ok(Ok(()))
        ) {
            tracing::error!("the usage flushing thread did not end cleanly");
        }
    }

    fn flush_loop(&self, disk: &Arc<dyn Flush>, interval: Duration) {
        loop {
            let stop = {
                let mut asked = self.asked();
                if !asked.wanted && !asked.stop {
                    asked = self
                        .woken
                        .wait_timeout(asked, interval)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                asked.wanted = false;
                asked.stop
            };
            self.flush_once(disk);
            if stop {
                // Anyone still waiting (or writing) now gets an error, not a hang.
                self.end();
                return;
            }
        }
    }

    fn flush_once(&self, disk: &Arc<dyn Flush>) {
        let target = self.written.load(Ordering::Acquire);
        if *self.flushed.borrow() >= target {
            return;
        }
        let started = std::time::Instant::now();
        // A panic in a flush is a failed flush: its waiters get an error and the thread
        // goes on.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| disk.flush()));
        metrics::histogram!("qs_proxy_flush_seconds").record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(())) => {
                self.flushed.send_modify(|done| *done = (*done).max(target));
            }
            Ok(Err(error)) => {
                tracing::error!(%error, "usage flush failed (outbox or spend log)");
                self.fail_through(target);
            }
            Err(_) => {
                tracing::error!("usage flush panicked (outbox or spend log)");
                self.fail_through(target);
            }
        }
    }

    /// Wakes the waiters of writes up to `target` with an error.
    fn fail_through(&self, target: u64) {
        self.failed_through.fetch_max(target, Ordering::AcqRel);
        self.flushed.send_modify(|_| {});
    }

    /// Wakes every waiter, now and later, with an error.
    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.flushed.send_modify(|_| {});
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_writes_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let disk = Disk::open(dir.path(), 8).expect("open");
            disk.write_replica(&[
                ReplicaWrite::Bucket {
                    bucket: 7,
                    bytes: b"seven".to_vec(),
                },
                ReplicaWrite::Cursor(42),
                ReplicaWrite::Clock(-5),
                ReplicaWrite::Complete(true),
            ])
            .expect("write");
            disk.flush().expect("flush");
        }
        let disk = Disk::open(dir.path(), 8).expect("reopen");
        let stored = disk.load_replica().expect("load");
        assert!(stored.complete);
        assert_eq!(stored.cursor, Some(42));
        assert_eq!(stored.clock_offset_ms, -5);
        assert!(!stored.outdated);
        assert_eq!(stored.buckets, vec![b"seven".to_vec()]);
        // What an older build reads to decide its copy is complete is not there.
        assert_eq!(disk.replica.get(b"m/complete").expect("read"), None);
        assert_eq!(disk.replica.get(b"m/cursor").expect("read"), None);
        assert_eq!(
            disk.replica_bucket(7).expect("read"),
            Some(b"seven".to_vec())
        );
        assert_eq!(disk.replica_bucket(8).expect("read"), None);
    }

    #[test]
    fn a_replica_in_another_layout_is_reported_outdated_and_not_read() {
        let dir = tempfile::tempdir().expect("dir");
        let disk = Disk::open(dir.path(), 8).expect("open");
        assert!(!disk.load_replica().expect("load").outdated, "empty");
        // The layout before buckets: one JSON key per end user, no format key.
        disk.replica
            .insert(b"u/u1", b"{}".as_slice())
            .expect("insert");
        disk.replica
            .insert(b"m/cursor", &42_i64.to_be_bytes())
            .expect("insert");
        disk.replica.insert(b"m/complete", &[1]).expect("insert");
        let stored = disk.load_replica().expect("load");
        assert!(stored.outdated);
        assert!(!stored.complete);
        assert_eq!(stored.cursor, None);
        disk.replica
            .insert(FORMAT, &[REPLICA_FORMAT.wrapping_add(1)])
            .expect("insert");
        assert!(disk.load_replica().expect("load").outdated);
    }

    #[test]
    fn the_outbox_reads_in_key_order_and_removes_what_was_acknowledged() {
        let dir = tempfile::tempdir().expect("dir");
        let disk = Disk::open(dir.path(), 8).expect("open");
        for key in [b"b", b"a", b"c"] {
            disk.outbox_put(key, key).expect("put");
        }
        let head = disk.outbox_head(2).expect("head");
        assert_eq!(head[0].0, b"a");
        assert_eq!(head[1].0, b"b");
        disk.outbox_remove(&[b"a".to_vec()]).expect("remove");
        assert_eq!(disk.outbox_len(), 2);
    }

    #[test]
    fn quarantined_records_leave_the_outbox_and_come_back_under_their_key() {
        let dir = tempfile::tempdir().expect("dir");
        let disk = Disk::open(dir.path(), 8).expect("open");
        for key in [b"a", b"b", b"c"] {
            disk.outbox_put(key, b"record").expect("put");
        }
        disk.quarantine_put(&[(b"b".to_vec(), b"refused".to_vec())])
            .expect("quarantined");
        assert_eq!(disk.outbox_len(), 2);
        assert_eq!(disk.quarantine_len(), 1);
        assert_eq!(
            disk.quarantine_get(b"b").expect("read"),
            Some(b"refused".to_vec())
        );
        assert_eq!(
            disk.quarantine_head(10, None).expect("head"),
            vec![(b"b".to_vec(), b"refused".to_vec())]
        );
        assert!(
            disk.quarantine_head(10, Some(b"b"))
                .expect("head")
                .is_empty()
        );
        let entries = [(b"b".to_vec(), b"record".to_vec())];
        assert_eq!(
            disk.quarantine_release(&entries).expect("released"),
            vec![b"b".to_vec()]
        );
        assert!(
            disk.quarantine_release(&entries)
                .expect("released")
                .is_empty(),
            "a second replay finds nothing"
        );
        assert_eq!(disk.quarantine_len(), 0);
        let keys: Vec<Vec<u8>> = disk
            .outbox_head(10)
            .expect("head")
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(keys, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    }

    #[tokio::test]
    async fn concurrent_writers_share_flushes() {
        let dir = tempfile::tempdir().expect("dir");
        let disk = Disk::open(dir.path(), 8).expect("open");
        let (flusher, _stop, _running) = running(Arc::new(disk.clone()));
        let mut tasks = Vec::new();
        for n in 0..32u32 {
            let (disk, flusher) = (disk.clone(), flusher.clone());
            tasks.push(tokio::spawn(async move {
                disk.outbox_put(&n.to_be_bytes(), b"x").expect("put");
                let ticket = flusher.wrote();
                flusher.durable(ticket).await.expect("flushed");
            }));
        }
        for task in tasks {
            task.await.expect("writer");
        }
        assert!(*flusher.flushed.borrow() >= 32);
    }

    /// A flusher of `disk` running (hourly interval flushes: the tests' waits are
    /// answered by flushes on demand), what stops it, and its task.
    fn running(
        disk: Arc<dyn Flush>,
    ) -> (
        Arc<Flusher>,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let flusher = Flusher::new();
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(flusher.clone().run(disk, Duration::from_secs(3600), stop));
        (flusher, stop_tx, task)
    }

    /// A disk whose first flush panics and whose next ones succeed.
    #[derive(Default)]
    struct PanicsOnce(std::sync::atomic::AtomicBool);

    impl Flush for PanicsOnce {
        fn flush(&self) -> Result<(), DiskError> {
            assert!(
                self.0.swap(true, Ordering::AcqRel),
                "the first flush panics"
            );
            Ok(())
        }
    }

    /// A panic in a flush fails its waiters, and the flusher goes on: a later write waits
    /// for the next flush rather than inherit the failure.
    #[tokio::test]
    async fn a_panicking_flush_fails_its_waiters_and_the_flusher_goes_on() {
        let (flusher, stop_tx, task) = running(Arc::new(PanicsOnce::default()));
        let ticket = flusher.wrote();
        assert!(flusher.durable(ticket).await.is_err(), "the panicked flush");
        let ticket = flusher.wrote();
        flusher
            .durable(ticket)
            .await
            .expect("a later write waits for the next flush, which succeeds");
        stop_tx.send(true).expect("stop");
        task.await.expect("ends");
    }

    /// A disk that refuses every flush.
    struct Refusing;

    impl Flush for Refusing {
        fn flush(&self) -> Result<(), DiskError> {
            Err(DiskError("the disk is full".into()))
        }
    }

    /// A refused flush answers its waiters with an error rather than a wait.
    #[tokio::test]
    async fn a_refused_flush_answers_with_an_error() {
        let (flusher, stop_tx, task) = running(Arc::new(Refusing));
        let ticket = flusher.wrote();
        assert!(
            flusher.durable(ticket).await.is_err(),
            "refused, not waited on"
        );
        stop_tx.send(true).expect("stop");
        task.await.expect("the refusing flusher ends too");
    }

    /// Once stopped, the thread has ended and a writer gets an error rather than a wait
    /// for a flush that never comes.
    #[tokio::test]
    async fn a_stopped_flusher_answers_with_errors() {
        let dir = tempfile::tempdir().expect("dir");
        let disk = Disk::open(dir.path(), 8).expect("open");
        let (flusher, stop_tx, task) = running(Arc::new(disk));
        let ticket = flusher.wrote();
        flusher
            .durable(ticket)
            .await
            .expect("flushed while running");
        stop_tx.send(true).expect("stop");
        task.await.expect("the flusher ends once stopped");
        let ticket = flusher.wrote();
        assert!(flusher.durable(ticket).await.is_err(), "stopped: an error");
    }
}
