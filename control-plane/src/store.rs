//! The storage boundary: one [`Store`] trait, implemented for SQLite (`store/sqlite.rs`)
//! and PostgreSQL (`store/postgres.rs`).
//!
//! The store keeps what the engine decides from (each end user's live state, the catalog,
//! settings) and the history it produced (entries, every block, reservations and
//! subscriptions as they end, events), plus tenancy and idempotency records. A mutation
//! of one end user — load the state, run the engine, persist the new state with its
//! entries, blocks, events and idempotency record — happens in one database transaction,
//! and mutations of one end user are serialised.

/// `bind!(query; a, b)` is `query.bind(a).bind(b)`: a statement's values in order, on
/// one line.
macro_rules! bind {
    ($query:expr; $($value:expr),* $(,)?) => {
        $query$(.bind($value))*
    };
}

/// `columns!(rows, |row| ids: row.id, names: row.name)` declares one `Vec` a column
/// (`ids`, `names`) and fills them from `rows` in order: the arrays a PostgreSQL
/// `UNNEST` statement binds.
macro_rules! columns {
    ($rows:expr, |$row:pat_param| $($column:ident: $value:expr),+ $(,)?) => {
        let rows = $rows;
        $(let mut $column = Vec::with_capacity(rows.len());)+
        for $row in rows {
            $($column.push($value);)+
        }
    };
}

/// What a webhook delivery claim reads, before each backend's conditions: the
/// delivery, its event's body and its endpoint (if not deleted). A literal, for
/// `concat!`.
macro_rules! delivery_claim_select {
    () => {
        "SELECT d.id, d.attempts, d.next_attempt_at, d.endpoint_id, e.body AS event_body,
                w.url, w.event_types, w.secret, w.created_at AS endpoint_created_at,
                w.updated_at AS endpoint_updated_at
         FROM webhook_deliveries d
         JOIN events e ON e.id = d.event_id
         JOIN webhook_endpoints w ON w.id = d.endpoint_id AND w.deleted_at IS NULL"
    };
}

pub(crate) mod columns;
mod key_leases;
mod options;
mod records;
mod rows;
pub(crate) mod sql;

pub mod postgres;

pub mod sqlite;

pub use key_leases::LeaseAsk;
pub use key_leases::answered_elsewhere;
pub(crate) use key_leases::{LEASES_PER_TRANSACTION, Lease, answer_leases, queue_lease};
pub use options::{DatabaseUrl, Synchronous};
pub(crate) use records::usage_key_taken;
pub use records::{
    Annotations, ApiKeyRecord, AttemptRecord, CatalogRecord, ChangeRecord, Claim, DeliveryClaim,
    DeliveryJob, DeliveryLease, DeliveryRow, EndUserCursor, EndUserPage, EndUserRow,
    EndpointRecord, EntryFilter, EntryPoint, EnvHead, EnvRecord, EventRecord, IdempotencyAnswer,
    IdempotencyBegin, LEASE_REPORT_FINGERPRINT, LeaseFilter, Mutation, StoredBlock,
    SubscriptionFilter, TenantRecord, UsageKeyRecord, wire_event,
};
pub(crate) use rows::{
    BlockRow, CLAIM_LEASE_MS, EntryRow, HeldRow, HeldTable, StateRow, claimed_flags,
    claims_to_insert, held_rows, stage_rows, user_key,
};
pub use rows::{Changes, ClaimingFn, MutateFn, unchanged};

use std::fmt;

use async_trait::async_trait;
use protocol::Event as WireEvent;

use ledger::{EndUserId, EndUserState, Reservation, Subscription, Timestamp};

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

