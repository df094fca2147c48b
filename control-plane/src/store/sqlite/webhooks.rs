//! SQLite: the event log, webhook endpoints and deliveries
//! ([`WebhookStore`](crate::store::WebhookStore)).

use async_trait::async_trait;
use ledger::Timestamp;
use protocol::Event as WireEvent;
use sqlx::{Row, Sqlite, Transaction};

use super::{SqliteStore, corrupt};
use crate::store::columns::EndpointColumns;
use crate::store::sql::endpoints::DELIVERY_INSERT;
use crate::store::{DeliveryClaim, DeliveryJob, Env, StoreResult, WebhookStore};

#[async_trait]
impl WebhookStore for SqliteStore {
    async fn claim_deliveries(
        &self,
        env: &Env,
        claim: &DeliveryClaim,
    ) -> StoreResult<Vec<DeliveryJob>> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let rows = bind!(sqlx::query(concat!(
            delivery_claim_select!(),
            "
             WHERE d.tenant_id = ? AND d.environment = ? AND d.status = 'pending' AND d.next_attempt_at <= ? AND d.locked_until <= ?
               AND NOT EXISTS (
                 SELECT 1 FROM webhook_deliveries earlier
                 WHERE earlier.endpoint_id = d.endpoint_id AND earlier.end_user_id IS d.end_user_id
                   AND earlier.status = 'pending' AND (earlier.event_seq < d.event_seq OR (earlier.event_seq = d.event_seq AND earlier.id < d.id)))
             ORDER BY d.event_seq LIMIT ?"
        )); &env.tenant_id, env.environment.as_str(), claim.due_by.as_millis(),
            claim.lease.now.as_millis(),
            claim.limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in &rows {
            let delivery_id: i64 = row.try_get("id")?;
            bind!(sqlx::query("UPDATE webhook_deliveries SET locked_until = ? WHERE id = ?");
                claim.lease.until.as_millis(), delivery_id)
            .execute(&mut *tx)
            .await?;
            jobs.push(DeliveryJob {
                delivery_id,
                attempts: u32::try_from(row.try_get::<i64, _>("attempts")?)
                    .map_err(|_| corrupt("attempts"))?,
                due_at: Timestamp::from_millis(row.try_get("next_attempt_at")?),
                endpoint: crate::store::columns::endpoint(row, EndpointColumns::JOINED)?,
                event: serde_json::from_str(&row.try_get::<String, _>("event_body")?)?,
            });
        }
        tx.commit().await?;
        Ok(jobs)
    }

    async fn insert_ping(&self, env: &Env, event: &WireEvent, endpoint: &str) -> StoreResult<()> {
        let now = event.created_at.0;
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let seq = insert_wire_event(&mut tx, env, event, None).await?;
        bind!(sqlx::query(DELIVERY_INSERT); &env.tenant_id, env.environment.as_str(), endpoint,
            &event.id, seq, None::<&str>, now.as_millis())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Appends an event to the environment's log and returns its position.
async fn insert_wire_event(
    tx: &mut Transaction<'_, Sqlite>,
    env: &Env,
    wire: &protocol::Event,
    end_user: Option<&str>,
) -> StoreResult<i64> {
    let created_at = wire.created_at.0;
    let result = bind!(sqlx::query("INSERT INTO events (id, tenant_id, environment, end_user_id, type, created_at, body) VALUES (?, ?, ?, ?, ?, ?, ?)");
        &wire.id, &env.tenant_id, env.environment.as_str(), end_user, &wire.event_type,
        created_at.as_millis(), serde_json::to_string(wire)?)
        .execute(&mut **tx)
        .await?;
    Ok(result.last_insert_rowid())
}
