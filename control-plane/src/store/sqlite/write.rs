//! The SQLite writer's end-user transactions (`mutate`, `mutate_many`) on the direct
//! connection (`direct.rs`): one cached prepared statement per kind of row, the rows an
//! operation stages, the entry chains, and the change feed written in the same
//! transaction.

use std::collections::{BTreeMap, HashMap, HashSet};

use ledger::{EndUserState, Timestamp};
use rusqlite::{OptionalExtension, Transaction, params};

use super::super::{
    BlockRow, CLAIM_LEASE_MS, Changes, Claim, EndpointRecord, EntryRow, Env, HeldTable,
    IdempotencyAnswer, StateRow, StoreResult, UsageKeyRecord, answered_elsewhere, claimed_flags,
    claims_to_insert, held_rows, stage_rows, unchanged, usage_key_taken,
};
use super::direct::unique_violation;
use super::{corrupt, parse_state};

/// The end user's state, with the sequence number of its newest entry (the head of its
/// chain of entries).
pub(super) fn load_state(
    tx: &Transaction<'_>,
    env: &Env,
    end_user: &str,
) -> StoreResult<Option<(EndUserState, Option<i64>)>> {
    let mut statement = tx.prepare_cached(
        "SELECT state, last_entry_seq FROM end_users WHERE tenant_id = ? AND environment = ? AND end_user_id = ?",
    )?;
    let row = statement
        .query_row(
            params![env.tenant_id, env.environment.as_str(), end_user],
            |row| Ok((row.get::<_, String>(0)?, row.get::<_, Option<i64>>(1)?)),
        )
        .optional()?;
    row.map(|(state, head)| Ok((parse_state(&state)?, head)))
        .transpose()
}

/// Several end users' states (with their chains' heads), by end user (those stored).
pub(super) fn load_states(
    tx: &Transaction<'_>,
    env: &Env,
    ids: &[&str],
) -> StoreResult<BTreeMap<String, (EndUserState, Option<i64>)>> {
    let mut states = BTreeMap::new();
    for id in ids {
        if let Some(found) = load_state(tx, env, id)? {
            states.insert((*id).to_owned(), found);
        }
    }
    Ok(states)
}

/// End users whose state changed after a feed position, with the position of their
/// newest change.
pub(super) struct Written {
    /// The feed after that position was purged in part: any end user may have changed.
    all: bool,
    users: HashMap<String, i64>,
}

impl Written {
    /// Whether `end_user`'s state changed after feed position `basis` (at or after the
    /// position the feed was read from).
    pub(super) fn changed_after(&self, end_user: &str, basis: i64) -> bool {
        self.all
            || self
                .users
                .get(end_user)
                .is_some_and(|newest| *newest > basis)
    }
}

/// The environment's end users whose state changed after feed position `after`.
pub(super) fn changed_since(tx: &Transaction<'_>, env: &Env, after: i64) -> StoreResult<Written> {
    // A purge deletes by the environment's clock, which may stand still (a test clock):
    // if it took entries past `after`, the feed cannot say who changed.
    let purged: Option<i64> = tx
        .prepare_cached(
            "SELECT purged_through FROM change_watermarks WHERE tenant_id = ? AND environment = ?",
        )?
        .query_row(params![env.tenant_id, env.environment.as_str()], |row| {
            row.get(0)
        })
        .optional()?;
    if purged.is_some_and(|purged| purged > after) {
        return Ok(Written {
            all: true,
            users: HashMap::new(),
        });
    }
    let mut statement = tx.prepare_cached(
        "SELECT seq, end_user_id, end_user_ids FROM changes WHERE tenant_id = ? AND environment = ? AND seq > ? ORDER BY seq",
    )?;
    let mut rows = statement.query(params![env.tenant_id, env.environment.as_str(), after])?;
    let mut users = HashMap::new();
    while let Some(row) = rows.next()? {
        // In order: each end user ends with its newest change.
        let seq: i64 = row.get(0)?;
        if let Some(end_user) = row.get::<_, Option<String>>(1)? {
            users.insert(end_user, seq);
        }
        if let Some(several) = row
            .get_ref(2)?
            .as_str_or_null()
            .map_err(rusqlite::Error::from)?
        {
            for end_user in serde_json::from_str::<Vec<String>>(several)? {
                users.insert(end_user, seq);
            }
        }
    }
    Ok(Written { all: false, users })
}

