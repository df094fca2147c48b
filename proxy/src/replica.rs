//! The proxy's copy of its environment: every end user's live state, the catalog and the
//! clock offset, as of a feed cursor. sled holds the durable copy; the hot path reads the
//! in-memory [`index`] only.
//!
//! The durable copy groups end users in [`BUCKETS`] sled keys by a stable hash of their
//! id, each key holding its end users' encoded states: sled 0.34 keeps about a kilobyte
//! of memory per key of its own, which one key per end user made the largest part of the
//! proxy's memory at a million end users (docs/BENCHMARKS.md, P8). A change rewrites its
//! bucket (a few kilobytes at a million end users).

mod index;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use ledger::{Catalog, EndUserId, EndUserState, Timestamp};
use protocol::frames::Frame;
use protocol::{CatalogSnapshot, SyncRecord};

use crate::disk::{Disk, DiskError, ReplicaWrite};
use crate::pending::Pending;

/// Where a decision's state came from (`x-quota-source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// The stream is live (heard from within `max_staleness`).
    Fresh,
    /// Loaded but silent for longer than `max_staleness`.
    Stale,
    /// Nothing loaded yet (no snapshot, no stored copy).
    Loading,
}

/// The replicated catalog with the plan keys decisions report.
#[derive(Debug)]
pub struct CatalogView {
    pub catalog: Catalog,
    pub plan_keys: HashMap<ledger::PlanId, String>,
}

/// The in-memory index and its durable copy.
#[derive(Debug)]
pub struct Replica {
    users: index::Index,
    catalog: ArcSwapOption<CatalogView>,
    clock_offset_ms: AtomicI64,
    cursor: AtomicI64,
    /// Wall-clock milliseconds when the stream last said anything (0: never). Kept on
    /// disk with the heartbeats, so a restarted proxy knows how old its copy is.
    last_heard_ms: AtomicI64,
    /// The wall-clock time of the control plane's last message (`x-quota-as-of`).
    as_of_ms: AtomicI64,
    loaded: AtomicBool,
    disk: Disk,
    /// Changes applied in memory and not yet written to sled.
    dirty: std::sync::Mutex<Dirty>,
    /// The durable copy's generation: `begin_snapshot` bumps it as it clears the copy,
    /// and a persist writes each batch under this lock only while the generation it
    /// started with holds (a persist still writing the last snapshot's end users must
    /// not land them, or its completion mark, in the copy a new snapshot cleared).
    generation: std::sync::Mutex<u64>,
    /// Between `begin_snapshot` and the snapshot's end line: every end user is written,
    /// even one whose version memory holds already (the durable copy was cleared).
    snapshotting: AtomicBool,
    /// A record could not be applied: the follower takes a new snapshot.
    resnapshot: AtomicBool,
    /// The follower is reading the feed from NATS (else the HTTP stream).
    over_nats: AtomicBool,
    pub pending: Arc<Pending>,
}

/// Buckets written to sled per batch.
const PERSIST_BUCKETS: usize = 512;

/// What the durable copy lacks.
#[derive(Debug, Default)]
struct Dirty {
    /// End users whose state in the index is newer than the stored one.
    users: HashSet<EndUserId>,
    /// The stored copy was cleared for a snapshot: every end user is written (a set of
    /// a million ids would cost more memory than the index).
    all_users: bool,
    catalog: Option<Vec<u8>>,
    clock: Option<i64>,
    cursor: Option<i64>,
    heard: Option<i64>,
    complete: Option<bool>,
}

impl Dirty {
    fn advance(&mut self, cursor: i64) {
        self.cursor = Some(self.cursor.map_or(cursor, |held| held.max(cursor)));
    }

    fn is_empty(&self) -> bool {
        !self.all_users
            && self.users.is_empty()
            && self.catalog.is_none()
            && self.clock.is_none()
            && self.cursor.is_none()
            && self.heard.is_none()
            && self.complete.is_none()
    }

    /// The writes of everything but the end users (they go last, with the final chunk).
    fn meta(&self) -> Vec<ReplicaWrite> {
        let mut writes = Vec::new();
        if let Some(json) = &self.catalog {
            writes.push(ReplicaWrite::Catalog(json.clone()));
        }
        if let Some(offset) = self.clock {
            writes.push(ReplicaWrite::Clock(offset));
        }
        if let Some(cursor) = self.cursor {
            writes.push(ReplicaWrite::Cursor(cursor));
        }
        if let Some(heard) = self.heard {
            writes.push(ReplicaWrite::Heard(heard));
        }
        if let Some(complete) = self.complete {
            writes.push(ReplicaWrite::Complete(complete));
        }
        writes
    }

