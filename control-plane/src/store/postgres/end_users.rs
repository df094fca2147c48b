//! PostgreSQL: end users' state and the history it produced
//! ([`LedgerStore`](crate::store::LedgerStore)).

use std::collections::BTreeMap;

use async_trait::async_trait;
use ledger::{EndUserId, EndUserState, Timestamp};
use sqlx::{PgConnection, Row};

use super::write::{Rows, persist};
use super::{PostgresStore, limit, parse_state, state_of};
use crate::store::{
    CLAIM_LEASE_MS, Claim, ClaimingFn, EntryFilter, EntryPoint, Env, LedgerStore, MutateFn,
    Mutation, StoreError, StoreResult, claimed_flags, claims_to_insert, unchanged, user_key,
};

#[async_trait]
impl LedgerStore for PostgresStore {
    async fn mutate(
        &self,
        target: Mutation<'_>,
        operation: &mut ClaimingFn<'_>,
    ) -> StoreResult<()> {
        let (env, end_user, now, claims) = (target.env, target.end_user, target.now, target.claims);
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let old = lock_state(&mut tx, env, end_user, now)
            .await?
            .unwrap_or_else(|| EndUserState::new(end_user.clone(), now));
        let claimed = claim_keys(&mut tx, env, claims).await?;
        let mut state = old.clone();
        let changes = match operation(&mut state, &claimed) {
            Ok(changes) if !changes.is_empty() => changes,
            outcome => {
                // At once rather than when the pool next pings the connection: the end
                // user's row stays locked until the rollback reaches the server (and a
                // placeholder row for a new end user is not kept).
                if let Err(rollback) = tx.rollback().await {
                    tracing::warn!(error = %rollback, "rolling back a refused mutation failed");
                }
                outcome?;
                return unchanged(&old, &state);
            }
        };
        persist(&mut tx, env, &old, &state, &changes, now).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    /// One transaction: every end user's row locked first (in id order, one
    /// statement), then every group's keys claimed (in key order, one statement), then
    /// each group's operation run, and what of it may meet another transaction's
    /// writes (usage event keys, fenced idempotency answers) written in a savepoint of
    /// its own, so that such a failure is that group's alone; then every committed
    /// group's other rows written together, the feed head last: the lock order of
    /// `mutate_many`, and one feed-head lock and one commit for all of them. A group
    /// that fails gives its claimed keys back. Mutations of different environments or
    /// times, or an end user twice, run one by one.
    async fn mutate_each(
        &self,
        each: &mut [(Mutation<'_>, &mut ClaimingFn<'_>)],
    ) -> StoreResult<Vec<StoreResult<()>>> {
        let Some(((first, _), rest)) = each.split_first() else {
            return Ok(Vec::new());
        };
        let (env, now) = (first.env, first.now);
        let mut order: Vec<usize> = (0..each.len()).collect();
        order.sort_by(|a, b| each[*a].0.end_user.cmp(each[*b].0.end_user));
        let shared = rest
            .iter()
            .all(|(target, _)| target.env == env && target.now == now)
            && order
                .windows(2)
                .all(|pair| each[pair[0]].0.end_user != each[pair[1]].0.end_user);
        if !shared {
            let mut outcomes = Vec::with_capacity(each.len());
            for (target, operation) in each.iter_mut() {
                outcomes.push(self.mutate(*target, &mut **operation).await);
            }
            return Ok(outcomes);
        }
        let ids: Vec<&str> = order
            .iter()
            .map(|index| each[*index].0.end_user.as_str())
            .collect();
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let mut stored = lock_states(&mut tx, env, &ids, now).await?;
        // Every group's keys in one statement, in key order (as lease batches take
        // theirs), so that transactions claiming the same keys never wait on each other
        // in a circle. A group that fails gives its claims back.
        let claims: Vec<Claim> = order
            .iter()
            .flat_map(|index| each[*index].0.claims.iter().cloned())
            .collect();
        let mut flags = claim_keys(&mut tx, env, &claims).await?.into_iter();
        let mut outcomes: Vec<StoreResult<()>> = each.iter().map(|_| Ok(())).collect();
        let mut rows = Rows::default();
        for index in order {
            let (target, operation) = &mut each[index];
            let claimed: Vec<bool> = flags.by_ref().take(target.claims.len()).collect();
            let old = stored
                .remove(target.end_user.as_str())
                .flatten()
                .unwrap_or_else(|| EndUserState::new(target.end_user.clone(), now));
            let mut state = old.clone();
            let mut staged = Rows::default();
            let mut outcome = operation(&mut state, &claimed)
                .and_then(|changes| staged.stage(&old, &state, &changes));
            if outcome.is_ok() && staged.has_contended() {
                // What another transaction may have written first, in a savepoint of
                // its own: its failure is this group's alone.
                sqlx::query("SAVEPOINT end_user").execute(&mut *tx).await?;
                outcome = staged.write_contended(&mut tx, env, now).await;
                if outcome.is_err() {
                    sqlx::query("ROLLBACK TO SAVEPOINT end_user")
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query("RELEASE SAVEPOINT end_user")
                    .execute(&mut *tx)
                    .await?;
            }
            match outcome {
                Ok(()) => rows.absorb(staged),
                Err(error) => {
                    for (claim, held) in target.claims.iter().zip(&claimed) {
                        if *held {
                            rows.release(claim.key.clone());
                        }
                    }
                    if let Some(slot) = outcomes.get_mut(index) {
                        *slot = Err(error);
                    }
                }
            }
        }
        rows.flush(&mut tx, env, now).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(outcomes)
    }

    async fn mutate_many(
        &self,
        env: &Env,
        now: Timestamp,
        items: &mut [(EndUserId, &mut MutateFn<'_>)],
    ) -> StoreResult<()> {
        // Every end user's row is locked (in id order, by one statement) and every
        // operation run before the first write: writing appends to the feeds, which takes
        // the environment's feed head, and the lock order must stay end user rows, then
        // feed head.
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let ids: Vec<&str> = items
            .iter()
            .map(|(end_user, _)| end_user.as_str())
            .collect();
        let mut stored = lock_states(&mut tx, env, &ids, now).await?;
        let mut results = Vec::with_capacity(items.len());
        for (end_user, operation) in items.iter_mut() {
            let old = stored
                .remove(end_user.as_str())
                .flatten()
                .unwrap_or_else(|| EndUserState::new(end_user.clone(), now));
            let mut state = old.clone();
            match operation(&mut state) {
                Ok(changes) => results.push((old, state, changes)),
                Err(error) => {
                    if let Err(rollback) = tx.rollback().await {
                        tracing::warn!(error = %rollback, "rolling back a refused batch failed");
                    }
                    return Err(error);
                }
            }
        }
        let mut rows = Rows::default();
        for (old, state, changes) in &results {
            rows.stage(old, state, changes)?;
        }
        rows.flush(&mut tx, env, now).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    async fn entry_points(
        &self,
        env: &Env,
        end_user: &str,
        limit: u32,
    ) -> StoreResult<Vec<EntryPoint>> {
        // The two figures are cut from the body's text rather than parsed as JSON (a
        // third of the time for a busy end user's 10,000 entries, docs/BENCHMARKS.md).
        // The body is this program's compact serde_json of `protocol::LedgerEntry`:
        // the first `"amount":` is the top-level key (it comes before `parts`, and a key
        // inside a string value would have its quotes escaped), as is the first
        // `"balance_after":` (before `metadata`); each number ends at a comma. The
        // store tests compare these with the entries read whole.
        let rows = bind!(sqlx::query(
            "SELECT seq, type, created_at,
                    split_part(split_part(body, '\"amount\":', 2), ',', 1)::BIGINT AS amount,
                    split_part(split_part(body, '\"balance_after\":', 2), ',', 1)::BIGINT AS balance_after
               FROM entries WHERE tenant_id = $1 AND environment = $2 AND user_key = $3 AND end_user_id = $4
              ORDER BY seq DESC LIMIT $5",
        ); &env.tenant_id, env.environment.as_str(), user_key(env, end_user), end_user,
            i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(crate::store::columns::entry_point)
            .collect()
    }

    async fn entries(
        &self,
        env: &Env,
        filter: &EntryFilter,
    ) -> StoreResult<Vec<(i64, protocol::LedgerEntry)>> {
        // Two texts rather than `($3 IS NULL OR end_user_id = $3)`, which a generic plan
        // could not serve from the end user's index.
        let query = match &filter.end_user_id {
            Some(end_user) => bind!(sqlx::query(
                "SELECT seq, body FROM entries WHERE tenant_id = $1 AND environment = $2
                   AND user_key = $3 AND end_user_id = $4 AND ($5::TEXT IS NULL OR type = $5)
                   AND ($6::BIGINT IS NULL OR created_at >= $6) AND ($7::BIGINT IS NULL OR created_at < $7)
                   AND seq < $8
                 ORDER BY seq DESC LIMIT $9",
            ); &env.tenant_id, env.environment.as_str(), user_key(env, end_user))
            .bind(end_user),
            None => bind!(sqlx::query(
                "SELECT seq, body FROM entries WHERE tenant_id = $1 AND environment = $2
                   AND ($3::TEXT IS NULL OR type = $3)
                   AND ($4::BIGINT IS NULL OR created_at >= $4) AND ($5::BIGINT IS NULL OR created_at < $5)
                   AND seq < $6
                 ORDER BY seq DESC LIMIT $7",
            ); &env.tenant_id)
            .bind(env.environment.as_str()),
        };
        let (from, to) = (
            filter.from.map(Timestamp::as_millis),
            filter.to.map(Timestamp::as_millis),
        );
        let before = filter.before_seq.unwrap_or(i64::MAX);
        let rows = bind!(query; &filter.entry_type, from, to, before, limit(filter.limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("seq")?,
                    serde_json::from_str(&row.try_get::<String, _>("body")?)?,
                ))
            })
            .collect()
    }
}

/// Locks the end user's row for the rest of the transaction and returns its state
/// (`None` for an end user never stored). An unknown end user gets a placeholder row
/// first, so there is always a row to lock; concurrent first mutations wait on its
/// insert.
pub(super) async fn lock_state(
    connection: &mut PgConnection,
    env: &Env,
    end_user: &EndUserId,
    now: Timestamp,
) -> StoreResult<Option<EndUserState>> {
    const LOCK: &str = "SELECT state FROM end_users WHERE tenant_id = $1 AND environment = $2 AND end_user_id = $3 FOR UPDATE";
    let row = bind!(sqlx::query(LOCK); &env.tenant_id, env.environment.as_str(), end_user.as_str())
        .fetch_optional(&mut *connection)
        .await?;
    if row.is_some() {
        return state_of(row);
    }
    bind!(sqlx::query(
        "INSERT INTO end_users (tenant_id, environment, end_user_id, state, version, updated_at)
         VALUES ($1, $2, $3, NULL, 0, $4) ON CONFLICT (tenant_id, environment, end_user_id) DO NOTHING",
    ); &env.tenant_id, env.environment.as_str(), end_user.as_str(), now.as_millis())
    .execute(&mut *connection)
    .await?;
    let row = bind!(sqlx::query(LOCK); &env.tenant_id, env.environment.as_str(), end_user.as_str())
        .fetch_optional(&mut *connection)
        .await?;
    if row.is_none() {
        return Err(StoreError::Transient(format!(
            "end user `{end_user}` vanished while being locked"
        )));
    }
    state_of(row)
}

/// Locks several end users' rows, in id order, for the rest of the transaction and
/// returns their states by id (`None` for an end user never stored): [`lock_state`] for
/// a batch, with one statement for the placeholders and one for the locks. `ids` must be
/// sorted, so that concurrent batches lock (and insert) in the same order.
async fn lock_states(
    connection: &mut PgConnection,
    env: &Env,
    ids: &[&str],
    now: Timestamp,
) -> StoreResult<BTreeMap<String, Option<EndUserState>>> {
    bind!(sqlx::query(
        "INSERT INTO end_users (tenant_id, environment, end_user_id, state, version, updated_at)
         SELECT $1, $2, u.id, NULL, 0, $4 FROM UNNEST($3::text[]) WITH ORDINALITY AS u(id, position)
         ORDER BY u.position
         ON CONFLICT (tenant_id, environment, end_user_id) DO NOTHING",
    ); &env.tenant_id, env.environment.as_str(), ids, now.as_millis())
    .execute(&mut *connection)
    .await?;
    // One index probe and lock per end user, in `ids` order (see `usage_keys` for why
    // not a join: that one hashed every end user of the environment).
    let rows = bind!(sqlx::query(
        "SELECT e.end_user_id, e.state FROM UNNEST($3::text[]) WITH ORDINALITY AS k(id, position)
         CROSS JOIN LATERAL (
             SELECT end_user_id, state FROM end_users
             WHERE tenant_id = $1 AND environment = $2 AND end_user_id = k.id
             LIMIT 1 FOR UPDATE
         ) AS e
         ORDER BY k.position",
    ); &env.tenant_id, env.environment.as_str(), ids)
    .fetch_all(&mut *connection)
    .await?;
    if rows.len() != ids.len() {
        return Err(StoreError::Transient(format!(
            "{} of {} end users vanished while being locked",
            ids.len().saturating_sub(rows.len()),
            ids.len()
        )));
    }
    let mut states = BTreeMap::new();
    for row in rows {
        let id: String = row.try_get("end_user_id")?;
        let state: Option<String> = row.try_get("state")?;
        states.insert(id, state.as_deref().map(parse_state).transpose()?);
    }
    Ok(states)
}

/// Inserts `claims` unanswered (see [`Claim`]), in key order; which of them this
/// transaction holds. A key another open transaction inserted waits for it to end (then
/// it is not ours); one already stored is not ours.
async fn claim_keys(
    connection: &mut PgConnection,
    env: &Env,
    claims: &[Claim],
) -> StoreResult<Vec<bool>> {
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let ordered = claims_to_insert(claims);
    let keys: Vec<&str> = ordered.iter().map(|claim| claim.key.as_str()).collect();
    let fingerprints: Vec<&[u8]> = ordered
        .iter()
        .map(|claim| claim.fingerprint.as_slice())
        .collect();
    let locked: Vec<i64> = ordered
        .iter()
        .map(|claim| claim.now.as_millis().saturating_add(CLAIM_LEASE_MS))
        .collect();
    let keep: Vec<i64> = ordered
        .iter()
        .map(|claim| claim.keep_until.as_millis())
        .collect();
    let taken: std::collections::HashSet<String> = bind!(sqlx::query_scalar(
        "INSERT INTO idempotency (tenant_id, environment, key, fingerprint, locked_until, keep_until)
         SELECT $1, $2, c.key, c.fingerprint, c.locked_until, c.keep_until
         FROM UNNEST($3::text[], $4::bytea[], $5::int8[], $6::int8[]) WITH ORDINALITY
           AS c(key, fingerprint, locked_until, keep_until, position)
         ORDER BY c.position
         ON CONFLICT DO NOTHING RETURNING key",
    ); &env.tenant_id, env.environment.as_str(), keys, fingerprints, locked, keep)
    .fetch_all(&mut *connection)
    .await?
    .into_iter()
    .collect();
    Ok(claimed_flags(claims, &taken))
}
