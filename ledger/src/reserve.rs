//! Reservation operations (SPEC 7): hold, commit, release, extend, expire.

use crate::amount::Credits;
use crate::block::Part;
use crate::credits::metered_feature;
use crate::entry::EntryType;
use crate::event::EventKind;
use crate::id::{FeatureKey, ReservationId};
use crate::refusal::Refusal;
use crate::reservation::{
    CommitSize, HoldSize, Reservation, ReservationStatus, TTL_DEFAULT_SECS, TTL_MAX_SECS,
};
use crate::state::{Applied, Cx, EndUserState, EntryDraft, Journal, Scope};
use crate::time::{Span, Timestamp};

/// `POST /v1/reservations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    pub feature_key: FeatureKey,
    pub size: HoldSize,
    /// Defaults to 300 s; at most 7 days.
    pub ttl_secs: Option<i64>,
}

fn ttl(ttl_secs: Option<i64>) -> Result<Span, Refusal> {
    let secs = ttl_secs.unwrap_or(TTL_DEFAULT_SECS);
    if !(1..=TTL_MAX_SECS).contains(&secs) {
        return Err(Refusal::Invalid {
            field: "ttl_seconds",
            message: format!("must be 1 to {TTL_MAX_SECS} seconds"),
        });
    }
    Ok(Span::from_secs(secs)?)
}

// === impl EndUserState ===

impl EndUserState {
    /// Holds credits across blocks in burn order. Holds are binding at once: held credits
    /// are not available to anything else, and do not expire or get voided while held.
    ///
    /// # Errors
    /// `FeatureNotFound`, `FeatureNotMetered`, `Invalid` for a bad TTL or amount; the
    /// decision's access refusal (`NotInPlan`, `SubscriptionPaused`,
    /// `SubscriptionPastDue`); `InsufficientBalance` when available credits are short
    /// (whatever the overage policy: only existing credits can be held).
    pub fn reserve(
        &mut self,
        cx: &mut Cx<'_>,
        request: ReserveRequest,
    ) -> Result<Applied<Reservation>, Refusal> {
        metered_feature(cx.catalog, &request.feature_key)?;
        let ttl = ttl(request.ttl_secs)?;
        if let HoldSize::Amount(amount) = request.size
            && !amount.is_positive()
        {
            return Err(Refusal::Invalid {
                field: "amount",
                message: "must be positive".into(),
            });
        }
        self.transact(cx, |state, cx, journal| {
            let now = cx.now;
            state.require_access(cx.catalog, &request.feature_key, now)?;
            state.open_first_use_windows(cx, &request.feature_key, now, journal)?;
            let (amount, units) = match request.size {
                HoldSize::Amount(amount) => (amount, None),
                HoldSize::Units(units) => (
                    state.quote(cx.catalog, &request.feature_key, units, now)?,
                    Some(units),
                ),
            };
            let available = state.available(Some(&request.feature_key), now)?;
            if available < amount {
                return Err(Refusal::InsufficientBalance {
                    needed: amount,
                    available,
                });
            }
            let parts = state.take(Scope::Feature(&request.feature_key), amount, now, true)?;
            let reservation = Reservation {
                id: ReservationId::new(cx.ids),
                end_user_id: state.end_user_id.clone(),
                feature_key: request.feature_key.clone(),
                amount,
                units,
                parts: parts.clone(),
                status: ReservationStatus::Active,
                expires_at: now.checked_add(ttl)?,
                committed_amount: Credits::ZERO,
                released_amount: Credits::ZERO,
                created_at: now,
                resolved_at: None,
            };
            let entry = state.entry(
                cx,
                EntryType::Hold,
                now,
                EntryDraft {
                    feature_key: Some(request.feature_key.clone()),
                    amount,
                    parts,
                    units,
                    reservation_id: Some(reservation.id),
                    ..EntryDraft::default()
                },
            )?;
            journal.entries.push(entry);
            journal.events.push(state.event(
                now,
                EventKind::ReservationCreated {
                    reservation_id: reservation.id,
                    feature_key: request.feature_key.clone(),
                    amount,
                },
            ));
            state.reservations.push(reservation.clone());
            Ok(reservation)
        })
    }