/// Inserts `claims` unanswered (see [`Claim`]); which of them this transaction holds.
/// The writer is this transaction's alone, so no other request can take a key between
/// this insert and the answer stored before commit.
pub(super) fn claim_keys(
    tx: &Transaction<'_>,
    env: &Env,
    claims: &[Claim],
) -> StoreResult<Vec<bool>> {
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let mut statement = tx.prepare_cached(
        "INSERT INTO idempotency (tenant_id, environment, key, fingerprint, locked_until, keep_until) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )?;
    let mut taken = HashSet::new();
    for claim in claims_to_insert(claims) {
        let inserted = statement.execute(params![
            env.tenant_id,
            env.environment.as_str(),
            claim.key,
            claim.fingerprint.as_slice(),
            claim.now.as_millis().saturating_add(CLAIM_LEASE_MS),
            claim.keep_until.as_millis(),
        ])?;
        if inserted == 1 {
            taken.insert(claim.key.clone());
        }
    }
    Ok(claimed_flags(claims, &taken))
}

/// Stores the idempotent answers of a transaction's operations, fenced: every key must
/// still be unanswered. If another request answered one first (a lease that expired
/// while its operation waited, and a retry that took the key over), the whole
/// transaction rolls back with a retryable error rather than apply the request twice; a
/// retry then replays the stored answer.
fn store_answers(
    tx: &Transaction<'_>,
    env: &Env,
    answers: &[IdempotencyAnswer],
) -> StoreResult<()> {
    if answers.is_empty() {
        return Ok(());
    }
    let mut statement = tx.prepare_cached(
        "UPDATE idempotency SET status = ?, body = ? WHERE tenant_id = ? AND environment = ? AND key = ? AND status IS NULL",
    )?;
    for answer in answers {
        let updated = statement.execute(params![
            i64::from(answer.status),
            answer.body.as_slice(),
            env.tenant_id,
            env.environment.as_str(),
            answer.key,
        ])?;
        if updated != 1 {
            return Err(answered_elsewhere(&answer.key));
        }
    }
    Ok(())
}

/// The sequence number the next entry gets: what `AUTOINCREMENT` would give it (above
/// every number ever used, deleted rows included). Only under the write lock.
fn next_entry_seq(tx: &Transaction<'_>) -> StoreResult<i64> {
    let last: i64 = tx
        .prepare_cached(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'entries'), 0),
                        COALESCE((SELECT MAX(seq) FROM entries), 0))",
        )?
        .query_row([], |row| row.get(0))?;
    last.checked_add(1)
        .ok_or_else(|| corrupt("entry sequence numbers exhausted"))
}

/// Rows every operation writes (end users, entries, usage keys, feed entries), gathered
/// over a transaction's operations and written kind by kind.
#[derive(Debug, Default)]
pub(super) struct Rows {
    /// Each end user's newest entry before this transaction (`None`: it has none yet),
    /// where its new entries' chain starts.
    pub(super) heads: HashMap<String, Option<i64>>,
    /// Idempotent answers, stored fenced.
    answers: Vec<IdempotencyAnswer>,
    /// End users whose state changed.
    changes: Vec<String>,
    end_users: Vec<StateRow>,
    blocks: Vec<BlockRow>,
    entries: Vec<EntryRow>,
    usage_keys: Vec<UsageKeyRecord>,
}

/// What a transaction's rows left: the change feed's position of its row, if an end
/// user changed, the end users whose state it wrote, and each end user's newest entry
/// before and after it (for every end user it staged).
#[derive(Debug)]
pub(super) struct Flushed {
    pub(super) at: Option<i64>,
    pub(super) written: Vec<String>,
    pub(super) heads: HashMap<String, (Option<i64>, Option<i64>)>,
}

impl Rows {
    /// Room for the rows of `operations` operations of about one event each (a usage
    /// batch's), so that gathering them under the writer does not grow the vectors.
    pub(super) fn with_capacity(operations: usize) -> Rows {
        Rows {
            end_users: Vec::with_capacity(operations),
            entries: Vec::with_capacity(operations),
            usage_keys: Vec::with_capacity(operations),
            changes: Vec::with_capacity(operations),
            heads: HashMap::with_capacity(operations),
            ..Rows::default()
        }
    }