    /// Lays `newer` over `self`.
    fn merge(&mut self, newer: Dirty) {
        self.users.extend(newer.users);
        self.all_users |= newer.all_users;
        if newer.catalog.is_some() {
            self.catalog = newer.catalog;
        }
        self.clock = newer.clock.or(self.clock);
        if let Some(cursor) = newer.cursor {
            self.advance(cursor);
        }
        self.heard = newer.heard.or(self.heard);
        self.complete = newer.complete.or(self.complete);
    }
}

/// A record the replica cannot use (a bug or version skew; the follower re-snapshots).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("invalid record: {0}")]
    Invalid(String),
}

/// Sled keys the durable copy spreads end users over (a power of two up to 65,536).
pub const BUCKETS: u32 = 1 << 14;

/// The bucket of an end user: the low 14 bits of the CRC-32 of their id (stable across
/// runs and builds: the stored copy depends on it).
fn bucket_of(end_user_id: &str) -> u16 {
    let [low, high, ..] = crc32fast::hash(end_user_id.as_bytes()).to_le_bytes();
    u16::from_le_bytes([low, high & 0x3f])
}

/// A bucket's end users as the durable copy keeps them: postcard of their encoded states
/// ([`index::encode`]), in id order.
fn encode_bucket(states: &BTreeMap<String, Box<[u8]>>) -> Result<Vec<u8>, ApplyError> {
    let entries: Vec<&[u8]> = states.values().map(AsRef::as_ref).collect();
    postcard::to_allocvec(&entries).map_err(|error| ApplyError::Invalid(error.to_string()))
}

/// A stored bucket's encoded states, by end user.
fn decode_bucket(bytes: &[u8]) -> Result<BTreeMap<String, Box<[u8]>>, ApplyError> {
    let entries: Vec<Vec<u8>> = postcard::from_bytes(bytes)
        .map_err(|error| ApplyError::Invalid(format!("stored bucket: {error}")))?;
    entries
        .into_iter()
        .map(|entry| {
            let id = index::id_of(&entry)
                .ok_or_else(|| ApplyError::Invalid("stored state without an id".into()))?
                .to_owned();
            Ok((id, entry.into_boxed_slice()))
        })
        .collect()
}

fn catalog_view(snapshot: &CatalogSnapshot) -> Result<CatalogView, ApplyError> {
    let catalog = snapshot
        .to_ledger()
        .map_err(|error| ApplyError::Invalid(format!("catalog: {error}")))?;
    let plan_keys = snapshot
        .plans
        .iter()
        .filter_map(|item| Some((item.id.parse().ok()?, item.key.clone())))
        .collect();
    Ok(CatalogView { catalog, plan_keys })
}

impl Replica {
    /// Opens the replica over `disk`, loading whatever it holds: a restarted proxy serves
    /// from its stored copy at once.
    ///
    /// # Errors
    /// Unreadable storage.
    pub fn open(disk: Disk, pending: Arc<Pending>) -> Result<Replica, ApplyError> {
        let replica = Replica {
            users: index::Index::default(),
            catalog: ArcSwapOption::empty(),
            clock_offset_ms: AtomicI64::new(0),
            cursor: AtomicI64::new(-1),
            last_heard_ms: AtomicI64::new(0),
            as_of_ms: AtomicI64::new(0),
            loaded: AtomicBool::new(false),
            disk,
            dirty: std::sync::Mutex::new(Dirty::default()),
            generation: std::sync::Mutex::new(0),
            snapshotting: AtomicBool::new(false),
            resnapshot: AtomicBool::new(false),
            over_nats: AtomicBool::new(false),
            pending,
        };
        let stored = replica.disk.load_replica()?;
        if stored.outdated {
            tracing::warn!(
                "the stored replica is in another build's layout: dropping it for a new snapshot"
            );
            replica.disk.clear_replica()?;
        } else if stored.complete
            && let (Some(cursor), Some(catalog)) = (stored.cursor, stored.catalog.as_deref())
        {
            let snapshot: CatalogSnapshot = serde_json::from_slice(catalog)
                .map_err(|error| ApplyError::Invalid(format!("stored catalog: {error}")))?;
            replica
                .catalog
                .store(Some(Arc::new(catalog_view(&snapshot)?)));
            for bucket in &stored.buckets {
                for (id, bytes) in decode_bucket(bucket)? {
                    replica.users.load(bytes).map_err(|error| {
                        ApplyError::Invalid(format!("stored user {id}: {error}"))
                    })?;
                }
            }
            replica.cursor.store(cursor, Ordering::Release);
            replica
                .clock_offset_ms
                .store(stored.clock_offset_ms, Ordering::Release);
            replica
                .last_heard_ms
                .store(stored.heard_ms.unwrap_or(0), Ordering::Release);
            replica
                .as_of_ms
                .store(stored.heard_ms.unwrap_or(0), Ordering::Release);
            replica.loaded.store(true, Ordering::Release);
            tracing::info!(cursor, "replica loaded from disk");
        }
        Ok(replica)
    }

    /// Whether the follower reads the feed from NATS now (else the HTTP stream).
    pub fn follows_over_nats(&self) -> bool {
        self.over_nats.load(Ordering::Acquire)
    }

