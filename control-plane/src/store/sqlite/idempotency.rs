//! SQLite: idempotency keys and usage event keys
//! ([`IdempotencyStore`](crate::store::IdempotencyStore)).

use async_trait::async_trait;
use ledger::Timestamp;
use sqlx::{Connection, Row, Sqlite, SqliteConnection};

use super::{SqliteStore, corrupt, read};
use crate::queues::DrainGuard;
use crate::store::{
    Env, IdempotencyBegin, IdempotencyStore, LEASES_PER_TRANSACTION, Lease, LeaseAsk, StoreResult,
    UsageKeyRecord, answer_leases, queue_lease,
};

impl SqliteStore {
    /// Takes queued leases, a batch per transaction, until none are left.
    async fn drain_leases(&self, mut guard: DrainGuard<(), Lease>) {
        while let Some(batch) = self.leases.take(&(), LEASES_PER_TRANSACTION) {
            let outcome = self.take_leases(&batch).await;
            answer_leases(batch, outcome);
        }
        guard.finished = true;
    }

    /// Takes (or reports) each lease of `batch`, in order, in one transaction.
    ///
    /// A lease need not be fsynced: if it is lost in a power cut, so is everything the
    /// request did after it (SQLite's WAL is appended in order, and the operation's own
    /// commit fsyncs the file up to and including the lease), and the request never
    /// answered, so a retry that finds no lease is right to run. So the writer runs these
    /// transactions at `synchronous = NORMAL` and is put back to `FULL` after (or closed,
    /// never handed back not fsyncing).
    pub(super) async fn take_leases(&self, batch: &[Lease]) -> StoreResult<Vec<IdempotencyBegin>> {
        let mut connection = self.writer.acquire().await?;
        if !self.fsync_commits {
            return take_all(&mut connection, batch).await;
        }
        sqlx::query("PRAGMA synchronous = NORMAL")
            .execute(&mut *connection)
            .await?;
        let mut relaxed = Relaxed {
            connection,
            restored: false,
        };
        let taken = take_all(&mut relaxed.connection, batch).await;
        sqlx::query("PRAGMA synchronous = FULL")
            .execute(&mut *relaxed.connection)
            .await?;
        relaxed.restored = true;
        taken
    }
}

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn usage_keys(
        &self,
        env: &Env,
        keys: &[String],
    ) -> StoreResult<std::collections::BTreeMap<String, UsageKeyRecord>> {
        self.readers.read(|tx| read::usage_keys(tx, env, keys))
    }

    async fn purge_expired(&self, now: Timestamp) -> StoreResult<u64> {
        let idempotency =
            bind!(sqlx::query("DELETE FROM idempotency WHERE keep_until < ?"); now.as_millis())
                .execute(&self.writer)
                .await?;
        // Oldest first, by rowid (no index on keep_until, migration 0007): up to the
        // first key still kept.
        let usage = bind!(sqlx::query(
            "DELETE FROM usage_keys WHERE keep_until < ?1 AND rowid < COALESCE(
                 (SELECT rowid FROM usage_keys WHERE keep_until >= ?1 ORDER BY rowid LIMIT 1),
                 (SELECT MAX(rowid) + 1 FROM usage_keys))",
        ); now.as_millis())
        .execute(&self.writer)
        .await?;
        // A key kept longer than the keys after it (the retention was shortened since,
        // or a key recorded by the environment's clock before 2026-11-30, which a test
        // clock may have set far ahead) holds the oldest-first purge back. A sweep
        // reads the next `sweep_rows` keys each time, from where the last one stopped,
        // round and round, so every expired key goes within a round.
        let from = self.sweep.load(std::sync::atomic::Ordering::Relaxed);
        let reached: Option<i64> = bind!(sqlx::query_scalar(
            "SELECT MAX(rowid) FROM (SELECT rowid FROM usage_keys WHERE rowid > ? ORDER BY rowid LIMIT ?)",
        ); from, self.sweep_rows)
        .fetch_one(&self.writer)
        .await?;
        let swept = match reached {
            Some(to) => {
                let swept = bind!(sqlx::query(
                    "DELETE FROM usage_keys WHERE rowid > ? AND rowid <= ? AND keep_until < ?",
                ); from, to, now.as_millis())
                .execute(&self.writer)
                .await?
                .rows_affected();
                self.sweep.store(to, std::sync::atomic::Ordering::Relaxed);
                swept
            }
            None => {
                self.sweep.store(0, std::sync::atomic::Ordering::Relaxed);
                0
            }
        };
        Ok(idempotency
            .rows_affected()
            .saturating_add(usage.rows_affected())
            .saturating_add(swept))
    }

    async fn idempotency_begin(&self, ask: LeaseAsk<'_>) -> StoreResult<IdempotencyBegin> {
        // Leases that arrive together are taken in one transaction on the writer (by a
        // task of its own, so a caller that goes away cannot leave the writer changed; see
        // `take_leases`).
        queue_lease(&self.leases, (), ask, |guard| {
            let store = self.clone();
            tokio::spawn(async move { store.drain_leases(guard).await });
        })
        .await
    }
}

