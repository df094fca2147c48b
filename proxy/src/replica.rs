//! The proxy's copy of its environment: every end user's live state, the catalog and the
//! clock offset, as of a feed cursor. sled holds the durable copy; the hot path reads the
//! in-memory index only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use ledger::{Catalog, EndUserId, EndUserState, Timestamp};
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
    pub pending: Arc<Pending>,
}

/// A record the replica cannot use (a bug or version skew; the follower re-snapshots).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("invalid record: {0}")]
    Invalid(String),
}

fn wall_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|elapsed| i64::try_from(elapsed.as_millis()).ok())
        .unwrap_or(0)
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
            for (id, json) in stored.users {
                let parts: ledger::StateParts = serde_json::from_slice(&json)
                    .map_err(|error| ApplyError::Invalid(format!("stored user {id}: {error}")))?;
                let state = EndUserState::from_parts(parts)
                    .map_err(|error| ApplyError::Invalid(error.to_string()))?;
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

    /// Whether decisions can be made from stored or snapshot state.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// The cursor to resume the stream from, if a complete copy is held.
    pub fn cursor(&self) -> Option<i64> {
        let cursor = self.cursor.load(Ordering::Acquire);
        (self.is_loaded() && cursor >= 0).then_some(cursor)
    }

    /// How long since the stream last said anything (`None`: never, since start).
    pub fn silence(&self) -> Option<Duration> {
        let heard = self.last_heard_ms.load(Ordering::Acquire);
        if heard == 0 {
            return None;
        }
        let silent = wall_now_ms().saturating_sub(heard).max(0);
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

    /// The control plane's clock as of its last message, for `x-quota-as-of`.
    pub fn as_of(&self) -> Timestamp {
        Timestamp::from_millis(self.as_of_ms.load(Ordering::Acquire))
    }

    /// The environment's now: the wall clock plus the test clock's offset.
    pub fn now(&self) -> Timestamp {
        Timestamp::from_millis(
            wall_now_ms().saturating_add(self.clock_offset_ms.load(Ordering::Acquire)),
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

    fn heard(&self) -> i64 {
        let now = wall_now_ms().max(1);
        self.last_heard_ms.store(now, Ordering::Release);
        now
    }

    /// Starts a fresh snapshot: forgets the durable copy (memory keeps serving until the
    /// snapshot completes).
    ///
    /// # Errors
    /// Storage failures.
    pub fn begin_snapshot(&self) -> Result<(), ApplyError> {
        self.disk.clear_replica()?;
        Ok(())
    }

    /// Applies one record of a snapshot or stream. Returns the record's end user when an
    /// end user's state changed.
    ///
    /// # Errors
    /// Storage failures and records that do not validate.
    pub fn apply(&self, record: SyncRecord) -> Result<(), ApplyError> {
        let heard = self.heard();
        match record {
            SyncRecord::Header {
                cursor,
                clock_offset_ms,
                now,
            } => {
                self.as_of_ms.store(now.0.as_millis(), Ordering::Release);
                self.clock_offset_ms
                    .store(clock_offset_ms, Ordering::Release);
                self.disk.write_replica(&[
                    ReplicaWrite::Clock(clock_offset_ms),
                    ReplicaWrite::Cursor(cursor),
                    ReplicaWrite::Complete(false),
                    ReplicaWrite::Heard(heard),
                ])?;
                // The cursor in memory moves only when the snapshot ends.
            }
            SyncRecord::Catalog { cursor, catalog } => {
                let view = catalog_view(&catalog)?;
                let json = serde_json::to_vec(&catalog)
                    .map_err(|error| ApplyError::Invalid(error.to_string()))?;
                self.disk
                    .write_replica(&[ReplicaWrite::Catalog(json), ReplicaWrite::Cursor(cursor)])?;
                self.catalog.store(Some(Arc::new(view)));
                self.advance_cursor(cursor);
            }
            SyncRecord::EndUser {
                cursor,
                end_user_id,
                version,
                state,
            } => {
                let end_user = EndUserId::new(&end_user_id)
                    .map_err(|error| ApplyError::Invalid(error.to_string()))?;
                let newer = self.version(&end_user).is_none_or(|held| version > held);
                if newer {
                    let json = serde_json::to_vec(&state)
                        .map_err(|error| ApplyError::Invalid(error.to_string()))?;
                    let state = EndUserState::from_parts(state)
                        .map_err(|error| ApplyError::Invalid(error.to_string()))?;
                    self.disk.write_replica(&[
                        ReplicaWrite::User {
                            end_user_id: end_user_id.clone(),
                            json,
                        },
                        ReplicaWrite::Cursor(cursor),
                    ])?;
                    self.users
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(end_user.clone(), Arc::new(state));
                    self.pending.observed(&end_user, version);
                } else {
                    self.disk.write_replica(&[ReplicaWrite::Cursor(cursor)])?;
                }
                self.advance_cursor(cursor);
            }
            SyncRecord::Clock {
                cursor,
                clock_offset_ms,
            } => {
                self.disk.write_replica(&[
                    ReplicaWrite::Clock(clock_offset_ms),
                    ReplicaWrite::Cursor(cursor),
                ])?;
                self.clock_offset_ms
                    .store(clock_offset_ms, Ordering::Release);
                self.advance_cursor(cursor);
            }
            SyncRecord::Heartbeat { cursor, now } => {
                self.as_of_ms.store(now.0.as_millis(), Ordering::Release);
                self.disk.write_replica(&[ReplicaWrite::Heard(heard)])?;
                self.advance_cursor(cursor);
            }
            SyncRecord::End { .. } => {
                self.disk.write_replica(&[ReplicaWrite::Complete(true)])?;
                self.loaded.store(true, Ordering::Release);
            }
        }
        Ok(())
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
