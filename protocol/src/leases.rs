//! Leases (SPEC 12.1): credits held for one proxy, spent in sequence-numbered reports.

use serde::{Deserialize, Serialize};

use crate::{FieldError, Problem, WireTime, end_user_id, feature_key};

/// `POST /v1/leases`: hold as much of `amount` as is available for `holder`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateLease {
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]+$"
    )]
    pub end_user_id: String,
    #[schema(pattern = r"^[a-z0-9_.-]{1,64}$")]
    pub feature_key: String,
    /// The proxy's stable instance id: `[A-Za-z0-9_.:-]{1,128}`.
    #[schema(pattern = r"^[A-Za-z0-9_.:-]{1,128}$")]
    pub holder: String,
    /// Credits to hold; as much of it as is available is held (never nothing).
    #[schema(minimum = 1)]
    pub amount: i64,
    /// 1 to 604800 (7 days); a report may extend it.
    #[schema(minimum = 1, maximum = 604_800)]
    pub ttl_seconds: i64,
    /// The holder's id for this creation (`[A-Za-z0-9_.:-]{1,128}`): a creation by the
    /// same holder repeating it answers the lease the first one made (with `replayed`)
    /// instead of holding more, for as long as that lease is kept (an hour after it ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[A-Za-z0-9_.:-]{1,128}$")]
    pub request_id: Option<String>,
}

impl CreateLease {
    /// # Errors
    /// The field at fault.
    pub fn to_ledger(&self) -> Result<(ledger::EndUserId, ledger::LeaseRequest), FieldError> {
        Ok((
            end_user_id("end_user_id", &self.end_user_id)?,
            ledger::LeaseRequest {
                feature_key: feature_key("feature_key", &self.feature_key)?,
                holder: holder("holder", &self.holder)?,
                amount: ledger::Credits::new(self.amount),
                ttl_secs: self.ttl_seconds,
                request_id: self
                    .request_id
                    .as_deref()
                    .map(|id| {
                        holder("request_id", id)?;
                        Ok::<_, FieldError>(id.to_owned())
                    })
                    .transpose()?,
            },
        ))
    }
}

/// Checks a lease holder's id.
///
/// # Errors
/// Naming `field`.
pub fn holder(field: &str, text: &str) -> Result<ledger::Holder, FieldError> {
    ledger::Holder::new(text).map_err(|error| FieldError::new(field, error.to_string()))
}

/// `POST /v1/leases/{id}/report` (and, without `top_up` and `ttl_seconds`, `/release`):
/// what the holder spent since its last report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportLease {
    /// 1 for the first report, then one more each time.
    #[schema(minimum = 1)]
    pub sequence: u64,
    /// Units used since the last report (counted toward the period's usage).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1_000_000_000_000_u64)]
    pub units: u64,
    /// Credits charged for them: the sum of the per-request costs.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub cost: i64,
    /// Requests admitted since the last report.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub requests: u64,
    /// Hold this much more (as much of it as is available).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub top_up: Option<i64>,
    /// Extend the lease to now plus this.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 604_800)]
    pub ttl_seconds: Option<i64>,
}

impl ReportLease {
    /// The engine's report.
    pub fn to_ledger(&self) -> ledger::LeaseReport {
        ledger::LeaseReport {
            sequence: self.sequence,
            units: self.units,
            cost: ledger::Credits::new(self.cost),
            requests: self.requests,
            top_up: self.top_up.map(ledger::Credits::new),
            ttl_secs: self.ttl_seconds,
        }
    }
}

/// A lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lease {
    pub id: String,
    pub end_user_id: String,
    pub feature_key: String,
    pub holder: String,
    /// Credits held now.
    pub amount: i64,
    /// `active`, `expired` or `released`.
    pub status: String,
    pub expires_at: WireTime,
    /// The last report's sequence (0 before the first).
    pub sequence: u64,
    /// Credits ever held (the first hold and every top-up).
    pub granted: i64,
    /// Credits the reports charged (from the hold, or beyond it).
    pub spent: i64,
    pub units: u64,
    pub requests: u64,
    pub created_at: WireTime,
    pub ended_at: Option<WireTime>,
    /// In an answer to a creation, report or release: the end user's state version that
    /// first includes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// In an answer to a creation, report or release: the feature's credits available to
    /// the end user beside every hold, as of `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<i64>,
    /// In an answer to a report: its sequence was taken before, and nothing changed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
    /// In an answer to a report: the part of its cost the hold did not cover, charged
    /// like usage (available credits, then debt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beyond_hold: Option<i64>,
    /// In an answer to a report: what its top-up added to the hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topped_up: Option<i64>,
}

impl From<&ledger::Lease> for Lease {
    fn from(lease: &ledger::Lease) -> Lease {
        Lease {
            id: lease.id.to_string(),
            end_user_id: lease.end_user_id.to_string(),
            feature_key: lease.feature_key.to_string(),
            holder: lease.holder.to_string(),
            amount: lease.held.get(),
            status: lease.status.as_str().to_owned(),
            expires_at: lease.expires_at.into(),
            sequence: lease.sequence,
            granted: lease.granted.get(),
            spent: lease.spent.get(),
            units: lease.units,
            requests: lease.requests,
            created_at: lease.created_at.into(),
            ended_at: lease.ended_at.map(WireTime),
            version: None,
            available: None,
            replayed: false,
            beyond_hold: None,
            topped_up: None,
        }
    }
}

