//! Due work: everything time brings (reservation TTLs, block expiry with rollover, period
//! ends, grace ends, notices, recurring windows, blocks becoming effective), done in time
//! order by one function that serves background jobs and test clocks alike.

use crate::catalog::Catalog;
use crate::id::{BlockId, ReservationId, SubscriptionId};
use crate::refusal::Refusal;
use crate::reservation::ReservationStatus;
use crate::state::{ADVANCE_STEPS_MAX, Applied, Cx, EndUserState, Journal};
use crate::subscription::SubscriptionStatus;
use crate::time::Timestamp;

/// One piece of due work. The order of the variants is the order of work due at the same
/// instant: holds are released before blocks expire, blocks expire before periods renew
/// (so rollover counts against the cap before new grants do), and new windows come last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Due {
    ReservationExpiry(ReservationId),
    BlockExpiry(BlockId),
    PeriodEnd(SubscriptionId),
    GraceEnd(SubscriptionId),
    Notice(SubscriptionId),
    Window(SubscriptionId, usize),
    BlockEffective(BlockId),
}

// === impl EndUserState ===

impl EndUserState {
    /// Does every piece of work due up to `cx.now`, in time order, and settles debt.
    /// Its entries and events carry the instants the work was due at.
    ///
    /// # Errors
    /// A refusal only on broken catalog references or overflow; nothing is changed then.
    pub fn advance(&mut self, cx: &mut Cx<'_>) -> Result<Applied<()>, Refusal> {
        self.transact(cx, |_, _, _| Ok(()))
    }

    /// The instant the next piece of work falls due, if any: what a scheduler sleeps
    /// until.
    ///
    /// # Errors
    /// A refusal on broken catalog references.
    pub fn next_due(&self, catalog: &Catalog) -> Result<Option<Timestamp>, Refusal> {
        Ok(self.next_due_item(catalog)?.map(|(at, _)| at))
    }

    pub(crate) fn advance_into(
        &mut self,
        cx: &mut Cx<'_>,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        for _ in 0..ADVANCE_STEPS_MAX {
            let Some((at, due)) = self.next_due_item(cx.catalog)? else {
                break;
            };
            if at > cx.now {
                break;
            }
            self.do_due(cx, at, due, journal)?;
            self.settle_debts(cx, at, journal)?;
            self.advanced_to = self.advanced_to.max(at);
        }
        if self
            .next_due_item(cx.catalog)?
            .is_some_and(|(at, _)| at <= cx.now)
        {
            return Err(Refusal::Invariant(format!(
                "due work did not finish in {ADVANCE_STEPS_MAX} steps"
            )));
        }
        self.advanced_to = self.advanced_to.max(cx.now);
        Ok(())
    }

    fn do_due(
        &mut self,
        cx: &mut Cx<'_>,
        at: Timestamp,
        due: Due,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        match due {
            Due::ReservationExpiry(id) => self.expire_reservation(cx, id, at, journal),
            Due::BlockExpiry(id) => self.expire_block(cx, id, at, journal),
            Due::PeriodEnd(id) => self.end_period(cx, id, at, journal),
            Due::GraceEnd(id) => self.end_grace(cx, id, at, journal),
            Due::Notice(id) => self.notify(id, at, journal),
            Due::Window(id, position) => self.issue_window(cx, id, position, at, journal),
            // Settlement runs after every piece of due work.
            Due::BlockEffective(_) => Ok(()),
        }
    }

    /// The earliest piece of due work, by instant and then by [`Due`] order.
    fn next_due_item(&self, catalog: &Catalog) -> Result<Option<(Timestamp, Due)>, Refusal> {
        let mut candidates: Vec<(Timestamp, Due)> = Vec::new();
        for reservation in &self.reservations {
            if reservation.status == ReservationStatus::Active {
                candidates.push((
                    reservation.expires_at,
                    Due::ReservationExpiry(reservation.id),
                ));
            }
        }
        for block in &self.blocks {
            if let Some(expires_at) = block.expires_at
                && block.unheld().is_positive()
                && block.voided_at.is_none()
            {
                candidates.push((expires_at, Due::BlockExpiry(block.id)));
            }
            if block.effective_at > self.advanced_to
                && block.settles_debt
                && block.voided_at.is_none()
            {
                let owed = self
                    .debt
                    .iter()
                    .any(|(feature, debt)| debt.is_positive() && block.applies_to(feature));
                if owed {
                    candidates.push((block.effective_at, Due::BlockEffective(block.id)));
                }
            }
        }
        for subscription in &self.subscriptions {
            let id = subscription.id;
            match subscription.status {
                SubscriptionStatus::Trialing | SubscriptionStatus::Active => {
                    candidates.push((subscription.current_period_end, Due::PeriodEnd(id)));
                    if let Some(at) = EndUserState::notice_due(catalog, subscription)? {
                        candidates.push((at, Due::Notice(id)));
                    }
                    for (position, schedule) in subscription.schedules.iter().enumerate() {
                        if let Some(next_at) = schedule.next_at {
                            candidates.push((next_at, Due::Window(id, position)));
                        }
                    }
                }
                SubscriptionStatus::PastDue => {
                    candidates.push((
                        EndUserState::grace_end(catalog, subscription)?,
                        Due::GraceEnd(id),
                    ));
                }
                SubscriptionStatus::Paused
                | SubscriptionStatus::Canceled
                | SubscriptionStatus::Expired => {}
            }
        }
        Ok(candidates.into_iter().min())
    }
}