impl Env {
    pub fn new(tenant_id: impl Into<String>, environment: Environment) -> Env {
        Env {
            tenant_id: tenant_id.into(),
            environment,
        }
    }
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

/// The store of tenants and their API keys.
#[async_trait]
pub trait TenancyStore: Send + Sync {
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
    /// Every environment after `after` in (tenant, environment) order, at most `limit`,
    /// with its feed's head.
    async fn env_heads(&self, after: Option<&Env>, limit: u32) -> StoreResult<Vec<EnvHead>>;
}

/// The store of each environment's catalog, settings and test clock.
#[async_trait]
pub trait CatalogStore: Send + Sync {
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
}

/// The store of end users' state and the history it produced: one end user's mutation
/// is all or nothing (a transaction, or its own part of one shared with others).
#[async_trait]
pub trait LedgerStore: Send + Sync {
    /// Loads (and locks) the end user's state (a new one if unknown), claims `claims`,
    /// runs `operation` with which claims it holds, and persists the new state with its
    /// changes in one transaction. Nothing is written when `operation` fails, nor when it
    /// reports no changes.
    async fn mutate(&self, target: Mutation<'_>, operation: &mut ClaimingFn<'_>)
    -> StoreResult<()>;
    /// Several end users' mutations (as [`LedgerStore::mutate`] runs one) in one
    /// transaction, each committed or failed on its own: one per end user, each end
    /// user at most once. Returns each one's outcome, in order. The service commits
    /// the groups of an environment's end users that wait together this way: one
    /// commit (SQLite: one fsync; PostgreSQL: one turn at the feed head) for all.
    ///
    /// # Errors
    /// A failure of the shared transaction: nothing of any of them was written.
    async fn mutate_each(
        &self,
        each: &mut [(Mutation<'_>, &mut ClaimingFn<'_>)],
    ) -> StoreResult<Vec<StoreResult<()>>>;
    /// Several end users' operations in one transaction (a usage batch): everything
    /// commits or nothing does. End users are locked in id order; each appears once. An
    /// operation may run more than once (see [`MutateFn`]).
    async fn mutate_many(
        &self,
        env: &Env,
        now: Timestamp,
        items: &mut [(EndUserId, &mut MutateFn<'_>)],
    ) -> StoreResult<()>;
    async fn entries(
        &self,
        env: &Env,
        filter: &EntryFilter,
    ) -> StoreResult<Vec<(i64, protocol::LedgerEntry)>>;
    /// The end user's newest `limit` entries, newest first, with only the figures a
    /// chart needs.
    async fn entry_points(
        &self,
        env: &Env,
        end_user: &str,
        limit: u32,
    ) -> StoreResult<Vec<EntryPoint>>;
}

/// Reads of the records mutations write, one by id or a page in id order (written once
/// for both backends, `store/sql/records.rs`).
#[async_trait]
pub trait RecordStore: Send + Sync {
    /// The end user's state; `None` for one never stored.
    async fn load_state(
        &self,
        env: &Env,
        end_user: &EndUserId,
    ) -> StoreResult<Option<EndUserState>>;
    async fn block(&self, env: &Env, id: &str) -> StoreResult<Option<StoredBlock>>;
    async fn reservation(&self, env: &Env, id: &str) -> StoreResult<Option<Reservation>>;
    async fn lease(&self, env: &Env, id: &str) -> StoreResult<Option<ledger::Lease>>;
    /// Leases by end user and/or holder, in id order.
    async fn leases(&self, env: &Env, filter: &LeaseFilter) -> StoreResult<Vec<ledger::Lease>>;
    async fn subscription(&self, env: &Env, id: &str) -> StoreResult<Option<Subscription>>;
    async fn subscriptions(
        &self,
        env: &Env,
        filter: SubscriptionFilter<'_>,
    ) -> StoreResult<Vec<Subscription>>;
}

/// The store of what the scheduler walks: environments and end users with due work.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Environments that exist, with their clock offsets: what the scheduler walks.
    async fn environments(&self) -> StoreResult<Vec<(Env, i64)>>;
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
}

/// The store of the change feed proxies follow.
#[async_trait]
pub trait FeedStore: Send + Sync {
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
    /// Records a catalog or settings change.
    async fn record_catalog_change(&self, env: &Env, at: Timestamp) -> StoreResult<()>;
    /// Deletes feed entries older than `before`, moving each environment's watermark.
    async fn purge_changes(&self, before: Timestamp) -> StoreResult<u64>;

    /// Tells the other processes on this database that this one committed a change to a
    /// feed, so that their change streams look at once rather than at their next poll.
    /// A no-op where the store has no way to (SQLite: one process per file).
    fn announce_commit(&self) {}

