//! The SQLite store: one file in WAL mode (`:memory:` is a private file removed with the
//! store), one writer connection (SQLite allows one writer at a time, so every mutation is
//! serialised there: end users' transactions run on a second, direct connection while
//! they hold it, see `write`) and a pool of readers. Write transactions start with
//! `BEGIN IMMEDIATE`, so a second process on the same file waits for the lock
//! (`busy_timeout`) instead of failing to upgrade a read.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use ledger::{Block, EndUserId, EndUserState, Reservation, StateParts, Subscription, Timestamp};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row, Sqlite, SqliteConnection, SqlitePool, Transaction};

use super::{
    Annotations, ApiKeyRecord, AttemptRecord, CatalogRecord, ChangeRecord, Changes, Claim,
    ClaimingFn, DeliveryJob, DeliveryLease, EndpointRecord, EntryFilter, Env, EnvRecord,
    Environment, EventRecord, IdempotencyAnswer, IdempotencyBegin, LEASES_PER_TRANSACTION, Lease,
    LeaseAsk, LeaseFilter, MutateFn, Store, StoreError, StoreResult, StoredBlock, TenantRecord,
    UsageKeyRecord, answer_leases, queue_lease, stage_rows,
};
use crate::queues::{DrainGuard, Queues};
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

/// How far behind the change feed's newest position a kept state may be to be used: the
/// writer reads the feed after the oldest state a batch uses, so an older one is read
/// again instead.
const KEPT_WINDOW: i64 = 32;

/// An environment's entries, newest first: its runs of entries newest first, each read
/// newest first (migration 0008). The runs' key is unique, so SQLite walks both in order
/// and stops at the limit without sorting (a test checks the plan). Binds: tenant,
/// environment, before (the cursor), type, from, to, limit.
const ENVIRONMENT_ENTRIES: &str = "SELECT e.seq, e.body FROM entry_runs AS r
       JOIN entries AS e ON e.seq BETWEEN r.first_seq AND MIN(r.last_seq, ?3 - 1)
      WHERE r.tenant_id = ?1 AND r.environment = ?2 AND r.first_seq < ?3
        AND e.tenant_id = ?1 AND e.environment = ?2
        AND (?4 IS NULL OR e.type = ?4)
        AND (?5 IS NULL OR e.created_at >= ?5) AND (?6 IS NULL OR e.created_at < ?6)
      ORDER BY r.first_seq DESC, e.seq DESC LIMIT ?7";

/// Usage keys the purge's sweep reads each time (once every `jobs.interval_ms`).
const SWEEP_ROWS: i64 = 4_096;

mod cache;
mod read;
mod write;

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
    direct: std::sync::Arc<write::Direct>,
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

fn millis(value: Timestamp) -> i64 {
    value.as_millis()
}

fn corrupt(message: impl Into<String>) -> StoreError {
    StoreError::Corrupt(message.into())
}

fn environment(row: &SqliteRow) -> StoreResult<Environment> {
    let text: String = row.try_get("environment")?;
    Environment::parse(&text).ok_or_else(|| corrupt(format!("environment `{text}`")))
}

fn unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database) if database.is_unique_violation())
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
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(read_connections)
            .connect_with(options.read_only(true))
            .await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer)
            .await
            .map_err(|error| StoreError::Fatal(format!("migrations failed: {error}")))?;
        let direct = write::Direct::open(&path, synchronous, CHECKPOINT_PAGES)?;
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

    /// One end user's entries, newest first: a walk down its chain of entries (each
    /// names the previous one; the end user's row names the newest), [`CHAIN_STEPS`]
    /// links a statement, keeping those the filter takes, until `limit` are found or the
    /// chain ends. The chain is only ever extended at its head, so the walk needs no
    /// single snapshot.
    async fn entries_of(
        &self,
        env: &Env,
        end_user: &str,
        filter: &EntryFilter,
    ) -> StoreResult<Vec<(i64, protocol::LedgerEntry)>> {
        let mut connection = self.reader.acquire().await?;
        // Where the walk starts: after the cursor's entry when it is this end user's
        // (the cursor a previous page gave), otherwise at the newest entry.
        let mut before = filter.before_seq;
        let mut next = None;
        if let Some(cursor) = before {
            let found: Option<Option<i64>> = sqlx::query_scalar(
                "SELECT prev_seq FROM entries WHERE seq = ? AND tenant_id = ? AND environment = ? AND end_user_id = ?",
            )
            .bind(cursor)
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(end_user)
            .fetch_optional(&mut *connection)
            .await?;
            if let Some(prev) = found {
                next = prev;
                before = None;
            }
        }
        if before.is_some() || filter.before_seq.is_none() {
            next = sqlx::query_scalar::<_, Option<i64>>(
                "SELECT last_entry_seq FROM end_users WHERE tenant_id = ? AND environment = ? AND end_user_id = ?",
            )
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(end_user)
            .fetch_optional(&mut *connection)
            .await?
            .flatten();
        }
        let limit = usize::try_from(filter.limit).unwrap_or(usize::MAX);
        let unfiltered = filter.entry_type.is_none()
            && filter.from.is_none()
            && filter.to.is_none()
            && before.is_none();
        // An unfiltered page takes every link it reads.
        let steps = if unfiltered {
            i64::from(filter.limit).clamp(1, CHAIN_STEPS)
        } else {
            CHAIN_STEPS
        };
        let mut found = Vec::new();
        while let Some(start) = next {
            if found.len() >= limit {
                break;
            }
            let rows = sqlx::query(
                "WITH RECURSIVE chain(seq) AS (
                     SELECT ?
                     UNION ALL
                     SELECT e.prev_seq FROM entries AS e JOIN chain ON e.seq = chain.seq
                      WHERE e.prev_seq < e.seq
                     LIMIT ?
                 )
                 SELECT e.seq, e.prev_seq, e.end_user_id, e.tenant_id, e.environment, e.type, e.created_at, e.body
                   FROM chain JOIN entries AS e ON e.seq = chain.seq
                  ORDER BY e.seq DESC",
            )
            .bind(start)
            .bind(steps)
            .fetch_all(&mut *connection)
            .await?;
            if rows.is_empty() {
                return Err(corrupt(format!(
                    "the chain of end user `{end_user}` names entry {start}, which does not exist"
                )));
            }
            next = None;
            let mut newer = start.saturating_add(1);
            for row in &rows {
                let seq: i64 = row.try_get("seq")?;
                // Links only ever lead to older entries: anything else would walk forever.
                if seq >= newer {
                    return Err(corrupt(format!(
                        "the chain of end user `{end_user}` does not lead to older entries at {seq}"
                    )));
                }
                newer = seq;
                let owner: String = row.try_get("end_user_id")?;
                let tenant: String = row.try_get("tenant_id")?;
                let environment: String = row.try_get("environment")?;
                if owner != end_user
                    || tenant != env.tenant_id
                    || environment != env.environment.as_str()
                {
                    return Err(corrupt(format!(
                        "entry {seq} is in the chain of end user `{end_user}` but belongs to `{owner}`"
                    )));
                }
                next = row.try_get("prev_seq")?;
                if next.is_some_and(|prev| prev >= seq) {
                    return Err(corrupt(format!(
                        "entry {seq} of end user `{end_user}` links to a newer entry"
                    )));
                }
                let created_at: i64 = row.try_get("created_at")?;
                let taken = before.is_none_or(|before| seq < before)
                    && filter.entry_type.as_deref().is_none_or(|wanted| {
                        row.try_get::<&str, _>("type").is_ok_and(|t| t == wanted)
                    })
                    && filter.from.is_none_or(|from| created_at >= millis(from))
                    && filter.to.is_none_or(|to| created_at < millis(to));
                if taken {
                    found.push((seq, serde_json::from_str(row.try_get::<&str, _>("body")?)?));
                    if found.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(found)
    }

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
    async fn take_leases(&self, batch: &[Lease]) -> StoreResult<Vec<IdempotencyBegin>> {
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

    async fn catalog_insert<T: serde::Serialize + Sync>(
        &self,
        env: &Env,
        kind: &str,
        record: &CatalogRecord<T>,
    ) -> StoreResult<()> {
        let body = serde_json::to_string(&record.body)?;
        let result = sqlx::query(
            "INSERT INTO catalog (id, tenant_id, environment, kind, key, parent_id, body, archived, created_at, seq)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM catalog))",
        )
        .bind(&record.id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(kind)
        .bind(&record.key)
        .bind(&record.parent_id)
        .bind(body)
        .bind(record.archived)
        .bind(millis(record.created_at))
        .execute(&self.writer)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(error) if unique_violation(&error) => Err(StoreError::Conflict(format!(
                "a {kind} with key `{}` already exists",
                record.key
            ))),
            Err(error) => Err(error.into()),
        }
    }

    /// Replaces a catalog object's body (its key and id stay); false when it is unknown.
    async fn catalog_update<T: serde::Serialize + Sync>(
        &self,
        env: &Env,
        kind: &str,
        record: &CatalogRecord<T>,
    ) -> StoreResult<bool> {
        let result = sqlx::query("UPDATE catalog SET body = ? WHERE id = ? AND tenant_id = ? AND environment = ? AND kind = ?")
            .bind(serde_json::to_string(&record.body)?)
            .bind(&record.id)
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(kind)
            .execute(&self.writer)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    async fn catalog_list<T: serde::de::DeserializeOwned>(
        &self,
        env: &Env,
        kind: &str,
    ) -> StoreResult<Vec<CatalogRecord<T>>> {
        let rows = sqlx::query(
            "SELECT id, key, parent_id, body, archived, created_at FROM catalog
             WHERE tenant_id = ? AND environment = ? AND kind = ? ORDER BY seq",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(kind)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(CatalogRecord {
                    id: row.try_get("id")?,
                    key: row.try_get("key")?,
                    parent_id: row.try_get("parent_id")?,
                    body: serde_json::from_str(&row.try_get::<String, _>("body")?)?,
                    archived: row.try_get("archived")?,
                    created_at: Timestamp::from_millis(row.try_get("created_at")?),
                })
            })
            .collect()
    }
}

