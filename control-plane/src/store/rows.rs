//! How one end user's operations become rows: what an operation wrote ([`Changes`]),
//! the operation types a mutation runs, and the staging both backends share (state,
//! entries, blocks, changed reservations, leases and subscriptions, claims).

use ledger::{Block, EndUserState, Entry, Reservation, Subscription, Timestamp};

use super::records::{Annotations, Claim, IdempotencyAnswer, UsageKeyRecord};
use super::{Env, StoreError, StoreResult};

/// What an operation on one end user wrote, beside the new state itself.
#[derive(Debug, Default)]
pub struct Changes {
    pub entries: Vec<Entry>,
    pub events: Vec<ledger::Event>,
    pub finished_reservations: Vec<Reservation>,
    pub finished_subscriptions: Vec<Subscription>,
    pub finished_blocks: Vec<Block>,
    pub finished_leases: Vec<ledger::Lease>,
    pub annotations: Annotations,
    /// When the end user next has due work (by the environment's clock).
    pub next_due: Option<Timestamp>,
    /// The idempotent request's answer, stored in the same transaction.
    pub idempotency: Option<IdempotencyAnswer>,
    pub usage_keys: Vec<UsageKeyRecord>,
    /// An idempotency key this transaction claimed (see [`Claim`]) for an operation that
    /// was then refused without a stored answer: the claim is dropped, so a retry runs.
    pub release: Option<String>,
}

impl Changes {
    pub fn from_applied<T>(applied: ledger::Applied<T>) -> (T, Changes) {
        let changes = Changes {
            entries: applied.entries,
            events: applied.events,
            finished_reservations: applied.finished_reservations,
            finished_subscriptions: applied.finished_subscriptions,
            finished_blocks: applied.finished_blocks,
            finished_leases: applied.finished_leases,
            ..Changes::default()
        };
        (applied.value, changes)
    }
}

/// The blocks `changes` created, each with the annotations of the request that
/// created it (they go on the block's row).
fn created_blocks(changes: &[Changes]) -> std::collections::HashMap<ledger::BlockId, &Annotations> {
    changes
        .iter()
        .flat_map(|part| {
            part.entries.iter().filter_map(|entry| {
                entry
                    .block
                    .as_ref()
                    .map(|block| (block.id, &part.annotations))
            })
        })
        .collect()
}

/// The narrow integer an end user's entries are indexed by (PostgreSQL's
/// `entries.user_key`; SQLite chains them instead, see docs/decisions.md):
/// the first 31 bits of SHA-256 over tenant, environment and end user, NUL-separated
/// (SQLite stores it in four bytes). Stored on disk, so it must never change. Two end
/// users may share one (a query by end user also compares the text columns, so that
/// costs a few extra rows read, never a wrong answer); every byte of an index cell counts
/// when a batch writes one cell per entry at scattered places.
pub(crate) fn user_key(env: &Env, end_user: &str) -> i32 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(env.tenant_id.as_bytes())
        .chain_update([0])
        .chain_update(env.environment.as_str())
        .chain_update([0])
        .chain_update(end_user.as_bytes())
        .finalize();
    let first = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) >> 1;
    // The top bit is clear, so the same bits read as i32 are the same non-negative number.
    i32::from_be_bytes(first.to_be_bytes())
}

/// An end user's row: (end user, state JSON, version, next due in milliseconds).
pub(crate) type StateRow = (String, String, i64, Option<i64>);