    /// Records which transport the follower reads the feed from.
    pub fn set_over_nats(&self, over_nats: bool) {
        self.over_nats.store(over_nats, Ordering::Release);
        metrics::gauge!("qs_proxy_sync_over_nats").set(if over_nats { 1.0 } else { 0.0 });
    }

    /// Whether decisions can be made from stored or snapshot state.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// The cursor to resume the stream from, if a complete copy is held.
    pub fn cursor(&self) -> Option<i64> {
        if self.snapshotting.load(Ordering::Acquire) || self.resnapshot.load(Ordering::Acquire) {
            // An interrupted snapshot or a record that would not apply: start over.
            return None;
        }
        let cursor = self.cursor.load(Ordering::Acquire);
        (self.is_loaded() && cursor >= 0).then_some(cursor)
    }

    /// When the stream last said anything (wall-clock ms; 0: never).
    pub fn last_heard_ms(&self) -> i64 {
        self.last_heard_ms.load(Ordering::Acquire)
    }

    /// How long since the stream last said anything (`None`: never, since start).
    pub fn silence(&self) -> Option<Duration> {
        let heard = self.last_heard_ms.load(Ordering::Acquire);
        if heard == 0 {
            return None;
        }
        let silent = self.wall_ms().saturating_sub(heard).max(0);
        Some(Duration::from_millis(u64::try_from(silent).unwrap_or(0)))
    }

    pub fn freshness(&self, max_staleness: Duration) -> Freshness {
        if !self.is_loaded() {
            return Freshness::Loading;
        }
        match self.silence() {
            Some(silence) if silence <= max_staleness => Freshness::Fresh,
            _ => Freshness::Stale,
        }
    }

    /// The proxy's wall clock in milliseconds (the clock its pending spend uses: the
    /// system clock, or a test's).
    pub fn wall_ms(&self) -> i64 {
        self.pending.clock().now().as_millis()
    }

    /// The control plane's clock as of its last message, for `x-quota-as-of`.
    pub fn as_of(&self) -> Timestamp {
        Timestamp::from_millis(self.as_of_ms.load(Ordering::Acquire))
    }

    /// The environment's now: the wall clock plus the test clock's offset.
    pub fn now(&self) -> Timestamp {
        Timestamp::from_millis(
            self.wall_ms()
                .saturating_add(self.clock_offset_ms.load(Ordering::Acquire)),
        )
    }

    pub fn catalog(&self) -> Option<Arc<CatalogView>> {
        self.catalog.load_full()
    }

    /// The end user's state (cheap for an end user in use: an `Arc` clone under a read
    /// lock; otherwise decoded from the compact form, no disk).
    pub fn user(&self, end_user: &EndUserId) -> Option<Arc<EndUserState>> {
        self.users.get(end_user)
    }

