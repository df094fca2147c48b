//! PostgreSQL: the change feed ([`FeedStore`](crate::store::FeedStore)).

use async_trait::async_trait;
use ledger::Timestamp;
use sqlx::Row;

use super::write::{insert_change, take_positions};
use super::{PostgresStore, corrupt, end_user_id, limit};
use crate::store::{ChangeRecord, Env, FeedStore, StoreResult};

#[async_trait]
impl FeedStore for PostgresStore {
    async fn changes_after(
        &self,
        env: &Env,
        cursor: i64,
        limit_len: u32,
    ) -> StoreResult<Vec<ChangeRecord>> {
        let rows = bind!(sqlx::query(
            "SELECT seq, end_user_id FROM changes WHERE tenant_id = $1 AND environment = $2 AND seq > $3 ORDER BY seq LIMIT $4",
        ); &env.tenant_id, env.environment.as_str(), cursor, limit(limit_len))
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

    fn announce_commit(&self) {
        self.commits.announce();
    }

    fn commits_elsewhere(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.commits.heard())
    }

    async fn record_catalog_change(&self, env: &Env, at: Timestamp) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let heads = take_positions(&mut tx, env, 0, 1).await?;
        insert_change(&mut tx, env, heads.last_change, None, at).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn purge_changes(&self, before: Timestamp) -> StoreResult<u64> {
        // One statement, so the watermark is exactly the newest position deleted in each
        // environment (a change committed meanwhile is either deleted and counted, or kept).
        let row = bind!(sqlx::query(
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
        ); before.as_millis())
        .fetch_one(&self.pool)
        .await?;
        u64::try_from(row.try_get::<i64, _>("deleted")?).map_err(|_| corrupt("deleted count"))
    }
}
