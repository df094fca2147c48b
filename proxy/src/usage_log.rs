//! The usage log: what each admitted request records through the outbox (its usage, or
//! a reservation's commit or release), appended before its response goes out, as one
//! framed record in an append-only segment file instead of a sled insert per request.
//! The outbox hands what the log holds on to sled every shipping interval (merged per
//! end user, feature and window where usage is aggregated), together with the log
//! position it reached (one sled transaction per chunk, then a flush), and only then
//! are the segments that position covers deleted: a record is in the log, in sled, or
//! in both (then the position in sled says which copy counts), never in neither.
//!
//! # Records
//!
//! A frame: its payload's length (u32, little-endian), the CRC-32 of the length's four
//! bytes and the payload, then the payload: the record's 16-byte outbox key and its
//! JSON (the outbox record as sled stores it). A record is whole or it is not there:
//! reading a segment stops at the first frame that is short, longer than a record can
//! be, or fails its checksum (a write torn by a crash: the request it belonged to was
//! never answered). A run never appends to a segment an earlier run wrote, so a torn
//! tail is never followed by good records.
//!
//! # Durability
//!
//! Every append is a `write` to the segment file, so a killed process loses nothing it
//! answered; [`UsageLog::sync`] makes what was written durable against power loss (one
//! `fdatasync` shared by every request waiting on it, through the outbox's
//! [`crate::disk::Flusher`]). A segment is synced before the log moves to the next
//! (unless everything in it was handed on already). That sync, every 4 MiB, is taken
//! by the append that crosses the size, under the log's lock.
//!
//! # Bounds
//!
//! The log holds at most `max_bytes` (`usage.usage_log_max_kb`): an append past it fails
//! with a clear error instead of filling the disk, as does an append the disk refuses.
//! A failed append leaves the segment as it was (a partial record is cut off). The log
//! only holds what has not been handed on yet (one interval's worth, or what arrived
//! while sled refused writes) plus the segment being written.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::disk::DiskError;
use crate::segments;

/// Segment files are `usage-{number}.log`.
const PREFIX: &str = "usage";
/// Bytes before a frame's payload: its length and checksum.
pub const FRAME_HEAD: usize = 8;
/// Bytes of a record's outbox key.
pub const KEY_BYTES: usize = 16;
/// The longest payload a frame may carry (a record is a few hundred bytes: end user
/// and feature ids are bounded far below this); a longer length is a torn frame.
const PAYLOAD_MAX: usize = 64 << 10;
/// A segment is closed (synced) and a new one started past this size.
const SEGMENT_BYTES: u64 = 4 << 20;
/// What [`UsageLog::has_room`] keeps free for one more record (the proxy's records are
/// a few hundred bytes: ids and keys are bounded well below this).
const ROOM: u64 = 4 << 10;

/// A place in the log: bytes into a segment. The end of a record is where everything up
/// to and including it has been handed on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

impl Position {
    /// 16 bytes, big-endian (they sort as positions do).
    pub fn to_bytes(self) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.segment.to_be_bytes());
        bytes[8..].copy_from_slice(&self.offset.to_be_bytes());
        bytes
    }

    /// `None`: not 16 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Position> {
        let bytes: &[u8; 16] = bytes.try_into().ok()?;
        Some(Position {
            segment: u64::from_be_bytes(bytes[..8].try_into().ok()?),
            offset: u64::from_be_bytes(bytes[8..].try_into().ok()?),
        })
    }
}

/// A record in the log not handed on yet: its outbox key, its JSON, and where it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub key: [u8; KEY_BYTES],
    pub json: Vec<u8>,
    pub end: Position,
}

fn frame_len(json: &[u8]) -> usize {
    FRAME_HEAD
        .saturating_add(KEY_BYTES)
        .saturating_add(json.len())
}

fn checksum(length: [u8; 4], payload: &[&[u8]]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&length);
    for part in payload {
        hasher.update(part);
    }
    hasher.finalize()
}

/// Encodes one frame into `out` (cleared first). `None`: the record is too long.
fn encode(key: &[u8; KEY_BYTES], json: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let payload = KEY_BYTES.checked_add(json.len())?;
    if payload > PAYLOAD_MAX {
        return None;
    }
    let length = u32::try_from(payload).ok()?.to_le_bytes();
    out.clear();
    out.reserve(frame_len(json));
    out.extend_from_slice(&length);
    out.extend_from_slice(&checksum(length, &[key, json]).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(json);
    Some(())
}

/// A frame read back: the record's key and JSON, and the frame's length.
struct Frame<'a> {
    key: [u8; KEY_BYTES],
    json: &'a [u8],
    length: usize,
}

/// The whole frame at the start of `bytes`. `None`: short, too long or failing its
/// checksum.
fn decode(bytes: &[u8]) -> Option<Frame<'_>> {
    let length: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    let crc = u32::from_le_bytes(bytes.get(4..FRAME_HEAD)?.try_into().ok()?);
    let payload_len = usize::try_from(u32::from_le_bytes(length)).ok()?;
    if !(KEY_BYTES..=PAYLOAD_MAX).contains(&payload_len) {
        return None;
    }
    let end = FRAME_HEAD.checked_add(payload_len)?;
    let payload = bytes.get(FRAME_HEAD..end)?;
    if checksum(length, &[payload]) != crc {
        return None;
    }
    let (key, json) = payload.split_at(KEY_BYTES);
    Some(Frame {
        key: key.try_into().ok()?,
        json,
        length: end,
    })
}