    /// Writes the rows. Every change of an end user's row (its state, or only its
    /// chain's head) appends to the change feed here, in the same transaction: usage
    /// batches rely on it to find end users written while they ran (`mutate_many`), so
    /// any other statement that ever changes `end_users` must do the same.
    pub(super) fn flush(
        self,
        tx: &Transaction<'_>,
        env: &Env,
        now: Timestamp,
    ) -> StoreResult<Flushed> {
        let (tenant, environment) = (env.tenant_id.as_str(), env.environment.as_str());
        // Each end user's newest entry before this transaction and now.
        let mut heads: HashMap<String, (Option<i64>, Option<i64>)> = self
            .heads
            .into_iter()
            .map(|(end_user, head)| (end_user, (head, head)))
            .collect();
        let linked = link_entries(tx, &self.entries, &mut heads)?;
        if !self.end_users.is_empty() {
            let mut statement = tx.prepare_cached(
                "INSERT INTO end_users (tenant_id, environment, end_user_id, state, version, next_due_at, updated_at, last_entry_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (tenant_id, environment, end_user_id) DO UPDATE SET
                 state = excluded.state, version = excluded.version, next_due_at = excluded.next_due_at, updated_at = excluded.updated_at,
                 last_entry_seq = COALESCE(excluded.last_entry_seq, last_entry_seq)",
            )?;
            for (end_user, state, version, next_due) in &self.end_users {
                statement.execute(params![
                    tenant,
                    environment,
                    end_user,
                    state,
                    version,
                    next_due,
                    now.as_millis(),
                    heads.get(end_user.as_str()).and_then(|(_, head)| *head),
                ])?;
            }
        }
        // An end user with new entries but an unchanged state (not expected: an entry
        // changes the state) still gets its chain's head moved.
        let upserted: HashSet<&str> = self
            .end_users
            .iter()
            .map(|(end_user, ..)| end_user.as_str())
            .collect();
        let mut moved: Vec<(&str, i64)> = heads
            .iter()
            .filter_map(|(end_user, (old, head))| {
                let head = (*head)?;
                (!upserted.contains(end_user.as_str()) && *old != Some(head))
                    .then_some((end_user.as_str(), head))
            })
            .collect();
        moved.sort_unstable();
        // The feed names every end user whose row changed (see `mutate_many`).
        let mut feed: Vec<&str> = self.changes.iter().map(String::as_str).collect();
        feed.extend(moved.iter().map(|(end_user, _)| *end_user));
        for (end_user, head) in moved {
            let updated = tx
                .prepare_cached("UPDATE end_users SET last_entry_seq = ? WHERE tenant_id = ? AND environment = ? AND end_user_id = ?")?
                .execute(params![head, tenant, environment, end_user])?;
            if updated != 1 {
                // Without a row to hold the head, the entries would be unreachable.
                return Err(corrupt(format!(
                    "end user `{end_user}` has new entries but no stored state"
                )));
            }
        }
        insert_blocks(tx, env, &self.blocks)?;
        insert_entries(tx, env, linked)?;
        insert_usage_keys(tx, env, &self.usage_keys)?;
        store_answers(tx, env, &self.answers)?;
        let at = match feed.as_slice() {
            [] => None,
            [end_user] => {
                tx.prepare_cached(
                    "INSERT INTO changes (tenant_id, environment, kind, end_user_id, created_at) VALUES (?, ?, 'end_user', ?, ?)",
                )?
                .execute(params![tenant, environment, end_user, now.as_millis()])?;
                Some(tx.last_insert_rowid())
            }
            several => {
                // One row names them all (migration 0006).
                tx.prepare_cached(
                    "INSERT INTO changes (tenant_id, environment, kind, end_user_ids, created_at) VALUES (?, ?, 'end_users', ?, ?)",
                )?
                .execute(params![
                    tenant,
                    environment,
                    serde_json::to_string(several)?,
                    now.as_millis()
                ])?;
                Some(tx.last_insert_rowid())
            }
        };
        drop(feed);
        Ok(Flushed {
            at,
            written: self.changes,
            heads,
        })
    }
}

/// Numbers the new entries (this transaction holds the write lock, so the next numbers
/// are known) and links each to its end user's previous entry, moving `heads` (each end
/// user's newest entry before this transaction and now).
fn link_entries<'a>(
    tx: &Transaction<'_>,
    entries: &'a [EntryRow],
    heads: &mut HashMap<String, (Option<i64>, Option<i64>)>,
) -> StoreResult<Vec<(i64, Option<i64>, &'a EntryRow)>> {
    let mut linked = Vec::with_capacity(entries.len());
    if entries.is_empty() {
        return Ok(linked);
    }
    let mut seq = next_entry_seq(tx)?;
    for entry in entries {
        // Linking from an unknown head would cut the end user's older entries off its
        // chain.
        let Some((_, head)) = heads.get_mut(entry.1.as_str()) else {
            return Err(corrupt(format!(
                "an entry of end user `{}` was staged without its chain's head",
                entry.1
            )));
        };
        let prev = head.replace(seq);
        linked.push((seq, prev, entry));
        seq = seq
            .checked_add(1)
            .ok_or_else(|| corrupt("entry sequence numbers exhausted"))?;
    }
    Ok(linked)
}

