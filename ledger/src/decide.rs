//! The entitlement decision (SPEC 5): may this end user do `units` of this feature now?
//! The control plane and the proxy both answer with this one function.

use crate::amount::{Credits, Units};
use crate::catalog::{Catalog, Feature, FeatureType, OveragePolicy, Plan};
use crate::id::{FeatureKey, PlanId, SequentialIds};
use crate::refusal::Refusal;
use crate::state::{Cx, EndUserState, Journal};
use crate::subscription::{Subscription, SubscriptionStatus};
use crate::time::Timestamp;

/// Why a check says no.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    InsufficientBalance,
    NotInPlan,
    SubscriptionPaused,
    SubscriptionPastDue,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::InsufficientBalance => "insufficient_balance",
            DenyReason::NotInPlan => "not_in_plan",
            DenyReason::SubscriptionPaused => "subscription_paused",
            DenyReason::SubscriptionPastDue => "subscription_past_due",
        }
    }
}

/// The answer to an entitlement check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Option<DenyReason>,
    /// Available credits for the feature, less the caller's unconfirmed spend; `None` for
    /// boolean features.
    pub balance: Option<Credits>,
    /// What `units` would cost; `None` for boolean features.
    pub cost: Option<Credits>,
    pub debt: Credits,
    /// When the soonest applicable recurring-grant block expires.
    pub resets_at: Option<Timestamp>,
    /// The plan of the end user's base subscription (or the free plan).
    pub plan_id: Option<PlanId>,
    pub subscription_status: Option<SubscriptionStatus>,
    /// What happens past the balance, when the feature is open and metered: `Block`
    /// means the decision is gated by the balance (a proxy spends from a lease), `Allow`
    /// that usage goes on into debt.
    pub overage: Option<OveragePolicy>,
}

/// Whether a feature is open to the end user through their plans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Open { overage: OveragePolicy },
    Denied(DenyReason),
}

// === impl EndUserState ===

impl EndUserState {
    /// Decides whether the end user may do `units` of `feature_key` at `now`.
    /// `local_pending` is spend the caller admitted but the state does not show yet (the
    /// proxy's unconfirmed usage; the control plane passes zero): it is subtracted from
    /// the balance. Due work (an expired window's new grant, say) is taken into account
    /// without changing `self`.
    ///
    /// # Errors
    /// `FeatureNotFound` for an unknown feature; `Overflow` on absurd amounts.
    pub fn decide(
        &self,
        catalog: &Catalog,
        feature_key: &FeatureKey,
        units: Units,
        local_pending: Credits,
        now: Timestamp,
    ) -> Result<Decision, Refusal> {
        if self.next_due(catalog)?.is_some_and(|due| due <= now) {
            let mut advanced = self.clone();
            let mut ids = SequentialIds::default();
            let mut cx = Cx {
                now,
                catalog,
                ids: &mut ids,
            };
            advanced.advance_into(
                &mut cx,
                &mut Journal::default(),
                crate::state::ADVANCE_STEPS_MAX,
            )?;
            return advanced.decide_current(catalog, feature_key, units, local_pending, now);
        }
        self.decide_current(catalog, feature_key, units, local_pending, now)
    }

    fn decide_current(
        &self,
        catalog: &Catalog,
        feature_key: &FeatureKey,
        units: Units,
        local_pending: Credits,
        now: Timestamp,
    ) -> Result<Decision, Refusal> {
        let feature = catalog
            .feature(feature_key)
            .ok_or_else(|| Refusal::FeatureNotFound(feature_key.clone()))?;
        let (plan_id, subscription_status) = self.base_plan(catalog);
        let access = self.access(catalog, feature);
        let debt = self.debt(feature_key);
        if feature.feature_type == FeatureType::Boolean {
            let (allowed, reason) = match access {
                Access::Open { .. } => (true, None),
                Access::Denied(reason) => (false, Some(reason)),
            };
            return Ok(Decision {
                allowed,
                reason,
                balance: None,
                cost: None,
                debt,
                resets_at: None,
                plan_id,
                subscription_status,
                overage: None,
            });
        }
        let cost = self.quote(catalog, feature_key, units, now)?;
        let pending_grants = self.pending_first_use_credits(catalog, feature_key, now)?;
        let balance = self
            .available(Some(feature_key), now)?
            .checked_add(pending_grants)?
            .saturating_sub_floor(local_pending);
        let (allowed, reason) = match access {
            Access::Denied(reason) => (false, Some(reason)),
            Access::Open { .. } if balance >= cost => (true, None),
            Access::Open {
                overage: OveragePolicy::Allow,
            } => (true, None),
            Access::Open {
                overage: OveragePolicy::Block,
            } => (false, Some(DenyReason::InsufficientBalance)),
        };
        let overage = match access {
            Access::Open { overage } => Some(overage),
            Access::Denied(_) => None,
        };
        Ok(Decision {
            allowed,
            reason,
            balance: Some(balance),
            cost: Some(cost),
            debt,
            resets_at: self.resets_at(catalog, feature_key, now)?,
            plan_id,
            subscription_status,
            overage,
        })
    }

