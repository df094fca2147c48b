//! The change feed's reads that both sqlx backends run alike; each backend's
//! [`FeedStore`](crate::store::FeedStore) answers with these.

use ledger::EndUserState;

use super::{Arg, Side, Sql, scoped};
use crate::store::columns::{Columns, parse_state};
use crate::store::{Env, StoreResult};

/// The newest position of the environment's feed, or the purge watermark past it.
pub(crate) async fn last_change<S: Sql>(store: &S, env: &Env) -> StoreResult<i64> {
    let sql = "SELECT COALESCE(MAX(seq), 0) AS seq FROM changes WHERE tenant_id = $1 AND environment = $2";
    let row = store
        .fetch_optional(Side::Read, sql, &scoped(env, &[]))
        .await?;
    let last = row.map(|row| row.int("seq")).transpose()?.unwrap_or(0);
    Ok(last.max(purged_through(store, env).await?))
}

/// The newest position purged from the environment's feed (0 for none).
pub(crate) async fn purged_through<S: Sql>(store: &S, env: &Env) -> StoreResult<i64> {
    let sql =
        "SELECT purged_through FROM change_watermarks WHERE tenant_id = $1 AND environment = $2";
    let row = store
        .fetch_optional(Side::Read, sql, &scoped(env, &[]))
        .await?;
    Ok(row
        .map(|row| row.int("purged_through"))
        .transpose()?
        .unwrap_or(0))
}

/// A page of the environment's end users' states in id order, after `after`.
pub(crate) async fn end_user_states<S: Sql>(
    store: &S,
    env: &Env,
    after: Option<&str>,
    limit: u32,
) -> StoreResult<Vec<EndUserState>> {
    let sql = "SELECT state FROM end_users WHERE tenant_id = $1 AND environment = $2
                 AND state IS NOT NULL AND ($3 IS NULL OR end_user_id > $3)
               ORDER BY end_user_id LIMIT $4";
    let args = scoped(env, &[Arg::TextOpt(after), Arg::Int(i64::from(limit))]);
    let rows = store.fetch_all(Side::Read, sql, &args).await?;
    rows.iter()
        .map(|row| parse_state(&row.text("state")?))
        .collect()
}
