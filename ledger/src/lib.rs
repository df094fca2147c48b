//! `ledger`: QuotaStack's pure billing engine.
//!
//! Every billing rule of the product lives here and nowhere else: blocks and the burn
//! order, debits and debt, grants, voids and adjustments, reservations, pricing, the
//! entitlement decision, recurring grants with rollover and caps, and the subscription
//! state machine. The control plane runs it against its store; the proxy runs the same
//! code against its replica, so the two can disagree only on how fresh their state is.
//!
//! # Invariants this crate owns
//!
//! - **No I/O, no clock, no randomness.** Every operation takes `now` (in [`Cx`]) and an
//!   [`IdSource`]; nothing here reads the system clock, touches a file or socket, or
//!   spawns a thread. A test (`tests/it/dependencies.rs`) fails if an I/O crate sneaks
//!   into the dependency tree.
//! - **Money is integers with checked arithmetic.** [`Credits`] wraps `i64`; every sum and
//!   difference is checked and an overflow is a refusal, never a wrap. No floats, no `as`
//!   casts (enforced by the lints below).
//! - **A refusal changes nothing.** Operations run on a copy of the [`EndUserState`] and
//!   replace it only when everything went through ([`EndUserState::transact`]).
//! - **SPEC 3.4 holds after every operation**: `0 <= held <= remaining <= amount` per
//!   block; granted = burned + expired + voided + remaining per block and per end user;
//!   replaying the entries reproduces the blocks; balances are never negative.
//!   [`EndUserState::check_invariants`] runs at the end of every operation and when a
//!   state is loaded from storage ([`EndUserState::from_parts`]).
//! - **Due work is a function of `now`.** [`EndUserState::advance`] does everything due up
//!   to `now` in time order, so background jobs and test clocks share one code path, and
//!   every operation catches up first.

#![deny(
    clippy::arithmetic_side_effects,
    clippy::as_conversions,
    clippy::float_arithmetic
)]

mod advance;
mod amount;
mod block;
mod catalog;
mod credits;
mod decide;
mod entry;
mod event;
mod id;
mod lease;
mod lifecycle;
mod pricing;
mod recurring;
mod refusal;
mod replay;
mod reservation;
mod reserve;
mod state;
mod subscription;
mod time;

pub use amount::{Credits, Overflow, UNITS_MAX, Units};
pub use block::{Block, BlockSource, Part, TemplateRef, burn_order};
pub use catalog::{
    BillingMode, Catalog, ExpireAfter, Feature, FeatureType, GrantAnchor, GrantEvery,
    GrantTemplate, InvalidCatalog, OveragePolicy, PRIORITY_DEFAULT, PRIORITY_MAX, Plan, PlanKind,
    Price, Pricing, Rollover, Settings, TEMPLATE_EVERY_MIN_SECS, TEMPLATES_PER_VARIANT_MAX, Tier,
    TierMode, Variant,
};
pub use credits::{
    AdjustRequest, BLOCKS_PER_END_USER_MAX, GrantRequest, UsageOutcome, UsageRequest,
};
pub use decide::{Decision, DenyReason};
pub use entry::{Entry, EntryType};
pub use event::{Event, EventKind, PeriodUsage, SubscriptionChange};
pub use id::{
    BlockId, EndUserId, EntryId, EventId, FeatureKey, Holder, IdSource, InvalidName, LeaseId,
    PlanId, ReservationId, SequentialIds, SubscriptionId, VariantId,
};
pub use lease::{
    LEASE_KEPT_SECS, LEASE_TTL_MAX_SECS, LEASES_PER_END_USER_MAX, Lease, LeaseReport,
    LeaseReported, LeaseRequest, LeaseStatus,
};
pub use lifecycle::{CancelAt, ChangeAt, SubscribeRequest, TRIAL_ENDING_NOTICE_DAYS, is_upgrade};
pub use pricing::cost;
pub use refusal::Refusal;
pub use replay::{ReplayError, Replayed, replay};
pub use reservation::{
    CommitSize, HoldSize, Reservation, ReservationStatus, TTL_DEFAULT_SECS, TTL_MAX_SECS,
};
pub use reserve::ReserveRequest;
pub use state::{
    ADVANCE_STEPS_MAX, Applied, Cx, EndUserState, InvariantViolation, OPERATION_STEPS_MAX,
    StateParts, Totals, UsageCounter,
};
pub use subscription::{
    GrantSchedule, PendingChange, PeriodTally, Subscription, SubscriptionStatus,
};
pub use time::{Interval, IntervalUnit, Span, Timestamp};

pub use ulid::Ulid;
