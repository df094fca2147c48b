//! Business refusals: values, not failures. Each maps to one stable API `code` (SPEC 13).

use crate::amount::{Credits, Overflow};
use crate::id::{BlockId, FeatureKey, ReservationId, SubscriptionId, VariantId};
use crate::reservation::ReservationStatus;
use crate::subscription::SubscriptionStatus;

/// Why an operation changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("insufficient balance: needed {needed}, available {available}")]
    InsufficientBalance { needed: Credits, available: Credits },
    #[error("feature `{0}` is not in the end user's plan")]
    NotInPlan(FeatureKey),
    #[error("the subscription that gives access to `{0}` is paused")]
    SubscriptionPaused(FeatureKey),
    #[error("the subscription that gives access to `{0}` is past due")]
    SubscriptionPastDue(FeatureKey),
    #[error("feature `{0}` does not exist")]
    FeatureNotFound(FeatureKey),
    #[error("feature `{0}` is boolean and has no balance")]
    FeatureNotMetered(FeatureKey),
    #[error("block {0} does not exist")]
    BlockNotFound(BlockId),
    #[error("block {0} is already voided")]
    BlockAlreadyVoided(BlockId),
    #[error("reservation {0} does not exist")]
    ReservationNotFound(ReservationId),
    #[error("reservation is {status}, not active")]
    ReservationNotActive { status: ReservationStatus },
    #[error("subscription {0} does not exist")]
    SubscriptionNotFound(SubscriptionId),
    #[error("lease {0} does not exist (or ended more than an hour ago)")]
    LeaseNotFound(crate::id::LeaseId),
    #[error("lease is {status}, not active")]
    LeaseNotActive { status: crate::lease::LeaseStatus },
    /// A lease report's sequence is not the next one; `expected` is.
    #[error("expected report sequence {expected}")]
    SequenceGap { expected: u64 },
    #[error("plan variant {0} does not exist")]
    VariantNotFound(VariantId),
    #[error("cannot {operation} a subscription that is {from}")]
    InvalidTransition {
        from: SubscriptionStatus,
        operation: &'static str,
    },
    #[error("{0}")]
    Conflict(String),
    /// A request value the rules cannot accept; `field` names it.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("arithmetic overflow")]
    Overflow,
    /// A bound on what one end user may hold was reached (`what`, at most `limit`).
    #[error("{what}: at most {limit}")]
    LimitReached { what: &'static str, limit: usize },
    /// The end user has more due work waiting than one operation runs (a long stopped
    /// scheduler, or a test clock moved far): the scheduler catches them up in chunks, and
    /// the operation can be retried shortly. Nothing was changed.
    #[error(
        "the end user has more than {steps_max} pieces of due work waiting since {due_since}; they are being caught up"
    )]
    CatchingUp {
        steps_max: usize,
        due_since: crate::time::Timestamp,
    },
    /// A broken invariant: a bug or corrupted storage. Nothing was changed.
    #[error("{0}")]
    Invariant(String),
}

impl From<Overflow> for Refusal {
    fn from(_: Overflow) -> Refusal {
        Refusal::Overflow
    }
}

impl Refusal {
    /// The stable API error code (SPEC 13).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::InsufficientBalance { .. } => "insufficient_balance",
            Refusal::NotInPlan(_) => "not_in_plan",
            Refusal::SubscriptionPaused(_) => "subscription_paused",
            Refusal::SubscriptionPastDue(_) => "subscription_past_due",
            Refusal::FeatureNotFound(_) => "feature_not_found",
            Refusal::BlockNotFound(_)
            | Refusal::ReservationNotFound(_)
            | Refusal::SubscriptionNotFound(_)
            | Refusal::LeaseNotFound(_) => "not_found",
            Refusal::LeaseNotActive { .. } => "lease_not_active",
            Refusal::SequenceGap { .. } => "sequence_gap",
            Refusal::VariantNotFound(_) => "not_found",
            Refusal::ReservationNotActive { .. } => "reservation_not_active",
            Refusal::InvalidTransition { .. } => "invalid_transition",
            Refusal::BlockAlreadyVoided(_) | Refusal::Conflict(_) => "conflict",
            Refusal::FeatureNotMetered(_) | Refusal::Invalid { .. } | Refusal::Overflow => {
                "invalid_request"
            }
            Refusal::CatchingUp { .. } => "catching_up",
            Refusal::LimitReached { .. } => "limit_reached",
            Refusal::Invariant(_) => "internal",
        }
    }
}
