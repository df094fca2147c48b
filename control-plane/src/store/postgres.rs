//! The PostgreSQL store: one connection pool shared by every control-plane process on the
//! database, behaving exactly like the SQLite store (`store/sqlite.rs`) but without its
//! single writer. Migrations are in `migrations/postgres/`.
//!
//! # Concurrency
//!
//! Transactions run at READ COMMITTED; what SQLite gets from its one writer is made
//! explicit with row locks:
//!
//! - **Mutations of one end user are serialised** across connections and processes by
//!   that end user's `end_users` row, locked `FOR UPDATE` before the state is read (an
//!   unknown end user first gets a placeholder row, `INSERT … ON CONFLICT DO NOTHING`,
//!   whose uncommitted insert makes a concurrent first mutation wait for it). Mutations of
//!   different end users lock different rows and never wait for each other.
//! - **The event log and the change feed never skip.** A reader pages by cursor (`seq >
//!   cursor`), so a row must never become visible after a row with a higher `seq` was
//!   seen. A PostgreSQL sequence does not promise that: it numbers rows when they are
//!   inserted, and transactions commit in any order. Here each environment has one row in
//!   `feed_heads` holding the last event and change positions. A transaction that appends
//!   events or changes updates its environment's row (an upsert that adds what it needs
//!   and returns the new totals) as its *last* step before commit and numbers its rows
//!   from it. That row lock is held until commit, and PostgreSQL makes a transaction
//!   visible before it releases its locks, so the next transaction to number rows in that
//!   environment does so only after every lower number is committed and visible: `seq`
//!   order is commit order within an environment. Any snapshot that sees a row therefore
//!   sees every row below it. The lock covers only the final inserts and the commit, and
//!   only appenders to the same environment wait for it (as every write waits for
//!   SQLite's writer). We chose this over the `pg_snapshot_xmin` visibility technique
//!   because readers stay plain `seq > cursor` queries, cursors stay dense per
//!   environment, and a long transaction elsewhere cannot hold every feed back.
//!   Positions are numbered per environment (SQLite numbers them across the database);
//!   cursors are opaque, so only their order matters.
//! - **Idempotency keys** are claimed with `INSERT … ON CONFLICT DO NOTHING` on the
//!   primary key: of two first requests one inserts, the other waits for it and then reads
//!   its row `FOR UPDATE`.
//! - **Webhook deliveries** are claimed `FOR UPDATE SKIP LOCKED` and leased by
//!   `locked_until` in the same transaction, so two replicas never take the same delivery
//!   while its lease holds.
//!
//! Lock order: an end user's row, then (last) the environment's feed head. Nothing takes
//! them the other way round, so mutations cannot deadlock each other.

use std::collections::BTreeMap;
use std::str::FromStr;

use async_trait::async_trait;
use ledger::{Block, EndUserId, EndUserState, Reservation, StateParts, Subscription, Timestamp};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgConnection, PgPool, Row};

use super::{
    Annotations, ApiKeyRecord, AttemptRecord, BlockRow, CLAIM_LEASE_MS, CatalogRecord,
    ChangeRecord, Changes, Claim, ClaimingFn, DeliveryJob, DeliveryLease, EndpointRecord,
    EntryFilter, EntryRow, Env, EnvRecord, Environment, EventRecord, IdempotencyAnswer,
    IdempotencyBegin, LEASES_PER_TRANSACTION, Lease, LeaseAsk, LeaseFilter, MutateFn, StateRow,
    Store, StoreError, StoreResult, StoredBlock, TenantRecord, UsageKeyRecord, answer_leases,
    claimed_flags, claims_to_insert, queue_lease, stage_rows, unchanged, user_key,
};
use crate::queues::{DrainGuard, Queues};

/// How many times `idempotency_begin` looks again when the row it conflicted with is
/// deleted (abandoned or purged) before it can read it. Each retry follows a committed
/// delete, so more than a couple means something is wrong.
const IDEMPOTENCY_ATTEMPTS_MAX: u32 = 3;

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Idempotency leases waiting, by environment, taken together (see
    /// `idempotency_begin`).
    leases: std::sync::Arc<Queues<Env, Lease>>,
}

fn millis(value: Timestamp) -> i64 {
    value.as_millis()
}

fn corrupt(message: impl Into<String>) -> StoreError {
    StoreError::Corrupt(message.into())
}

fn environment(row: &PgRow) -> StoreResult<Environment> {
    let text: String = row.try_get("environment")?;
    Environment::parse(&text).ok_or_else(|| corrupt(format!("environment `{text}`")))
}

fn unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database) if database.is_unique_violation())
}

/// `LIMIT` takes a BIGINT (sqlx encodes no unsigned integers for PostgreSQL).
fn limit(value: u32) -> i64 {
    i64::from(value)
}

fn end_user_id(text: &str) -> StoreResult<EndUserId> {
    EndUserId::new(text).map_err(|error| corrupt(format!("end user id `{text}`: {error}")))
}

