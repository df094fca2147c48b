//! What the scheduler walks ([`JobStore`]), on either sqlx backend.

use async_trait::async_trait;
use ledger::{EndUserId, Timestamp};

use super::{Arg, Side, Sql, scoped};
use crate::store::columns::{Columns, corrupt};
use crate::store::{Env, JobStore, StoreResult};

#[async_trait]
impl<T: Sql> JobStore for T {
    async fn environments(&self) -> StoreResult<Vec<(Env, i64)>> {
        let sql = "SELECT tenant_id, environment, clock_offset_ms FROM environments ORDER BY tenant_id, environment";
        let rows = self.fetch_all(Side::Read, sql, &[]).await?;
        rows.iter()
            .map(|row| {
                let env = Env::new(row.text("tenant_id")?, row.environment()?);
                Ok((env, row.int("clock_offset_ms")?))
            })
            .collect()
    }

    async fn due_end_users(
        &self,
        env: &Env,
        now: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<(EndUserId, Timestamp)>> {
        let sql = "SELECT end_user_id, next_due_at FROM end_users
                 WHERE tenant_id = $1 AND environment = $2 AND next_due_at IS NOT NULL AND next_due_at <= $3
                 ORDER BY next_due_at LIMIT $4";
        let args = scoped(
            env,
            &[Arg::Int(now.as_millis()), Arg::Int(i64::from(limit))],
        );
        let rows = self.fetch_all(Side::Read, sql, &args).await?;
        rows.iter()
            .map(|row| {
                let id = row.text("end_user_id")?;
                let end_user = EndUserId::new(&id)
                    .map_err(|error| corrupt(format!("end user id `{id}`: {error}")))?;
                Ok((end_user, row.time("next_due_at")?))
            })
            .collect()
    }

    async fn postpone_due(
        &self,
        env: &Env,
        end_user: &EndUserId,
        at: Timestamp,
    ) -> StoreResult<()> {
        self.execute(
            Side::Write,
            "UPDATE end_users SET next_due_at = $1
             WHERE tenant_id = $2 AND environment = $3 AND end_user_id = $4 AND next_due_at < $1",
            &[
                Arg::Int(at.as_millis()),
                Arg::Text(&env.tenant_id),
                Arg::Text(env.environment.as_str()),
                Arg::Text(end_user.as_str()),
            ],
        )
        .await?;
        Ok(())
    }
}
