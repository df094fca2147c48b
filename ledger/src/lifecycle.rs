//! The subscription state machine (SPEC 10.2): create, renew, pause, resume, cancel,
//! change, and the period ends, grace ends and notices that time brings.

use std::collections::BTreeMap;

use crate::amount::Credits;
use crate::catalog::{BillingMode, Catalog, PlanKind, Variant};
use crate::event::{EventKind, PeriodUsage, SubscriptionChange};
use crate::id::{EndUserId, FeatureKey, SubscriptionId, VariantId};
use crate::recurring::variant_of;
use crate::refusal::Refusal;
use crate::state::{Applied, Cx, EndUserState, Journal};
use crate::subscription::{PendingChange, PeriodTally, Subscription, SubscriptionStatus};
use crate::time::{Span, Timestamp};

/// How long before a trial ends `subscription.trial_ending` is emitted.
pub const TRIAL_ENDING_NOTICE_DAYS: i64 = 3;

/// `POST /v1/subscriptions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeRequest {
    pub plan_variant_id: VariantId,
    /// Overrides the variant's `trial_days`.
    pub trial_days: Option<u32>,
    /// Defaults to now; may be in the past (due work then catches up), not the future.
    pub start_at: Option<Timestamp>,
}

/// When a cancellation takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CancelAt {
    #[default]
    PeriodEnd,
    Immediate,
}

/// When a plan change takes effect. Upgrades default to now, downgrades to period end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeAt {
    Immediate,
    PeriodEnd,
}

fn transition(from: SubscriptionStatus, operation: &'static str) -> Refusal {
    Refusal::InvalidTransition { from, operation }
}

/// Whether a variant needs `/renew` before each period: prepaid with a positive price.
/// A free variant (no price, or 0) renews by itself.
fn needs_payment(variant: &Variant) -> bool {
    variant.billing_mode == BillingMode::Prepaid
        && variant.price.as_ref().is_some_and(|price| price.amount > 0)
}

/// Whether moving from `old` to `new` is an upgrade: the new yearly-normalised price is
/// at least the old one.
pub fn is_upgrade(old: &Variant, new: &Variant) -> bool {
    let (old_numerator, old_denominator) = old.yearly_price();
    let (new_numerator, new_denominator) = new.yearly_price();
    new_numerator.saturating_mul(old_denominator) >= old_numerator.saturating_mul(new_denominator)
}

// === impl Subscription ===

impl Subscription {
    /// The end of the last prepaid period paid for (SPEC's `paid_through`).
    pub fn paid_through(&self, variant: &Variant) -> Option<Timestamp> {
        if self.paid_period_index < 0 {
            return None;
        }
        let next = self.paid_period_index.checked_add(1)?;
        variant.interval.nth_after(self.period_anchor, next).ok()
    }

    /// Numbers periods from `anchor` and makes period `index` the current one.
    fn set_period(
        &mut self,
        variant: &Variant,
        anchor: Timestamp,
        index: i64,
    ) -> Result<(), Refusal> {
        self.period_anchor = anchor;
        self.period_index = index;
        self.current_period_start = variant.interval.nth_after(anchor, index)?;
        self.current_period_end = variant
            .interval
            .nth_after(anchor, index.checked_add(1).ok_or(Refusal::Overflow)?)?;
        self.renewal_due_notified = false;
        Ok(())
    }
}

// === impl EndUserState ===

