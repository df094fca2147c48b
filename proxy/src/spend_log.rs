//! The lease spend log: what each admitted request spent from a lease, appended before
//! its response goes out, as one fixed-size record in an append-only segment file (no
//! sled write, read and delete per request). Reports read the totals per (lease,
//! sequence) from memory; once the control plane has taken a report, an acknowledgement
//! record is appended and the segments whose every spend is acknowledged are deleted,
//! oldest first. Nothing is deleted that the control plane has not acknowledged.
//!
//! # Records
//!
//! 48 bytes, little-endian: CRC-32 of the other 44 bytes, a kind (1 spend, 2
//! acknowledgement), three zero bytes, the lease's ULID (16 bytes), the report sequence,
//! the units and the cost (8 bytes each; an acknowledgement carries zeros). A record is
//! whole or it is not there: reading a segment stops at the first record that is short
//! or fails its checksum (a write torn by a crash: the request it belonged to was never
//! answered). A run never appends to a segment an earlier run wrote: it starts a new one,
//! so a torn tail is never followed by good records.
//!
//! # Durability
//!
//! Every spend is in the segment file (a `write`) before its request is answered, so a
//! killed process loses nothing it answered. Requests answered in one pass of the
//! scheduler share that `write`: each queues its record ([`SpendLog::queue`]), lets the
//! others of the pass run, and the first to come back writes every record queued
//! ([`Queued::write`]; a record whose request was dropped meanwhile is written as the
//! guard drops). [`SpendLog::sync`] makes what was written durable against power loss (one
//! `fdatasync` shared by every request waiting on it: group commit, driven by the
//! proxy's [`crate::disk::Flusher`]). A segment is synced before the log moves to the
//! next one.
//!
//! # Bounds
//!
//! The log holds at most `max_bytes` (`usage.spend_log_max_kb`): an append past it fails
//! with a clear error instead of filling the disk, as does an append the disk refuses.
//! A failed append leaves the segment as it was (a partial record is cut off); should
//! the cut itself fail, the whole records before it stay, and count as written.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ledger::{Credits, LeaseId};

use crate::disk::DiskError;
use crate::segments;

/// Segment files are `spend-{number}.log`.
const PREFIX: &str = "spend";

/// Bytes per record.
pub const RECORD_BYTES: usize = 48;
const RECORD_LEN: u64 = 48;
/// A segment is closed (synced) and a new one started past this size.
const SEGMENT_BYTES: u64 = 4 << 20;

const SPEND: u8 = 1;
const ACK: u8 = 2;

/// One request's spend from a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    pub units: u64,
    pub cost: Credits,
}

/// What a report of (lease, sequence) carries: the sums of its spends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub units: u64,
    pub cost: Credits,
    pub requests: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    Spend {
        lease: u128,
        sequence: u64,
        spent: Spent,
    },
    Ack {
        lease: u128,
        sequence: u64,
    },
}

impl Record {
    fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut bytes = [0u8; RECORD_BYTES];
        let (kind, lease, sequence, units, cost) = match *self {
            Record::Spend {
                lease,
                sequence,
                spent,
            } => (SPEND, lease, sequence, spent.units, spent.cost.get()),
            Record::Ack { lease, sequence } => (ACK, lease, sequence, 0, 0),
        };
        bytes[4] = kind;
        bytes[8..24].copy_from_slice(&lease.to_le_bytes());
        bytes[24..32].copy_from_slice(&sequence.to_le_bytes());
        bytes[32..40].copy_from_slice(&units.to_le_bytes());
        bytes[40..48].copy_from_slice(&cost.to_le_bytes());
        let crc = crc32fast::hash(&bytes[4..]);
        bytes[..4].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// `None`: not a whole, valid record.
    fn decode(bytes: &[u8]) -> Option<Record> {
        let bytes: &[u8; RECORD_BYTES] = bytes.try_into().ok()?;
        let crc = u32::from_le_bytes(bytes[..4].try_into().ok()?);
        if crc != crc32fast::hash(&bytes[4..]) || bytes[5..8] != [0, 0, 0] {
            return None;
        }
        let lease = u128::from_le_bytes(bytes[8..24].try_into().ok()?);
        let sequence = u64::from_le_bytes(bytes[24..32].try_into().ok()?);
        let units = u64::from_le_bytes(bytes[32..40].try_into().ok()?);
        let cost = i64::from_le_bytes(bytes[40..48].try_into().ok()?);
        match bytes[4] {
            SPEND => Some(Record::Spend {
                lease,
                sequence,
                spent: Spent {
                    units,
                    cost: Credits::new(cost),
                },
            }),
            ACK => Some(Record::Ack { lease, sequence }),
            _ => None,
        }
    }
}

