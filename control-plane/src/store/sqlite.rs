//! The SQLite store: one file in WAL mode (`:memory:` is a private file removed with the
//! store), one writer connection (SQLite allows one writer at a time, so every mutation is
//! serialised there: end users' transactions run on a second, direct connection while
//! they hold it, see `write`) and a pool of readers. Write transactions start with
//! `BEGIN IMMEDIATE`, so a second process on the same file waits for the lock
//! (`busy_timeout`) instead of failing to upgrade a read.

use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use sqlx::SqlitePool;

use super::{Lease, StoreError, StoreResult};

use crate::queues::Queues;
use crate::store::columns::{corrupt, parse_state};
use crate::store::sql::Side;

use crate::store::{DatabaseUrl, Synchronous};

/// WAL pages after which a commit checkpoints (SQLite's default is 1,000, ~4 MiB): a
/// usage batch rewrites most pages of the end users it touches, and every checkpoint
/// copies each page changed since the last one to the database file once, however
/// often it changed; checkpointing a tenth as often took P4 from ~48.7k to ~51.7k
/// events/s (docs/BENCHMARKS.md). The direct writer's commits hand their checkpoints
/// to a thread of their own and checkpoint themselves past twice the mark (see
/// `write`), so the WAL stays under ~80 MiB; sqlx's connections checkpoint as SQLite
/// does, on the commit that crosses it.
const CHECKPOINT_PAGES: i64 = 10_000;

/// Rows in flight from SQLite's worker thread to the task reading them.
const ROW_CHANNEL: usize = 1024;

/// Links of an end user's chain of entries read by one statement of a filtered listing.
const CHAIN_STEPS: i64 = 512;

/// End users whose latest written state the store keeps for usage batches (see
/// `cache`; only small states are kept: a few hundred bytes to a few KiB each).
const STATE_CACHE: std::num::NonZeroUsize = std::num::NonZeroUsize::new(4_096).expect("not zero");

/// Usage keys the purge's sweep reads each time (once every `jobs.interval_ms`).
const SWEEP_ROWS: i64 = 4_096;

mod cache;
mod end_users;
mod feed;
mod idempotency;
mod webhooks;

mod read;

mod direct;
mod write;