impl EndUserState {
    /// Subscribes the end user to a plan variant. A base subscription replaces a free-plan
    /// fallback subscription; otherwise an end user has at most one live base subscription.
    ///
    /// # Errors
    /// `VariantNotFound`; `Invalid` for a future `start_at`; `Conflict` when a base
    /// subscription already exists.
    pub fn subscribe(
        &mut self,
        cx: &mut Cx<'_>,
        request: SubscribeRequest,
    ) -> Result<Applied<Subscription>, Refusal> {
        let variant = cx
            .catalog
            .variant(request.plan_variant_id)
            .ok_or(Refusal::VariantNotFound(request.plan_variant_id))?;
        let plan = cx
            .catalog
            .plan(variant.plan_id)
            .ok_or(Refusal::VariantNotFound(request.plan_variant_id))?;
        let start = request.start_at.unwrap_or(cx.now);
        if start > cx.now {
            return Err(Refusal::Invalid {
                field: "start_at",
                message: "must not be in the future".into(),
            });
        }
        // A past start aligns a migrated subscriber's current period; it reaches back at
        // most one period, so the catch-up it runs in this transaction stays small.
        if variant.interval.after(start)? < cx.now {
            return Err(Refusal::Invalid {
                field: "start_at",
                message: format!(
                    "may be at most one period ({} {}) in the past: start a migrated subscriber at the beginning of their current period",
                    variant.interval.every,
                    format!("{:?}", variant.interval.unit).to_lowercase()
                ),
            });
        }
        let kind = plan.kind;
        let catching_up = |refusal: Refusal| match refusal {
            Refusal::CatchingUp { steps_max, .. } if request.start_at.is_some() => {
                Refusal::Invalid {
                    field: "start_at",
                    message: format!(
                        "reaches back over more than {steps_max} pieces of due work (windows, expiries); start later"
                    ),
                }
            }
            other => other,
        };
        self.transact(cx, |state, cx, journal| {
            if kind == PlanKind::Base
                && let Some(existing) = state.base_subscription()
            {
                if Some(existing.plan_variant_id) != cx.catalog.settings.free_plan_variant_id {
                    return Err(Refusal::Conflict(format!(
                        "end user already has base subscription {}",
                        existing.id
                    )));
                }
                let id = existing.id;
                state.end_subscription(
                    cx,
                    id,
                    SubscriptionStatus::Canceled,
                    cx.now,
                    false,
                    journal,
                )?;
            }
            let trial_days = request.trial_days.unwrap_or(variant.trial_days);
            let id = state.create_subscription(
                cx,
                request.plan_variant_id,
                start,
                trial_days,
                journal,
            )?;
            Ok(state.subscriptions[state.subscription_index(id)?].clone())
        })
        .map_err(catching_up)
    }

    /// Creates a subscription starting at `start` and issues its first grants.
    fn create_subscription(
        &mut self,
        cx: &mut Cx<'_>,
        variant_id: VariantId,
        start: Timestamp,
        trial_days: u32,
        journal: &mut Journal,
    ) -> Result<SubscriptionId, Refusal> {
        let variant = cx
            .catalog
            .variant(variant_id)
            .ok_or(Refusal::VariantNotFound(variant_id))?;
        let plan = cx
            .catalog
            .plan(variant.plan_id)
            .ok_or(Refusal::VariantNotFound(variant_id))?;
        let mut subscription =
            new_subscription(cx, self.end_user_id.clone(), variant, plan.kind, start);
        if trial_days > 0 {
            let trial_end = start.checked_add(Span::from_days(i64::from(trial_days))?)?;
            subscription.status = SubscriptionStatus::Trialing;
            subscription.trial_end = Some(trial_end);
            subscription.period_anchor = trial_end;
            subscription.period_index = -1;
            subscription.current_period_start = start;
            subscription.current_period_end = trial_end;
            subscription.paid_period_index = -1;
        } else {
            subscription.set_period(variant, start, 0)?;
        }
        let id = subscription.id;
        let status = subscription.status;
        self.subscriptions.push(subscription);
        journal.events.push(self.event(
            start,
            subscription_event(id, status, SubscriptionChange::Created),
        ));
        self.start_period_grants(cx, id, start, true, journal)?;
        Ok(id)
    }

    /// Records payment for `periods` coming periods of a prepaid subscription. From
    /// `past_due` it is active again at once: the next period starts where the unpaid one
    /// ended, and its grants are issued now.
    ///
    /// # Errors
    /// `SubscriptionNotFound`; `InvalidTransition` unless `active`, `trialing` or
    /// `past_due`; `Invalid` for zero periods; `Conflict` for a variant that needs no
    /// payment (postpaid or free).
    pub fn renew(
        &mut self,
        cx: &mut Cx<'_>,
        id: SubscriptionId,
        periods: u32,
    ) -> Result<Applied<Subscription>, Refusal> {
        if periods == 0 {
            return Err(Refusal::Invalid {
                field: "periods",
                message: "must be at least 1".into(),
            });
        }
        self.transact(cx, |state, cx, journal| {
            let position = state.subscription_index(id)?;
            let subscription = &state.subscriptions[position];
            let variant = variant_of(cx.catalog, subscription)?;
            if !matches!(
                subscription.status,
                SubscriptionStatus::Active
                    | SubscriptionStatus::Trialing
                    | SubscriptionStatus::PastDue
            ) {
                return Err(transition(subscription.status, "renew"));
            }
            if !needs_payment(variant) {
                return Err(Refusal::Conflict(
                    "this variant renews by itself: it is postpaid or free".into(),
                ));
            }
            let paid = subscription
                .paid_period_index
                .max(subscription.period_index)
                .checked_add(i64::from(periods))
                .ok_or(Refusal::Overflow)?;
            let was_past_due = subscription.status == SubscriptionStatus::PastDue;
            state.subscriptions[position].paid_period_index = paid;
            if was_past_due {
                state.begin_next_period(cx, id, cx.now, true, journal)?;
            }
            Ok(state.subscriptions[state.subscription_index(id)?].clone())
        })
    }

