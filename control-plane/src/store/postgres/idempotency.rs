//! PostgreSQL: idempotency keys and usage event keys
//! ([`IdempotencyStore`](crate::store::IdempotencyStore)).

use async_trait::async_trait;
use ledger::Timestamp;
use sqlx::{PgConnection, Row};

use super::{PostgresStore, corrupt};
use crate::queues::DrainGuard;
use crate::store::{
    Env, IdempotencyBegin, IdempotencyStore, LEASES_PER_TRANSACTION, Lease, LeaseAsk, StoreError,
    StoreResult, UsageKeyRecord, answer_leases, queue_lease,
};

/// How many times `idempotency_begin` looks again when the row it conflicted with is
/// deleted (abandoned or purged) before it can read it. Each retry follows a committed
/// delete, so more than a couple means something is wrong.
const IDEMPOTENCY_ATTEMPTS_MAX: u32 = 3;

#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn usage_keys(
        &self,
        env: &Env,
        keys: &[String],
    ) -> StoreResult<std::collections::BTreeMap<String, UsageKeyRecord>> {
        let rows = bind!(sqlx::query(
            // One index probe per key, whatever the statistics say: a `LIMIT` keeps the
            // lateral subquery from being flattened into a join, which on a young
            // table's statistics (the environment's range estimated at a few rows) was
            // planned as a hash join over every key of the environment, and neither
            // `key = ANY($3)` nor a plain join to `UNNEST` escaped that (P4 fell from
            // ~14k to ~8k events/s as the table grew).
            "SELECT u.* FROM UNNEST($3::text[]) AS k(key)
             CROSS JOIN LATERAL (
                 SELECT * FROM usage_keys
                 WHERE tenant_id = $1 AND environment = $2 AND key = k.key LIMIT 1
             ) AS u",
        ); &env.tenant_id, env.environment.as_str(), keys)
        .fetch_all(&self.pool)
        .await?;
        let mut found = std::collections::BTreeMap::new();
        for row in &rows {
            let fingerprint: Vec<u8> = row.try_get("fingerprint")?;
            let record = UsageKeyRecord {
                key: row.try_get("key")?,
                fingerprint: fingerprint
                    .try_into()
                    .map_err(|_| corrupt("usage key fingerprint"))?,
                entry_id: row.try_get("entry_id")?,
                result: row.try_get::<String, _>("result")?,
                keep_until: Timestamp::from_millis(row.try_get("keep_until")?),
            };
            found.insert(record.key.clone(), record);
        }
        Ok(found)
    }

    async fn purge_expired(&self, now: Timestamp) -> StoreResult<u64> {
        let idempotency =
            bind!(sqlx::query("DELETE FROM idempotency WHERE keep_until < $1"); now.as_millis())
                .execute(&self.pool)
                .await?;
        let usage =
            bind!(sqlx::query("DELETE FROM usage_keys WHERE keep_until < $1"); now.as_millis())
                .execute(&self.pool)
                .await?;
        Ok(idempotency
            .rows_affected()
            .saturating_add(usage.rows_affected()))
    }

    async fn idempotency_begin(&self, ask: LeaseAsk<'_>) -> StoreResult<IdempotencyBegin> {
        // Leases of one environment that arrive together are taken in one transaction, by
        // a task of its own (see `take_leases`).
        queue_lease(&self.leases, ask.env.clone(), ask, |guard| {
            let store = self.clone();
            tokio::spawn(async move { store.drain_leases(guard).await });
        })
        .await
    }
}