#[derive(Debug)]
struct Inner {
    /// The segment appends go to.
    file: File,
    current: u64,
    /// Every segment on disk and its size.
    segments: BTreeMap<u64, u64>,
    total_bytes: u64,
    /// Records not handed on yet, oldest first.
    waiting: VecDeque<Logged>,
    /// A failed append could not be cut back: the next append starts a new segment.
    broken: bool,
    /// The frame being written (kept to reuse its allocation).
    scratch: Vec<u8>,
    /// Closed segments and new names the next sync makes durable.
    unsynced: segments::Unsynced,
}

impl segments::Synced for Inner {
    fn unsynced(&mut self) -> &mut segments::Unsynced {
        &mut self.unsynced
    }

    fn current(&self) -> (u64, &File) {
        (self.current, &self.file)
    }
}

/// The usage log of one proxy (`data_dir/usage`).
#[derive(Debug)]
pub struct UsageLog {
    dir: PathBuf,
    max_bytes: u64,
    /// A segment is closed past this size (4 MiB, or a quarter of `max_bytes` when
    /// that is less, so handed-on segments can free space before the log is full).
    segment_bytes: u64,
    inner: Mutex<Inner>,
    /// Held through a sync: one at a time (see `segments::sync`).
    syncing: Mutex<()>,
}

