//! PostgreSQL: how one transaction's rows are written: every row kind in bulk
//! statements, then the environment's feed and event positions.

use ledger::{EndUserState, Timestamp};
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, Postgres, Row};

use super::webhooks::live_endpoints;
use super::{corrupt, unique_violation};
use crate::store::{
    BlockRow, Changes, EntryRow, Env, HeldRow, HeldTable, IdempotencyAnswer, StateRow, StoreResult,
    UsageKeyRecord, held_rows, stage_rows, unchanged, usage_key_taken, user_key,
};

/// Rows a transaction writes for every operation (end users, blocks, entries, usage
/// keys, events, change-feed entries), gathered so that each kind is written with one
/// `UNNEST` statement however many operations and end users the transaction carries.
#[derive(Debug, Default)]
pub(super) struct Rows {
    end_users: Vec<StateRow>,
    blocks: Vec<BlockRow>,
    entries: Vec<EntryRow>,
    usage_keys: Vec<UsageKeyRecord>,
    idempotency: Vec<IdempotencyAnswer>,
    /// Claimed keys given back (their operations were refused without a stored answer).
    released: Vec<String>,
    /// Events in order, with the end user each is about.
    events: Vec<(protocol::Event, String)>,
    /// End users whose state changed: one change-feed entry each.
    changes: Vec<String>,
    /// New and changed reservations, leases and subscriptions, with their end users.
    held: Vec<(String, HeldRow)>,
}

impl Rows {
    /// Stages the new state of one end user and everything its operations produced (one
    /// `Changes` per operation, in order).
    pub(super) fn stage(
        &mut self,
        old: &EndUserState,
        new: &EndUserState,
        changes: &[Changes],
    ) -> StoreResult<()> {
        if changes.is_empty() {
            return unchanged(old, new);
        }
        let end_user = new.end_user_id().as_str();
        let (state, entries, blocks) = stage_rows(old, new, changes)?;
        self.end_users.extend(state);
        self.entries.extend(entries);
        self.blocks.extend(blocks);
        if new != old {
            self.changes.push(end_user.to_owned());
        }
        for part in changes {
            self.usage_keys.extend(part.usage_keys.iter().cloned());
            self.idempotency.extend(part.idempotency.iter().cloned());
            self.released.extend(part.release.iter().cloned());
            for event in &part.events {
                self.events
                    .push((crate::store::wire_event(event), end_user.to_owned()));
            }
        }
        let held = held_rows(old, new, changes)?;
        self.held
            .extend(held.into_iter().map(|row| (end_user.to_owned(), row)));
        Ok(())
    }

    /// Whether any staged row may meet another transaction's write: a usage event key
    /// (unique) or an idempotency answer (fenced: its key must still be unanswered). A
    /// lease report's key cannot (it is only remembered where it is free).
    pub(super) fn has_contended(&self) -> bool {
        !self.idempotency.is_empty()
            || self
                .usage_keys
                .iter()
                .any(|key| key.fingerprint != crate::store::LEASE_REPORT_FINGERPRINT)
    }

    /// Writes the staged rows [`Rows::has_contended`] names and takes them out, so
    /// that a group sharing a transaction with others can fail on them alone (in a
    /// savepoint); [`Rows::flush`] writes the rest.
    pub(super) async fn write_contended(
        &mut self,
        connection: &mut PgConnection,
        env: &Env,
        now: Timestamp,
    ) -> StoreResult<()> {
        let mut writer = Writer {
            connection,
            env,
            now,
        };
        writer
            .usage_keys(std::mem::take(&mut self.usage_keys))
            .await?;
        writer
            .answer_keys(std::mem::take(&mut self.idempotency))
            .await
    }

    /// Gives back a claimed key (deleted at the flush while still unanswered).
    pub(super) fn release(&mut self, key: String) {
        self.released.push(key);
    }

