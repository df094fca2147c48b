//! Grants, voids, adjustments and usage (SPEC 3, 6, 8).

use std::sync::Arc;

use crate::amount::{Credits, Units};
use crate::block::{Block, BlockSource};
use crate::catalog::{Catalog, Feature, FeatureType, PRIORITY_DEFAULT, PRIORITY_MAX};
use crate::entry::EntryType;
use crate::event::EventKind;
use crate::id::{BlockId, EntryId, FeatureKey};
use crate::pricing;
use crate::refusal::Refusal;
use crate::state::{Applied, Cx, EndUserState, EntryDraft, Journal, Scope};
use crate::time::Timestamp;

/// `POST /v1/credits/grants`: the terms of a new block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRequest {
    pub amount: Credits,
    pub priority: u16,
    /// Defaults to now.
    pub effective_at: Option<Timestamp>,
    pub expires_at: Option<Timestamp>,
    pub source: BlockSource,
    pub feature_keys: Option<Arc<[FeatureKey]>>,
    pub price_paid: Option<i64>,
    pub currency: Option<Arc<str>>,
    pub settles_debt: bool,
}

impl GrantRequest {
    /// A grant of `amount` with every default: priority 100, effective now, never
    /// expiring, a manual grant for every feature that settles debt.
    pub fn new(amount: Credits) -> GrantRequest {
        GrantRequest {
            amount,
            priority: PRIORITY_DEFAULT,
            effective_at: None,
            expires_at: None,
            source: BlockSource::Manual,
            feature_keys: None,
            price_paid: None,
            currency: None,
            settles_debt: true,
        }
    }
}

/// `POST /v1/credits/adjustments`: a signed manual correction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdjustRequest {
    pub amount: Credits,
    pub feature_keys: Option<Arc<[FeatureKey]>>,
}

/// `POST /v1/usage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRequest {
    pub feature_key: FeatureKey,
    pub units: Units,
    /// Refuse instead of recording debt when the end user may not do this.
    pub strict: bool,
}

/// What a recorded usage event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageOutcome {
    pub entry_id: EntryId,
    pub cost: Credits,
    /// The part of `cost` blocks paid for.
    pub covered: Credits,
    /// The part of `cost` that became debt.
    pub debt: Credits,
    /// Available credits for the feature afterwards.
    pub balance: Credits,
}

fn invalid(field: &'static str, message: impl Into<String>) -> Refusal {
    Refusal::Invalid {
        field,
        message: message.into(),
    }
}