fn api_key_from_row(row: &SqliteRow) -> StoreResult<ApiKeyRecord> {
    let hash: Vec<u8> = row.try_get("key_hash")?;
    Ok(ApiKeyRecord {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        environment: environment(row)?,
        name: row.try_get("name")?,
        scopes: serde_json::from_str(&row.try_get::<String, _>("scopes")?)?,
        prefix: row.try_get("prefix")?,
        key_hash: hash.try_into().map_err(|_| corrupt("key hash length"))?,
        created_at: Timestamp::from_millis(row.try_get("created_at")?),
        revoked_at: row
            .try_get::<Option<i64>, _>("revoked_at")?
            .map(Timestamp::from_millis),
    })
}

async fn insert_key(executor: &mut sqlx::SqliteConnection, key: &ApiKeyRecord) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, environment, name, scopes, prefix, key_hash, created_at, revoked_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&key.id)
    .bind(&key.tenant_id)
    .bind(key.environment.as_str())
    .bind(&key.name)
    .bind(serde_json::to_string(&key.scopes)?)
    .bind(&key.prefix)
    .bind(key.key_hash.as_slice())
    .bind(millis(key.created_at))
    .bind(key.revoked_at.map(millis))
    .execute(executor)
    .await?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_tenant(&self, tenant: &TenantRecord, keys: &[ApiKeyRecord]) -> StoreResult<()> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES (?, ?, ?)")
            .bind(&tenant.id)
            .bind(&tenant.name)
            .bind(millis(tenant.created_at))
            .execute(&mut *tx)
            .await?;
        for environment in [Environment::Live, Environment::Test] {
            sqlx::query(
                "INSERT INTO environments (tenant_id, environment, settings) VALUES (?, ?, ?)",
            )
            .bind(&tenant.id)
            .bind(environment.as_str())
            .bind(serde_json::to_string(&protocol::Settings::default())?)
            .execute(&mut *tx)
            .await?;
        }
        for key in keys {
            insert_key(&mut tx, key).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn api_key_by_hash(&self, hash: &[u8; 32]) -> StoreResult<Option<ApiKeyRecord>> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE key_hash = ?")
            .bind(hash.as_slice())
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(api_key_from_row).transpose()
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        let mut connection = self.writer.acquire().await?;
        insert_key(&mut connection, key).await
    }

    async fn list_api_keys(&self, env: &Env) -> StoreResult<Vec<ApiKeyRecord>> {
        let rows = sqlx::query("SELECT * FROM api_keys WHERE tenant_id = ? AND environment = ? ORDER BY created_at, id")
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(api_key_from_row).collect()
    }

    async fn revoke_api_key(
        &self,
        env: &Env,
        id: &str,
        at: Timestamp,
    ) -> StoreResult<Option<ApiKeyRecord>> {
        sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? AND tenant_id = ? AND environment = ?")
            .bind(millis(at))
            .bind(id)
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .execute(&self.writer)
            .await?;
        let row = sqlx::query(
            "SELECT * FROM api_keys WHERE id = ? AND tenant_id = ? AND environment = ?",
        )
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.writer)
        .await?;
        row.as_ref().map(api_key_from_row).transpose()
    }

    async fn env_record(&self, env: &Env) -> StoreResult<EnvRecord> {
        let row = sqlx::query("SELECT settings, clock_offset_ms FROM environments WHERE tenant_id = ? AND environment = ?")
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .fetch_optional(&self.reader)
            .await?;
        let Some(row) = row else {
            return Ok(EnvRecord::default());
        };
        Ok(EnvRecord {
            settings: serde_json::from_str(&row.try_get::<String, _>("settings")?)?,
            clock_offset_ms: row.try_get("clock_offset_ms")?,
        })
    }

    async fn put_settings(&self, env: &Env, settings: &protocol::Settings) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO environments (tenant_id, environment, settings) VALUES (?, ?, ?)
             ON CONFLICT (tenant_id, environment) DO UPDATE SET settings = excluded.settings",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(serde_json::to_string(settings)?)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn advance_clock(&self, env: &Env, step_ms: i64) -> StoreResult<i64> {
        let row = sqlx::query(
            "INSERT INTO environments (tenant_id, environment, settings, clock_offset_ms) VALUES (?, ?, ?, ?)
             ON CONFLICT (tenant_id, environment) DO UPDATE SET clock_offset_ms = clock_offset_ms + excluded.clock_offset_ms
             RETURNING clock_offset_ms",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(serde_json::to_string(&protocol::Settings::default())?)
        .bind(step_ms)
        .fetch_one(&self.writer)
        .await?;
        Ok(row.try_get("clock_offset_ms")?)
    }

    async fn put_env_record(&self, env: &Env, record: &EnvRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO environments (tenant_id, environment, settings, clock_offset_ms) VALUES (?, ?, ?, ?)
             ON CONFLICT (tenant_id, environment) DO UPDATE SET settings = excluded.settings, clock_offset_ms = excluded.clock_offset_ms",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(serde_json::to_string(&record.settings)?)
        .bind(record.clock_offset_ms)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn insert_feature(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreateFeature>,
    ) -> StoreResult<()> {
        self.catalog_insert(env, "feature", record).await
    }

    async fn update_feature(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreateFeature>,
    ) -> StoreResult<bool> {
        self.catalog_update(env, "feature", record).await
    }

    async fn features(
        &self,
        env: &Env,
    ) -> StoreResult<Vec<CatalogRecord<protocol::CreateFeature>>> {
        self.catalog_list(env, "feature").await
    }

    async fn insert_plan(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreatePlan>,
    ) -> StoreResult<()> {
        self.catalog_insert(env, "plan", record).await
    }

    async fn update_plan(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreatePlan>,
    ) -> StoreResult<bool> {
        self.catalog_update(env, "plan", record).await
    }

    async fn plans(&self, env: &Env) -> StoreResult<Vec<CatalogRecord<protocol::CreatePlan>>> {
        self.catalog_list(env, "plan").await
    }

    async fn insert_variant(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreateVariant>,
    ) -> StoreResult<()> {
        self.catalog_insert(env, "variant", record).await
    }

    async fn variants(
        &self,
        env: &Env,
    ) -> StoreResult<Vec<CatalogRecord<protocol::CreateVariant>>> {
        self.catalog_list(env, "variant").await
    }

    async fn set_variant_archived(&self, env: &Env, id: &str, archived: bool) -> StoreResult<bool> {
        let result = sqlx::query("UPDATE catalog SET archived = ? WHERE id = ? AND tenant_id = ? AND environment = ? AND kind = 'variant'")
            .bind(archived)
            .bind(id)
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .execute(&self.writer)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    async fn environments(&self) -> StoreResult<Vec<(Env, i64)>> {
        let rows = sqlx::query("SELECT tenant_id, environment, clock_offset_ms FROM environments ORDER BY tenant_id, environment")
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    Env {
                        tenant_id: row.try_get("tenant_id")?,
                        environment: environment(row)?,
                    },
                    row.try_get("clock_offset_ms")?,
                ))
            })
            .collect()
    }

    async fn mutate(
        &self,
        env: &Env,
        end_user: &EndUserId,
        now: Timestamp,
        claims: &[Claim],
        operation: &mut ClaimingFn<'_>,
    ) -> StoreResult<()> {
        let _writer = self.writer.acquire().await.map_err(StoreError::from)?;
        self.direct.transaction(|tx| {
            let (old, head) = write::load_state(tx, env, end_user.as_str())?
                .unwrap_or_else(|| (EndUserState::new(end_user.clone(), now), None));
            let claimed = write::claim_keys(tx, env, claims)?;
            let mut state = old.clone();
            let mut changes = operation(&mut state, &claimed)?;
            let mut rows = write::Rows::default();
            rows.heads.insert(end_user.to_string(), head);
            write::stage(tx, env, (&old, &state, &mut changes), now, &mut rows)?;
            rows.flush(tx, env, now)?;
            Ok(())
        })
    }

    /// Runs the batch's operations, and renders their rows, before taking the write
    /// lock, on states read from a reader, so that the writer is held only to write
    /// (loading states, the engine and rendering rows took 40% of a usage batch's time
    /// under the lock, docs/BENCHMARKS.md, P4). Every change of an end user's stored
    /// state appends to the change feed in the same transaction, so under the lock the
    /// feed since the states were read names every end user written in between; those
    /// (and any whose operation failed, which a newer state might not) are loaded again
    /// and their operations run again. States this process wrote are taken from its
    /// cache (`cache`) instead of read, checked the same way from the position they
    /// were written at.
    async fn mutate_many(
        &self,
        env: &Env,
        now: Timestamp,
        items: &mut [(EndUserId, &mut MutateFn<'_>)],
    ) -> StoreResult<()> {
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let owned: Vec<EndUserId> = items.iter().map(|(end_user, _)| end_user.clone()).collect();
        let ids: Vec<&str> = owned.iter().map(EndUserId::as_str).collect();
        let kept = self.states.get_many(env, &ids);
        // One read transaction: the feed's position and the states not kept (or kept
        // from too long ago) are one snapshot.
        let (read_at, mut seen, cached) = self.readers.read(|tx| {
            let read_at = read::feed_position(tx)?;
            let recent = read_at.saturating_sub(KEPT_WINDOW);
            let cached: Vec<_> = kept
                .into_iter()
                .map(|kept| kept.filter(|kept| kept.at >= recent))
                .collect();
            let missing: Vec<&str> = ids
                .iter()
                .zip(&cached)
                .filter(|(_, cached)| cached.is_none())
                .map(|(id, _)| *id)
                .collect();
            let seen = if missing.is_empty() {
                BTreeMap::new()
            } else {
                write::load_states(tx, env, &missing)?
            };
            Ok((read_at, seen, cached))
        })?;
        let mut prepared = Vec::with_capacity(items.len());
        for ((end_user, operation), cached) in items.iter_mut().zip(cached) {
            let (old, head, basis) = match cached {
                Some(cached) => (cached.state.as_ref().clone(), cached.head, cached.at),
                None => {
                    let (old, head) = seen
                        .remove(end_user.as_str())
                        .unwrap_or_else(|| (EndUserState::new(end_user.clone(), now), None));
                    (old, head, read_at)
                }
            };
            let mut state = old.clone();
            // A refusal is not final: the state it saw may be stale.
            let run = operation(&mut state).ok().and_then(|changes| {
                let staged = if changes.is_empty() {
                    None
                } else {
                    Some(stage_rows(&old, &state, &changes).ok()?)
                };
                Some((changes, staged))
            });
            prepared.push(Optimistic {
                old,
                head,
                basis,
                state,
                run,
            });
        }
        // The states' oldest position: the feed after it names every end user changed
        // since its state was read or written.
        let since = prepared
            .iter()
            .map(|optimistic| optimistic.basis)
            .min()
            .unwrap_or(i64::MAX);
        let writer = self.writer.acquire().await.map_err(StoreError::from)?;
        let (spent, flushed) = self.direct.transaction(|tx| {
            let written = write::changed_since(tx, env, since)?;
            let is_stale = |optimistic: &Optimistic, end_user: &str| {
                optimistic.run.is_none() || written.changed_after(end_user, optimistic.basis)
            };
            let stale: Vec<&str> = ids
                .iter()
                .zip(&prepared)
                .filter(|(end_user, optimistic)| is_stale(optimistic, end_user))
                .map(|(end_user, _)| *end_user)
                .collect();
            let mut fresh = write::load_states(tx, env, &stale)?;
            let mut rows = write::Rows::with_capacity(items.len());
            // What the rows were rendered from, dropped once the writer is released.
            let mut spent = Vec::with_capacity(items.len());
            for ((end_user, operation), optimistic) in items.iter_mut().zip(prepared) {
                let fresh_enough = !is_stale(&optimistic, end_user.as_str());
                let (old, head, state, mut changes, staged) = match optimistic.run {
                    Some((changes, staged)) if fresh_enough => (
                        optimistic.old,
                        optimistic.head,
                        optimistic.state,
                        changes,
                        staged,
                    ),
                    _ => {
                        let (old, head) = fresh
                            .remove(end_user.as_str())
                            .unwrap_or_else(|| (EndUserState::new(end_user.clone(), now), None));
                        let mut state = old.clone();
                        let changes = operation(&mut state)?;
                        (old, head, state, changes, None)
                    }
                };
                rows.heads.insert(end_user.to_string(), head);
                let applied = (&old, &state, changes.as_mut_slice());
                match staged {
                    Some(staged) => {
                        write::stage_rendered(tx, env, applied, staged, now, &mut rows)?
                    }
                    None => write::stage(tx, env, applied, now, &mut rows)?,
                }
                spent.push((old, state, changes));
            }
            let flushed = rows.flush(tx, env, now)?;
            Ok((spent, flushed))
        })?;
        drop(writer);
        // Committed: the states written are kept for the next batches. The others' kept
        // states, if any, may be the stale ones an operation reran on (a rerun that
        // changed nothing writes nothing): forgotten, or every batch would rerun them.
        let written: HashSet<&str> = flushed.written.iter().map(String::as_str).collect();
        let unwritten: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|end_user| !written.contains(end_user))
            .collect();
        self.states.forget_many(env, &unwritten, read_at);
        if let Some(at) = flushed.at {
            let keep = spent.into_iter().filter_map(|(_, state, _)| {
                let end_user = state.end_user_id().as_str();
                let (_, head) = flushed.heads.get(end_user)?;
                written.contains(end_user).then_some((state, *head))
            });
            self.states.put_many(env, at, keep);
        }
        Ok(())
    }

    async fn load_state(
        &self,
        env: &Env,
        end_user: &EndUserId,
    ) -> StoreResult<Option<EndUserState>> {
        let row = sqlx::query("SELECT state FROM end_users WHERE tenant_id = ? AND environment = ? AND end_user_id = ?")
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(end_user.as_str())
            .fetch_optional(&self.reader)
            .await?;
        row.map(|row| parse_state(&row.try_get::<String, _>("state")?))
            .transpose()
    }

    async fn due_end_users(
        &self,
        env: &Env,
        now: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<(EndUserId, Timestamp)>> {
        let rows = sqlx::query(
            "SELECT end_user_id, next_due_at FROM end_users WHERE tenant_id = ? AND environment = ? AND next_due_at IS NOT NULL AND next_due_at <= ?
             ORDER BY next_due_at LIMIT ?",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(millis(now))
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("end_user_id")?;
                let due = Timestamp::from_millis(row.try_get("next_due_at")?);
                Ok((
                    EndUserId::new(&id)
                        .map_err(|error| corrupt(format!("end user id `{id}`: {error}")))?,
                    due,
                ))
            })
            .collect()
    }

    async fn postpone_due(
        &self,
        env: &Env,
        end_user: &EndUserId,
        at: Timestamp,
    ) -> StoreResult<()> {
        sqlx::query("UPDATE end_users SET next_due_at = ? WHERE tenant_id = ? AND environment = ? AND end_user_id = ? AND next_due_at < ?")
            .bind(millis(at))
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(end_user.as_str())
            .bind(millis(at))
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn block(&self, env: &Env, id: &str) -> StoreResult<Option<StoredBlock>> {
        let row = sqlx::query("SELECT end_user_id, body, metadata, external_payment_id FROM blocks WHERE id = ? AND tenant_id = ? AND environment = ?")
            .bind(id)
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .fetch_optional(&self.reader)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let block: Block = serde_json::from_str(&row.try_get::<String, _>("body")?)?;
        let metadata = row
            .try_get::<Option<String>, _>("metadata")?
            .map(|text| serde_json::from_str(&text))
            .transpose()?;
        let owner: String = row.try_get("end_user_id")?;
        Ok(Some(StoredBlock {
            end_user_id: EndUserId::new(&owner)
                .map_err(|error| corrupt(format!("end user id `{owner}`: {error}")))?,
            block,
            annotations: Annotations {
                idempotency_key: None,
                metadata,
                external_payment_id: row.try_get("external_payment_id")?,
            },
        }))
    }

    async fn entries(
        &self,
        env: &Env,
        filter: &EntryFilter,
    ) -> StoreResult<Vec<(i64, protocol::LedgerEntry)>> {
        if let Some(end_user) = &filter.end_user_id {
            return self.entries_of(env, end_user, filter).await;
        }
        let rows = sqlx::query(ENVIRONMENT_ENTRIES)
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(filter.before_seq.unwrap_or(i64::MAX))
            .bind(&filter.entry_type)
            .bind(filter.from.map(millis))
            .bind(filter.to.map(millis))
            .bind(filter.limit)
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("seq")?,
                    serde_json::from_str(&row.try_get::<String, _>("body")?)?,
                ))
            })
            .collect()
    }

    async fn reservation(&self, env: &Env, id: &str) -> StoreResult<Option<Reservation>> {
        let row = sqlx::query(
            "SELECT body FROM reservations WHERE id = ? AND tenant_id = ? AND environment = ?",
        )
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.reader)
        .await?;
        row.map(|row| Ok(serde_json::from_str(&row.try_get::<String, _>("body")?)?))
            .transpose()
    }

    async fn lease(&self, env: &Env, id: &str) -> StoreResult<Option<ledger::Lease>> {
        let row = sqlx::query(
            "SELECT body FROM leases WHERE id = ? AND tenant_id = ? AND environment = ?",
        )
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.reader)
        .await?;
        row.map(|row| Ok(serde_json::from_str(&row.try_get::<String, _>("body")?)?))
            .transpose()
    }

    async fn leases(&self, env: &Env, filter: &LeaseFilter) -> StoreResult<Vec<ledger::Lease>> {
        // Fixed fragments only; every value is bound, in the order the fragments name.
        let mut sql =
            String::from("SELECT body FROM leases WHERE tenant_id = ? AND environment = ?");
        let mut binds: Vec<&str> = Vec::new();
        for (column, value) in [
            (" AND end_user_id = ", &filter.end_user_id),
            (" AND holder = ", &filter.holder),
            (" AND id > ", &filter.after),
        ] {
            if let Some(value) = value {
                sql.push_str(column);
                sql.push('?');
                binds.push(value);
            }
        }
        if filter.active_only {
            sql.push_str(" AND status = 'active'");
        }
        sql.push_str(" ORDER BY id LIMIT ");
        sql.push('?');
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&env.tenant_id)
            .bind(env.environment.as_str());
        for value in binds {
            query = query.bind(value);
        }
        let rows = query
            .bind(i64::from(filter.limit))
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|row| Ok(serde_json::from_str(&row.try_get::<String, _>("body")?)?))
            .collect()
    }

    async fn subscription(&self, env: &Env, id: &str) -> StoreResult<Option<Subscription>> {
        let row = sqlx::query(
            "SELECT body FROM subscriptions WHERE id = ? AND tenant_id = ? AND environment = ?",
        )
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.reader)
        .await?;
        row.map(|row| Ok(serde_json::from_str(&row.try_get::<String, _>("body")?)?))
            .transpose()
    }

    async fn subscriptions(
        &self,
        env: &Env,
        end_user: Option<&str>,
        after_id: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<Subscription>> {
        let rows = sqlx::query(
            "SELECT body FROM subscriptions WHERE tenant_id = ? AND environment = ?
               AND (? IS NULL OR end_user_id = ?) AND (? IS NULL OR id > ?)
             ORDER BY id LIMIT ?",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(end_user)
        .bind(end_user)
        .bind(after_id)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| Ok(serde_json::from_str(&row.try_get::<String, _>("body")?)?))
            .collect()
    }

    async fn events(
        &self,
        env: &Env,
        after_seq: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<EventRecord>> {
        let rows = sqlx::query(
            "SELECT seq, body FROM events WHERE tenant_id = ? AND environment = ? AND (? IS NULL OR seq > ?) ORDER BY seq LIMIT ?",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(after_seq)
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(EventRecord {
                    seq: row.try_get("seq")?,
                    event: serde_json::from_str(&row.try_get::<String, _>("body")?)?,
                })
            })
            .collect()
    }

    async fn event(&self, env: &Env, id: &str) -> StoreResult<Option<EventRecord>> {
        let row = sqlx::query(
            "SELECT seq, body FROM events WHERE id = ? AND tenant_id = ? AND environment = ?",
        )
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.reader)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut event: protocol::Event = serde_json::from_str(&row.try_get::<String, _>("body")?)?;
        let attempts = sqlx::query("SELECT endpoint_id, attempt, status, response_status, at FROM webhook_attempts WHERE event_id = ? ORDER BY at, attempt")
            .bind(id)
            .fetch_all(&self.reader)
            .await?;
        for attempt in &attempts {
            event.deliveries.push(protocol::Delivery {
                endpoint_id: attempt.try_get("endpoint_id")?,
                attempt: u32::try_from(attempt.try_get::<i64, _>("attempt")?)
                    .map_err(|_| corrupt("attempt"))?,
                status: attempt.try_get("status")?,
                response_status: attempt
                    .try_get::<Option<i64>, _>("response_status")?
                    .and_then(|status| u16::try_from(status).ok()),
                at: Timestamp::from_millis(attempt.try_get("at")?).into(),
            });
        }
        Ok(Some(EventRecord {
            seq: row.try_get("seq")?,
            event,
        }))
    }

    async fn changes_after(
        &self,
        env: &Env,
        cursor: i64,
        limit: u32,
    ) -> StoreResult<Vec<ChangeRecord>> {
        let rows = sqlx::query("SELECT seq, end_user_id, end_user_ids FROM changes WHERE tenant_id = ? AND environment = ? AND seq > ? ORDER BY seq LIMIT ?")
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(cursor)
            .bind(limit)
            .fetch_all(&self.reader)
            .await?;
        let end_user = |id: String| {
            EndUserId::new(&id).map_err(|error| corrupt(format!("end user id `{id}`: {error}")))
        };
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            let seq: i64 = row.try_get("seq")?;
            // A row naming several end users (migration 0006) is one record each.
            if let Some(several) = row.try_get::<Option<String>, _>("end_user_ids")? {
                for id in serde_json::from_str::<Vec<String>>(&several)? {
                    records.push(ChangeRecord {
                        seq,
                        end_user_id: Some(end_user(id)?),
                    });
                }
                continue;
            }
            records.push(ChangeRecord {
                seq,
                end_user_id: row
                    .try_get::<Option<String>, _>("end_user_id")?
                    .map(end_user)
                    .transpose()?,
            });
        }
        Ok(records)
    }

    async fn last_change(&self, env: &Env) -> StoreResult<i64> {
        let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM changes WHERE tenant_id = ? AND environment = ?")
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .fetch_one(&self.reader)
            .await?;
        let last: i64 = row.try_get("seq")?;
        Ok(last.max(self.purged_through(env).await?))
    }

    async fn purged_through(&self, env: &Env) -> StoreResult<i64> {
        let row = sqlx::query(
            "SELECT purged_through FROM change_watermarks WHERE tenant_id = ? AND environment = ?",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.reader)
        .await?;
        Ok(row
            .map(|row| row.try_get("purged_through"))
            .transpose()?
            .unwrap_or(0))
    }

    async fn record_catalog_change(&self, env: &Env, at: Timestamp) -> StoreResult<()> {
        let mut connection = self.writer.acquire().await?;
        insert_change(&mut connection, env, None, at).await
    }

    async fn end_user_states(
        &self,
        env: &Env,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<EndUserState>> {
        let rows = sqlx::query(
            "SELECT state FROM end_users WHERE tenant_id = ? AND environment = ? AND (? IS NULL OR end_user_id > ?) ORDER BY end_user_id LIMIT ?",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(after)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| parse_state(&row.try_get::<String, _>("state")?))
            .collect()
    }

    async fn purge_changes(&self, before: Timestamp) -> StoreResult<u64> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "INSERT INTO change_watermarks (tenant_id, environment, purged_through)
             SELECT tenant_id, environment, MAX(seq) FROM changes WHERE created_at < ? GROUP BY tenant_id, environment
             ON CONFLICT (tenant_id, environment) DO UPDATE SET purged_through = MAX(purged_through, excluded.purged_through)",
        )
        .bind(millis(before))
        .execute(&mut *tx)
        .await?;
        let deleted = sqlx::query("DELETE FROM changes WHERE created_at < ?")
            .bind(millis(before))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(deleted.rows_affected())
    }

    async fn insert_endpoint(&self, env: &Env, record: &EndpointRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO webhook_endpoints (id, tenant_id, environment, url, event_types, secret, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&record.id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(&record.url)
        .bind(record.event_types.as_ref().map(serde_json::to_string).transpose()?)
        .bind(&record.secret)
        .bind(millis(record.created_at))
        .bind(millis(record.updated_at))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn endpoints(&self, env: &Env) -> StoreResult<Vec<EndpointRecord>> {
        let mut connection = self.reader.acquire().await?;
        live_endpoints(&mut connection, env).await
    }

    async fn update_endpoint(&self, env: &Env, record: &EndpointRecord) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE webhook_endpoints SET url = ?, event_types = ?, updated_at = ? WHERE id = ? AND tenant_id = ? AND environment = ? AND deleted_at IS NULL",
        )
        .bind(&record.url)
        .bind(record.event_types.as_ref().map(serde_json::to_string).transpose()?)
        .bind(millis(record.updated_at))
        .bind(&record.id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .execute(&self.writer)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    async fn delete_endpoint(&self, env: &Env, id: &str, at: Timestamp) -> StoreResult<bool> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let result = sqlx::query("UPDATE webhook_endpoints SET deleted_at = ? WHERE id = ? AND tenant_id = ? AND environment = ? AND deleted_at IS NULL")
            .bind(millis(at))
            .bind(id)
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .execute(&mut *tx)
            .await?;
        // Nothing more goes to a deleted endpoint.
        sqlx::query("UPDATE webhook_deliveries SET status = 'failed' WHERE endpoint_id = ? AND tenant_id = ? AND environment = ? AND status = 'pending'")
            .bind(id)
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(result.rows_affected() > 0)
    }

    async fn insert_ping(
        &self,
        env: &Env,
        event: &protocol::Event,
        endpoint_id: &str,
        now: Timestamp,
    ) -> StoreResult<()> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let seq = insert_wire_event(&mut tx, env, event, None).await?;
        insert_delivery(&mut tx, env, endpoint_id, &event.id, seq, None, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn redeliver(&self, env: &Env, event_id: &str, now: Timestamp) -> StoreResult<usize> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query("SELECT seq, end_user_id, type FROM events WHERE id = ? AND tenant_id = ? AND environment = ?")
            .bind(event_id)
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(0) };
        let (seq, end_user, event_type): (i64, Option<String>, String) = (
            row.try_get("seq")?,
            row.try_get("end_user_id")?,
            row.try_get("type")?,
        );
        let mut queued = 0usize;
        for endpoint in live_endpoints(&mut tx, env)
            .await?
            .iter()
            .filter(|endpoint| endpoint.wants(&event_type))
        {
            insert_delivery(
                &mut tx,
                env,
                &endpoint.id,
                event_id,
                seq,
                end_user.as_deref(),
                now,
            )
            .await?;
            queued = queued.saturating_add(1);
        }
        tx.commit().await?;
        Ok(queued)
    }

    async fn claim_deliveries(
        &self,
        env: &Env,
        due_by: Timestamp,
        lease: DeliveryLease,
        limit: u32,
    ) -> StoreResult<Vec<DeliveryJob>> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let rows = sqlx::query(
            "SELECT d.id, d.attempts, d.next_attempt_at, d.endpoint_id, e.body AS event_body,
                    w.url, w.event_types, w.secret, w.created_at AS endpoint_created_at, w.updated_at AS endpoint_updated_at
             FROM webhook_deliveries d
             JOIN events e ON e.id = d.event_id
             JOIN webhook_endpoints w ON w.id = d.endpoint_id AND w.deleted_at IS NULL
             WHERE d.tenant_id = ? AND d.environment = ? AND d.status = 'pending' AND d.next_attempt_at <= ? AND d.locked_until <= ?
               AND NOT EXISTS (
                 SELECT 1 FROM webhook_deliveries earlier
                 WHERE earlier.endpoint_id = d.endpoint_id AND earlier.end_user_id IS d.end_user_id
                   AND earlier.status = 'pending' AND (earlier.event_seq < d.event_seq OR (earlier.event_seq = d.event_seq AND earlier.id < d.id)))
             ORDER BY d.event_seq LIMIT ?",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(millis(due_by))
        .bind(millis(lease.now))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in &rows {
            let delivery_id: i64 = row.try_get("id")?;
            sqlx::query("UPDATE webhook_deliveries SET locked_until = ? WHERE id = ?")
                .bind(millis(lease.until))
                .bind(delivery_id)
                .execute(&mut *tx)
                .await?;
            jobs.push(DeliveryJob {
                delivery_id,
                attempts: u32::try_from(row.try_get::<i64, _>("attempts")?)
                    .map_err(|_| corrupt("attempts"))?,
                due_at: Timestamp::from_millis(row.try_get("next_attempt_at")?),
                endpoint: EndpointRecord {
                    id: row.try_get("endpoint_id")?,
                    url: row.try_get("url")?,
                    event_types: row
                        .try_get::<Option<String>, _>("event_types")?
                        .map(|text| serde_json::from_str(&text))
                        .transpose()?,
                    secret: row.try_get("secret")?,
                    created_at: Timestamp::from_millis(row.try_get("endpoint_created_at")?),
                    updated_at: Timestamp::from_millis(row.try_get("endpoint_updated_at")?),
                },
                event: serde_json::from_str(&row.try_get::<String, _>("event_body")?)?,
            });
        }
        tx.commit().await?;
        Ok(jobs)
    }

    async fn pending_deliveries(&self, env: &Env, due_by: Timestamp) -> StoreResult<u64> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM webhook_deliveries WHERE tenant_id = ? AND environment = ? AND status = 'pending' AND next_attempt_at <= ?",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(millis(due_by))
        .fetch_one(&self.reader)
        .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn record_attempt(&self, attempt: &AttemptRecord) -> StoreResult<()> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query("SELECT endpoint_id, event_id FROM webhook_deliveries WHERE id = ?")
            .bind(attempt.delivery_id)
            .fetch_one(&mut *tx)
            .await?;
        let (endpoint_id, event_id): (String, String) =
            (row.try_get("endpoint_id")?, row.try_get("event_id")?);
        sqlx::query("INSERT INTO webhook_attempts (delivery_id, endpoint_id, event_id, attempt, status, response_status, error, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(attempt.delivery_id)
            .bind(&endpoint_id)
            .bind(&event_id)
            .bind(i64::from(attempt.attempt))
            .bind(if attempt.succeeded { "succeeded" } else { "failed" })
            .bind(attempt.response_status.map(i64::from))
            .bind(&attempt.error)
            .bind(millis(attempt.at))
            .execute(&mut *tx)
            .await?;
        let status = match (attempt.succeeded, attempt.retry_at) {
            (true, _) => "succeeded",
            (false, Some(_)) => "pending",
            (false, None) => "failed",
        };
        sqlx::query("UPDATE webhook_deliveries SET status = ?, attempts = ?, next_attempt_at = COALESCE(?, next_attempt_at), locked_until = 0 WHERE id = ?")
            .bind(status)
            .bind(i64::from(attempt.attempt))
            .bind(attempt.retry_at.map(millis))
            .bind(attempt.delivery_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn idempotency_begin(
        &self,
        env: &Env,
        key: &str,
        fingerprint: &[u8; 32],
        now: Timestamp,
        lease_ms: i64,
        keep_until: Timestamp,
    ) -> StoreResult<IdempotencyBegin> {
        // Leases that arrive together are taken in one transaction on the writer (by a
        // task of its own, so a caller that goes away cannot leave the writer changed; see
        // `take_leases`).
        let ask = LeaseAsk {
            env,
            key,
            fingerprint,
            now,
            lease_ms,
            keep_until,
        };
        queue_lease(&self.leases, (), ask, |guard| {
            let store = self.clone();
            tokio::spawn(async move { store.drain_leases(guard).await });
        })
        .await
    }

    async fn idempotency_finish(&self, env: &Env, answer: &IdempotencyAnswer) -> StoreResult<()> {
        let mut connection = self.writer.acquire().await?;
        finish_idempotency(&mut connection, env, answer).await
    }

    async fn idempotency_abandon(&self, env: &Env, key: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM idempotency WHERE tenant_id = ? AND environment = ? AND key = ? AND status IS NULL")
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(key)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn usage_keys(
        &self,
        env: &Env,
        keys: &[String],
    ) -> StoreResult<std::collections::BTreeMap<String, UsageKeyRecord>> {
        self.readers.read(|tx| read::usage_keys(tx, env, keys))
    }

    async fn purge_expired(&self, now: Timestamp) -> StoreResult<u64> {
        let idempotency = sqlx::query("DELETE FROM idempotency WHERE keep_until < ?")
            .bind(millis(now))
            .execute(&self.writer)
            .await?;
        // Oldest first, by rowid (no index on keep_until, migration 0007): up to the
        // first key still kept.
        let usage = sqlx::query(
            "DELETE FROM usage_keys WHERE keep_until < ?1 AND rowid < COALESCE(
                 (SELECT rowid FROM usage_keys WHERE keep_until >= ?1 ORDER BY rowid LIMIT 1),
                 (SELECT MAX(rowid) + 1 FROM usage_keys))",
        )
        .bind(millis(now))
        .execute(&self.writer)
        .await?;
        // A key kept longer than the keys after it (the retention was shortened since,
        // or a key recorded by the environment's clock before 2026-11-30, which a test
        // clock may have set far ahead) holds the oldest-first purge back. A sweep
        // reads the next `sweep_rows` keys each time, from where the last one stopped,
        // round and round, so every expired key goes within a round.
        let from = self.sweep.load(std::sync::atomic::Ordering::Relaxed);
        let reached: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(rowid) FROM (SELECT rowid FROM usage_keys WHERE rowid > ? ORDER BY rowid LIMIT ?)",
        )
        .bind(from)
        .bind(self.sweep_rows)
        .fetch_one(&self.writer)
        .await?;
        let swept = match reached {
            Some(to) => {
                let swept = sqlx::query(
                    "DELETE FROM usage_keys WHERE rowid > ? AND rowid <= ? AND keep_until < ?",
                )
                .bind(from)
                .bind(to)
                .bind(millis(now))
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
}

fn parse_state(text: &str) -> StoreResult<EndUserState> {
    let parts: StateParts = serde_json::from_str(text)?;
    EndUserState::from_parts(parts).map_err(|violation| corrupt(violation.to_string()))
}

/// An operation of a usage batch run before the write lock was taken (see
/// `mutate_many`).
struct Optimistic {
    old: EndUserState,
    head: Option<i64>,
    /// The feed position `old` is known to be current at (read or written there).
    basis: i64,
    state: EndUserState,
    /// What it wrote and the rows rendered from it; `None` if it failed.
    run: Option<(Vec<Changes>, Option<write::Staged>)>,
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
    let Lease {
        env,
        key,
        fingerprint,
        now,
        lease_ms,
        keep_until,
        ..
    } = lease;
    let row = sqlx::query("SELECT fingerprint, status, body, locked_until FROM idempotency WHERE tenant_id = ? AND environment = ? AND key = ?")
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
    let locked_until = now.as_millis().saturating_add(*lease_ms);
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
        sqlx::query("UPDATE idempotency SET locked_until = ? WHERE tenant_id = ? AND environment = ? AND key = ?")
            .bind(locked_until)
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(key)
            .execute(&mut *tx)
            .await?;
    } else {
        sqlx::query("INSERT INTO idempotency (tenant_id, environment, key, fingerprint, locked_until, keep_until) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(key)
            .bind(fingerprint.as_slice())
            .bind(locked_until)
            .bind(millis(*keep_until))
            .execute(&mut *tx)
            .await?;
    }
    Ok(IdempotencyBegin::Started)
}

async fn finish_idempotency(
    connection: &mut sqlx::SqliteConnection,
    env: &Env,
    answer: &IdempotencyAnswer,
) -> StoreResult<()> {
    sqlx::query("UPDATE idempotency SET status = ?, body = ? WHERE tenant_id = ? AND environment = ? AND key = ?")
        .bind(i64::from(answer.status))
        .bind(answer.body.as_slice())
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(&answer.key)
        .execute(connection)
        .await?;
    Ok(())
}

/// Appends an event to the environment's log and returns its position.
async fn insert_wire_event(
    tx: &mut Transaction<'_, Sqlite>,
    env: &Env,
    wire: &protocol::Event,
    end_user: Option<&str>,
) -> StoreResult<i64> {
    let created_at = wire.created_at.0;
    let result = sqlx::query("INSERT INTO events (id, tenant_id, environment, end_user_id, type, created_at, body) VALUES (?, ?, ?, ?, ?, ?, ?)")
        .bind(&wire.id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(end_user)
        .bind(&wire.event_type)
        .bind(millis(created_at))
        .bind(serde_json::to_string(wire)?)
        .execute(&mut **tx)
        .await?;
    Ok(result.last_insert_rowid())
}

/// Queues one event for one endpoint, due at once.
async fn insert_delivery(
    tx: &mut Transaction<'_, Sqlite>,
    env: &Env,
    endpoint_id: &str,
    event_id: &str,
    seq: i64,
    end_user: Option<&str>,
    now: Timestamp,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO webhook_deliveries (tenant_id, environment, endpoint_id, event_id, event_seq, end_user_id, status, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
    )
    .bind(&env.tenant_id)
    .bind(env.environment.as_str())
    .bind(endpoint_id)
    .bind(event_id)
    .bind(seq)
    .bind(end_user)
    .bind(millis(now))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The environment's endpoints that are not deleted.
async fn live_endpoints(
    connection: &mut sqlx::SqliteConnection,
    env: &Env,
) -> StoreResult<Vec<EndpointRecord>> {
    let rows = sqlx::query("SELECT * FROM webhook_endpoints WHERE tenant_id = ? AND environment = ? AND deleted_at IS NULL ORDER BY created_at, id")
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_all(connection)
        .await?;
    rows.iter()
        .map(|row| {
            Ok(EndpointRecord {
                id: row.try_get("id")?,
                url: row.try_get("url")?,
                event_types: row
                    .try_get::<Option<String>, _>("event_types")?
                    .map(|text| serde_json::from_str(&text))
                    .transpose()?,
                secret: row.try_get("secret")?,
                created_at: Timestamp::from_millis(row.try_get("created_at")?),
                updated_at: Timestamp::from_millis(row.try_get("updated_at")?),
            })
        })
        .collect()
}

/// Appends one entry to the change feed.
async fn insert_change(
    connection: &mut sqlx::SqliteConnection,
    env: &Env,
    end_user: Option<&str>,
    at: Timestamp,
) -> StoreResult<()> {
    sqlx::query("INSERT INTO changes (tenant_id, environment, kind, end_user_id, created_at) VALUES (?, ?, ?, ?, ?)")
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(if end_user.is_some() { "end_user" } else { "catalog" })
        .bind(end_user)
        .bind(millis(at))
        .execute(connection)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_millis(1_767_225_600_000);

    /// A store on a fresh SQLite file that fsyncs every commit, with its URL (to reopen
    /// it) and its directory (deleted when dropped).
    async fn file_store() -> (tempfile::TempDir, DatabaseUrl, SqliteStore) {
        let directory = tempfile::tempdir().expect("temp dir");
        let url = DatabaseUrl::SqliteFile(directory.path().join("store.db").display().to_string());
        let store = SqliteStore::open(&url, Synchronous::Full, 1)
            .await
            .expect("store");
        (directory, url, store)
    }

    async fn writer_synchronous(store: &SqliteStore) -> i64 {
        sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&store.writer)
            .await
            .expect("pragma")
    }

    // One batch answers each lease as if they had come one by one: a key repeated later
    // in the batch finds the first one's lease.
    #[tokio::test]
    async fn a_batch_of_leases_answers_each_in_order() {
        let (_directory, _, store) = file_store().await;
        let env = Env {
            tenant_id: "t".into(),
            environment: Environment::Test,
        };
        let lease = |key: &str, fingerprint: u8| Lease {
            env: env.clone(),
            key: key.into(),
            fingerprint: [fingerprint; 32],
            now: T0,
            lease_ms: 30_000,
            keep_until: T0,
            reply: tokio::sync::oneshot::channel().0,
        };
        let batch = [lease("a", 1), lease("b", 1), lease("a", 1), lease("a", 2)];
        let answers = store.take_leases(&batch).await.expect("batch");
        let kinds = crate::store::testing::kinds(&answers);
        assert_eq!(kinds, ["started", "started", "in flight", "mismatch"]);
        assert_eq!(writer_synchronous(&store).await, 2, "fsyncing again");
    }

    // Leases are written without an fsync, and the writer fsyncs again after every kind
    // of answer (started, in flight, mismatch, replay).
    #[tokio::test]
    async fn the_writer_fsyncs_again_after_a_lease() {
        let (_directory, _, store) = file_store().await;
        const FULL: i64 = 2;
        assert_eq!(writer_synchronous(&store).await, FULL);
        let env = Env {
            tenant_id: "t".into(),
            environment: Environment::Test,
        };
        let begin = |fingerprint: [u8; 32]| {
            let (store, env) = (store.clone(), env.clone());
            async move {
                store
                    .idempotency_begin(&env, "k", &fingerprint, T0, 30_000, T0)
                    .await
                    .expect("begin")
            }
        };
        assert!(matches!(begin([1; 32]).await, IdempotencyBegin::Started));
        assert_eq!(writer_synchronous(&store).await, FULL);
        assert!(matches!(begin([1; 32]).await, IdempotencyBegin::InFlight));
        assert_eq!(writer_synchronous(&store).await, FULL);
        assert!(matches!(begin([2; 32]).await, IdempotencyBegin::Mismatch));
        assert_eq!(writer_synchronous(&store).await, FULL);
        store
            .idempotency_finish(
                &env,
                &IdempotencyAnswer {
                    key: "k".into(),
                    status: 201,
                    body: b"{}".to_vec(),
                },
            )
            .await
            .expect("finish");
        assert!(matches!(
            begin([1; 32]).await,
            IdempotencyBegin::Replay { status: 201, .. }
        ));
        assert_eq!(writer_synchronous(&store).await, FULL);
    }

    async fn grant(store: &SqliteStore, env: &Env, end_user: &str, amount: i64) {
        let end_user = EndUserId::new(end_user).expect("end user id");
        crate::store::testing::grant(store, env, &end_user, amount, T0).await;
    }

    fn by_user(end_user: &str) -> EntryFilter {
        EntryFilter {
            end_user_id: Some(end_user.into()),
            limit: 100,
            ..EntryFilter::default()
        }
    }

    fn amounts(entries: &[(i64, protocol::LedgerEntry)]) -> Vec<i64> {
        entries.iter().map(|(_, entry)| entry.amount).collect()
    }

    /// `end_user`'s state kept by `store`, if any.
    fn kept(store: &SqliteStore, env: &Env, end_user: &str) -> Option<cache::Cached> {
        store.states.get_many(env, &[end_user]).pop().flatten()
    }

    /// `end_user`'s stored state and entries (newest first), after checking that the
    /// store kept exactly that state, with its chain's newest entry as head.
    async fn stored_and_kept(
        store: &SqliteStore,
        env: &Env,
        end_user: &str,
    ) -> (EndUserState, Vec<(i64, protocol::LedgerEntry)>) {
        let id = EndUserId::new(end_user).expect("end user id");
        let state = store
            .load_state(env, &id)
            .await
            .expect("state")
            .expect("stored");
        let entries = store
            .entries(env, &by_user(end_user))
            .await
            .expect("entries");
        let kept = kept(store, env, end_user).expect("kept");
        assert_eq!(*kept.state, state, "{end_user}'s kept state");
        assert_eq!(
            kept.head,
            entries.first().map(|(seq, _)| *seq),
            "{end_user}'s head"
        );
        (state, entries)
    }

    fn everyone() -> EntryFilter {
        EntryFilter {
            limit: 100,
            ..EntryFilter::default()
        }
    }

    // Entries written before migration 0005 (no chains) are chained by it, and the chains
    // go on from there; migration 0008 gives them their environment's runs, and 0009
    // carries them into a table without the index on their ids.
    #[tokio::test]
    async fn the_migration_chains_entries_written_before_it() {
        let env = Env {
            tenant_id: "t".into(),
            environment: Environment::Live,
        };
        let sandbox = Env {
            tenant_id: "t".into(),
            environment: Environment::Test,
        };
        // Rows as the store wrote them: made by today's store, copied into a database
        // migrated only up to 0004. The two environments' entries interleave.
        let (_made_directory, _, made) = file_store().await;
        for (on, end_user, amount) in [
            (&env, "u1", 5),
            (&sandbox, "u1", 3),
            (&env, "u2", 7),
            (&env, "u1", 9),
            (&sandbox, "u1", 4),
        ] {
            grant(&made, on, end_user, amount).await;
        }
        let entries: Vec<(String, String, String, String, String, i64, String)> = sqlx::query_as(
            "SELECT id, tenant_id, environment, end_user_id, type, created_at, body FROM entries ORDER BY seq",
        )
        .fetch_all(&made.reader)
        .await
        .expect("entries");
        let users: Vec<(String, String, String, String, i64, i64)> = sqlx::query_as(
            "SELECT tenant_id, environment, end_user_id, state, version, updated_at FROM end_users",
        )
        .fetch_all(&made.reader)
        .await
        .expect("end users");

        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("old.db");
        let old = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal),
            )
            .await
            .expect("old database");
        sqlx::migrate!("./migrations/sqlite")
            .run_to(4, &old)
            .await
            .expect("migrated to 0004");
        for (id, tenant, environment, end_user, entry_type, created_at, body) in &entries {
            sqlx::query("INSERT INTO entries (id, tenant_id, environment, end_user_id, type, created_at, body) VALUES (?, ?, ?, ?, ?, ?, ?)")
                .bind(id).bind(tenant).bind(environment).bind(end_user).bind(entry_type).bind(created_at).bind(body)
                .execute(&old)
                .await
                .expect("old entry");
        }
        // A number given to an entry no longer there: never given again.
        sqlx::query("INSERT INTO entries (id, tenant_id, environment, end_user_id, type, created_at, body) VALUES ('gone', 't', 'live', 'u1', 'grant', 0, '{}')")
            .execute(&old)
            .await
            .expect("entry");
        sqlx::query("DELETE FROM entries WHERE id = 'gone'")
            .execute(&old)
            .await
            .expect("deleted");
        for (tenant, environment, end_user, state, version, updated_at) in &users {
            sqlx::query("INSERT INTO end_users (tenant_id, environment, end_user_id, state, version, updated_at) VALUES (?, ?, ?, ?, ?, ?)")
                .bind(tenant).bind(environment).bind(end_user).bind(state).bind(version).bind(updated_at)
                .execute(&old)
                .await
                .expect("old end user");
        }
        old.close().await;

        let url = DatabaseUrl::SqliteFile(path.display().to_string());
        let store = SqliteStore::open(&url, Synchronous::Full, 1)
            .await
            .expect("migrated on open");
        assert_eq!(
            amounts(&store.entries(&env, &by_user("u1")).await.expect("u1")),
            [9, 5]
        );
        assert_eq!(
            amounts(&store.entries(&env, &by_user("u2")).await.expect("u2")),
            [7]
        );
        assert_eq!(
            amounts(&store.entries(&env, &everyone()).await.expect("live")),
            [9, 7, 5]
        );
        assert_eq!(
            amounts(&store.entries(&sandbox, &everyone()).await.expect("test")),
            [4, 3]
        );
        grant(&store, &env, "u1", 11).await;
        assert_eq!(
            amounts(&store.entries(&env, &by_user("u1")).await.expect("u1")),
            [11, 9, 5]
        );
        assert_eq!(
            amounts(&store.entries(&env, &everyone()).await.expect("live")),
            [11, 9, 7, 5]
        );
        let runs: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT environment, first_seq, last_seq FROM entry_runs ORDER BY first_seq",
        )
        .fetch_all(&store.reader)
        .await
        .expect("runs");
        assert_eq!(
            runs.iter()
                .map(|(environment, ..)| environment.as_str())
                .collect::<Vec<_>>(),
            ["live", "test", "live", "test", "live"],
            "{runs:?}"
        );
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'entries'",
        )
        .fetch_all(&store.reader)
        .await
        .expect("indexes");
        // No index by end user (0005), by environment (0008) or by id (0009).
        assert!(indexes.is_empty(), "{indexes:?}");
        // The rebuilt table (0009) carried every entry and AUTOINCREMENT's record on.
        let (recorded, highest, count): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT seq FROM sqlite_sequence WHERE name = 'entries'), (SELECT MAX(seq) FROM entries), (SELECT COUNT(*) FROM entries)",
        )
        .fetch_one(&store.reader)
        .await
        .expect("sequence");
        assert_eq!((recorded, highest, count), (7, 7, 6));
    }

    // A long chain is walked across statements: pages that follow their cursors, a time
    // filter only the oldest entries pass, a type no entry has, a cursor naming another
    // end user's entry. Every answer is compared with the same question asked of the
    // table directly.
    #[tokio::test]
    async fn a_long_chain_is_walked_with_filters_and_cursors() {
        // Without an fsync per commit: this test makes hundreds of grants (each a block,
        // so keep them few: every grant writes the whole, growing state).
        let directory = tempfile::tempdir().expect("temp dir");
        let url = DatabaseUrl::SqliteFile(directory.path().join("chain.db").display().to_string());
        let store = SqliteStore::open(&url, Synchronous::Normal, 1)
            .await
            .expect("store");
        let env = Env {
            tenant_id: "t".into(),
            environment: Environment::Live,
        };
        // More than one statement's worth of links (CHAIN_STEPS), one millisecond apart.
        let count = 600_i64;
        let (long, other) = (
            EndUserId::new("long").expect("id"),
            EndUserId::new("other").expect("id"),
        );
        let sandbox = Env {
            tenant_id: "t".into(),
            environment: Environment::Test,
        };
        for amount in 1..=count {
            let at = T0
                .checked_add(ledger::Span::from_millis(amount))
                .expect("time");
            crate::store::testing::grant(&store, &env, &long, amount, at).await;
            if amount % 50 == 0 {
                crate::store::testing::grant(&store, &env, &other, amount, at).await;
            }
            if amount % 7 == 0 {
                crate::store::testing::grant(&store, &sandbox, &other, amount, at).await;
            }
            if amount % 100 == 0 {
                // Runs of several entries too, as a usage batch writes them.
                crate::store::testing::grant_many(&store, &env, &["b1", "b2", "b3"], amount, at)
                    .await;
            }
        }
        // The environment-wide listing walks runs and entries in order, without a sort.
        let plan: Vec<String> = {
            let connection =
                rusqlite::Connection::open(directory.path().join("chain.db")).expect("open");
            let mut statement = connection
                .prepare(&format!("EXPLAIN QUERY PLAN {ENVIRONMENT_ENTRIES}"))
                .expect("plan");
            statement
                .query_map(
                    rusqlite::params![
                        "t",
                        "live",
                        i64::MAX,
                        None::<String>,
                        None::<i64>,
                        None::<i64>,
                        10
                    ],
                    |row| row.get::<_, String>(3),
                )
                .expect("plan")
                .collect::<Result<_, _>>()
                .expect("plan")
        };
        assert!(
            !plan.is_empty() && plan.iter().all(|step| !step.contains("TEMP B-TREE")),
            "{plan:?}"
        );
        // The environment-wide listing (its runs of entries) against the table, with
        // cursors in and between runs and filters, for both environments.
        for (on, name) in [(&env, "live"), (&sandbox, "test")] {
            let all: Vec<(i64, String, i64)> = sqlx::query_as(
                "SELECT seq, type, created_at FROM entries WHERE environment = ? ORDER BY seq DESC",
            )
            .bind(name)
            .fetch_all(&store.reader)
            .await
            .expect("all");
            let middle_created = all[all.len() / 2].2;
            // `all[1]` is inside the newest batch's run of three in the live environment.
            for before in [
                None,
                Some(all[1].0),
                Some(all[3].0),
                Some(all[all.len() / 3].0 + 1),
                Some(1),
            ] {
                for (entry_type, from, to) in [
                    (None, None, None),
                    (Some("grant"), Some(middle_created), None),
                    (None, None, Some(middle_created)),
                    (Some("debit"), None, None),
                ] {
                    for limit in [1_u32, 7, 500] {
                        let filter = EntryFilter {
                            entry_type: entry_type.map(str::to_owned),
                            from: from.map(Timestamp::from_millis),
                            to: to.map(Timestamp::from_millis),
                            before_seq: before,
                            limit,
                            ..EntryFilter::default()
                        };
                        let expected: Vec<i64> = all
                            .iter()
                            .filter(|(seq, kind, created_at)| {
                                before.is_none_or(|before| *seq < before)
                                    && entry_type.is_none_or(|wanted| kind == wanted)
                                    && from.is_none_or(|from| *created_at >= from)
                                    && to.is_none_or(|to| *created_at < to)
                            })
                            .map(|(seq, ..)| *seq)
                            .take(usize::try_from(limit).expect("small"))
                            .collect();
                        let listed: Vec<i64> = store
                            .entries(on, &filter)
                            .await
                            .expect("listed")
                            .iter()
                            .map(|(seq, _)| *seq)
                            .collect();
                        assert_eq!(listed, expected, "{name}, {filter:?}");
                    }
                }
            }
        }
        // (seq, created_at, amount) of every entry of `long`, newest first.
        let truth: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT seq, created_at, body ->> '$.amount' FROM entries WHERE end_user_id = 'long' ORDER BY seq DESC",
        )
        .fetch_all(&store.reader)
        .await
        .expect("truth");
        let seqs = |entries: &[(i64, protocol::LedgerEntry)]| -> Vec<i64> {
            entries.iter().map(|(seq, _)| *seq).collect()
        };
        let first_page = store.entries(&env, &by_user("long")).await.expect("page");
        assert_eq!(
            amounts(&first_page),
            (count - 99..=count).rev().collect::<Vec<_>>()
        );

        // Follow the cursor to the end: every entry once, newest first.
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let mut filter = by_user("long");
            filter.limit = 500;
            filter.before_seq = cursor;
            let page = store.entries(&env, &filter).await.expect("page");
            let Some((last, _)) = page.last() else { break };
            cursor = Some(*last);
            seen.extend(amounts(&page));
        }
        assert_eq!(seen, (1..=count).rev().collect::<Vec<_>>());

        // A time filter that only the two oldest entries pass: the whole chain is walked.
        let oldest_created = truth.last().expect("entries").1;
        let mut filter = by_user("long");
        filter.to = Some(Timestamp::from_millis(oldest_created.saturating_add(2)));
        let expected: Vec<i64> = truth
            .iter()
            .filter(|(_, created_at, _)| *created_at < oldest_created.saturating_add(2))
            .map(|(seq, ..)| *seq)
            .collect();
        assert_eq!(expected.len(), 2);
        assert_eq!(
            seqs(&store.entries(&env, &filter).await.expect("filtered")),
            expected
        );
        // And `from` with it: only the second oldest.
        filter.from = Some(Timestamp::from_millis(oldest_created.saturating_add(1)));
        assert_eq!(
            seqs(&store.entries(&env, &filter).await.expect("filtered")),
            expected[..1]
        );

        let mut filter = by_user("long");
        filter.entry_type = Some("debit".into());
        assert!(store.entries(&env, &filter).await.expect("none").is_empty());

        // A filter every entry passes, with a cursor of the same end user, for more links
        // than one statement reads.
        let mut filter = by_user("long");
        filter.entry_type = Some("grant".into());
        filter.before_seq = Some(truth[49].0);
        filter.limit = 600;
        let expected: Vec<i64> = truth.iter().map(|(seq, ..)| *seq).skip(50).collect();
        assert!(expected.len() > usize::try_from(CHAIN_STEPS).expect("small"));
        assert_eq!(
            seqs(&store.entries(&env, &filter).await.expect("page")),
            expected
        );

        // The writer numbered the entries itself and kept AUTOINCREMENT's record.
        let (recorded, highest): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT seq FROM sqlite_sequence WHERE name = 'entries'), (SELECT MAX(seq) FROM entries)",
        )
        .fetch_one(&store.reader)
        .await
        .expect("sequence");
        assert_eq!(recorded, highest);

        // A cursor naming another end user's entry: the walk starts at the newest and
        // skips what is not older than it.
        let others = store.entries(&env, &by_user("other")).await.expect("other");
        let (middle, _) = others[others.len() / 2];
        let mut filter = by_user("long");
        filter.before_seq = Some(middle);
        let expected: Vec<i64> = truth
            .iter()
            .map(|(seq, ..)| *seq)
            .filter(|seq| *seq < middle)
            .take(100)
            .collect();
        assert_eq!(
            seqs(&store.entries(&env, &filter).await.expect("page")),
            expected
        );
    }
    // A chain that loops (a link to a newer entry) or names a missing entry is reported
    // as corruption instead of walked forever or cut short.
    #[tokio::test]
    async fn a_broken_chain_is_reported() {
        let (_directory, _, store) = file_store().await;
        let env = Env {
            tenant_id: "t".into(),
            environment: Environment::Live,
        };
        for amount in [1, 2, 3] {
            grant(&store, &env, "u1", amount).await;
        }
        let newest: i64 = sqlx::query_scalar("SELECT MAX(seq) FROM entries")
            .fetch_one(&store.reader)
            .await
            .expect("newest");
        let mut filter = by_user("u1");
        filter.entry_type = Some("debit".into());
        sqlx::query("UPDATE entries SET prev_seq = ? WHERE seq = (SELECT MIN(seq) FROM entries)")
            .bind(newest)
            .execute(&store.writer)
            .await
            .expect("loop made");
        let error = store.entries(&env, &filter).await.expect_err("a loop");
        assert!(error.to_string().contains("newer"), "{error}");

        sqlx::query("UPDATE end_users SET last_entry_seq = ?")
            .bind(newest.saturating_add(100))
            .execute(&store.writer)
            .await
            .expect("dangling head");
        let error = store
            .entries(&env, &by_user("u1"))
            .await
            .expect_err("missing");
        assert!(error.to_string().contains("does not exist"), "{error}");
    }

    /// A usage batch whose operation for `u1` saw a state that another writer changed
    /// before the batch took the write lock: that other write commits from inside the
    /// batch's first run of the operation (before the lock is taken). The operation
    /// grants 10 but refuses while nothing is available, as a strict debit would.
    /// Who makes the concurrent write of `batch_over_a_concurrent_write`.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Concurrent {
        /// This store (the batch's own writer and direct connection).
        ThisStore,
        /// This store, which then purges the whole change feed.
        ThisStorePurging,
        /// This store, in a batch over two end users (one feed row names both).
        ThisStoreBatch,
        /// A second store on the same file, as another process would be: its own writer
        /// and direct connection, SQLite's file lock between them.
        OtherStore,
    }

    /// `initial` is granted first, by a batch when `cached` (so that the batch finds
    /// `u1`'s state in this store's cache rather than reading it) and by a single
    /// `mutate` otherwise.
    async fn batch_over_a_concurrent_write(
        initial: Option<i64>,
        cached: bool,
        concurrent: Concurrent,
    ) -> (i64, usize, usize) {
        let (_directory, url, store) = file_store().await;
        let env = Env {
            tenant_id: "t".into(),
            environment: Environment::Live,
        };
        match initial {
            Some(amount) if cached => {
                crate::store::testing::grant_many(&store, &env, &["u1"], amount, T0).await;
                assert!(kept(&store, &env, "u1").is_some(), "u1's state kept");
            }
            Some(amount) => grant(&store, &env, "u1", amount).await,
            None => {}
        }
        let catalog = ledger::Catalog::default();
        let runs = std::sync::atomic::AtomicUsize::new(0);
        let mut operation = |state: &mut EndUserState| -> StoreResult<Vec<Changes>> {
            if runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                let (store, env, url) = (store.clone(), env.clone(), url.clone());
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    runtime.block_on(async {
                        let writer = if concurrent == Concurrent::OtherStore {
                            SqliteStore::open(&url, Synchronous::Full, 1)
                                .await
                                .expect("second store")
                        } else {
                            store
                        };
                        if concurrent == Concurrent::ThisStoreBatch {
                            crate::store::testing::grant_many(&writer, &env, &["u0", "u1"], 5, T0)
                                .await;
                        } else {
                            grant(&writer, &env, "u1", 5).await;
                        }
                        if concurrent == Concurrent::ThisStorePurging {
                            // The whole feed, the grant's entry included.
                            writer
                                .purge_changes(Timestamp::from_millis(i64::MAX))
                                .await
                                .expect("purge");
                        }
                    });
                })
                .join()
                .expect("concurrent grant");
            }
            let mut ids = crate::clock::UlidSource::at(T0);
            let mut cx = ledger::Cx {
                now: T0,
                catalog: &catalog,
                ids: &mut ids,
            };
            let available = state
                .available(None, T0)
                .map_err(|_| StoreError::Declined)?;
            if available.is_zero() {
                return Err(StoreError::Declined);
            }
            let applied = state
                .grant(&mut cx, ledger::GrantRequest::new(ledger::Credits::new(10)))
                .map_err(|_| StoreError::Declined)?;
            Ok(vec![Changes::from_applied(applied).1])
        };
        let end_user = EndUserId::new("u1").expect("end user id");
        store
            .mutate_many(&env, T0, &mut [(end_user.clone(), &mut operation)])
            .await
            .expect("batch");
        // The batch kept what it wrote: the stored state and its chain's newest entry.
        let (state, entries) = stored_and_kept(&store, &env, end_user.as_str()).await;
        (
            state.available(None, T0).expect("available").get(),
            entries.len(),
            runs.load(std::sync::atomic::Ordering::SeqCst),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_reruns_an_operation_whose_state_changed_before_the_lock() {
        // 1 + 5 from the concurrent grant + 10 from the batch, each with its entry: the
        // batch did not overwrite the concurrent write with a state computed before it.
        for cached in [false, true] {
            for concurrent in [
                Concurrent::ThisStore,
                // The feed that would name the concurrent write purged meanwhile.
                Concurrent::ThisStorePurging,
                Concurrent::ThisStoreBatch,
                Concurrent::OtherStore,
            ] {
                assert_eq!(
                    batch_over_a_concurrent_write(Some(1), cached, concurrent).await,
                    (16, 3, 2),
                    "{concurrent:?}, cached: {cached}"
                );
            }
        }
    }

    /// A batch on end users whose states this store kept: no read, the states and
    /// their chains carried on from the kept ones; a state kept by an older
    /// transaction never replaces a newer one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_runs_on_the_states_it_kept() {
        let (_directory, _, store) = file_store().await;
        let env = Env {
            tenant_id: "t".into(),
            environment: Environment::Live,
        };
        for _ in 0..3 {
            crate::store::testing::grant_many(&store, &env, &["u1", "u2"], 2, T0).await;
        }
        for end_user in ["u1", "u2"] {
            let (state, entries) = stored_and_kept(&store, &env, end_user).await;
            assert_eq!(state.available(None, T0).expect("available").get(), 6);
            assert_eq!(entries.len(), 3, "{end_user}'s chain");
            // An older transaction's state, kept late, is ignored.
            let at = kept(&store, &env, end_user).expect("kept").at;
            let older = EndUserState::new(state.end_user_id().clone(), T0);
            store.states.put_many(&env, at - 1, [(older, None)]);
            assert_eq!(kept(&store, &env, end_user).map(|kept| kept.at), Some(at));
        }
        // The batch runs on the kept state itself (no read): a state planted in the
        // cache at its position, 100 credits richer than the stored one, is what the
        // next batch builds on.
        let current = kept(&store, &env, "u1").expect("kept");
        let mut planted = current.state.as_ref().clone();
        crate::store::testing::grant_to(&mut planted, 100, T0).expect("grant");
        store
            .states
            .put_many(&env, current.at, [(planted, current.head)]);
        crate::store::testing::grant_many(&store, &env, &["u1"], 2, T0).await;
        let u1 = EndUserId::new("u1").expect("end user id");
        let state = store
            .load_state(&env, &u1)
            .await
            .expect("state")
            .expect("stored");
        assert_eq!(state.available(None, T0).expect("available").get(), 108);
        // A batch that writes nothing for an end user forgets its kept state.
        let mut nothing = |_: &mut EndUserState| -> StoreResult<Vec<Changes>> { Ok(Vec::new()) };
        store
            .mutate_many(&env, T0, &mut [(u1, &mut nothing)])
            .await
            .expect("batch");
        assert!(kept(&store, &env, "u1").is_none());
        // Another environment's end user of the same id is not this one.
        let other = Env {
            tenant_id: "t".into(),
            environment: Environment::Test,
        };
        assert!(kept(&store, &other, "u1").is_none());
    }

    /// Usage keys are purged oldest first up to the first one still kept; a key kept
    /// longer than the ones after it does not hold them back for long: the sweep,
    /// `sweep_rows` keys a time, takes them (and never a key still kept).
    #[tokio::test]
    async fn usage_keys_are_purged_oldest_first() {
        let (_directory, _, mut store) = file_store().await;
        store.sweep_rows = 2;
        for (key, keep_until) in [("a", 10), ("b", 30), ("c", 20), ("d", 40), ("e", 15)] {
            sqlx::query("INSERT INTO usage_keys (tenant_id, environment, key, fingerprint, entry_id, result, keep_until) VALUES ('t', 'live', ?, x'00', 'led', '{}', ?)")
                .bind(key)
                .bind(keep_until)
                .execute(&store.writer)
                .await
                .expect("key");
        }
        let left = || async {
            sqlx::query_scalar::<_, String>("SELECT key FROM usage_keys ORDER BY rowid")
                .fetch_all(&store.writer)
                .await
                .expect("keys")
        };
        let purge = |at: i64| store.purge_expired(Timestamp::from_millis(at));
        // Nothing expired (the sweep reads a and b).
        assert_eq!(purge(5).await.expect("purge"), 0);
        // a oldest first, b stops that; the sweep reads c and d: c goes.
        assert_eq!(purge(25).await.expect("purge"), 2);
        assert_eq!(left().await, ["b", "d", "e"]);
        // The sweep reads e, then starts over.
        assert_eq!(purge(25).await.expect("purge"), 1);
        assert_eq!(left().await, ["b", "d"]);
        assert_eq!(purge(25).await.expect("purge"), 0);
        assert_eq!(purge(35).await.expect("purge"), 1);
        assert_eq!(left().await, ["d"]);
        assert_eq!(purge(50).await.expect("purge"), 1);
        assert!(left().await.is_empty());
        assert_eq!(purge(60).await.expect("purge"), 0);
    }

    /// A kept state that another path of this store (a single operation, which keeps
    /// nothing) or another process wrote over since is not used: the batch reruns on the
    /// stored state, and keeps what it wrote then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_state_written_over_since_is_not_used() {
        let (_directory, url, store) = file_store().await;
        let other = SqliteStore::open(&url, Synchronous::Full, 1)
            .await
            .expect("second store");
        let env = Env {
            tenant_id: "t".into(),
            environment: Environment::Live,
        };
        let batch =
            |amount: i64| crate::store::testing::grant_many(&store, &env, &["u1"], amount, T0);
        batch(1).await;
        grant(&store, &env, "u1", 10).await;
        batch(100).await;
        grant(&other, &env, "u1", 1_000).await;
        batch(10_000).await;
        let (state, entries) = stored_and_kept(&store, &env, "u1").await;
        assert_eq!(state.available(None, T0).expect("available").get(), 11_111);
        assert_eq!(amounts(&entries), [10_000, 1_000, 100, 10, 1]);
    }

    /// A state past `cache::KEPT_PARTS` blocks is read each time, not kept: the cache's
    /// memory stays bounded by its count of end users.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_state_is_not_kept() {
        let (_directory, _, store) = file_store().await;
        let env = Env {
            tenant_id: "t".into(),
            environment: Environment::Live,
        };
        // Each grant is a block of its own.
        for _ in 0..64 {
            crate::store::testing::grant_many(&store, &env, &["u1"], 1, T0).await;
        }
        assert!(kept(&store, &env, "u1").is_some());
        crate::store::testing::grant_many(&store, &env, &["u1"], 1, T0).await;
        assert!(kept(&store, &env, "u1").is_none());
        let id = EndUserId::new("u1").expect("end user id");
        let state = store
            .load_state(&env, &id)
            .await
            .expect("state")
            .expect("stored");
        assert_eq!(state.blocks().len(), 65);
        // The next batch reads it, and still does not keep it.
        crate::store::testing::grant_many(&store, &env, &["u1"], 1, T0).await;
        assert!(kept(&store, &env, "u1").is_none());
        let entries = store.entries(&env, &by_user("u1")).await.expect("entries");
        assert_eq!(entries.len(), 66);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_reruns_an_operation_refused_on_a_stale_state() {
        // Refused on the state read first (nothing available), granted on the state the
        // concurrent grant left.
        for concurrent in [Concurrent::ThisStore, Concurrent::OtherStore] {
            assert_eq!(
                batch_over_a_concurrent_write(None, false, concurrent).await,
                (15, 2, 2),
                "{concurrent:?}"
            );
        }
    }
}
