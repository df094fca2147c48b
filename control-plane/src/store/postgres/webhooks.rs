//! PostgreSQL: the event log, webhook endpoints and deliveries
//! ([`WebhookStore`](crate::store::WebhookStore)).

use async_trait::async_trait;
use ledger::Timestamp;
use sqlx::{PgConnection, Row};

use super::write::{insert_wire_event, take_positions};
use super::{PostgresStore, corrupt, limit};
use crate::store::columns::EndpointColumns;
use crate::store::{
    AttemptRecord, DeliveryJob, DeliveryLease, EndpointRecord, Env, StoreResult, WebhookStore,
};

#[async_trait]
impl WebhookStore for PostgresStore {
    async fn insert_ping(
        &self,
        env: &Env,
        event: &protocol::Event,
        endpoint_id: &str,
        now: Timestamp,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let heads = take_positions(&mut tx, env, 1, 0).await?;
        insert_wire_event(&mut tx, env, heads.last_event, event, None).await?;
        insert_delivery(
            &mut tx,
            env,
            endpoint_id,
            &event.id,
            heads.last_event,
            None,
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn redeliver(&self, env: &Env, event_id: &str, now: Timestamp) -> StoreResult<usize> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT seq, end_user_id, type FROM events WHERE id = $1 AND tenant_id = $2 AND environment = $3",
        )
        .bind(event_id)
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(0) };
        let (seq, end_user, event_type): (i64, Option<String>, String) = (
            row.try_get("seq")?,
            row.try_get("end_user_id")?,
            row.try_get("type")?,
        );
        let mut queued = 0usize;
        for endpoint in live_endpoints(&mut tx, env)
            .await?
            .iter()
            .filter(|endpoint| endpoint.wants(&event_type))
        {
            insert_delivery(
                &mut tx,
                env,
                &endpoint.id,
                event_id,
                seq,
                end_user.as_deref(),
                now,
            )
            .await?;
            queued = queued.saturating_add(1);
        }
        tx.commit().await?;
        Ok(queued)
    }

    async fn claim_deliveries(
        &self,
        env: &Env,
        due_by: Timestamp,
        lease: DeliveryLease,
        limit_len: u32,
    ) -> StoreResult<Vec<DeliveryJob>> {
        let mut tx = self.pool.begin().await?;
        // SKIP LOCKED: a delivery another replica is claiming right now is passed over,
        // and once that claim commits its `locked_until` excludes it (PostgreSQL rechecks
        // the row's conditions on its newest version before locking it). The ordering
        // rule ignores locks: an earlier pending delivery holds later ones back whether or
        // not it is leased. COALESCE(end_user_id, '') compares like IS NOT DISTINCT FROM
        // (end user ids are never empty) and can use the `webhook_deliveries_order` index.
        let rows = sqlx::query(
            "SELECT d.id, d.attempts, d.next_attempt_at, d.endpoint_id, e.body AS event_body,
                    w.url, w.event_types, w.secret, w.created_at AS endpoint_created_at, w.updated_at AS endpoint_updated_at
             FROM webhook_deliveries d
             JOIN events e ON e.id = d.event_id
             JOIN webhook_endpoints w ON w.id = d.endpoint_id AND w.deleted_at IS NULL
             WHERE d.tenant_id = $1 AND d.environment = $2 AND d.status = 'pending' AND d.next_attempt_at <= $3 AND d.locked_until <= $5
               AND NOT EXISTS (
                 SELECT 1 FROM webhook_deliveries earlier
                 WHERE earlier.endpoint_id = d.endpoint_id
                   AND COALESCE(earlier.end_user_id, '') = COALESCE(d.end_user_id, '')
                   AND earlier.status = 'pending'
                   AND (earlier.event_seq < d.event_seq OR (earlier.event_seq = d.event_seq AND earlier.id < d.id)))
             ORDER BY d.event_seq, d.id LIMIT $4
             FOR UPDATE OF d SKIP LOCKED",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(due_by.as_millis())
        .bind(limit(limit_len))
        .bind(lease.now.as_millis())
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
            sqlx::query("UPDATE webhook_deliveries SET locked_until = $1 WHERE id = ANY($2)")
                .bind(lease.until.as_millis())
                .bind(ids)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(jobs)
    }

    async fn record_attempt(&self, attempt: &AttemptRecord) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT endpoint_id, event_id FROM webhook_deliveries WHERE id = $1")
            .bind(attempt.delivery_id)
            .fetch_one(&mut *tx)
            .await?;
        let (endpoint_id, event_id): (String, String) =
            (row.try_get("endpoint_id")?, row.try_get("event_id")?);
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, endpoint_id, event_id, attempt, status, response_status, error, at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(attempt.delivery_id)
        .bind(&endpoint_id)
        .bind(&event_id)
        .bind(i64::from(attempt.attempt))
        .bind(if attempt.succeeded { "succeeded" } else { "failed" })
        .bind(attempt.response_status.map(i64::from))
        .bind(&attempt.error)
        .bind(attempt.at.as_millis())
        .execute(&mut *tx)
        .await?;
        let status = match (attempt.succeeded, attempt.retry_at) {
            (true, _) => "succeeded",
            (false, Some(_)) => "pending",
            (false, None) => "failed",
        };
        sqlx::query(
            "UPDATE webhook_deliveries SET status = $1, attempts = $2, next_attempt_at = COALESCE($3, next_attempt_at), locked_until = 0
             WHERE id = $4",
        )
        .bind(status)
        .bind(i64::from(attempt.attempt))
        .bind(attempt.retry_at.map(Timestamp::as_millis))
        .bind(attempt.delivery_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Queues one event for one endpoint, due at once.
async fn insert_delivery(
    connection: &mut PgConnection,
    env: &Env,
    endpoint_id: &str,
    event_id: &str,
    seq: i64,
    end_user: Option<&str>,
    now: Timestamp,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO webhook_deliveries (tenant_id, environment, endpoint_id, event_id, event_seq, end_user_id, status, next_attempt_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7)",
    )
    .bind(&env.tenant_id)
    .bind(env.environment.as_str())
    .bind(endpoint_id)
    .bind(event_id)
    .bind(seq)
    .bind(end_user)
    .bind(now.as_millis())
    .execute(connection)
    .await?;
    Ok(())
}

/// The environment's endpoints that are not deleted.
pub(super) async fn live_endpoints(
    connection: &mut PgConnection,
    env: &Env,
) -> StoreResult<Vec<EndpointRecord>> {
    let rows = sqlx::query(
        "SELECT * FROM webhook_endpoints WHERE tenant_id = $1 AND environment = $2 AND deleted_at IS NULL ORDER BY created_at, id",
    )
    .bind(&env.tenant_id)
    .bind(env.environment.as_str())
    .fetch_all(connection)
    .await?;
    rows.iter()
        .map(|row| crate::store::columns::endpoint(row, EndpointColumns::TABLE))
        .collect()
}
