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

use std::str::FromStr;

use ledger::{EndUserId, EndUserState};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};

use sqlx::{PgPool, Row};

use super::{Env, Lease, StoreError, StoreResult};

use crate::queues::Queues;
use crate::store::columns::{corrupt, parse_state, unique_violation};
use crate::store::sql::Side;

mod end_users;
mod feed;
mod idempotency;
mod notify;
mod webhooks;
mod write;

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Idempotency leases waiting, by environment, taken together (see
    /// `idempotency_begin`).
    leases: std::sync::Arc<Queues<Env, Lease>>,
    /// Commits announced to, and heard from, the other processes on this database.
    commits: notify::Commits,
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
        let commits = notify::Commits::start(&pool).await?;
        Ok(PostgresStore {
            pool,
            leases: std::sync::Arc::default(),
            commits,
        })
    }
}

/// The state in a row of `end_users` (`None` for no row, or a mutation's placeholder).
fn state_of(row: Option<PgRow>) -> StoreResult<Option<EndUserState>> {
    let Some(row) = row else { return Ok(None) };
    row.try_get::<Option<String>, _>("state")?
        .map(|text| parse_state(&text))
        .transpose()
}

crate::store::sql::sqlx_backend!(
    PostgresStore,
    PgRow,
    "INSERT INTO catalog (id, tenant_id, environment, kind, key, parent_id, body, archived, created_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
);

impl PostgresStore {
    /// The statements both sqlx backends share run on the pool, reads and writes alike.
    fn pool_for(&self, _: Side) -> &PgPool {
        &self.pool
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, sqlx::Error> {
        self.pool.begin().await
    }
}

#[cfg(test)]
mod tests;
