//! Features, pricing, plans, variants, grant templates and settings (SPEC 10.1).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{FieldError, WireTime, feature_key, feature_keys};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FeatureTypeWire {
    Metered,
    Boolean,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TierModeWire {
    Graduated,
    Volume,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TierWire {
    /// Cumulative units this tier reaches (inclusive); `null` for the last tier.
    pub up_to: Option<u64>,
    pub unit_cost: i64,
}

fn one() -> u64 {
    1
}

/// A metered feature's pricing rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "model", rename_all = "snake_case")]
pub enum PricingWire {
    /// `ceil(units * unit_cost / per)`.
    PerUnit {
        unit_cost: i64,
        #[serde(default = "one")]
        per: u64,
    },
    /// `amount` per event.
    Flat { amount: i64 },
    /// Tiers over cumulative units in the usage period.
    Tiered {
        mode: TierModeWire,
        tiers: Vec<TierWire>,
    },
}

impl PricingWire {
    pub fn to_ledger(&self) -> Result<ledger::Pricing, FieldError> {
        let pricing = match self {
            PricingWire::PerUnit { unit_cost, per } => ledger::Pricing::PerUnit {
                unit_cost: ledger::Credits::new(*unit_cost),
                per: *per,
            },
            PricingWire::Flat { amount } => ledger::Pricing::Flat {
                amount: ledger::Credits::new(*amount),
            },
            PricingWire::Tiered { mode, tiers } => ledger::Pricing::Tiered {
                mode: match mode {
                    TierModeWire::Graduated => ledger::TierMode::Graduated,
                    TierModeWire::Volume => ledger::TierMode::Volume,
                },
                tiers: tiers
                    .iter()
                    .map(|tier| ledger::Tier {
                        up_to: tier.up_to,
                        unit_cost: ledger::Credits::new(tier.unit_cost),
                    })
                    .collect(),
            },
        };
        pricing
            .validate()
            .map_err(|error| FieldError::new(error.field, error.message))?;
        Ok(pricing)
    }
}

/// `POST /v1/features`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFeature {
    #[schema(pattern = r"^[a-z0-9_.-]{1,64}$")]
    pub key: String,
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    #[serde(rename = "type")]
    pub feature_type: FeatureTypeWire,
    #[serde(default)]
    pub pricing: Option<PricingWire>,
    #[serde(default)]
    pub requires_plan: bool,
}

impl CreateFeature {
    /// The engine's view of the feature.
    ///
    /// # Errors
    /// The field at fault: a bad key, an empty name, pricing on a boolean feature, or an
    /// inconsistent pricing rule.
    pub fn to_ledger(&self) -> Result<ledger::Feature, FieldError> {
        let key = feature_key("key", &self.key)?;
        check_name("name", &self.name)?;
        let feature_type = match self.feature_type {
            FeatureTypeWire::Metered => ledger::FeatureType::Metered,
            FeatureTypeWire::Boolean => ledger::FeatureType::Boolean,
        };
        if feature_type == ledger::FeatureType::Boolean && self.pricing.is_some() {
            return Err(FieldError::new(
                "pricing",
                "a boolean feature has no pricing",
            ));
        }
        let pricing = self
            .pricing
            .as_ref()
            .map(PricingWire::to_ledger)
            .transpose()?;
        Ok(ledger::Feature {
            key,
            feature_type,
            pricing,
            requires_plan: self.requires_plan,
        })
    }
}

/// A feature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Feature {
    pub id: String,
    pub key: String,
    pub name: String,
    #[serde(rename = "type")]
    pub feature_type: FeatureTypeWire,
    pub pricing: Option<PricingWire>,
    pub requires_plan: bool,
    pub created_at: WireTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlanKindWire {
    Base,
    Addon,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OveragePolicyWire {
    #[default]
    Block,
    Allow,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanFeature {
    pub enabled: bool,
}

/// `POST /v1/plans`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePlan {
    #[schema(pattern = r"^[a-z0-9_.-]{1,64}$")]
    pub key: String,
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    pub kind: PlanKindWire,
    #[serde(default)]
    pub features: BTreeMap<String, PlanFeature>,
    #[serde(default)]
    pub overage_policy: OveragePolicyWire,
}

/// The longest name a feature or a plan may have, in characters.
pub const NAME_CHARS_MAX: usize = 200;

/// A display name: not blank, at most [`NAME_CHARS_MAX`] characters.
///
/// # Errors
/// Naming `field`.
pub fn check_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name.trim().is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if name.chars().count() > NAME_CHARS_MAX {
        return Err(FieldError::new(
            field,
            format!("must be at most {NAME_CHARS_MAX} characters"),
        ));
    }
    Ok(())
}

