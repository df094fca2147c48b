//! The direct connection the SQLite writer's end-user transactions run on: rusqlite, on
//! the calling thread. sqlx runs each connection on a thread of its own and crosses a
//! channel for every statement, copying every bound value: for a usage batch's rows that
//! was a quarter of their cost (docs/BENCHMARKS.md, P4). The store's other writes, its
//! reads and its migrations stay on sqlx; the direct connection is used only while the
//! sqlx writer is held, so the two never write at once in this process (another process
//! waits on SQLite's lock, `busy_timeout`).
//!
//! The direct connection does not checkpoint the WAL itself: a checkpoint run by a
//! commit runs while the committer still holds the writer (its pages copied and the
//! database file fsynced before the next transaction may begin). After a commit that
//! leaves `CHECKPOINT_PAGES` or more pages in the WAL, it wakes a thread of its own that
//! checkpoints on another connection (`PASSIVE`: never waiting on readers or the writer)
//! while the next transactions go on. Past twice that mark the commit also checkpoints,
//! as a bound on the WAL (see `Direct::transaction`).

use std::cell::Cell;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Mutex, PoisonError};

use rusqlite::hooks::Wal;
use rusqlite::{Connection, TransactionBehavior};

use super::super::{StoreError, StoreResult};
use crate::store::Synchronous;

/// Prepared statements kept per connection (a transaction uses about twenty kinds).
const STATEMENT_CACHE: usize = 64;

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> StoreError {
        let transient = matches!(
            error.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        );
        StoreError::database(error.to_string(), transient)
    }
}

pub(super) fn unique_violation(error: &rusqlite::Error) -> bool {
    matches!(
        error,
        rusqlite::Error::SqliteFailure(failure, _)
            if failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

/// The direct connection. Its transactions run on the calling thread: on a
/// multi-threaded runtime the worker hands its other tasks over first
/// (`block_in_place`).
#[derive(Debug)]
pub(super) struct Direct {
    connection: Mutex<Connection>,
    /// Wakes the checkpointing thread (see the module's doc); it ends when this does.
    checkpoints: SyncSender<()>,
    /// WAL pages after a commit that wake it.
    checkpoint_pages: i64,
}

thread_local! {
    /// Pages in the WAL after the last commit made on this thread through a direct
    /// connection, as SQLite's WAL hook told them (0 once read).
    static WAL_PAGES: Cell<i32> = const { Cell::new(0) };
}

/// The direct connection's WAL hook: notes the pages in the WAL after a commit, for
/// the thread that committed (a hook is a plain function, so it reports through a
/// thread-local read right after the commit, on the same thread).
#[allow(clippy::unnecessary_wraps)] // the hook's signature
fn note_wal_pages(_: &Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_PAGES.set(pages);
    Ok(())
}

/// Opens a connection to `path` as the store's writers use it.
fn connect(path: &str, synchronous: Option<Synchronous>) -> StoreResult<Connection> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    connection.pragma_update(
        None,
        "synchronous",
        match synchronous {
            Some(Synchronous::Full) => "FULL",
            Some(Synchronous::Normal) => "NORMAL",
            None => "OFF",
        },
    )?;
    Ok(connection)
}

/// Starts the thread that checkpoints `path`'s WAL each time it is woken through the
/// returned sender, until the sender is dropped. Wakings while it works are merged.
fn start_checkpoints(path: &str, synchronous: Option<Synchronous>) -> StoreResult<SyncSender<()>> {
    let connection = connect(path, synchronous)?;
    let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            while woken.recv().is_ok() {
                if let Err(error) = checkpoint(&connection) {
                    tracing::warn!(%error, "WAL checkpoint failed; the next commit retries");
                }
            }
        })
        .map_err(|error| {
            StoreError::Fatal(format!("cannot start the checkpointing thread: {error}"))
        })?;
    Ok(wake)
}

/// Copies what it can of the WAL into the database file without waiting on anyone.
fn checkpoint(connection: &Connection) -> rusqlite::Result<()> {
    connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}

