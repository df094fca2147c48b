//! SQLite: end users' state and the history it produced
//! ([`LedgerStore`](crate::store::LedgerStore)).

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use ledger::{EndUserId, EndUserState, Timestamp};
use sqlx::{Row, SqliteConnection};

use super::{CHAIN_STEPS, SqliteStore, corrupt, read, write};
use crate::store::{
    Changes, ClaimingFn, EntryFilter, EntryPoint, Env, LedgerStore, MutateFn, Mutation, StoreError,
    StoreResult, stage_rows,
};

/// How far behind the change feed's newest position a kept state may be to be used: the
/// writer reads the feed after the oldest state a batch uses, so an older one is read
/// again instead.
const KEPT_WINDOW: i64 = 32;

/// An environment's entries, newest first: its runs of entries newest first, each read
/// newest first (migration 0008). The runs' key is unique, so SQLite walks both in order
/// and stops at the limit without sorting (a test checks the plan). Binds: tenant,
/// environment, before (the cursor), type, from, to, limit.
pub(super) const ENVIRONMENT_ENTRIES: &str = "SELECT e.seq, e.body FROM entry_runs AS r
       JOIN entries AS e ON e.seq BETWEEN r.first_seq AND MIN(r.last_seq, ?3 - 1)
      WHERE r.tenant_id = ?1 AND r.environment = ?2 AND r.first_seq < ?3
        AND e.tenant_id = ?1 AND e.environment = ?2
        AND (?4 IS NULL OR e.type = ?4)
        AND (?5 IS NULL OR e.created_at >= ?5) AND (?6 IS NULL OR e.created_at < ?6)
      ORDER BY r.first_seq DESC, e.seq DESC LIMIT ?7";

