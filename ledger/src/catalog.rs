//! The tenant's catalog as the engine sees it: features and their pricing, plans, variants
//! with their grant templates, and the environment's settings.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::amount::Credits;
use crate::id::{FeatureKey, PlanId, VariantId};
use crate::time::{Interval, Span};

/// Whether a feature costs credits or is simply on or off by plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum FeatureType {
    Metered,
    Boolean,
}

/// How tiers price the units of one event (SPEC 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum TierMode {
    /// Each unit is priced by the tier its cumulative position falls in.
    Graduated,
    /// All units of the event are priced by the tier the cumulative total reaches.
    Volume,
}

/// One tier: units up to `up_to` (cumulative, inclusive) cost `unit_cost` each; `None` is
/// the last, unbounded tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Tier {
    pub up_to: Option<u64>,
    pub unit_cost: Credits,
}

/// A metered feature's pricing rule, turning units into a credit cost.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Pricing {
    /// `ceil(units * unit_cost / per)`.
    PerUnit { unit_cost: Credits, per: u64 },
    /// `amount` per event, whatever the units.
    Flat { amount: Credits },
    /// Tiers over the end user's cumulative units in the current usage period.
    Tiered { mode: TierMode, tiers: Vec<Tier> },
}

/// A feature the tenant sells or gates.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Feature {
    pub key: FeatureKey,
    pub feature_type: FeatureType,
    /// `None`: a unit costs one credit.
    pub pricing: Option<Pricing>,
    /// Metered features with `requires_plan` are usable only through a plan that enables
    /// them; without it, anyone with credits may use them.
    pub requires_plan: bool,
}

/// Whether a plan is the end user's one base plan or an addon on top of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum PlanKind {
    Base,
    Addon,
}

/// What happens when a metered feature's balance is short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum OveragePolicy {
    /// Deny (`insufficient_balance`).
    #[default]
    Block,
    /// Allow; the shortfall becomes debt.
    Allow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Plan {
    pub id: PlanId,
    pub key: Arc<str>,
    pub kind: PlanKind,
    /// Feature key → enabled.
    pub features: BTreeMap<FeatureKey, bool>,
    pub overage_policy: OveragePolicy,
}

/// Whether a variant is paid before (renewal needs `/renew`) or after its periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum BillingMode {
    Prepaid,
    Postpaid,
}

/// A price in the currency's minor unit. Money the tenant charges, not credits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Price {
    pub amount: i64,
    pub currency: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Variant {
    pub id: VariantId,
    pub plan_id: PlanId,
    pub key: Arc<str>,
    pub interval: Interval,
    pub billing_mode: BillingMode,
    pub price: Option<Price>,
    pub trial_days: u32,
    pub grace_days: u32,
    pub renewal_due_days: u32,
    pub allow_usage_while_past_due: bool,
    pub grants: Vec<GrantTemplate>,
}

/// How often a grant template issues a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum GrantEvery {
    /// At the start of every billing period.
    Period,
    /// Every fixed span (a resetting quota such as `5h`).
    Span(Span),
}

/// Where a template's windows start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum GrantAnchor {
    /// Windows follow the subscription's period start.
    #[default]
    Period,
    /// Each window starts at the first usage after the previous one ended.
    FirstUse,
}

/// When a template's blocks expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum ExpireAfter {
    /// At the end of the window (or period) that issued them: a resetting quota.
    #[default]
    Every,
    Never,
    After(Span),
}

/// What is left of an expiring template block that moves into a new block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Rollover {
    /// 0 to 100.
    pub percent: u8,
    pub max: Option<Credits>,
}

/// A recurring grant a variant issues to each of its subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GrantTemplate {
    pub amount: Credits,
    pub every: GrantEvery,
    pub anchor: GrantAnchor,
    pub expire_after: ExpireAfter,
    pub priority: u16,
    pub feature_keys: Option<Arc<[FeatureKey]>>,
    pub rollover: Option<Rollover>,
    /// The most credits this template's live blocks may hold together.
    pub cap: Option<Credits>,
    pub settles_debt: bool,
}

