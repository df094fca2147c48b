//! PostgreSQL: the event log, webhook endpoints and deliveries
//! ([`WebhookStore`](crate::store::WebhookStore)).

use async_trait::async_trait;
use ledger::Timestamp;
use protocol::Event as WireEvent;
use sqlx::{PgConnection, Row};

use super::write::{insert_wire_event, take_positions};
use super::{PostgresStore, corrupt, limit};
use crate::store::columns::EndpointColumns;
use crate::store::sql::endpoints::DELIVERY_INSERT;
use crate::store::{DeliveryClaim, DeliveryJob, EndpointRecord, Env, StoreResult, WebhookStore};

#[async_trait]
impl WebhookStore for PostgresStore {
    async fn claim_deliveries(
        &self,
        env: &Env,
        claim: &DeliveryClaim,
    ) -> StoreResult<Vec<DeliveryJob>> {
        let mut tx = self.pool.begin().await?;
        // SKIP LOCKED: a delivery another replica is claiming right now is passed over,
        // and once that claim commits its `locked_until` excludes it (PostgreSQL rechecks
        // the row's conditions on its newest version before locking it). The ordering
        // rule ignores locks: an earlier pending delivery holds later ones back whether or
        // not it is leased. COALESCE(end_user_id, '') compares like IS NOT DISTINCT FROM
        // (end user ids are never empty) and can use the `webhook_deliveries_order` index.
        let rows = bind!(sqlx::query(concat!(
            delivery_claim_select!(),
            "
             WHERE d.tenant_id = $1 AND d.environment = $2 AND d.status = 'pending' AND d.next_attempt_at <= $3 AND d.locked_until <= $5
               AND NOT EXISTS (
                 SELECT 1 FROM webhook_deliveries earlier
                 WHERE earlier.endpoint_id = d.endpoint_id
                   AND COALESCE(earlier.end_user_id, '') = COALESCE(d.end_user_id, '')
                   AND earlier.status = 'pending'
                   AND (earlier.event_seq < d.event_seq OR (earlier.event_seq = d.event_seq AND earlier.id < d.id)))
             ORDER BY d.event_seq, d.id LIMIT $4
             FOR UPDATE OF d SKIP LOCKED"
        )); &env.tenant_id, env.environment.as_str(), claim.due_by.as_millis(), limit(claim.limit),
            claim.lease.now.as_millis())
        .fetch_all(&mut *tx)
        .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in &rows {
            jobs.push(DeliveryJob {
                delivery_id: row.try_get("id")?,
                attempts: u32::try_from(row.try_get::<i64, _>("attempts")?)
                    .map_err(|_| corrupt("attempts"))?,
                due_at: Timestamp::from_millis(row.try_get("next_attempt_at")?),
                endpoint: crate::store::columns::endpoint(row, EndpointColumns::JOINED)?,
                event: serde_json::from_str(&row.try_get::<String, _>("event_body")?)?,
            });
        }
        if !jobs.is_empty() {
            let ids: Vec<i64> = jobs.iter().map(|job| job.delivery_id).collect();
            bind!(sqlx::query("UPDATE webhook_deliveries SET locked_until = $1 WHERE id = ANY($2)");
                claim.lease.until.as_millis(), ids)
        .execute(&mut *tx)
        .await?;
        }
        tx.commit().await?;
        Ok(jobs)
    }

    async fn insert_ping(&self, env: &Env, event: &WireEvent, endpoint: &str) -> StoreResult<()> {
        let now = event.created_at.0;
        let mut tx = self.pool.begin().await?;
        let heads = take_positions(&mut tx, env, 1, 0).await?;
        insert_wire_event(&mut tx, env, heads.last_event, event, None).await?;
        bind!(sqlx::query(DELIVERY_INSERT); &env.tenant_id, env.environment.as_str(), endpoint,
            &event.id, heads.last_event, None::<&str>, now.as_millis())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The environment's endpoints that are not deleted.
pub(super) async fn live_endpoints(
    connection: &mut PgConnection,
    env: &Env,
) -> StoreResult<Vec<EndpointRecord>> {
    let rows = bind!(sqlx::query(
        "SELECT * FROM webhook_endpoints WHERE tenant_id = $1 AND environment = $2 AND deleted_at IS NULL ORDER BY created_at, id",
    ); &env.tenant_id, env.environment.as_str())
    .fetch_all(connection)
    .await?;
    rows.iter()
        .map(|row| crate::store::columns::endpoint(row, EndpointColumns::TABLE))
        .collect()
}
