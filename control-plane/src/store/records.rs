//! What the stores keep, as the rest of the control plane sees it: tenancy and keys,
//! catalog records, annotations, idempotency records, webhook endpoints and deliveries,
//! feed and event records, and the filters listings take.

use ledger::{Block, EndUserId, Timestamp};

use super::Environment;

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

/// The fingerprint of a usage key that names a lease report (`{lease}-{sequence}`)
/// rather than a usage event: the key a proxy gives that report's spend as usage when
/// it finds the lease gone. An event with such a key answers as a duplicate whatever
/// its own fingerprint (no SHA-256 of an event is all zeros in practice).
pub const LEASE_REPORT_FINGERPRINT: [u8; 32] = [0; 32];

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

/// One end user's mutation: where, who, when, and the idempotency keys it claims.
#[derive(Debug, Clone, Copy)]
pub struct Mutation<'a> {
    pub env: &'a super::Env,
    pub end_user: &'a EndUserId,
    pub now: Timestamp,
    pub claims: &'a [Claim],
}

/// What a batch meets when another batch recorded one of its usage event keys first:
/// the whole batch rolls back, and a retry finds the key as a duplicate.
pub(crate) fn usage_key_taken(
    unique_violation: bool,
    error: super::StoreError,
) -> super::StoreError {
    if unique_violation {
        super::StoreError::Conflict(
            "a usage event key of this batch was recorded concurrently; send the batch again"
                .into(),
        )
    } else {
        error
    }
}

/// Which subscriptions a listing wants: a page in id order, of one end user or all.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubscriptionFilter<'a> {
    pub end_user_id: Option<&'a str>,
    /// Subscriptions with an id after this one (the cursor).
    pub after: Option<&'a str>,
    pub limit: u32,
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

/// What a webhook worker claims: up to `limit` deliveries due by `due_by` (the
/// environment's clock), leased as `lease` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryClaim {
    pub due_by: Timestamp,
    pub lease: DeliveryLease,
    pub limit: u32,
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

/// An environment, the position of the newest change in its feed (or the purge
/// watermark, when that is later; 0 before any) and its test clock's offset: what the
/// NATS publisher looks over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvHead {
    pub env: super::Env,
    pub head: i64,
    pub clock_offset_ms: i64,
}

/// An end user as the console lists them: the state and when it last changed.
#[derive(Debug, Clone)]
pub struct EndUserRow {
    pub state: ledger::EndUserState,
    /// Milliseconds since the epoch (the clock of the write).
    pub updated_at: i64,
    /// `updated_at` to the minute: what the list is ordered by.
    pub active_minute: i64,
}

/// Where a page of [`EndUserRow`]s ends: the last row's `active_minute` and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndUserCursor {
    pub active_minute: i64,
    pub end_user_id: String,
}

/// Which end users a console page lists: those whose id starts with `prefix` where
/// given, after `after` (the previous page's last row), at most `limit`.
#[derive(Debug, Clone, Copy)]
pub struct EndUserPage<'a> {
    pub prefix: Option<&'a str>,
    pub after: Option<&'a EndUserCursor>,
    pub limit: u32,
}

/// An entry's figures, for charts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryPoint {
    pub seq: i64,
    pub entry_type: String,
    pub created_at: Timestamp,
    pub amount: i64,
    pub balance_after: i64,
}

/// A webhook delivery with its event's type and its last attempt's outcome.
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    pub id: i64,
    pub endpoint_id: String,
    pub event_id: String,
    pub event_type: Option<String>,
    pub event_at: Option<Timestamp>,
    /// `pending`, `succeeded` or `failed`.
    pub status: String,
    pub attempts: u32,
    pub next_attempt_at: Timestamp,
    pub last_response_status: Option<u16>,
    pub last_error: Option<String>,
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
