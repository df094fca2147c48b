//! The event log's reads and webhook endpoints ([`EndpointStore`]), on either sqlx backend.

use async_trait::async_trait;
use ledger::Timestamp;

use super::{Arg, Side, Sql};
use crate::store::columns::{Columns, EndpointColumns, corrupt, endpoint, event};
use crate::store::{EndpointRecord, EndpointStore, Env, EventRecord, StoreResult};

#[async_trait]
impl<S: Sql> EndpointStore for S {
    async fn events(
        &self,
        env: &Env,
        after_seq: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<EventRecord>> {
        let rows = self
            .fetch_all(
                Side::Read,
                "SELECT seq, body FROM events WHERE tenant_id = $1 AND environment = $2
                 AND ($3 IS NULL OR seq > $3) ORDER BY seq LIMIT $4",
                &[
                    Arg::Text(&env.tenant_id),
                    Arg::Text(env.environment.as_str()),
                    Arg::IntOpt(after_seq),
                    Arg::Int(i64::from(limit)),
                ],
            )
            .await?;
        rows.iter().map(event).collect()
    }

    async fn event(&self, env: &Env, id: &str) -> StoreResult<Option<EventRecord>> {
        let row = self
            .fetch_optional(
                Side::Read,
                "SELECT seq, body FROM events WHERE id = $1 AND tenant_id = $2 AND environment = $3",
                &[
                    Arg::Text(id),
                    Arg::Text(&env.tenant_id),
                    Arg::Text(env.environment.as_str()),
                ],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut record = event(&row)?;
        let attempts = self
            .fetch_all(
                Side::Read,
                "SELECT endpoint_id, attempt, status, response_status, at FROM webhook_attempts
                 WHERE event_id = $1 ORDER BY at, attempt",
                &[Arg::Text(id)],
            )
            .await?;
        for attempt in &attempts {
            record.event.deliveries.push(protocol::Delivery {
                endpoint_id: attempt.text("endpoint_id")?,
                attempt: u32::try_from(attempt.int("attempt")?).map_err(|_| corrupt("attempt"))?,
                status: attempt.text("status")?,
                response_status: attempt
                    .int_opt("response_status")?
                    .and_then(|status| u16::try_from(status).ok()),
                at: attempt.time("at")?.into(),
            });
        }
        Ok(Some(record))
    }

    async fn insert_endpoint(&self, env: &Env, record: &EndpointRecord) -> StoreResult<()> {
        let event_types = record
            .event_types
            .as_ref()
            .map(serde_json::to_string)
            .transpose()?;
        self.execute(
            Side::Write,
            "INSERT INTO webhook_endpoints (id, tenant_id, environment, url, event_types, secret, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                Arg::Text(&record.id),
                Arg::Text(&env.tenant_id),
                Arg::Text(env.environment.as_str()),
                Arg::Text(&record.url),
                Arg::TextOpt(event_types.as_deref()),
                Arg::Text(&record.secret),
                Arg::Int(record.created_at.as_millis()),
                Arg::Int(record.updated_at.as_millis()),
            ],
        )
        .await?;
        Ok(())
    }

    async fn endpoints(&self, env: &Env) -> StoreResult<Vec<EndpointRecord>> {
        let rows = self
            .fetch_all(
                Side::Read,
                "SELECT * FROM webhook_endpoints WHERE tenant_id = $1 AND environment = $2
                 AND deleted_at IS NULL ORDER BY created_at, id",
                &[
                    Arg::Text(&env.tenant_id),
                    Arg::Text(env.environment.as_str()),
                ],
            )
            .await?;
        rows.iter()
            .map(|row| endpoint(row, EndpointColumns::TABLE))
            .collect()
    }

    async fn update_endpoint(&self, env: &Env, record: &EndpointRecord) -> StoreResult<bool> {
        let event_types = record
            .event_types
            .as_ref()
            .map(serde_json::to_string)
            .transpose()?;
        let changed = self
            .execute(
                Side::Write,
                "UPDATE webhook_endpoints SET url = $1, event_types = $2, updated_at = $3
                 WHERE id = $4 AND tenant_id = $5 AND environment = $6 AND deleted_at IS NULL",
                &[
                    Arg::Text(&record.url),
                    Arg::TextOpt(event_types.as_deref()),
                    Arg::Int(record.updated_at.as_millis()),
                    Arg::Text(&record.id),
                    Arg::Text(&env.tenant_id),
                    Arg::Text(env.environment.as_str()),
                ],
            )
            .await?;
        Ok(changed > 0)
    }

    async fn delete_endpoint(&self, env: &Env, id: &str, at: Timestamp) -> StoreResult<bool> {
        let scope = |first: Arg<'static>| {
            vec![
                first,
                Arg::Text(id),
                Arg::Text(&env.tenant_id),
                Arg::Text(env.environment.as_str()),
            ]
        };
        let changed = self
            .transaction(&[
                (
                    "UPDATE webhook_endpoints SET deleted_at = $1
                     WHERE id = $2 AND tenant_id = $3 AND environment = $4 AND deleted_at IS NULL",
                    scope(Arg::Int(at.as_millis())),
                ),
                // Nothing more goes to a deleted endpoint (scoped like every query, so an
                // id from another environment touches nothing).
                (
                    "UPDATE webhook_deliveries SET status = $1
                     WHERE endpoint_id = $2 AND tenant_id = $3 AND environment = $4 AND status = 'pending'",
                    scope(Arg::Text("failed")),
                ),
            ])
            .await?;
        Ok(changed.first().is_some_and(|rows| *rows > 0))
    }

    async fn pending_deliveries(&self, env: &Env, due_by: Timestamp) -> StoreResult<u64> {
        let row = self
            .fetch_optional(
                Side::Read,
                "SELECT COUNT(*) AS pending FROM webhook_deliveries WHERE tenant_id = $1
                 AND environment = $2 AND status = 'pending' AND next_attempt_at <= $3",
                &[
                    Arg::Text(&env.tenant_id),
                    Arg::Text(env.environment.as_str()),
                    Arg::Int(due_by.as_millis()),
                ],
            )
            .await?;
        let pending = row.map(|row| row.int("pending")).transpose()?.unwrap_or(0);
        Ok(u64::try_from(pending).unwrap_or(0))
    }
}