    /// When the feature's recurring quota resets: the soonest expiry among usable blocks
    /// for it issued by a recurring grant, or the next recurring grant for it if sooner
    /// (a spent window's block is gone, but its reset is still coming).
    fn resets_at(
        &self,
        catalog: &Catalog,
        feature_key: &FeatureKey,
        now: Timestamp,
    ) -> Result<Option<Timestamp>, Refusal> {
        let expiring = self
            .blocks
            .iter()
            .filter(|block| {
                block.template.is_some()
                    && block.applies_to(feature_key)
                    && self.is_usable(block, now)
            })
            .filter_map(|block| block.expires_at)
            .min();
        let refill = self.next_refill(catalog, feature_key, now)?;
        Ok(match (expiring, refill) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    /// The base subscription's plan and status, or the free plan when there is none.
    fn base_plan(&self, catalog: &Catalog) -> (Option<PlanId>, Option<SubscriptionStatus>) {
        match self.base_subscription() {
            Some(subscription) => (Some(subscription.plan_id), Some(subscription.status)),
            None => (catalog.free_plan().map(|(_, plan)| plan.id), None),
        }
    }

    /// The one non-terminal base subscription, if any.
    pub fn base_subscription(&self) -> Option<&Subscription> {
        self.subscriptions
            .iter()
            .find(|subscription| subscription.kind == crate::catalog::PlanKind::Base)
    }

    /// Whether `feature` is open to the end user through their plans: the base
    /// subscription's plan (or the free plan when there is none) and every addon.
    /// A plan that enables the feature opens it while `trialing` or `active`, and while
    /// `past_due` when its variant allows usage then. A metered feature without
    /// `requires_plan` is open to anyone, with the base plan's overage policy.
    pub(crate) fn access(&self, catalog: &Catalog, feature: &Feature) -> Access {
        let mut plans: Vec<(&Plan, Option<&Subscription>)> = Vec::new();
        if self.base_subscription().is_none()
            && let Some((_, plan)) = catalog.free_plan()
        {
            plans.push((plan, None));
        }
        for subscription in &self.subscriptions {
            if let Some(plan) = catalog.plan(subscription.plan_id) {
                plans.push((plan, Some(subscription)));
            }
        }
        let mut overage = None;
        let mut blocked_by = None;
        for (plan, subscription) in &plans {
            if plan.features.get(&feature.key) != Some(&true) {
                continue;
            }
            match subscription_access(catalog, *subscription) {
                Ok(()) => {
                    if overage != Some(OveragePolicy::Allow) {
                        overage = Some(plan.overage_policy);
                    }
                }
                Err(reason) => blocked_by = blocked_by.or(Some(reason)),
            }
        }
        if let Some(overage) = overage {
            return Access::Open { overage };
        }
        if feature.feature_type == FeatureType::Metered && !feature.requires_plan {
            let overage = plans
                .iter()
                .find(|(plan, subscription)| {
                    plan.kind == crate::catalog::PlanKind::Base
                        && subscription_access(catalog, *subscription).is_ok()
                })
                .map_or(OveragePolicy::Block, |(plan, _)| plan.overage_policy);
            return Access::Open { overage };
        }
        Access::Denied(blocked_by.unwrap_or(DenyReason::NotInPlan))
    }

    /// Refuses unless the feature is open to the end user (balance aside).
    pub(crate) fn require_access(
        &self,
        catalog: &Catalog,
        feature_key: &FeatureKey,
        _now: Timestamp,
    ) -> Result<(), Refusal> {
        let feature = catalog
            .feature(feature_key)
            .ok_or_else(|| Refusal::FeatureNotFound(feature_key.clone()))?;
        match self.access(catalog, feature) {
            Access::Open { .. } => Ok(()),
            Access::Denied(reason) => Err(refusal_for(
                reason,
                feature_key,
                Credits::ZERO,
                Credits::ZERO,
            )),
        }
    }

    /// Refuses unless the decision allows `units` now.
    pub(crate) fn require_allowed(
        &self,
        catalog: &Catalog,
        feature_key: &FeatureKey,
        units: Units,
        now: Timestamp,
    ) -> Result<(), Refusal> {
        let decision = self.decide_current(catalog, feature_key, units, Credits::ZERO, now)?;
        match decision.reason {
            None => Ok(()),
            Some(reason) => Err(refusal_for(
                reason,
                feature_key,
                decision.cost.unwrap_or_default(),
                decision.balance.unwrap_or_default(),
            )),
        }
    }
}

/// Whether a plan reached through `subscription` (`None`: the implicit free plan) gives
/// access now.
fn subscription_access(
    catalog: &Catalog,
    subscription: Option<&Subscription>,
) -> Result<(), DenyReason> {
    let Some(subscription) = subscription else {
        return Ok(());
    };
    match subscription.status {
        SubscriptionStatus::Trialing | SubscriptionStatus::Active => Ok(()),
        SubscriptionStatus::PastDue => {
            let allowed = catalog
                .variant(subscription.plan_variant_id)
                .is_some_and(|variant| variant.allow_usage_while_past_due);
            if allowed {
                Ok(())
            } else {
                Err(DenyReason::SubscriptionPastDue)
            }
        }
        SubscriptionStatus::Paused => Err(DenyReason::SubscriptionPaused),
        SubscriptionStatus::Canceled | SubscriptionStatus::Expired => Err(DenyReason::NotInPlan),
    }
}

fn refusal_for(
    reason: DenyReason,
    feature_key: &FeatureKey,
    needed: Credits,
    available: Credits,
) -> Refusal {
    match reason {
        DenyReason::InsufficientBalance => Refusal::InsufficientBalance { needed, available },
        DenyReason::NotInPlan => Refusal::NotInPlan(feature_key.clone()),
        DenyReason::SubscriptionPaused => Refusal::SubscriptionPaused(feature_key.clone()),
        DenyReason::SubscriptionPastDue => Refusal::SubscriptionPastDue(feature_key.clone()),
    }
}