/// Takes (or reports) one lease inside the open transaction `tx`: `None` when the row
/// its insert conflicted with was deleted before it could be read, or changed before a
/// dead lease could be taken over (try again).
async fn take_lease(tx: &mut PgConnection, lease: &Lease) -> StoreResult<Option<IdempotencyBegin>> {
    let locked_until = lease.now.as_millis().saturating_add(lease.lease_ms);
    // Of two first requests, one inserts; the other's insert waits for it to commit and
    // then does nothing, and the row is read below.
    let inserted = bind!(sqlx::query(
        "INSERT INTO idempotency (tenant_id, environment, key, fingerprint, locked_until, keep_until)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, environment, key) DO NOTHING",
    ); &lease.env.tenant_id, lease.env.environment.as_str(), &lease.key,
        lease.fingerprint.as_slice(), locked_until, lease.keep_until.as_millis())
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() > 0 {
        return Ok(Some(IdempotencyBegin::Started));
    }
    let row = bind!(sqlx::query(
        "SELECT fingerprint, status, body, locked_until FROM idempotency
         WHERE tenant_id = $1 AND environment = $2 AND key = $3",
    ); &lease.env.tenant_id, lease.env.environment.as_str(), &lease.key)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let stored: Vec<u8> = row.try_get("fingerprint")?;
    if stored.as_slice() != lease.fingerprint.as_slice() {
        return Ok(Some(IdempotencyBegin::Mismatch));
    }
    if let Some(status) = row.try_get::<Option<i64>, _>("status")? {
        let body: Vec<u8> = row
            .try_get::<Option<Vec<u8>>, _>("body")?
            .unwrap_or_default();
        let status = u16::try_from(status).map_err(|_| corrupt("idempotency status"))?;
        return Ok(Some(IdempotencyBegin::Replay { status, body }));
    }
    let holder_until: i64 = row.try_get("locked_until")?;
    if holder_until > lease.now.as_millis() {
        return Ok(Some(IdempotencyBegin::InFlight));
    }
    // The first holder died without finishing: take the key over, if it is still as
    // read (else read again). The row is read without a lock, so a batch holds locks only
    // on keys it inserts or takes over: holding the key of a lease-path request whose
    // answer a group transaction is about to store, while waiting for a key that group
    // claimed, would be a deadlock.
    let taken = bind!(sqlx::query(
        "UPDATE idempotency SET locked_until = $1 WHERE tenant_id = $2 AND environment = $3 AND key = $4
           AND status IS NULL AND locked_until = $5",
    ); locked_until, &lease.env.tenant_id, lease.env.environment.as_str(), &lease.key, holder_until)
    .execute(&mut *tx)
    .await?;
    if taken.rows_affected() == 0 {
        return Ok(None);
    }
    Ok(Some(IdempotencyBegin::Started))
}

impl PostgresStore {
    /// Takes one environment's queued leases, a batch per transaction, until none are left.
    async fn drain_leases(&self, mut guard: DrainGuard<Env, Lease>) {
        while let Some(batch) = self.leases.take(&guard.key, LEASES_PER_TRANSACTION) {
            let outcome = self.take_leases(&batch).await;
            answer_leases(batch, outcome);
        }
        guard.finished = true;
    }

    /// Takes (or reports) each lease of `batch` in one transaction, answering each as if
    /// it came alone in arrival order. Keys are inserted in key order (arrival order among
    /// equal keys), so two batches taking overlapping keys cannot deadlock.
    ///
    /// The transaction does not wait for its WAL flush: if a crash loses a lease, it loses
    /// everything the request did after it too (the operation's own commit flushes the
    /// WAL up to and including the lease), and the request never answered, so a retry
    /// that finds no lease is right to run.
    pub(super) async fn take_leases(&self, batch: &[Lease]) -> StoreResult<Vec<IdempotencyBegin>> {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by(|a, b| batch[*a].key.cmp(&batch[*b].key));
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        let mut answers: Vec<Option<IdempotencyBegin>> = batch.iter().map(|_| None).collect();
        for index in order {
            let lease = &batch[index];
            let mut answer = None;
            for _ in 0..IDEMPOTENCY_ATTEMPTS_MAX {
                answer = take_lease(&mut tx, lease).await?;
                if answer.is_some() {
                    break;
                }
            }
            let answer = answer.ok_or_else(|| {
                StoreError::Transient(format!(
                    "idempotency key `{}` kept vanishing while it was claimed",
                    lease.key
                ))
            })?;
            if let Some(slot) = answers.get_mut(index) {
                *slot = Some(answer);
            }
        }
        tx.commit().await?;
        answers
            .into_iter()
            .map(|answer| answer.ok_or_else(|| corrupt("a lease without an answer")))
            .collect()
    }
}