/// The unacknowledged spend of one (lease, sequence), and how many of its records each
/// segment holds.
#[derive(Debug, Default)]
struct Open {
    totals: Totals,
    segments: Vec<(u64, u64)>,
}

#[derive(Debug, Default)]
struct Segment {
    bytes: u64,
    /// Spend records not acknowledged yet.
    live: u64,
}

/// Spends queued for the next write (see [`SpendLog::queue`]).
#[derive(Debug, Default)]
struct Queue {
    /// Their records, encoded.
    bytes: Vec<u8>,
    spends: Vec<(u128, u64, Spent)>,
    /// The outcome every record in the queue shares.
    batch: Arc<Batch>,
}

/// One write's worth of queued spends: whether they went in, once it was tried.
#[derive(Debug, Default)]
struct Batch {
    outcome: OnceLock<Written>,
}

/// How a batch's write went: the first `whole` spends are in the file (all of them
/// unless `error`).
#[derive(Debug)]
struct Written {
    whole: usize,
    error: Option<String>,
}

impl Batch {
    /// The outcome for the batch's spend number `index`, once written.
    fn outcome(&self, index: usize) -> Option<Result<(), DiskError>> {
        self.outcome.get().map(|written| match &written.error {
            Some(error) if index >= written.whole => Err(DiskError::new(error.clone())),
            _ => Ok(()),
        })
    }
}

/// A spend queued for the log: [`Queued::write`] writes it (with whatever else is
/// queued); dropped unwritten, it is written then, so a request dropped between the two
/// is still charged for what it was answered, or not answered, with.
#[derive(Debug)]
#[must_use = "a queued spend is written by `write` or as it drops"]
pub struct Queued<'a> {
    log: &'a SpendLog,
    batch: Option<Arc<Batch>>,
    /// Its place in the batch.
    index: usize,
}

impl Queued<'_> {
    /// Writes the queued spends, this one among them, unless another request already
    /// did (in the kernel when this returns: a killed process loses nothing).
    ///
    /// # Errors
    /// The disk refused the write: this spend is not in the log (nor is any of the
    /// batch, unless the disk cut the write short and it could not be cut back: then
    /// the spends before the cut are, and count).
    pub fn write(mut self) -> Result<(), DiskError> {
        match self.batch.take() {
            Some(batch) => self.log.write_batch(&batch, self.index),
            None => Ok(()),
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if let Some(batch) = self.batch.take()
            && let Err(error) = self.log.write_batch(&batch, self.index)
        {
            tracing::error!(%error, "a queued lease spend of a dropped request could not be written");
        }
    }
}

#[derive(Debug)]
struct Inner {
    /// The segment appends go to.
    file: File,
    current: u64,
    segments: BTreeMap<u64, Segment>,
    open: HashMap<(u128, u64), Open>,
    total_bytes: u64,
    /// A failed append could not be cut back: the next append starts a new segment.
    broken: bool,
    /// Closed segments and new names the next sync makes durable.
    unsynced: segments::Unsynced,
    /// Spends queued for the next write.
    queue: Queue,
}

impl segments::Synced for Inner {
    fn unsynced(&mut self) -> &mut segments::Unsynced {
        &mut self.unsynced
    }

    fn current(&self) -> (u64, &File) {
        (self.current, &self.file)
    }
}

