//! Leases (SPEC 12.1): credits held for one proxy, spent in sequence-numbered reports.

use serde::{Deserialize, Serialize};

use crate::{FieldError, WireTime, end_user_id, feature_key};

/// `POST /v1/leases`: hold as much of `amount` as is available for `holder`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateLease {
    pub end_user_id: String,
    pub feature_key: String,
    /// The proxy's stable instance id: `[A-Za-z0-9_.:-]{1,128}`.
    pub holder: String,
    /// Credits to hold; as much of it as is available is held (never nothing).
    pub amount: i64,
    /// 1 to 604800 (7 days); a report may extend it.
    pub ttl_seconds: i64,
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
    pub sequence: u64,
    /// Units used since the last report (counted toward the period's usage).
    #[serde(default)]
    pub units: u64,
    /// Credits charged for them: the sum of the per-request costs.
    #[serde(default)]
    pub cost: i64,
    /// Requests admitted since the last report.
    #[serde(default)]
    pub requests: u64,
    /// Hold this much more (as much of it as is available).
    #[serde(default)]
    pub top_up: Option<i64>,
    /// Extend the lease to now plus this.
    #[serde(default)]
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
            replayed: false,
            beyond_hold: None,
            topped_up: None,
        }
    }
}

impl Lease {
    /// The answer to a report.
    pub fn reported(reported: &ledger::LeaseReported, version: u64) -> Lease {
        Lease {
            version: Some(version),
            replayed: reported.replayed,
            beyond_hold: Some(reported.beyond_hold.get()),
            topped_up: Some(reported.topped_up.get()),
            ..Lease::from(&reported.lease)
        }
    }
}
