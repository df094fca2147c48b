//! Usage, batches, reservations and entitlement checks (SPEC 5, 6, 7).

use serde::{Deserialize, Serialize};

use crate::{FieldError, Problem, WireTime, check_metadata, end_user_id, feature_key, units};

/// `POST /v1/usage`, and one event of a batch. The values' rules (an end user id of 1 to
/// 256 bytes without control characters, a feature key `[a-z0-9_.-]{1,64}`, units 1 to
/// 10^12, an idempotency key of 1 to 255 printable ASCII characters) are checked one event
/// at a time: in a batch, an event that breaks one is an `error` result while the others
/// go through, so the document states only the shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordUsage {
    pub end_user_id: String,
    pub feature_key: String,
    /// 1 to 10^12 (checked per event; the document states serde's bound only).
    #[schema(
        format = "uint64",
        minimum = 0,
        maximum = 18_446_744_073_709_551_615_u64
    )]
    pub units: u64,
    /// When it happened; defaults to now. Outside the accepted window (35 days back,
    /// 5 minutes ahead) it is clamped to the nearest edge, and the answer says so.
    #[serde(default)]
    pub timestamp: Option<WireTime>,
    /// A JSON object of at most 16 KiB (checked per event, like the other rules).
    #[serde(default)]
    #[schema(value_type = Option<Value>)]
    pub metadata: Option<serde_json::Value>,
    #[serde(default)]
    pub strict: bool,
    /// Batch events only: the event's own idempotency key (1 to 255 printable ASCII).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// How far back and ahead a usage timestamp may be (SPEC 6).
pub const USAGE_PAST_DAYS_MAX: i64 = 35;
pub const USAGE_FUTURE_SECS_MAX: i64 = 300;

impl RecordUsage {
    /// The end user, the engine's request and the event's timestamp, clamped into the
    /// accepted window (SPEC 6: 35 days back, 5 minutes ahead of `now`). Usage is a fact
    /// that happened: an event stamped outside the window (a caller whose clock is off,
    /// a proxy that was cut off for long) is recorded at the window's nearest edge, not
    /// refused, and the answer names the timestamp it was sent with
    /// (`timestamp_clamped_from`).
    ///
    /// # Errors
    /// The field at fault, prefixed with `prefix` (empty for a single event).
    pub fn to_ledger(
        &self,
        prefix: &str,
        now: ledger::Timestamp,
    ) -> Result<ParsedUsage, FieldError> {
        let field = |name: &str| format!("{prefix}{name}");
        let end_user = end_user_id(&field("end_user_id"), &self.end_user_id)?;
        let feature = feature_key(&field("feature_key"), &self.feature_key)?;
        let units = units(&field("units"), self.units)?;
        let sent = self.timestamp.map_or(now, |time| time.0);
        let earliest = ledger::Span::from_days(USAGE_PAST_DAYS_MAX)
            .ok()
            .and_then(|span| now.checked_sub(span).ok())
            .unwrap_or(now);
        let latest = ledger::Span::from_secs(USAGE_FUTURE_SECS_MAX)
            .ok()
            .and_then(|span| now.checked_add(span).ok())
            .unwrap_or(now);
        let timestamp = sent.clamp(earliest, latest);
        check_metadata(&field("metadata"), self.metadata.as_ref())?;
        if let Some(key) = &self.idempotency_key {
            check_idempotency_key(&field("idempotency_key"), key)?;
        }
        Ok(ParsedUsage {
            end_user,
            usage: ledger::UsageRequest {
                feature_key: feature,
                units,
                strict: self.strict,
            },
            timestamp,
            clamped_from: (timestamp != sent).then_some(sent),
        })
    }
}

/// A usage event, checked: what the engine needs, and when it is recorded as having
/// happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedUsage {
    pub end_user: ledger::EndUserId,
    pub usage: ledger::UsageRequest,
    /// Within the accepted window.
    pub timestamp: ledger::Timestamp,
    /// The timestamp sent, when it was outside the window and clamped.
    pub clamped_from: Option<ledger::Timestamp>,
}