/// An entry's row: (id, end user, type, created at in milliseconds, body JSON).
pub(crate) type EntryRow = (String, String, &'static str, i64, String);

/// A block's row: new or changed, with the annotations of the request that created it.
#[derive(Debug)]
pub(crate) struct BlockRow {
    pub(crate) id: String,
    pub(crate) end_user: String,
    pub(crate) body: String,
    pub(crate) metadata: Option<String>,
    pub(crate) external_payment_id: Option<String>,
    pub(crate) created_at: i64,
}

/// The rows both stores write for one end user's operations, however they write them:
/// the new state (with the last operation's `next_due`; none when the state did not
/// change, as when the only thing to write is a claimed request's stored refusal), every
/// entry with its own request's annotations, and every block that is new or changed
/// (live or finished).
///
/// # Errors
/// A value that does not serialise.
pub(crate) fn stage_rows(
    old: &EndUserState,
    new: &EndUserState,
    changes: &[Changes],
) -> StoreResult<(Option<StateRow>, Vec<EntryRow>, Vec<BlockRow>)> {
    let end_user = new.end_user_id().as_str();
    let state = if new == old {
        None
    } else {
        // A stored state's version identifies it: every change goes through the
        // ledger's `transact`, which raises it.
        if new.version() <= old.version() {
            return Err(StoreError::Corrupt(format!(
                "end user `{end_user}` changed without a new version"
            )));
        }
        Some((
            end_user.to_owned(),
            serde_json::to_string(&new.clone().into_parts())?,
            i64::try_from(new.version())
                .map_err(|_| StoreError::Corrupt("state version out of range".into()))?,
            changes
                .last()
                .and_then(|last| last.next_due)
                .map(Timestamp::as_millis),
        ))
    };
    let mut entries = Vec::new();
    for part in changes {
        for entry in &part.entries {
            let wire = protocol::LedgerEntry::new(
                entry,
                part.annotations.idempotency_key.clone(),
                part.annotations.metadata.clone(),
            );
            entries.push((
                entry.id.to_string(),
                end_user.to_owned(),
                entry.entry_type.as_str(),
                entry.created_at.as_millis(),
                serde_json::to_string(&wire)?,
            ));
        }
    }
    let old_blocks: std::collections::BTreeMap<_, _> =
        old.blocks().iter().map(|block| (block.id, block)).collect();
    let created = created_blocks(changes);
    let mut blocks = Vec::new();
    for block in new
        .blocks()
        .iter()
        .chain(changes.iter().flat_map(|part| &part.finished_blocks))
    {
        if old_blocks.get(&block.id).is_some_and(|old| *old == block) {
            continue;
        }
        let annotations = created.get(&block.id);
        blocks.push(BlockRow {
            id: block.id.to_string(),
            end_user: end_user.to_owned(),
            body: serde_json::to_string(block)?,
            metadata: annotations
                .and_then(|annotations| annotations.metadata.as_ref().map(ToString::to_string)),
            external_payment_id: annotations
                .and_then(|annotations| annotations.external_payment_id.clone()),
            created_at: block.created_at.as_millis(),
        });
    }
    Ok((state, entries, blocks))
}

/// The tables of objects an end user holds, each a row per object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeldTable {
    Reservations,
    Leases,
    Subscriptions,
}

/// A row of an object an end user holds (a reservation, lease or subscription) that an
/// operation created or changed, live or finished.
#[derive(Debug)]
pub(crate) struct HeldRow {
    pub(crate) table: HeldTable,
    pub(crate) id: String,
    /// A lease's holder; `None` for the other kinds.
    pub(crate) holder: Option<String>,
    pub(crate) status: &'static str,
    pub(crate) body: String,
}

/// The objects an operation created or changed, live or finished (what a store writes
/// of them): by table, each in the state's order, then the finished ones'.
pub(crate) fn held_rows(
    old: &EndUserState,
    new: &EndUserState,
    changes: &[Changes],
) -> StoreResult<Vec<HeldRow>> {
    let mut rows = Vec::new();
    // Each kind: its table, its list in a state, its finished ones in `Changes`, and
    // its holder.
    macro_rules! rows_of {
        ($table:ident, $list:ident, $finished:ident, |$item:ident| $holder:expr) => {
            let finished = changes.iter().flat_map(|part| &part.$finished);
            for $item in changed(old.$list(), new.$list(), finished, |item| item.id) {
                let status = $item.status.as_str();
                rows.push(held(HeldTable::$table, $item.id, $holder, status, $item)?);
            }
        };
    }
    rows_of!(Reservations, reservations, finished_reservations, |item| {
        None
    });
    rows_of!(Leases, leases, finished_leases, |item| Some(
        item.holder.as_str()
    ));
    rows_of!(
        Subscriptions,
        subscriptions,
        finished_subscriptions,
        |item| None
    );
    Ok(rows)
}

