//! PostgreSQL: what the scheduler walks ([`JobStore`](crate::store::JobStore)).

use async_trait::async_trait;
use ledger::{EndUserId, Timestamp};
use sqlx::Row;

use super::{PostgresStore, end_user_id, limit};
use crate::store::columns::Columns;
use crate::store::{Env, JobStore, StoreResult};

#[async_trait]
impl JobStore for PostgresStore {
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
        limit_len: u32,
    ) -> StoreResult<Vec<(EndUserId, Timestamp)>> {
        let rows = sqlx::query(
            "SELECT end_user_id, next_due_at FROM end_users WHERE tenant_id = $1 AND environment = $2 AND next_due_at IS NOT NULL AND next_due_at <= $3
             ORDER BY next_due_at LIMIT $4",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(now.as_millis())
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
            .bind(at.as_millis())
            .bind(&env.tenant_id)
            .bind(env.environment.as_str())
            .bind(end_user.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