/// Checks that every named feature exists and is metered.
pub(crate) fn check_feature_keys(
    catalog: &Catalog,
    keys: Option<&[FeatureKey]>,
) -> Result<(), Refusal> {
    let Some(keys) = keys else { return Ok(()) };
    if keys.is_empty() {
        return Err(invalid(
            "feature_keys",
            "must name at least one feature when present",
        ));
    }
    for key in keys {
        match catalog.feature(key) {
            None => {
                return Err(invalid(
                    "feature_keys",
                    format!("feature `{key}` does not exist"),
                ));
            }
            Some(feature) if feature.feature_type != FeatureType::Metered => {
                return Err(invalid(
                    "feature_keys",
                    format!("feature `{key}` is boolean and cannot hold credits"),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The metered feature `key`, or the refusal that says why not.
pub(crate) fn metered_feature<'c>(
    catalog: &'c Catalog,
    key: &FeatureKey,
) -> Result<&'c Feature, Refusal> {
    let feature = catalog
        .feature(key)
        .ok_or_else(|| Refusal::FeatureNotFound(key.clone()))?;
    if feature.feature_type != FeatureType::Metered {
        return Err(Refusal::FeatureNotMetered(key.clone()));
    }
    Ok(feature)
}

/// The most live blocks (with credits left, not expired or voided) one end user may hold
/// before a grant or a positive adjustment is refused: every check and debit walks them.
/// Blocks from subscriptions' grant templates are not refused (their templates are
/// bounded by the catalog, and they expire).
pub const BLOCKS_PER_END_USER_MAX: usize = 1_000;

// === impl EndUserState ===

impl EndUserState {
    /// `LimitReached` when the end user already holds the most live blocks allowed.
    fn check_block_room(&self) -> Result<(), Refusal> {
        if self.blocks.len() >= BLOCKS_PER_END_USER_MAX {
            return Err(Refusal::LimitReached {
                what: "live blocks per end user",
                limit: BLOCKS_PER_END_USER_MAX,
            });
        }
        Ok(())
    }

    /// Grants a block. It settles the end user's debt first (for the features it applies
    /// to) unless `settles_debt` is false.
    ///
    /// # Errors
    /// `Invalid` for a non-positive amount, a priority above 1000, an expiry not after
    /// the effective instant or not in the future, unknown or boolean feature keys, or a
    /// negative price.
    pub fn grant(
        &mut self,
        cx: &mut Cx<'_>,
        request: GrantRequest,
    ) -> Result<Applied<BlockId>, Refusal> {
        let now = cx.now;
        if !request.amount.is_positive() {
            return Err(invalid("amount", "must be positive"));
        }
        if request.priority > PRIORITY_MAX {
            return Err(invalid(
                "priority",
                format!("must be at most {PRIORITY_MAX}"),
            ));
        }
        let effective_at = request.effective_at.unwrap_or(now);
        if let Some(expires_at) = request.expires_at {
            if expires_at <= effective_at {
                return Err(invalid("expires_at", "must be after effective_at"));
            }
            if expires_at <= now {
                return Err(invalid("expires_at", "must be in the future"));
            }
        }
        if request.price_paid.is_some_and(|price| price < 0) {
            return Err(invalid("price_paid", "must not be negative"));
        }
        check_feature_keys(cx.catalog, request.feature_keys.as_deref())?;
        self.transact(cx, |state, cx, journal| {
            state.check_block_room()?;
            let block = new_block(cx, &request, now, request.source);
            let id = block.id;
            state.add_block(cx, block, EntryType::Grant, journal)?;
            Ok(id)
        })
    }

    /// Voids a block: its unheld remainder is forfeited now; credits held by active
    /// reservations stay held and are voided when those reservations release them.
    ///
    /// # Errors
    /// `BlockNotFound` when the block is not live (spent, expired or unknown);
    /// `BlockAlreadyVoided`; `Conflict` for a block that has already expired.
    pub fn void_block(
        &mut self,
        cx: &mut Cx<'_>,
        block_id: BlockId,
    ) -> Result<Applied<Credits>, Refusal> {
        self.transact(cx, |state, cx, journal| {
            state.void_now(cx, block_id, cx.now, journal)
        })
    }

    pub(crate) fn void_now(
        &mut self,
        cx: &mut Cx<'_>,
        block_id: BlockId,
        at: Timestamp,
        journal: &mut Journal,
    ) -> Result<Credits, Refusal> {
        let block = self
            .block_mut(block_id)
            .ok_or(Refusal::BlockNotFound(block_id))?;
        if block.voided_at.is_some() {
            return Err(Refusal::BlockAlreadyVoided(block_id));
        }
        if block.is_expired(at) {
            return Err(Refusal::Conflict(format!(
                "block {block_id} has already expired"
            )));
        }
        let amount = block.unheld();
        block.void(amount)?;
        block.voided_at = Some(at);
        self.totals.voided = self.totals.voided.checked_add(amount)?;
        let entry = self.entry(
            cx,
            EntryType::Void,
            at,
            EntryDraft {
                amount,
                parts: vec![crate::block::Part { block_id, amount }],
                ..EntryDraft::default()
            },
        )?;
        journal.entries.push(entry);
        journal
            .events
            .push(self.event(at, EventKind::CreditsVoided { block_id, amount }));
        Ok(amount)
    }

    /// A manual correction: a positive amount creates a block (manual, priority 100,
    /// never expiring); a negative one burns that many credits in burn order from the
    /// usable blocks (those applying to any of `feature_keys`, when given).
    ///
    /// # Errors
    /// `Invalid` for zero or bad feature keys; `InsufficientBalance` when a negative
    /// adjustment exceeds what is available.
    pub fn adjust(
        &mut self,
        cx: &mut Cx<'_>,
        request: AdjustRequest,
    ) -> Result<Applied<Option<BlockId>>, Refusal> {
        if request.amount.is_zero() {
            return Err(invalid("amount", "must not be zero"));
        }
        check_feature_keys(cx.catalog, request.feature_keys.as_deref())?;
        self.transact(cx, |state, cx, journal| {
            let now = cx.now;
            if request.amount.is_positive() {
                state.check_block_room()?;
                let mut grant = GrantRequest::new(request.amount);
                grant.feature_keys = request.feature_keys;
                let block = new_block(cx, &grant, now, BlockSource::Manual);
                let id = block.id;
                state.add_block(cx, block, EntryType::Adjust, journal)?;
                return Ok(Some(id));
            }
            let wanted = request.amount.checked_neg()?;
            let keys = request.feature_keys.clone();
            let scope = keys.as_deref().map_or(Scope::All, Scope::AnyOf);
            let available = state.available_in(scope, now)?;
            if available < wanted {
                return Err(Refusal::InsufficientBalance {
                    needed: wanted,
                    available,
                });
            }
            let parts = state.take(scope, wanted, now, false)?;
            let entry = state.entry(
                cx,
                EntryType::Adjust,
                now,
                EntryDraft {
                    amount: request.amount,
                    parts,
                    ..EntryDraft::default()
                },
            )?;
            journal.entries.push(entry);
            Ok(None)
        })
    }

    /// Records usage: prices it, burns the covered part in burn order and records the rest
    /// as debt. With `strict`, the whole entitlement decision must allow it first.
    ///
    /// # Errors
    /// `FeatureNotFound`, `FeatureNotMetered`; with `strict`, the decision's refusal
    /// (`InsufficientBalance`, `NotInPlan`, `SubscriptionPaused`, `SubscriptionPastDue`).
    pub fn record_usage(
        &mut self,
        cx: &mut Cx<'_>,
        request: UsageRequest,
    ) -> Result<Applied<UsageOutcome>, Refusal> {
        metered_feature(cx.catalog, &request.feature_key)?;
        self.transact(cx, |state, cx, journal| {
            let now = cx.now;
            if request.strict {
                state.require_allowed(cx.catalog, &request.feature_key, request.units, now)?;
            }
            state.open_first_use_windows(cx, &request.feature_key, now, journal)?;
            let cost =
                state.count_and_price(cx.catalog, &request.feature_key, request.units, now)?;
            let (entry_id, covered, debt) = state.charge(
                cx,
                &request.feature_key,
                cost,
                Some(request.units),
                None,
                journal,
            )?;
            let balance = state.available(Some(&request.feature_key), now)?;
            Ok(UsageOutcome {
                entry_id,
                cost,
                covered,
                debt,
                balance,
            })
        })
    }

    /// Prices `units` of `feature` at `now` and counts them in the usage period (and the
    /// base subscription's period tally).
    pub(crate) fn count_and_price(
        &mut self,
        catalog: &Catalog,
        feature_key: &FeatureKey,
        units: Units,
        now: Timestamp,
    ) -> Result<Credits, Refusal> {
        let feature = metered_feature(catalog, feature_key)?;
        let period_start = self.usage_period_start(now)?;
        let before = self.count_units(feature_key, period_start, units)?;
        let cost = pricing::cost(feature.pricing.as_ref(), units, before)?;
        self.tally_period_usage(feature_key, units, cost)?;
        Ok(cost)
    }

    /// Counts `units` already priced elsewhere at `cost` (a lease report: the holder
    /// priced its requests with this engine) toward the period's usage.
    pub(crate) fn count_reported(
        &mut self,
        catalog: &Catalog,
        feature_key: &FeatureKey,
        units: Units,
        cost: Credits,
        now: Timestamp,
    ) -> Result<(), Refusal> {
        metered_feature(catalog, feature_key)?;
        let period_start = self.usage_period_start(now)?;
        self.count_units(feature_key, period_start, units)?;
        self.tally_period_usage(feature_key, units, cost)?;
        Ok(())
    }

    /// What `units` of `feature` would cost at `now`, without counting them.
    pub(crate) fn quote(
        &self,
        catalog: &Catalog,
        feature_key: &FeatureKey,
        units: Units,
        now: Timestamp,
    ) -> Result<Credits, Refusal> {
        let feature = metered_feature(catalog, feature_key)?;
        let period_start = self.usage_period_start(now)?;
        let before = self.units_before(feature_key, period_start);
        Ok(pricing::cost(feature.pricing.as_ref(), units, before)?)
    }

    /// Burns `cost` from the usable blocks for `feature` now; what they cannot cover
    /// becomes debt. Writes one debit entry and returns it with the covered and debt parts.
    pub(crate) fn charge(
        &mut self,
        cx: &mut Cx<'_>,
        feature_key: &FeatureKey,
        cost: Credits,
        units: Option<Units>,
        reservation_id: Option<crate::id::ReservationId>,
        journal: &mut Journal,
    ) -> Result<(EntryId, Credits, Credits), Refusal> {
        let now = cx.now;
        let parts = self.take(Scope::Feature(feature_key), cost, now, false)?;
        let covered = Credits::sum(parts.iter().map(|part| part.amount))?;
        let debt = cost.checked_sub(covered)?;
        if debt.is_positive() {
            let total = self.debt(feature_key).checked_add(debt)?;
            self.set_debt(feature_key, total);
        }
        let entry = self.entry(
            cx,
            EntryType::Debit,
            now,
            EntryDraft {
                feature_key: Some(feature_key.clone()),
                amount: cost,
                parts,
                debt,
                units,
                reservation_id,
                ..EntryDraft::default()
            },
        )?;
        let entry_id = entry.id;
        journal.entries.push(entry);
        Ok((entry_id, covered, debt))
    }

    /// Available credits at `t` over the blocks in `scope`.
    pub(crate) fn available_in(&self, scope: Scope<'_>, t: Timestamp) -> Result<Credits, Refusal> {
        Ok(Credits::sum(
            self.blocks
                .iter()
                .filter(|block| self.is_usable(block, t) && scope.includes(block))
                .map(Block::unheld),
        )?)
    }
}

/// A block with the terms of `request`, created at `now`.
pub(crate) fn new_block(
    cx: &mut Cx<'_>,
    request: &GrantRequest,
    now: Timestamp,
    source: BlockSource,
) -> Block {
    Block {
        id: BlockId::new(cx.ids),
        amount: request.amount,
        remaining: request.amount,
        held: Credits::ZERO,
        priority: request.priority,
        effective_at: request.effective_at.unwrap_or(now),
        expires_at: request.expires_at,
        source,
        feature_keys: request.feature_keys.clone(),
        price_paid: request.price_paid,
        currency: request.currency.clone(),
        settles_debt: request.settles_debt,
        subscription_id: None,
        template: None,
        created_at: now,
        voided_at: None,
        burned: Credits::ZERO,
        expired: Credits::ZERO,
        voided: Credits::ZERO,
    }
}
