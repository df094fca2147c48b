//! One end user's live state, the transaction wrapper every operation runs in, and the
//! balance queries and invariants over it (SPEC 3.2, 3.4).

use std::collections::BTreeMap;

use crate::amount::{Credits, Overflow, Units};
use crate::block::{Block, Part, burn_order};
use crate::catalog::Catalog;
use crate::entry::{Entry, EntryType};
use crate::event::{Event, EventKind};
use crate::id::{EndUserId, EntryId, FeatureKey, IdSource, ReservationId, SubscriptionId};
use crate::refusal::Refusal;
use crate::reservation::Reservation;
use crate::subscription::{Subscription, SubscriptionStatus};
use crate::time::Timestamp;

/// What every operation needs from outside: the instant it runs at, the catalog, and
/// where new ids come from.
pub struct Cx<'a> {
    pub now: Timestamp,
    pub catalog: &'a Catalog,
    pub ids: &'a mut dyn IdSource,
}

impl std::fmt::Debug for Cx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cx")
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

/// The result of an operation that went through: its answer, and everything the caller
/// must persist in the same database transaction.
#[derive(Debug, Clone)]
pub struct Applied<T> {
    pub value: T,
    /// New ledger entries, in order.
    pub entries: Vec<Entry>,
    /// New events, in order.
    pub events: Vec<Event>,
    /// Reservations that left the live state (committed, released, expired).
    pub finished_reservations: Vec<Reservation>,
    /// Subscriptions that left the live state (canceled, expired).
    pub finished_subscriptions: Vec<Subscription>,
    /// Blocks that left the live state (spent, expired or voided), as they ended.
    pub finished_blocks: Vec<Block>,
    /// Leases that left the live state (kept long enough after they ended).
    pub finished_leases: Vec<crate::lease::Lease>,
}

impl<T> Applied<T> {
    /// An answer that changed nothing.
    pub fn unchanged(value: T) -> Applied<T> {
        Applied {
            value,
            entries: Vec::new(),
            events: Vec::new(),
            finished_reservations: Vec::new(),
            finished_subscriptions: Vec::new(),
            finished_blocks: Vec::new(),
            finished_leases: Vec::new(),
        }
    }

    /// The same changes with another answer.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Applied<U> {
        Applied {
            value: f(self.value),
            entries: self.entries,
            events: self.events,
            finished_reservations: self.finished_reservations,
            finished_subscriptions: self.finished_subscriptions,
            finished_blocks: self.finished_blocks,
            finished_leases: self.finished_leases,
        }
    }
}

/// Everything an operation wrote, collected as it runs.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    pub(crate) entries: Vec<Entry>,
    pub(crate) events: Vec<Event>,
    pub(crate) finished_reservations: Vec<Reservation>,
    pub(crate) finished_subscriptions: Vec<Subscription>,
    pub(crate) finished_blocks: Vec<Block>,
    pub(crate) finished_leases: Vec<crate::lease::Lease>,
}

/// Usage counted in one usage period, for tiered pricing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct UsageCounter {
    pub period_start: Timestamp,
    pub units: u64,
}

/// Lifetime totals across every block the end user ever had, live or gone, so that
/// `granted = burned + expired + voided + remaining` can be checked per end user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Totals {
    pub granted: Credits,
    pub burned: Credits,
    pub expired: Credits,
    pub voided: Credits,
}

/// The state the rules decide from for one end user: live blocks (usable, future, or
/// expired but still holding reserved credits), active reservations, debt per feature,
/// usage counters, and subscriptions that are not terminal. Spent, expired and voided
/// blocks leave it; their history stays in the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndUserState {
    pub(crate) end_user_id: EndUserId,
    pub(crate) blocks: Vec<Block>,
    pub(crate) reservations: Vec<Reservation>,
    pub(crate) debt: BTreeMap<FeatureKey, Credits>,
    pub(crate) counters: BTreeMap<FeatureKey, UsageCounter>,
    pub(crate) subscriptions: Vec<Subscription>,
    /// Active leases and ended ones kept for late reports.
    pub(crate) leases: Vec<crate::lease::Lease>,
    pub(crate) totals: Totals,
    /// Due work up to this instant has been done.
    pub(crate) advanced_to: Timestamp,
    /// Bumped by every operation that went through.
    pub(crate) version: u64,
}

