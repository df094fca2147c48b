//! Reads on direct connections for the usage path: the states a batch runs on and the
//! usage keys it looks up. Through sqlx, every row crosses from the connection's thread
//! to the task and every value is copied on the way: for a batch's 500 states and 500
//! keys that was a tenth of the control plane's time and a few thread switches on the
//! batch's path (docs/BENCHMARKS.md, P4). Here the statements run on the calling
//! thread (`block_in_place`), on read-only connections kept for reuse.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};

use super::super::{Env, StoreResult, UsageKeyRecord};
use super::corrupt;
use ledger::Timestamp;

/// Read-only connections to one database file, opened as needed and kept for reuse.
#[derive(Debug)]
pub(super) struct Readers {
    path: String,
    idle: Mutex<Vec<Connection>>,
    /// Connections kept when idle (more may be open at once; the rest are closed).
    keep: usize,
}

impl Readers {
    pub(super) fn new(path: &str, keep: usize) -> Readers {
        Readers {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// Runs `work` in one read transaction: everything it reads is one snapshot.
    pub(super) fn read<T>(&self, work: impl super::Work<T>) -> StoreResult<T> {
        super::blocking(|| {
            let taken = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let mut connection = match taken {
                Some(connection) => connection,
                None => self.connect()?,
            };
            let value = {
                let tx = connection.transaction()?;
                let value = work(&tx)?;
                // A read has nothing to keep.
                tx.rollback()?;
                value
            };
            // Kept only outside a transaction (a connection left in one would read a
            // stale snapshot and hold checkpoints back); on an error it is closed.
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if connection.is_autocommit() && idle.len() < self.keep {
                idle.push(connection);
            }
            Ok(value)
        })
    }

    fn connect(&self) -> StoreResult<Connection> {
        let connection = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(connection)
    }
}

/// The newest position of the change feed (of every environment): the highest number
/// `AUTOINCREMENT` ever gave, so that a purge emptying the feed does not take it below
/// the purge's watermark (which would make every batch rerun every operation).
pub(super) fn feed_position(tx: &Transaction<'_>) -> StoreResult<i64> {
    Ok(tx
        .prepare_cached(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0),
                        COALESCE((SELECT MAX(seq) FROM changes), 0))",
        )?
        .query_row([], |row| row.get(0))?)
}

/// The usage keys among `keys` recorded in the environment, by key.
pub(super) fn usage_keys(
    tx: &Transaction<'_>,
    env: &Env,
    keys: &[String],
) -> StoreResult<BTreeMap<String, UsageKeyRecord>> {
    let mut statement = tx.prepare_cached(
        "SELECT fingerprint, entry_id, result, keep_until FROM usage_keys WHERE tenant_id = ? AND environment = ? AND key = ?",
    )?;
    let mut found = BTreeMap::new();
    for key in keys {
        let row = statement
            .query_row(
                params![env.tenant_id, env.environment.as_str(), key],
                |row| {
                    Ok((
                        row.get::<_, Vec<u8>>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, i64>(3)?,
                    ))
                },
            )
            .optional()?;
        if let Some((fingerprint, entry_id, result, keep_until)) = row {
            let record = UsageKeyRecord {
                key: key.clone(),
                fingerprint: fingerprint
                    .try_into()
                    .map_err(|_| corrupt("usage key fingerprint"))?,
                entry_id,
                result,
                keep_until: Timestamp::from_millis(keep_until),
            };
            found.insert(key.clone(), record);
        }
    }
    Ok(found)
}