/// The spend log of one proxy (`data_dir/spend`).
#[derive(Debug)]
pub struct SpendLog {
    dir: PathBuf,
    max_bytes: u64,
    /// A segment is closed past this size (4 MiB, or a quarter of `max_bytes` when
    /// that is less, so settled segments can free space before the log is full).
    segment_bytes: u64,
    inner: Mutex<Inner>,
    /// Held through a sync: one at a time (see `segments::sync`).
    syncing: Mutex<()>,
    /// `qs_proxy_spend_log_writes_total`: writes of queued spends (each carries every
    /// spend queued since the last).
    writes: metrics::Counter,
}

fn lease_bits(lease: &str) -> Result<u128, DiskError> {
    LeaseId::parse(lease)
        .map(|id| id.0.0)
        .ok_or_else(|| DiskError::new(format!("`{lease}` is not a lease id")))
}

fn lease_text(bits: u128) -> String {
    LeaseId(ledger::Ulid(bits)).to_string()
}

impl SpendLog {
    /// Opens the log in `dir` (created if missing): reads every segment, keeps what is
    /// not acknowledged, deletes segments with nothing left, and starts a new segment.
    ///
    /// # Errors
    /// The directory or a segment cannot be read or created.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<SpendLog, DiskError> {
        let numbers = segments::list(dir, PREFIX)?;
        let mut segments = BTreeMap::new();
        let mut open: HashMap<(u128, u64), Open> = HashMap::new();
        let mut total_bytes = 0u64;
        for &number in &numbers {
            let bytes = segments::read(dir, PREFIX, number)?;
            let mut segment = Segment {
                bytes: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
                live: 0,
            };
            let mut whole = 0usize;
            for chunk in bytes.chunks(RECORD_BYTES) {
                let Some(record) = Record::decode(chunk) else {
                    break;
                };
                whole = whole.saturating_add(1);
                match record {
                    Record::Spend {
                        lease,
                        sequence,
                        spent,
                    } => {
                        add(open.entry((lease, sequence)).or_default(), number, spent);
                        segment.live = segment.live.saturating_add(1);
                    }
                    Record::Ack { lease, sequence } => {
                        if let Some(done) = open.remove(&(lease, sequence)) {
                            settle(&mut segments, &mut segment, number, &done);
                        }
                    }
                }
            }
            let read = whole.saturating_mul(RECORD_BYTES);
            if read < bytes.len() {
                let cut = bytes.len().saturating_sub(read);
                let path = segments::path(dir, PREFIX, number);
                tracing::warn!(segment = %path.display(), bytes = cut, "the spend log ends in a torn record (a crash mid-write); it is ignored");
                metrics::counter!("qs_proxy_spend_log_torn_total").increment(1);
            }
            total_bytes = total_bytes.saturating_add(segment.bytes);
            segments.insert(number, segment);
        }
        let current = numbers.last().map_or(1, |last| last.saturating_add(1));
        let file = segments::create(dir, PREFIX, current)?;
        let mut unsynced = segments::Unsynced::default();
        unsynced.created();
        segments.insert(current, Segment::default());
        let quarter = (max_bytes / 4 / RECORD_LEN)
            .max(1)
            .saturating_mul(RECORD_LEN);
        let log = SpendLog {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes: SEGMENT_BYTES.min(quarter),
            inner: Mutex::new(Inner {
                file,
                current,
                segments,
                open,
                total_bytes,
                broken: false,
                unsynced,
                queue: Queue::default(),
            }),
            syncing: Mutex::new(()),
            writes: metrics::counter!("qs_proxy_spend_log_writes_total"),
        };
        log.with(|inner| log.drop_settled(inner));
        Ok(log)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut guard = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    /// Appends one request's spend under `lease`'s report `sequence` (in the kernel
    /// when this returns: a killed process loses nothing; durable after the next
    /// [`SpendLog::sync`]).
    ///
    /// # Errors
    /// The log is full (`max_bytes`), or the disk refused the write.
    pub fn append(&self, lease: &str, sequence: u64, spent: Spent) -> Result<(), DiskError> {
        self.queue(LeaseId(ledger::Ulid(lease_bits(lease)?)), sequence, spent)?
            .write()
    }

