//! Leases (SPEC 12.1): credits held for one proxy (the lease's `holder`) on one end user's
//! feature, spent in several sequence-numbered reports, topped up and extended as the
//! proxy goes, released at the end or expired at `expires_at`.
//!
//! A lease is a reservation spent in parts: its hold sits on blocks in burn order like a
//! reservation's, a report debits its cost from the hold through those parts (burn order
//! unchanged), and whatever a report costs beyond the hold, or after the lease ended, is
//! charged like usage (available credits, then debt): the work was done. Reports are
//! exactly-once by sequence. An ended lease stays in the live state for
//! [`LEASE_KEPT_SECS`] so that a cut-off proxy's late reports still find it.

use std::fmt;

use crate::amount::Credits;
use crate::block::Part;
use crate::credits::metered_feature;
use crate::entry::EntryType;
use crate::event::EventKind;
use crate::id::{FeatureKey, Holder, LeaseId};
use crate::refusal::Refusal;
use crate::state::{Applied, Cx, EndUserState, EntryDraft, Journal, Scope};
use crate::time::{Span, Timestamp};

/// The longest a lease lives without a report that extends it (like a reservation).
pub const LEASE_TTL_MAX_SECS: i64 = 7 * 24 * 3600;
/// How long an ended (expired or released) lease stays in the live state: its late
/// reports are still charged, once each. Later ones find no lease.
pub const LEASE_KEPT_SECS: i64 = 3600;
/// The most leases (active or kept) one end user may have: every decision walks them.
pub const LEASES_PER_END_USER_MAX: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum LeaseStatus {
    Active,
    /// The hold went back at `expires_at`; reports are still taken (charged as usage).
    Expired,
    /// The holder released it; reports after that are refused as replays or gaps.
    Released,
}

impl LeaseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseStatus::Active => "active",
            LeaseStatus::Expired => "expired",
            LeaseStatus::Released => "released",
        }
    }
}

impl fmt::Display for LeaseStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Lease {
    pub id: LeaseId,
    pub end_user_id: crate::id::EndUserId,
    pub feature_key: FeatureKey,
    pub holder: Holder,
    /// Credits held now: the sum of `parts`.
    pub held: Credits,
    /// Where the hold sits, in burn order at the time each part was taken.
    pub parts: Vec<Part>,
    pub status: LeaseStatus,
    pub expires_at: Timestamp,
    /// The last report's sequence (0 before the first).
    pub sequence: u64,
    /// Credits ever held: the first hold and every top-up.
    pub granted: Credits,
    /// Credits the reports said were spent (from the hold, or beyond it).
    pub spent: Credits,
    /// Units and requests the reports counted.
    pub units: u64,
    pub requests: u64,
    pub created_at: Timestamp,
    pub ended_at: Option<Timestamp>,
    /// The holder's name for the request that created it: a creation repeating it (the
    /// holder lost the answer) finds this lease instead of holding more.
    #[cfg_attr(feature = "serde", serde(default))]
    pub request_id: Option<String>,
}

/// `POST /v1/leases`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    pub feature_key: FeatureKey,
    pub holder: Holder,
    /// What the holder would like held; as much of it as is available is held.
    pub amount: Credits,
    pub ttl_secs: i64,
    /// Makes the creation idempotent per holder: a lease of this holder created with the
    /// same id (active or kept) is answered instead (checked by the caller's protocol
    /// layer: `[A-Za-z0-9_.:-]{1,128}`).
    pub request_id: Option<String>,
}

/// One report of what a lease's holder spent since its last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseReport {
    /// 1 for the first report, then one more each time.
    pub sequence: u64,
    /// Units used, counted toward the period's usage (tiers, renewal summaries).
    pub units: u64,
    /// Credits charged for them (the sum of the per-request costs, priced by the engine
    /// the holder runs).
    pub cost: Credits,
    pub requests: u64,
    /// Hold this much more (as much of it as is available).
    pub top_up: Option<Credits>,
    /// Extend the lease to `now + ttl`.
    pub ttl_secs: Option<i64>,
}