    /// Takes over everything `other` staged, after what this one holds.
    pub(super) fn absorb(&mut self, other: Rows) {
        let Rows {
            end_users,
            blocks,
            entries,
            usage_keys,
            idempotency,
            released,
            events,
            changes,
            held,
        } = other;
        self.end_users.extend(end_users);
        self.blocks.extend(blocks);
        self.entries.extend(entries);
        self.usage_keys.extend(usage_keys);
        self.idempotency.extend(idempotency);
        self.released.extend(released);
        self.events.extend(events);
        self.changes.extend(changes);
        self.held.extend(held);
    }

    /// Writes everything staged; the event log and change feed last (see the module
    /// comment).
    pub(super) async fn flush(
        self,
        connection: &mut PgConnection,
        env: &Env,
        now: Timestamp,
    ) -> StoreResult<()> {
        let mut writer = Writer {
            connection,
            env,
            now,
        };
        writer.end_users(self.end_users).await?;
        writer.blocks(self.blocks).await?;
        writer.entries(self.entries).await?;
        writer.usage_keys(self.usage_keys).await?;
        writer.answer_keys(self.idempotency).await?;
        writer.release_keys(self.released).await?;
        let mut held = self.held;
        for table in [
            HeldTable::Reservations,
            HeldTable::Leases,
            HeldTable::Subscriptions,
        ] {
            let (rows, rest) = held.into_iter().partition(|(_, row)| row.table == table);
            held = rest;
            writer.held(table, rows).await?;
        }
        writer.feeds(&self.events, &self.changes).await
    }
}

/// Four columns from rows of four.
fn unzip4<A, B, C, D>(rows: Vec<(A, B, C, D)>) -> (Vec<A>, Vec<B>, Vec<C>, Vec<D>) {
    let mut columns = (
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
    );
    for (a, b, c, d) in rows {
        columns.0.push(a);
        columns.1.push(b);
        columns.2.push(c);
        columns.3.push(d);
    }
    columns
}

/// Writes one end user's new state and everything its operations produced.
pub(super) async fn persist(
    connection: &mut PgConnection,
    env: &Env,
    old: &EndUserState,
    new: &EndUserState,
    changes: &[Changes],
    now: Timestamp,
) -> StoreResult<()> {
    let mut rows = Rows::default();
    rows.stage(old, new, changes)?;
    rows.flush(connection, env, now).await
}

/// Writes a transaction's staged rows, each kind with one statement.
struct Writer<'c> {
    connection: &'c mut PgConnection,
    env: &'c Env,
    now: Timestamp,
}