/// The parts an [`EndUserState`] is stored as; [`EndUserState::from_parts`] checks them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct StateParts {
    pub end_user_id: EndUserId,
    pub blocks: Vec<Block>,
    pub reservations: Vec<Reservation>,
    pub debt: BTreeMap<FeatureKey, Credits>,
    pub counters: BTreeMap<FeatureKey, UsageCounter>,
    pub subscriptions: Vec<Subscription>,
    /// Absent in states stored before leases existed. (Always written: binary formats
    /// have no absent fields.)
    #[cfg_attr(feature = "serde", serde(default))]
    pub leases: Vec<crate::lease::Lease>,
    pub totals: Totals,
    pub advanced_to: Timestamp,
    pub version: u64,
}

/// A broken invariant: a bug or corrupted storage, never a business outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invariant violated for end user {end_user_id}: {message}")]
pub struct InvariantViolation {
    pub end_user_id: String,
    pub message: String,
}

/// The most due items a decision looks ahead through on a copy of the state before it
/// gives up (a year of 5-hour windows for a dozen templates fits easily).
pub const ADVANCE_STEPS_MAX: usize = 1_000_000;

/// The most due items one operation runs before it acts. An end user further behind is
/// refused with `Refusal::CatchingUp` and caught up in chunks of at most this many steps
/// by [`EndUserState::advance_bounded`] (the scheduler), so no single transaction runs an
/// unbounded catch-up.
pub const OPERATION_STEPS_MAX: usize = 2_000;

// === impl EndUserState ===

impl EndUserState {
    /// A new end user with nothing: no blocks, no debt, no subscriptions.
    pub fn new(end_user_id: EndUserId, now: Timestamp) -> EndUserState {
        EndUserState {
            end_user_id,
            blocks: Vec::new(),
            reservations: Vec::new(),
            debt: BTreeMap::new(),
            counters: BTreeMap::new(),
            subscriptions: Vec::new(),
            leases: Vec::new(),
            totals: Totals::default(),
            advanced_to: now,
            version: 0,
        }
    }

    /// Rebuilds a state from storage, checking every invariant.
    ///
    /// # Errors
    /// [`InvariantViolation`] when the parts are inconsistent.
    pub fn from_parts(parts: StateParts) -> Result<EndUserState, InvariantViolation> {
        let state = EndUserState {
            end_user_id: parts.end_user_id,
            blocks: parts.blocks,
            reservations: parts.reservations,
            debt: parts.debt,
            counters: parts.counters,
            subscriptions: parts.subscriptions,
            leases: parts.leases,
            totals: parts.totals,
            advanced_to: parts.advanced_to,
            version: parts.version,
        };
        state.check_invariants()?;
        Ok(state)
    }

    /// Drops spare capacity of the state's lists (a replica holding a million states keeps
    /// them as small as they can be).
    pub fn shrink_to_fit(&mut self) {
        self.blocks.shrink_to_fit();
        self.reservations.shrink_to_fit();
        self.subscriptions.shrink_to_fit();
        self.leases.shrink_to_fit();
    }

    pub fn into_parts(self) -> StateParts {
        StateParts {
            end_user_id: self.end_user_id,
            blocks: self.blocks,
            reservations: self.reservations,
            debt: self.debt,
            counters: self.counters,
            subscriptions: self.subscriptions,
            leases: self.leases,
            totals: self.totals,
            advanced_to: self.advanced_to,
            version: self.version,
        }
    }

    pub fn end_user_id(&self) -> &EndUserId {
        &self.end_user_id
    }

    /// Live blocks, in no particular order.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Active reservations.
    pub fn reservations(&self) -> &[Reservation] {
        &self.reservations
    }

    pub fn reservation(&self, id: ReservationId) -> Option<&Reservation> {
        self.reservations
            .iter()
            .find(|reservation| reservation.id == id)
    }

    /// Subscriptions that are not terminal.
    pub fn subscriptions(&self) -> &[Subscription] {
        &self.subscriptions
    }

    pub fn subscription(&self, id: SubscriptionId) -> Option<&Subscription> {
        self.subscriptions
            .iter()
            .find(|subscription| subscription.id == id)
    }

    /// Unsettled debt per feature.
    pub fn debts(&self) -> &BTreeMap<FeatureKey, Credits> {
        &self.debt
    }

    pub fn debt(&self, feature: &FeatureKey) -> Credits {
        self.debt.get(feature).copied().unwrap_or_default()
    }