impl Lease {
    /// The answer to a creation (`replayed`: a repeated request id found the earlier
    /// lease), as of the end user's state `user` after it at `now`.
    pub fn created(
        lease: &ledger::Lease,
        user: &ledger::EndUserState,
        now: ledger::Timestamp,
        replayed: bool,
    ) -> Lease {
        Lease {
            replayed,
            ..Lease::as_of(lease, user, now)
        }
    }

    /// The answer to a report or a release, as of the end user's state `user` after it
    /// at `now`.
    pub fn reported(
        reported: &ledger::LeaseReported,
        user: &ledger::EndUserState,
        now: ledger::Timestamp,
    ) -> Lease {
        Lease {
            replayed: reported.replayed,
            beyond_hold: Some(reported.beyond_hold.get()),
            topped_up: Some(reported.topped_up.get()),
            ..Lease::as_of(&reported.lease, user, now)
        }
    }

    /// `lease` with the version of `user` and what its feature has free there at `now`.
    fn as_of(lease: &ledger::Lease, user: &ledger::EndUserState, now: ledger::Timestamp) -> Lease {
        Lease {
            version: Some(user.version()),
            available: user
                .available(Some(&lease.feature_key), now)
                .ok()
                .map(ledger::Credits::get),
            ..Lease::from(lease)
        }
    }
}

/// The most operations in one `POST /v1/leases/batch`.
pub const LEASE_BATCH_MAX: usize = 500;

/// `POST /v1/leases/batch`: up to [`LEASE_BATCH_MAX`] lease operations, answered one by
/// one (a refused operation does not stop the others). A proxy sends its creations,
/// reports and releases of one moment together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseBatch {
    #[schema(min_items = 1, max_items = 500)]
    pub operations: Vec<LeaseOperation>,
}

/// One operation of a lease batch, named by `op`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum LeaseOperation {
    /// As `POST /v1/leases` (give `request_id`: a batch has no other idempotency).
    Create(CreateLease),
    /// As `POST /v1/leases/{lease_id}/report`.
    Report(LeaseStep),
    /// As `POST /v1/leases/{lease_id}/release`.
    Release(LeaseStep),
}

/// Each branch is its operation's object with `op` added: the derived schema would
/// combine `op` with objects that forbid other properties, which nothing satisfies.
impl utoipa::PartialSchema for LeaseOperation {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
        use utoipa::openapi::{RefOr, schema::Object};
        fn tagged(op: &str, description: &str, branch: RefOr<Schema>) -> Object {
            let mut object = match branch {
                RefOr::T(Schema::Object(object)) => object,
                _ => Object::new(),
            };
            let tag = ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some([op]))
                .build();
            object.properties.insert("op".to_owned(), tag.into());
            object.required.insert(0, "op".to_owned());
            object.description = Some(description.to_owned());
            object
        }
        OneOfBuilder::new()
            .item(tagged(
                "create",
                "As `POST /v1/leases` (give `request_id`: a batch has no other idempotency).",
                <CreateLease as utoipa::PartialSchema>::schema(),
            ))
            .item(tagged(
                "report",
                "As `POST /v1/leases/{lease_id}/report`.",
                <LeaseStep as utoipa::PartialSchema>::schema(),
            ))
            .item(tagged(
                "release",
                "As `POST /v1/leases/{lease_id}/release`.",
                <LeaseStep as utoipa::PartialSchema>::schema(),
            ))
            .description(Some("One operation of a lease batch, named by `op`."))
            .into()
    }
}

impl utoipa::ToSchema for LeaseOperation {}

/// A report or release in a batch: the lease and the report's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseStep {
    #[schema(pattern = r"^lse_[0-9A-Za-z]{26}$")]
    pub lease_id: String,
    #[schema(minimum = 1)]
    pub sequence: u64,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1_000_000_000_000_u64)]
    pub units: u64,
    #[serde(default)]
    #[schema(minimum = 0)]
    pub cost: i64,
    #[serde(default)]
    #[schema(minimum = 0)]
    pub requests: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub top_up: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 604_800)]
    pub ttl_seconds: Option<i64>,
}

impl LeaseStep {
    pub fn new(lease_id: String, report: ReportLease) -> LeaseStep {
        LeaseStep {
            lease_id,
            sequence: report.sequence,
            units: report.units,
            cost: report.cost,
            requests: report.requests,
            top_up: report.top_up,
            ttl_seconds: report.ttl_seconds,
        }
    }

    pub fn report(&self) -> ReportLease {
        ReportLease {
            sequence: self.sequence,
            units: self.units,
            cost: self.cost,
            requests: self.requests,
            top_up: self.top_up,
            ttl_seconds: self.ttl_seconds,
        }
    }
}

/// The answer to a lease batch: one result per operation, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseBatchAnswer {
    pub results: Vec<LeaseBatchResult>,
}

/// One operation's outcome: the status its own endpoint would have answered (201 for a
/// creation, 200 for a report or release, else the problem's), with the lease or the
/// problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseBatchResult {
    pub index: usize,
    pub status: u16,
    pub lease: Option<Lease>,
    pub error: Option<Problem>,
}