/// Per-environment settings the rules depend on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Settings {
    /// The variant an end user falls back to when their base subscription ends.
    pub free_plan_variant_id: Option<VariantId>,
    /// `credits.low` is emitted when available credits fall below this.
    pub low_balance_threshold: Option<Credits>,
}

/// Everything of the tenant's catalog that decisions depend on.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub features: BTreeMap<FeatureKey, Feature>,
    pub plans: BTreeMap<PlanId, Plan>,
    pub variants: BTreeMap<VariantId, Variant>,
    pub settings: Settings,
}

// === impl Catalog ===

impl Catalog {
    pub fn feature(&self, key: &FeatureKey) -> Option<&Feature> {
        self.features.get(key)
    }

    pub fn variant(&self, id: VariantId) -> Option<&Variant> {
        self.variants.get(&id)
    }

    pub fn plan(&self, id: PlanId) -> Option<&Plan> {
        self.plans.get(&id)
    }

    /// The free plan's variant and plan, when the settings name one that exists.
    pub fn free_plan(&self) -> Option<(&Variant, &Plan)> {
        let variant = self.variant(self.settings.free_plan_variant_id?)?;
        let plan = self.plan(variant.plan_id)?;
        Some((variant, plan))
    }
}

/// Why a catalog object was refused: a field name and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidCatalog {
    pub field: String,
    pub message: String,
}