    /// Pauses a subscription: its recurring grants stop, its plan's features deny with
    /// `subscription_paused`, and its plan credits are frozen; other credits stay usable.
    ///
    /// # Errors
    /// `SubscriptionNotFound`; `InvalidTransition` unless `trialing`, `active` or
    /// `past_due`.
    pub fn pause(
        &mut self,
        cx: &mut Cx<'_>,
        id: SubscriptionId,
    ) -> Result<Applied<Subscription>, Refusal> {
        self.transact(cx, |state, cx, journal| {
            let position = state.subscription_index(id)?;
            let subscription = &mut state.subscriptions[position];
            if !matches!(
                subscription.status,
                SubscriptionStatus::Trialing
                    | SubscriptionStatus::Active
                    | SubscriptionStatus::PastDue
            ) {
                return Err(transition(subscription.status, "pause"));
            }
            subscription.status = SubscriptionStatus::Paused;
            subscription.paused_at = Some(cx.now);
            let paused = subscription.clone();
            journal.events.push(state.event(
                cx.now,
                subscription_event(id, SubscriptionStatus::Paused, SubscriptionChange::Paused),
            ));
            Ok(paused)
        })
    }

    /// Resumes a paused subscription: `active`, with a new period starting now (treated
    /// as paid) and its grants issued.
    ///
    /// # Errors
    /// `SubscriptionNotFound`; `InvalidTransition` unless `paused`.
    pub fn resume(
        &mut self,
        cx: &mut Cx<'_>,
        id: SubscriptionId,
    ) -> Result<Applied<Subscription>, Refusal> {
        self.transact(cx, |state, cx, journal| {
            let position = state.subscription_index(id)?;
            let variant = variant_of(cx.catalog, &state.subscriptions[position])?;
            let subscription = &mut state.subscriptions[position];
            if subscription.status != SubscriptionStatus::Paused {
                return Err(transition(subscription.status, "resume"));
            }
            subscription.status = SubscriptionStatus::Active;
            subscription.paused_at = None;
            subscription.trial_end = None;
            subscription.set_period(variant, cx.now, 0)?;
            subscription.paid_period_index = 0;
            subscription.period_usage.clear();
            journal.events.push(state.event(
                cx.now,
                subscription_event(id, SubscriptionStatus::Active, SubscriptionChange::Resumed),
            ));
            state.start_period_grants(cx, id, cx.now, true, journal)?;
            Ok(state.subscriptions[state.subscription_index(id)?].clone())
        })
    }

    /// Cancels a subscription at period end (the default) or now. A subscription with no
    /// running period (`past_due`, `paused`) is canceled now either way. An immediate
    /// cancel voids the subscription's plan blocks unless `revoke_credits` is false.
    /// A base subscription that ends falls back to the free plan, if one is set.
    ///
    /// # Errors
    /// `SubscriptionNotFound` (terminal subscriptions are not live).
    pub fn cancel(
        &mut self,
        cx: &mut Cx<'_>,
        id: SubscriptionId,
        at: CancelAt,
        revoke_credits: bool,
    ) -> Result<Applied<Subscription>, Refusal> {
        self.transact(cx, |state, cx, journal| {
            let position = state.subscription_index(id)?;
            let subscription = &mut state.subscriptions[position];
            let running = matches!(
                subscription.status,
                SubscriptionStatus::Active | SubscriptionStatus::Trialing
            );
            if at == CancelAt::PeriodEnd && running {
                subscription.cancel_at_period_end = true;
                subscription.pending_change = None;
                return Ok(subscription.clone());
            }
            state.end_subscription(
                cx,
                id,
                SubscriptionStatus::Canceled,
                cx.now,
                revoke_credits,
                journal,
            )
        })
    }

