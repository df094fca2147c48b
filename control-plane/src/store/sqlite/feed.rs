//! SQLite: the change feed ([`FeedStore`](crate::store::FeedStore)).

use async_trait::async_trait;
use ledger::{EndUserId, Timestamp};
use sqlx::Row;

use super::{SqliteStore, corrupt};
use crate::store::{ChangeRecord, Env, FeedStore, StoreResult};

#[async_trait]
impl FeedStore for SqliteStore {
    async fn changes_after(
        &self,
        env: &Env,
        cursor: i64,
        limit: u32,
    ) -> StoreResult<Vec<ChangeRecord>> {
        let rows = bind!(sqlx::query("SELECT seq, end_user_id, end_user_ids FROM changes WHERE tenant_id = ? AND environment = ? AND seq > ? ORDER BY seq LIMIT ?");
            &env.tenant_id, env.environment.as_str(), cursor, limit)
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

    async fn record_catalog_change(&self, env: &Env, at: Timestamp) -> StoreResult<()> {
        let mut connection = self.writer.acquire().await?;
        insert_change(&mut connection, env, None, at).await
    }

    async fn purge_changes(&self, before: Timestamp) -> StoreResult<u64> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        bind!(sqlx::query(
            "INSERT INTO change_watermarks (tenant_id, environment, purged_through)
             SELECT tenant_id, environment, MAX(seq) FROM changes WHERE created_at < ? GROUP BY tenant_id, environment
             ON CONFLICT (tenant_id, environment) DO UPDATE SET purged_through = MAX(purged_through, excluded.purged_through)",
        ); before.as_millis())
        .execute(&mut *tx)
        .await?;
        let deleted =
            bind!(sqlx::query("DELETE FROM changes WHERE created_at < ?"); before.as_millis())
                .execute(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(deleted.rows_affected())
    }
}

/// Appends one entry to the change feed.
async fn insert_change(
    connection: &mut sqlx::SqliteConnection,
    env: &Env,
    end_user: Option<&str>,
    at: Timestamp,
) -> StoreResult<()> {
    bind!(sqlx::query("INSERT INTO changes (tenant_id, environment, kind, end_user_id, created_at) VALUES (?, ?, ?, ?, ?)");
        &env.tenant_id, env.environment.as_str(),
        if end_user.is_some() { "end_user" } else { "catalog" }, end_user, at.as_millis())
        .execute(connection)
        .await?;
    Ok(())
}
