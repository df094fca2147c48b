//! The change feed's reads ([`FeedReadStore`]), on either sqlx backend.

use async_trait::async_trait;
use ledger::EndUserState;

use super::{Arg, Side, Sql, scoped};
use crate::store::columns::{Columns, parse_state};
use crate::store::{Env, FeedReadStore, StoreResult};

#[async_trait]
impl<S: Sql> FeedReadStore for S {
    async fn last_change(&self, env: &Env) -> StoreResult<i64> {
        let sql = "SELECT COALESCE(MAX(seq), 0) AS seq FROM changes
                   WHERE tenant_id = $1 AND environment = $2";
        let args = scoped(env, &[]);
        let row = self.fetch_optional(Side::Read, sql, &args).await?;
        let last = row.map(|row| row.int("seq")).transpose()?.unwrap_or(0);
        Ok(last.max(self.purged_through(env).await?))
    }

    async fn purged_through(&self, env: &Env) -> StoreResult<i64> {
        let sql = "SELECT purged_through FROM change_watermarks
                   WHERE tenant_id = $1 AND environment = $2";
        let args = scoped(env, &[]);
        let row = self.fetch_optional(Side::Read, sql, &args).await?;
        Ok(row
            .map(|row| row.int("purged_through"))
            .transpose()?
            .unwrap_or(0))
    }

    async fn end_user_states(
        &self,
        env: &Env,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<EndUserState>> {
        let sql = "SELECT state FROM end_users WHERE tenant_id = $1 AND environment = $2
                     AND state IS NOT NULL AND ($3 IS NULL OR end_user_id > $3)
                   ORDER BY end_user_id LIMIT $4";
        let args = scoped(env, &[Arg::TextOpt(after), Arg::Int(i64::from(limit))]);
        let rows = self.fetch_all(Side::Read, sql, &args).await?;
        rows.iter()
            .map(|row| parse_state(&row.text("state")?))
            .collect()
    }
}