impl UsageLog {
    /// Opens the log in `dir` (created if missing): reads the records after
    /// `handed_on` (the position sled holds: everything up to it is there) as waiting,
    /// deletes the segments with none, and starts a new segment.
    ///
    /// # Errors
    /// The directory or a segment cannot be read, created or deleted.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        handed_on: Option<Position>,
    ) -> Result<UsageLog, DiskError> {
        let handed_on = handed_on.unwrap_or_default();
        let numbers = segments::list(dir, PREFIX)?;
        let mut sizes = BTreeMap::new();
        let mut waiting = VecDeque::new();
        let mut total_bytes = 0u64;
        for &number in &numbers {
            if number < handed_on.segment {
                segments::remove(dir, PREFIX, number)?;
                continue;
            }
            let bytes = segments::read(dir, PREFIX, number)?;
            let before = waiting.len();
            let mut at = 0usize;
            while let Some(Frame { key, json, length }) = bytes.get(at..).and_then(decode) {
                at = at.saturating_add(length);
                let end = Position {
                    segment: number,
                    offset: u64::try_from(at).unwrap_or(u64::MAX),
                };
                if end > handed_on {
                    waiting.push_back(Logged {
                        key,
                        json: json.to_vec(),
                        end,
                    });
                }
            }
            if at < bytes.len() {
                let path = segments::path(dir, PREFIX, number);
                let cut = bytes.len().saturating_sub(at);
                tracing::warn!(segment = %path.display(), bytes = cut, "the usage log ends in a torn record (a crash mid-write); it is ignored");
                metrics::counter!("qs_proxy_usage_log_torn_total").increment(1);
            }
            if waiting.len() == before {
                // Nothing in it waits (handed on, empty, or only a torn tail).
                segments::remove(dir, PREFIX, number)?;
                continue;
            }
            let size = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
            total_bytes = total_bytes.saturating_add(size);
            sizes.insert(number, size);
        }
        // Past every segment and past the handed-on position: a segment numbered at
        // or before it would read as handed on already.
        let current = numbers
            .last()
            .copied()
            .unwrap_or(0)
            .max(handed_on.segment)
            .saturating_add(1);
        let file = segments::create(dir, PREFIX, current)?;
        let mut unsynced = segments::Unsynced::default();
        unsynced.created();
        sizes.insert(current, 0);
        Ok(UsageLog {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes: SEGMENT_BYTES.min((max_bytes / 4).max(ROOM)),
            inner: Mutex::new(Inner {
                file,
                current,
                segments: sizes,
                total_bytes,
                waiting,
                broken: false,
                scratch: Vec::new(),
                unsynced,
            }),
            syncing: Mutex::new(()),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut guard = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    /// Appends one record (in the kernel when this returns: a killed process loses
    /// nothing; durable after the next [`UsageLog::sync`]).
    ///
    /// # Errors
    /// The log is full (`max_bytes`), the record is longer than a record can be, or the
    /// disk refused the write.
    pub fn append(&self, key: [u8; KEY_BYTES], json: &[u8]) -> Result<(), DiskError> {
        let length = u64::try_from(frame_len(json)).unwrap_or(u64::MAX);
        self.with(|inner| {
            if inner.total_bytes.saturating_add(length) > self.max_bytes {
                metrics::counter!("qs_proxy_usage_log_full_total").increment(1);
                return Err(DiskError::new(format!(
                    "the usage log is full ({} bytes of {} allowed by usage.usage_log_max_kb): the local store has not taken what it holds",
                    inner.total_bytes, self.max_bytes
                )));
            }
            let full_segment = inner
                .segments
                .get(&inner.current)
                .is_some_and(|&bytes| bytes >= self.segment_bytes);
            if full_segment || inner.broken {
                self.rotate(inner)?;
            }
            let mut frame = std::mem::take(&mut inner.scratch);
            if encode(&key, json, &mut frame).is_none() {
                inner.scratch = frame;
                return Err(DiskError::new(format!(
                    "a usage record of {} bytes is longer than the usage log takes ({PAYLOAD_MAX})",
                    json.len()
                )));
            }
            let before = inner.segments.get(&inner.current).copied().unwrap_or(0);
            let written = segments::append(
                &self.dir,
                PREFIX,
                inner.current,
                &mut inner.file,
                before,
                &frame,
                &mut inner.broken,
            );
            inner.scratch = frame;
            if let Err(error) = written {
                metrics::counter!("qs_proxy_usage_log_write_errors_total").increment(1);
                return Err(error);
            }
            let after = before.saturating_add(length);
            inner.segments.insert(inner.current, after);
            inner.total_bytes = inner.total_bytes.saturating_add(length);
            let end = Position {
                segment: inner.current,
                offset: after,
            };
            inner.waiting.push_back(Logged {
                key,
                json: json.to_vec(),
                end,
            });
            Ok(())
        })
    }

    /// Closes the current segment and starts the next. What is in the closed one must
    /// survive: the next [`UsageLog::sync`] syncs it (not this, on a request's path).
    fn rotate(&self, inner: &mut Inner) -> Result<(), DiskError> {
        let next = inner.current.saturating_add(1);
        let file = segments::create(&self.dir, PREFIX, next)?;
        let closed = std::mem::replace(&mut inner.file, file);
        inner.unsynced.closed(inner.current, closed);
        inner.unsynced.created();
        inner.current = next;
        inner.broken = false;
        inner.segments.insert(next, 0);
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

    /// Takes up to `limit` of the oldest records not handed on yet (to be written to
    /// sled; [`UsageLog::give_back`] them if that fails).
    pub fn take(&self, limit: usize) -> Vec<Logged> {
        self.with(|inner| {
            let count = limit.min(inner.waiting.len());
            inner.waiting.drain(..count).collect()
        })
    }

    /// Puts taken records back, before any taken later (sled refused them).
    pub fn give_back(&self, records: Vec<Logged>) {
        self.with(|inner| {
            for record in records.into_iter().rev() {
                inner.waiting.push_front(record);
            }
        });
    }

    /// Everything up to `position` is in sled, durably: the segments it covers whole
    /// are deleted (never the one appends go to).
    pub fn handed_on(&self, position: Position) {
        self.with(|inner| {
            while let Some((&number, &bytes)) = inner.segments.first_key_value() {
                let handed_on_whole = number < position.segment
                    || (number == position.segment && position.offset >= bytes);
                if !handed_on_whole || number == inner.current {
                    break;
                }
                if let Err(error) = segments::remove(&self.dir, PREFIX, number) {
                    tracing::warn!(%error, "cannot delete a handed-on usage log segment");
                    break;
                }
                inner.unsynced.forget(number);
                inner.segments.remove(&number);
                inner.total_bytes = inner.total_bytes.saturating_sub(bytes);
            }
            // The segment appends go to holds only what was handed on: start the next
            // one once it is worth freeing, so the old one can go next time.
            let current_bytes = inner.segments.get(&inner.current).copied().unwrap_or(0);
            let caught_up = position.segment == inner.current && position.offset >= current_bytes;
            if caught_up
                && current_bytes >= self.segment_bytes / 4
                && inner.waiting.is_empty()
                && let Err(error) = self.rotate_unsynced(inner)
            {
                tracing::warn!(%error, "cannot start a new usage log segment");
            }
        });
    }

    /// Starts the next segment without syncing the current one (everything in it is in
    /// sled), and deletes the current one.
    fn rotate_unsynced(&self, inner: &mut Inner) -> Result<(), DiskError> {
        let old = inner.current;
        let next = old.saturating_add(1);
        inner.file = segments::create(&self.dir, PREFIX, next)?;
        inner.unsynced.created();
        inner.current = next;
        inner.broken = false;
        inner.segments.insert(next, 0);
        if segments::remove(&self.dir, PREFIX, old).is_ok()
            && let Some(bytes) = inner.segments.remove(&old)
        {
            inner.total_bytes = inner.total_bytes.saturating_sub(bytes);
        }
        Ok(())
    }

    /// Records appended and not handed on yet.
    pub fn waiting(&self) -> usize {
        self.with(|inner| inner.waiting.len())
    }

    /// Whether one more record (of up to 4 KiB) fits under `max_bytes`.
    pub fn has_room(&self) -> bool {
        self.with(|inner| inner.total_bytes.saturating_add(ROOM) <= self.max_bytes)
    }

    /// Bytes the log's segments take on disk.
    pub fn bytes(&self) -> u64 {
        self.with(|inner| inner.total_bytes)
    }
}

#[cfg(test)]
mod tests;
