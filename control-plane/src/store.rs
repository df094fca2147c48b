//! The storage boundary: one [`Store`] trait, implemented for SQLite (`store/sqlite.rs`)
//! and PostgreSQL (`store/postgres.rs`).
//!
//! The store keeps what the engine decides from (each end user's live state, the catalog,
//! settings) and the history it produced (entries, every block, reservations and
//! subscriptions as they end, events), plus tenancy and idempotency records. A mutation
//! of one end user — load the state, run the engine, persist the new state with its
//! entries, blocks, events and idempotency record — happens in one database transaction,
//! and mutations of one end user are serialised.

mod options;
pub mod postgres;
pub mod sqlite;

pub use options::{DatabaseUrl, Synchronous};

use std::fmt;

use async_trait::async_trait;
use ledger::{Block, EndUserId, EndUserState, Entry, Reservation, Subscription, Timestamp};

/// `live` or `test`: every tenant has both, and they share nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Environment {
    Live,
    Test,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Live => "live",
            Environment::Test => "test",
        }
    }

    pub fn parse(text: &str) -> Option<Environment> {
        match text {
            "live" => Some(Environment::Live),
            "test" => Some(Environment::Test),
            _ => None,
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tenant's environment: the scope of every object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Env {
    pub tenant_id: String,
    pub environment: Environment,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was broken (a feature key that exists, say).
    #[error("{0}")]
    Conflict(String),
    /// Stored data that does not parse or breaks an invariant.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The database failed in a way a retry may not see again: busy or locked, a lock
    /// wait or statement timeout, a serialization failure or deadlock, a lost or refused
    /// connection. Nothing of the transaction was written.
    #[error("database error (transient): {0}")]
    Transient(String),
    /// The database failed and a retry will fail the same way (a missing table, a
    /// broken migration, a full disk).
    #[error("database error: {0}")]
    Fatal(String),
    /// The operation a mutation ran declined (its caller holds the reason): nothing was
    /// written.
    #[error("the operation declined; nothing was written")]
    Declined,
}

impl StoreError {
    /// Whether a retry of the whole operation may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }

    /// A database error, transient or not.
    pub(crate) fn database(message: String, transient: bool) -> StoreError {
        if transient {
            StoreError::Transient(message)
        } else {
            StoreError::Fatal(message)
        }
    }
}

/// Whether a database error code says a retry may succeed: PostgreSQL's serialization
/// failure, deadlock, lock timeout, shutdown, too many connections and connection
/// exceptions (class 08); SQLite's busy and locked (primary codes 5 and 6, with any
/// extended code: `SQLITE_BUSY_SNAPSHOT` is 517).
pub fn transient_code(code: &str) -> bool {
    const POSTGRES: [&str; 7] = [
        "40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300",
    ];
    if POSTGRES.contains(&code) || (code.len() == 5 && code.starts_with("08")) {
        return true;
    }
    // SQLite's codes are numbers of at most four digits; PostgreSQL's always have five.
    code.len() <= 4
        && code
            .parse::<u32>()
            .is_ok_and(|code| matches!(code & 0xff, 5 | 6))
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> StoreError {
        let transient = match &error {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => true,
            sqlx::Error::Database(database) => {
                database.code().is_some_and(|code| transient_code(&code))
            }
            _ => false,
        };
        StoreError::database(error.to_string(), transient)
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(error: serde_json::Error) -> StoreError {
        StoreError::Corrupt(error.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone)]
pub struct TenantRecord {
    pub id: String,
    pub name: String,
    pub created_at: Timestamp,
}

/// An API key as stored: only a hash of its secret.
#[derive(Debug, Clone)]
pub struct ApiKeyRecord {
    pub id: String,
    pub tenant_id: String,
    pub environment: Environment,
    pub name: Option<String>,
    pub scopes: Vec<String>,
    pub prefix: String,
    pub key_hash: [u8; 32],
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// A catalog object: its id, key, the request that created it (the wire form is its
/// source of truth) and when.
#[derive(Debug, Clone)]
pub struct CatalogRecord<T> {
    pub id: String,
    pub key: String,
    pub parent_id: Option<String>,
    pub body: T,
    pub archived: bool,
    pub created_at: Timestamp,
}

/// Per-environment state outside the catalog.
#[derive(Debug, Clone, Default)]
pub struct EnvRecord {
    pub settings: protocol::Settings,
    /// The test clock's offset from the real clock (always 0 in `live`).
    pub clock_offset_ms: i64,
}

/// Annotations the API keeps beside engine objects.
#[derive(Debug, Clone, Default)]
pub struct Annotations {
    /// The idempotency key of the request that wrote these entries.
    pub idempotency_key: Option<String>,
    /// The request's metadata, kept on its entries (and on a granted block).
    pub metadata: Option<serde_json::Value>,
    pub external_payment_id: Option<String>,
}

/// A usage event key kept for batch deduplication (SPEC 9: 35 days).
#[derive(Debug, Clone)]
pub struct UsageKeyRecord {
    pub key: String,
    pub fingerprint: [u8; 32],
    pub entry_id: String,
    /// The answer first given (`UsageRecorded`), as the JSON text stored: written and
    /// read as it is, parsed only when a repeat is answered.
    pub result: String,
    pub keep_until: Timestamp,
}

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

/// What an idempotency lease asks for: the key, the request's fingerprint, when, how
/// long the lease holds, and how long the key is kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseAsk<'a> {
    pub(crate) env: &'a Env,
    pub(crate) key: &'a str,
    pub(crate) fingerprint: &'a [u8; 32],
    pub(crate) now: Timestamp,
    pub(crate) lease_ms: i64,
    pub(crate) keep_until: Timestamp,
}

/// Queues a lease on `queues` under `key`, starting a drainer with `start` when the
/// queue was idle, and waits for its answer. Both stores take the leases that arrive
/// together in one transaction this way.
///
/// # Errors
/// The batch's failure, or a drainer that ended without answering.
pub(crate) async fn queue_lease<K: Eq + std::hash::Hash + Clone>(
    queues: &std::sync::Arc<crate::queues::Queues<K, Lease>>,
    key: K,
    ask: LeaseAsk<'_>,
    start: impl FnOnce(crate::queues::DrainGuard<K, Lease>),
) -> StoreResult<IdempotencyBegin> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let lease = Lease {
        env: ask.env.clone(),
        key: ask.key.to_owned(),
        fingerprint: *ask.fingerprint,
        now: ask.now,
        lease_ms: ask.lease_ms,
        keep_until: ask.keep_until,
        reply,
    };
    if queues.push(&key, lease) {
        start(crate::queues::DrainGuard {
            queues: std::sync::Arc::clone(queues),
            key,
            fail: fail_lease,
            finished: false,
        });
    }
    answer.await.map_err(|_| {
        StoreError::Transient("the idempotency lease task ended without an answer".into())
    })?
}

/// One idempotency key to take, waiting for its batch (both stores take the leases that
/// arrive together in one transaction).
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) env: Env,
    pub(crate) key: String,
    pub(crate) fingerprint: [u8; 32],
    pub(crate) now: Timestamp,
    pub(crate) lease_ms: i64,
    pub(crate) keep_until: Timestamp,
    pub(crate) reply: tokio::sync::oneshot::Sender<StoreResult<IdempotencyBegin>>,
}