impl SqliteStore {
    /// One end user's entries, newest first: a walk down its chain of entries (each
    /// names the previous one; the end user's row names the newest), [`CHAIN_STEPS`]
    /// links a statement, keeping those the filter takes, until `limit` are found or the
    /// chain ends. The chain is only ever extended at its head, so the walk needs no
    /// single snapshot.
    async fn entries_of(
        &self,
        env: &Env,
        end_user: &str,
        filter: &EntryFilter,
    ) -> StoreResult<Vec<(i64, protocol::LedgerEntry)>> {
        let mut connection = self.reader.acquire().await?;
        let (mut next, before) = chain_start(&mut connection, env, end_user, filter).await?;
        let limit = usize::try_from(filter.limit).unwrap_or(usize::MAX);
        let unfiltered = filter.entry_type.is_none()
            && filter.from.is_none()
            && filter.to.is_none()
            && before.is_none();
        // An unfiltered page takes every link it reads.
        let steps = if unfiltered {
            i64::from(filter.limit).clamp(1, CHAIN_STEPS)
        } else {
            CHAIN_STEPS
        };
        let mut found = Vec::new();
        while let Some(start) = next {
            if found.len() >= limit {
                break;
            }
            let rows = bind!(sqlx::query(
                "WITH RECURSIVE chain(seq) AS (
                     SELECT ?
                     UNION ALL
                     SELECT e.prev_seq FROM entries AS e JOIN chain ON e.seq = chain.seq
                      WHERE e.prev_seq < e.seq
                     LIMIT ?
                 )
                 SELECT e.seq, e.prev_seq, e.end_user_id, e.tenant_id, e.environment, e.type, e.created_at
                   FROM chain JOIN entries AS e ON e.seq = chain.seq
                  ORDER BY e.seq DESC",
            ); start, steps)
            .fetch_all(&mut *connection)
            .await?;
            if rows.is_empty() {
                return Err(corrupt(format!(
                    "the chain of end user `{end_user}` names entry {start}, which does not exist"
                )));
            }
            next = None;
            let mut newer = start.saturating_add(1);
            for row in &rows {
                let seq: i64 = row.try_get("seq")?;
                // Links only ever lead to older entries: anything else would walk forever.
                if seq >= newer {
                    return Err(corrupt(format!(
                        "the chain of end user `{end_user}` does not lead to older entries at {seq}"
                    )));
                }
                newer = seq;
                let owner: String = row.try_get("end_user_id")?;
                let tenant: String = row.try_get("tenant_id")?;
                let environment: String = row.try_get("environment")?;
                if owner != end_user
                    || tenant != env.tenant_id
                    || environment != env.environment.as_str()
                {
                    return Err(corrupt(format!(
                        "entry {seq} is in the chain of end user `{end_user}` but belongs to `{owner}`"
                    )));
                }
                next = row.try_get("prev_seq")?;
                if next.is_some_and(|prev| prev >= seq) {
                    return Err(corrupt(format!(
                        "entry {seq} of end user `{end_user}` links to a newer entry"
                    )));
                }
                let created_at: i64 = row.try_get("created_at")?;
                let taken = before.is_none_or(|before| seq < before)
                    && filter.entry_type.as_deref().is_none_or(|wanted| {
                        row.try_get::<&str, _>("type").is_ok_and(|t| t == wanted)
                    })
                    && filter
                        .from
                        .is_none_or(|from| created_at >= from.as_millis())
                    && filter.to.is_none_or(|to| created_at < to.as_millis());
                if taken {
                    found.push(seq);
                    if found.len() >= limit {
                        break;
                    }
                }
            }
        }
        // The walk reads no body: a filtered listing may pass thousands of entries to
        // find a page, and only the page's bodies are read and parsed.
        bodies_of(&mut connection, end_user, &found).await
    }

    /// The newest `limit` entries of `end_user` as the console's charts need them,
    /// walking the chain with the figures read in SQLite (no body leaves it).
    async fn points_of(
        &self,
        env: &Env,
        end_user: &str,
        limit: u32,
    ) -> StoreResult<Vec<EntryPoint>> {
        let rows = bind!(sqlx::query(
            "WITH RECURSIVE chain(seq) AS (
                 SELECT last_entry_seq FROM end_users
                  WHERE tenant_id = ? AND environment = ? AND end_user_id = ? AND last_entry_seq IS NOT NULL
                 UNION ALL
                 SELECT e.prev_seq FROM entries AS e JOIN chain ON e.seq = chain.seq
                  WHERE e.prev_seq < e.seq
                 LIMIT ?
             )
             SELECT e.seq, e.end_user_id, e.type, e.created_at,
                    json_extract(e.body, '$.amount') AS amount,
                    json_extract(e.body, '$.balance_after') AS balance_after
               FROM chain JOIN entries AS e ON e.seq = chain.seq
              ORDER BY e.seq DESC",
        ); &env.tenant_id, env.environment.as_str(), end_user, i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                if row.try_get::<&str, _>("end_user_id")? != end_user {
                    return Err(corrupt(format!(
                        "the chain of end user `{end_user}` holds another end user's entry"
                    )));
                }
                crate::store::columns::entry_point(row)
            })
            .collect()
    }

    /// Runs a batch's operations, and renders their rows, on the states this process
    /// kept or a reader reads (one snapshot with the feed's position, which it returns),
    /// before the writer is taken: see `mutate_many`.
    fn run_optimistically(
        &self,
        env: &Env,
        now: Timestamp,
        items: &mut [(EndUserId, &mut MutateFn<'_>)],
        ids: &[&str],
    ) -> StoreResult<(i64, Vec<Optimistic>)> {
        let kept = self.states.get_many(env, ids);
        // One read transaction: the feed's position and the states not kept (or kept
        // from too long ago) are one snapshot.
        let (read_at, mut seen, cached) = self.readers.read(|tx| {
            let read_at = read::feed_position(tx)?;
            let recent = read_at.saturating_sub(KEPT_WINDOW);
            let cached: Vec<_> = kept
                .into_iter()
                .map(|kept| kept.filter(|kept| kept.at >= recent))
                .collect();
            let missing: Vec<&str> = ids
                .iter()
                .zip(&cached)
                .filter(|(_, cached)| cached.is_none())
                .map(|(id, _)| *id)
                .collect();
            let seen = if missing.is_empty() {
                BTreeMap::new()
            } else {
                write::load_states(tx, env, &missing)?
            };
            Ok((read_at, seen, cached))
        })?;
        let mut prepared = Vec::with_capacity(items.len());
        for ((end_user, operation), cached) in items.iter_mut().zip(cached) {
            let (old, head, basis) = match cached {
                Some(cached) => (cached.state.as_ref().clone(), cached.head, cached.at),
                None => {
                    let (old, head) = seen
                        .remove(end_user.as_str())
                        .unwrap_or_else(|| (EndUserState::new(end_user.clone(), now), None));
                    (old, head, read_at)
                }
            };
            let mut state = old.clone();
            // A refusal is not final: the state it saw may be stale.
            let run = operation(&mut state).ok().and_then(|changes| {
                let staged = if changes.is_empty() {
                    None
                } else {
                    Some(stage_rows(&old, &state, &changes).ok()?)
                };
                Some((changes, staged))
            });
            prepared.push(Optimistic {
                old,
                head,
                basis,
                state,
                run,
            });
        }
        Ok((read_at, prepared))
    }
}

/// The entries numbered `seqs` (of `end_user`), newest first.
async fn bodies_of(
    connection: &mut SqliteConnection,
    end_user: &str,
    seqs: &[i64],
) -> StoreResult<Vec<(i64, protocol::LedgerEntry)>> {
    let bodies = bind!(sqlx::query(
        "SELECT seq, body FROM entries WHERE seq IN (SELECT value FROM json_each(?)) ORDER BY seq DESC",
    ); serde_json::to_string(seqs)?)
    .fetch_all(&mut *connection)
    .await?;
    if bodies.len() != seqs.len() {
        return Err(corrupt(format!(
            "entries of end user `{end_user}` vanished while read"
        )));
    }
    bodies
        .iter()
        .map(|row| {
            Ok((
                row.try_get("seq")?,
                serde_json::from_str(row.try_get::<&str, _>("body")?)?,
            ))
        })
        .collect()
}

/// Where a walk down `end_user`'s chain starts: after the cursor's entry when it is this
/// end user's (the cursor a previous page gave), otherwise at the newest entry. Returns
/// the first link to read, and the cursor still to apply as a filter (one that is not
/// this end user's entry).
async fn chain_start(
    connection: &mut SqliteConnection,
    env: &Env,
    end_user: &str,
    filter: &EntryFilter,
) -> StoreResult<(Option<i64>, Option<i64>)> {
    let mut before = filter.before_seq;
    let mut next = None;
    if let Some(cursor) = before {
        let found: Option<Option<i64>> = bind!(sqlx::query_scalar(
            "SELECT prev_seq FROM entries WHERE seq = ? AND tenant_id = ? AND environment = ? AND end_user_id = ?",
        ); cursor, &env.tenant_id, env.environment.as_str(), end_user)
        .fetch_optional(&mut *connection)
        .await?;
        if let Some(prev) = found {
            next = prev;
            before = None;
        }
    }
    if before.is_some() || filter.before_seq.is_none() {
        next = sqlx::query_scalar::<_, Option<i64>>(
            "SELECT last_entry_seq FROM end_users WHERE tenant_id = ? AND environment = ? AND end_user_id = ?",
        )
        .bind(&env.tenant_id)
        .bind(env.environment.as_str())
        .bind(end_user)
        .fetch_optional(&mut *connection)
        .await?
        .flatten();
    }
    Ok((next, before))
}

/// One end user's mutation inside `tx`: loads its state, claims the keys, runs the
/// operation and writes what it changed.
fn write_mutation(
    tx: &rusqlite::Transaction<'_>,
    target: Mutation<'_>,
    operation: &mut ClaimingFn<'_>,
) -> StoreResult<()> {
    let (env, end_user, now, claims) = (target.env, target.end_user, target.now, target.claims);
    let (old, head) = write::load_state(tx, env, end_user.as_str())?
        .unwrap_or_else(|| (EndUserState::new(end_user.clone(), now), None));
    let claimed = write::claim_keys(tx, env, claims)?;
    let mut state = old.clone();
    let mut changes = operation(&mut state, &claimed)?;
    let mut rows = write::Rows::default();
    rows.heads.insert(end_user.to_string(), head);
    write::stage(tx, env, (&old, &state, &mut changes), now, &mut rows)?;
    rows.flush(tx, env, now)?;
    Ok(())
}

#[async_trait]
impl LedgerStore for SqliteStore {
    async fn mutate(
        &self,
        target: Mutation<'_>,
        operation: &mut ClaimingFn<'_>,
    ) -> StoreResult<()> {
        let _writer = self.writer.acquire().await.map_err(StoreError::from)?;
        self.direct
            .transaction(|tx| write_mutation(tx, target, operation))
    }

    /// One transaction, each mutation in a savepoint: one that fails is rolled back to
    /// its savepoint and the others go on. An error that ended the whole transaction
    /// (SQLite rolls back by itself on a full disk, say) fails them all.
    async fn mutate_each(
        &self,
        each: &mut [(Mutation<'_>, &mut ClaimingFn<'_>)],
    ) -> StoreResult<Vec<StoreResult<()>>> {
        let _writer = self.writer.acquire().await.map_err(StoreError::from)?;
        self.direct.transaction(|tx| {
            let mut outcomes = Vec::with_capacity(each.len());
            for (target, operation) in each.iter_mut() {
                tx.prepare_cached("SAVEPOINT end_user")?.execute([])?;
                let outcome = write_mutation(tx, *target, &mut **operation);
                if let Err(error) = outcome {
                    if tx.is_autocommit() {
                        return Err(error);
                    }
                    tx.prepare_cached("ROLLBACK TO end_user")?.execute([])?;
                    outcomes.push(Err(error));
                } else {
                    outcomes.push(Ok(()));
                }
                tx.prepare_cached("RELEASE end_user")?.execute([])?;
            }
            Ok(outcomes)
        })
    }

    /// Runs the batch's operations, and renders their rows, before taking the write
    /// lock, on states read from a reader, so that the writer is held only to write
    /// (loading states, the engine and rendering rows took 40% of a usage batch's time
    /// under the lock, docs/BENCHMARKS.md, P4). Every change of an end user's stored
    /// state appends to the change feed in the same transaction, so under the lock the
    /// feed since the states were read names every end user written in between; those
    /// (and any whose operation failed, which a newer state might not) are loaded again
    /// and their operations run again. States this process wrote are taken from its
    /// cache (`cache`) instead of read, checked the same way from the position they
    /// were written at.
    async fn mutate_many(
        &self,
        env: &Env,
        now: Timestamp,
        items: &mut [(EndUserId, &mut MutateFn<'_>)],
    ) -> StoreResult<()> {
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let owned: Vec<EndUserId> = items.iter().map(|(end_user, _)| end_user.clone()).collect();
        let ids: Vec<&str> = owned.iter().map(EndUserId::as_str).collect();
        let (read_at, prepared) = self.run_optimistically(env, now, items, &ids)?;
        // The states' oldest position: the feed after it names every end user changed
        // since its state was read or written.
        let since = prepared
            .iter()
            .map(|optimistic| optimistic.basis)
            .min()
            .unwrap_or(i64::MAX);
        let writer = self.writer.acquire().await.map_err(StoreError::from)?;
        let (spent, flushed) = self.direct.transaction(|tx| {
            let written = write::changed_since(tx, env, since)?;
            let is_stale = |optimistic: &Optimistic, end_user: &str| {
                optimistic.run.is_none() || written.changed_after(end_user, optimistic.basis)
            };
            let stale: Vec<&str> = ids
                .iter()
                .zip(&prepared)
                .filter(|(end_user, optimistic)| is_stale(optimistic, end_user))
                .map(|(end_user, _)| *end_user)
                .collect();
            let mut fresh = write::load_states(tx, env, &stale)?;
            let mut rows = write::Rows::with_capacity(items.len());
            // What the rows were rendered from, dropped once the writer is released.
            let mut spent = Vec::with_capacity(items.len());
            for ((end_user, operation), optimistic) in items.iter_mut().zip(prepared) {
                let fresh_enough = !is_stale(&optimistic, end_user.as_str());
                let (old, head, state, mut changes, staged) = match optimistic.run {
                    Some((changes, staged)) if fresh_enough => (
                        optimistic.old,
                        optimistic.head,
                        optimistic.state,
                        changes,
                        staged,
                    ),
                    _ => {
                        let (old, head) = fresh
                            .remove(end_user.as_str())
                            .unwrap_or_else(|| (EndUserState::new(end_user.clone(), now), None));
                        let mut state = old.clone();
                        let changes = operation(&mut state)?;
                        (old, head, state, changes, None)
                    }
                };
                rows.heads.insert(end_user.to_string(), head);
                let applied = (&old, &state, changes.as_mut_slice());
                match staged {
                    Some(staged) => {
                        write::stage_rendered(tx, env, applied, staged, now, &mut rows)?
                    }
                    None => write::stage(tx, env, applied, now, &mut rows)?,
                }
                spent.push((old, state, changes));
            }
            let flushed = rows.flush(tx, env, now)?;
            Ok((spent, flushed))
        })?;
        drop(writer);
        // Committed: the states written are kept for the next batches. The others' kept
        // states, if any, may be the stale ones an operation reran on (a rerun that
        // changed nothing writes nothing): forgotten, or every batch would rerun them.
        let written: HashSet<&str> = flushed.written.iter().map(String::as_str).collect();
        let unwritten: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|end_user| !written.contains(end_user))
            .collect();
        self.states.forget_many(env, &unwritten, read_at);
        if let Some(at) = flushed.at {
            let keep = spent.into_iter().filter_map(|(_, state, _)| {
                let end_user = state.end_user_id().as_str();
                let (_, head) = flushed.heads.get(end_user)?;
                written.contains(end_user).then_some((state, *head))
            });
            self.states.put_many(env, at, keep);
        }
        Ok(())
    }

    async fn entry_points(
        &self,
        env: &Env,
        end_user: &str,
        limit: u32,
    ) -> StoreResult<Vec<EntryPoint>> {
        self.points_of(env, end_user, limit).await
    }

    async fn entries(
        &self,
        env: &Env,
        filter: &EntryFilter,
    ) -> StoreResult<Vec<(i64, protocol::LedgerEntry)>> {
        if let Some(end_user) = &filter.end_user_id {
            return self.entries_of(env, end_user, filter).await;
        }
        let rows = bind!(sqlx::query(ENVIRONMENT_ENTRIES); &env.tenant_id,
            env.environment.as_str(), filter.before_seq.unwrap_or(i64::MAX), &filter.entry_type,
            filter.from.map(Timestamp::as_millis), filter.to.map(Timestamp::as_millis),
            filter.limit)
        .fetch_all(&self.reader)
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

/// An operation of a usage batch run before the write lock was taken (see
/// `mutate_many`).
struct Optimistic {
    old: EndUserState,
    head: Option<i64>,
    /// The feed position `old` is known to be current at (read or written there).
    basis: i64,
    state: EndUserState,
    /// What it wrote and the rows rendered from it; `None` if it failed.
    run: Option<(Vec<Changes>, Option<write::Staged>)>,
}
