//! Credit blocks and the burn order (SPEC 3.1).

use std::cmp::Ordering;
use std::sync::Arc;

use crate::amount::{Credits, Overflow};
use crate::id::{BlockId, FeatureKey, SubscriptionId};
use crate::time::Timestamp;

/// Where a block's credits came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum BlockSource {
    Purchase,
    Promotion,
    Plan,
    Rollover,
    Manual,
}

/// Which recurring grant template issued a block: the subscription and the template's
/// position in its variant's `grants`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TemplateRef {
    pub subscription_id: SubscriptionId,
    pub template_index: u16,
}

/// One grant of credits. Blocks never merge; their terms never change after creation.
/// Only `remaining`, `held`, the three outflow counters and `voided_at` move.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Block {
    pub id: BlockId,
    pub amount: Credits,
    /// Credits not yet burned, expired or voided (held ones included).
    pub remaining: Credits,
    /// Credits held by active reservations: `0 <= held <= remaining`.
    pub held: Credits,
    /// 0 to 1000; lower burns first.
    pub priority: u16,
    pub effective_at: Timestamp,
    /// Exclusive: the block is unusable from this instant on. `None` never expires.
    pub expires_at: Option<Timestamp>,
    pub source: BlockSource,
    /// `None`: applies to every metered feature.
    pub feature_keys: Option<Arc<[FeatureKey]>>,
    /// What the end user paid, in the currency's minor unit; absent or 0 is free.
    pub price_paid: Option<i64>,
    pub currency: Option<Arc<str>>,
    /// Whether this block pays the end user's debt before it is spent on anything else.
    pub settles_debt: bool,
    pub subscription_id: Option<SubscriptionId>,
    pub template: Option<TemplateRef>,
    pub created_at: Timestamp,
    pub voided_at: Option<Timestamp>,
    /// Credits spent on usage, commits and debt settlement.
    pub burned: Credits,
    pub expired: Credits,
    pub voided: Credits,
}

// === impl Block ===

impl Block {
    /// Whether the block applies to `feature`.
    pub fn applies_to(&self, feature: &FeatureKey) -> bool {
        self.feature_keys
            .as_ref()
            .is_none_or(|keys| keys.contains(feature))
    }

    /// Whether `t` lies in `[effective_at, expires_at)`.
    pub fn in_window(&self, t: Timestamp) -> bool {
        self.effective_at <= t && self.expires_at.is_none_or(|expires_at| t < expires_at)
    }

    /// Whether the block has expired by `t` (`expires_at <= t`).
    pub fn is_expired(&self, t: Timestamp) -> bool {
        self.expires_at.is_some_and(|expires_at| expires_at <= t)
    }

    /// Usable at `t`: in its window and not voided. (Whether its subscription is paused is
    /// the end user's business: see `EndUserState::is_usable`.)
    pub fn is_live_at(&self, t: Timestamp) -> bool {
        self.voided_at.is_none() && self.in_window(t)
    }

    /// `remaining - held`: what a debit or a hold may take.
    pub fn unheld(&self) -> Credits {
        self.remaining.saturating_sub_floor(self.held)
    }

    pub fn is_paid(&self) -> bool {
        self.price_paid.is_some_and(|price| price > 0)
    }

    /// Takes `amount` out of the block as burned credits (usage, commit, settle).
    pub(crate) fn burn(&mut self, amount: Credits) -> Result<(), Overflow> {
        self.remaining = self.remaining.checked_sub(amount)?;
        self.burned = self.burned.checked_add(amount)?;
        Ok(())
    }

    pub(crate) fn expire(&mut self, amount: Credits) -> Result<(), Overflow> {
        self.remaining = self.remaining.checked_sub(amount)?;
        self.expired = self.expired.checked_add(amount)?;
        Ok(())
    }

    pub(crate) fn void(&mut self, amount: Credits) -> Result<(), Overflow> {
        self.remaining = self.remaining.checked_sub(amount)?;
        self.voided = self.voided.checked_add(amount)?;
        Ok(())
    }
}

/// The burn order of SPEC 3.1: priority ascending; `expires_at` ascending with blocks that
/// never expire last; free before paid; `created_at` ascending; id ascending.
pub fn burn_order(a: &Block, b: &Block) -> Ordering {
    a.priority
        .cmp(&b.priority)
        .then_with(|| match (a.expires_at, b.expires_at) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        })
        .then_with(|| a.is_paid().cmp(&b.is_paid()))
        .then_with(|| a.created_at.cmp(&b.created_at))
        .then_with(|| a.id.cmp(&b.id))
}

/// How much of a debit, hold, expiry or void fell on one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Part {
    pub block_id: BlockId,
    pub amount: Credits,
}