/// Checks a catalog key (plan or variant): the same alphabet as feature keys.
pub fn catalog_key(field: &str, key: &str) -> Result<Arc<str>, FieldError> {
    feature_key(field, key).map(|key| Arc::from(key.as_str()))
}

impl CreatePlan {
    /// The engine's view of the plan (`id` assigned by the caller).
    ///
    /// # Errors
    /// The field at fault.
    pub fn to_ledger(&self, id: ledger::PlanId) -> Result<ledger::Plan, FieldError> {
        let key = catalog_key("key", &self.key)?;
        check_name("name", &self.name)?;
        let mut features = BTreeMap::new();
        for (name, feature) in &self.features {
            features.insert(
                feature_key(&format!("features.{name}"), name)?,
                feature.enabled,
            );
        }
        Ok(ledger::Plan {
            id,
            key,
            kind: match self.kind {
                PlanKindWire::Base => ledger::PlanKind::Base,
                PlanKindWire::Addon => ledger::PlanKind::Addon,
            },
            features,
            overage_policy: match self.overage_policy {
                OveragePolicyWire::Block => ledger::OveragePolicy::Block,
                OveragePolicyWire::Allow => ledger::OveragePolicy::Allow,
            },
        })
    }
}

/// A plan with its variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Plan {
    pub id: String,
    pub key: String,
    pub name: String,
    pub kind: PlanKindWire,
    pub features: BTreeMap<String, PlanFeature>,
    pub overage_policy: OveragePolicyWire,
    pub variants: Vec<Variant>,
    pub created_at: WireTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IntervalUnitWire {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IntervalWire {
    #[schema(minimum = 1, maximum = 1000)]
    pub every: u32,
    pub unit: IntervalUnitWire,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BillingModeWire {
    Prepaid,
    Postpaid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceWire {
    /// In the currency's minor unit.
    #[schema(minimum = 0)]
    pub amount: i64,
    #[schema(pattern = r"^[A-Za-z]{3}$")]
    pub currency: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AnchorWire {
    #[default]
    Period,
    FirstUse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloverWire {
    #[schema(maximum = 100)]
    pub percent: u8,
    #[serde(default)]
    #[schema(minimum = 0)]
    pub max: Option<i64>,
}

fn period() -> String {
    "period".to_owned()
}

fn every() -> String {
    "every".to_owned()
}

fn default_priority() -> u16 {
    ledger::PRIORITY_DEFAULT
}

fn yes() -> bool {
    true
}

/// A recurring grant a variant issues to each subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantTemplateWire {
    #[schema(minimum = 1)]
    pub amount: i64,
    /// `"period"` (default) or a duration such as `"5h"` (units s, m, h, d, w).
    #[serde(default = "period")]
    pub every: String,
    #[serde(default)]
    pub anchor: AnchorWire,
    /// `"every"` (default: at the end of the window), `"never"`, or a duration.
    #[serde(default = "every")]
    pub expire_after: String,
    #[serde(default = "default_priority")]
    #[schema(maximum = 1000)]
    pub priority: u16,
    #[serde(default)]
    pub feature_keys: Option<Vec<String>>,
    #[serde(default)]
    pub rollover: Option<RolloverWire>,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub cap: Option<i64>,
    #[serde(default = "yes")]
    pub settles_debt: bool,
}

fn span(field: &str, text: &str) -> Result<ledger::Span, FieldError> {
    text.parse()
        .map_err(|message: String| FieldError::new(field, message))
}

impl GrantTemplateWire {
    /// # Errors
    /// The field at fault, prefixed with `prefix`.
    pub fn to_ledger(&self, prefix: &str) -> Result<ledger::GrantTemplate, FieldError> {
        let field = |name: &str| format!("{prefix}.{name}");
        let every = match self.every.as_str() {
            "period" => ledger::GrantEvery::Period,
            text => ledger::GrantEvery::Span(span(&field("every"), text)?),
        };
        let expire_after = match self.expire_after.as_str() {
            "every" => ledger::ExpireAfter::Every,
            "never" => ledger::ExpireAfter::Never,
            text => ledger::ExpireAfter::After(span(&field("expire_after"), text)?),
        };
        let template = ledger::GrantTemplate {
            amount: ledger::Credits::new(self.amount),
            every,
            anchor: match self.anchor {
                AnchorWire::Period => ledger::GrantAnchor::Period,
                AnchorWire::FirstUse => ledger::GrantAnchor::FirstUse,
            },
            expire_after,
            priority: self.priority,
            feature_keys: feature_keys(&field("feature_keys"), self.feature_keys.as_deref())?,
            rollover: self.rollover.map(|rollover| ledger::Rollover {
                percent: rollover.percent,
                max: rollover.max.map(ledger::Credits::new),
            }),
            cap: self.cap.map(ledger::Credits::new),
            settles_debt: self.settles_debt,
        };
        template
            .validate()
            .map_err(|error| FieldError::new(field(&error.field), error.message))?;
        Ok(template)
    }
}

fn three() -> u32 {
    3
}

/// `POST /v1/plans/{plan}/variants`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVariant {
    #[schema(pattern = r"^[a-z0-9_.-]{1,64}$")]
    pub key: String,
    pub interval: IntervalWire,
    pub billing_mode: BillingModeWire,
    #[serde(default)]
    pub price: Option<PriceWire>,
    #[serde(default)]
    #[schema(maximum = 3650)]
    pub trial_days: u32,
    #[serde(default = "three")]
    #[schema(maximum = 3650)]
    pub grace_days: u32,
    #[serde(default = "three")]
    #[schema(maximum = 3650)]
    pub renewal_due_days: u32,
    #[serde(default = "yes")]
    pub allow_usage_while_past_due: bool,
    #[serde(default)]
    #[schema(max_items = 32)]
    pub grants: Vec<GrantTemplateWire>,
}

impl CreateVariant {
    /// # Errors
    /// The field at fault.
    pub fn to_ledger(
        &self,
        id: ledger::VariantId,
        plan_id: ledger::PlanId,
    ) -> Result<ledger::Variant, FieldError> {
        let key = catalog_key("key", &self.key)?;
        let grants = self
            .grants
            .iter()
            .enumerate()
            .map(|(index, template)| template.to_ledger(&format!("grants[{index}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let variant = ledger::Variant {
            id,
            plan_id,
            key,
            interval: ledger::Interval {
                every: self.interval.every,
                unit: match self.interval.unit {
                    IntervalUnitWire::Hour => ledger::IntervalUnit::Hour,
                    IntervalUnitWire::Day => ledger::IntervalUnit::Day,
                    IntervalUnitWire::Week => ledger::IntervalUnit::Week,
                    IntervalUnitWire::Month => ledger::IntervalUnit::Month,
                    IntervalUnitWire::Year => ledger::IntervalUnit::Year,
                },
            },
            billing_mode: match self.billing_mode {
                BillingModeWire::Prepaid => ledger::BillingMode::Prepaid,
                BillingModeWire::Postpaid => ledger::BillingMode::Postpaid,
            },
            price: self.price.as_ref().map(|price| ledger::Price {
                amount: price.amount,
                currency: Arc::from(price.currency.as_str()),
            }),
            trial_days: self.trial_days,
            grace_days: self.grace_days,
            renewal_due_days: self.renewal_due_days,
            allow_usage_while_past_due: self.allow_usage_while_past_due,
            grants,
        };
        variant
            .validate()
            .map_err(|error| FieldError::new(error.field, error.message))?;
        if let Some(price) = &self.price {
            crate::credits::check_currency("price.currency", &price.currency)?;
        }
        Ok(variant)
    }
}

/// A plan variant: a price point with its interval and grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Variant {
    pub id: String,
    pub plan_id: String,
    pub key: String,
    pub interval: IntervalWire,
    pub billing_mode: BillingModeWire,
    pub price: Option<PriceWire>,
    pub trial_days: u32,
    pub grace_days: u32,
    pub renewal_due_days: u32,
    pub allow_usage_while_past_due: bool,
    pub grants: Vec<GrantTemplateWire>,
    pub archived: bool,
}

impl Variant {
    /// The wire variant for a stored request.
    pub fn from_request(
        id: &str,
        plan_id: &str,
        request: &CreateVariant,
        archived: bool,
    ) -> Variant {
        Variant {
            id: id.to_owned(),
            plan_id: plan_id.to_owned(),
            key: request.key.clone(),
            interval: request.interval,
            billing_mode: request.billing_mode,
            price: request.price.clone(),
            trial_days: request.trial_days,
            grace_days: request.grace_days,
            renewal_due_days: request.renewal_due_days,
            allow_usage_while_past_due: request.allow_usage_while_past_due,
            grants: request.grants.clone(),
            archived,
        }
    }
}

/// `PATCH /v1/settings`: only the fields present change; `null` clears.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSettings {
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub free_plan_variant_id: Option<Option<String>>,
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub low_balance_threshold: Option<Option<i64>>,
}

/// The environment's settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Settings {
    pub free_plan_variant_id: Option<String>,
    pub low_balance_threshold: Option<i64>,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
pub(crate) mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        value: &Option<Option<T>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(inner) => inner.serialize(serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(deserializer).map(Some)
    }
}
