//! The proxy's copy of its environment: every end user's live state, the catalog and the
//! clock offset, as of a feed cursor. sled holds the durable copy; the hot path reads the
//! in-memory index only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
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
    users: RwLock<HashMap<EndUserId, Arc<EndUserState>>>,
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
    /// Between `begin_snapshot` and the snapshot's end line: every end user is written,
    /// even one whose version memory holds already (the durable copy was cleared).
    snapshotting: AtomicBool,
    /// A record could not be applied: the follower takes a new snapshot.
    resnapshot: AtomicBool,
    /// The follower is reading the feed from NATS (else the HTTP stream).
    over_nats: AtomicBool,
    pub pending: Arc<Pending>,
}

/// End users written to sled per batch.
const PERSIST_CHUNK: usize = 5_000;

/// What the durable copy lacks.
#[derive(Debug, Default)]
struct Dirty {
    users: HashMap<EndUserId, Arc<EndUserState>>,
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
        self.users.is_empty()
            && self.catalog.is_none()
            && self.clock.is_none()
            && self.cursor.is_none()
            && self.heard.is_none()
            && self.complete.is_none()
    }

    /// Lays `newer` over `self`.
    fn merge(&mut self, newer: Dirty) {
        self.users.extend(newer.users);
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

/// An end user's state as the durable copy keeps it: JSON. (Postcard, the feed's encoding,
/// was tried: a third of the bytes, but sled 0.34 then held about 5.9 KB of memory per
/// end user at a million instead of 1.8 KB; docs/decisions.md.)
fn stored_state(state: &EndUserState) -> Result<Vec<u8>, ApplyError> {
    serde_json::to_vec(&state.clone().into_parts())
        .map_err(|error| ApplyError::Invalid(error.to_string()))
}

/// A stored state back.
fn stored_parts(bytes: &[u8]) -> Result<ledger::StateParts, String> {
    serde_json::from_slice(bytes).map_err(|error| error.to_string())
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
            users: RwLock::new(HashMap::new()),
            catalog: ArcSwapOption::empty(),
            clock_offset_ms: AtomicI64::new(0),
            cursor: AtomicI64::new(-1),
            last_heard_ms: AtomicI64::new(0),
            as_of_ms: AtomicI64::new(0),
            loaded: AtomicBool::new(false),
            disk,
            dirty: std::sync::Mutex::new(Dirty::default()),
            snapshotting: AtomicBool::new(false),
            resnapshot: AtomicBool::new(false),
            over_nats: AtomicBool::new(false),
            pending,
        };
        let stored = replica.disk.load_replica()?;
        if stored.complete
            && let (Some(cursor), Some(catalog)) = (stored.cursor, stored.catalog.as_deref())
        {
            let snapshot: CatalogSnapshot = serde_json::from_slice(catalog)
                .map_err(|error| ApplyError::Invalid(format!("stored catalog: {error}")))?;
            replica
                .catalog
                .store(Some(Arc::new(catalog_view(&snapshot)?)));
            let mut users = HashMap::with_capacity(stored.users.len());
            for (id, bytes) in stored.users {
                let parts = stored_parts(&bytes)
                    .map_err(|error| ApplyError::Invalid(format!("stored user {id}: {error}")))?;
                let mut state = EndUserState::from_parts(parts)
                    .map_err(|error| ApplyError::Invalid(error.to_string()))?;
                state.shrink_to_fit();
                users.insert(state.end_user_id().clone(), Arc::new(state));
            }
            *replica
                .users
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = users;
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

    /// The end user's state (cheap: an `Arc` clone under a read lock).
    pub fn user(&self, end_user: &EndUserId) -> Option<Arc<EndUserState>> {
        self.users
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(end_user)
            .cloned()
    }

    /// The version of the end user's state held, if any.
    pub fn version(&self, end_user: &EndUserId) -> Option<u64> {
        self.user(end_user).map(|state| state.version())
    }

    pub fn user_count(&self) -> usize {
        self.users
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Starts a fresh snapshot: forgets the durable copy (memory keeps serving until the
    /// snapshot completes).
    ///
    /// # Errors
    /// Storage failures.
    pub fn begin_snapshot(&self) -> Result<(), ApplyError> {
        let mut dirty = self.lock_dirty();
        *dirty = Dirty::default();
        self.snapshotting.store(true, Ordering::Release);
        self.resnapshot.store(false, Ordering::Release);
        self.disk.clear_replica()?;
        Ok(())
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
            Frame::Record(record) => self.apply_record(record),
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
            Some(Arc::new(state))
        } else {
            metrics::counter!("qs_proxy_replica_versions_skipped_total").increment(1);
            None
        };
        let mut dirty = self.lock_dirty();
        if let Some(state) = state {
            let replaced = self.pending.install(&end_user, version, || {
                self.users
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(end_user.clone(), state.clone())
            });
            // The old state is freed outside the end user's lock.
            drop(replaced);
            dirty.users.insert(end_user, state);
        } else if self.snapshotting.load(Ordering::Acquire)
            && let Some(held) = self.user(&end_user)
        {
            dirty.users.insert(end_user, held);
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
    /// many end users were written.
    ///
    /// # Errors
    /// Storage failures (the changes are kept for the next call).
    pub fn persist(&self) -> Result<usize, ApplyError> {
        let acked = self.disk.acked_all()?;
        let (taken, shown) = {
            let mut dirty = self.lock_dirty();
            // Under the lock, memory is exactly what this call will have stored: the
            // acknowledged costs its states include can be forgotten once it is written.
            let shown = self.acked_shown(&acked);
            (std::mem::take(&mut *dirty), shown)
        };
        if taken.is_empty() {
            self.disk.acked_remove(&shown)?;
            return Ok(0);
        }
        // End users go in chunks (a snapshot of a million must not be one giant batch);
        // the cursor and the completion mark go last, with the final chunk. A crash
        // between chunks leaves states newer than the stored cursor, which is harmless:
        // the stream is replayed from the cursor and versions keep the newest.
        let count = taken.users.len();
        let users: Vec<(&EndUserId, &Arc<EndUserState>)> = taken.users.iter().collect();
        let mut chunks = users.chunks(PERSIST_CHUNK).peekable();
        let mut written = 0usize;
        loop {
            let chunk = chunks.next().unwrap_or_default();
            let last = chunks.peek().is_none();
            let mut writes = Vec::with_capacity(chunk.len().saturating_add(6));
            for (end_user, state) in chunk {
                writes.push(ReplicaWrite::User {
                    end_user_id: end_user.to_string(),
                    state: stored_state(state)?,
                });
            }
            if last {
                if let Some(json) = &taken.catalog {
                    writes.push(ReplicaWrite::Catalog(json.clone()));
                }
                if let Some(offset) = taken.clock {
                    writes.push(ReplicaWrite::Clock(offset));
                }
                if let Some(cursor) = taken.cursor {
                    writes.push(ReplicaWrite::Cursor(cursor));
                }
                if let Some(heard) = taken.heard {
                    writes.push(ReplicaWrite::Heard(heard));
                }
                if let Some(complete) = taken.complete {
                    writes.push(ReplicaWrite::Complete(complete));
                }
            }
            if let Err(error) = self.disk.write_replica(&writes) {
                drop(chunks);
                drop(users);
                // Put it all back under anything newer, so the next call writes it.
                let mut dirty = self.lock_dirty();
                let newer = std::mem::replace(&mut *dirty, taken);
                dirty.merge(newer);
                return Err(error.into());
            }
            written = written.saturating_add(chunk.len());
            if last {
                break;
            }
        }
        debug_assert_eq!(written, count);
        self.disk.acked_remove(&shown)?;
        Ok(count)
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

    fn snapshot(replica: &Replica, cursor: i64, users: &[EndUserState]) {
        let catalog = snapshot_json();
        replica.begin_snapshot().expect("begin");
        let now = WireTime(Timestamp::from_millis(1_780_000_000_000));
        replica
            .apply(SyncRecord::Header {
                cursor,
                clock_offset_ms: 0,
                now,
            })
            .expect("header");
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
    fn a_stored_state_reads_back() {
        let catalog = snapshot_json().to_ledger().expect("catalog");
        let state = user("u1", 10, &catalog);
        let stored = stored_state(&state).expect("stored");
        assert_eq!(stored_parts(&stored), Ok(state.into_parts()));
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
                state: b"not a state".to_vec(),
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
            replica.begin_snapshot().expect("begin");
            replica
                .apply(SyncRecord::Header {
                    cursor: 3,
                    clock_offset_ms: 0,
                    now: WireTime(Timestamp::from_millis(1)),
                })
                .expect("header");
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