fn invalid(field: &str, message: impl Into<String>) -> InvalidCatalog {
    InvalidCatalog {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// The highest block priority (SPEC 3.1: 0 to 1000).
pub const PRIORITY_MAX: u16 = 1000;

/// The shortest window a grant template may reset on (`every`): each window is a grant
/// and an expiry, so a shorter one would multiply the work time brings.
pub const TEMPLATE_EVERY_MIN_SECS: i64 = 60;

/// The most grant templates one variant may carry.
pub const TEMPLATES_PER_VARIANT_MAX: usize = 32;
/// The most units a billing interval spans (`every`): the API documents 1 to 1,000.
pub const INTERVAL_EVERY_MAX: u32 = 1000;
/// The default block priority.
pub const PRIORITY_DEFAULT: u16 = 100;

// === impl Pricing ===

impl Pricing {
    /// Checks the rule's own consistency.
    ///
    /// # Errors
    /// Names the offending field: negative costs, `per` of zero, tiers out of order or
    /// without a last unbounded tier.
    pub fn validate(&self) -> Result<(), InvalidCatalog> {
        match self {
            Pricing::PerUnit { unit_cost, per } => {
                if unit_cost.is_negative() {
                    return Err(invalid("pricing.unit_cost", "must not be negative"));
                }
                if *per == 0 {
                    return Err(invalid("pricing.per", "must be at least 1"));
                }
            }
            Pricing::Flat { amount } => {
                if amount.is_negative() {
                    return Err(invalid("pricing.amount", "must not be negative"));
                }
            }
            Pricing::Tiered { tiers, .. } => validate_tiers(tiers)?,
        }
        Ok(())
    }
}

fn validate_tiers(tiers: &[Tier]) -> Result<(), InvalidCatalog> {
    let Some((last, rest)) = tiers.split_last() else {
        return Err(invalid("pricing.tiers", "must have at least one tier"));
    };
    if last.up_to.is_some() {
        return Err(invalid(
            "pricing.tiers",
            "the last tier must have `up_to: null`",
        ));
    }
    let mut previous = 0u64;
    for (index, tier) in rest.iter().enumerate() {
        let Some(up_to) = tier.up_to else {
            return Err(invalid(
                &format!("pricing.tiers[{index}].up_to"),
                "only the last tier may be unbounded",
            ));
        };
        if up_to <= previous {
            return Err(invalid(
                &format!("pricing.tiers[{index}].up_to"),
                "must be greater than the previous tier's and above zero",
            ));
        }
        previous = up_to;
    }
    if let Some(index) = tiers.iter().position(|tier| tier.unit_cost.is_negative()) {
        return Err(invalid(
            &format!("pricing.tiers[{index}].unit_cost"),
            "must not be negative",
        ));
    }
    Ok(())
}

// === impl GrantTemplate ===

impl GrantTemplate {
    /// Checks the template's own consistency.
    ///
    /// # Errors
    /// Names the offending field.
    pub fn validate(&self) -> Result<(), InvalidCatalog> {
        if !self.amount.is_positive() {
            return Err(invalid("amount", "must be positive"));
        }
        if self.priority > PRIORITY_MAX {
            return Err(invalid(
                "priority",
                format!("must be at most {PRIORITY_MAX}"),
            ));
        }
        if let GrantEvery::Span(span) = self.every
            && span.as_millis() < TEMPLATE_EVERY_MIN_SECS.saturating_mul(1000)
        {
            return Err(invalid(
                "every",
                format!("must be at least {TEMPLATE_EVERY_MIN_SECS} seconds (\"1m\")"),
            ));
        }
        if self.anchor == GrantAnchor::FirstUse && self.every == GrantEvery::Period {
            return Err(invalid(
                "anchor",
                "`first_use` needs `every` to be a duration such as \"5h\"",
            ));
        }
        if let ExpireAfter::After(span) = self.expire_after
            && !span.is_positive()
        {
            return Err(invalid("expire_after", "must be positive"));
        }
        if let Some(rollover) = self.rollover {
            if rollover.percent > 100 {
                return Err(invalid("rollover.percent", "must be 0 to 100"));
            }
            if rollover.max.is_some_and(|max| max.is_negative()) {
                return Err(invalid("rollover.max", "must not be negative"));
            }
        }
        if self.cap.is_some_and(|cap| !cap.is_positive()) {
            return Err(invalid("cap", "must be positive"));
        }
        if let Some(keys) = &self.feature_keys
            && keys.is_empty()
        {
            return Err(invalid(
                "feature_keys",
                "must name at least one feature when present",
            ));
        }
        Ok(())
    }

    /// Whether blocks from this template apply to `feature`.
    pub fn applies_to(&self, feature: &FeatureKey) -> bool {
        self.feature_keys
            .as_ref()
            .is_none_or(|keys| keys.contains(feature))
    }
}

// === impl Variant ===

impl Variant {
    /// The price normalised to one year, as an exact fraction, for upgrade/downgrade
    /// comparisons. A variant without a price costs 0.
    pub fn yearly_price(&self) -> (i128, i128) {
        let amount = self.price.as_ref().map_or(0, |price| price.amount);
        let (per_year, denominator) = self.interval.per_year();
        (i128::from(amount).saturating_mul(per_year), denominator)
    }

    /// Checks the variant's own consistency (not its references to other objects).
    ///
    /// # Errors
    /// Names the offending field.
    pub fn validate(&self) -> Result<(), InvalidCatalog> {
        if !(1..=INTERVAL_EVERY_MAX).contains(&self.interval.every) {
            return Err(invalid(
                "interval.every",
                format!("must be 1 to {INTERVAL_EVERY_MAX}"),
            ));
        }
        if self.price.as_ref().is_some_and(|price| price.amount < 0) {
            return Err(invalid("price.amount", "must not be negative"));
        }
        if self.grants.len() > TEMPLATES_PER_VARIANT_MAX {
            return Err(invalid(
                "grants",
                format!("must hold at most {TEMPLATES_PER_VARIANT_MAX} grant templates"),
            ));
        }
        for (index, template) in self.grants.iter().enumerate() {
            template.validate().map_err(|error| InvalidCatalog {
                field: format!("grants[{index}].{}", error.field),
                message: error.message,
            })?;
        }
        Ok(())
    }
}
