//! Domain events: what the control plane writes to the environment's event log (SPEC 11).

use crate::amount::{Credits, Units};
use crate::block::BlockSource;
use crate::id::{BlockId, EndUserId, FeatureKey, ReservationId, SubscriptionId, VariantId};
use crate::subscription::SubscriptionStatus;
use crate::time::Timestamp;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at: Timestamp,
    pub end_user_id: EndUserId,
    pub kind: EventKind,
}

/// One feature's usage in an ended period, reported with `subscription.renewed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodUsage {
    pub feature_key: FeatureKey,
    pub units: u64,
    pub cost: Credits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    CreditsGranted {
        block_id: BlockId,
        amount: Credits,
        source: BlockSource,
    },
    CreditsExpired {
        block_id: BlockId,
        amount: Credits,
    },
    CreditsVoided {
        block_id: BlockId,
        amount: Credits,
    },
    /// Available credits (over every usable block) fell below the threshold.
    CreditsLow {
        available: Credits,
        threshold: Credits,
    },
    /// Available credits fell to zero.
    CreditsDepleted,
    ReservationCreated {
        reservation_id: ReservationId,
        feature_key: FeatureKey,
        amount: Credits,
    },
    ReservationCommitted {
        reservation_id: ReservationId,
        amount: Credits,
        units: Option<Units>,
    },
    ReservationReleased {
        reservation_id: ReservationId,
        amount: Credits,
    },
    ReservationExpired {
        reservation_id: ReservationId,
        amount: Credits,
    },
    /// A lease reached its TTL: the rest of its hold (`released`) went back. Its holder
    /// stopped reporting (a crashed or cut-off proxy).
    LeaseExpired {
        lease_id: crate::id::LeaseId,
        feature_key: crate::id::FeatureKey,
        holder: crate::id::Holder,
        released: Credits,
    },
    Subscription {
        subscription_id: SubscriptionId,
        status: SubscriptionStatus,
        change: SubscriptionChange,
    },
}

/// What happened to a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionChange {
    Created,
    TrialEnding {
        trial_end: Timestamp,
    },
    RenewalDue {
        period_end: Timestamp,
    },
    Renewed {
        period_start: Timestamp,
        period_end: Timestamp,
        usage: Vec<PeriodUsage>,
    },
    PastDue,
    Paused,
    Resumed,
    Changed {
        from_variant_id: VariantId,
        to_variant_id: VariantId,
    },
    Canceled,
    Expired,
}

impl EventKind {
    /// The event type on the wire (`credits.granted`, `subscription.renewed`, …).
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::CreditsGranted { .. } => "credits.granted",
            EventKind::CreditsExpired { .. } => "credits.expired",
            EventKind::CreditsVoided { .. } => "credits.voided",
            EventKind::CreditsLow { .. } => "credits.low",
            EventKind::CreditsDepleted => "credits.depleted",
            EventKind::ReservationCreated { .. } => "reservation.created",
            EventKind::ReservationCommitted { .. } => "reservation.committed",
            EventKind::ReservationReleased { .. } => "reservation.released",
            EventKind::ReservationExpired { .. } => "reservation.expired",
            EventKind::LeaseExpired { .. } => "lease.expired",
            EventKind::Subscription { change, .. } => match change {
                SubscriptionChange::Created => "subscription.created",
                SubscriptionChange::TrialEnding { .. } => "subscription.trial_ending",
                SubscriptionChange::RenewalDue { .. } => "subscription.renewal_due",
                SubscriptionChange::Renewed { .. } => "subscription.renewed",
                SubscriptionChange::PastDue => "subscription.past_due",
                SubscriptionChange::Paused => "subscription.paused",
                SubscriptionChange::Resumed => "subscription.resumed",
                SubscriptionChange::Changed { .. } => "subscription.changed",
                SubscriptionChange::Canceled => "subscription.canceled",
                SubscriptionChange::Expired => "subscription.expired",
            },
        }
    }
}