/// Checks an idempotency key: 1 to 255 printable ASCII characters.
pub fn check_idempotency_key(field: &str, key: &str) -> Result<(), FieldError> {
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|byte| (0x20..=0x7e).contains(&byte)) {
        return Err(FieldError::new(
            field,
            "must be 1 to 255 printable ASCII characters",
        ));
    }
    Ok(())
}

/// The answer to a usage event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageRecorded {
    /// The ledger entry.
    pub id: String,
    pub end_user_id: String,
    pub feature_key: String,
    pub units: u64,
    pub cost: i64,
    pub covered: i64,
    /// Debt this event added.
    pub debt: i64,
    /// Available for the feature afterwards.
    pub balance: i64,
    pub timestamp: WireTime,
    /// The end user's state version that first includes this event (a replica showing
    /// this version or later has it); absent on events recorded before versions were
    /// reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Present when the event's timestamp lay outside the accepted window (35 days back,
    /// 5 minutes ahead) and `timestamp` is the nearest edge: the timestamp sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_clamped_from: Option<WireTime>,
}

/// The most events one batch may carry (SPEC 6).
pub const BATCH_EVENTS_MAX: usize = 1000;

/// `POST /v1/usage/batch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageBatch {
    #[schema(min_items = 1, max_items = 1000)]
    pub events: Vec<RecordUsage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Created,
    Duplicate,
    Error,
}

/// One event's outcome in a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchResult {
    pub index: usize,
    pub status: BatchStatus,
    /// The ledger entry (the original one for a duplicate).
    pub id: Option<String>,
    pub cost: Option<i64>,
    pub covered: Option<i64>,
    pub debt: Option<i64>,
    /// The end user's state version that first includes this event (see `UsageRecorded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    pub error: Option<Problem>,
    /// The event's timestamp as sent, when it was clamped into the accepted window (see
    /// `UsageRecorded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_clamped_from: Option<WireTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageBatchRecorded {
    pub results: Vec<BatchResult>,
}

/// `POST /v1/reservations`: `units` or `amount`, exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateReservation {
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]+$"
    )]
    pub end_user_id: String,
    #[schema(pattern = r"^[a-z0-9_.-]{1,64}$")]
    pub feature_key: String,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1_000_000_000_000_u64)]
    pub units: Option<u64>,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub amount: Option<i64>,
    /// Default 300, at most 604800 (7 days).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 604_800)]
    pub ttl_seconds: Option<i64>,
}

impl CreateReservation {
    /// # Errors
    /// The field at fault.
    pub fn to_ledger(&self) -> Result<(ledger::EndUserId, ledger::ReserveRequest), FieldError> {
        let end_user = end_user_id("end_user_id", &self.end_user_id)?;
        let feature = feature_key("feature_key", &self.feature_key)?;
        let size = match (self.units, self.amount) {
            (Some(count), None) => ledger::HoldSize::Units(units("units", count)?),
            (None, Some(amount)) => ledger::HoldSize::Amount(ledger::Credits::new(amount)),
            _ => {
                return Err(FieldError::new(
                    "units",
                    "give exactly one of `units` and `amount`",
                ));
            }
        };
        Ok((
            end_user,
            ledger::ReserveRequest {
                feature_key: feature,
                size,
                ttl_secs: self.ttl_seconds,
            },
        ))
    }
}

/// `POST /v1/reservations/{id}/commit`: `units`, `amount`, or neither (commit the hold).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommitReservation {
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1_000_000_000_000_u64)]
    pub units: Option<u64>,
    #[serde(default)]
    #[schema(minimum = 0)]
    pub amount: Option<i64>,
}

