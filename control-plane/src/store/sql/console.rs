//! The console's reads ([`ConsoleStore`]) on either sqlx backend: end users by recent
//! activity, an end user's events, and webhook deliveries newest first.

use async_trait::async_trait;

use super::{Arg, Side, Sql, scoped};
use crate::store::columns::{Columns, corrupt, event, parse_state};
use crate::store::{
    ConsoleStore, DeliveryRow, EndUserPage, EndUserRow, Env, EventRecord, StoreResult,
};

/// The states of the page of end users `$ids` selects (`end_user_id, active_minute`,
/// newest minute first, by `$1` tenant and `$2` environment), in its order: the page's
/// ids first, then their states by primary key, so that no plan joins more than a page.
macro_rules! states_page {
    ($ids:literal) => {
        concat!(
            "SELECT u.end_user_id, u.state, u.updated_at, a.active_minute FROM (",
            $ids,
            ") AS a JOIN end_users AS u
               ON u.tenant_id = $1 AND u.environment = $2 AND u.end_user_id = a.end_user_id
             WHERE u.state IS NOT NULL
             ORDER BY a.active_minute DESC, a.end_user_id"
        )
    };
}

/// The most end users a prefix search considers (the first in id order).
pub(crate) const PREFIX_MATCHES: i64 = 10_000;

#[async_trait]
impl<S: Sql> ConsoleStore for S {
    async fn recent_end_users(
        &self,
        env: &Env,
        page: EndUserPage<'_>,
    ) -> StoreResult<Vec<EndUserRow>> {
        let EndUserPage {
            prefix,
            after,
            limit,
        } = page;
        let (tenant, environment) = (
            Arg::Text(&env.tenant_id),
            Arg::Text(env.environment.as_str()),
        );
        let limit = Arg::Int(i64::from(limit));
        // Newest minute of activity first, ties (one minute) by id; a page resumes after
        // the last row.
        let rows = match (prefix, after) {
            // `end_user_activity_recent` from its newest end, or from the cursor on (a
            // range); each statement takes its page of ids first, then their states by
            // primary key, so that no plan joins more than a page.
            (None, None) => {
                self.fetch_all(
                    Side::Read,
                    states_page!(
                        "SELECT end_user_id, active_minute FROM end_user_activity
                              WHERE tenant_id = $1 AND environment = $2
                              ORDER BY active_minute DESC, end_user_id LIMIT $3"
                    ),
                    &[tenant, environment, limit],
                )
                .await?
            }
            (None, Some(cursor)) => {
                self.fetch_all(
                    Side::Read,
                    states_page!(
                        "SELECT end_user_id, active_minute FROM end_user_activity
                              WHERE tenant_id = $1 AND environment = $2
                                AND active_minute <= $3 AND (active_minute < $3 OR end_user_id > $4)
                              ORDER BY active_minute DESC, end_user_id LIMIT $5"
                    ),
                    &[
                        tenant,
                        environment,
                        Arg::Int(cursor.active_minute),
                        Arg::Text(&cursor.end_user_id),
                        limit,
                    ],
                )
                .await?
            }
            // A search reads the ids that start with the prefix through the primary key
            // (a range), at most PREFIX_MATCHES of them in id order, and sorts those by
            // recency: its cost is bounded whatever the environment's size.
            (Some(prefix), cursor) => {
                let upper = format!("{prefix}\u{10FFFF}");
                self.fetch_all(
                    Side::Read,
                    states_page!(
                        "SELECT end_user_id, active_minute
                               FROM (SELECT end_user_id, active_minute FROM end_user_activity
                                      WHERE tenant_id = $1 AND environment = $2
                                        AND end_user_id >= $3 AND end_user_id < $4
                                      ORDER BY end_user_id LIMIT $5) AS m
                              WHERE $6 IS NULL OR active_minute < $6 OR (active_minute = $6 AND end_user_id > $7)
                              ORDER BY active_minute DESC, end_user_id LIMIT $8"
                    ),
                    &[
                        tenant,
                        environment,
                        Arg::Text(prefix),
                        Arg::Text(&upper),
                        Arg::Int(PREFIX_MATCHES),
                        Arg::IntOpt(cursor.map(|cursor| cursor.active_minute)),
                        Arg::Text(cursor.map_or("", |cursor| cursor.end_user_id.as_str())),
                        limit,
                    ],
                )
                .await?
            }
        };
        rows.iter()
            .map(|row| {
                Ok(EndUserRow {
                    state: parse_state(&row.text("state")?)?,
                    updated_at: row.int("updated_at")?,
                    active_minute: row.int("active_minute")?,
                })
            })
            .collect()
    }

    async fn end_user_events(
        &self,
        env: &Env,
        end_user: &str,
        limit: u32,
    ) -> StoreResult<Vec<EventRecord>> {
        let sql = "SELECT seq, body FROM events
                 WHERE tenant_id = $1 AND environment = $2 AND end_user_id = $3
                 ORDER BY seq DESC LIMIT $4";
        let args = scoped(env, &[Arg::Text(end_user), Arg::Int(i64::from(limit))]);
        let rows = self.fetch_all(Side::Read, sql, &args).await?;
        rows.iter().map(event).collect()
    }

    async fn recent_deliveries(&self, env: &Env, limit: u32) -> StoreResult<Vec<DeliveryRow>> {
        let sql = "SELECT d.id, d.endpoint_id, d.event_id, d.status, d.attempts, d.next_attempt_at,
                        e.type AS event_type, e.created_at AS event_at,
                        (SELECT a.response_status FROM webhook_attempts a
                          WHERE a.delivery_id = d.id ORDER BY a.attempt DESC LIMIT 1) AS last_response,
                        (SELECT a.error FROM webhook_attempts a
                          WHERE a.delivery_id = d.id ORDER BY a.attempt DESC LIMIT 1) AS last_error
                   FROM webhook_deliveries d
                   LEFT JOIN events e ON e.id = d.event_id
                  WHERE d.tenant_id = $1 AND d.environment = $2
                  ORDER BY d.id DESC LIMIT $3";
        let args = scoped(env, &[Arg::Int(i64::from(limit))]);
        let rows = self.fetch_all(Side::Read, sql, &args).await?;
        rows.iter()
            .map(|row| {
                Ok(DeliveryRow {
                    id: row.int("id")?,
                    endpoint_id: row.text("endpoint_id")?,
                    event_id: row.text("event_id")?,
                    event_type: row.text_opt("event_type")?,
                    event_at: row.time_opt("event_at")?,
                    status: row.text("status")?,
                    attempts: u32::try_from(row.int("attempts")?)
                        .map_err(|_| corrupt("delivery attempts"))?,
                    next_attempt_at: row.time("next_attempt_at")?,
                    last_response_status: row
                        .int_opt("last_response")?
                        .and_then(|status| u16::try_from(status).ok()),
                    last_error: row.text_opt("last_error")?,
                })
            })
            .collect()
    }
}