/// New and changed blocks.
fn insert_blocks(tx: &Transaction<'_>, env: &Env, blocks: &[BlockRow]) -> StoreResult<()> {
    let (tenant, environment) = (env.tenant_id.as_str(), env.environment.as_str());
    if !blocks.is_empty() {
        let mut statement = tx.prepare_cached(
            "INSERT INTO blocks (id, tenant_id, environment, end_user_id, body, metadata, external_payment_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (id) DO UPDATE SET body = excluded.body",
        )?;
        for block in blocks {
            statement.execute(params![
                block.id,
                tenant,
                environment,
                block.end_user,
                block.body,
                block.metadata,
                block.external_payment_id,
                block.created_at,
            ])?;
        }
    }
    Ok(())
}

/// The transaction's entries, numbered and linked (one run of numbers).
fn insert_entries(
    tx: &Transaction<'_>,
    env: &Env,
    linked: Vec<(i64, Option<i64>, &EntryRow)>,
) -> StoreResult<()> {
    let (tenant, environment) = (env.tenant_id.as_str(), env.environment.as_str());
    if let (Some((first, ..)), Some((last, ..))) = (linked.first(), linked.last()) {
        // The transaction's entries are one run of numbers (migration 0008).
        tx.prepare_cached(
            "INSERT INTO entry_runs (tenant_id, environment, first_seq, last_seq) VALUES (?, ?, ?, ?)",
        )?
        .execute(params![tenant, environment, first, last])?;
        let mut statement = tx.prepare_cached(
            "INSERT INTO entries (seq, id, tenant_id, environment, end_user_id, prev_seq, type, created_at, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )?;
        for (seq, prev, (id, end_user, entry_type, created_at, body)) in linked {
            statement.execute(params![
                seq,
                id,
                tenant,
                environment,
                end_user,
                prev,
                entry_type,
                created_at,
                body,
            ])?;
        }
    }
    Ok(())
}

/// The usage event keys a batch recorded; a key recorded concurrently is a conflict.
fn insert_usage_keys(
    tx: &Transaction<'_>,
    env: &Env,
    usage_keys: &[UsageKeyRecord],
) -> StoreResult<()> {
    let (tenant, environment) = (env.tenant_id.as_str(), env.environment.as_str());
    if !usage_keys.is_empty() {
        let mut statement = tx.prepare_cached(
            "INSERT INTO usage_keys (tenant_id, environment, key, fingerprint, entry_id, result, keep_until) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )?;
        // A lease report's key is only remembered: one the tenant's own events took
        // first stays theirs.
        let mut report = tx.prepare_cached(
            "INSERT INTO usage_keys (tenant_id, environment, key, fingerprint, entry_id, result, keep_until) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )?;
        for key in usage_keys {
            let statement = if key.fingerprint == crate::store::LEASE_REPORT_FINGERPRINT {
                &mut report
            } else {
                &mut statement
            };
            statement
                .execute(params![
                    tenant,
                    environment,
                    key.key,
                    key.fingerprint.as_slice(),
                    key.entry_id,
                    key.result,
                    key.keep_until.as_millis(),
                ])
                .map_err(|error| usage_key_taken(unique_violation(&error), error.into()))?;
        }
    }
    Ok(())
}

/// An operation's state before and after, and what it reported writing (its usage keys
/// are moved out into the rows).
pub(super) type Applied<'a> = (&'a EndUserState, &'a EndUserState, &'a mut [Changes]);

/// Rows [`stage_rows`] rendered from an operation.
pub(super) type Staged = (Option<StateRow>, Vec<EntryRow>, Vec<BlockRow>);

/// Writes what is rare per operation (reservations, subscriptions, events with their
/// deliveries, released idempotency keys) and gathers the common rows in `rows`.
/// `changes` holds one entry per operation applied on the way from `old` to `new`.
pub(super) fn stage(
    tx: &Transaction<'_>,
    env: &Env,
    (old, new, changes): Applied<'_>,
    now: Timestamp,
    rows: &mut Rows,
) -> StoreResult<()> {
    if changes.is_empty() {
        return unchanged(old, new);
    }
    let staged = stage_rows(old, new, &*changes)?;
    stage_rendered(tx, env, (old, new, changes), staged, now, rows)
}

/// [`stage`] with the operation's common rows already rendered (by `stage_rows`, from
/// the same operation, which reported changes).
pub(super) fn stage_rendered(
    tx: &Transaction<'_>,
    env: &Env,
    (old, new, changes): Applied<'_>,
    (state, entries, blocks): Staged,
    now: Timestamp,
    rows: &mut Rows,
) -> StoreResult<()> {
    let (tenant, environment) = (env.tenant_id.as_str(), env.environment.as_str());
    let end_user = new.end_user_id().as_str();
    rows.end_users.extend(state);
    rows.entries.extend(entries);
    rows.blocks.extend(blocks);
    if new != old {
        rows.changes.push(end_user.to_owned());
    }
    for part in changes.iter_mut() {
        rows.usage_keys.append(&mut part.usage_keys);
    }
    let changes = &*changes;

    for row in held_rows(old, new, changes)? {
        // `?5` is the holder, which only leases keep.
        let upsert = match row.table {
            HeldTable::Reservations => {
                "INSERT INTO reservations (id, tenant_id, environment, end_user_id, status, body)
                 VALUES (?1, ?2, ?3, ?4, ?6, ?7)
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body"
            }
            HeldTable::Leases => {
                "INSERT INTO leases (id, tenant_id, environment, end_user_id, holder, status, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body"
            }
            HeldTable::Subscriptions => {
                "INSERT INTO subscriptions (id, tenant_id, environment, end_user_id, status, body)
                 VALUES (?1, ?2, ?3, ?4, ?6, ?7)
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body"
            }
        };
        let (id, holder, status, body) = (&row.id, &row.holder, row.status, &row.body);
        tx.prepare_cached(upsert)?.execute(params![
            id,
            tenant,
            environment,
            end_user,
            holder,
            status,
            body
        ])?;
    }

    if changes.iter().any(|part| !part.events.is_empty()) {
        let endpoints = live_endpoints(tx, env)?;
        for event in changes.iter().flat_map(|part| &part.events) {
            insert_event(tx, env, event, &endpoints, now)?;
        }
    }

    rows.answers
        .extend(changes.iter().filter_map(|part| part.idempotency.clone()));
    for key in changes.iter().filter_map(|part| part.release.as_ref()) {
        tx.prepare_cached("DELETE FROM idempotency WHERE tenant_id = ? AND environment = ? AND key = ? AND status IS NULL")?
            .execute(params![tenant, environment, key])?;
    }
    Ok(())
}

/// Appends an end user's event to the environment's log and queues it for every
/// endpoint that wants it.
fn insert_event(
    tx: &Transaction<'_>,
    env: &Env,
    event: &ledger::Event,
    endpoints: &[EndpointRecord],
    now: Timestamp,
) -> StoreResult<()> {
    let (tenant, environment) = (env.tenant_id.as_str(), env.environment.as_str());
    let wire = super::super::wire_event(event);
    let end_user = event.end_user_id.as_str();
    tx.prepare_cached("INSERT INTO events (id, tenant_id, environment, end_user_id, type, created_at, body) VALUES (?, ?, ?, ?, ?, ?, ?)")?
        .execute(params![
            wire.id,
            tenant,
            environment,
            end_user,
            wire.event_type,
            wire.created_at.0.as_millis(),
            serde_json::to_string(&wire)?,
        ])?;
    let seq = tx.last_insert_rowid();
    for endpoint in endpoints
        .iter()
        .filter(|endpoint| endpoint.wants(&wire.event_type))
    {
        tx.prepare_cached(
            "INSERT INTO webhook_deliveries (tenant_id, environment, endpoint_id, event_id, event_seq, end_user_id, status, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
        )?
        .execute(params![
            tenant,
            environment,
            endpoint.id,
            wire.id,
            seq,
            end_user,
            now.as_millis(),
        ])?;
    }
    Ok(())
}

/// The environment's endpoints that are not deleted.
fn live_endpoints(tx: &Transaction<'_>, env: &Env) -> StoreResult<Vec<EndpointRecord>> {
    let mut statement = tx.prepare_cached(
        "SELECT id, url, event_types, secret, created_at, updated_at FROM webhook_endpoints WHERE tenant_id = ? AND environment = ? AND deleted_at IS NULL ORDER BY created_at, id",
    )?;
    let mut rows = statement.query(params![env.tenant_id, env.environment.as_str()])?;
    let mut endpoints = Vec::new();
    while let Some(row) = rows.next()? {
        endpoints.push(crate::store::columns::endpoint(
            row,
            crate::store::columns::EndpointColumns::TABLE,
        )?);
    }
    Ok(endpoints)
}
