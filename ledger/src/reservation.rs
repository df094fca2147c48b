//! Reservations (SPEC 7): hold credits for a long job, then commit the actual cost,
//! release, or let the hold expire.

use std::fmt;

use crate::amount::{Credits, Units};
use crate::block::Part;
use crate::id::{EndUserId, FeatureKey, ReservationId};
use crate::time::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum ReservationStatus {
    Active,
    Committed,
    Released,
    Expired,
}

impl ReservationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Active => "active",
            ReservationStatus::Committed => "committed",
            ReservationStatus::Released => "released",
            ReservationStatus::Expired => "expired",
        }
    }
}

impl fmt::Display for ReservationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Reservation {
    pub id: ReservationId,
    pub end_user_id: EndUserId,
    pub feature_key: FeatureKey,
    /// The credits held.
    pub amount: Credits,
    /// The units the hold was priced from, when it was asked for in units.
    pub units: Option<Units>,
    /// Where the hold sits, in burn order at the time it was made.
    pub parts: Vec<Part>,
    pub status: ReservationStatus,
    pub expires_at: Timestamp,
    pub committed_amount: Credits,
    pub released_amount: Credits,
    pub created_at: Timestamp,
    pub resolved_at: Option<Timestamp>,
}

/// What a reservation holds: a number of units (priced now) or an amount of credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldSize {
    Units(Units),
    Amount(Credits),
}

/// What a commit charges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitSize {
    /// Exactly what is held (and its units, when it was reserved in units).
    Hold,
    Units(Units),
    /// Credits; 0 commits nothing and releases everything.
    Amount(Credits),
}

/// The longest a reservation may live in one step (SPEC 7: 7 days).
pub const TTL_MAX_SECS: i64 = 7 * 24 * 3600;
/// The TTL when none is asked for (SPEC 7: 300 s).
pub const TTL_DEFAULT_SECS: i64 = 300;