impl PostgresStore {
    /// Connects to the database at `url` with a pool of up to `max_connections` and runs
    /// the migrations (several processes starting at once take turns: sqlx holds an
    /// advisory lock while migrating).
    ///
    /// # Errors
    /// [`StoreError`] when the URL does not parse, the server cannot be reached or the
    /// migrations fail.
    pub async fn open(url: &str, max_connections: u32) -> StoreResult<PostgresStore> {
        let options = PgConnectOptions::from_str(url)?.application_name("quotastack-control-plane");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|error| StoreError::Fatal(format!("migrations failed: {error}")))?;
        Ok(PostgresStore {
            pool,
            leases: std::sync::Arc::default(),
        })
    }

    async fn catalog_insert<T: serde::Serialize + Sync>(
        &self,
        env: &Env,
        kind: &str,
        record: &CatalogRecord<T>,
    ) -> StoreResult<()> {
        let body = serde_json::to_string(&record.body)?;
        let result = sqlx::query(
            "INSERT INTO catalog (id, tenant_id, environment, kind, key, parent_id, body, archived, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
        .execute(&self.pool)
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
        let result = sqlx::query("UPDATE catalog SET body = $1 WHERE id = $2 AND tenant_id = $3 AND environment = $4 AND kind = $5")
            .bind(serde_json::to_string(&record.body)?)
            .bind(&record.id)
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(kind)
            .execute(&self.pool)
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
             WHERE tenant_id = $1 AND environment = $2 AND kind = $3 ORDER BY seq",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(kind)
        .fetch_all(&self.pool)
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

fn api_key_from_row(row: &PgRow) -> StoreResult<ApiKeyRecord> {
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

async fn insert_key(connection: &mut PgConnection, key: &ApiKeyRecord) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, environment, name, scopes, prefix, key_hash, created_at, revoked_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
    .execute(connection)
    .await?;
    Ok(())
}

fn endpoint_from_row(row: &PgRow) -> StoreResult<EndpointRecord> {
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
}

#[async_trait]
impl Store for PostgresStore {
    async fn create_tenant(&self, tenant: &TenantRecord, keys: &[ApiKeyRecord]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&tenant.id)
            .bind(&tenant.name)
            .bind(millis(tenant.created_at))
            .execute(&mut *tx)
            .await?;
        for environment in [Environment::Live, Environment::Test] {
            sqlx::query(
                "INSERT INTO environments (tenant_id, environment, settings) VALUES ($1, $2, $3)",
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
        let row = sqlx::query("SELECT * FROM api_keys WHERE key_hash = $1")
            .bind(hash.as_slice())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(api_key_from_row).transpose()
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        let mut connection = self.pool.acquire().await?;
        insert_key(&mut connection, key).await
    }

    async fn list_api_keys(&self, env: &Env) -> StoreResult<Vec<ApiKeyRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM api_keys WHERE tenant_id = $1 AND environment = $2 ORDER BY created_at, id",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(api_key_from_row).collect()
    }

    async fn revoke_api_key(
        &self,
        env: &Env,
        id: &str,
        at: Timestamp,
    ) -> StoreResult<Option<ApiKeyRecord>> {
        // One statement: the row as revoked (the first revocation's time is kept).
        let row = sqlx::query(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1)
             WHERE id = $2 AND tenant_id = $3 AND environment = $4 RETURNING *",
        )
        .bind(millis(at))
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(api_key_from_row).transpose()
    }

    async fn env_record(&self, env: &Env) -> StoreResult<EnvRecord> {
        let row = sqlx::query(
            "SELECT settings, clock_offset_ms FROM environments WHERE tenant_id = $1 AND environment = $2",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.pool)
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
            "INSERT INTO environments (tenant_id, environment, settings) VALUES ($1, $2, $3)
             ON CONFLICT (tenant_id, environment) DO UPDATE SET settings = excluded.settings",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(serde_json::to_string(settings)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn advance_clock(&self, env: &Env, step_ms: i64) -> StoreResult<i64> {
        let row = sqlx::query(
            "INSERT INTO environments (tenant_id, environment, settings, clock_offset_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant_id, environment) DO UPDATE SET clock_offset_ms = environments.clock_offset_ms + excluded.clock_offset_ms
             RETURNING clock_offset_ms",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(serde_json::to_string(&protocol::Settings::default())?)
        .bind(step_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("clock_offset_ms")?)
    }

    async fn put_env_record(&self, env: &Env, record: &EnvRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO environments (tenant_id, environment, settings, clock_offset_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant_id, environment) DO UPDATE SET settings = excluded.settings, clock_offset_ms = excluded.clock_offset_ms",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(serde_json::to_string(&record.settings)?)
        .bind(record.clock_offset_ms)
        .execute(&self.pool)
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
        let result = sqlx::query(
            "UPDATE catalog SET archived = $1 WHERE id = $2 AND tenant_id = $3 AND environment = $4 AND kind = 'variant'",
        )
        .bind(archived)
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    async fn environments(&self) -> StoreResult<Vec<(Env, i64)>> {
        let rows = sqlx::query(
            "SELECT tenant_id, environment, clock_offset_ms FROM environments ORDER BY tenant_id, environment",
        )
        .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let old = lock_state(&mut tx, env, end_user, now)
            .await?
            .unwrap_or_else(|| EndUserState::new(end_user.clone(), now));
        let claimed = claim_keys(&mut tx, env, claims).await?;
        let mut state = old.clone();
        let changes = match operation(&mut state, &claimed) {
            Ok(changes) if !changes.is_empty() => changes,
            outcome => {
                // At once rather than when the pool next pings the connection: the end
                // user's row stays locked until the rollback reaches the server (and a
                // placeholder row for a new end user is not kept).
                if let Err(rollback) = tx.rollback().await {
                    tracing::warn!(error = %rollback, "rolling back a refused mutation failed");
                }
                outcome?;
                return unchanged(&old, &state);
            }
        };
        persist(&mut tx, env, &old, &state, &changes, now).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    async fn mutate_many(
        &self,
        env: &Env,
        now: Timestamp,
        items: &mut [(EndUserId, &mut MutateFn<'_>)],
    ) -> StoreResult<()> {
        // Every end user's row is locked (in id order, by one statement) and every
        // operation run before the first write: writing appends to the feeds, which takes
        // the environment's feed head, and the lock order must stay end user rows, then
        // feed head.
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let ids: Vec<&str> = items
            .iter()
            .map(|(end_user, _)| end_user.as_str())
            .collect();
        let mut stored = lock_states(&mut tx, env, &ids, now).await?;
        let mut results = Vec::with_capacity(items.len());
        for (end_user, operation) in items.iter_mut() {
            let old = stored
                .remove(end_user.as_str())
                .flatten()
                .unwrap_or_else(|| EndUserState::new(end_user.clone(), now));
            let mut state = old.clone();
            match operation(&mut state) {
                Ok(changes) => results.push((old, state, changes)),
                Err(error) => {
                    if let Err(rollback) = tx.rollback().await {
                        tracing::warn!(error = %rollback, "rolling back a refused batch failed");
                    }
                    return Err(error);
                }
            }
        }
        let mut rows = Rows::default();
        for (old, state, changes) in &results {
            rows.stage(&mut tx, env, old, state, changes).await?;
        }
        rows.flush(&mut tx, env, now).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    async fn load_state(
        &self,
        env: &Env,
        end_user: &EndUserId,
    ) -> StoreResult<Option<EndUserState>> {
        let row = sqlx::query(
            "SELECT state FROM end_users WHERE tenant_id = $1 AND environment = $2 AND end_user_id = $3",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(end_user.as_str())
        .fetch_optional(&self.pool)
        .await?;
        state_of(row)
    }

    async fn due_end_users(
        &self,
        env: &Env,
        now: Timestamp,
        limit_len: u32,
    ) -> StoreResult<Vec<(EndUserId, Timestamp)>> {
        let rows = sqlx::query(
            "SELECT end_user_id, next_due_at FROM end_users WHERE tenant_id = $1 AND environment = $2 AND next_due_at IS NOT NULL AND next_due_at <= $3
             ORDER BY next_due_at LIMIT $4",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(millis(now))
        .bind(limit(limit_len))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("end_user_id")?;
                let due = Timestamp::from_millis(row.try_get("next_due_at")?);
                Ok((end_user_id(&id)?, due))
            })
            .collect()
    }

    async fn postpone_due(
        &self,
        env: &Env,
        end_user: &EndUserId,
        at: Timestamp,
    ) -> StoreResult<()> {
        sqlx::query("UPDATE end_users SET next_due_at = $1 WHERE tenant_id = $2 AND environment = $3 AND end_user_id = $4 AND next_due_at < $1")
            .bind(millis(at))
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(end_user.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn block(&self, env: &Env, id: &str) -> StoreResult<Option<StoredBlock>> {
        let row = sqlx::query(
            "SELECT end_user_id, body, metadata, external_payment_id FROM blocks WHERE id = $1 AND tenant_id = $2 AND environment = $3",
        )
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let block: Block = serde_json::from_str(&row.try_get::<String, _>("body")?)?;
        let metadata = row
            .try_get::<Option<String>, _>("metadata")?
            .map(|text| serde_json::from_str(&text))
            .transpose()?;
        let owner: String = row.try_get("end_user_id")?;
        Ok(Some(StoredBlock {
            end_user_id: end_user_id(&owner)?,
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
        // Two texts rather than `($3 IS NULL OR end_user_id = $3)`, which a generic plan
        // could not serve from the end user's index.
        let query = match &filter.end_user_id {
            Some(end_user) => sqlx::query(
                "SELECT seq, body FROM entries WHERE tenant_id = $1 AND environment = $2
                   AND user_key = $3 AND end_user_id = $4 AND ($5::TEXT IS NULL OR type = $5)
                   AND ($6::BIGINT IS NULL OR created_at >= $6) AND ($7::BIGINT IS NULL OR created_at < $7)
                   AND seq < $8
                 ORDER BY seq DESC LIMIT $9",
            )
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(user_key(env, end_user))
            .bind(end_user),
            None => sqlx::query(
                "SELECT seq, body FROM entries WHERE tenant_id = $1 AND environment = $2
                   AND ($3::TEXT IS NULL OR type = $3)
                   AND ($4::BIGINT IS NULL OR created_at >= $4) AND ($5::BIGINT IS NULL OR created_at < $5)
                   AND seq < $6
                 ORDER BY seq DESC LIMIT $7",
            )
            .bind(&env.tenant_id)
            .bind(env.environment.as_str()),
        };
        let rows = query
            .bind(&filter.entry_type)
            .bind(filter.from.map(millis))
            .bind(filter.to.map(millis))
            .bind(filter.before_seq.unwrap_or(i64::MAX))
            .bind(limit(filter.limit))
            .fetch_all(&self.pool)
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
            "SELECT body FROM reservations WHERE id = $1 AND tenant_id = $2 AND environment = $3",
        )
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok(serde_json::from_str(&row.try_get::<String, _>("body")?)?))
            .transpose()
    }

    async fn lease(&self, env: &Env, id: &str) -> StoreResult<Option<ledger::Lease>> {
        let row = sqlx::query(
            "SELECT body FROM leases WHERE id = $1 AND tenant_id = $2 AND environment = $3",
        )
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok(serde_json::from_str(&row.try_get::<String, _>("body")?)?))
            .transpose()
    }

    async fn leases(&self, env: &Env, filter: &LeaseFilter) -> StoreResult<Vec<ledger::Lease>> {
        // Fixed fragments only; every value is bound, in the order the fragments name.
        let mut sql =
            String::from("SELECT body FROM leases WHERE tenant_id = $1 AND environment = $2");
        let mut binds: Vec<&str> = Vec::new();
        for (column, value) in [
            (" AND end_user_id = ", &filter.end_user_id),
            (" AND holder = ", &filter.holder),
            (" AND id > ", &filter.after),
        ] {
            if let Some(value) = value {
                sql.push_str(column);
                sql.push_str(&format!("${}", binds.len() + 3));
                binds.push(value);
            }
        }
        if filter.active_only {
            sql.push_str(" AND status = 'active'");
        }
        sql.push_str(" ORDER BY id LIMIT ");
        sql.push_str(&format!("${}", binds.len() + 3));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&env.tenant_id)
            .bind(env.environment.as_str());
        for value in binds {
            query = query.bind(value);
        }
        let rows = query
            .bind(i64::from(filter.limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok(serde_json::from_str(&row.try_get::<String, _>("body")?)?))
            .collect()
    }

    async fn subscription(&self, env: &Env, id: &str) -> StoreResult<Option<Subscription>> {
        let row = sqlx::query(
            "SELECT body FROM subscriptions WHERE id = $1 AND tenant_id = $2 AND environment = $3",
        )
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok(serde_json::from_str(&row.try_get::<String, _>("body")?)?))
            .transpose()
    }

    async fn subscriptions(
        &self,
        env: &Env,
        end_user: Option<&str>,
        after_id: Option<&str>,
        limit_len: u32,
    ) -> StoreResult<Vec<Subscription>> {
        let rows = sqlx::query(
            "SELECT body FROM subscriptions WHERE tenant_id = $1 AND environment = $2
               AND ($3::TEXT IS NULL OR end_user_id = $3) AND ($4::TEXT IS NULL OR id > $4)
             ORDER BY id LIMIT $5",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(end_user)
        .bind(after_id)
        .bind(limit(limit_len))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok(serde_json::from_str(&row.try_get::<String, _>("body")?)?))
            .collect()
    }

    async fn events(
        &self,
        env: &Env,
        after_seq: Option<i64>,
        limit_len: u32,
    ) -> StoreResult<Vec<EventRecord>> {
        let rows = sqlx::query(
            "SELECT seq, body FROM events WHERE tenant_id = $1 AND environment = $2 AND ($3::BIGINT IS NULL OR seq > $3)
             ORDER BY seq LIMIT $4",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(after_seq)
        .bind(limit(limit_len))
        .fetch_all(&self.pool)
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
            "SELECT seq, body FROM events WHERE id = $1 AND tenant_id = $2 AND environment = $3",
        )
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut event: protocol::Event = serde_json::from_str(&row.try_get::<String, _>("body")?)?;
        let attempts = sqlx::query(
            "SELECT endpoint_id, attempt, status, response_status, at FROM webhook_attempts WHERE event_id = $1 ORDER BY at, attempt",
        )
        .bind(id)
        .fetch_all(&self.pool)
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
        limit_len: u32,
    ) -> StoreResult<Vec<ChangeRecord>> {
        let rows = sqlx::query(
            "SELECT seq, end_user_id FROM changes WHERE tenant_id = $1 AND environment = $2 AND seq > $3 ORDER BY seq LIMIT $4",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(cursor)
        .bind(limit(limit_len))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let end_user = row
                    .try_get::<Option<String>, _>("end_user_id")?
                    .map(|id| end_user_id(&id))
                    .transpose()?;
                Ok(ChangeRecord {
                    seq: row.try_get("seq")?,
                    end_user_id: end_user,
                })
            })
            .collect()
    }

    async fn last_change(&self, env: &Env) -> StoreResult<i64> {
        let row = sqlx::query(
            "SELECT COALESCE(MAX(seq), 0) AS seq FROM changes WHERE tenant_id = $1 AND environment = $2",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_one(&self.pool)
        .await?;
        let last: i64 = row.try_get("seq")?;
        Ok(last.max(self.purged_through(env).await?))
    }

    async fn purged_through(&self, env: &Env) -> StoreResult<i64> {
        let row = sqlx::query(
            "SELECT purged_through FROM change_watermarks WHERE tenant_id = $1 AND environment = $2",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row
            .map(|row| row.try_get("purged_through"))
            .transpose()?
            .unwrap_or(0))
    }

    async fn record_catalog_change(&self, env: &Env, at: Timestamp) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let heads = take_positions(&mut tx, env, 0, 1).await?;
        insert_change(&mut tx, env, heads.last_change, None, at).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn end_user_states(
        &self,
        env: &Env,
        after: Option<&str>,
        limit_len: u32,
    ) -> StoreResult<Vec<EndUserState>> {
        let rows = sqlx::query(
            "SELECT state FROM end_users WHERE tenant_id = $1 AND environment = $2 AND state IS NOT NULL
               AND ($3::TEXT IS NULL OR end_user_id > $3)
             ORDER BY end_user_id LIMIT $4",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(after)
        .bind(limit(limit_len))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| parse_state(&row.try_get::<String, _>("state")?))
            .collect()
    }

    async fn purge_changes(&self, before: Timestamp) -> StoreResult<u64> {
        // One statement, so the watermark is exactly the newest position deleted in each
        // environment (a change committed meanwhile is either deleted and counted, or kept).
        let row = sqlx::query(
            "WITH deleted AS (
                 DELETE FROM changes WHERE created_at < $1 RETURNING tenant_id, environment, seq
             ), marked AS (
                 INSERT INTO change_watermarks (tenant_id, environment, purged_through)
                 SELECT tenant_id, environment, MAX(seq) FROM deleted GROUP BY tenant_id, environment
                 ON CONFLICT (tenant_id, environment) DO UPDATE
                   SET purged_through = GREATEST(change_watermarks.purged_through, excluded.purged_through)
                 RETURNING 1
             )
             SELECT COUNT(*) AS deleted FROM deleted",
        )
        .bind(millis(before))
        .fetch_one(&self.pool)
        .await?;
        u64::try_from(row.try_get::<i64, _>("deleted")?).map_err(|_| corrupt("deleted count"))
    }

    async fn insert_endpoint(&self, env: &Env, record: &EndpointRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO webhook_endpoints (id, tenant_id, environment, url, event_types, secret, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&record.id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(&record.url)
        .bind(record.event_types.as_ref().map(serde_json::to_string).transpose()?)
        .bind(&record.secret)
        .bind(millis(record.created_at))
        .bind(millis(record.updated_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn endpoints(&self, env: &Env) -> StoreResult<Vec<EndpointRecord>> {
        let mut connection = self.pool.acquire().await?;
        live_endpoints(&mut connection, env).await
    }

    async fn update_endpoint(&self, env: &Env, record: &EndpointRecord) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE webhook_endpoints SET url = $1, event_types = $2, updated_at = $3
             WHERE id = $4 AND tenant_id = $5 AND environment = $6 AND deleted_at IS NULL",
        )
        .bind(&record.url)
        .bind(
            record
                .event_types
                .as_ref()
                .map(serde_json::to_string)
                .transpose()?,
        )
        .bind(millis(record.updated_at))
        .bind(&record.id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    async fn delete_endpoint(&self, env: &Env, id: &str, at: Timestamp) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let result = sqlx::query(
            "UPDATE webhook_endpoints SET deleted_at = $1 WHERE id = $2 AND tenant_id = $3 AND environment = $4 AND deleted_at IS NULL",
        )
        .bind(millis(at))
        .bind(id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .execute(&mut *tx)
        .await?;
        // Nothing more goes to a deleted endpoint (scoped like every query, so an id from
        // another environment touches nothing).
        sqlx::query(
            "UPDATE webhook_deliveries SET status = 'failed'
             WHERE endpoint_id = $1 AND tenant_id = $2 AND environment = $3 AND status = 'pending'",
        )
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
        let mut tx = self.pool.begin().await?;
        let heads = take_positions(&mut tx, env, 1, 0).await?;
        insert_wire_event(&mut tx, env, heads.last_event, event, None).await?;
        insert_delivery(
            &mut tx,
            env,
            endpoint_id,
            &event.id,
            heads.last_event,
            None,
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn redeliver(&self, env: &Env, event_id: &str, now: Timestamp) -> StoreResult<usize> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT seq, end_user_id, type FROM events WHERE id = $1 AND tenant_id = $2 AND environment = $3",
        )
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
        limit_len: u32,
    ) -> StoreResult<Vec<DeliveryJob>> {
        let mut tx = self.pool.begin().await?;
        // SKIP LOCKED: a delivery another replica is claiming right now is passed over,
        // and once that claim commits its `locked_until` excludes it (PostgreSQL rechecks
        // the row's conditions on its newest version before locking it). The ordering
        // rule ignores locks: an earlier pending delivery holds later ones back whether or
        // not it is leased. COALESCE(end_user_id, '') compares like IS NOT DISTINCT FROM
        // (end user ids are never empty) and can use the `webhook_deliveries_order` index.
        let rows = sqlx::query(
            "SELECT d.id, d.attempts, d.next_attempt_at, d.endpoint_id, e.body AS event_body,
                    w.url, w.event_types, w.secret, w.created_at AS endpoint_created_at, w.updated_at AS endpoint_updated_at
             FROM webhook_deliveries d
             JOIN events e ON e.id = d.event_id
             JOIN webhook_endpoints w ON w.id = d.endpoint_id AND w.deleted_at IS NULL
             WHERE d.tenant_id = $1 AND d.environment = $2 AND d.status = 'pending' AND d.next_attempt_at <= $3 AND d.locked_until <= $5
               AND NOT EXISTS (
                 SELECT 1 FROM webhook_deliveries earlier
                 WHERE earlier.endpoint_id = d.endpoint_id
                   AND COALESCE(earlier.end_user_id, '') = COALESCE(d.end_user_id, '')
                   AND earlier.status = 'pending'
                   AND (earlier.event_seq < d.event_seq OR (earlier.event_seq = d.event_seq AND earlier.id < d.id)))
             ORDER BY d.event_seq, d.id LIMIT $4
             FOR UPDATE OF d SKIP LOCKED",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(millis(due_by))
        .bind(limit(limit_len))
        .bind(millis(lease.now))
        .fetch_all(&mut *tx)
        .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in &rows {
            jobs.push(DeliveryJob {
                delivery_id: row.try_get("id")?,
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
        if !jobs.is_empty() {
            let ids: Vec<i64> = jobs.iter().map(|job| job.delivery_id).collect();
            sqlx::query("UPDATE webhook_deliveries SET locked_until = $1 WHERE id = ANY($2)")
                .bind(millis(lease.until))
                .bind(ids)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(jobs)
    }

    async fn pending_deliveries(&self, env: &Env, due_by: Timestamp) -> StoreResult<u64> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM webhook_deliveries WHERE tenant_id = $1 AND environment = $2 AND status = 'pending' AND next_attempt_at <= $3",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(millis(due_by))
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn record_attempt(&self, attempt: &AttemptRecord) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT endpoint_id, event_id FROM webhook_deliveries WHERE id = $1")
            .bind(attempt.delivery_id)
            .fetch_one(&mut *tx)
            .await?;
        let (endpoint_id, event_id): (String, String) =
            (row.try_get("endpoint_id")?, row.try_get("event_id")?);
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, endpoint_id, event_id, attempt, status, response_status, error, at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
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
        sqlx::query(
            "UPDATE webhook_deliveries SET status = $1, attempts = $2, next_attempt_at = COALESCE($3, next_attempt_at), locked_until = 0
             WHERE id = $4",
        )
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
        // Leases of one environment that arrive together are taken in one transaction, by
        // a task of its own (see `take_leases`).
        let ask = LeaseAsk {
            env,
            key,
            fingerprint,
            now,
            lease_ms,
            keep_until,
        };
        queue_lease(&self.leases, env.clone(), ask, |guard| {
            let store = self.clone();
            tokio::spawn(async move { store.drain_leases(guard).await });
        })
        .await
    }

    async fn idempotency_finish(&self, env: &Env, answer: &IdempotencyAnswer) -> StoreResult<()> {
        let mut connection = self.pool.acquire().await?;
        finish_idempotency(&mut connection, env, answer).await
    }

    async fn idempotency_abandon(&self, env: &Env, key: &str) -> StoreResult<()> {
        sqlx::query(
            "DELETE FROM idempotency WHERE tenant_id = $1 AND environment = $2 AND key = $3 AND status IS NULL",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn usage_keys(
        &self,
        env: &Env,
        keys: &[String],
    ) -> StoreResult<std::collections::BTreeMap<String, UsageKeyRecord>> {
        let rows = sqlx::query(
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
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(keys)
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
        let idempotency = sqlx::query("DELETE FROM idempotency WHERE keep_until < $1")
            .bind(millis(now))
            .execute(&self.pool)
            .await?;
        let usage = sqlx::query("DELETE FROM usage_keys WHERE keep_until < $1")
            .bind(millis(now))
            .execute(&self.pool)
            .await?;
        Ok(idempotency
            .rows_affected()
            .saturating_add(usage.rows_affected()))
    }
}

/// Takes (or reports) one lease inside the open transaction `tx`: `None` when the row
/// its insert conflicted with was deleted before it could be read, or changed before a
/// dead lease could be taken over (try again).
async fn take_lease(tx: &mut PgConnection, lease: &Lease) -> StoreResult<Option<IdempotencyBegin>> {
    let locked_until = lease.now.as_millis().saturating_add(lease.lease_ms);
    // Of two first requests, one inserts; the other's insert waits for it to commit and
    // then does nothing, and the row is read below.
    let inserted = sqlx::query(
        "INSERT INTO idempotency (tenant_id, environment, key, fingerprint, locked_until, keep_until)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, environment, key) DO NOTHING",
    )
    .bind(&lease.env.tenant_id)
    .bind(lease.env.environment.as_str())
    .bind(&lease.key)
    .bind(lease.fingerprint.as_slice())
    .bind(locked_until)
    .bind(millis(lease.keep_until))
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() > 0 {
        return Ok(Some(IdempotencyBegin::Started));
    }
    let row = sqlx::query(
        "SELECT fingerprint, status, body, locked_until FROM idempotency
         WHERE tenant_id = $1 AND environment = $2 AND key = $3",
    )
    .bind(&lease.env.tenant_id)
    .bind(lease.env.environment.as_str())
    .bind(&lease.key)
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
    let taken = sqlx::query(
        "UPDATE idempotency SET locked_until = $1 WHERE tenant_id = $2 AND environment = $3 AND key = $4
           AND status IS NULL AND locked_until = $5",
    )
    .bind(locked_until)
    .bind(&lease.env.tenant_id)
    .bind(lease.env.environment.as_str())
    .bind(&lease.key)
    .bind(holder_until)
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
    async fn take_leases(&self, batch: &[Lease]) -> StoreResult<Vec<IdempotencyBegin>> {
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

fn parse_state(text: &str) -> StoreResult<EndUserState> {
    let parts: StateParts = serde_json::from_str(text)?;
    EndUserState::from_parts(parts).map_err(|violation| corrupt(violation.to_string()))
}

/// The state in a row of `end_users` (`None` for no row, or a mutation's placeholder).
fn state_of(row: Option<PgRow>) -> StoreResult<Option<EndUserState>> {
    let Some(row) = row else { return Ok(None) };
    row.try_get::<Option<String>, _>("state")?
        .map(|text| parse_state(&text))
        .transpose()
}

/// Locks the end user's row for the rest of the transaction and returns its state
/// (`None` for an end user never stored). An unknown end user gets a placeholder row
/// first, so there is always a row to lock; concurrent first mutations wait on its
/// insert.
async fn lock_state(
    connection: &mut PgConnection,
    env: &Env,
    end_user: &EndUserId,
    now: Timestamp,
) -> StoreResult<Option<EndUserState>> {
    const LOCK: &str = "SELECT state FROM end_users WHERE tenant_id = $1 AND environment = $2 AND end_user_id = $3 FOR UPDATE";
    let row = sqlx::query(LOCK)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(end_user.as_str())
        .fetch_optional(&mut *connection)
        .await?;
    if row.is_some() {
        return state_of(row);
    }
    sqlx::query(
        "INSERT INTO end_users (tenant_id, environment, end_user_id, state, version, updated_at)
         VALUES ($1, $2, $3, NULL, 0, $4) ON CONFLICT (tenant_id, environment, end_user_id) DO NOTHING",
    )
    .bind(&env.tenant_id)
    .bind(env.environment.as_str())
    .bind(end_user.as_str())
    .bind(millis(now))
    .execute(&mut *connection)
    .await?;
    let row = sqlx::query(LOCK)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(end_user.as_str())
        .fetch_optional(&mut *connection)
        .await?;
    if row.is_none() {
        return Err(StoreError::Transient(format!(
            "end user `{end_user}` vanished while being locked"
        )));
    }
    state_of(row)
}

/// Locks several end users' rows, in id order, for the rest of the transaction and
/// returns their states by id (`None` for an end user never stored): [`lock_state`] for
/// a batch, with one statement for the placeholders and one for the locks. `ids` must be
/// sorted, so that concurrent batches lock (and insert) in the same order.
async fn lock_states(
    connection: &mut PgConnection,
    env: &Env,
    ids: &[&str],
    now: Timestamp,
) -> StoreResult<BTreeMap<String, Option<EndUserState>>> {
    sqlx::query(
        "INSERT INTO end_users (tenant_id, environment, end_user_id, state, version, updated_at)
         SELECT $1, $2, u.id, NULL, 0, $4 FROM UNNEST($3::text[]) WITH ORDINALITY AS u(id, position)
         ORDER BY u.position
         ON CONFLICT (tenant_id, environment, end_user_id) DO NOTHING",
    )
    .bind(&env.tenant_id)
    .bind(env.environment.as_str())
    .bind(ids)
    .bind(millis(now))
    .execute(&mut *connection)
    .await?;
    // One index probe and lock per end user, in `ids` order (see `usage_keys` for why
    // not a join: that one hashed every end user of the environment).
    let rows = sqlx::query(
        "SELECT e.end_user_id, e.state FROM UNNEST($3::text[]) WITH ORDINALITY AS k(id, position)
         CROSS JOIN LATERAL (
             SELECT end_user_id, state FROM end_users
             WHERE tenant_id = $1 AND environment = $2 AND end_user_id = k.id
             LIMIT 1 FOR UPDATE
         ) AS e
         ORDER BY k.position",
    )
    .bind(&env.tenant_id)
    .bind(env.environment.as_str())
    .bind(ids)
    .fetch_all(&mut *connection)
    .await?;
    if rows.len() != ids.len() {
        return Err(StoreError::Transient(format!(
            "{} of {} end users vanished while being locked",
            ids.len().saturating_sub(rows.len()),
            ids.len()
        )));
    }
    let mut states = BTreeMap::new();
    for row in rows {
        let id: String = row.try_get("end_user_id")?;
        let state: Option<String> = row.try_get("state")?;
        states.insert(id, state.as_deref().map(parse_state).transpose()?);
    }
    Ok(states)
}

/// Inserts `claims` unanswered (see [`Claim`]), in key order; which of them this
/// transaction holds. A key another open transaction inserted waits for it to end (then
/// it is not ours); one already stored is not ours.
async fn claim_keys(
    connection: &mut PgConnection,
    env: &Env,
    claims: &[Claim],
) -> StoreResult<Vec<bool>> {
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let ordered = claims_to_insert(claims);
    let keys: Vec<&str> = ordered.iter().map(|claim| claim.key.as_str()).collect();
    let fingerprints: Vec<&[u8]> = ordered
        .iter()
        .map(|claim| claim.fingerprint.as_slice())
        .collect();
    let locked: Vec<i64> = ordered
        .iter()
        .map(|claim| claim.now.as_millis().saturating_add(CLAIM_LEASE_MS))
        .collect();
    let keep: Vec<i64> = ordered
        .iter()
        .map(|claim| claim.keep_until.as_millis())
        .collect();
    let taken: std::collections::HashSet<String> = sqlx::query_scalar(
        "INSERT INTO idempotency (tenant_id, environment, key, fingerprint, locked_until, keep_until)
         SELECT $1, $2, c.key, c.fingerprint, c.locked_until, c.keep_until
         FROM UNNEST($3::text[], $4::bytea[], $5::int8[], $6::int8[]) WITH ORDINALITY
           AS c(key, fingerprint, locked_until, keep_until, position)
         ORDER BY c.position
         ON CONFLICT DO NOTHING RETURNING key",
    )
    .bind(&env.tenant_id)
    .bind(env.environment.as_str())
    .bind(keys)
    .bind(fingerprints)
    .bind(locked)
    .bind(keep)
    .fetch_all(&mut *connection)
    .await?
    .into_iter()
    .collect();
    Ok(claimed_flags(claims, &taken))
}

async fn finish_idempotency(
    connection: &mut PgConnection,
    env: &Env,
    answer: &IdempotencyAnswer,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE idempotency SET status = $1, body = $2 WHERE tenant_id = $3 AND environment = $4 AND key = $5",
    )
    .bind(i64::from(answer.status))
    .bind(answer.body.as_slice())
    .bind(&env.tenant_id)
    .bind(env.environment.as_str())
    .bind(&answer.key)
    .execute(connection)
    .await?;
    Ok(())
}

/// Rows a transaction writes for every operation (end users, blocks, entries, usage
/// keys, events, change-feed entries), gathered so that each kind is written with one
/// `UNNEST` statement however many operations and end users the transaction carries.
#[derive(Debug, Default)]
struct Rows {
    end_users: Vec<StateRow>,
    blocks: Vec<BlockRow>,
    entries: Vec<EntryRow>,
    usage_keys: Vec<UsageKeyRecord>,
    idempotency: Vec<IdempotencyAnswer>,
    /// Claimed keys given back (their operations were refused without a stored answer).
    released: Vec<String>,
    /// Events in order, with the end user each is about.
    events: Vec<(protocol::Event, String)>,
    /// End users whose state changed: one change-feed entry each.
    changes: Vec<String>,
}

impl Rows {
    /// Stages the new state of one end user and everything its operations produced (one
    /// `Changes` per operation, in order); writes its reservations and subscriptions,
    /// which are rare, at once.
    async fn stage(
        &mut self,
        connection: &mut PgConnection,
        env: &Env,
        old: &EndUserState,
        new: &EndUserState,
        changes: &[Changes],
    ) -> StoreResult<()> {
        if changes.is_empty() {
            return unchanged(old, new);
        }
        let end_user = new.end_user_id().as_str();
        let (state, entries, blocks) = stage_rows(old, new, changes)?;
        self.end_users.extend(state);
        self.entries.extend(entries);
        self.blocks.extend(blocks);
        if new != old {
            self.changes.push(end_user.to_owned());
        }
        for part in changes {
            self.usage_keys.extend(part.usage_keys.iter().cloned());
            self.idempotency.extend(part.idempotency.iter().cloned());
            self.released.extend(part.release.iter().cloned());
            for event in &part.events {
                self.events
                    .push((super::wire_event(event), end_user.to_owned()));
            }
        }
        write_reservations(connection, env, old, new, changes).await?;
        write_leases(connection, env, old, new, changes).await?;
        write_subscriptions(connection, env, old, new, changes).await
    }

    /// Writes everything staged; the event log and change feed last (see the module
    /// comment).
    async fn flush(
        self,
        connection: &mut PgConnection,
        env: &Env,
        now: Timestamp,
    ) -> StoreResult<()> {
        let tenant = env.tenant_id.as_str();
        let environment = env.environment.as_str();
        if !self.end_users.is_empty() {
            let (ids, states, versions, due): (Vec<_>, Vec<_>, Vec<_>, Vec<_>) =
                unzip4(self.end_users);
            sqlx::query(
                "INSERT INTO end_users (tenant_id, environment, end_user_id, state, version, next_due_at, updated_at)
                 SELECT $1, $2, u.id, u.state, u.version, u.due, $7
                 FROM UNNEST($3::text[], $4::text[], $5::int8[], $6::int8[]) AS u(id, state, version, due)
                 ON CONFLICT (tenant_id, environment, end_user_id) DO UPDATE SET
                   state = excluded.state, version = excluded.version, next_due_at = excluded.next_due_at, updated_at = excluded.updated_at",
            )
            .bind(tenant)
            .bind(environment)
            .bind(ids)
            .bind(states)
            .bind(versions)
            .bind(due)
            .bind(millis(now))
            .execute(&mut *connection)
            .await?;
        }
        if !self.blocks.is_empty() {
            let mut ids = Vec::with_capacity(self.blocks.len());
            let mut users = Vec::with_capacity(self.blocks.len());
            let mut bodies = Vec::with_capacity(self.blocks.len());
            let mut metadata = Vec::with_capacity(self.blocks.len());
            let mut payments = Vec::with_capacity(self.blocks.len());
            let mut created = Vec::with_capacity(self.blocks.len());
            for row in self.blocks {
                ids.push(row.id);
                users.push(row.end_user);
                bodies.push(row.body);
                metadata.push(row.metadata);
                payments.push(row.external_payment_id);
                created.push(row.created_at);
            }
            sqlx::query(
                "INSERT INTO blocks (id, tenant_id, environment, end_user_id, body, metadata, external_payment_id, created_at)
                 SELECT b.id, $1, $2, b.end_user_id, b.body, b.metadata, b.payment, b.created_at
                 FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::int8[])
                   AS b(id, end_user_id, body, metadata, payment, created_at)
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body",
            )
            .bind(tenant)
            .bind(environment)
            .bind(ids)
            .bind(users)
            .bind(bodies)
            .bind(metadata)
            .bind(payments)
            .bind(created)
            .execute(&mut *connection)
            .await?;
        }
        if !self.entries.is_empty() {
            let mut ids = Vec::with_capacity(self.entries.len());
            let mut users = Vec::with_capacity(self.entries.len());
            let mut types = Vec::with_capacity(self.entries.len());
            let mut created = Vec::with_capacity(self.entries.len());
            let mut bodies = Vec::with_capacity(self.entries.len());
            let mut keys = Vec::with_capacity(self.entries.len());
            for (id, user, entry_type, at, body) in self.entries {
                keys.push(user_key(env, &user));
                ids.push(id);
                users.push(user);
                types.push(entry_type);
                created.push(at);
                bodies.push(body);
            }
            // In array order: one end user's entries are numbered in the order written.
            sqlx::query(
                "INSERT INTO entries (id, tenant_id, environment, end_user_id, user_key, type, created_at, body)
                 SELECT e.id, $1, $2, e.end_user_id, e.user_key, e.type, e.created_at, e.body
                 FROM UNNEST($3::text[], $4::text[], $5::int4[], $6::text[], $7::int8[], $8::text[]) WITH ORDINALITY
                   AS e(id, end_user_id, user_key, type, created_at, body, position)
                 ORDER BY e.position",
            )
            .bind(tenant)
            .bind(environment)
            .bind(ids)
            .bind(users)
            .bind(keys)
            .bind(types)
            .bind(created)
            .bind(bodies)
            .execute(&mut *connection)
            .await?;
        }
        if !self.usage_keys.is_empty() {
            let mut keys = Vec::with_capacity(self.usage_keys.len());
            let mut fingerprints = Vec::with_capacity(self.usage_keys.len());
            let mut entry_ids = Vec::with_capacity(self.usage_keys.len());
            let mut results = Vec::with_capacity(self.usage_keys.len());
            let mut keep = Vec::with_capacity(self.usage_keys.len());
            for key in self.usage_keys {
                keys.push(key.key);
                fingerprints.push(key.fingerprint.to_vec());
                entry_ids.push(key.entry_id);
                results.push(key.result);
                keep.push(millis(key.keep_until));
            }
            sqlx::query(
                "INSERT INTO usage_keys (tenant_id, environment, key, fingerprint, entry_id, result, keep_until)
                 SELECT $1, $2, k.key, k.fingerprint, k.entry_id, k.result, k.keep_until
                 FROM UNNEST($3::text[], $4::bytea[], $5::text[], $6::text[], $7::int8[])
                   AS k(key, fingerprint, entry_id, result, keep_until)",
            )
            .bind(tenant)
            .bind(environment)
            .bind(keys)
            .bind(fingerprints)
            .bind(entry_ids)
            .bind(results)
            .bind(keep)
            .execute(&mut *connection)
            .await
            .map_err(|error| {
                // Another batch recorded the key first: the whole batch rolls back and a
                // retry finds the key as a duplicate.
                if unique_violation(&error) {
                    StoreError::Conflict("a usage event key of this batch was recorded concurrently; send the batch again".into())
                } else {
                    StoreError::from(error)
                }
            })?;
        }
        if !self.idempotency.is_empty() {
            let mut keys = Vec::with_capacity(self.idempotency.len());
            let mut statuses = Vec::with_capacity(self.idempotency.len());
            let mut bodies = Vec::with_capacity(self.idempotency.len());
            for answer in self.idempotency {
                keys.push(answer.key);
                statuses.push(i64::from(answer.status));
                bodies.push(answer.body);
            }
            // Fenced: every key must still be unanswered. If another request answered one
            // first (a lease that expired while this operation waited, and a retry that
            // took the key over), the transaction rolls back with a retryable error
            // rather than apply the request twice; a retry then replays the answer.
            let expected = keys.len();
            let first_key = keys.first().cloned().unwrap_or_default();
            // Each key's row found by one index probe (and locked) in a lateral subquery,
            // then updated by its row address: joined straight to `UNNEST`, the update
            // was planned, on a young table's statistics, as a scan of every key of the
            // environment (~10 ms at 50,000 keys, and growing).
            let updated = sqlx::query(
                "WITH t AS (
                     SELECT x.tid, a.status, a.body
                     FROM UNNEST($3::text[], $4::int8[], $5::bytea[]) AS a(key, status, body)
                     CROSS JOIN LATERAL (
                         SELECT ctid AS tid FROM idempotency
                         WHERE tenant_id = $1 AND environment = $2 AND key = a.key AND status IS NULL
                         LIMIT 1 FOR UPDATE
                     ) AS x
                 )
                 UPDATE idempotency AS i SET status = t.status, body = t.body FROM t WHERE i.ctid = t.tid",
            )
            .bind(tenant)
            .bind(environment)
            .bind(keys)
            .bind(statuses)
            .bind(bodies)
            .execute(&mut *connection)
            .await?;
            if usize::try_from(updated.rows_affected()).ok() != Some(expected) {
                return Err(super::answered_elsewhere(&first_key));
            }
        }
        if !self.released.is_empty() {
            sqlx::query(
                "DELETE FROM idempotency WHERE tenant_id = $1 AND environment = $2 AND key = ANY($3) AND status IS NULL",
            )
            .bind(tenant)
            .bind(environment)
            .bind(self.released)
            .execute(&mut *connection)
            .await?;
        }
        append_to_feeds(connection, env, &self.events, &self.changes, now).await
    }
}

/// Four columns from rows of four.
fn unzip4<A, B, C, D>(rows: Vec<(A, B, C, D)>) -> (Vec<A>, Vec<B>, Vec<C>, Vec<D>) {
    let mut columns = (
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
    );
    for (a, b, c, d) in rows {
        columns.0.push(a);
        columns.1.push(b);
        columns.2.push(c);
        columns.3.push(d);
    }
    columns
}

/// Writes one end user's new state and everything its operations produced.
async fn persist(
    connection: &mut PgConnection,
    env: &Env,
    old: &EndUserState,
    new: &EndUserState,
    changes: &[Changes],
    now: Timestamp,
) -> StoreResult<()> {
    let mut rows = Rows::default();
    rows.stage(connection, env, old, new, changes).await?;
    rows.flush(connection, env, now).await
}

/// Every reservation that is new or changed, live or finished.
async fn write_reservations(
    connection: &mut PgConnection,
    env: &Env,
    old: &EndUserState,
    new: &EndUserState,
    changes: &[Changes],
) -> StoreResult<()> {
    let end_user = new.end_user_id().as_str();
    for reservation in super::changed_reservations(old, new, changes) {
        sqlx::query(
            "INSERT INTO reservations (id, tenant_id, environment, end_user_id, status, body) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body",
        )
        .bind(reservation.id.to_string())
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(end_user)
        .bind(reservation.status.as_str())
        .bind(serde_json::to_string(reservation)?)
        .execute(&mut *connection)
        .await?;
    }
    Ok(())
}

/// Every lease that is new or changed, live or finished.
async fn write_leases(
    connection: &mut PgConnection,
    env: &Env,
    old: &EndUserState,
    new: &EndUserState,
    changes: &[Changes],
) -> StoreResult<()> {
    let end_user = new.end_user_id().as_str();
    for lease in super::changed_leases(old, new, changes) {
        sqlx::query(
            "INSERT INTO leases (id, tenant_id, environment, end_user_id, holder, status, body) VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body",
        )
        .bind(lease.id.to_string())
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(end_user)
        .bind(lease.holder.as_str())
        .bind(lease.status.as_str())
        .bind(serde_json::to_string(lease)?)
        .execute(&mut *connection)
        .await?;
    }
    Ok(())
}

/// Every subscription that is new or changed, live or finished.
async fn write_subscriptions(
    connection: &mut PgConnection,
    env: &Env,
    old: &EndUserState,
    new: &EndUserState,
    changes: &[Changes],
) -> StoreResult<()> {
    let end_user = new.end_user_id().as_str();
    for subscription in super::changed_subscriptions(old, new, changes) {
        sqlx::query(
            "INSERT INTO subscriptions (id, tenant_id, environment, end_user_id, status, body) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body",
        )
        .bind(subscription.id.to_string())
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(end_user)
        .bind(subscription.status.as_str())
        .bind(serde_json::to_string(subscription)?)
        .execute(&mut *connection)
        .await?;
    }
    Ok(())
}

/// The last step of a mutation: the events (with a delivery for every live endpoint that
/// wants each) and a change-feed entry for every end user whose state changed, numbered
/// from the environment's feed head, which stays locked until commit.
async fn append_to_feeds(
    connection: &mut PgConnection,
    env: &Env,
    events: &[(protocol::Event, String)],
    changed: &[String],
    now: Timestamp,
) -> StoreResult<()> {
    if events.is_empty() && changed.is_empty() {
        return Ok(());
    }
    let endpoints = if events.is_empty() {
        Vec::new()
    } else {
        live_endpoints(connection, env).await?
    };
    let count = i64::try_from(events.len()).map_err(|_| corrupt("too many events"))?;
    let change_count = i64::try_from(changed.len()).map_err(|_| corrupt("too many changes"))?;
    let heads = take_positions(connection, env, count, change_count).await?;
    let tenant = env.tenant_id.as_str();
    let environment = env.environment.as_str();
    if !events.is_empty() {
        let first = heads.first_event(count)?;
        let mut seqs = Vec::with_capacity(events.len());
        let mut ids = Vec::with_capacity(events.len());
        let mut users = Vec::with_capacity(events.len());
        let mut types = Vec::with_capacity(events.len());
        let mut created = Vec::with_capacity(events.len());
        let mut bodies = Vec::with_capacity(events.len());
        // (endpoint, event id, seq, end user)
        let mut deliveries: Vec<(&str, &str, i64, &str)> = Vec::new();
        let mut seq = first;
        for (wire, end_user) in events {
            seqs.push(seq);
            ids.push(wire.id.as_str());
            users.push(end_user.as_str());
            types.push(wire.event_type.as_str());
            created.push(millis(wire.created_at.0));
            bodies.push(serde_json::to_string(wire)?);
            for endpoint in endpoints
                .iter()
                .filter(|endpoint| endpoint.wants(&wire.event_type))
            {
                deliveries.push((&endpoint.id, &wire.id, seq, end_user));
            }
            seq = seq
                .checked_add(1)
                .ok_or_else(|| corrupt("event position"))?;
        }
        sqlx::query(
            "INSERT INTO events (seq, id, tenant_id, environment, end_user_id, type, created_at, body)
             SELECT e.seq, e.id, $1, $2, e.end_user_id, e.type, e.created_at, e.body
             FROM UNNEST($3::int8[], $4::text[], $5::text[], $6::text[], $7::int8[], $8::text[])
               AS e(seq, id, end_user_id, type, created_at, body)",
        )
        .bind(tenant)
        .bind(environment)
        .bind(seqs)
        .bind(ids)
        .bind(users)
        .bind(types)
        .bind(created)
        .bind(bodies)
        .execute(&mut *connection)
        .await?;
        if !deliveries.is_empty() {
            let mut endpoint_ids = Vec::with_capacity(deliveries.len());
            let mut event_ids = Vec::with_capacity(deliveries.len());
            let mut event_seqs = Vec::with_capacity(deliveries.len());
            let mut delivery_users = Vec::with_capacity(deliveries.len());
            for (endpoint, event, seq, end_user) in deliveries {
                endpoint_ids.push(endpoint);
                event_ids.push(event);
                event_seqs.push(seq);
                delivery_users.push(end_user);
            }
            sqlx::query(
                "INSERT INTO webhook_deliveries (tenant_id, environment, endpoint_id, event_id, event_seq, end_user_id, status, next_attempt_at)
                 SELECT $1, $2, d.endpoint_id, d.event_id, d.event_seq, d.end_user_id, 'pending', $7
                 FROM UNNEST($3::text[], $4::text[], $5::int8[], $6::text[]) WITH ORDINALITY
                   AS d(endpoint_id, event_id, event_seq, end_user_id, position)
                 ORDER BY d.position",
            )
            .bind(tenant)
            .bind(environment)
            .bind(endpoint_ids)
            .bind(event_ids)
            .bind(event_seqs)
            .bind(delivery_users)
            .bind(millis(now))
            .execute(&mut *connection)
            .await?;
        }
    }
    if !changed.is_empty() {
        let first = heads
            .last_change
            .checked_sub(change_count)
            .and_then(|before| before.checked_add(1))
            .ok_or_else(|| corrupt("change position"))?;
        sqlx::query(
            "INSERT INTO changes (seq, tenant_id, environment, kind, end_user_id, created_at)
             SELECT $3 + c.position - 1, $1, $2, 'end_user', c.end_user_id, $5
             FROM UNNEST($4::text[]) WITH ORDINALITY AS c(end_user_id, position)",
        )
        .bind(tenant)
        .bind(environment)
        .bind(first)
        .bind(changed)
        .bind(millis(now))
        .execute(&mut *connection)
        .await?;
    }
    Ok(())
}

/// An environment's feed head after a transaction took its positions.
#[derive(Debug, Clone, Copy)]
struct FeedHeads {
    /// The last event position, now this transaction's.
    last_event: i64,
    /// The last change position, now this transaction's.
    last_change: i64,
}

impl FeedHeads {
    /// The first of the `count` event positions taken.
    fn first_event(self, count: i64) -> StoreResult<i64> {
        self.last_event
            .checked_sub(count)
            .and_then(|before| before.checked_add(1))
            .ok_or_else(|| corrupt("event position"))
    }
}

/// Takes `events` event positions and `changes` change positions in the
/// environment's log and feed, locking its `feed_heads` row until commit. Call it last
/// before commit: the lock orders this environment's appenders, so positions are
/// committed in order (see the module comment).
async fn take_positions(
    connection: &mut PgConnection,
    env: &Env,
    events: i64,
    changes: i64,
) -> StoreResult<FeedHeads> {
    let row = sqlx::query(
        "INSERT INTO feed_heads (tenant_id, environment, last_event_seq, last_change_seq) VALUES ($1, $2, $3, $4)
         ON CONFLICT (tenant_id, environment) DO UPDATE SET
           last_event_seq = feed_heads.last_event_seq + excluded.last_event_seq,
           last_change_seq = feed_heads.last_change_seq + excluded.last_change_seq
         RETURNING last_event_seq, last_change_seq",
    )
    .bind(&env.tenant_id)
    .bind(env.environment.as_str())
    .bind(events)
    .bind(changes)
    .fetch_one(connection)
    .await?;
    Ok(FeedHeads {
        last_event: row.try_get("last_event_seq")?,
        last_change: row.try_get("last_change_seq")?,
    })
}

/// Writes an event at position `seq` of the environment's log (taken by
/// [`take_positions`]).
async fn insert_wire_event(
    connection: &mut PgConnection,
    env: &Env,
    seq: i64,
    wire: &protocol::Event,
    end_user: Option<&str>,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO events (seq, id, tenant_id, environment, end_user_id, type, created_at, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(seq)
    .bind(&wire.id)
    .bind(&env.tenant_id)
    .bind(env.environment.as_str())
    .bind(end_user)
    .bind(&wire.event_type)
    .bind(millis(wire.created_at.0))
    .bind(serde_json::to_string(wire)?)
    .execute(connection)
    .await?;
    Ok(())
}

/// Queues one event for one endpoint, due at once.
async fn insert_delivery(
    connection: &mut PgConnection,
    env: &Env,
    endpoint_id: &str,
    event_id: &str,
    seq: i64,
    end_user: Option<&str>,
    now: Timestamp,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO webhook_deliveries (tenant_id, environment, endpoint_id, event_id, event_seq, end_user_id, status, next_attempt_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7)",
    )
    .bind(&env.tenant_id)
    .bind(env.environment.as_str())
    .bind(endpoint_id)
    .bind(event_id)
    .bind(seq)
    .bind(end_user)
    .bind(millis(now))
    .execute(connection)
    .await?;
    Ok(())
}

/// The environment's endpoints that are not deleted.
async fn live_endpoints(
    connection: &mut PgConnection,
    env: &Env,
) -> StoreResult<Vec<EndpointRecord>> {
    let rows = sqlx::query(
        "SELECT * FROM webhook_endpoints WHERE tenant_id = $1 AND environment = $2 AND deleted_at IS NULL ORDER BY created_at, id",
    )
    .bind(&env.tenant_id)
    .bind(env.environment.as_str())
    .fetch_all(connection)
    .await?;
    rows.iter().map(endpoint_from_row).collect()
}

/// Writes the change-feed entry at position `seq` (taken by [`take_positions`]).
async fn insert_change(
    connection: &mut PgConnection,
    env: &Env,
    seq: i64,
    end_user: Option<&str>,
    at: Timestamp,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO changes (seq, tenant_id, environment, kind, end_user_id, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(seq)
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
    //! The PostgreSQL-only guarantees, against a real server: each test makes its own
    //! schema on `QS_TEST_POSTGRES_URL` and returns at once when it is unset. The shared
    //! behaviour is the control-plane suite's, run on both stores.

    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    const T0: Timestamp = Timestamp::from_millis(1_767_225_600_000);

    // The key is on disk: it must never change for a given end user.
    #[test]
    fn user_keys_are_stable_and_narrow() {
        let env = |tenant: &str, environment| Env {
            tenant_id: tenant.into(),
            environment,
        };
        let key = user_key(&env("ten_1", Environment::Live), "user_1");
        // Python: int.from_bytes(sha256(b"ten_1\0live\0user_1").digest()[:4], "big") >> 1
        assert_eq!(key, 0x7318_89a9, "the stored key changed");
        assert!(key >= 0, "31 bits, never negative");
        assert_ne!(key, user_key(&env("ten_1", Environment::Test), "user_1"));
        assert_ne!(key, user_key(&env("ten_2", Environment::Live), "user_1"));
        assert_ne!(key, user_key(&env("ten_1", Environment::Live), "user_2"));
    }

    /// A store on a fresh schema, dropped with it.
    struct TestStore {
        store: PostgresStore,
        url: String,
        schema: String,
    }

    impl std::ops::Deref for TestStore {
        type Target = PostgresStore;

        fn deref(&self) -> &PostgresStore {
            &self.store
        }
    }

    impl Drop for TestStore {
        fn drop(&mut self) {
            let (url, schema) = (self.url.clone(), self.schema.clone());
            // Drop runs inside the test's runtime, which cannot block on itself: clean up
            // on a thread of its own.
            let cleanup = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async {
                    if let Ok(admin) = PgPool::connect(&url).await {
                        let drop_schema = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                        if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(drop_schema))
                            .execute(&admin)
                            .await
                        {
                            eprintln!("could not drop test schema {schema}: {error}");
                        }
                        admin.close().await;
                    }
                });
            });
            let _ = cleanup.join();
        }
    }

    /// A store on a fresh schema, or `None` without a server to test against.
    async fn store() -> Option<TestStore> {
        let url = std::env::var("QS_TEST_POSTGRES_URL")
            .ok()
            .filter(|url| !url.is_empty())?;
        let schema = format!("qs_t_{:016x}", rand::random::<u64>());
        let admin = PgPool::connect(&url).await.expect("the server answers");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .expect("create schema");
        admin.close().await;
        let separator = if url.contains('?') { '&' } else { '?' };
        let scoped = format!("{url}{separator}options=-c%20search_path%3D{schema}");
        let store = PostgresStore::open(&scoped, 32).await.expect("store opens");
        Some(TestStore { store, url, schema })
    }

    fn env(tenant: &str) -> Env {
        Env {
            tenant_id: tenant.into(),
            environment: Environment::Test,
        }
    }

    async fn tenant(store: &PostgresStore, id: &str) -> Env {
        let record = TenantRecord {
            id: id.into(),
            name: id.into(),
            created_at: T0,
        };
        store.create_tenant(&record, &[]).await.expect("tenant");
        env(id)
    }

    fn user(id: &str) -> EndUserId {
        EndUserId::new(id).expect("end user id")
    }

    /// Grants `amount` to `end_user`: a state change, an entry, a block and an event.
    async fn grant(store: &PostgresStore, env: &Env, end_user: &EndUserId, amount: i64) {
        crate::store::testing::grant(store, env, end_user, amount, T0).await;
    }

    // One batch of leases answers each as if they had come one by one: a key repeated
    // later in the batch finds the first one's lease, a different request with it is a
    // mismatch, an answered key replays.
    #[tokio::test]
    async fn a_batch_of_leases_answers_each_in_order() {
        let Some(store) = store().await else { return };
        let env = tenant(&store, "t_batch").await;
        let lease = |key: &str, fingerprint: u8| Lease {
            env: env.clone(),
            key: key.into(),
            fingerprint: [fingerprint; 32],
            now: T0,
            lease_ms: 30_000,
            keep_until: T0,
            reply: tokio::sync::oneshot::channel().0,
        };
        store
            .take_leases(&[lease("done", 1)])
            .await
            .expect("first lease");
        store
            .idempotency_finish(
                &env,
                &IdempotencyAnswer {
                    key: "done".into(),
                    status: 201,
                    body: b"{}".to_vec(),
                },
            )
            .await
            .expect("finish");
        let batch = [
            lease("b", 1),
            lease("a", 1),
            lease("b", 1),
            lease("a", 2),
            lease("done", 1),
        ];
        let answers = store.take_leases(&batch).await.expect("batch");
        let kinds = crate::store::testing::kinds(&answers);
        assert_eq!(
            kinds,
            ["started", "started", "in flight", "mismatch", "replay"]
        );
    }

    /// Forces the interleaving a feed must survive: transaction A takes the next position
    /// and stays open; transaction B (an ordinary mutation) tries to append after it and
    /// would commit first. B is made to wait on A's `feed_heads` row (seen in
    /// `pg_stat_activity`, not guessed with a sleep) and no reader sees B's position
    /// before A's; once A commits, a reader by cursor sees A's position, then B's, with no
    /// hole — the opposite commit order cannot happen.
    #[tokio::test]
    async fn a_later_position_cannot_commit_before_an_earlier_one() {
        let Some(store) = store().await else { return };
        let store = Arc::new(store);
        let env = tenant(&store, "ten_order").await;
        grant(&store, &env, &user("u0"), 1).await;
        let before = store.last_change(&env).await.expect("head");

        // A: takes the next change position and holds its transaction open.
        let mut first = store.pool.begin().await.expect("begin A");
        let heads = take_positions(&mut first, &env, 0, 1)
            .await
            .expect("A takes a position");
        let first_seq = heads.last_change;
        assert_eq!(first_seq, before + 1);
        let first_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *first)
            .await
            .expect("A's backend");

        // B: an ordinary mutation of another end user, started after A.
        let second = {
            let (store, env) = (store.clone(), env.clone());
            tokio::spawn(async move { grant(&store, &env, &user("u1"), 1).await })
        };
        // B is blocked on A's lock: it cannot commit position first_seq + 1 yet.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            )
            .bind(first_pid)
            .fetch_one(&store.pool)
            .await
            .expect("pg_stat_activity");
            if waiting >= 1 {
                break;
            }
            assert!(
                !second.is_finished(),
                "B committed while A held the feed head"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "B never reached the feed head"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            store
                .changes_after(&env, before, 100)
                .await
                .expect("read")
                .is_empty(),
            "nothing after A's position is visible while A is open"
        );

        // A commits its change; B goes through after it.
        insert_change(&mut first, &env, first_seq, Some("u_a"), T0)
            .await
            .expect("A's change");
        first.commit().await.expect("A commits");
        second.await.expect("B finishes");
        let seen: Vec<i64> = store
            .changes_after(&env, before, 100)
            .await
            .expect("read")
            .iter()
            .map(|change| change.seq)
            .collect();
        assert_eq!(seen, vec![first_seq, first_seq + 1], "in order, no hole");
    }

    // Migration 0002 computes the key of entries already written in SQL: it must give
    // what `user_key` gives for every later entry, or those end users' history would be
    // split. Run on entries written now with their keys zeroed, then listed by end user.
    #[tokio::test]
    async fn the_migration_keys_entries_as_the_store_does() {
        let Some(store) = store().await else { return };
        let env = tenant(&store, "ten_keys").await;
        for (end_user, amount) in [("u1", 5), ("ü-2", 7), ("u1", 9)] {
            grant(&store, &env, &user(end_user), amount).await;
        }
        sqlx::query("UPDATE entries SET user_key = 0")
            .execute(&store.pool)
            .await
            .expect("zero keys");
        let migration = include_str!("../../migrations/postgres/0002_entries_user_key.sql");
        let update = migration
            .split(';')
            .map(str::trim)
            .map(|statement| {
                statement
                    .lines()
                    .filter(|line| !line.trim_start().starts_with("--"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .find(|statement| statement.trim_start().starts_with("UPDATE entries"))
            .expect("the migration's UPDATE");
        sqlx::query(sqlx::AssertSqlSafe(update))
            .execute(&store.pool)
            .await
            .expect("the migration's UPDATE runs");
        let keyed: Vec<(String, i32)> =
            sqlx::query_as("SELECT end_user_id, user_key FROM entries ORDER BY seq")
                .fetch_all(&store.pool)
                .await
                .expect("keys");
        assert_eq!(keyed.len(), 3);
        for (end_user, key) in keyed {
            assert_eq!(key, user_key(&env, &end_user), "{end_user}");
        }
        let filter = |end_user: &str| EntryFilter {
            end_user_id: Some(end_user.into()),
            limit: 10,
            ..EntryFilter::default()
        };
        let amounts = |entries: Vec<(i64, protocol::LedgerEntry)>| -> Vec<i64> {
            entries.iter().map(|(_, entry)| entry.amount).collect()
        };
        assert_eq!(
            amounts(store.entries(&env, &filter("u1")).await.expect("u1")),
            [9, 5]
        );
        assert_eq!(
            amounts(store.entries(&env, &filter("ü-2")).await.expect("ü-2")),
            [7]
        );
    }

    // Catalog keys are unique per environment with SQLite's message; lists keep insertion
    // order; API keys, environment records and tenancy round-trip.
    #[tokio::test]
    async fn catalog_and_tenancy_round_trip() {
        let Some(store) = store().await else { return };
        let acme = tenant(&store, "ten_acme").await;
        let other = tenant(&store, "ten_other").await;
        let feature = |id: &str, key: &str| CatalogRecord {
            id: id.into(),
            key: key.into(),
            parent_id: None,
            body: serde_json::from_value::<protocol::CreateFeature>(
                serde_json::json!({"key": key, "name": key, "type": "metered"}),
            )
            .expect("feature body"),
            archived: false,
            created_at: T0,
        };
        for (id, key) in [("ftr_2", "zeta"), ("ftr_1", "alpha")] {
            store
                .insert_feature(&acme, &feature(id, key))
                .await
                .expect("insert");
        }
        let duplicate = store.insert_feature(&acme, &feature("ftr_3", "zeta")).await;
        match duplicate {
            Err(StoreError::Conflict(message)) => {
                assert_eq!(message, "a feature with key `zeta` already exists");
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        store
            .insert_feature(&other, &feature("ftr_4", "zeta"))
            .await
            .expect("another tenant may use the key");
        let keys: Vec<String> = store
            .features(&acme)
            .await
            .expect("list")
            .into_iter()
            .map(|record| record.key)
            .collect();
        assert_eq!(keys, ["zeta", "alpha"]);

        let key = ApiKeyRecord {
            id: "key_1".into(),
            tenant_id: "ten_acme".into(),
            environment: Environment::Test,
            name: Some("ci".into()),
            scopes: vec!["all".into()],
            prefix: "qs_test_".into(),
            key_hash: [7; 32],
            created_at: T0,
            revoked_at: None,
        };
        store.insert_api_key(&key).await.expect("key");
        let found = store.api_key_by_hash(&[7; 32]).await.expect("lookup");
        assert_eq!(found.map(|key| key.id).as_deref(), Some("key_1"));
        let revoked = store
            .revoke_api_key(&acme, "key_1", T0)
            .await
            .expect("revoke")
            .expect("the key");
        assert_eq!(revoked.revoked_at, Some(T0));
        assert!(
            store
                .revoke_api_key(&other, "key_1", T0)
                .await
                .expect("revoke")
                .is_none(),
            "another tenant's key is not found"
        );
        let record = EnvRecord {
            clock_offset_ms: 42,
            ..EnvRecord::default()
        };
        store.put_env_record(&acme, &record).await.expect("put");
        assert_eq!(
            store.env_record(&acme).await.expect("get").clock_offset_ms,
            42
        );
        assert_eq!(store.environments().await.expect("environments").len(), 4);
    }

    // Many writers on different end users and a follower paging by cursor at the same
    // time: every page the follower reads starts right after its cursor and has no holes,
    // so positions become visible in order and nothing is ever skipped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn feeds_never_skip_under_concurrent_writers() {
        let Some(store) = store().await else { return };
        let store = Arc::new(store);
        let env = tenant(&store, "ten_acme").await;
        const WRITERS: usize = 8;
        const GRANTS: usize = 20;
        let mut writers = Vec::new();
        for writer in 0..WRITERS {
            let (store, env) = (store.clone(), env.clone());
            writers.push(tokio::spawn(async move {
                for grant_index in 0..GRANTS {
                    grant(&store, &env, &user(&format!("u{writer}")), 1).await;
                    if grant_index % 5 == 0 {
                        store
                            .record_catalog_change(&env, T0)
                            .await
                            .expect("catalog");
                    }
                }
            }));
        }
        let expected_changes = i64::try_from(WRITERS * (GRANTS + GRANTS / 5)).expect("count");
        let expected_events = i64::try_from(WRITERS * GRANTS).expect("count");
        let (mut change_cursor, mut event_cursor) = (0i64, 0i64);
        while change_cursor < expected_changes || event_cursor < expected_events {
            for change in store
                .changes_after(&env, change_cursor, 7)
                .await
                .expect("changes")
            {
                assert_eq!(
                    change.seq,
                    change_cursor + 1,
                    "changes are dense and in order"
                );
                change_cursor = change.seq;
            }
            for event in store
                .events(&env, Some(event_cursor), 7)
                .await
                .expect("events")
            {
                assert_eq!(event.seq, event_cursor + 1, "events are dense and in order");
                event_cursor = event.seq;
            }
            tokio::task::yield_now().await;
        }
        for writer in writers {
            writer.await.expect("writer");
        }
        assert_eq!(
            store.last_change(&env).await.expect("last"),
            expected_changes
        );
        assert!(
            store
                .changes_after(&env, change_cursor, 10)
                .await
                .expect("changes")
                .is_empty()
        );
    }

    // Concurrent mutations of one end user are serialised: none is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_end_users_mutations_are_serialised() {
        let Some(store) = store().await else { return };
        let store = Arc::new(store);
        let env = tenant(&store, "ten_acme").await;
        let mut tasks = Vec::new();
        for amount in 1..=30 {
            let (store, env) = (store.clone(), env.clone());
            tasks.push(tokio::spawn(async move {
                grant(&store, &env, &user("hot"), amount).await;
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        let state = store
            .load_state(&env, &user("hot"))
            .await
            .expect("load")
            .expect("stored");
        assert_eq!(state.version(), 30);
        let total: i64 = state
            .blocks()
            .iter()
            .map(|block| block.remaining.get())
            .sum();
        assert_eq!(total, (1..=30).sum::<i64>());
        let filter = EntryFilter {
            end_user_id: Some("hot".into()),
            limit: 100,
            ..EntryFilter::default()
        };
        let entries = store.entries(&env, &filter).await.expect("entries");
        assert_eq!(entries.len(), 30);
        assert!(
            entries.windows(2).all(|pair| pair[0].0 > pair[1].0),
            "newest first"
        );
    }

    // While a mutation holds one end user's row, another end user's mutation goes
    // through at once and a second one for the same end user waits for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn only_the_same_end_user_waits() {
        let Some(store) = store().await else { return };
        let env = tenant(&store, "ten_acme").await;
        grant(&store, &env, &user("busy"), 1).await;
        // A mutation in flight on `busy`: its transaction holds the row lock.
        let mut in_flight = store.pool.begin().await.expect("begin");
        lock_state(&mut in_flight, &env, &user("busy"), T0)
            .await
            .expect("lock");
        tokio::time::timeout(
            Duration::from_secs(5),
            grant(&store, &env, &user("other"), 1),
        )
        .await
        .expect("another end user does not wait");
        let waiting = tokio::time::timeout(
            Duration::from_millis(300),
            grant(&store, &env, &user("busy"), 1),
        )
        .await;
        assert!(waiting.is_err(), "the same end user waits");
        in_flight.commit().await.expect("commit");
        tokio::time::timeout(
            Duration::from_secs(5),
            grant(&store, &env, &user("busy"), 2),
        )
        .await
        .expect("the lock is free again");
        let state = store
            .load_state(&env, &user("busy"))
            .await
            .expect("load")
            .expect("stored");
        assert_eq!(state.version(), 2, "the abandoned attempt wrote nothing");
    }

    // A refused mutation writes nothing, not even its end user's placeholder row.
    #[tokio::test]
    async fn a_refusal_writes_nothing() {
        let Some(store) = store().await else { return };
        let env = tenant(&store, "ten_acme").await;
        let mut refuse = |_: &mut EndUserState, _: &[bool]| -> StoreResult<Vec<Changes>> {
            Err(StoreError::Declined)
        };
        let result = store
            .mutate(&env, &user("nobody"), T0, &[], &mut refuse)
            .await;
        assert!(matches!(result, Err(StoreError::Declined)));
        assert!(
            store
                .load_state(&env, &user("nobody"))
                .await
                .expect("load")
                .is_none()
        );
        assert!(
            store
                .end_user_states(&env, None, 10)
                .await
                .expect("states")
                .is_empty()
        );
        assert_eq!(store.last_change(&env).await.expect("last"), 0);
    }

    // Many first requests with one key at once: exactly one starts; then the state
    // machine: replay, mismatch, abandon only while unfinished, take-over after the lease.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn idempotency_keys_start_once() {
        let Some(store) = store().await else { return };
        let store = Arc::new(store);
        let env = tenant(&store, "ten_acme").await;
        let keep = Timestamp::from_millis(T0.as_millis() + 86_400_000);
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (store, env) = (store.clone(), env.clone());
            tasks.push(tokio::spawn(async move {
                store
                    .idempotency_begin(&env, "k", &[1; 32], T0, 10_000, keep)
                    .await
                    .expect("begin")
            }));
        }
        let mut started = 0;
        for task in tasks {
            match task.await.expect("task") {
                IdempotencyBegin::Started => started += 1,
                IdempotencyBegin::InFlight => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(started, 1);
        let mismatch = store
            .idempotency_begin(&env, "k", &[2; 32], T0, 10_000, keep)
            .await
            .expect("begin");
        assert!(matches!(mismatch, IdempotencyBegin::Mismatch));
        let later = Timestamp::from_millis(T0.as_millis() + 10_001);
        let taken = store
            .idempotency_begin(&env, "k", &[1; 32], later, 10_000, keep)
            .await
            .expect("begin");
        assert!(
            matches!(taken, IdempotencyBegin::Started),
            "a dead holder's key is taken over"
        );
        let answer = IdempotencyAnswer {
            key: "k".into(),
            status: 201,
            body: b"{}".to_vec(),
        };
        store
            .idempotency_finish(&env, &answer)
            .await
            .expect("finish");
        store.idempotency_abandon(&env, "k").await.expect("abandon");
        match store
            .idempotency_begin(&env, "k", &[1; 32], later, 10_000, keep)
            .await
            .expect("begin")
        {
            IdempotencyBegin::Replay { status, body } => {
                assert_eq!((status, body.as_slice()), (201, b"{}".as_slice()));
            }
            other => panic!("expected a replay, got {other:?}"),
        }
        store
            .idempotency_begin(&env, "gone", &[1; 32], T0, 10_000, keep)
            .await
            .expect("begin");
        store
            .idempotency_abandon(&env, "gone")
            .await
            .expect("abandon");
        assert!(matches!(
            store
                .idempotency_begin(&env, "gone", &[3; 32], T0, 10_000, keep)
                .await
                .expect("begin"),
            IdempotencyBegin::Started
        ));
        let purged = store
            .purge_expired(Timestamp::from_millis(keep.as_millis() + 1))
            .await;
        assert_eq!(purged.expect("purge"), 2);
    }

    // Two replicas claiming at once never take the same delivery, and only the oldest
    // pending delivery of an endpoint and end user is claimable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn deliveries_are_claimed_once_and_in_order() {
        let Some(store) = store().await else { return };
        let store = Arc::new(store);
        let env = tenant(&store, "ten_acme").await;
        let endpoint = EndpointRecord {
            id: "we_1".into(),
            url: "https://example.com/hook".into(),
            event_types: None,
            secret: "whsec_x".into(),
            created_at: T0,
            updated_at: T0,
        };
        store
            .insert_endpoint(&env, &endpoint)
            .await
            .expect("endpoint");
        for index in 0..20 {
            grant(&store, &env, &user(&format!("u{index}")), 1).await;
        }
        grant(&store, &env, &user("u0"), 2).await;
        let claim = |store: Arc<TestStore>, env: Env| async move {
            store
                .claim_deliveries(
                    &env,
                    T0,
                    DeliveryLease {
                        now: T0,
                        until: T0
                            .checked_add(ledger::Span::from_millis(60_000))
                            .expect("instant"),
                    },
                    100,
                )
                .await
                .expect("claim")
        };
        let (first, second) = tokio::join!(
            tokio::spawn(claim(store.clone(), env.clone())),
            tokio::spawn(claim(store.clone(), env.clone()))
        );
        let mut claimed: Vec<i64> = first
            .expect("task")
            .iter()
            .chain(second.expect("task").iter())
            .map(|job| job.delivery_id)
            .collect();
        let count = claimed.len();
        claimed.sort_unstable();
        claimed.dedup();
        assert_eq!(claimed.len(), count, "no delivery is claimed twice");
        assert_eq!(count, 20, "u0's second event waits for its first");
        assert!(
            store
                .claim_deliveries(
                    &env,
                    T0,
                    DeliveryLease {
                        now: T0,
                        until: T0
                            .checked_add(ledger::Span::from_millis(60_000))
                            .expect("instant")
                    },
                    100
                )
                .await
                .expect("claim")
                .is_empty()
        );

        let first_of_u0 = claimed[0];
        store
            .record_attempt(&AttemptRecord {
                delivery_id: first_of_u0,
                attempt: 1,
                at: T0,
                succeeded: true,
                response_status: Some(200),
                error: None,
                retry_at: None,
            })
            .await
            .expect("attempt");
        let next = store
            .claim_deliveries(
                &env,
                T0,
                DeliveryLease {
                    now: T0,
                    until: T0
                        .checked_add(ledger::Span::from_millis(60_000))
                        .expect("instant"),
                },
                100,
            )
            .await
            .expect("claim");
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].event.end_user_id.as_deref(), Some("u0"));
        let event = store
            .event(&env, &next[0].event.id)
            .await
            .expect("event")
            .expect("stored");
        assert!(event.event.deliveries.is_empty());
    }

    // Purging moves the watermark to the newest position deleted; the feed's last
    // position never goes back.
    #[tokio::test]
    async fn purging_changes_moves_the_watermark() {
        let Some(store) = store().await else { return };
        let env = tenant(&store, "ten_acme").await;
        for _ in 0..3 {
            store.record_catalog_change(&env, T0).await.expect("change");
        }
        let later = Timestamp::from_millis(T0.as_millis() + 1);
        store
            .record_catalog_change(&env, later)
            .await
            .expect("change");
        assert_eq!(store.purge_changes(later).await.expect("purge"), 3);
        assert_eq!(store.purged_through(&env).await.expect("watermark"), 3);
        assert_eq!(store.last_change(&env).await.expect("last"), 4);
        let far = Timestamp::from_millis(T0.as_millis() + 1_000);
        assert_eq!(store.purge_changes(far).await.expect("purge"), 1);
        assert_eq!(store.purged_through(&env).await.expect("watermark"), 4);
        assert_eq!(store.last_change(&env).await.expect("last"), 4);
        assert_eq!(store.purge_changes(far).await.expect("purge"), 0);
        assert_eq!(store.purged_through(&env).await.expect("watermark"), 4);
    }
}