/// What a report came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseReported {
    pub lease: Lease,
    /// The report's sequence was taken before: nothing changed.
    pub replayed: bool,
    /// The part of the cost the hold did not cover (charged like usage).
    pub beyond_hold: Credits,
    /// What a top-up added to the hold.
    pub topped_up: Credits,
}

fn lease_ttl(ttl_secs: i64) -> Result<Span, Refusal> {
    if !(1..=LEASE_TTL_MAX_SECS).contains(&ttl_secs) {
        return Err(Refusal::Invalid {
            field: "ttl_seconds",
            message: format!("must be 1 to {LEASE_TTL_MAX_SECS} seconds"),
        });
    }
    Ok(Span::from_secs(ttl_secs)?)
}

impl LeaseReport {
    /// The report's own values are in range (the checks every report passes before its
    /// lease is looked at).
    ///
    /// # Errors
    /// `Refusal::Invalid` naming the field.
    pub fn check(&self) -> Result<(), Refusal> {
        check_report(self)
    }
}

fn check_report(report: &LeaseReport) -> Result<(), Refusal> {
    if report.sequence == 0 {
        return Err(Refusal::Invalid {
            field: "sequence",
            message: "starts at 1".into(),
        });
    }
    if report.cost.is_negative() {
        return Err(Refusal::Invalid {
            field: "cost",
            message: "must not be negative".into(),
        });
    }
    if report.top_up.is_some_and(|top_up| !top_up.is_positive()) {
        return Err(Refusal::Invalid {
            field: "top_up",
            message: "must be positive".into(),
        });
    }
    if let Some(ttl_secs) = report.ttl_secs {
        lease_ttl(ttl_secs)?;
    }
    if report.units > crate::amount::UNITS_MAX {
        return Err(Refusal::Invalid {
            field: "units",
            message: format!("must be at most {}", crate::amount::UNITS_MAX),
        });
    }
    Ok(())
}

// === impl EndUserState ===

impl EndUserState {
    /// Leases of this end user: active ones and ended ones still kept.
    pub fn leases(&self) -> &[Lease] {
        &self.leases
    }

    pub fn lease(&self, id: LeaseId) -> Option<&Lease> {
        self.leases.iter().find(|lease| lease.id == id)
    }