/// How many leases one transaction takes at most.
pub(crate) const LEASES_PER_TRANSACTION: usize = 256;

/// Answers a lease its drainer abandoned.
pub(crate) fn fail_lease(lease: Lease) {
    let _ = lease.reply.send(Err(StoreError::Transient(
        "the idempotency lease task stopped unexpectedly".into(),
    )));
}

/// Sends each lease of a batch its answer, or the batch's failure.
pub(crate) fn answer_leases(batch: Vec<Lease>, outcome: StoreResult<Vec<IdempotencyBegin>>) {
    match outcome {
        Ok(answers) => {
            for (lease, answer) in batch.into_iter().zip(answers) {
                let _ = lease.reply.send(Ok(answer));
            }
        }
        Err(error) => {
            let transient = error.is_transient();
            let message = match error {
                StoreError::Transient(message) | StoreError::Fatal(message) => message,
                other => other.to_string(),
            };
            for lease in batch {
                let _ = lease
                    .reply
                    .send(Err(StoreError::database(message.clone(), transient)));
            }
        }
    }
}

/// The error for an operation whose idempotency key another request answered (or took
/// over, its lease having expired) while it waited: retryable, and nothing of the
/// transaction is written.
pub fn answered_elsewhere(key: &str) -> StoreError {
    StoreError::Transient(format!(
        "idempotency key `{key}` (or another of this transaction's) was answered by another request, or taken over by one, while this one waited; nothing was written, and a retry replays that request's answer or waits for it"
    ))
}