    /// Changes a subscription's variant. An upgrade (new yearly-normalised price >= old)
    /// applies now by default: a new period starts, the old plan blocks are voided and the
    /// new grants issued. A downgrade applies at period end by default. A later change
    /// replaces a pending one.
    ///
    /// # Errors
    /// `SubscriptionNotFound`, `VariantNotFound`; `InvalidTransition` unless `active` or
    /// `trialing`; `Invalid` for a variant of another plan kind or the current variant.
    pub fn change(
        &mut self,
        cx: &mut Cx<'_>,
        id: SubscriptionId,
        variant_id: VariantId,
        at: Option<ChangeAt>,
    ) -> Result<Applied<Subscription>, Refusal> {
        self.transact(cx, |state, cx, journal| {
            let position = state.subscription_index(id)?;
            let subscription = &state.subscriptions[position];
            if !matches!(
                subscription.status,
                SubscriptionStatus::Active | SubscriptionStatus::Trialing
            ) {
                return Err(transition(subscription.status, "change"));
            }
            let old = variant_of(cx.catalog, subscription)?;
            let new = cx
                .catalog
                .variant(variant_id)
                .ok_or(Refusal::VariantNotFound(variant_id))?;
            let new_plan = cx
                .catalog
                .plan(new.plan_id)
                .ok_or(Refusal::VariantNotFound(variant_id))?;
            if new_plan.kind != subscription.kind {
                return Err(Refusal::Invalid {
                    field: "plan_variant_id",
                    message: "must be a variant of a plan of the same kind (base or addon)".into(),
                });
            }
            if variant_id == subscription.plan_variant_id {
                return Err(Refusal::Invalid {
                    field: "plan_variant_id",
                    message: "is the subscription's current variant".into(),
                });
            }
            let when = at.unwrap_or(if is_upgrade(old, new) {
                ChangeAt::Immediate
            } else {
                ChangeAt::PeriodEnd
            });
            match when {
                ChangeAt::Immediate => {
                    state.switch_variant(cx, id, variant_id, cx.now, journal)?;
                    let position = state.subscription_index(id)?;
                    let subscription = &mut state.subscriptions[position];
                    subscription.status = SubscriptionStatus::Active;
                    subscription.trial_end = None;
                    subscription.set_period(new, cx.now, 0)?;
                    subscription.paid_period_index = 0;
                    state.start_period_grants(cx, id, cx.now, true, journal)?;
                }
                ChangeAt::PeriodEnd => {
                    let subscription = &mut state.subscriptions[position];
                    subscription.pending_change = Some(PendingChange {
                        plan_variant_id: variant_id,
                        effective_at: subscription.current_period_end,
                    });
                    subscription.cancel_at_period_end = false;
                }
            }
            Ok(state.subscriptions[state.subscription_index(id)?].clone())
        })
    }

    /// Puts a subscription on another variant: voids the old plan's blocks and emits
    /// `subscription.changed`. The caller sets the new period.
    fn switch_variant(
        &mut self,
        cx: &mut Cx<'_>,
        id: SubscriptionId,
        variant_id: VariantId,
        at: Timestamp,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let variant = cx
            .catalog
            .variant(variant_id)
            .ok_or(Refusal::VariantNotFound(variant_id))?;
        self.void_subscription_blocks(cx, id, at, journal)?;
        let position = self.subscription_index(id)?;
        let subscription = &mut self.subscriptions[position];
        let from = subscription.plan_variant_id;
        subscription.plan_variant_id = variant_id;
        subscription.plan_id = variant.plan_id;
        subscription.pending_change = None;
        subscription.period_usage.clear();
        let status = subscription.status;
        journal.events.push(self.event(
            at,
            subscription_event(
                id,
                status,
                SubscriptionChange::Changed {
                    from_variant_id: from,
                    to_variant_id: variant_id,
                },
            ),
        ));
        Ok(())
    }