/// The writer while it runs at `synchronous = NORMAL`: if it is dropped before FULL was
/// put back (an error, a panic, a cancelled task), it is closed, never handed back to the
/// pool not fsyncing.
struct Relaxed {
    connection: sqlx::pool::PoolConnection<Sqlite>,
    restored: bool,
}

impl Drop for Relaxed {
    fn drop(&mut self) {
        if !self.restored {
            self.connection.close_on_drop();
        }
    }
}

/// Takes each lease of `batch`, in order, in one transaction on `connection`.
async fn take_all(
    connection: &mut SqliteConnection,
    batch: &[Lease],
) -> StoreResult<Vec<IdempotencyBegin>> {
    let mut tx = connection.begin_with("BEGIN IMMEDIATE").await?;
    let mut answers = Vec::with_capacity(batch.len());
    for lease in batch {
        answers.push(take_lease(&mut tx, lease).await?);
    }
    tx.commit().await?;
    Ok(answers)
}

/// Takes (or reports) one idempotency key's lease inside the open transaction `tx`.
async fn take_lease(tx: &mut SqliteConnection, lease: &Lease) -> StoreResult<IdempotencyBegin> {
    let (env, key, fingerprint) = (&lease.env, &lease.key, &lease.fingerprint);
    let (now, lease_ms, keep_until) = (lease.now, lease.lease_ms, lease.keep_until);
    let row = bind!(sqlx::query("SELECT fingerprint, status, body, locked_until FROM idempotency WHERE tenant_id = ? AND environment = ? AND key = ?");
        &env.tenant_id, env.environment.as_str(), key)
        .fetch_optional(&mut *tx)
        .await?;
    let locked_until = now.as_millis().saturating_add(lease_ms);
    if let Some(row) = row {
        let stored: Vec<u8> = row.try_get("fingerprint")?;
        if stored.as_slice() != fingerprint.as_slice() {
            return Ok(IdempotencyBegin::Mismatch);
        }
        if let Some(status) = row.try_get::<Option<i64>, _>("status")? {
            let body: Vec<u8> = row
                .try_get::<Option<Vec<u8>>, _>("body")?
                .unwrap_or_default();
            let status = u16::try_from(status).map_err(|_| corrupt("idempotency status"))?;
            return Ok(IdempotencyBegin::Replay { status, body });
        }
        let holder_until: i64 = row.try_get("locked_until")?;
        if holder_until > now.as_millis() {
            return Ok(IdempotencyBegin::InFlight);
        }
        // The first holder died without finishing: take the key over.
        bind!(sqlx::query("UPDATE idempotency SET locked_until = ? WHERE tenant_id = ? AND environment = ? AND key = ?");
            locked_until, &env.tenant_id, env.environment.as_str(), key)
            .execute(&mut *tx)
            .await?;
    } else {
        bind!(sqlx::query("INSERT INTO idempotency (tenant_id, environment, key, fingerprint, locked_until, keep_until) VALUES (?, ?, ?, ?, ?, ?)");
            &env.tenant_id, env.environment.as_str(), key, fingerprint.as_slice(), locked_until,
            keep_until.as_millis())
            .execute(&mut *tx)
            .await?;
    }
    Ok(IdempotencyBegin::Started)
}
