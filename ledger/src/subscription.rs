//! Subscriptions and their state machine (SPEC 10.2).

use std::collections::BTreeMap;
use std::fmt;

use crate::amount::Credits;
use crate::catalog::PlanKind;
use crate::id::{EndUserId, FeatureKey, PlanId, SubscriptionId, VariantId};
use crate::time::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum SubscriptionStatus {
    Trialing,
    Active,
    PastDue,
    Paused,
    Canceled,
    Expired,
}

impl SubscriptionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Trialing => "trialing",
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::PastDue => "past_due",
            SubscriptionStatus::Paused => "paused",
            SubscriptionStatus::Canceled => "canceled",
            SubscriptionStatus::Expired => "expired",
        }
    }

    /// `canceled` and `expired` never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SubscriptionStatus::Canceled | SubscriptionStatus::Expired
        )
    }

    /// Whether recurring grants are issued in this state.
    pub fn issues_grants(self) -> bool {
        matches!(
            self,
            SubscriptionStatus::Trialing | SubscriptionStatus::Active
        )
    }
}

impl fmt::Display for SubscriptionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of variant waiting for its moment (a downgrade at period end, by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PendingChange {
    pub plan_variant_id: VariantId,
    pub effective_at: Timestamp,
}

/// The clock of one fixed-span grant template (`every: "5h"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GrantSchedule {
    pub template_index: u16,
    /// `anchor: period`: when the next window starts.
    pub next_at: Option<Timestamp>,
    /// `anchor: first_use`: when the open window ends; `None` or past means the next use
    /// opens a new window.
    pub window_ends_at: Option<Timestamp>,
}

/// Units and credits used in the current period, reported at renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PeriodTally {
    pub units: u64,
    pub cost: Credits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Subscription {
    pub id: SubscriptionId,
    pub end_user_id: EndUserId,
    pub plan_id: PlanId,
    pub plan_variant_id: VariantId,
    pub kind: PlanKind,
    pub status: SubscriptionStatus,
    pub current_period_start: Timestamp,
    pub current_period_end: Timestamp,
    pub trial_end: Option<Timestamp>,
    pub cancel_at_period_end: bool,
    /// Periods are numbered from `period_anchor`: period `k` is
    /// `[anchor + k·interval, anchor + (k+1)·interval)`. A trial is period −1, ending at
    /// the anchor.
    pub period_anchor: Timestamp,
    pub period_index: i64,
    /// Prepaid: the last period paid for (`-1`: none). Postpaid ignores it.
    pub paid_period_index: i64,
    pub pending_change: Option<PendingChange>,
    pub created_at: Timestamp,
    pub ended_at: Option<Timestamp>,
    pub paused_at: Option<Timestamp>,
    pub schedules: Vec<GrantSchedule>,
    pub renewal_due_notified: bool,
    pub trial_ending_notified: bool,
    pub period_usage: BTreeMap<FeatureKey, PeriodTally>,
}