    /// Holds credits for `holder`: as much of `amount` as is available for the feature,
    /// never nothing.
    ///
    /// # Errors
    /// `FeatureNotFound`, `FeatureNotMetered`, `Invalid` (amount, TTL); the decision's
    /// access refusal (`NotInPlan`, `SubscriptionPaused`, `SubscriptionPastDue`);
    /// `InsufficientBalance` when nothing is available; `LimitReached` past
    /// [`LEASES_PER_END_USER_MAX`]; `Invalid` (`request_id`) when the holder used the
    /// request id for a lease of another feature.
    ///
    /// A request id the holder used before answers that lease as it stands, changing
    /// nothing (no entry: the answer tells a repeat by that).
    pub fn take_lease(
        &mut self,
        cx: &mut Cx<'_>,
        request: LeaseRequest,
    ) -> Result<Applied<Lease>, Refusal> {
        metered_feature(cx.catalog, &request.feature_key)?;
        let ttl = lease_ttl(request.ttl_secs)?;
        if !request.amount.is_positive() {
            return Err(Refusal::Invalid {
                field: "amount",
                message: "must be positive".into(),
            });
        }
        if let Some(request_id) = &request.request_id
            && let Some(earlier) = self.leases.iter().find(|lease| {
                lease.holder == request.holder && lease.request_id.as_ref() == Some(request_id)
            })
        {
            if earlier.feature_key != request.feature_key {
                return Err(Refusal::Invalid {
                    field: "request_id",
                    message: format!(
                        "was used by this holder for lease {} of another feature",
                        earlier.id
                    ),
                });
            }
            return Ok(Applied::unchanged(earlier.clone()));
        }
        self.transact(cx, |state, cx, journal| {
            let now = cx.now;
            if state.leases.len() >= LEASES_PER_END_USER_MAX {
                return Err(Refusal::LimitReached {
                    what: "leases per end user",
                    limit: LEASES_PER_END_USER_MAX,
                });
            }
            state.require_access(cx.catalog, &request.feature_key, now)?;
            state.open_first_use_windows(cx, &request.feature_key, now, journal)?;
            let available = state.available(Some(&request.feature_key), now)?;
            let amount = request.amount.min(available);
            if !amount.is_positive() {
                return Err(Refusal::InsufficientBalance {
                    needed: request.amount,
                    available,
                });
            }
            let id = LeaseId::new(cx.ids);
            let parts = state.take(Scope::Feature(&request.feature_key), amount, now, true)?;
            state.lease_entry(
                cx,
                (EntryType::Hold, now),
                id,
                (&request.feature_key, amount, parts.clone()),
                None,
                journal,
            )?;
            let lease = Lease {
                id,
                end_user_id: state.end_user_id.clone(),
                feature_key: request.feature_key.clone(),
                holder: request.holder.clone(),
                held: amount,
                parts,
                status: LeaseStatus::Active,
                expires_at: now.checked_add(ttl)?,
                sequence: 0,
                granted: amount,
                spent: Credits::ZERO,
                units: 0,
                requests: 0,
                created_at: now,
                ended_at: None,
                request_id: request.request_id.clone(),
            };
            state.leases.push(lease.clone());
            Ok(lease)
        })
    }

    /// Records what the lease's holder spent since its last report: `cost` is debited
    /// from the hold (burn order unchanged; beyond it, or once the lease ended, it is
    /// charged like usage), `units` count toward the period's usage, a `top_up` holds
    /// more and `ttl_secs` extends the lease. A sequence taken before changes nothing and
    /// answers the lease as it stands (`replayed`).
    ///
    /// # Errors
    /// `LeaseNotFound`; `SequenceGap` when the sequence is not the next one; `Invalid`
    /// for a bad report; `LeaseNotActive` for a top-up or extension of an ended lease.
    pub fn report_lease(
        &mut self,
        cx: &mut Cx<'_>,
        id: LeaseId,
        report: LeaseReport,
    ) -> Result<Applied<LeaseReported>, Refusal> {
        check_report(&report)?;
        if let Some(replayed) = self.replayed(id, report.sequence)? {
            return Ok(replayed);
        }
        self.transact(cx, |state, cx, journal| {
            state.apply_report(cx, id, &report, journal)
        })
    }

    /// A final report, then the rest of the hold goes back.
    ///
    /// # Errors
    /// As [`EndUserState::report_lease`].
    pub fn release_lease(
        &mut self,
        cx: &mut Cx<'_>,
        id: LeaseId,
        report: LeaseReport,
    ) -> Result<Applied<LeaseReported>, Refusal> {
        check_report(&report)?;
        if report.top_up.is_some() || report.ttl_secs.is_some() {
            return Err(Refusal::Invalid {
                field: "top_up",
                message: "a release takes no top-up or extension".into(),
            });
        }
        if let Some(replayed) = self.replayed(id, report.sequence)? {
            return Ok(replayed);
        }
        self.transact(cx, |state, cx, journal| {
            let mut reported = state.apply_report(cx, id, &report, journal)?;
            let position = state.lease_index(id)?;
            if state.leases[position].status == LeaseStatus::Active {
                state.end_lease(cx, position, LeaseStatus::Released, cx.now, journal)?;
            }
            reported.lease = state.leases[position].clone();
            Ok(reported)
        })
    }