impl CommitReservation {
    /// # Errors
    /// The field at fault.
    pub fn to_ledger(&self) -> Result<ledger::CommitSize, FieldError> {
        match (self.units, self.amount) {
            (None, None) => Ok(ledger::CommitSize::Hold),
            (Some(count), None) => Ok(ledger::CommitSize::Units(units("units", count)?)),
            (None, Some(amount)) => Ok(ledger::CommitSize::Amount(ledger::Credits::new(amount))),
            (Some(_), Some(_)) => Err(FieldError::new(
                "units",
                "give at most one of `units` and `amount`",
            )),
        }
    }
}

/// `POST /v1/reservations/{id}/extend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendReservation {
    pub ttl_seconds: i64,
}

/// A reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Reservation {
    pub id: String,
    pub end_user_id: String,
    pub feature_key: String,
    pub amount: i64,
    /// `active`, `committed`, `released` or `expired`.
    pub status: String,
    pub expires_at: WireTime,
    pub committed_amount: i64,
    pub released_amount: i64,
    pub created_at: WireTime,
    pub resolved_at: Option<WireTime>,
    /// In the answer to a hold, commit, release or extend: the end user's state version
    /// that first includes it (a replica showing this version or later has it). Absent
    /// when a reservation is read, and on answers stored before versions were reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

impl From<&ledger::Reservation> for Reservation {
    fn from(reservation: &ledger::Reservation) -> Reservation {
        Reservation {
            id: reservation.id.to_string(),
            end_user_id: reservation.end_user_id.to_string(),
            feature_key: reservation.feature_key.to_string(),
            amount: reservation.amount.get(),
            status: reservation.status.as_str().to_owned(),
            expires_at: reservation.expires_at.into(),
            committed_amount: reservation.committed_amount.get(),
            released_amount: reservation.released_amount.get(),
            created_at: reservation.created_at.into(),
            resolved_at: reservation.resolved_at.map(WireTime),
            version: None,
        }
    }
}

/// How fresh an entitlement answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DecisionSource {
    /// Decided at the control plane from the ledger.
    Ledger,
    /// Decided in a proxy from its replica.
    Replica,
    /// Decided by a proxy's failure policy.
    Fallback,
}

/// `GET /v1/entitlements/check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EntitlementCheck {
    pub allowed: bool,
    /// Available credits for the feature; `null` for boolean features.
    pub balance: Option<i64>,
    pub end_user_id: String,
    pub feature_key: String,
    pub units: u64,
    /// `null` for boolean features.
    pub cost: Option<i64>,
    pub debt: i64,
    /// `insufficient_balance`, `not_in_plan`, `subscription_paused`, `subscription_past_due`.
    pub reason: Option<String>,
    pub resets_at: Option<WireTime>,
    /// The key of the end user's base plan (or the free plan).
    pub plan: Option<String>,
    pub subscription_status: Option<String>,
    pub source: DecisionSource,
    pub as_of: WireTime,
}

impl EntitlementCheck {
    /// The wire answer for an engine decision; `plan` is the plan's key.
    pub fn new(
        decision: &ledger::Decision,
        end_user: &ledger::EndUserId,
        feature: &ledger::FeatureKey,
        units: ledger::Units,
        plan: Option<String>,
        source: DecisionSource,
        as_of: ledger::Timestamp,
    ) -> EntitlementCheck {
        EntitlementCheck {
            allowed: decision.allowed,
            balance: decision.balance.map(ledger::Credits::get),
            end_user_id: end_user.to_string(),
            feature_key: feature.to_string(),
            units: units.get(),
            cost: decision.cost.map(ledger::Credits::get),
            debt: decision.debt.get(),
            reason: decision.reason.map(|reason| reason.as_str().to_owned()),
            resets_at: decision.resets_at.map(WireTime),
            plan,
            subscription_status: decision
                .subscription_status
                .map(|status| status.as_str().to_owned()),
            source,
            as_of: as_of.into(),
        }
    }
}