/// The reservations an operation created or changed, live or finished (what a store
/// writes of them), in the state's order, then the finished ones'.
pub(crate) fn changed_reservations<'a>(
    old: &EndUserState,
    new: &'a EndUserState,
    changes: &'a [Changes],
) -> Vec<&'a ledger::Reservation> {
    let before: std::collections::BTreeMap<_, _> = old
        .reservations()
        .iter()
        .map(|reservation| (reservation.id, reservation))
        .collect();
    new.reservations()
        .iter()
        .chain(changes.iter().flat_map(|part| &part.finished_reservations))
        .filter(|reservation| {
            before
                .get(&reservation.id)
                .is_none_or(|old| *old != *reservation)
        })
        .collect()
}

/// The leases an operation created or changed, live or finished (what a store writes of
/// them), in the state's order, then the finished ones'.
pub(crate) fn changed_leases<'a>(
    old: &EndUserState,
    new: &'a EndUserState,
    changes: &'a [Changes],
) -> Vec<&'a ledger::Lease> {
    let before: std::collections::BTreeMap<_, _> =
        old.leases().iter().map(|lease| (lease.id, lease)).collect();
    new.leases()
        .iter()
        .chain(changes.iter().flat_map(|part| &part.finished_leases))
        .filter(|lease| before.get(&lease.id).is_none_or(|old| *old != *lease))
        .collect()
}

/// Which leases a listing wants: an end user's, a holder's, or both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseFilter {
    pub end_user_id: Option<String>,
    pub holder: Option<String>,
    /// Only active ones.
    pub active_only: bool,
    /// Leases with an id after this one (the cursor).
    pub after: Option<String>,
    pub limit: u32,
}

/// The subscriptions an operation created or changed, live or finished (what a store
/// writes of them), in the state's order, then the finished ones'.
pub(crate) fn changed_subscriptions<'a>(
    old: &EndUserState,
    new: &'a EndUserState,
    changes: &'a [Changes],
) -> Vec<&'a ledger::Subscription> {
    let before: std::collections::BTreeMap<_, _> = old
        .subscriptions()
        .iter()
        .map(|subscription| (subscription.id, subscription))
        .collect();
    new.subscriptions()
        .iter()
        .chain(changes.iter().flat_map(|part| &part.finished_subscriptions))
        .filter(|subscription| {
            before
                .get(&subscription.id)
                .is_none_or(|old| *old != *subscription)
        })
        .collect()
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

/// A completed idempotent request's stored answer.
#[derive(Debug, Clone)]
pub struct IdempotencyAnswer {
    pub key: String,
    pub status: u16,
    pub body: Vec<u8>,
}

/// What a new idempotent request finds.
#[derive(Debug, Clone)]
pub enum IdempotencyBegin {
    /// The key is new (or its earlier holder died): this request runs.
    Started,
    /// Done before with the same request: replay this answer.
    Replay { status: u16, body: Vec<u8> },
    /// Used before with a different method, path or body.
    Mismatch,
    /// Another request with this key is running.
    InFlight,
}