/// The items of `now` and `finished` that are not in `before` as they are.
fn changed<'a, T: PartialEq, K: Ord>(
    before: &[T],
    now: &'a [T],
    finished: impl Iterator<Item = &'a T>,
    id: impl Fn(&T) -> K,
) -> Vec<&'a T> {
    let before: std::collections::BTreeMap<K, &T> =
        before.iter().map(|item| (id(item), item)).collect();
    now.iter()
        .chain(finished)
        .filter(|item| before.get(&id(item)).is_none_or(|old| *old != *item))
        .collect()
}

fn held(
    table: HeldTable,
    id: impl std::fmt::Display,
    holder: Option<&str>,
    status: &'static str,
    object: &impl serde::Serialize,
) -> StoreResult<HeldRow> {
    Ok(HeldRow {
        table,
        id: id.to_string(),
        holder: holder.map(str::to_owned),
        status,
        body: serde_json::to_string(object)?,
    })
}

/// A mutation that reported no changes must not have changed the state.
///
/// # Errors
/// `Corrupt` when it did: its writes would be lost.
pub fn unchanged(old: &EndUserState, new: &EndUserState) -> StoreResult<()> {
    if old == new {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!(
            "a mutation of end user `{}` changed its state but reported no changes",
            new.end_user_id()
        )))
    }
}

/// Which of `claims` are new to the store and go to this transaction: the first claim
/// of each key that `taken` (the keys the store inserted) holds; a key repeated later in
/// the list was claimed by its first occurrence.
pub(crate) fn claimed_flags(
    claims: &[Claim],
    taken: &std::collections::HashSet<String>,
) -> Vec<bool> {
    let mut seen = std::collections::HashSet::new();
    claims
        .iter()
        .map(|claim| seen.insert(claim.key.as_str()) && taken.contains(&claim.key))
        .collect()
}

/// The claims to insert: each key once, in key order (PostgreSQL takes the rows' locks
/// in that order, so two transactions never wait on each other in a circle).
pub(crate) fn claims_to_insert(claims: &[Claim]) -> Vec<&Claim> {
    let mut unique: std::collections::BTreeMap<&str, &Claim> = std::collections::BTreeMap::new();
    for claim in claims {
        unique.entry(claim.key.as_str()).or_insert(claim);
    }
    unique.into_values().collect()
}

/// The `locked_until` an unanswered claim is inserted with, as a lease would have. A
/// claim commits only with its answer (or is deleted in its transaction), so no other
/// request ever reads it unanswered; the value only keeps the row well-formed.
pub(crate) const CLAIM_LEASE_MS: i64 = 30_000;

/// The operation [`Store::mutate`] runs: like [`MutateFn`], and told which of its claims
/// it holds (one flag per claim, in order).
pub type ClaimingFn<'a> =
    dyn FnMut(&mut EndUserState, &[bool]) -> StoreResult<Vec<Changes>> + Send + 'a;

/// The operation run inside a mutation: gets the loaded (or new) state and returns what
/// it wrote, or an error that rolls everything back. What it wrote is one [`Changes`]
/// per operation it carried, in order: a group commit carries many operations of one end
/// user (a refused one leaves none), and the last one's `next_due` is the state's.
/// It may be run more than once (SQLite runs a usage batch's operations before taking
/// the write lock and again for an end user written meanwhile): only the last run's
/// outcome counts, so it must have no effect beyond the state it is given and what it
/// returns, or record its outcome where a later run replaces it. An operation that
/// refuses returns [`StoreError::Declined`], keeping its reason itself.
pub type MutateFn<'a> = dyn FnMut(&mut EndUserState) -> StoreResult<Vec<Changes>> + Send + 'a;