impl Writer<'_> {
    /// Runs a statement in the transaction.
    async fn run(&mut self, query: Query<'_, Postgres, PgArguments>) -> StoreResult<()> {
        query.execute(&mut *self.connection).await?;
        Ok(())
    }

    /// The new states, one upsert.
    async fn end_users(&mut self, rows: Vec<StateRow>) -> StoreResult<()> {
        let (env, now) = (self.env, self.now);
        if rows.is_empty() {
            return Ok(());
        }
        let (ids, states, versions, due): (Vec<_>, Vec<_>, Vec<_>, Vec<_>) = unzip4(rows);
        let query = bind!(sqlx::query(
            "INSERT INTO end_users (tenant_id, environment, end_user_id, state, version, next_due_at, updated_at)
             SELECT $1, $2, u.id, u.state, u.version, u.due, $7
             FROM UNNEST($3::text[], $4::text[], $5::int8[], $6::int8[]) AS u(id, state, version, due)
             ON CONFLICT (tenant_id, environment, end_user_id) DO UPDATE SET
               state = excluded.state, version = excluded.version, next_due_at = excluded.next_due_at, updated_at = excluded.updated_at",
        ); &env.tenant_id, env.environment.as_str(), ids, states, versions, due, now.as_millis());
        self.run(query).await
    }

    /// New and changed blocks, one upsert.
    async fn blocks(&mut self, rows: Vec<BlockRow>) -> StoreResult<()> {
        let env = self.env;
        if rows.is_empty() {
            return Ok(());
        }
        columns!(rows, |row|
            ids: row.id, users: row.end_user, bodies: row.body, metadata: row.metadata,
            payments: row.external_payment_id, created: row.created_at,
        );
        let query = bind!(sqlx::query(
            "INSERT INTO blocks (id, tenant_id, environment, end_user_id, body, metadata, external_payment_id, created_at)
             SELECT b.id, $1, $2, b.end_user_id, b.body, b.metadata, b.payment, b.created_at
             FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::int8[])
               AS b(id, end_user_id, body, metadata, payment, created_at)
             ON CONFLICT (id) DO UPDATE SET body = excluded.body",
        ); &env.tenant_id, env.environment.as_str(), ids, users, bodies, metadata, payments,
            created);
        self.run(query).await
    }

    /// The entries, numbered per end user in the order written.
    async fn entries(&mut self, rows: Vec<EntryRow>) -> StoreResult<()> {
        let env = self.env;
        if rows.is_empty() {
            return Ok(());
        }
        columns!(rows, |(id, user, entry_type, at, body)|
            keys: user_key(env, &user), ids: id, users: user, types: entry_type, created: at,
            bodies: body,
        );
        // In array order: one end user's entries are numbered in the order written.
        let query = bind!(sqlx::query(
            "INSERT INTO entries (id, tenant_id, environment, end_user_id, user_key, type, created_at, body)
             SELECT e.id, $1, $2, e.end_user_id, e.user_key, e.type, e.created_at, e.body
             FROM UNNEST($3::text[], $4::text[], $5::int4[], $6::text[], $7::int8[], $8::text[]) WITH ORDINALITY
               AS e(id, end_user_id, user_key, type, created_at, body, position)
             ORDER BY e.position",
        ); &env.tenant_id, env.environment.as_str(), ids, users, keys, types, created, bodies);
        self.run(query).await
    }

    /// The usage event keys a batch recorded, and lease reports' keys (only
    /// remembered: one the tenant's own events took first stays theirs).
    async fn usage_keys(&mut self, rows: Vec<UsageKeyRecord>) -> StoreResult<()> {
        let (reports, events): (Vec<_>, Vec<_>) = rows
            .into_iter()
            .partition(|key| key.fingerprint == crate::store::LEASE_REPORT_FINGERPRINT);
        self.insert_usage_keys(events, false).await?;
        self.insert_usage_keys(reports, true).await
    }

    async fn insert_usage_keys(
        &mut self,
        rows: Vec<UsageKeyRecord>,
        reports: bool,
    ) -> StoreResult<()> {
        let (connection, env) = (&mut *self.connection, self.env);
        if rows.is_empty() {
            return Ok(());
        }
        columns!(rows, |key|
            keys: key.key, fingerprints: key.fingerprint.to_vec(), entry_ids: key.entry_id,
            results: key.result, keep: key.keep_until.as_millis(),
        );
        let query = if reports {
            sqlx::query(
                "INSERT INTO usage_keys (tenant_id, environment, key, fingerprint, entry_id, result, keep_until)
                 SELECT $1, $2, k.key, k.fingerprint, k.entry_id, k.result, k.keep_until
                 FROM UNNEST($3::text[], $4::bytea[], $5::text[], $6::text[], $7::int8[])
                   AS k(key, fingerprint, entry_id, result, keep_until)
                 ON CONFLICT DO NOTHING",
            )
        } else {
            sqlx::query(
                "INSERT INTO usage_keys (tenant_id, environment, key, fingerprint, entry_id, result, keep_until)
                 SELECT $1, $2, k.key, k.fingerprint, k.entry_id, k.result, k.keep_until
                 FROM UNNEST($3::text[], $4::bytea[], $5::text[], $6::text[], $7::int8[])
                   AS k(key, fingerprint, entry_id, result, keep_until)",
            )
        };
        bind!(query; &env.tenant_id, env.environment.as_str(), keys, fingerprints, entry_ids, results, keep)
            .execute(&mut *connection)
            .await
            .map_err(|error| usage_key_taken(unique_violation(&error), error.into()))?;
        Ok(())
    }

    /// The idempotency answers, each to a key that must still be unanswered.
    async fn answer_keys(&mut self, rows: Vec<IdempotencyAnswer>) -> StoreResult<()> {
        let (connection, env) = (&mut *self.connection, self.env);
        if rows.is_empty() {
            return Ok(());
        }
        columns!(rows, |answer|
            keys: answer.key, statuses: i64::from(answer.status), bodies: answer.body,
        );
        // Fenced: every key must still be unanswered. If another request answered one
        // first (a lease that expired while this operation waited, and a retry that
        // took the key over), the transaction rolls back with a retryable error
        // rather than apply the request twice; a retry then replays the answer.
        let expected = keys.len();
        let first_key = keys.first().cloned().unwrap_or_default();
        // Each key's row found by one index probe (and locked) in a lateral subquery,
        // then updated by its row address: joined straight to `UNNEST`, the update
        // was planned, on a young table's statistics, as a scan of every key of the
        // environment (~10 ms at 50,000 keys, and growing).
        let updated = bind!(sqlx::query(
            "WITH t AS (
                 SELECT x.tid, a.status, a.body
                 FROM UNNEST($3::text[], $4::int8[], $5::bytea[]) AS a(key, status, body)
                 CROSS JOIN LATERAL (
                     SELECT ctid AS tid FROM idempotency
                     WHERE tenant_id = $1 AND environment = $2 AND key = a.key AND status IS NULL
                     LIMIT 1 FOR UPDATE
                 ) AS x
             )
             UPDATE idempotency AS i SET status = t.status, body = t.body FROM t WHERE i.ctid = t.tid",
        ); &env.tenant_id, env.environment.as_str(), keys, statuses, bodies)
        .execute(&mut *connection)
        .await?;
        if usize::try_from(updated.rows_affected()).ok() != Some(expected) {
            return Err(crate::store::answered_elsewhere(&first_key));
        }
        Ok(())
    }

    /// Claimed keys given back: their operations were refused without a stored answer.
    async fn release_keys(&mut self, rows: Vec<String>) -> StoreResult<()> {
        let env = self.env;
        if rows.is_empty() {
            return Ok(());
        }
        let query = bind!(sqlx::query(
            "DELETE FROM idempotency WHERE tenant_id = $1 AND environment = $2 AND key = ANY($3) AND status IS NULL",
        ); &env.tenant_id, env.environment.as_str(), rows);
        self.run(query).await
    }

    /// Upserts `rows` into `table`'s table with one `UNNEST` statement. `rows` holds each id
    /// once: a transaction stages each end user once.
    async fn held(&mut self, table: HeldTable, rows: Vec<(String, HeldRow)>) -> StoreResult<()> {
        let env = self.env;
        if rows.is_empty() {
            return Ok(());
        }
        columns!(rows, |(user, row)|
            ids: row.id, users: user, holders: row.holder.unwrap_or_default(),
            statuses: row.status, bodies: row.body,
        );
        let query = bind!(sqlx::query(upsert(table)); &env.tenant_id, env.environment.as_str(),
            ids, users, statuses, bodies);
        let query = match table {
            HeldTable::Leases => query.bind(holders),
            HeldTable::Reservations | HeldTable::Subscriptions => query,
        };
        self.run(query).await
    }

    /// The last step of a mutation: the events (with a delivery for every live endpoint that
    /// wants each) and a change-feed entry for every end user whose state changed, numbered
    /// from the environment's feed head, which stays locked until commit.
    /// The deliveries of new events, (endpoint, event id, event position, end user) each,
    /// pending from `now`, in order.
    async fn deliveries(&mut self, deliveries: Vec<(&str, &str, i64, &str)>) -> StoreResult<()> {
        let (env, now) = (self.env, self.now);
        if deliveries.is_empty() {
            return Ok(());
        }
        columns!(deliveries, |(endpoint, event, seq, end_user)|
            endpoint_ids: endpoint, event_ids: event, event_seqs: seq, delivery_users: end_user,
        );
        let query = bind!(sqlx::query(
            "INSERT INTO webhook_deliveries (tenant_id, environment, endpoint_id, event_id, event_seq, end_user_id, status, next_attempt_at)
             SELECT $1, $2, d.endpoint_id, d.event_id, d.event_seq, d.end_user_id, 'pending', $7
             FROM UNNEST($3::text[], $4::text[], $5::int8[], $6::text[]) WITH ORDINALITY
               AS d(endpoint_id, event_id, event_seq, end_user_id, position)
             ORDER BY d.position",
        ); &env.tenant_id, env.environment.as_str(), endpoint_ids, event_ids, event_seqs,
            delivery_users, now.as_millis());
        self.run(query).await
    }

    async fn feeds(
        &mut self,
        events: &[(protocol::Event, String)],
        changed: &[String],
    ) -> StoreResult<()> {
        let (env, now) = (self.env, self.now);
        if events.is_empty() && changed.is_empty() {
            return Ok(());
        }
        let endpoints = if events.is_empty() {
            Vec::new()
        } else {
            live_endpoints(self.connection, env).await?
        };
        let count = i64::try_from(events.len()).map_err(|_| corrupt("too many events"))?;
        let change_count = i64::try_from(changed.len()).map_err(|_| corrupt("too many changes"))?;
        let heads = take_positions(self.connection, env, count, change_count).await?;
        if !events.is_empty() {
            let first = heads.first_event(count)?;
            let mut seqs = Vec::with_capacity(events.len());
            let mut ids = Vec::with_capacity(events.len());
            let mut users = Vec::with_capacity(events.len());
            let mut types = Vec::with_capacity(events.len());
            let mut created = Vec::with_capacity(events.len());
            let mut bodies = Vec::with_capacity(events.len());
            // (endpoint, event id, seq, end user)
            let mut deliveries: Vec<(&str, &str, i64, &str)> = Vec::new();
            let mut seq = first;
            for (wire, end_user) in events {
                seqs.push(seq);
                ids.push(wire.id.as_str());
                users.push(end_user.as_str());
                types.push(wire.event_type.as_str());
                created.push(wire.created_at.0.as_millis());
                bodies.push(serde_json::to_string(wire)?);
                for endpoint in endpoints
                    .iter()
                    .filter(|endpoint| endpoint.wants(&wire.event_type))
                {
                    deliveries.push((&endpoint.id, &wire.id, seq, end_user));
                }
                seq = seq
                    .checked_add(1)
                    .ok_or_else(|| corrupt("event position"))?;
            }
            bind!(sqlx::query(
                "INSERT INTO events (seq, id, tenant_id, environment, end_user_id, type, created_at, body)
                 SELECT e.seq, e.id, $1, $2, e.end_user_id, e.type, e.created_at, e.body
                 FROM UNNEST($3::int8[], $4::text[], $5::text[], $6::text[], $7::int8[], $8::text[])
                   AS e(seq, id, end_user_id, type, created_at, body)",
            ); &env.tenant_id, env.environment.as_str(), seqs, ids, users, types, created, bodies)
            .execute(&mut *self.connection)
            .await?;
            self.deliveries(deliveries).await?;
        }
        if !changed.is_empty() {
            let first = heads
                .last_change
                .checked_sub(change_count)
                .and_then(|before| before.checked_add(1))
                .ok_or_else(|| corrupt("change position"))?;
            bind!(sqlx::query(
                "INSERT INTO changes (seq, tenant_id, environment, kind, end_user_id, created_at)
                 SELECT $3 + c.position - 1, $1, $2, 'end_user', c.end_user_id, $5
                 FROM UNNEST($4::text[]) WITH ORDINALITY AS c(end_user_id, position)",
            ); &env.tenant_id, env.environment.as_str(), first, changed, now.as_millis())
            .execute(&mut *self.connection)
            .await?;
        }
        Ok(())
    }
}