    /// Commits a reservation: burns the actual cost from the hold and releases the rest.
    /// An actual above the hold charges the excess like usage (available credits, then
    /// debt), because the work was done. `Amount(0)` commits nothing and releases all.
    ///
    /// # Errors
    /// `ReservationNotFound` when it is not active here (the caller knows resolved ones);
    /// `ReservationNotActive` when it expired just now; `Invalid` for a negative amount.
    pub fn commit(
        &mut self,
        cx: &mut Cx<'_>,
        id: ReservationId,
        size: CommitSize,
    ) -> Result<Applied<Reservation>, Refusal> {
        if let CommitSize::Amount(amount) = size
            && amount.is_negative()
        {
            return Err(Refusal::Invalid {
                field: "amount",
                message: "must not be negative".into(),
            });
        }
        self.transact(cx, |state, cx, journal| {
            let now = cx.now;
            let mut reservation = state.take_active_reservation(id, journal)?;
            let (actual, units) = match size {
                CommitSize::Hold => (reservation.amount, reservation.units),
                CommitSize::Amount(amount) => (amount, None),
                CommitSize::Units(units) => (
                    state.quote(cx.catalog, &reservation.feature_key, units, now)?,
                    Some(units),
                ),
            };
            if let Some(units) = units {
                state.count_and_price(cx.catalog, &reservation.feature_key, units, now)?;
            }
            let from_hold = actual.min(reservation.amount);
            let (burned, released) = split_parts(&reservation.parts, from_hold)?;
            for part in &burned {
                let block = state
                    .block_mut(part.block_id)
                    .ok_or(Refusal::BlockNotFound(part.block_id))?;
                block.held = block.held.checked_sub(part.amount)?;
                block.burn(part.amount)?;
                state.totals.burned = state.totals.burned.checked_add(part.amount)?;
            }
            if from_hold.is_positive() {
                let entry = state.entry(
                    cx,
                    EntryType::Commit,
                    now,
                    EntryDraft {
                        feature_key: Some(reservation.feature_key.clone()),
                        amount: from_hold,
                        parts: burned,
                        units,
                        reservation_id: Some(id),
                        ..EntryDraft::default()
                    },
                )?;
                journal.entries.push(entry);
            }
            let released_amount = state.release_parts(
                cx,
                &reservation,
                &released,
                EntryType::Release,
                now,
                journal,
            )?;
            let excess = actual.checked_sub(from_hold)?;
            if excess.is_positive() {
                let feature = reservation.feature_key.clone();
                state.charge(cx, &feature, excess, None, Some(id), journal)?;
            }
            reservation.status = ReservationStatus::Committed;
            reservation.committed_amount = actual;
            reservation.released_amount = released_amount;
            reservation.resolved_at = Some(now);
            journal.events.push(state.event(
                now,
                EventKind::ReservationCommitted {
                    reservation_id: id,
                    amount: actual,
                    units,
                },
            ));
            journal.finished_reservations.push(reservation.clone());
            Ok(reservation)
        })
    }

    /// Releases everything a reservation holds.
    ///
    /// # Errors
    /// As [`EndUserState::commit`].
    pub fn release(
        &mut self,
        cx: &mut Cx<'_>,
        id: ReservationId,
    ) -> Result<Applied<Reservation>, Refusal> {
        self.transact(cx, |state, cx, journal| {
            let now = cx.now;
            let mut reservation = state.take_active_reservation(id, journal)?;
            let parts = reservation.parts.clone();
            let released =
                state.release_parts(cx, &reservation, &parts, EntryType::Release, now, journal)?;
            reservation.status = ReservationStatus::Released;
            reservation.released_amount = released;
            reservation.resolved_at = Some(now);
            journal.events.push(state.event(
                now,
                EventKind::ReservationReleased {
                    reservation_id: id,
                    amount: released,
                },
            ));
            journal.finished_reservations.push(reservation.clone());
            Ok(reservation)
        })
    }

    /// Moves an active reservation's expiry to `now + ttl_secs` (a heartbeat).
    ///
    /// # Errors
    /// As [`EndUserState::commit`], and `Invalid` for a bad TTL.
    pub fn extend(
        &mut self,
        cx: &mut Cx<'_>,
        id: ReservationId,
        ttl_secs: i64,
    ) -> Result<Applied<Reservation>, Refusal> {
        let ttl = ttl(Some(ttl_secs))?;
        self.transact(cx, |state, cx, journal| {
            let reservation = state.take_active_reservation(id, journal)?;
            let mut reservation = reservation;
            reservation.expires_at = cx.now.checked_add(ttl)?;
            state.reservations.push(reservation.clone());
            Ok(reservation)
        })
    }

