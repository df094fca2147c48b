//! Ledger entries: the immutable record of every change (SPEC 3.4).

use crate::amount::{Credits, Units};
use crate::block::{Block, Part};
use crate::id::{EndUserId, EntryId, FeatureKey, LeaseId, ReservationId, SubscriptionId};
use crate::time::Timestamp;

/// What an entry records. Each type's effect on blocks is fixed, so that replaying an end
/// user's entries from zero reproduces their blocks exactly:
///
/// | type | effect of each part | other effect |
/// |---|---|---|
/// | `Grant` | — | creates `block` |
/// | `Debit` | burns | adds `debt` to the feature's debt |
/// | `Hold` | holds | — |
/// | `Commit` | releases the hold on it and burns it | — |
/// | `Release` | releases the hold | — |
/// | `Expire` | with a reservation or a lease: releases the hold; without: expires | — |
/// | `Void` | voids | marks the block voided |
/// | `Adjust` | negative: burns | positive: creates `block` |
/// | `Settle` | burns | subtracts `amount` from the feature's debt |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum EntryType {
    Grant,
    Debit,
    Hold,
    Commit,
    Release,
    Expire,
    Void,
    Adjust,
    Settle,
}

impl EntryType {
    /// The wire name (`grant`, `debit`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            EntryType::Grant => "grant",
            EntryType::Debit => "debit",
            EntryType::Hold => "hold",
            EntryType::Commit => "commit",
            EntryType::Release => "release",
            EntryType::Expire => "expire",
            EntryType::Void => "void",
            EntryType::Adjust => "adjust",
            EntryType::Settle => "settle",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Entry {
    pub id: EntryId,
    pub entry_type: EntryType,
    pub end_user_id: EndUserId,
    pub feature_key: Option<FeatureKey>,
    /// The entry's total: credits granted, charged, held, released, expired, voided or
    /// settled. Negative only for a negative adjustment.
    pub amount: Credits,
    /// Per-block parts. For a debit or commit they sum to the covered amount.
    pub parts: Vec<Part>,
    /// The part of a debit that no block covered and became debt.
    pub debt: Credits,
    pub units: Option<Units>,
    pub reservation_id: Option<ReservationId>,
    /// The lease a hold, commit, release, expiry or debit belongs to.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub lease_id: Option<LeaseId>,
    pub subscription_id: Option<SubscriptionId>,
    /// The block a grant or positive adjustment created, as it was created.
    pub block: Option<Box<Block>>,
    /// Available credits afterwards: for the entry's feature when it has one, else over
    /// every usable block.
    pub balance_after: Credits,
    pub created_at: Timestamp,
}