    /// Queues one request's spend for the next write (the request path): the caller
    /// lets the other requests of the scheduler's pass run, then [`Queued::write`]s, so
    /// one `write` carries every spend they queued meanwhile.
    ///
    /// # Errors
    /// The log is full (`max_bytes`, counting what is queued).
    pub fn queue(
        &self,
        lease: LeaseId,
        sequence: u64,
        spent: Spent,
    ) -> Result<Queued<'_>, DiskError> {
        let lease = lease.0.0;
        let record = Record::Spend {
            lease,
            sequence,
            spent,
        };
        let batch = self.with(|inner| {
            let queued = u64::try_from(inner.queue.bytes.len()).unwrap_or(u64::MAX);
            let after = inner
                .total_bytes
                .saturating_add(queued)
                .saturating_add(RECORD_LEN);
            if after > self.max_bytes {
                metrics::counter!("qs_proxy_spend_log_full_total").increment(1);
                return Err(DiskError::new(format!(
                    "the spend log is full ({} bytes of {} allowed by usage.spend_log_max_kb): the control plane has not acknowledged older spend",
                    inner.total_bytes.saturating_add(queued),
                    self.max_bytes
                )));
            }
            inner.queue.bytes.extend_from_slice(&record.encode());
            let index = inner.queue.spends.len();
            inner.queue.spends.push((lease, sequence, spent));
            Ok((Arc::clone(&inner.queue.batch), index))
        })?;
        let (batch, index) = batch;
        Ok(Queued {
            log: self,
            batch: Some(batch),
            index,
        })
    }

    /// Writes the queue `batch` belongs to, unless it was written already.
    fn write_batch(&self, batch: &Arc<Batch>, index: usize) -> Result<(), DiskError> {
        if let Some(outcome) = batch.outcome(index) {
            return outcome;
        }
        self.with(|inner| {
            // Not written yet, so it is the batch queued now (batches are written in
            // order, each taking the whole queue).
            if batch.outcome.get().is_none() {
                self.write_queue(inner);
            }
        });
        batch.outcome(index).unwrap_or_else(|| {
            Err(DiskError::new(
                "a queued lease spend was not written".into(),
            ))
        })
    }

    /// Writes every queued spend in one `write` and settles its batch.
    fn write_queue(&self, inner: &mut Inner) {
        let batch = std::mem::take(&mut inner.queue.batch);
        let bytes = std::mem::take(&mut inner.queue.bytes);
        let spends = std::mem::take(&mut inner.queue.spends);
        // Bounded when queued (an acknowledgement since may have taken the room, but it
        // also settled spend: the log never grows past its bound by more than a queue).
        let written = match self.write(inner, &bytes) {
            Ok(()) => {
                if !bytes.is_empty() {
                    self.writes.increment(1);
                }
                Written {
                    whole: spends.len(),
                    error: None,
                }
            }
            Err((error, whole)) => Written {
                whole,
                error: Some(error.to_string()),
            },
        };
        // Counted in the segment the write went to (a failed write leaves `current` on it).
        let counted = spends.get(..written.whole).unwrap_or_default();
        for &(lease, sequence, spent) in counted {
            add(
                inner.open.entry((lease, sequence)).or_default(),
                inner.current,
                spent,
            );
        }
        if let Some(segment) = inner.segments.get_mut(&inner.current) {
            let count = u64::try_from(counted.len()).unwrap_or(u64::MAX);
            segment.live = segment.live.saturating_add(count);
        }
        let _ = batch.outcome.set(written);
        // The buffers keep their room for the next queue.
        let (mut bytes, mut spends) = (bytes, spends);
        bytes.clear();
        spends.clear();
        inner.queue.bytes = bytes;
        inner.queue.spends = spends;
    }

    /// Appends `bytes` (whole records) to the current segment, starting a new segment
    /// first when this one is full or broken.
    ///
    /// # Errors
    /// The disk refused the write, and how many whole records of `bytes` are in the file
    /// all the same: none, unless the disk cut the write short and then refused to cut
    /// the segment back (`broken`), when those a restart would read count as written.
    fn write(&self, inner: &mut Inner, bytes: &[u8]) -> Result<(), (DiskError, usize)> {
        if bytes.is_empty() {
            return Ok(());
        }
        let full_segment = inner
            .segments
            .get(&inner.current)
            .is_some_and(|segment| segment.bytes >= self.segment_bytes);
        if full_segment || inner.broken {
            self.rotate(inner, true).map_err(|error| (error, 0))?;
        }
        let length = inner
            .segments
            .get(&inner.current)
            .map_or(0, |segment| segment.bytes);
        if let Err(error) = segments::append(
            &self.dir,
            PREFIX,
            inner.current,
            &mut inner.file,
            length,
            bytes,
            &mut inner.broken,
        ) {
            metrics::counter!("qs_proxy_spend_log_write_errors_total").increment(1);
            // Cut short and not cut back: what is in the file stays there (a restart reads
            // its whole records, up to the torn one). When even its length is unknown,
            // nothing counts as written: a record counted but missing would be spend
            // answered and lost, one not counted but read later only charges a request
            // that was refused while in flight.
            let landed = if inner.broken {
                inner
                    .file
                    .metadata()
                    .map_or(0, |metadata| metadata.len().saturating_sub(length))
            } else {
                0
            };
            if let Some(segment) = inner.segments.get_mut(&inner.current) {
                segment.bytes = segment.bytes.saturating_add(landed);
            }
            inner.total_bytes = inner.total_bytes.saturating_add(landed);
            let whole = usize::try_from(landed / RECORD_LEN).unwrap_or(0);
            return Err((error, whole));
        }
        let written = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if let Some(segment) = inner.segments.get_mut(&inner.current) {
            segment.bytes = segment.bytes.saturating_add(written);
        }
        inner.total_bytes = inner.total_bytes.saturating_add(written);
        Ok(())
    }

    /// Closes the current segment and starts the next; settled segments go. `keep`: what
    /// is in the closed one must survive, so the next [`SpendLog::sync`] syncs it (not
    /// this, on a request's path).
    fn rotate(&self, inner: &mut Inner, keep: bool) -> Result<(), DiskError> {
        let next = inner.current.saturating_add(1);
        let file = segments::create(&self.dir, PREFIX, next)?;
        let closed = std::mem::replace(&mut inner.file, file);
        if keep {
            inner.unsynced.closed(inner.current, closed);
        }
        inner.unsynced.created();
        inner.current = next;
        inner.broken = false;
        inner.segments.insert(next, Segment::default());
        self.drop_settled(inner);
        Ok(())
    }

    /// Makes every append so far durable: segments closed since the last sync, new
    /// names in the directory, then the current segment (`fdatasync`).
    ///
    /// # Errors
    /// The disk refused a sync.
    pub fn sync(&self) -> Result<(), DiskError> {
        segments::sync(&self.dir, PREFIX, &self.syncing, &self.inner)
    }

    /// The totals of `lease`'s report `sequence` not yet acknowledged.
    ///
    /// # Errors
    /// `lease` is not a lease id.
    pub fn totals(&self, lease: &str, sequence: u64) -> Result<Totals, DiskError> {
        let lease = lease_bits(lease)?;
        Ok(self.with(|inner| {
            inner
                .open
                .get(&(lease, sequence))
                .map_or(Totals::default(), |open| open.totals)
        }))
    }

    /// The control plane took `lease`'s report `sequence`: its spend leaves the log
    /// (segments with nothing left are deleted, oldest first).
    ///
    /// # Errors
    /// The acknowledgement could not be appended (the spend is kept, and reported again
    /// after a restart: the control plane answers it as a replay).
    pub fn acknowledge(&self, lease: &str, sequence: u64) -> Result<(), DiskError> {
        let lease = lease_bits(lease)?;
        self.with(|inner| {
            if !inner.open.contains_key(&(lease, sequence)) {
                return Ok(());
            }
            self.write(inner, &Record::Ack { lease, sequence }.encode())
                .map_err(|(error, _)| error)?;
            if let Some(done) = inner.open.remove(&(lease, sequence)) {
                for (number, count) in &done.segments {
                    if let Some(segment) = inner.segments.get_mut(number) {
                        segment.live = segment.live.saturating_sub(*count);
                    }
                }
            }
            // Everything acknowledged: a fresh segment, so the old ones can go (nothing
            // in them needs to survive, so no sync).
            if inner.open.is_empty() {
                self.rotate(inner, false)
            } else {
                self.drop_settled(inner);
                Ok(())
            }
        })
    }

    /// Deletes the oldest segments while nothing in them is unacknowledged (never the
    /// current one). Oldest first: an acknowledgement is always in the segment of its
    /// spend or a later one, so a kept segment's spend keeps its acknowledgement.
    fn drop_settled(&self, inner: &mut Inner) {
        while let Some((&number, segment)) = inner.segments.first_key_value() {
            if number == inner.current || segment.live > 0 {
                break;
            }
            let bytes = segment.bytes;
            if let Err(error) = segments::remove(&self.dir, PREFIX, number) {
                tracing::warn!(%error, "cannot delete a settled spend log segment");
                break;
            }
            inner.unsynced.forget(number);
            inner.segments.remove(&number);
            inner.total_bytes = inner.total_bytes.saturating_sub(bytes);
        }
    }

    /// Every lease with unacknowledged spend, and its sequences, ascending.
    pub fn index(&self) -> Vec<(String, Vec<u64>)> {
        let mut by_lease: BTreeMap<u128, Vec<u64>> = BTreeMap::new();
        self.with(|inner| {
            for (lease, sequence) in inner.open.keys() {
                by_lease.entry(*lease).or_default().push(*sequence);
            }
        });
        by_lease
            .into_iter()
            .map(|(lease, mut sequences)| {
                sequences.sort_unstable();
                (lease_text(lease), sequences)
            })
            .collect()
    }

    /// The report sequences of `lease` with unacknowledged spend, ascending.
    ///
    /// # Errors
    /// `lease` is not a lease id.
    pub fn sequences_of(&self, lease: &str) -> Result<Vec<u64>, DiskError> {
        let bits = lease_bits(lease)?;
        let mut sequences: Vec<u64> = self.with(|inner| {
            inner
                .open
                .keys()
                .filter(|(held, _)| *held == bits)
                .map(|(_, sequence)| *sequence)
                .collect()
        });
        sequences.sort_unstable();
        Ok(sequences)
    }

    /// Spend records not yet acknowledged (those queued for the next write included).
    pub fn len(&self) -> u64 {
        self.with(|inner| {
            let queued = u64::try_from(inner.queue.spends.len()).unwrap_or(u64::MAX);
            inner.open.values().fold(queued, |total, open| {
                total.saturating_add(open.totals.requests)
            })
        })
    }

    /// Whether one more spend fits under `max_bytes`.
    pub fn has_room(&self) -> bool {
        self.with(|inner| {
            let queued = u64::try_from(inner.queue.bytes.len()).unwrap_or(u64::MAX);
            inner
                .total_bytes
                .saturating_add(queued)
                .saturating_add(RECORD_LEN)
                <= self.max_bytes
        })
    }

    pub fn is_empty(&self) -> bool {
        self.with(|inner| inner.open.is_empty() && inner.queue.spends.is_empty())
    }

    /// Bytes the log's segments take on disk.
    pub fn bytes(&self) -> u64 {
        self.with(|inner| inner.total_bytes)
    }
}

fn add(open: &mut Open, segment: u64, spent: Spent) {
    open.totals.units = open.totals.units.saturating_add(spent.units);
    open.totals.cost = open
        .totals
        .cost
        .checked_add(spent.cost)
        .unwrap_or(Credits::MAX);
    open.totals.requests = open.totals.requests.saturating_add(1);
    match open.segments.last_mut() {
        Some((number, count)) if *number == segment => *count = count.saturating_add(1),
        _ => open.segments.push((segment, 1)),
    }
}

/// While reading segment `number` (not yet in `segments`): `done`'s records leave the
/// live counts of the segments that hold them.
fn settle(segments: &mut BTreeMap<u64, Segment>, reading: &mut Segment, number: u64, done: &Open) {
    for (held_in, count) in &done.segments {
        if *held_in == number {
            reading.live = reading.live.saturating_sub(*count);
        } else if let Some(segment) = segments.get_mut(held_in) {
            segment.live = segment.live.saturating_sub(*count);
        }
    }
}

#[cfg(test)]
mod tests;
