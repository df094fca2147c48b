//! Subscriptions and test clocks (SPEC 10.2, 10.3).

use serde::{Deserialize, Serialize};

use crate::{FieldError, WireTime, end_user_id};

/// `POST /v1/subscriptions`. `plan_variant_id` takes a variant id (`var_…`); the control
/// plane also accepts `<plan key>/<variant key>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubscription {
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]+$"
    )]
    pub end_user_id: String,
    #[schema(min_length = 1, max_length = 200)]
    pub plan_variant_id: String,
    #[serde(default)]
    #[schema(maximum = 3650)]
    pub trial_days: Option<u32>,
    #[serde(default)]
    pub start_at: Option<WireTime>,
}

impl CreateSubscription {
    /// # Errors
    /// The field at fault.
    pub fn end_user(&self) -> Result<ledger::EndUserId, FieldError> {
        end_user_id("end_user_id", &self.end_user_id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PendingChangeWire {
    #[schema(value_type = String)]
    pub plan_variant_id: ledger::VariantId,
    pub effective_at: WireTime,
}

/// A subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Subscription {
    pub id: String,
    pub end_user_id: String,
    pub plan_id: String,
    pub plan_variant_id: String,
    /// `trialing`, `active`, `past_due`, `paused`, `canceled`, `expired`.
    pub status: String,
    pub current_period_start: WireTime,
    pub current_period_end: WireTime,
    pub trial_end: Option<WireTime>,
    pub cancel_at_period_end: bool,
    /// Prepaid: the end of the last period paid for.
    pub paid_through: Option<WireTime>,
    pub pending_change: Option<PendingChangeWire>,
    pub created_at: WireTime,
    pub ended_at: Option<WireTime>,
}

impl Subscription {
    /// The wire subscription; `variant` (when the catalog still has it) gives `paid_through`.
    pub fn new(
        subscription: &ledger::Subscription,
        variant: Option<&ledger::Variant>,
    ) -> Subscription {
        Subscription {
            id: subscription.id.to_string(),
            end_user_id: subscription.end_user_id.to_string(),
            plan_id: subscription.plan_id.to_string(),
            plan_variant_id: subscription.plan_variant_id.to_string(),
            status: subscription.status.as_str().to_owned(),
            current_period_start: subscription.current_period_start.into(),
            current_period_end: subscription.current_period_end.into(),
            trial_end: subscription.trial_end.map(WireTime),
            cancel_at_period_end: subscription.cancel_at_period_end,
            paid_through: variant
                .filter(|variant| variant.billing_mode == ledger::BillingMode::Prepaid)
                .and_then(|variant| subscription.paid_through(variant))
                .map(WireTime),
            pending_change: subscription.pending_change.map(|change| PendingChangeWire {
                plan_variant_id: change.plan_variant_id,
                effective_at: change.effective_at.into(),
            }),
            created_at: subscription.created_at.into(),
            ended_at: subscription.ended_at.map(WireTime),
        }
    }
}

fn one() -> u32 {
    1
}

/// `POST /v1/subscriptions/{id}/renew`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewSubscription {
    #[serde(default = "one")]
    pub periods: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WhenWire {
    #[default]
    PeriodEnd,
    Immediate,
}

fn yes() -> bool {
    true
}

/// `POST /v1/subscriptions/{id}/cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelSubscription {
    #[serde(default)]
    pub at: WhenWire,
    #[serde(default = "yes")]
    pub revoke_credits: bool,
}

impl Default for CancelSubscription {
    fn default() -> CancelSubscription {
        CancelSubscription {
            at: WhenWire::PeriodEnd,
            revoke_credits: true,
        }
    }
}

/// `POST /v1/subscriptions/{id}/change`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeSubscription {
    pub plan_variant_id: String,
    /// Upgrades default to `immediate`, downgrades to `period_end`.
    #[serde(default)]
    pub at: Option<WhenWire>,
}

/// `GET /v1/test-clock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TestClock {
    pub now: WireTime,
    pub offset_seconds: i64,
}

/// The answer to `POST /v1/test-clock/advance`: the clock after the move, and whether the
/// jobs due by then all ran before the answer (SPEC 10.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdvancedTestClock {
    pub now: WireTime,
    pub offset_seconds: i64,
    /// `true` when every job due by `now` ran before this answer: grants, expiries,
    /// renewals, grace ends, reservation TTLs, and webhook attempts with the retries
    /// their backoff puts before `now`. `false` when the advance reached its bound on
    /// work first; `pending` says what is left, and it runs in the background.
    pub settled: bool,
    pub pending: AdvancePending,
    /// Webhook delivery attempts this advance made.
    pub webhook_attempts: u64,
}

/// What an advance left to run in the background.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdvancePending {
    /// End users with due work left (at most the scheduler's batch size is counted).
    pub end_users: u64,
    /// Webhook deliveries due by `now` and not yet delivered or failed.
    pub webhook_deliveries: u64,
    /// End users whose due work failed during this advance (an error the log names);
    /// the scheduler retries them with backoff.
    pub failed_end_users: u64,
}

/// `POST /v1/test-clock/advance`: `seconds` or `to`, exactly one; forward only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdvanceTestClock {
    #[serde(default)]
    pub seconds: Option<i64>,
    #[serde(default)]
    pub to: Option<WireTime>,
}