    /// A receiver that sees a new value whenever another process announced a commit;
    /// `None` where the store cannot hear of them (streams then find other processes'
    /// changes by polling).
    fn commits_elsewhere(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// The change feed's reads that both backends run alike (written once,
/// `store/sql/feed.rs`).
#[async_trait]
pub trait FeedReadStore: Send + Sync {
    /// The newest change's position (0 before any).
    async fn last_change(&self, env: &Env) -> StoreResult<i64>;
    /// Changes up to this position were purged (0 when none were).
    async fn purged_through(&self, env: &Env) -> StoreResult<i64>;
    /// End users with stored state, by id after `after`, with their states.
    async fn end_user_states(
        &self,
        env: &Env,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<EndUserState>>;
}

/// The store of the event log and webhook endpoints, as read and written alike by both
/// sqlx backends (written once, `store/sql/endpoints.rs`).
#[async_trait]
pub trait EndpointStore: Send + Sync {
    async fn events(
        &self,
        env: &Env,
        after_seq: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<EventRecord>>;
    async fn event(&self, env: &Env, id: &str) -> StoreResult<Option<EventRecord>>;

    async fn insert_endpoint(&self, env: &Env, record: &EndpointRecord) -> StoreResult<()>;
    async fn endpoints(&self, env: &Env) -> StoreResult<Vec<EndpointRecord>>;
    async fn update_endpoint(&self, env: &Env, record: &EndpointRecord) -> StoreResult<bool>;
    async fn delete_endpoint(&self, env: &Env, id: &str, at: Timestamp) -> StoreResult<bool>;
    /// How many deliveries are pending and due by `due_by`, leased or not.
    async fn pending_deliveries(&self, env: &Env, due_by: Timestamp) -> StoreResult<u64>;
    /// Queues the event again for every live endpoint that wants it; returns how many.
    async fn redeliver(&self, env: &Env, event_id: &str, now: Timestamp) -> StoreResult<usize>;
    async fn record_attempt(&self, attempt: &AttemptRecord) -> StoreResult<()>;
}

/// What the console reads beyond the API's own reads (written once,
/// `store/sql/console.rs`).
#[async_trait]
pub trait ConsoleStore: Send + Sync {
    /// End users newest minute of change first (ties by id), a page as `page` says.
    async fn recent_end_users(
        &self,
        env: &Env,
        page: EndUserPage<'_>,
    ) -> StoreResult<Vec<EndUserRow>>;
    /// An end user's newest events first.
    async fn end_user_events(
        &self,
        env: &Env,
        end_user: &str,
        limit: u32,
    ) -> StoreResult<Vec<EventRecord>>;
    /// The environment's newest webhook deliveries first.
    async fn recent_deliveries(&self, env: &Env, limit: u32) -> StoreResult<Vec<DeliveryRow>>;
}

/// The store of webhook deliveries: queued, claimed by workers, attempted.
#[async_trait]
pub trait WebhookStore: Send + Sync {
    /// Writes an event that concerns no end user (a test ping) with a delivery to one
    /// endpoint only.
    /// The delivery is pending from the event's `created_at`.
    async fn insert_ping(&self, env: &Env, event: &WireEvent, endpoint: &str) -> StoreResult<()>;
    /// Claims up to `limit` deliveries due by `due_by` (the environment's clock), each the
    /// oldest pending one of its endpoint and end user (so a failing event holds back only
    /// that end user's later events), and not leased at `lease.now`; leases them until
    /// `lease.until`. Leases run on the real clock: they keep two workers apart, whatever
    /// a test clock says.
    async fn claim_deliveries(
        &self,
        env: &Env,
        claim: &DeliveryClaim,
    ) -> StoreResult<Vec<DeliveryJob>>;
}

/// The store of idempotency keys and usage event keys.
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Takes the key's lease for a request, or answers what holds it.
    async fn idempotency_begin(&self, ask: LeaseAsk<'_>) -> StoreResult<IdempotencyBegin>;
    /// The stored usage event keys among `keys`, by key.
    async fn usage_keys(
        &self,
        env: &Env,
        keys: &[String],
    ) -> StoreResult<std::collections::BTreeMap<String, UsageKeyRecord>>;
    /// Deletes idempotency records and usage keys kept past their time.
    async fn purge_expired(&self, now: Timestamp) -> StoreResult<u64>;
}

/// Idempotency keys answered or given back, alike on both backends (written once,
/// `store/sql/idempotency.rs`).
#[async_trait]
pub trait IdempotencyAnswerStore: Send + Sync {
    /// Stores the answer to the request that holds the key.
    async fn idempotency_finish(&self, env: &Env, answer: &IdempotencyAnswer) -> StoreResult<()>;
    /// Gives back a key whose request stored no answer.
    async fn idempotency_abandon(&self, env: &Env, key: &str) -> StoreResult<()>;
}

/// `Store` and its blanket implementation from one list of capabilities.
macro_rules! store_of {
    ($($capability:ident),+ $(,)?) => {
        /// Everything the control plane stores, one capability per trait (each backend
        /// implements them in one file per capability: `store/sqlite/*.rs`,
        /// `store/postgres/*.rs`, or once for both in `store/sql/*.rs`).
        pub trait Store: $($capability +)+ fmt::Debug + 'static {}

        impl<T> Store for T where T: $($capability +)+ fmt::Debug + 'static {}
    };
}

#[rustfmt::skip]
store_of![
    TenancyStore, CatalogStore, LedgerStore, RecordStore, JobStore, FeedStore, FeedReadStore,
    EndpointStore, ConsoleStore, WebhookStore, IdempotencyStore, IdempotencyAnswerStore,
];

#[cfg(test)]
pub(crate) mod testing;

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
