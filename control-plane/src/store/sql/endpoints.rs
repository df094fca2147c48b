//! The event log's reads and webhook endpoints ([`EndpointStore`]), on either sqlx backend.

use async_trait::async_trait;
use ledger::Timestamp;

use super::{Arg, Side, Sql, scoped};
use crate::store::columns::{Columns, EndpointColumns, corrupt, endpoint, event};
use crate::store::{AttemptRecord, EndpointRecord, EndpointStore, Env, EventRecord, StoreResult};

#[async_trait]
impl<S: Sql> EndpointStore for S {
    async fn events(
        &self,
        env: &Env,
        after_seq: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<EventRecord>> {
        let sql = "SELECT seq, body FROM events WHERE tenant_id = $1 AND environment = $2
                 AND ($3 IS NULL OR seq > $3) ORDER BY seq LIMIT $4";
        let args = scoped(env, &[Arg::IntOpt(after_seq), Arg::Int(i64::from(limit))]);
        let rows = self.fetch_all(Side::Read, sql, &args).await?;
        rows.iter().map(event).collect()
    }

    async fn event(&self, env: &Env, id: &str) -> StoreResult<Option<EventRecord>> {
        let sql =
            "SELECT seq, body FROM events WHERE id = $1 AND tenant_id = $2 AND environment = $3";
        let args = [
            Arg::Text(id),
            Arg::Text(&env.tenant_id),
            Arg::Text(env.environment.as_str()),
        ];
        let row = self.fetch_optional(Side::Read, sql, &args).await?;
        let Some(row) = row else { return Ok(None) };
        let mut record = event(&row)?;
        let sql = "SELECT endpoint_id, attempt, status, response_status, at FROM webhook_attempts
                 WHERE event_id = $1 ORDER BY at, attempt";
        let attempts = self.fetch_all(Side::Read, sql, &[Arg::Text(id)]).await?;
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
        let sql = "SELECT * FROM webhook_endpoints WHERE tenant_id = $1 AND environment = $2
                 AND deleted_at IS NULL ORDER BY created_at, id";
        let rows = self.fetch_all(Side::Read, sql, &scoped(env, &[])).await?;
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
        let sql = "UPDATE webhook_endpoints SET url = $1, event_types = $2, updated_at = $3
                 WHERE id = $4 AND tenant_id = $5 AND environment = $6 AND deleted_at IS NULL";
        let args = [
            Arg::Text(&record.url),
            Arg::TextOpt(event_types.as_deref()),
            Arg::Int(record.updated_at.as_millis()),
            Arg::Text(&record.id),
            Arg::Text(&env.tenant_id),
            Arg::Text(env.environment.as_str()),
        ];
        let changed = self.execute(Side::Write, sql, &args).await?;
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
        let sql = "SELECT COUNT(*) AS pending FROM webhook_deliveries WHERE tenant_id = $1
                 AND environment = $2 AND status = 'pending' AND next_attempt_at <= $3";
        let args = scoped(env, &[Arg::Int(due_by.as_millis())]);
        let row = self.fetch_optional(Side::Read, sql, &args).await?;
        let pending = row.map(|row| row.int("pending")).transpose()?.unwrap_or(0);
        Ok(u64::try_from(pending).unwrap_or(0))
    }

    async fn redeliver(&self, env: &Env, event_id: &str, now: Timestamp) -> StoreResult<usize> {
        let sql = "SELECT seq, end_user_id, type FROM events
                   WHERE tenant_id = $1 AND environment = $2 AND id = $3";
        let args = scoped(env, &[Arg::Text(event_id)]);
        let Some(row) = self.fetch_optional(Side::Read, sql, &args).await? else {
            return Ok(0);
        };
        let (seq, end_user, event_type) = (
            row.int("seq")?,
            row.text_opt("end_user_id")?,
            row.text("type")?,
        );
        // Each delivery is queued only if its endpoint is still live when the write
        // transaction runs: one deleted since it was read gets none (a pending delivery
        // to a deleted endpoint would never be claimed, yet be counted as pending).
        let endpoints = self.endpoints(env).await?;
        let deliveries: Vec<_> = endpoints
            .iter()
            .filter(|endpoint| endpoint.wants(&event_type))
            .map(|endpoint| {
                let delivery = [
                    Arg::Text(&endpoint.id),
                    Arg::Text(event_id),
                    Arg::Int(seq),
                    Arg::TextOpt(end_user.as_deref()),
                    Arg::Int(now.as_millis()),
                ];
                (REDELIVERY_INSERT, scoped(env, &delivery))
            })
            .collect();
        if deliveries.is_empty() {
            return Ok(0);
        }
        let queued = self.transaction(&deliveries).await?.iter().sum::<u64>();
        Ok(usize::try_from(queued).unwrap_or(usize::MAX))
    }

    async fn record_attempt(&self, attempt: &AttemptRecord) -> StoreResult<()> {
        let status = match (attempt.succeeded, attempt.retry_at) {
            (true, _) => "succeeded",
            (false, Some(_)) => "pending",
            (false, None) => "failed",
        };
        let delivery = Arg::Int(attempt.delivery_id);
        let changed = self
            .transaction(&[
                (
                    "INSERT INTO webhook_attempts
                       (delivery_id, endpoint_id, event_id, attempt, status, response_status, error, at)
                     SELECT id, endpoint_id, event_id, $2, $3, $4, $5, $6
                       FROM webhook_deliveries WHERE id = $1",
                    vec![
                        delivery,
                        Arg::Int(i64::from(attempt.attempt)),
                        Arg::Text(if attempt.succeeded { "succeeded" } else { "failed" }),
                        Arg::IntOpt(attempt.response_status.map(i64::from)),
                        Arg::TextOpt(attempt.error.as_deref()),
                        Arg::Int(attempt.at.as_millis()),
                    ],
                ),
                (
                    "UPDATE webhook_deliveries SET status = $1, attempts = $2,
                       next_attempt_at = COALESCE($3, next_attempt_at), locked_until = 0
                     WHERE id = $4",
                    vec![
                        Arg::Text(status),
                        Arg::Int(i64::from(attempt.attempt)),
                        Arg::IntOpt(attempt.retry_at.map(Timestamp::as_millis)),
                        delivery,
                    ],
                ),
            ])
            .await?;
        if changed.first() == Some(&0) {
            return Err(corrupt(format!(
                "webhook delivery {} is not stored",
                attempt.delivery_id
            )));
        }
        Ok(())
    }
}

/// [`DELIVERY_INSERT`] for an endpoint that is live (not deleted) as the statement runs.
const REDELIVERY_INSERT: &str = "INSERT INTO webhook_deliveries
      (tenant_id, environment, endpoint_id, event_id, event_seq, end_user_id, status, next_attempt_at)
    SELECT $1, $2, id, $4, $5, $6, 'pending', $7 FROM webhook_endpoints
     WHERE tenant_id = $1 AND environment = $2 AND id = $3 AND deleted_at IS NULL";

/// A delivery of an event to an endpoint, pending from `$7`: tenant, environment,
/// endpoint, event id, event position, end user.
pub(crate) const DELIVERY_INSERT: &str = "INSERT INTO webhook_deliveries
      (tenant_id, environment, endpoint_id, event_id, event_seq, end_user_id, status, next_attempt_at)
    VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7)";
