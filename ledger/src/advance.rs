//! Due work: everything time brings (reservation TTLs, block expiry with rollover, period
//! ends, grace ends, notices, recurring windows, blocks becoming effective), done in time
//! order by one function that serves background jobs and test clocks alike.

use crate::catalog::Catalog;
use crate::id::{BlockId, LeaseId, ReservationId, SubscriptionId};
use crate::refusal::Refusal;
use crate::reservation::ReservationStatus;
use crate::state::{Applied, Cx, EndUserState, Journal};
use crate::subscription::SubscriptionStatus;
use crate::time::Timestamp;

/// One piece of due work. The order of the variants is the order of work due at the same
/// instant: holds are released before blocks expire, blocks expire before periods renew
/// (so rollover counts against the cap before new grants do), and new windows come last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Due {
    ReservationExpiry(ReservationId),
    LeaseExpiry(LeaseId),
    BlockExpiry(BlockId),
    PeriodEnd(SubscriptionId),
    GraceEnd(SubscriptionId),
    Notice(SubscriptionId),
    Window(SubscriptionId, usize),
    BlockEffective(BlockId),
    LeaseForget(LeaseId),
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

    /// Does the due work up to `cx.now` in at most `steps_max` steps; an end user with
    /// more waiting is refused with `CatchingUp` (the caller's copy is then dropped).
    pub(crate) fn advance_into(
        &mut self,
        cx: &mut Cx<'_>,
        journal: &mut Journal,
        steps_max: usize,
    ) -> Result<(), Refusal> {
        if let Some(due_since) = self.run_due_steps(cx, journal, steps_max)? {
            return Err(Refusal::CatchingUp {
                steps_max,
                due_since,
            });
        }
        self.advanced_to = self.advanced_to.max(cx.now);
        Ok(())
    }

    /// Runs at most `steps_max` pieces of work due by `cx.now`, in time order. Returns the
    /// instant of the first piece still due, if any is left.
    fn run_due_steps(
        &mut self,
        cx: &mut Cx<'_>,
        journal: &mut Journal,
        steps_max: usize,
    ) -> Result<Option<Timestamp>, Refusal> {
        for _ in 0..steps_max {
            let Some((at, due)) = self.next_due_item(cx.catalog)? else {
                return Ok(None);
            };
            if at > cx.now {
                return Ok(None);
            }
            self.do_due(cx, at, due, journal)?;
            self.settle_debts(cx, at, journal)?;
            self.advanced_to = self.advanced_to.max(at);
        }
        Ok(self
            .next_due_item(cx.catalog)?
            .map(|(at, _)| at)
            .filter(|at| *at <= cx.now))
    }

    /// Like [`EndUserState::advance`], but runs at most about `steps_max` pieces of due
    /// work: an end user further behind is advanced to just before the first piece left
    /// over (as if the scheduler had run then), and the answer's value is `false`; call
    /// again to go on. `true` when the state is caught up to `cx.now`. Pieces due at one
    /// instant are never split, so a chunk may run a few more than `steps_max`.
    ///
    /// # Errors
    /// As [`EndUserState::advance`].
    pub fn advance_bounded(
        &mut self,
        cx: &mut Cx<'_>,
        steps_max: usize,
    ) -> Result<Applied<bool>, Refusal> {
        // Find where the chunk ends on a copy; the real run then stops there.
        let mut probe = self.clone();
        let mut probe_ids = crate::id::SequentialIds::default();
        let mut probe_cx = Cx {
            now: cx.now,
            catalog: cx.catalog,
            ids: &mut probe_ids,
        };
        let left = probe.run_due_steps(&mut probe_cx, &mut Journal::default(), steps_max)?;
        drop(probe);
        let Some(left_at) = left else {
            return Ok(self.advance(cx)?.map(|()| true));
        };
        // Everything due strictly before `left_at` runs now; at least the first piece
        // is strictly before it unless all of the chunk fell due at one instant, which
        // then runs whole.
        let cutoff = left_at
            .checked_sub(crate::time::Span::from_millis(1))
            .ok()
            .filter(|cutoff| {
                self.next_due_item(cx.catalog)
                    .ok()
                    .flatten()
                    .is_some_and(|(first, _)| first <= *cutoff)
            })
            .unwrap_or(left_at);
        let now = cx.now;
        cx.now = cutoff;
        let applied = self.transact(cx, |_, _, _| Ok(()));
        cx.now = now;
        Ok(applied?.map(|()| cutoff >= now))
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
            Due::LeaseExpiry(id) => self.expire_lease(cx, id, at, journal),
            Due::LeaseForget(id) => self.forget_lease(id, journal),
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
        // The least so far (no list: a decision asks this on every request).
        let mut candidates = Least(None);
        for reservation in &self.reservations {
            if reservation.status == ReservationStatus::Active {
                candidates.push((
                    reservation.expires_at,
                    Due::ReservationExpiry(reservation.id),
                ));
            }
        }
        for lease in &self.leases {
            if lease.status == crate::lease::LeaseStatus::Active {
                candidates.push((lease.expires_at, Due::LeaseExpiry(lease.id)));
            } else if let Some(at) = EndUserState::lease_forget_at(lease)? {
                candidates.push((at, Due::LeaseForget(lease.id)));
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
        Ok(candidates.0)
    }
}

/// The least `(instant, due work)` pushed.
struct Least(Option<(Timestamp, Due)>);

impl Least {
    fn push(&mut self, candidate: (Timestamp, Due)) {
        if self.0.as_ref().is_none_or(|least| candidate < *least) {
            self.0 = Some(candidate);
        }
    }
}
