//! Reads of the records a mutation writes ([`RecordStore`]): an end user's state, blocks,
//! reservations, leases and subscriptions, on either sqlx backend.

use async_trait::async_trait;
use ledger::{EndUserId, EndUserState, Reservation, Subscription};
use serde::de::DeserializeOwned;

use super::{Arg, Side, Sql, scoped};
use crate::store::columns::{Columns, corrupt, parse_state};
use crate::store::{
    Annotations, Env, LeaseFilter, RecordStore, StoreResult, StoredBlock, SubscriptionFilter,
};

/// The `body` of the row `sql` finds by id (`$3`, after the environment).
async fn body<S: Sql, T: DeserializeOwned>(
    store: &S,
    sql: &'static str,
    env: &Env,
    id: &str,
) -> StoreResult<Option<T>> {
    let row = store
        .fetch_optional(Side::Read, sql, &scoped(env, &[Arg::Text(id)]))
        .await?;
    row.map(|row| row.json("body")).transpose()
}

#[async_trait]
impl<S: Sql> RecordStore for S {
    async fn load_state(
        &self,
        env: &Env,
        end_user: &EndUserId,
    ) -> StoreResult<Option<EndUserState>> {
        let sql = "SELECT state FROM end_users
                   WHERE tenant_id = $1 AND environment = $2 AND end_user_id = $3";
        let args = scoped(env, &[Arg::Text(end_user.as_str())]);
        let row = self.fetch_optional(Side::Read, sql, &args).await?;
        // PostgreSQL's mutation leaves a row without a state while its first write runs.
        let state = row.map(|row| row.text_opt("state")).transpose()?.flatten();
        state.map(|text| parse_state(&text)).transpose()
    }

    async fn block(&self, env: &Env, id: &str) -> StoreResult<Option<StoredBlock>> {
        let sql = "SELECT end_user_id, body, metadata, external_payment_id FROM blocks
                   WHERE tenant_id = $1 AND environment = $2 AND id = $3";
        let args = scoped(env, &[Arg::Text(id)]);
        let row = self.fetch_optional(Side::Read, sql, &args).await?;
        let Some(row) = row else { return Ok(None) };
        let owner = row.text("end_user_id")?;
        let metadata = row.text_opt("metadata")?;
        Ok(Some(StoredBlock {
            end_user_id: EndUserId::new(&owner)
                .map_err(|error| corrupt(format!("end user id `{owner}`: {error}")))?,
            block: row.json("body")?,
            annotations: Annotations {
                idempotency_key: None,
                metadata: metadata
                    .map(|text| serde_json::from_str(&text))
                    .transpose()?,
                external_payment_id: row.text_opt("external_payment_id")?,
            },
        }))
    }

    async fn reservation(&self, env: &Env, id: &str) -> StoreResult<Option<Reservation>> {
        let sql =
            "SELECT body FROM reservations WHERE tenant_id = $1 AND environment = $2 AND id = $3";
        body(self, sql, env, id).await
    }

    async fn lease(&self, env: &Env, id: &str) -> StoreResult<Option<ledger::Lease>> {
        let sql = "SELECT body FROM leases WHERE tenant_id = $1 AND environment = $2 AND id = $3";
        body(self, sql, env, id).await
    }

    async fn leases(&self, env: &Env, filter: &LeaseFilter) -> StoreResult<Vec<ledger::Lease>> {
        // Fixed fragments only, each condition present only when it filters (so that
        // PostgreSQL plans each shape with its index); every value is bound, in order.
        let mut sql =
            String::from("SELECT body FROM leases WHERE tenant_id = $1 AND environment = $2");
        let mut args = scoped(env, &[]);
        for (column, value) in [
            (" AND end_user_id = ", &filter.end_user_id),
            (" AND holder = ", &filter.holder),
            (" AND id > ", &filter.after),
        ] {
            if let Some(value) = value {
                args.push(Arg::Text(value));
                sql.push_str(&format!("{column}${}", args.len()));
            }
        }
        if filter.active_only {
            sql.push_str(" AND status = 'active'");
        }
        args.push(Arg::Int(i64::from(filter.limit)));
        sql.push_str(&format!(" ORDER BY id LIMIT ${}", args.len()));
        let rows = self
            .fetch_all(Side::Read, sqlx::AssertSqlSafe(sql), &args)
            .await?;
        rows.iter().map(|row| row.json("body")).collect()
    }

    async fn subscription(&self, env: &Env, id: &str) -> StoreResult<Option<Subscription>> {
        let sql =
            "SELECT body FROM subscriptions WHERE tenant_id = $1 AND environment = $2 AND id = $3";
        body(self, sql, env, id).await
    }

    async fn subscriptions(
        &self,
        env: &Env,
        filter: SubscriptionFilter<'_>,
    ) -> StoreResult<Vec<Subscription>> {
        let sql = "SELECT body FROM subscriptions WHERE tenant_id = $1 AND environment = $2
                     AND ($3 IS NULL OR end_user_id = $3) AND ($4 IS NULL OR id > $4)
                   ORDER BY id LIMIT $5";
        let args = [
            Arg::TextOpt(filter.end_user_id),
            Arg::TextOpt(filter.after),
            Arg::Int(i64::from(filter.limit)),
        ];
        let args = scoped(env, &args);
        let rows = self.fetch_all(Side::Read, sql, &args).await?;
        rows.iter().map(|row| row.json("body")).collect()
    }
}