/// The upsert of a batch of `table`'s rows: tenant and environment, then one array per
/// column.
fn upsert(table: HeldTable) -> &'static str {
    match table {
        HeldTable::Reservations => {
            "INSERT INTO reservations (id, tenant_id, environment, end_user_id, status, body)
             SELECT u.id, $1, $2, u.end_user, u.status, u.body
             FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[]) AS u(id, end_user, status, body)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body"
        }
        HeldTable::Subscriptions => {
            "INSERT INTO subscriptions (id, tenant_id, environment, end_user_id, status, body)
             SELECT u.id, $1, $2, u.end_user, u.status, u.body
             FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[]) AS u(id, end_user, status, body)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body"
        }
        HeldTable::Leases => {
            "INSERT INTO leases (id, tenant_id, environment, end_user_id, status, body, holder)
             SELECT u.id, $1, $2, u.end_user, u.status, u.body, u.holder
             FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
               AS u(id, end_user, status, body, holder)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body"
        }
    }
}

/// An environment's feed head after a transaction took its positions.
#[derive(Debug, Clone, Copy)]
pub(super) struct FeedHeads {
    /// The last event position, now this transaction's.
    pub(super) last_event: i64,
    /// The last change position, now this transaction's.
    pub(super) last_change: i64,
}

impl FeedHeads {
    /// The first of the `count` event positions taken.
    fn first_event(self, count: i64) -> StoreResult<i64> {
        self.last_event
            .checked_sub(count)
            .and_then(|before| before.checked_add(1))
            .ok_or_else(|| corrupt("event position"))
    }
}