    /// `Some` answer when `sequence` was taken before (a repeat changes nothing).
    fn replayed(
        &self,
        id: LeaseId,
        sequence: u64,
    ) -> Result<Option<Applied<LeaseReported>>, Refusal> {
        let lease = self.lease(id).ok_or(Refusal::LeaseNotFound(id))?;
        if sequence > lease.sequence {
            return Ok(None);
        }
        Ok(Some(Applied::unchanged(LeaseReported {
            lease: lease.clone(),
            replayed: true,
            beyond_hold: Credits::ZERO,
            topped_up: Credits::ZERO,
        })))
    }

    fn lease_index(&self, id: LeaseId) -> Result<usize, Refusal> {
        self.leases
            .iter()
            .position(|lease| lease.id == id)
            .ok_or(Refusal::LeaseNotFound(id))
    }

    fn apply_report(
        &mut self,
        cx: &mut Cx<'_>,
        id: LeaseId,
        report: &LeaseReport,
        journal: &mut Journal,
    ) -> Result<LeaseReported, Refusal> {
        let now = cx.now;
        let position = self.lease_index(id)?;
        let lease = &self.leases[position];
        let expected = lease.sequence.saturating_add(1);
        if report.sequence != expected {
            return Err(Refusal::SequenceGap { expected });
        }
        let active = lease.status == LeaseStatus::Active;
        if !active && (report.top_up.is_some() || report.ttl_secs.is_some()) {
            return Err(Refusal::LeaseNotActive {
                status: lease.status,
            });
        }
        let feature = lease.feature_key.clone();
        let units = crate::amount::Units::new(report.units);
        if let Some(units) = units {
            self.count_reported(cx.catalog, &feature, units, report.cost, now)?;
        }
        // The cost from the hold, through its parts in order.
        let from_hold = if active {
            report.cost.min(self.leases[position].held)
        } else {
            Credits::ZERO
        };
        if from_hold.is_positive() {
            let (burned, rest) =
                crate::reserve::split_parts(&self.leases[position].parts, from_hold)?;
            for part in &burned {
                let block = self
                    .block_mut(part.block_id)
                    .ok_or(Refusal::BlockNotFound(part.block_id))?;
                block.held = block.held.checked_sub(part.amount)?;
                block.burn(part.amount)?;
                self.totals.burned = self.totals.burned.checked_add(part.amount)?;
            }
            let lease = &mut self.leases[position];
            lease.parts = rest;
            lease.held = lease.held.checked_sub(from_hold)?;
            self.lease_entry(
                cx,
                (EntryType::Commit, now),
                id,
                (&feature, from_hold, burned),
                units,
                journal,
            )?;
        }
        let beyond_hold = report.cost.checked_sub(from_hold)?;
        if beyond_hold.is_positive() {
            self.charge_lease(
                cx,
                id,
                &feature,
                beyond_hold,
                units.filter(|_| !from_hold.is_positive()),
                journal,
            )?;
        }
        let mut topped_up = Credits::ZERO;
        if let Some(top_up) = report.top_up {
            let available = self.available(Some(&feature), now)?;
            topped_up = top_up.min(available);
            if topped_up.is_positive() {
                let parts = self.take(Scope::Feature(&feature), topped_up, now, true)?;
                self.lease_entry(
                    cx,
                    (EntryType::Hold, now),
                    id,
                    (&feature, topped_up, parts.clone()),
                    None,
                    journal,
                )?;
                let lease = &mut self.leases[position];
                lease.parts.extend(parts);
                lease.held = lease.held.checked_add(topped_up)?;
                lease.granted = lease.granted.checked_add(topped_up)?;
            }
        }
        let lease = &mut self.leases[position];
        if let Some(ttl_secs) = report.ttl_secs {
            lease.expires_at = now.checked_add(lease_ttl(ttl_secs)?)?;
        }
        lease.sequence = report.sequence;
        lease.spent = lease.spent.checked_add(report.cost)?;
        lease.units = lease
            .units
            .checked_add(report.units)
            .ok_or(Refusal::Overflow)?;
        lease.requests = lease
            .requests
            .checked_add(report.requests)
            .ok_or(Refusal::Overflow)?;
        Ok(LeaseReported {
            lease: lease.clone(),
            replayed: false,
            beyond_hold,
            topped_up,
        })
    }

