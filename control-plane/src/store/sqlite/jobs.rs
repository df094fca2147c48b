//! SQLite: what the scheduler walks ([`JobStore`](crate::store::JobStore)).

use async_trait::async_trait;
use ledger::{EndUserId, Timestamp};
use sqlx::Row;

use super::{SqliteStore, corrupt};
use crate::store::columns::Columns;
use crate::store::{Env, JobStore, StoreResult};

#[async_trait]
impl JobStore for SqliteStore {
    async fn environments(&self) -> StoreResult<Vec<(Env, i64)>> {
        let rows = sqlx::query("SELECT tenant_id, environment, clock_offset_ms FROM environments ORDER BY tenant_id, environment")
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    Env {
                        tenant_id: row.try_get("tenant_id")?,
                        environment: row.environment()?,
                    },
                    row.try_get("clock_offset_ms")?,
                ))
            })
            .collect()
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
        .bind(now.as_millis())
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
            .bind(at.as_millis())
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(end_user.as_str())
            .bind(at.as_millis())
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}