    /// A running subscription's period (or trial) ended at `at`: cancel if asked, apply a
    /// pending change, then renew, or go `past_due` when a prepaid period is unpaid.
    pub(crate) fn end_period(
        &mut self,
        cx: &mut Cx<'_>,
        id: SubscriptionId,
        at: Timestamp,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let position = self.subscription_index(id)?;
        let subscription = &self.subscriptions[position];
        if subscription.cancel_at_period_end {
            self.end_subscription(cx, id, SubscriptionStatus::Canceled, at, false, journal)?;
            return Ok(());
        }
        if let Some(pending) = subscription.pending_change {
            let paid_next = subscription.paid_period_index > subscription.period_index;
            self.switch_variant(cx, id, pending.plan_variant_id, at, journal)?;
            let position = self.subscription_index(id)?;
            let subscription = &mut self.subscriptions[position];
            subscription.period_anchor = at;
            subscription.period_index = -1;
            subscription.paid_period_index = if paid_next { 0 } else { -1 };
        }
        let position = self.subscription_index(id)?;
        let subscription = &self.subscriptions[position];
        let variant = variant_of(cx.catalog, subscription)?;
        let next = subscription
            .period_index
            .checked_add(1)
            .ok_or(Refusal::Overflow)?;
        if needs_payment(variant) && subscription.paid_period_index < next {
            let subscription = &mut self.subscriptions[position];
            subscription.status = SubscriptionStatus::PastDue;
            journal.events.push(self.event(
                at,
                subscription_event(id, SubscriptionStatus::PastDue, SubscriptionChange::PastDue),
            ));
            return Ok(());
        }
        self.begin_next_period(cx, id, at, false, journal)
    }

    /// Starts the period after the current one, `active`, with `subscription.renewed`
    /// carrying the ended period's usage, and issues its grants at `grants_at`.
    fn begin_next_period(
        &mut self,
        cx: &mut Cx<'_>,
        id: SubscriptionId,
        grants_at: Timestamp,
        restart_windows: bool,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let position = self.subscription_index(id)?;
        let variant = variant_of(cx.catalog, &self.subscriptions[position])?;
        let subscription = &mut self.subscriptions[position];
        let next = subscription
            .period_index
            .checked_add(1)
            .ok_or(Refusal::Overflow)?;
        let anchor = subscription.period_anchor;
        subscription.set_period(variant, anchor, next)?;
        subscription.status = SubscriptionStatus::Active;
        let usage = std::mem::take(&mut subscription.period_usage)
            .into_iter()
            .map(|(feature_key, tally)| PeriodUsage {
                feature_key,
                units: tally.units,
                cost: tally.cost,
            })
            .collect();
        let change = SubscriptionChange::Renewed {
            period_start: subscription.current_period_start,
            period_end: subscription.current_period_end,
            usage,
        };
        let event_at = subscription.current_period_start.max(grants_at.min(cx.now));
        journal.events.push(self.event(
            event_at,
            subscription_event(id, SubscriptionStatus::Active, change),
        ));
        self.start_period_grants(cx, id, grants_at, restart_windows, journal)
    }

    /// Ends a subscription (`canceled` or `expired`) at `at`: it leaves the live state,
    /// optionally voiding its plan blocks; a base subscription falls back to the free plan.
    fn end_subscription(
        &mut self,
        cx: &mut Cx<'_>,
        id: SubscriptionId,
        status: SubscriptionStatus,
        at: Timestamp,
        revoke_credits: bool,
        journal: &mut Journal,
    ) -> Result<Subscription, Refusal> {
        if revoke_credits {
            self.void_subscription_blocks(cx, id, at, journal)?;
        }
        let position = self.subscription_index(id)?;
        let mut subscription = self.subscriptions.remove(position);
        subscription.status = status;
        subscription.ended_at = Some(at);
        subscription.schedules.clear();
        subscription.pending_change = None;
        let change = if status == SubscriptionStatus::Expired {
            SubscriptionChange::Expired
        } else {
            SubscriptionChange::Canceled
        };
        journal
            .events
            .push(self.event(at, subscription_event(id, status, change)));
        journal.finished_subscriptions.push(subscription.clone());
        if subscription.kind == PlanKind::Base
            && let Some(free) = cx.catalog.settings.free_plan_variant_id
            && free != subscription.plan_variant_id
            && cx.catalog.free_plan().is_some()
            && self.base_subscription().is_none()
        {
            self.create_subscription(cx, free, at, 0, journal)?;
        }
        Ok(subscription)
    }

    /// Grace ran out on a `past_due` subscription: it expires.
    pub(crate) fn end_grace(
        &mut self,
        cx: &mut Cx<'_>,
        id: SubscriptionId,
        at: Timestamp,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        self.end_subscription(cx, id, SubscriptionStatus::Expired, at, false, journal)?;
        Ok(())
    }