    /// The version of the end user's state held, if any (without decoding it).
    pub fn version(&self, end_user: &EndUserId) -> Option<u64> {
        self.users.version(end_user)
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// End users whose state is held decoded (in use lately).
    pub fn decoded_count(&self) -> usize {
        self.users.decoded_len()
    }

    /// Forgets the decoded states of end users not seen since the last call (they stay
    /// in the compact form): called periodically. Returns how many were forgotten.
    pub fn sweep(&self) -> usize {
        self.users.sweep()
    }

    /// Starts a fresh snapshot: forgets the durable copy (memory keeps serving until the
    /// snapshot completes).
    ///
    /// # Errors
    /// Storage failures.
    pub fn begin_snapshot(&self) -> Result<(), ApplyError> {
        let mut generation = self.lock_generation();
        *generation = generation.wrapping_add(1);
        let mut dirty = self.lock_dirty();
        *dirty = Dirty {
            all_users: true,
            ..Dirty::default()
        };
        self.snapshotting.store(true, Ordering::Release);
        self.resnapshot.store(false, Ordering::Release);
        self.disk.clear_replica()?;
        Ok(())
    }

    fn lock_generation(&self) -> std::sync::MutexGuard<'_, u64> {
        self.generation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes one batch if the durable copy is still of `generation`; `false` when a
    /// snapshot has cleared it since.
    fn write_batch(&self, generation: u64, writes: &[ReplicaWrite]) -> Result<bool, ApplyError> {
        let held = self.lock_generation();
        if *held != generation {
            return Ok(false);
        }
        self.disk.write_replica(writes)?;
        Ok(true)
    }

    fn lock_dirty(&self) -> std::sync::MutexGuard<'_, Dirty> {
        self.dirty
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies one record of a snapshot or stream to memory at once, and marks what the
    /// durable copy must catch up with ([`Replica::persist`] writes it).
    ///
    /// # Errors
    /// Records that do not validate.
    pub fn apply(&self, record: impl Into<Frame>) -> Result<(), ApplyError> {
        let applied = match record.into() {
            Frame::Record(record) => self.apply_record(*record),
            Frame::EndUser(frame) => {
                self.apply_end_user(frame.cursor, &frame.end_user_id, frame.version, || {
                    frame
                        .parts()
                        .map_err(|error| ApplyError::Invalid(error.to_string()))
                })
            }
        };
        if let Err(ApplyError::Invalid(message)) = &applied {
            tracing::error!(%message, "a replication record would not apply; taking a new snapshot");
            self.resnapshot.store(true, Ordering::Release);
        }
        applied
    }

    fn apply_record(&self, record: SyncRecord) -> Result<(), ApplyError> {
        let heard = self.wall_ms().max(1);
        let mut dirty = self.lock_dirty();
        match record {
            SyncRecord::Header {
                cursor,
                clock_offset_ms,
                now,
            } => {
                self.as_of_ms.store(now.0.as_millis(), Ordering::Release);
                self.clock_offset_ms
                    .store(clock_offset_ms, Ordering::Release);
                dirty.clock = Some(clock_offset_ms);
                dirty.cursor = Some(cursor);
                dirty.complete = Some(false);
                // The cursor in memory moves only when the snapshot ends.
            }
            SyncRecord::Catalog { cursor, catalog } => {
                let view = catalog_view(&catalog)?;
                let json = serde_json::to_vec(&catalog)
                    .map_err(|error| ApplyError::Invalid(error.to_string()))?;
                dirty.catalog = Some(json);
                dirty.advance(cursor);
                self.catalog.store(Some(Arc::new(view)));
                self.advance_cursor(cursor);
            }
            SyncRecord::EndUser {
                cursor,
                end_user_id,
                version,
                state,
            } => {
                drop(dirty);
                return self.apply_end_user(cursor, &end_user_id, version, || Ok(state));
            }
            SyncRecord::Clock {
                cursor,
                clock_offset_ms,
            } => {
                dirty.clock = Some(clock_offset_ms);
                dirty.advance(cursor);
                self.clock_offset_ms
                    .store(clock_offset_ms, Ordering::Release);
                self.advance_cursor(cursor);
            }
            SyncRecord::Heartbeat { cursor, now } => {
                self.as_of_ms.store(now.0.as_millis(), Ordering::Release);
                dirty.advance(cursor);
                self.advance_cursor(cursor);
            }
            SyncRecord::End { .. } => {
                dirty.complete = Some(true);
                self.snapshotting.store(false, Ordering::Release);
                self.loaded.store(true, Ordering::Release);
            }
        }
        // Heard only once the record applied: a stream of records that fail does not
        // make a frozen replica look fresh.
        dirty.heard = Some(heard);
        self.last_heard_ms.store(heard, Ordering::Release);
        Ok(())
    }

    /// Applies an end user's change: `state` is decoded only when `version` is newer than
    /// the one held (a follower that has a version already, after a reconnect or from a
    /// snapshot overlapping the stream, pays for its head alone).
    fn apply_end_user(
        &self,
        cursor: i64,
        end_user_id: &str,
        version: u64,
        state: impl FnOnce() -> Result<ledger::StateParts, ApplyError>,
    ) -> Result<(), ApplyError> {
        let heard = self.wall_ms().max(1);
        let end_user =
            EndUserId::new(end_user_id).map_err(|error| ApplyError::Invalid(error.to_string()))?;
        let newer = self.version(&end_user).is_none_or(|held| version > held);
        let state = if newer {
            let mut state = EndUserState::from_parts(state()?)
                .map_err(|error| ApplyError::Invalid(error.to_string()))?;
            state.shrink_to_fit();
            if state.end_user_id() != &end_user {
                return Err(ApplyError::Invalid(format!(
                    "the state for {end_user} names {}",
                    state.end_user_id()
                )));
            }
            let bytes =
                index::encode(&state).map_err(|error| ApplyError::Invalid(error.to_string()))?;
            Some((Arc::new(state), bytes))
        } else {
            metrics::counter!("qs_proxy_replica_versions_skipped_total").increment(1);
            None
        };
        let mut dirty = self.lock_dirty();
        if let Some((state, bytes)) = state {
            let replaced = self
                .pending
                .install(&end_user, version, || self.users.insert(state, bytes));
            // The old state is freed outside the end user's lock.
            drop(replaced);
            if !dirty.all_users {
                dirty.users.insert(end_user);
            }
        }
        dirty.advance(cursor);
        self.advance_cursor(cursor);
        dirty.heard = Some(heard);
        self.last_heard_ms.store(heard, Ordering::Release);
        Ok(())
    }

    /// Writes what changed since the last call to sled in one atomic batch: the end users'
    /// newest states with the cursor they are consistent with. A crash loses at most what
    /// changed since, and a restart resumes the stream from the stored cursor. Returns how
    /// many end users were written. During a snapshot nothing is written until its end
    /// line has been applied (the copy is not usable before, and writing as it arrives
    /// would rewrite every bucket once per call).
    ///
    /// # Errors
    /// Storage failures (the changes are kept for the next call).
    pub fn persist(&self) -> Result<usize, ApplyError> {
        let generation = *self.lock_generation();
        if self.snapshotting.load(Ordering::Acquire) {
            return Ok(0);
        }
        let acked = self.disk.acked_all()?;
        let (taken, shown) = {
            let mut dirty = self.lock_dirty();
            // Under the lock, memory is at least what this call will have stored: the
            // acknowledged costs its states include can be forgotten once it is written.
            let shown = self.acked_shown(&acked);
            (std::mem::take(&mut *dirty), shown)
        };
        if taken.is_empty() {
            self.disk.acked_remove(&shown)?;
            return Ok(0);
        }
        let written = if taken.all_users {
            self.write_all(&taken, generation)
        } else {
            self.write_dirty(&taken, generation)
        };
        if !matches!(written, Ok(true)) {
            // Failed, or a snapshot began meanwhile: put it all back under anything
            // newer, so a later call writes it.
            let mut dirty = self.lock_dirty();
            let newer = std::mem::replace(&mut *dirty, taken);
            dirty.merge(newer);
            return written.map(|_| 0);
        }
        self.disk.acked_remove(&shown)?;
        Ok(if taken.all_users {
            self.user_count()
        } else {
            taken.users.len()
        })
    }

    /// Writes every end user the index holds (after a snapshot: the stored copy was
    /// cleared), a range of buckets at a time, then the rest.
    fn write_all(&self, taken: &Dirty, generation: u64) -> Result<bool, ApplyError> {
        let chunk = u32::try_from(PERSIST_BUCKETS).unwrap_or(BUCKETS);
        let mut first = 0u32;
        while first < BUCKETS {
            let end = first.saturating_add(chunk).min(BUCKETS);
            let mut buckets: BTreeMap<u16, BTreeMap<String, Box<[u8]>>> = BTreeMap::new();
            for bytes in self.users.encoded_where(|id| {
                let bucket = u32::from(bucket_of(id));
                bucket >= first && bucket < end
            }) {
                let id = index::id_of(&bytes)
                    .ok_or_else(|| ApplyError::Invalid("indexed state without an id".into()))?
                    .to_owned();
                buckets.entry(bucket_of(&id)).or_default().insert(id, bytes);
            }
            let mut writes = Vec::with_capacity(buckets.len().saturating_add(6));
            for (bucket, states) in &buckets {
                writes.push(ReplicaWrite::Bucket {
                    bucket: *bucket,
                    bytes: encode_bucket(states)?,
                });
            }
            if end == BUCKETS {
                writes.extend(taken.meta());
            }
            if !self.write_batch(generation, &writes)? {
                return Ok(false);
            }
            first = end;
        }
        Ok(true)
    }

    /// Writes `taken`'s end users (each bucket read, changed and written whole: the
    /// states the index holds now, which are at least as new as those marked) and then
    /// the rest.
    fn write_dirty(&self, taken: &Dirty, generation: u64) -> Result<bool, ApplyError> {
        let mut buckets: BTreeMap<u16, Vec<&EndUserId>> = BTreeMap::new();
        for end_user in &taken.users {
            buckets
                .entry(bucket_of(end_user.as_str()))
                .or_default()
                .push(end_user);
        }
        // Buckets go in chunks (a snapshot of a million must not be one giant batch);
        // the cursor and the completion mark go last, with the final chunk. A crash
        // between chunks leaves states newer than the stored cursor, which is harmless:
        // the stream is replayed from the cursor and versions keep the newest.
        let buckets: Vec<(u16, Vec<&EndUserId>)> = buckets.into_iter().collect();
        let mut chunks = buckets.chunks(PERSIST_BUCKETS).peekable();
        loop {
            let chunk = chunks.next().unwrap_or_default();
            let last = chunks.peek().is_none();
            let mut writes = Vec::with_capacity(chunk.len().saturating_add(6));
            for (bucket, end_users) in chunk {
                let mut states = match self.disk.replica_bucket(*bucket)? {
                    Some(bytes) => decode_bucket(&bytes).inspect_err(|error| {
                        tracing::error!(bucket, %error, "a stored bucket is unreadable; taking a new snapshot");
                        self.resnapshot.store(true, Ordering::Release);
                    })?,
                    None => BTreeMap::new(),
                };
                for end_user in end_users {
                    if let Some(bytes) = self.users.encoded(end_user) {
                        states.insert(end_user.to_string(), bytes);
                    }
                }
                writes.push(ReplicaWrite::Bucket {
                    bucket: *bucket,
                    bytes: encode_bucket(&states)?,
                });
            }
            if last {
                writes.extend(taken.meta());
            }
            if !self.write_batch(generation, &writes)? {
                return Ok(false);
            }
            if last {
                return Ok(true);
            }
        }
    }

    /// The keys of acknowledged costs the in-memory states include (or that are over a
    /// day old: the state they wait for is not coming).
    fn acked_shown(&self, acked: &[crate::disk::OutboxEntry]) -> Vec<Vec<u8>> {
        let too_old = self.wall_ms().saturating_sub(24 * 3600 * 1000);
        acked
            .iter()
            .filter(|(_, json)| {
                serde_json::from_slice::<crate::disk::Acked>(json).map_or(true, |entry| {
                    entry.at_ms < too_old
                        || EndUserId::new(&entry.end_user_id).map_or(true, |end_user| {
                            self.version(&end_user)
                                .is_some_and(|held| held >= entry.needed)
                        })
                })
            })
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Moves the in-memory cursor forward (during a snapshot it stays until the end line;
    /// the header's cursor was stored already).
    fn advance_cursor(&self, cursor: i64) {
        self.cursor.fetch_max(cursor, Ordering::AcqRel);
    }

    /// Marks the snapshot's cursor as reached (called on its end line).
    pub fn finish_snapshot(&self, cursor: i64) {
        self.cursor.store(cursor, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::WireTime;

    fn snapshot_json() -> CatalogSnapshot {
        serde_json::from_value(serde_json::json!({
            "features": [{"id": "feat_01", "key": "api_calls", "parent_id": null, "archived": false,
                          "body": {"key": "api_calls", "name": "API calls", "type": "metered"}}],
            "plans": [], "variants": [],
            "settings": {"free_plan_variant_id": null, "low_balance_threshold": null}
        }))
        .expect("catalog")
    }

    fn user(id: &str, amount: i64, catalog: &Catalog) -> EndUserState {
        let now = Timestamp::from_millis(1_780_000_000_000);
        let mut state = EndUserState::new(EndUserId::new(id).expect("id"), now);
        let mut ids = ledger::SequentialIds::default();
        let mut cx = ledger::Cx {
            now,
            catalog,
            ids: &mut ids,
        };
        state
            .grant(
                &mut cx,
                ledger::GrantRequest::new(ledger::Credits::new(amount)),
            )
            .expect("grant");
        state
    }

    fn open(dir: &std::path::Path) -> Replica {
        Replica::open(Disk::open(dir, 8).expect("disk"), Arc::default()).expect("replica")
    }

    /// Begins a snapshot at `cursor`: its header applied, nothing else yet.
    fn begin(replica: &Replica, cursor: i64, now_ms: i64) {
        replica.begin_snapshot().expect("begin");
        replica
            .apply(SyncRecord::Header {
                cursor,
                clock_offset_ms: 0,
                now: WireTime(Timestamp::from_millis(now_ms)),
            })
            .expect("header");
    }

    fn snapshot(replica: &Replica, cursor: i64, users: &[EndUserState]) {
        let catalog = snapshot_json();
        begin(replica, cursor, 1_780_000_000_000);
        replica
            .apply(SyncRecord::Catalog { cursor, catalog })
            .expect("catalog");
        for state in users {
            replica
                .apply(SyncRecord::EndUser {
                    cursor,
                    end_user_id: state.end_user_id().to_string(),
                    version: state.version(),
                    state: state.clone().into_parts(),
                })
                .expect("user");
        }
        replica
            .apply(SyncRecord::End { end_users: 0 })
            .expect("end");
        replica.finish_snapshot(cursor);
    }

    #[test]
    fn a_stored_bucket_reads_back() {
        let catalog = snapshot_json().to_ledger().expect("catalog");
        let states: BTreeMap<String, Box<[u8]>> = ["u1", "u2", "u3"]
            .iter()
            .map(|id| {
                let state = user(id, 10, &catalog);
                ((*id).to_owned(), index::encode(&state).expect("encode"))
            })
            .collect();
        let bytes = encode_bucket(&states).expect("encode");
        assert_eq!(decode_bucket(&bytes).expect("decode"), states);
        assert!(decode_bucket(&bytes[..bytes.len() - 1]).is_err());
    }

    /// The stored copy depends on which bucket an end user falls in: it must not change
    /// between builds.
    #[test]
    fn buckets_are_stable_and_spread() {
        // zlib.crc32(b"u1") & 0x3fff, computed apart from this code.
        assert_eq!(bucket_of("u1"), 8054);
        let mut seen = HashSet::new();
        for n in 0..100_000 {
            let bucket = bucket_of(&format!("user-{n}"));
            assert!(u32::from(bucket) < BUCKETS);
            seen.insert(bucket);
        }
        assert!(
            seen.len() > 16_000,
            "{} of {BUCKETS} buckets used",
            seen.len()
        );
    }

    #[test]
    fn many_end_users_persist_across_buckets_and_reload() {
        let dir = tempfile::tempdir().expect("dir");
        let catalog = snapshot_json().to_ledger().expect("catalog");
        let states: Vec<EndUserState> = (0..3_000)
            .map(|n| user(&format!("user-{n}"), n + 1, &catalog))
            .collect();
        {
            let replica = open(dir.path());
            snapshot(&replica, 5, &states);
            assert_eq!(replica.persist().expect("persist"), 3_000);
        }
        let replica = open(dir.path());
        assert!(replica.is_loaded());
        assert_eq!(replica.user_count(), 3_000);
        assert_eq!(replica.decoded_count(), 0, "loaded in the compact form");
        for (n, state) in states.iter().enumerate() {
            let held = replica.user(state.end_user_id()).expect("held");
            assert_eq!(
                held.available(None, Timestamp::from_millis(1_780_000_000_001))
                    .expect("sum"),
                ledger::Credits::new(i64::try_from(n).expect("small") + 1),
            );
        }
    }

    #[test]
    fn nothing_is_written_during_a_snapshot_until_its_end() {
        let dir = tempfile::tempdir().expect("dir");
        let catalog = snapshot_json().to_ledger().expect("catalog");
        let replica = open(dir.path());
        begin(&replica, 3, 1);
        let state = user("u1", 10, &catalog);
        replica
            .apply(SyncRecord::EndUser {
                cursor: 3,
                end_user_id: "u1".into(),
                version: state.version(),
                state: state.into_parts(),
            })
            .expect("user");
        assert_eq!(replica.persist().expect("persist"), 0);
        assert_eq!(
            replica.disk.replica_bucket(bucket_of("u1")).expect("read"),
            None
        );
        replica
            .apply(SyncRecord::End { end_users: 1 })
            .expect("end");
        replica.finish_snapshot(3);
        assert_eq!(replica.persist().expect("persist"), 1);
        assert!(
            replica
                .disk
                .replica_bucket(bucket_of("u1"))
                .expect("read")
                .is_some()
        );
    }

    /// A persist still writing the last snapshot's end users when a new snapshot clears
    /// the copy must land nothing in it (least of all a completion mark).
    #[test]
    fn a_persist_overtaken_by_a_new_snapshot_writes_nothing_into_it() {
        let dir = tempfile::tempdir().expect("dir");
        let catalog = snapshot_json().to_ledger().expect("catalog");
        let replica = open(dir.path());
        snapshot(&replica, 4, &[user("u1", 10, &catalog)]);
        let generation = *replica.lock_generation();
        let taken = std::mem::take(&mut *replica.lock_dirty());
        assert!(taken.all_users);
        replica.begin_snapshot().expect("begin");
        assert!(!replica.write_all(&taken, generation).expect("no error"));
        assert!(!replica.write_dirty(&taken, generation).expect("no error"));
        assert_eq!(
            replica.disk.replica_bucket(bucket_of("u1")).expect("read"),
            None
        );
        let stored = replica.disk.load_replica().expect("load");
        assert!(!stored.complete);
        assert_eq!(stored.cursor, None);
    }

    #[test]
    fn a_state_that_names_another_end_user_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let catalog = snapshot_json().to_ledger().expect("catalog");
        let replica = open(dir.path());
        snapshot(&replica, 1, &[]);
        let state = user("u2", 10, &catalog);
        assert!(matches!(
            replica.apply(SyncRecord::EndUser {
                cursor: 2,
                end_user_id: "u1".into(),
                version: state.version(),
                state: state.into_parts(),
            }),
            Err(ApplyError::Invalid(_))
        ));
        assert_eq!(replica.user_count(), 0);
    }

    #[test]
    fn a_copy_in_an_older_layout_is_dropped_for_a_new_snapshot() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let disk = Disk::open(dir.path(), 8).expect("disk");
            disk.replica_raw_insert(b"u/u1", b"{}");
            disk.replica_raw_insert(b"m/complete", &[1]);
        }
        let replica = open(dir.path());
        assert!(!replica.is_loaded());
        assert_eq!(replica.cursor(), None);
        drop(replica);
        let disk = Disk::open(dir.path(), 8).expect("disk");
        let stored = disk.load_replica().expect("load");
        assert!(!stored.outdated, "cleared");
    }

    #[test]
    fn a_frame_for_a_version_held_is_not_decoded() {
        let dir = tempfile::tempdir().expect("dir");
        let catalog = snapshot_json().to_ledger().expect("catalog");
        let held = user("u1", 10, &catalog);
        let replica = open(dir.path());
        snapshot(&replica, 7, std::slice::from_ref(&held));
        let frame = |version: u64| {
            Frame::EndUser(protocol::frames::EndUserFrame {
                cursor: 8,
                end_user_id: "u1".into(),
                version,
                state: bytes::Bytes::from_static(b"not a state"),
            })
        };
        replica
            .apply(frame(held.version()))
            .expect("a version held is skipped without reading its state");
        assert_eq!(replica.cursor(), Some(8));
        assert!(matches!(
            replica.apply(frame(held.version() + 1)),
            Err(ApplyError::Invalid(_))
        ));
    }

    #[test]
    fn a_persisted_replica_reopens_with_its_users_and_cursor() {
        let dir = tempfile::tempdir().expect("dir");
        let catalog = snapshot_json().to_ledger().expect("catalog");
        let first = user("u1", 10, &catalog);
        {
            let replica = open(dir.path());
            assert!(!replica.is_loaded());
            snapshot(&replica, 7, std::slice::from_ref(&first));
            let mut newer = first.clone();
            let mut ids = ledger::SequentialIds::default();
            let mut cx = ledger::Cx {
                now: Timestamp::from_millis(1_780_000_000_001),
                catalog: &catalog,
                ids: &mut ids,
            };
            newer
                .grant(&mut cx, ledger::GrantRequest::new(ledger::Credits::new(5)))
                .expect("grant");
            replica
                .apply(SyncRecord::EndUser {
                    cursor: 9,
                    end_user_id: "u1".into(),
                    version: newer.version(),
                    state: newer.into_parts(),
                })
                .expect("change");
            assert_eq!(replica.persist().expect("persist"), 1);
            assert_eq!(replica.persist().expect("nothing new"), 0);
        }
        let replica = open(dir.path());
        assert!(replica.is_loaded());
        assert_eq!(replica.cursor(), Some(9));
        let id = EndUserId::new("u1").expect("id");
        assert_eq!(
            replica
                .user(&id)
                .expect("kept")
                .available(None, Timestamp::from_millis(1_780_000_000_002))
                .expect("sum"),
            ledger::Credits::new(15)
        );
    }

    #[test]
    fn an_unfinished_snapshot_is_not_served_after_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let replica = open(dir.path());
            begin(&replica, 3, 1);
            replica.persist().expect("persist");
        }
        let replica = open(dir.path());
        assert!(!replica.is_loaded());
        assert_eq!(replica.cursor(), None);
    }