/// What in the SQLite library's build makes its connections share a process-wide lock:
/// with `ENABLE_MEMORY_MANAGEMENT` every page a connection reads or releases goes
/// through one page cache's mutex, and without `DEFAULT_MEMSTATUS=0` every allocation
/// takes another. The readers and the writer then wait on each other (docs/decisions.md,
/// "SQLite build"); `.cargo/config.toml` builds libsqlite3-sys without them.
pub(super) fn shared_locks(connection: &Connection) -> rusqlite::Result<Vec<&'static str>> {
    let used = |option: &str| -> rusqlite::Result<bool> {
        connection.query_row("SELECT sqlite_compileoption_used(?)", [option], |row| {
            row.get(0)
        })
    };
    let mut found = Vec::new();
    if used("ENABLE_MEMORY_MANAGEMENT")? {
        found.push("built with SQLITE_ENABLE_MEMORY_MANAGEMENT (one page cache lock)");
    }
    if !used("DEFAULT_MEMSTATUS=0")? {
        found.push("built without SQLITE_DEFAULT_MEMSTATUS=0 (one allocation lock)");
    }
    Ok(found)
}

impl Direct {
    /// Opens `path` (already created and migrated through sqlx); commits leaving
    /// `checkpoint_pages` or more pages in the WAL have it checkpointed.
    pub(super) fn open(
        path: &str,
        synchronous: Option<Synchronous>,
        checkpoint_pages: i64,
    ) -> StoreResult<Direct> {
        let connection = connect(path, synchronous)?;
        // Replaces SQLite's automatic checkpoints on this connection (both are the WAL
        // hook).
        connection.wal_hook(Some(note_wal_pages));
        connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // Only a warning: the store works either way (slower).
        match shared_locks(&connection) {
            Ok(locks) => {
                for lock in locks {
                    tracing::warn!(
                        "the SQLite library was {lock}: concurrent reads and writes wait on each other; build from the workspace (its .cargo/config.toml sets LIBSQLITE3_FLAGS)"
                    );
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the SQLite library's compile options");
            }
        }
        Ok(Direct {
            connection: Mutex::new(connection),
            checkpoints: start_checkpoints(path, synchronous)?,
            checkpoint_pages,
        })
    }

    /// Runs `work` in one `BEGIN IMMEDIATE` transaction, committed if it succeeds and
    /// rolled back otherwise. The caller holds the sqlx writer.
    pub(super) fn transaction<T>(&self, work: impl super::Work<T>) -> StoreResult<T> {
        super::blocking(|| {
            // A panic inside a transaction rolled it back when it unwound: the
            // connection is clean even if the lock is poisoned.
            let mut connection = self
                .connection
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let tx = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(StoreError::from)?;
            let value = work(&tx)?;
            WAL_PAGES.set(0);
            tx.commit().map_err(StoreError::from)?;
            let pages = i64::from(WAL_PAGES.replace(0));
            if pages >= self.checkpoint_pages {
                // The WAL starts over only when a transaction begins on a WAL copied
                // whole, which the thread's checkpoints, run while commits go on, may
                // never leave under steady load. Past twice the mark the commit
                // checkpoints too, still holding the writer: the thread has copied most
                // of it, and the next transaction begins on a WAL copied whole.
                let here = pages >= self.checkpoint_pages.saturating_mul(2)
                    || match self.checkpoints.try_send(()) {
                        // Woken, or already woken and not yet at work.
                        Ok(()) | Err(TrySendError::Full(())) => false,
                        // The thread is gone (it panicked): checkpoint here.
                        Err(TrySendError::Disconnected(())) => true,
                    };
                // The transaction is committed whatever happens to the checkpoint.
                if here && let Err(error) = checkpoint(&connection) {
                    tracing::warn!(%error, "WAL checkpoint failed; the next commit retries");
                }
            }
            Ok(value)
        })
    }
}

#[cfg(test)]
mod tests;
