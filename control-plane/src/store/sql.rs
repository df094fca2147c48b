//! The statements both sqlx backends run alike, written once. A backend implements
//! [`Sql`] (where a statement runs, and how its values are bound); the capabilities whose
//! statements agree are implemented here for every `Sql` backend (`sql/*.rs`).
//!
//! Statements use `$n` placeholders: PostgreSQL's, which SQLite accepts too. On both,
//! sqlx binds `$n` to the n-th value (on SQLite by the parameter's name), so a statement
//! may name them in any order and repeat one.

mod catalog;
mod console;
pub(crate) mod endpoints;
mod feed;
mod idempotency;
mod jobs;
mod records;
mod tenancy;

use async_trait::async_trait;

use super::Env;
use super::columns::Columns;

/// Where a statement runs: SQLite reads on its pool of readers and writes on its one
/// writer; PostgreSQL runs both on its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Read,
    Write,
}

/// A value bound to a statement.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg<'a> {
    Text(&'a str),
    TextOpt(Option<&'a str>),
    Int(i64),
    IntOpt(Option<i64>),
    Bytes(&'a [u8]),
    Flag(bool),
}

/// What a backend brings to the statements written once: running them.
#[async_trait]
pub(crate) trait Sql: Send + Sync + std::fmt::Debug + 'static {
    type Row: Columns + Send;

    /// The insert of a catalog object (`id, tenant_id, environment, kind, key,
    /// parent_id, body, archived, created_at` as `$1`…`$9`): the backends number the
    /// catalog's `seq` differently.
    const CATALOG_INSERT: &'static str;

    async fn fetch_all(
        &self,
        side: Side,
        sql: impl sqlx::SqlSafeStr + Send,
        args: &[Arg<'_>],
    ) -> Result<Vec<Self::Row>, sqlx::Error>;

    /// The one row a statement finds, if any (statements that find at most one).
    async fn fetch_optional(
        &self,
        side: Side,
        sql: impl sqlx::SqlSafeStr + Send,
        args: &[Arg<'_>],
    ) -> Result<Option<Self::Row>, sqlx::Error> {
        Ok(self.fetch_all(side, sql, args).await?.into_iter().next())
    }

    /// Runs a statement; answers how many rows it changed.
    async fn execute(
        &self,
        side: Side,
        sql: impl sqlx::SqlSafeStr + Send,
        args: &[Arg<'_>],
    ) -> Result<u64, sqlx::Error>;

    /// Runs `statements` in order in one write transaction: all of them commit or none.
    /// Answers how many rows each changed.
    async fn transaction(
        &self,
        statements: &[(&'static str, Vec<Arg<'_>>)],
    ) -> Result<Vec<u64>, sqlx::Error>;
}

/// Binds `args` to `query` in order (for the backends' `Sql` implementations).
macro_rules! bind_args {
    ($query:expr, $args:expr) => {{
        let mut query = $query;
        for arg in $args {
            query = match *arg {
                $crate::store::sql::Arg::Text(value) => query.bind(value),
                $crate::store::sql::Arg::TextOpt(value) => query.bind(value),
                $crate::store::sql::Arg::Int(value) => query.bind(value),
                $crate::store::sql::Arg::IntOpt(value) => query.bind(value),
                $crate::store::sql::Arg::Bytes(value) => query.bind(value),
                $crate::store::sql::Arg::Flag(value) => query.bind(value),
            };
        }
        query
    }};
}
pub(crate) use bind_args;

/// An environment's two key columns as `$1` and `$2`, then `rest`: how most statements
/// begin.
pub(crate) fn scoped<'a>(env: &'a Env, rest: &[Arg<'a>]) -> Vec<Arg<'a>> {
    let mut args = Vec::with_capacity(rest.len().saturating_add(2));
    args.extend([
        Arg::Text(&env.tenant_id),
        Arg::Text(env.environment.as_str()),
    ]);
    args.extend_from_slice(rest);
    args
}

/// [`Sql`] for a sqlx backend, written once: the backend brings `pool_for(side)` (where
/// a statement runs) and `begin_write()` (a write transaction), as inherent methods.
macro_rules! sqlx_backend {
    ($store:ty, $row:ty, $catalog_insert:expr) => {
        #[async_trait::async_trait]
        impl $crate::store::sql::Sql for $store {
            type Row = $row;

            const CATALOG_INSERT: &'static str = $catalog_insert;

            async fn fetch_all(
                &self,
                side: $crate::store::sql::Side,
                sql: impl sqlx::SqlSafeStr + Send,
                args: &[$crate::store::sql::Arg<'_>],
            ) -> Result<Vec<$row>, sqlx::Error> {
                $crate::store::sql::bind_args!(sqlx::query(sql), args)
                    .fetch_all(self.pool_for(side))
                    .await
            }

            async fn execute(
                &self,
                side: $crate::store::sql::Side,
                sql: impl sqlx::SqlSafeStr + Send,
                args: &[$crate::store::sql::Arg<'_>],
            ) -> Result<u64, sqlx::Error> {
                let query = $crate::store::sql::bind_args!(sqlx::query(sql), args);
                Ok(query.execute(self.pool_for(side)).await?.rows_affected())
            }

            async fn transaction(
                &self,
                statements: &[(&'static str, Vec<$crate::store::sql::Arg<'_>>)],
            ) -> Result<Vec<u64>, sqlx::Error> {
                let mut tx = self.begin_write().await?;
                let mut changed = Vec::with_capacity(statements.len());
                for (sql, args) in statements {
                    let query = $crate::store::sql::bind_args!(sqlx::query(*sql), args);
                    changed.push(query.execute(&mut *tx).await?.rows_affected());
                }
                tx.commit().await?;
                Ok(changed)
            }
        }
    };
}
pub(crate) use sqlx_backend;