    #[test]
    fn a_second_snapshot_keeps_users_whose_version_did_not_change() {
        let dir = tempfile::tempdir().expect("dir");
        let catalog = snapshot_json().to_ledger().expect("catalog");
        let state = user("u2", 4, &catalog);
        {
            let replica = open(dir.path());
            snapshot(&replica, 1, std::slice::from_ref(&state));
            replica.persist().expect("persist");
            // A 410 re-snapshot clears the durable copy; the same version must be kept.
            snapshot(&replica, 2, std::slice::from_ref(&state));
            replica.persist().expect("persist");
        }
        let replica = open(dir.path());
        assert!(replica.user(&EndUserId::new("u2").expect("id")).is_some());
        assert_eq!(replica.cursor(), Some(2));
    }

    /// A confirmation racing the stream's delivery of the state that includes its cost,
    /// on two threads (request threads confirm reservations while the follower applies
    /// states): whichever lands first, the cost stops counting once both have. Reading
    /// the held version before taking the lock could leave it counted twice.
    #[test]
    fn a_confirmation_racing_its_state_never_counts_the_cost_twice() {
        let dir = tempfile::tempdir().expect("dir");
        let catalog = snapshot_json().to_ledger().expect("catalog");
        let mut state = user("u1", 10, &catalog);
        let replica = open(dir.path());
        snapshot(&replica, 1, std::slice::from_ref(&state));
        let id = EndUserId::new("u1").expect("id");
        let mut ids = ledger::SequentialIds::default();
        for round in 0..2_000_i64 {
            // The proxy admits 1 credit; the control plane's next state includes it.
            replica.pending.add(&id, ledger::Credits::new(1));
            let mut cx = ledger::Cx {
                now: Timestamp::from_millis(1_780_000_000_001),
                catalog: &catalog,
                ids: &mut ids,
            };
            // Usage makes a new version without piling up blocks (an end user holds at
            // most 1,000 live ones).
            state
                .record_usage(
                    &mut cx,
                    ledger::UsageRequest {
                        feature_key: ledger::FeatureKey::new("api_calls").expect("key"),
                        units: ledger::Units::new(1).expect("units"),
                        strict: false,
                    },
                )
                .expect("usage");
            let version = state.version();
            let record = SyncRecord::EndUser {
                cursor: round.saturating_add(2),
                end_user_id: "u1".into(),
                version,
                state: state.clone().into_parts(),
            };
            let start = std::sync::Barrier::new(2);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    start.wait();
                    replica.apply(record).expect("applied");
                });
                scope.spawn(|| {
                    start.wait();
                    replica
                        .pending
                        .confirm(&id, ledger::Credits::new(1), Some(version), || {
                            replica.version(&id)
                        });
                });
            });
            assert_eq!(
                replica.pending.total(&id),
                ledger::Credits::ZERO,
                "round {round}: the state at {version} includes the cost"
            );
        }
    }
}