/// Takes `events` event positions and `changes` change positions in the
/// environment's log and feed, locking its `feed_heads` row until commit. Call it last
/// before commit: the lock orders this environment's appenders, so positions are
/// committed in order (see the module comment).
pub(super) async fn take_positions(
    connection: &mut PgConnection,
    env: &Env,
    events: i64,
    changes: i64,
) -> StoreResult<FeedHeads> {
    let row = bind!(sqlx::query(
        "INSERT INTO feed_heads (tenant_id, environment, last_event_seq, last_change_seq) VALUES ($1, $2, $3, $4)
         ON CONFLICT (tenant_id, environment) DO UPDATE SET
           last_event_seq = feed_heads.last_event_seq + excluded.last_event_seq,
           last_change_seq = feed_heads.last_change_seq + excluded.last_change_seq
         RETURNING last_event_seq, last_change_seq",
    ); &env.tenant_id, env.environment.as_str(), events, changes)
    .fetch_one(connection)
    .await?;
    Ok(FeedHeads {
        last_event: row.try_get("last_event_seq")?,
        last_change: row.try_get("last_change_seq")?,
    })
}

/// Writes an event at position `seq` of the environment's log (taken by
/// [`take_positions`]).
pub(super) async fn insert_wire_event(
    connection: &mut PgConnection,
    env: &Env,
    seq: i64,
    wire: &protocol::Event,
    end_user: Option<&str>,
) -> StoreResult<()> {
    bind!(sqlx::query(
        "INSERT INTO events (seq, id, tenant_id, environment, end_user_id, type, created_at, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    ); seq, &wire.id, &env.tenant_id, env.environment.as_str(), end_user, &wire.event_type,
        wire.created_at.0.as_millis(), serde_json::to_string(wire)?)
    .execute(connection)
    .await?;
    Ok(())
}

/// Writes the change-feed entry at position `seq` (taken by [`take_positions`]).
pub(super) async fn insert_change(
    connection: &mut PgConnection,
    env: &Env,
    seq: i64,
    end_user: Option<&str>,
    at: Timestamp,
) -> StoreResult<()> {
    bind!(sqlx::query(
        "INSERT INTO changes (seq, tenant_id, environment, kind, end_user_id, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    ); seq, &env.tenant_id, env.environment.as_str(),
        if end_user.is_some() { "end_user" } else { "catalog" }, end_user, at.as_millis())
    .execute(connection)
    .await?;
    Ok(())
}