    /// `subscription.renewal_due` or `subscription.trial_ending`, once per period.
    pub(crate) fn notify(
        &mut self,
        id: SubscriptionId,
        at: Timestamp,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let position = self.subscription_index(id)?;
        let subscription = &mut self.subscriptions[position];
        let (status, change) = if subscription.status == SubscriptionStatus::Trialing {
            subscription.trial_ending_notified = true;
            (
                subscription.status,
                SubscriptionChange::TrialEnding {
                    trial_end: subscription.current_period_end,
                },
            )
        } else {
            subscription.renewal_due_notified = true;
            (
                subscription.status,
                SubscriptionChange::RenewalDue {
                    period_end: subscription.current_period_end,
                },
            )
        };
        journal
            .events
            .push(self.event(at, subscription_event(id, status, change)));
        Ok(())
    }

    /// When the next notice of a subscription is due, if one is.
    pub(crate) fn notice_due(
        catalog: &Catalog,
        subscription: &Subscription,
    ) -> Result<Option<Timestamp>, Refusal> {
        let variant = variant_of(catalog, subscription)?;
        let (days, already) = match subscription.status {
            SubscriptionStatus::Trialing => {
                (TRIAL_ENDING_NOTICE_DAYS, subscription.trial_ending_notified)
            }
            SubscriptionStatus::Active
                if needs_payment(variant) && !subscription.cancel_at_period_end =>
            {
                let paid_next = subscription.paid_period_index > subscription.period_index;
                (
                    i64::from(variant.renewal_due_days),
                    subscription.renewal_due_notified || paid_next,
                )
            }
            _ => return Ok(None),
        };
        if already || days == 0 {
            return Ok(None);
        }
        let at = subscription
            .current_period_end
            .checked_sub(Span::from_days(days)?)?;
        Ok(Some(at.max(subscription.current_period_start)))
    }

    /// When a `past_due` subscription's grace ends.
    pub(crate) fn grace_end(
        catalog: &Catalog,
        subscription: &Subscription,
    ) -> Result<Timestamp, Refusal> {
        let variant = variant_of(catalog, subscription)?;
        Ok(subscription
            .current_period_end
            .checked_add(Span::from_days(i64::from(variant.grace_days))?)?)
    }

    /// The start of the usage period tiers count in: the base subscription's period, else
    /// the calendar month (UTC).
    pub(crate) fn usage_period_start(&self, now: Timestamp) -> Result<Timestamp, Refusal> {
        match self.base_subscription() {
            Some(subscription) => Ok(subscription.current_period_start),
            None => Ok(now.start_of_month()?),
        }
    }

    /// Adds usage to the base subscription's period tally (reported at renewal).
    pub(crate) fn tally_period_usage(
        &mut self,
        feature: &FeatureKey,
        units: crate::amount::Units,
        cost: Credits,
    ) -> Result<(), Refusal> {
        let Some(subscription) = self
            .subscriptions
            .iter_mut()
            .find(|subscription| subscription.kind == PlanKind::Base)
        else {
            return Ok(());
        };
        let tally = subscription
            .period_usage
            .entry(feature.clone())
            .or_default();
        tally.units = tally
            .units
            .checked_add(units.get())
            .ok_or(Refusal::Overflow)?;
        tally.cost = tally.cost.checked_add(cost)?;
        Ok(())
    }
}

fn subscription_event(
    subscription_id: SubscriptionId,
    status: SubscriptionStatus,
    change: SubscriptionChange,
) -> EventKind {
    EventKind::Subscription {
        subscription_id,
        status,
        change,
    }
}

fn new_subscription(
    cx: &mut Cx<'_>,
    end_user_id: EndUserId,
    variant: &Variant,
    kind: PlanKind,
    start: Timestamp,
) -> Subscription {
    Subscription {
        id: SubscriptionId::new(cx.ids),
        end_user_id,
        plan_id: variant.plan_id,
        plan_variant_id: variant.id,
        kind,
        status: SubscriptionStatus::Active,
        current_period_start: start,
        current_period_end: start,
        trial_end: None,
        cancel_at_period_end: false,
        period_anchor: start,
        period_index: 0,
        paid_period_index: 0,
        pending_change: None,
        created_at: start,
        ended_at: None,
        paused_at: None,
        schedules: Vec::new(),
        renewal_due_notified: false,
        trial_ending_notified: false,
        period_usage: BTreeMap::<FeatureKey, PeriodTally>::new(),
    }
}