/// Work done in one transaction on a direct rusqlite connection (the writer's or a
/// reader's).
pub(super) trait Work<T>: FnOnce(&rusqlite::Transaction<'_>) -> StoreResult<T> {}

impl<T, F: FnOnce(&rusqlite::Transaction<'_>) -> StoreResult<T>> Work<T> for F {}

/// Runs blocking `work` from async code: through `block_in_place` on a multi-threaded
/// runtime, directly elsewhere (a current-thread runtime has no other worker to hand
/// its tasks to). Not for a `LocalSet` on a multi-threaded runtime, where
/// `block_in_place` panics (the control plane has none).
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The writer: every write but end users' goes through it, and `mutate` and
    /// `mutate_many` hold it while they write through `direct`.
    writer: SqlitePool,
    reader: SqlitePool,
    /// End users' transactions (see `write`).
    direct: std::sync::Arc<direct::Direct>,
    /// The usage path's reads (see `read`).
    readers: std::sync::Arc<read::Readers>,
    /// States this process wrote, for the usage path (see `cache`).
    states: std::sync::Arc<cache::States>,
    /// The directory of a `:memory:` database's file, removed with the last clone.
    _scratch: Option<std::sync::Arc<tempfile::TempDir>>,
    /// Whether commits fsync (`synchronous = full`): idempotency leases relax it (see
    /// `idempotency_begin`).
    fsync_commits: bool,
    /// Idempotency leases waiting for the writer, taken together (see `idempotency_begin`).
    leases: std::sync::Arc<Queues<(), Lease>>,
    /// Where the usage keys' sweep stopped (a rowid; see `purge_expired`).
    sweep: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// Usage keys the sweep reads each time.
    sweep_rows: i64,
}

impl SqliteStore {
    /// Opens (creating if needed) the database and runs the migrations.
    ///
    /// # Errors
    /// [`StoreError`] when the file cannot be opened or migrated.
    pub async fn open(
        url: &DatabaseUrl,
        synchronous: Synchronous,
        read_connections: u32,
    ) -> StoreResult<SqliteStore> {
        // `:memory:` is a file in a directory of its own, removed when the store is
        // dropped: the direct connection must reach the same database as sqlx's.
        let (path, scratch, synchronous) = match url {
            DatabaseUrl::SqliteMemory => {
                let directory = tempfile::Builder::new()
                    .prefix("quotastack-memory-")
                    .tempdir()
                    .map_err(|error| {
                        StoreError::Fatal(format!(
                            "cannot create a directory for `:memory:`: {error}"
                        ))
                    })?;
                let path = directory.path().join("memory.db").display().to_string();
                (path, Some(std::sync::Arc::new(directory)), None)
            }
            DatabaseUrl::SqliteFile(path) => {
                if let Some(parent) = std::path::Path::new(path).parent()
                    && !parent.as_os_str().is_empty()
                {
                    std::fs::create_dir_all(parent).map_err(|error| {
                        StoreError::Fatal(format!("cannot create {}: {error}", parent.display()))
                    })?;
                }
                (path.clone(), None, Some(synchronous))
            }
            DatabaseUrl::Postgres(_) => {
                return Err(StoreError::Fatal(
                    "a postgres:// URL is not a SQLite database".into(),
                ));
            }
        };
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Throwaway data (`:memory:`) is never fsynced.
            .synchronous(match synchronous {
                Some(Synchronous::Full) => SqliteSynchronous::Full,
                Some(Synchronous::Normal) => SqliteSynchronous::Normal,
                None => SqliteSynchronous::Off,
            })
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true)
            .pragma("wal_autocheckpoint", CHECKPOINT_PAGES.to_string())
            // sqlx hands rows from SQLite's thread to the task through a channel
            // of this many; at 50 (its default) a batch's few hundred rows cost a
            // thread switch every 50.
            .row_buffer_size(ROW_CHANNEL);
        // No ping before each acquire (sqlx's default): a connection to a local file does
        // not go stale, and the ping is a round trip to the connection's thread on every
        // write (the writer is acquired for each end-user transaction) and read.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(read_connections)
            .test_before_acquire(false)
            .connect_with(options.read_only(true))
            .await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer)
            .await
            .map_err(|error| StoreError::Fatal(format!("migrations failed: {error}")))?;
        let direct = direct::Direct::open(&path, synchronous, CHECKPOINT_PAGES)?;
        let readers = read::Readers::new(
            &path,
            usize::try_from(read_connections).unwrap_or(usize::MAX),
        );
        Ok(SqliteStore {
            writer,
            reader,
            direct: std::sync::Arc::new(direct),
            readers: std::sync::Arc::new(readers),
            states: std::sync::Arc::new(cache::States::new(STATE_CACHE)),
            _scratch: scratch,
            fsync_commits: synchronous == Some(Synchronous::Full),
            leases: std::sync::Arc::default(),
            sweep: std::sync::Arc::default(),
            sweep_rows: SWEEP_ROWS,
        })
    }
}

crate::store::sql::sqlx_backend!(
    SqliteStore,
    sqlx::sqlite::SqliteRow,
    "INSERT INTO catalog (id, tenant_id, environment, kind, key, parent_id, body, archived, created_at, seq)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, (SELECT COALESCE(MAX(seq), 0) + 1 FROM catalog))"
);

impl SqliteStore {
    /// The statements both sqlx backends share run here: reads on the readers, writes on
    /// the writer.
    fn pool_for(&self, side: Side) -> &SqlitePool {
        match side {
            Side::Read => &self.reader,
            Side::Write => &self.writer,
        }
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'_, sqlx::Sqlite>, sqlx::Error> {
        self.writer.begin_with("BEGIN IMMEDIATE").await
    }
}

#[cfg(test)]
mod tests;