/// An idempotency key taken inside the transaction of the operation it guards, instead
/// of with a lease first (group commit: a keyed request then costs one transaction, not
/// two). The store inserts it, unanswered, after locking the end user; an operation whose
/// key was already there (answered, or leased by a request on the classic path) does not
/// run, and its request goes the classic way. The answer is stored in the same
/// transaction, so an unanswered claim is never seen committed.
#[derive(Debug, Clone)]
pub struct Claim {
    pub key: String,
    pub fingerprint: [u8; 32],
    /// When the claim was asked for (its `locked_until` is a lease from then).
    pub now: Timestamp,
    pub keep_until: Timestamp,
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

/// Filters for `GET /v1/ledger`.
#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    pub end_user_id: Option<String>,
    pub entry_type: Option<String>,
    pub from: Option<Timestamp>,
    pub to: Option<Timestamp>,
    /// Entries older than this sequence number (the cursor).
    pub before_seq: Option<i64>,
    pub limit: u32,
}

/// A block as the store keeps it: with its owner and the request's annotations.
#[derive(Debug, Clone)]
pub struct StoredBlock {
    pub end_user_id: EndUserId,
    pub block: Block,
    pub annotations: Annotations,
}

/// A webhook endpoint as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRecord {
    pub id: String,
    pub url: String,
    /// `None`: every event type.
    pub event_types: Option<Vec<String>>,
    /// `whsec_<base64>`.
    pub secret: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl EndpointRecord {
    /// Whether this endpoint wants events of `event_type`.
    pub fn wants(&self, event_type: &str) -> bool {
        event_type == "webhook.test"
            || self
                .event_types
                .as_ref()
                .is_none_or(|types| types.iter().any(|wanted| wanted == event_type))
    }
}

/// A delivery claim's lease on the real clock: free at `now`, taken until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryLease {
    pub now: Timestamp,
    pub until: Timestamp,
}

/// A delivery claimed for one attempt.
#[derive(Debug, Clone)]
pub struct DeliveryJob {
    pub delivery_id: i64,
    /// Attempts made before this one.
    pub attempts: u32,
    /// When this attempt fell due (the environment's clock): the event's time for a
    /// first attempt, the retry time after that.
    pub due_at: Timestamp,
    pub endpoint: EndpointRecord,
    pub event: protocol::Event,
}

/// What one delivery attempt came to.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub delivery_id: i64,
    pub attempt: u32,
    pub at: Timestamp,
    pub succeeded: bool,
    pub response_status: Option<u16>,
    pub error: Option<String>,
    /// When to try again; `None` ends the delivery (succeeded, or failed for good).
    pub retry_at: Option<Timestamp>,
}

/// One entry of the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    pub seq: i64,
    /// `None`: the catalog or settings changed.
    pub end_user_id: Option<EndUserId>,
}

/// A stored event with its position in the environment's log.
#[derive(Debug, Clone)]
pub struct EventRecord {
    pub seq: i64,
    pub event: protocol::Event,
}

/// An engine event in its wire form, with an id from its time and `end_user_id` in its
/// data (so webhook receivers see whom it is about). Both stores write this.
pub fn wire_event(event: &ledger::Event) -> protocol::Event {
    let mut data = protocol::event_data(&event.kind);
    if let Some(object) = data.as_object_mut() {
        object.insert(
            "end_user_id".into(),
            serde_json::Value::String(event.end_user_id.to_string()),
        );
    }
    protocol::Event {
        id: ledger::EventId::new(&mut crate::clock::UlidSource::at(event.at)).to_string(),
        event_type: event.kind.type_name().to_owned(),
        end_user_id: Some(event.end_user_id.to_string()),
        created_at: event.at.into(),
        data,
        deliveries: Vec::new(),
    }
}