    pub fn counters(&self) -> &BTreeMap<FeatureKey, UsageCounter> {
        &self.counters
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    pub fn advanced_to(&self) -> Timestamp {
        self.advanced_to
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Runs `operation` on a copy of the state, with due work done before and after it,
    /// debts settled, and invariants checked; the state changes only if everything went
    /// through. This is what makes every refusal "change nothing".
    pub(crate) fn transact<T>(
        &mut self,
        cx: &mut Cx<'_>,
        operation: impl FnOnce(&mut EndUserState, &mut Cx<'_>, &mut Journal) -> Result<T, Refusal>,
    ) -> Result<Applied<T>, Refusal> {
        let mut next = self.clone();
        let mut journal = Journal::default();
        let available_before = self.available(None, cx.now)?;
        next.advance_into(cx, &mut journal, OPERATION_STEPS_MAX)?;
        let value = operation(&mut next, cx, &mut journal)?;
        next.advance_into(cx, &mut journal, OPERATION_STEPS_MAX)?;
        next.settle_debts(cx, cx.now, &mut journal)?;
        journal.finished_blocks = next.drop_dead();
        next.balance_events(cx, available_before, &mut journal)?;
        next.version = next.version.saturating_add(1);
        next.check_invariants()
            .map_err(|violation| Refusal::Invariant(violation.to_string()))?;
        *self = next;
        Ok(Applied {
            value,
            entries: journal.entries,
            events: journal.events,
            finished_reservations: journal.finished_reservations,
            finished_subscriptions: journal.finished_subscriptions,
            finished_blocks: journal.finished_blocks,
            finished_leases: journal.finished_leases,
        })
    }

    /// `credits.low` and `credits.depleted` when this operation made available credits
    /// cross the threshold or reach zero.
    fn balance_events(
        &self,
        cx: &Cx<'_>,
        before: Credits,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let after = self.available(None, cx.now)?;
        if let Some(threshold) = cx.catalog.settings.low_balance_threshold
            && before >= threshold
            && after < threshold
        {
            journal.events.push(self.event(
                cx.now,
                EventKind::CreditsLow {
                    available: after,
                    threshold,
                },
            ));
        }
        if before.is_positive() && after.is_zero() {
            journal
                .events
                .push(self.event(cx.now, EventKind::CreditsDepleted));
        }
        Ok(())
    }

    pub(crate) fn event(&self, at: Timestamp, kind: EventKind) -> Event {
        Event {
            at,
            end_user_id: self.end_user_id.clone(),
            kind,
        }
    }

    /// Whether the subscription a block belongs to is paused (its plan credits are frozen
    /// while it is).
    fn is_frozen(&self, block: &Block) -> bool {
        block.subscription_id.is_some_and(|id| {
            self.subscriptions.iter().any(|subscription| {
                subscription.id == id && subscription.status == SubscriptionStatus::Paused
            })
        })
    }

    /// Usable at `t`: in its window, not voided, and not frozen by a paused subscription.
    pub fn is_usable(&self, block: &Block, t: Timestamp) -> bool {
        block.is_live_at(t) && !self.is_frozen(block)
    }

    /// Indices of the blocks usable at `t` within `scope`, in burn order.
    pub(crate) fn burn_sequence(&self, scope: Scope<'_>, t: Timestamp) -> Vec<usize> {
        let mut indices: Vec<usize> = (0..self.blocks.len())
            .filter(|&index| {
                let block = &self.blocks[index];
                self.is_usable(block, t) && scope.includes(block)
            })
            .collect();
        indices.sort_by(|&a, &b| burn_order(&self.blocks[a], &self.blocks[b]));
        indices
    }

    /// Available credits at `t` for `feature` (over every usable block when `None`):
    /// the sum of `remaining - held` over usable, applicable blocks.
    ///
    /// # Errors
    /// [`Overflow`] if the sum does not fit.
    pub fn available(
        &self,
        feature: Option<&FeatureKey>,
        t: Timestamp,
    ) -> Result<Credits, Overflow> {
        Credits::sum(
            self.blocks
                .iter()
                .filter(|block| {
                    self.is_usable(block, t)
                        && feature.is_none_or(|feature| block.applies_to(feature))
                })
                .map(Block::unheld),
        )
    }

    /// Credits held by active reservations on blocks that apply to `feature` (every block
    /// when `None`).
    ///
    /// # Errors
    /// [`Overflow`] if the sum does not fit.
    pub fn held(&self, feature: Option<&FeatureKey>) -> Result<Credits, Overflow> {
        Credits::sum(
            self.blocks
                .iter()
                .filter(|block| feature.is_none_or(|feature| block.applies_to(feature)))
                .map(|block| block.held),
        )
    }

    /// Total unsettled debt (for one feature, or over all).
    ///
    /// # Errors
    /// [`Overflow`] if the sum does not fit.
    pub fn total_debt(&self, feature: Option<&FeatureKey>) -> Result<Credits, Overflow> {
        match feature {
            Some(feature) => Ok(self.debt(feature)),
            None => Credits::sum(self.debt.values().copied()),
        }
    }

    /// Live blocks applicable to `feature` (all when `None`), in burn order as of `t`
    /// (usable ones first, then the rest by the same order).
    pub fn blocks_in_burn_order(&self, feature: Option<&FeatureKey>) -> Vec<&Block> {
        let mut blocks: Vec<&Block> = self
            .blocks
            .iter()
            .filter(|block| feature.is_none_or(|feature| block.applies_to(feature)))
            .collect();
        blocks.sort_by(|a, b| burn_order(a, b));
        blocks
    }

    /// Takes up to `amount` from the usable blocks in `scope` at `t` in burn order,
    /// burning it (`hold: false`) or holding it (`hold: true`). Returns the parts taken;
    /// they may sum to less than `amount`.
    pub(crate) fn take(
        &mut self,
        scope: Scope<'_>,
        amount: Credits,
        t: Timestamp,
        hold: bool,
    ) -> Result<Vec<Part>, Overflow> {
        let mut left = amount;
        let mut parts = Vec::new();
        for index in self.burn_sequence(scope, t) {
            if !left.is_positive() {
                break;
            }
            let block = &mut self.blocks[index];
            let take = block.unheld().min(left);
            if !take.is_positive() {
                continue;
            }
            if hold {
                block.held = block.held.checked_add(take)?;
            } else {
                block.burn(take)?;
                self.totals.burned = self.totals.burned.checked_add(take)?;
            }
            left = left.checked_sub(take)?;
            parts.push(Part {
                block_id: block.id,
                amount: take,
            });
        }
        Ok(parts)
    }

    pub(crate) fn block_mut(&mut self, id: crate::id::BlockId) -> Option<&mut Block> {
        self.blocks.iter_mut().find(|block| block.id == id)
    }

    /// Adds a new block (a grant, a positive adjustment, a rollover) and its entry.
    pub(crate) fn add_block(
        &mut self,
        cx: &mut Cx<'_>,
        block: Block,
        entry_type: EntryType,
        journal: &mut Journal,
    ) -> Result<EntryId, Refusal> {
        self.totals.granted = self.totals.granted.checked_add(block.amount)?;
        let at = block.created_at;
        let id = block.id;
        let amount = block.amount;
        let source = block.source;
        let subscription_id = block.subscription_id;
        self.blocks.push(block.clone());
        let entry = self.entry(
            cx,
            entry_type,
            at,
            EntryDraft {
                amount,
                parts: vec![Part {
                    block_id: id,
                    amount,
                }],
                subscription_id,
                block: Some(Box::new(block)),
                ..EntryDraft::default()
            },
        )?;
        let entry_id = entry.id;
        journal.entries.push(entry);
        journal.events.push(self.event(
            at,
            EventKind::CreditsGranted {
                block_id: id,
                amount,
                source,
            },
        ));
        Ok(entry_id)
    }

    /// Builds an entry with the balance after it.
    pub(crate) fn entry(
        &self,
        cx: &mut Cx<'_>,
        entry_type: EntryType,
        at: Timestamp,
        draft: EntryDraft,
    ) -> Result<Entry, Overflow> {
        let balance_after = self.available(draft.feature_key.as_ref(), at)?;
        Ok(Entry {
            id: EntryId::new(cx.ids),
            entry_type,
            end_user_id: self.end_user_id.clone(),
            feature_key: draft.feature_key,
            amount: draft.amount,
            parts: draft.parts,
            debt: draft.debt,
            units: draft.units,
            reservation_id: draft.reservation_id,
            lease_id: None,
            subscription_id: draft.subscription_id,
            block: draft.block,
            balance_after,
            created_at: at,
        })
    }

    /// Pays debt from usable blocks that settle debt, feature by feature (key order), in
    /// burn order. After it, no feature has debt while a usable block that applies to it
    /// and settles debt has unheld credits.
    pub(crate) fn settle_debts(
        &mut self,
        cx: &mut Cx<'_>,
        t: Timestamp,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let features: Vec<FeatureKey> = self
            .debt
            .iter()
            .filter(|(_, debt)| debt.is_positive())
            .map(|(feature, _)| feature.clone())
            .collect();
        for feature in features {
            let owed = self.debt(&feature);
            let mut left = owed;
            let mut parts = Vec::new();
            for index in self.burn_sequence(Scope::Feature(&feature), t) {
                if !left.is_positive() {
                    break;
                }
                let block = &mut self.blocks[index];
                if !block.settles_debt {
                    continue;
                }
                let take = block.unheld().min(left);
                if !take.is_positive() {
                    continue;
                }
                block.burn(take)?;
                self.totals.burned = self.totals.burned.checked_add(take)?;
                left = left.checked_sub(take)?;
                parts.push(Part {
                    block_id: block.id,
                    amount: take,
                });
            }
            if parts.is_empty() {
                continue;
            }
            let settled = owed.checked_sub(left)?;
            self.set_debt(&feature, left);
            let entry = self.entry(
                cx,
                EntryType::Settle,
                t,
                EntryDraft {
                    feature_key: Some(feature),
                    amount: settled,
                    parts,
                    ..EntryDraft::default()
                },
            )?;
            journal.entries.push(entry);
        }
        Ok(())
    }

    pub(crate) fn set_debt(&mut self, feature: &FeatureKey, amount: Credits) {
        if amount.is_positive() {
            self.debt.insert(feature.clone(), amount);
        } else {
            self.debt.remove(feature);
        }
    }

    /// Removes blocks with nothing left (their history is in the ledger) and returns them.
    pub(crate) fn drop_dead(&mut self) -> Vec<Block> {
        let (live, dead) = std::mem::take(&mut self.blocks)
            .into_iter()
            .partition(|block| block.remaining.is_positive());
        self.blocks = live;
        dead
    }

    /// Records `units` used of `feature` in the usage period starting at `period_start`,
    /// returning the units counted before them in that period.
    pub(crate) fn count_units(
        &mut self,
        feature: &FeatureKey,
        period_start: Timestamp,
        units: Units,
    ) -> Result<u64, Overflow> {
        let before = self.units_before(feature, period_start);
        let total = before.checked_add(units.get()).ok_or(Overflow)?;
        self.counters.insert(
            feature.clone(),
            UsageCounter {
                period_start,
                units: total,
            },
        );
        Ok(before)
    }

    /// The units of `feature` already counted in the usage period starting at
    /// `period_start`.
    pub(crate) fn units_before(&self, feature: &FeatureKey, period_start: Timestamp) -> u64 {
        self.counters
            .get(feature)
            .filter(|counter| counter.period_start == period_start)
            .map_or(0, |counter| counter.units)
    }

    /// What reservations and leases hold, per block, each checked against its own total
    /// and status.
    fn holds(&self) -> Result<BTreeMap<crate::id::BlockId, Credits>, String> {
        let mut held_by_reservations: BTreeMap<crate::id::BlockId, Credits> = BTreeMap::new();
        for reservation in &self.reservations {
            let mut total = Credits::ZERO;
            for part in &reservation.parts {
                let slot = held_by_reservations.entry(part.block_id).or_default();
                *slot = slot
                    .checked_add(part.amount)
                    .map_err(|_| "held overflows".to_owned())?;
                total = total
                    .checked_add(part.amount)
                    .map_err(|_| "held overflows".to_owned())?;
            }
            if total != reservation.amount {
                return Err(format!(
                    "reservation {} holds {total} in parts but says {}",
                    reservation.id, reservation.amount
                ));
            }
            if reservation.status != crate::reservation::ReservationStatus::Active {
                return Err(format!(
                    "reservation {} is live but not active",
                    reservation.id
                ));
            }
        }
        for lease in &self.leases {
            let mut total = Credits::ZERO;
            for part in &lease.parts {
                let slot = held_by_reservations.entry(part.block_id).or_default();
                *slot = slot
                    .checked_add(part.amount)
                    .map_err(|_| "held overflows".to_owned())?;
                total = total
                    .checked_add(part.amount)
                    .map_err(|_| "held overflows".to_owned())?;
            }
            if total != lease.held {
                return Err(format!(
                    "lease {} holds {total} in parts but says {}",
                    lease.id, lease.held
                ));
            }
            let active = lease.status == crate::lease::LeaseStatus::Active;
            if active == lease.ended_at.is_some() || (!active && lease.held.is_positive()) {
                return Err(format!(
                    "lease {} is {} but its end and hold disagree",
                    lease.id, lease.status
                ));
            }
        }
        Ok(held_by_reservations)
    }

    /// Checks SPEC 3.4 and the structural invariants: `0 <= held <= remaining <= amount`
    /// and `amount = burned + expired + voided + remaining` per block; lifetime totals
    /// balance per end user; every block's `held` equals what active reservations hold on
    /// it; debt is positive; at most one non-terminal base subscription.
    ///
    /// # Errors
    /// The first violation found.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let fail = |message: String| InvariantViolation {
            end_user_id: self.end_user_id.to_string(),
            message,
        };
        let mut held_by_reservations = self.holds().map_err(fail)?;
        let mut remaining_total = Credits::ZERO;
        for block in &self.blocks {
            check_block(block).map_err(fail)?;
            let held = held_by_reservations.remove(&block.id).unwrap_or_default();
            if held != block.held {
                return Err(fail(format!(
                    "block {} says held {} but reservations and leases hold {held}",
                    block.id, block.held
                )));
            }
            remaining_total = remaining_total
                .checked_add(block.remaining)
                .map_err(|_| fail("remaining overflows".into()))?;
        }
        if let Some((block_id, _)) = held_by_reservations.into_iter().next() {
            return Err(fail(format!(
                "a reservation holds credits on block {block_id}, which is not live"
            )));
        }
        let totals = self.totals;
        let outflow = Credits::sum([
            totals.burned,
            totals.expired,
            totals.voided,
            remaining_total,
        ])
        .map_err(|_| fail("totals overflow".into()))?;
        if outflow != totals.granted {
            return Err(fail(format!(
                "granted {} != burned {} + expired {} + voided {} + remaining {remaining_total}",
                totals.granted, totals.burned, totals.expired, totals.voided
            )));
        }
        if let Some((feature, debt)) = self.debt.iter().find(|(_, debt)| !debt.is_positive()) {
            return Err(fail(format!("debt for {feature} is {debt}, not positive")));
        }
        let bases = self
            .subscriptions
            .iter()
            .filter(|subscription| subscription.kind == crate::catalog::PlanKind::Base)
            .count();
        if bases > 1 {
            return Err(fail(format!("{bases} live base subscriptions")));
        }
        if let Some(subscription) = self
            .subscriptions
            .iter()
            .find(|subscription| subscription.status.is_terminal())
        {
            return Err(fail(format!(
                "terminal subscription {} is still live",
                subscription.id
            )));
        }
        Ok(())
    }
}

fn check_block(block: &Block) -> Result<(), String> {
    if block.held.is_negative() || block.held > block.remaining || block.remaining > block.amount {
        return Err(format!(
            "block {}: not 0 <= held {} <= remaining {} <= amount {}",
            block.id, block.held, block.remaining, block.amount
        ));
    }
    let outflow = Credits::sum([block.burned, block.expired, block.voided, block.remaining])
        .map_err(|_| format!("block {}: counters overflow", block.id))?;
    if outflow != block.amount {
        return Err(format!(
            "block {}: amount {} != burned {} + expired {} + voided {} + remaining {}",
            block.id, block.amount, block.burned, block.expired, block.voided, block.remaining
        ));
    }
    if block.burned.is_negative() || block.expired.is_negative() || block.voided.is_negative() {
        return Err(format!("block {}: a negative counter", block.id));
    }
    Ok(())
}

/// The variable fields of an entry, with defaults for the rest.
#[derive(Debug, Default)]
pub(crate) struct EntryDraft {
    pub(crate) feature_key: Option<FeatureKey>,
    pub(crate) amount: Credits,
    pub(crate) parts: Vec<Part>,
    pub(crate) debt: Credits,
    pub(crate) units: Option<Units>,
    pub(crate) reservation_id: Option<ReservationId>,
    pub(crate) subscription_id: Option<SubscriptionId>,
    pub(crate) block: Option<Box<Block>>,
}

/// Which blocks an operation may draw from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scope<'a> {
    /// Every block.
    All,
    /// Blocks that apply to this feature.
    Feature(&'a FeatureKey),
    /// Blocks that apply to any of these features.
    AnyOf(&'a [FeatureKey]),
}

impl Scope<'_> {
    pub(crate) fn includes(self, block: &Block) -> bool {
        match self {
            Scope::All => true,
            Scope::Feature(feature) => block.applies_to(feature),
            Scope::AnyOf(features) => features.iter().any(|feature| block.applies_to(feature)),
        }
    }
}