    /// Charges what a report cost beyond its lease's hold like usage, naming the lease.
    fn charge_lease(
        &mut self,
        cx: &mut Cx<'_>,
        id: LeaseId,
        feature: &FeatureKey,
        cost: Credits,
        units: Option<crate::amount::Units>,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        self.charge(cx, feature, cost, units, None, journal)?;
        if let Some(entry) = journal.entries.last_mut() {
            entry.lease_id = Some(id);
        }
        Ok(())
    }

    /// Ends an active lease: the rest of its hold goes back (`release`, or `expire` at
    /// its TTL), and it stays kept for late reports.
    pub(crate) fn end_lease(
        &mut self,
        cx: &mut Cx<'_>,
        position: usize,
        status: LeaseStatus,
        at: Timestamp,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let lease = &self.leases[position];
        let (id, feature, parts) = (lease.id, lease.feature_key.clone(), lease.parts.clone());
        let amount = Credits::sum(parts.iter().map(|part| part.amount))?;
        for part in &parts {
            let block = self
                .block_mut(part.block_id)
                .ok_or(Refusal::BlockNotFound(part.block_id))?;
            block.held = block.held.checked_sub(part.amount)?;
        }
        let entry_type = if status == LeaseStatus::Expired {
            EntryType::Expire
        } else {
            EntryType::Release
        };
        if amount.is_positive() {
            self.lease_entry(
                cx,
                (entry_type, at),
                id,
                (&feature, amount, parts.clone()),
                None,
                journal,
            )?;
        }
        for part in &parts {
            self.forfeit_released(cx, part, at, journal)?;
        }
        let lease = &mut self.leases[position];
        lease.parts.clear();
        lease.held = Credits::ZERO;
        lease.status = status;
        lease.ended_at = Some(at);
        if status == LeaseStatus::Expired {
            journal.events.push(self.event(
                at,
                EventKind::LeaseExpired {
                    lease_id: id,
                    feature_key: feature,
                    holder: self.leases[position].holder.clone(),
                    released: amount,
                },
            ));
        }
        Ok(())
    }

    /// Due work: an active lease reaches its `expires_at`.
    pub(crate) fn expire_lease(
        &mut self,
        cx: &mut Cx<'_>,
        id: LeaseId,
        at: Timestamp,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let position = self.lease_index(id)?;
        self.end_lease(cx, position, LeaseStatus::Expired, at, journal)
    }

    /// Due work: an ended lease has been kept long enough; it leaves the live state.
    pub(crate) fn forget_lease(
        &mut self,
        id: LeaseId,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let position = self.lease_index(id)?;
        let lease = self.leases.remove(position);
        journal.finished_leases.push(lease);
        Ok(())
    }

    /// When a kept lease is forgotten.
    pub(crate) fn lease_forget_at(lease: &Lease) -> Result<Option<Timestamp>, Refusal> {
        match lease.ended_at {
            Some(ended_at) => Ok(Some(
                ended_at.checked_add(Span::from_secs(LEASE_KEPT_SECS)?)?,
            )),
            None => Ok(None),
        }
    }

    /// Writes one entry about lease `id` at `at`.
    fn lease_entry(
        &mut self,
        cx: &mut Cx<'_>,
        (entry_type, at): (EntryType, Timestamp),
        id: LeaseId,
        (feature, amount, parts): (&FeatureKey, Credits, Vec<Part>),
        units: Option<crate::amount::Units>,
        journal: &mut Journal,
    ) -> Result<(), Refusal> {
        let mut entry = self.entry(
            cx,
            entry_type,
            at,
            EntryDraft {
                feature_key: Some(feature.clone()),
                amount,
                parts,
                units,
                ..EntryDraft::default()
            },
        )?;
        entry.lease_id = Some(id);
        journal.entries.push(entry);
        Ok(())
    }
}