    /// Expires an active reservation at its `expires_at` (due work).
    pub(crate) fn expire_reservation(
        &mut self,
        cx: &mut Cx<'_>,
        id: ReservationId,
        at: Timestamp,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let mut reservation = self.take_active_reservation(id, journal)?;
        let parts = reservation.parts.clone();
        let released =
            self.release_parts(cx, &reservation, &parts, EntryType::Expire, at, journal)?;
        reservation.status = ReservationStatus::Expired;
        reservation.released_amount = released;
        reservation.resolved_at = Some(at);
        journal.events.push(self.event(
            at,
            EventKind::ReservationExpired {
                reservation_id: id,
                amount: released,
            },
        ));
        journal.finished_reservations.push(reservation);
        Ok(())
    }

    /// Removes an active reservation from the live state to resolve it.
    fn take_active_reservation(
        &mut self,
        id: ReservationId,
        journal: &Journal,
    ) -> Result<Reservation, Refusal> {
        if let Some(position) = self
            .reservations
            .iter()
            .position(|reservation| reservation.id == id)
        {
            return Ok(self.reservations.remove(position));
        }
        match journal
            .finished_reservations
            .iter()
            .find(|reservation| reservation.id == id)
        {
            Some(finished) => Err(Refusal::ReservationNotActive {
                status: finished.status,
            }),
            None => Err(Refusal::ReservationNotFound(id)),
        }
    }

    /// Releases held `parts` of `reservation` with one entry of `entry_type` (`release`,
    /// or `expire` for a TTL). Released credits on a block that has since been voided or
    /// has expired are voided or expired at once. Returns the amount released.
    fn release_parts(
        &mut self,
        cx: &mut Cx<'_>,
        reservation: &Reservation,
        parts: &[Part],
        entry_type: EntryType,
        at: Timestamp,
        journal: &mut Journal,
    ) -> Result<Credits, Refusal> {
        let amount = Credits::sum(parts.iter().map(|part| part.amount))?;
        if !amount.is_positive() {
            return Ok(Credits::ZERO);
        }
        for part in parts {
            let block = self
                .block_mut(part.block_id)
                .ok_or(Refusal::BlockNotFound(part.block_id))?;
            block.held = block.held.checked_sub(part.amount)?;
        }
        let entry = self.entry(
            cx,
            entry_type,
            at,
            EntryDraft {
                feature_key: Some(reservation.feature_key.clone()),
                amount,
                parts: parts.to_vec(),
                reservation_id: Some(reservation.id),
                ..EntryDraft::default()
            },
        )?;
        journal.entries.push(entry);
        for part in parts {
            self.forfeit_released(cx, part, at, journal)?;
        }
        Ok(amount)
    }

    /// Released credits on a voided block are voided; on an expired block, expired.
    pub(crate) fn forfeit_released(
        &mut self,
        cx: &mut Cx<'_>,
        part: &Part,
        at: Timestamp,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let Some(block) = self.block_mut(part.block_id) else {
            return Ok(());
        };
        let amount = part.amount.min(block.unheld());
        if !amount.is_positive() {
            return Ok(());
        }
        let (entry_type, event) = if block.voided_at.is_some() {
            block.void(amount)?;
            self.totals.voided = self.totals.voided.checked_add(amount)?;
            (
                EntryType::Void,
                EventKind::CreditsVoided {
                    block_id: part.block_id,
                    amount,
                },
            )
        } else if block.is_expired(at) {
            block.expire(amount)?;
            self.totals.expired = self.totals.expired.checked_add(amount)?;
            (
                EntryType::Expire,
                EventKind::CreditsExpired {
                    block_id: part.block_id,
                    amount,
                },
            )
        } else {
            return Ok(());
        };
        let entry = self.entry(
            cx,
            entry_type,
            at,
            EntryDraft {
                amount,
                parts: vec![Part {
                    block_id: part.block_id,
                    amount,
                }],
                ..EntryDraft::default()
            },
        )?;
        journal.entries.push(entry);
        journal.events.push(self.event(at, event));
        Ok(())
    }
}

/// Splits held parts into the first `amount` (in order) and the rest.
pub(crate) fn split_parts(
    parts: &[Part],
    amount: Credits,
) -> Result<(Vec<Part>, Vec<Part>), Refusal> {
    let mut left = amount;
    let mut taken = Vec::new();
    let mut rest = Vec::new();
    for part in parts {
        let take = part.amount.min(left);
        if take.is_positive() {
            taken.push(Part {
                block_id: part.block_id,
                amount: take,
            });
            left = left.checked_sub(take)?;
        }
        let remainder = part.amount.checked_sub(take)?;
        if remainder.is_positive() {
            rest.push(Part {
                block_id: part.block_id,
                amount: remainder,
            });
        }
    }
    Ok((taken, rest))
}