#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    // --- tenancy
    async fn create_tenant(&self, tenant: &TenantRecord, keys: &[ApiKeyRecord]) -> StoreResult<()>;
    async fn api_key_by_hash(&self, hash: &[u8; 32]) -> StoreResult<Option<ApiKeyRecord>>;
    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()>;
    async fn list_api_keys(&self, env: &Env) -> StoreResult<Vec<ApiKeyRecord>>;
    async fn revoke_api_key(
        &self,
        env: &Env,
        id: &str,
        at: Timestamp,
    ) -> StoreResult<Option<ApiKeyRecord>>;

    // --- environment and catalog
    async fn env_record(&self, env: &Env) -> StoreResult<EnvRecord>;
    async fn put_env_record(&self, env: &Env, record: &EnvRecord) -> StoreResult<()>;
    /// Replaces the settings only (a concurrent clock advance is not undone).
    async fn put_settings(&self, env: &Env, settings: &protocol::Settings) -> StoreResult<()>;
    /// Moves the test clock forward by `step_ms`, atomically; returns the new offset.
    async fn advance_clock(&self, env: &Env, step_ms: i64) -> StoreResult<i64>;
    async fn insert_feature(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreateFeature>,
    ) -> StoreResult<()>;
    async fn features(&self, env: &Env)
    -> StoreResult<Vec<CatalogRecord<protocol::CreateFeature>>>;
    /// Replaces a feature's body (by `record.id`); false when there is no such feature.
    async fn update_feature(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreateFeature>,
    ) -> StoreResult<bool>;
    async fn insert_plan(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreatePlan>,
    ) -> StoreResult<()>;
    async fn plans(&self, env: &Env) -> StoreResult<Vec<CatalogRecord<protocol::CreatePlan>>>;
    /// Replaces a plan's body (by `record.id`); false when there is no such plan.
    async fn update_plan(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreatePlan>,
    ) -> StoreResult<bool>;
    async fn insert_variant(
        &self,
        env: &Env,
        record: &CatalogRecord<protocol::CreateVariant>,
    ) -> StoreResult<()>;
    async fn variants(&self, env: &Env)
    -> StoreResult<Vec<CatalogRecord<protocol::CreateVariant>>>;
    async fn set_variant_archived(&self, env: &Env, id: &str, archived: bool) -> StoreResult<bool>;
    /// Environments that exist, with their clock offsets: what the scheduler walks.
    async fn environments(&self) -> StoreResult<Vec<(Env, i64)>>;

    // --- end users
    /// Loads (and locks) the end user's state (a new one if unknown), claims `claims`,
    /// runs `operation` with which claims it holds, and persists the new state with its
    /// changes in one transaction. Nothing is written when `operation` fails, nor when it
    /// reports no changes.
    async fn mutate(
        &self,
        env: &Env,
        end_user: &EndUserId,
        now: Timestamp,
        claims: &[Claim],
        operation: &mut ClaimingFn<'_>,
    ) -> StoreResult<()>;
    /// Several end users' operations in one transaction (a usage batch): everything
    /// commits or nothing does. End users are locked in id order; each appears once. An
    /// operation may run more than once (see [`MutateFn`]).
    async fn mutate_many(
        &self,
        env: &Env,
        now: Timestamp,
        items: &mut [(EndUserId, &mut MutateFn<'_>)],
    ) -> StoreResult<()>;
    async fn load_state(
        &self,
        env: &Env,
        end_user: &EndUserId,
    ) -> StoreResult<Option<EndUserState>>;
    /// End users with due work at or before `now`, oldest due first, with when it fell due.
    async fn due_end_users(
        &self,
        env: &Env,
        now: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<(EndUserId, Timestamp)>>;
    /// Moves an end user's next due instant forward to `at` when it is earlier (the
    /// scheduler's retry time after their due work failed); never moves it back.
    async fn postpone_due(&self, env: &Env, end_user: &EndUserId, at: Timestamp)
    -> StoreResult<()>;

    // --- history
    async fn block(&self, env: &Env, id: &str) -> StoreResult<Option<StoredBlock>>;
    async fn entries(
        &self,
        env: &Env,
        filter: &EntryFilter,
    ) -> StoreResult<Vec<(i64, protocol::LedgerEntry)>>;
    async fn reservation(&self, env: &Env, id: &str) -> StoreResult<Option<Reservation>>;
    async fn lease(&self, env: &Env, id: &str) -> StoreResult<Option<ledger::Lease>>;
    /// Leases by end user and/or holder, in id order.
    async fn leases(&self, env: &Env, filter: &LeaseFilter) -> StoreResult<Vec<ledger::Lease>>;
    async fn subscription(&self, env: &Env, id: &str) -> StoreResult<Option<Subscription>>;
    async fn subscriptions(
        &self,
        env: &Env,
        end_user: Option<&str>,
        after_id: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<Subscription>>;
    async fn events(
        &self,
        env: &Env,
        after_seq: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<EventRecord>>;
    async fn event(&self, env: &Env, id: &str) -> StoreResult<Option<EventRecord>>;

    // --- change feed
    /// Changes after `cursor`, oldest first: those of the first `limit` positions after
    /// it. One position may name several end users (one record each, sharing its
    /// `seq`; all of them are in the same answer), so an answer may hold more than
    /// `limit` records.
    async fn changes_after(
        &self,
        env: &Env,
        cursor: i64,
        limit: u32,
    ) -> StoreResult<Vec<ChangeRecord>>;
    /// The newest change's position (0 before any).
    async fn last_change(&self, env: &Env) -> StoreResult<i64>;
    /// Changes up to this position were purged (0 when none were).
    async fn purged_through(&self, env: &Env) -> StoreResult<i64>;
    /// Records a catalog or settings change.
    async fn record_catalog_change(&self, env: &Env, at: Timestamp) -> StoreResult<()>;
    /// End users with stored state, by id after `after`, with their states.
    async fn end_user_states(
        &self,
        env: &Env,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<EndUserState>>;
    /// Deletes feed entries older than `before`, moving each environment's watermark.
    async fn purge_changes(&self, before: Timestamp) -> StoreResult<u64>;

    // --- webhooks
    async fn insert_endpoint(&self, env: &Env, record: &EndpointRecord) -> StoreResult<()>;
    async fn endpoints(&self, env: &Env) -> StoreResult<Vec<EndpointRecord>>;
    async fn update_endpoint(&self, env: &Env, record: &EndpointRecord) -> StoreResult<bool>;
    async fn delete_endpoint(&self, env: &Env, id: &str, at: Timestamp) -> StoreResult<bool>;
    /// Writes an event that concerns no end user (a test ping) with a delivery to one
    /// endpoint only.
    async fn insert_ping(
        &self,
        env: &Env,
        event: &protocol::Event,
        endpoint_id: &str,
        now: Timestamp,
    ) -> StoreResult<()>;
    /// Queues the event again for every live endpoint that wants it; returns how many.
    async fn redeliver(&self, env: &Env, event_id: &str, now: Timestamp) -> StoreResult<usize>;
    /// Claims up to `limit` deliveries due by `due_by` (the environment's clock), each the
    /// oldest pending one of its endpoint and end user (so a failing event holds back only
    /// that end user's later events), and not leased at `lease.now`; leases them until
    /// `lease.until`. Leases run on the real clock: they keep two workers apart, whatever
    /// a test clock says.
    async fn claim_deliveries(
        &self,
        env: &Env,
        due_by: Timestamp,
        lease: DeliveryLease,
        limit: u32,
    ) -> StoreResult<Vec<DeliveryJob>>;
    /// How many deliveries are pending and due by `due_by`, leased or not.
    async fn pending_deliveries(&self, env: &Env, due_by: Timestamp) -> StoreResult<u64>;
    async fn record_attempt(&self, attempt: &AttemptRecord) -> StoreResult<()>;

    // --- idempotency
    async fn idempotency_begin(
        &self,
        env: &Env,
        key: &str,
        fingerprint: &[u8; 32],
        now: Timestamp,
        lease_ms: i64,
        keep_until: Timestamp,
    ) -> StoreResult<IdempotencyBegin>;
    async fn idempotency_finish(&self, env: &Env, answer: &IdempotencyAnswer) -> StoreResult<()>;
    async fn idempotency_abandon(&self, env: &Env, key: &str) -> StoreResult<()>;
    /// The stored usage event keys among `keys`, by key.
    async fn usage_keys(
        &self,
        env: &Env,
        keys: &[String],
    ) -> StoreResult<std::collections::BTreeMap<String, UsageKeyRecord>>;
    /// Deletes idempotency records and usage keys kept past their time.
    async fn purge_expired(&self, now: Timestamp) -> StoreResult<u64>;
}

/// What the stores' own tests share.
#[cfg(test)]
pub(crate) mod testing {
    use ledger::{Catalog, Credits, Cx, EndUserId, EndUserState, GrantRequest, Timestamp};

    use super::{Changes, Env, IdempotencyBegin, Store, StoreError, StoreResult};

    /// Each answer's kind, for comparing a batch of lease answers at a glance.
    pub(crate) fn kinds(answers: &[IdempotencyBegin]) -> Vec<&'static str> {
        answers
            .iter()
            .map(|answer| match answer {
                IdempotencyBegin::Started => "started",
                IdempotencyBegin::InFlight => "in flight",
                IdempotencyBegin::Mismatch => "mismatch",
                IdempotencyBegin::Replay { .. } => "replay",
            })
            .collect()
    }

    /// Grants `amount` to `state` at `at`, returning what to write.
    pub(crate) fn grant_to(
        state: &mut EndUserState,
        amount: i64,
        at: Timestamp,
    ) -> StoreResult<Vec<Changes>> {
        let catalog = Catalog::default();
        let mut ids = crate::clock::UlidSource::at(at);
        let mut cx = Cx {
            now: at,
            catalog: &catalog,
            ids: &mut ids,
        };
        let applied = state
            .grant(&mut cx, GrantRequest::new(Credits::new(amount)))
            .map_err(|_| StoreError::Declined)?;
        Ok(vec![Changes::from_applied(applied).1])
    }

    /// Grants `amount` to `end_user` at `at` through `Store::mutate`: a state change, an
    /// entry, a block and an event.
    pub(crate) async fn grant(
        store: &dyn Store,
        env: &Env,
        end_user: &EndUserId,
        amount: i64,
        at: Timestamp,
    ) {
        let mut run = |state: &mut EndUserState, _: &[bool]| grant_to(state, amount, at);
        store
            .mutate(env, end_user, at, &[], &mut run)
            .await
            .expect("grant");
    }

    /// Grants `amount` to each of `end_users` at `at` in one `Store::mutate_many`.
    pub(crate) async fn grant_many(
        store: &dyn Store,
        env: &Env,
        end_users: &[&str],
        amount: i64,
        at: Timestamp,
    ) {
        let mut runs: Vec<_> = end_users
            .iter()
            .map(|_| |state: &mut EndUserState| grant_to(state, amount, at))
            .collect();
        let mut items: Vec<(EndUserId, &mut super::MutateFn<'_>)> = end_users
            .iter()
            .zip(runs.iter_mut())
            .map(|(end_user, run)| {
                (
                    EndUserId::new(end_user).expect("end user id"),
                    run as &mut super::MutateFn<'_>,
                )
            })
            .collect();
        store
            .mutate_many(env, at, &mut items)
            .await
            .expect("grants");
    }
}

#[cfg(test)]
mod tests {
    use super::transient_code;

    #[test]
    fn transient_database_codes() {
        for code in [
            "40001", "40P01", "55P03", "57P01", "53300", "08006", "08001", "5", "6", "517", "262",
        ] {
            assert!(transient_code(code), "{code} is transient");
        }
        for code in [
            "23505", "23503", "42P01", "22P02", "1", "19", "2067", "11", "", "0800", "080006",
        ] {
            assert!(!transient_code(code), "{code} is not transient");
        }
    }
}
