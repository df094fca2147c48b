//! Local spend: credits this proxy admitted that its replica does not show yet. Subtracted
//! from every decision for the end user, so one proxy never admits more than the balance
//! it knows of (SPEC 12).
//!
//! An admitted cost is *unconfirmed* until the control plane acknowledges it, then
//! *confirmed at version v* until the replica holds the end user's state at version `v`
//! or later (that state includes it). Usage results and reservation answers name that
//! version; an acknowledgement without one (an answer stored by an older control plane)
//! waits for any newer state than the one held at acknowledgement. A
//! confirmed cost the stream has not shown [`CONFIRMED_TTL`] after it was acknowledged,
//! while the stream kept talking (heartbeats), is dropped: the stream delivers in
//! milliseconds, so it is not coming. While the stream is silent nothing is dropped.
//!
//! Pending is kept per end user, not per feature: a cost is subtracted from every feature's
//! balance (credits can be shared between features), which errs on the side of refusing
//! for the moment until the replica catches up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ledger::{Credits, EndUserId};
use protocol::clock::{Clock, SystemClock};

/// The longest a confirmed cost waits for the replica.
pub const CONFIRMED_TTL: Duration = Duration::from_secs(5);

const SHARDS: usize = 64;

fn ttl_ms() -> i64 {
    i64::try_from(CONFIRMED_TTL.as_millis()).unwrap_or(i64::MAX)
}

#[derive(Debug, Default, Clone)]
struct UserPending {
    unconfirmed: Credits,
    /// (state version that includes it, cost, confirmed at in wall-clock ms).
    confirmed: Vec<(u64, Credits, i64)>,
}

impl UserPending {
    fn total(&self) -> Credits {
        let confirmed =
            Credits::sum(self.confirmed.iter().map(|(_, cost, _)| *cost)).unwrap_or(Credits::MAX);
        self.unconfirmed
            .checked_add(confirmed)
            .unwrap_or(Credits::MAX)
    }

    fn is_empty(&self) -> bool {
        self.unconfirmed.is_zero() && self.confirmed.is_empty()
    }
}

/// Pending spend of every end user, sharded to keep lock hold times tiny.
#[derive(Debug)]
pub struct Pending {
    shards: Vec<Mutex<HashMap<EndUserId, UserPending>>>,
    /// The proxy's clock (wall time of acknowledgements; the replica reads it too).
    clock: Arc<dyn Clock>,
}

impl Default for Pending {
    fn default() -> Pending {
        Pending::new(Arc::new(SystemClock))
    }
}

fn shard_of(end_user: &EndUserId) -> usize {
    use std::hash::BuildHasher;
    // A fixed hasher: shards only spread locks; nothing here is attacker-sensitive.
    let hash =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one(end_user);
    usize::try_from(hash % 64).unwrap_or(0)
}

impl Pending {
    pub fn new(clock: Arc<dyn Clock>) -> Pending {
        Pending {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            clock,
        }
    }

    /// The proxy's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    fn wall_ms(&self) -> i64 {
        self.clock.now().as_millis()
    }

    fn with<T>(
        &self,
        end_user: &EndUserId,
        f: impl FnOnce(&mut HashMap<EndUserId, UserPending>) -> T,
    ) -> T {
        let shard = &self.shards[shard_of(end_user) % self.shards.len()];
        let mut guard = shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    /// The end user's pending total.
    pub fn total(&self, end_user: &EndUserId) -> Credits {
        self.with(end_user, |map| {
            map.get(end_user).map_or(Credits::ZERO, UserPending::total)
        })
    }

    /// Decides under the end user's lock and adds the cost when `admit` says so, so two
    /// concurrent requests cannot both spend the same credits.
    pub fn admit<T>(
        &self,
        end_user: &EndUserId,
        decide: impl FnOnce(Credits) -> (T, Option<Credits>),
    ) -> T {
        self.with(end_user, |map| {
            let current = map.get(end_user).map_or(Credits::ZERO, UserPending::total);
            let (answer, cost) = decide(current);
            if let Some(cost) = cost.filter(|cost| cost.is_positive()) {
                let entry = map.entry(end_user.clone()).or_default();
                entry.unconfirmed = entry.unconfirmed.checked_add(cost).unwrap_or(Credits::MAX);
            }
            answer
        })
    }

    /// Adds an unconfirmed cost (outbox records found at start-up).
    pub fn add(&self, end_user: &EndUserId, cost: Credits) {
        self.admit(end_user, |_| ((), Some(cost)));
    }

    /// [`Pending::admit`] for a request: the cost added is held by a [`PendingSpend`],
    /// given back when the request drops it unrecorded.
    pub fn admit_spend<T>(
        self: &Arc<Self>,
        end_user: &EndUserId,
        decide: impl FnOnce(Credits) -> (T, Option<Credits>),
    ) -> (T, PendingSpend) {
        let mut added = Credits::ZERO;
        let answer = self.admit(end_user, |current| {
            let (answer, cost) = decide(current);
            added = cost
                .filter(|cost| cost.is_positive())
                .unwrap_or(Credits::ZERO);
            (answer, cost)
        });
        (answer, self.spend(end_user, added))
    }

    /// Adds `cost` for a request (admitted by its route's failure policy), held by a
    /// [`PendingSpend`].
    pub fn hold(self: &Arc<Self>, end_user: &EndUserId, cost: Credits) -> PendingSpend {
        self.add(end_user, cost);
        self.spend(end_user, cost.max(Credits::ZERO))
    }

    /// A request's hold on nothing (a lease decides its cost, or it costs nothing).
    pub fn nothing(self: &Arc<Self>, end_user: &EndUserId) -> PendingSpend {
        self.spend(end_user, Credits::ZERO)
    }

    fn spend(self: &Arc<Self>, end_user: &EndUserId, cost: Credits) -> PendingSpend {
        PendingSpend {
            pending: Arc::clone(self),
            end_user: end_user.clone(),
            cost,
        }
    }

    /// Lowers an unconfirmed cost (a reservation committed for less than its estimate).
    pub fn reduce(&self, end_user: &EndUserId, by: Credits) {
        self.with(end_user, |map| {
            if let Some(entry) = map.get_mut(end_user) {
                entry.unconfirmed = entry.unconfirmed.saturating_sub_floor(by);
                if entry.is_empty() {
                    map.remove(end_user);
                }
            }
        });
    }

    /// The control plane acknowledged `cost`: it is in its state from `version` on (or,
    /// without a version, in any state newer than the replica's now).
    ///
    /// `held_version` reads the version of the end user's state the replica holds. It is
    /// read under the end user's lock, which [`Pending::install`] also holds while a new
    /// state goes in: read earlier, a state that arrived in between (already including
    /// the cost) would leave the cost counted twice until a later state came.
    ///
    /// Returns the version the cost now waits for, when it still counts.
    pub fn confirm(
        &self,
        end_user: &EndUserId,
        cost: Credits,
        version: Option<u64>,
        held_version: impl FnOnce() -> Option<u64>,
    ) -> Option<u64> {
        let now = self.wall_ms();
        self.with(end_user, |map| {
            let entry = map.get_mut(end_user)?;
            let held_version = held_version();
            entry.unconfirmed = entry.unconfirmed.saturating_sub_floor(cost);
            let needed =
                version.unwrap_or_else(|| held_version.map_or(0, |held| held.saturating_add(1)));
            let waits = held_version.is_none_or(|held| held < needed) && cost.is_positive();
            if waits {
                entry.confirmed.push((needed, cost, now));
            }
            if entry.is_empty() {
                map.remove(end_user);
            }
            waits.then_some(needed)
        })
    }

    /// Counts a cost acknowledged before a restart that the stored replica does not show
    /// yet: confirmed, waiting for `needed`.
    pub fn restore_confirmed(&self, end_user: &EndUserId, cost: Credits, needed: u64) {
        if !cost.is_positive() {
            return;
        }
        let now = self.wall_ms();
        self.with(end_user, |map| {
            map.entry(end_user.clone())
                .or_default()
                .confirmed
                .push((needed, cost, now));
        });
    }

    /// Drops a cost the control plane refused (it charged nothing).
    pub fn drop_unconfirmed(&self, end_user: &EndUserId, cost: Credits) {
        self.reduce(end_user, cost);
    }

    /// Installs the end user's state at `version` (`install` puts it in the replica) and
    /// stops counting the confirmed costs it includes, both under the end user's lock: a
    /// decision or a confirmation sees the state and the pending spend of one moment.
    pub fn install<T>(&self, end_user: &EndUserId, version: u64, install: impl FnOnce() -> T) -> T {
        self.with(end_user, |map| {
            let installed = install();
            if let Some(entry) = map.get_mut(end_user) {
                entry.confirmed.retain(|(needed, _, _)| *needed > version);
                if entry.is_empty() {
                    map.remove(end_user);
                }
            }
            installed
        })
    }

    /// Drops confirmed costs acknowledged more than [`CONFIRMED_TTL`] before the stream
    /// was last heard from (`heard_ms`, wall clock): called periodically.
    pub fn expire(&self, heard_ms: i64) {
        let ttl = ttl_ms();
        for shard in &self.shards {
            let mut map = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            map.retain(|_, entry| {
                entry
                    .confirmed
                    .retain(|(_, _, at)| heard_ms.saturating_sub(*at) < ttl);
                !entry.is_empty()
            });
        }
    }
}

/// A request's share of its end user's pending spend: given back when dropped (the
/// request was refused after all, not charged, or could not be recorded), unless it was
/// handed on to an outbox record (the outbox confirms or drops it) or confirmed (the
/// control plane acknowledged it).
#[derive(Debug)]
pub struct PendingSpend {
    pending: Arc<Pending>,
    end_user: EndUserId,
    cost: Credits,
}

impl PendingSpend {
    /// The credits still held.
    pub fn cost(&self) -> Credits {
        self.cost
    }

    /// The outbox now holds the cost (its record names it): nothing is given back here.
    pub fn hand_on(&mut self) {
        self.cost = Credits::ZERO;
    }

    /// The control plane acknowledged the cost in its state from `version` on (see
    /// [`Pending::confirm`]).
    pub fn confirm(&mut self, version: Option<u64>, held_version: impl FnOnce() -> Option<u64>) {
        let cost = std::mem::replace(&mut self.cost, Credits::ZERO);
        self.pending
            .confirm(&self.end_user, cost, version, held_version);
    }

    /// Gives the cost back now.
    pub fn give_back(&mut self) {
        let cost = std::mem::replace(&mut self.cost, Credits::ZERO);
        if cost.is_positive() {
            self.pending.reduce(&self.end_user, cost);
        }
    }
}

impl Drop for PendingSpend {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> EndUserId {
        EndUserId::new("u1").expect("id")
    }

    #[test]
    fn a_cost_stays_until_the_replica_shows_its_version() {
        let pending = Pending::default();
        let allowed = pending.admit(&user(), |current| {
            assert_eq!(current, Credits::ZERO);
            (true, Some(Credits::new(10)))
        });
        assert!(allowed);
        assert_eq!(pending.total(&user()), Credits::new(10));
        pending.confirm(&user(), Credits::new(10), Some(7), || Some(5));
        assert_eq!(
            pending.total(&user()),
            Credits::new(10),
            "acknowledged, not yet replicated"
        );
        pending.install(&user(), 6, || ());
        assert_eq!(pending.total(&user()), Credits::new(10));
        pending.install(&user(), 7, || ());
        assert_eq!(pending.total(&user()), Credits::ZERO);
    }

    #[test]
    fn the_held_version_is_read_under_the_lock_a_new_state_goes_in_under() {
        let pending = Pending::default();
        pending.add(&user(), Credits::new(2));
        let shard = &pending.shards[shard_of(&user()) % SHARDS];
        let needed = pending.confirm(&user(), Credits::new(2), Some(3), || {
            assert!(shard.try_lock().is_err(), "read under the end user's lock");
            Some(2)
        });
        assert_eq!(needed, Some(3));
        pending.install(&user(), 3, || {
            assert!(shard.try_lock().is_err(), "installed under the same lock");
        });
        assert_eq!(pending.total(&user()), Credits::ZERO);
    }

    #[test]
    fn a_confirmation_the_replica_already_shows_clears_at_once() {
        let pending = Pending::default();
        pending.add(&user(), Credits::new(3));
        pending.confirm(&user(), Credits::new(3), Some(4), || Some(9));
        assert_eq!(pending.total(&user()), Credits::ZERO);
    }

    #[test]
    fn without_a_version_any_newer_state_clears_it() {
        let pending = Pending::default();
        pending.add(&user(), Credits::new(3));
        pending.confirm(&user(), Credits::new(3), None, || Some(4));
        pending.install(&user(), 4, || ());
        assert_eq!(pending.total(&user()), Credits::new(3));
        pending.install(&user(), 5, || ());
        assert_eq!(pending.total(&user()), Credits::ZERO);
    }

    #[test]
    fn confirmed_costs_expire_only_while_the_stream_is_heard() {
        let clock = protocol::clock::ManualClock::new(ledger::Timestamp::from_millis(1_000_000));
        let pending = Pending::new(Arc::new(clock.clone()));
        pending.add(&user(), Credits::new(8));
        pending.confirm(&user(), Credits::new(8), None, || Some(1));
        let acknowledged = clock.now().as_millis();
        // The stream silent since before the acknowledgement: kept, however long.
        pending.expire(acknowledged.saturating_sub(60_000));
        assert_eq!(pending.total(&user()), Credits::new(8));
        // Heard from shortly after: kept.
        pending.expire(acknowledged.saturating_add(1_000));
        assert_eq!(pending.total(&user()), Credits::new(8));
        // Heard from well after, without the state showing it: dropped.
        pending.expire(acknowledged.saturating_add(ttl_ms()).saturating_add(1_000));
        assert_eq!(pending.total(&user()), Credits::ZERO);
    }

    #[test]
    fn a_request_spend_goes_back_when_dropped_unless_handed_on_or_confirmed() {
        let pending = Arc::new(Pending::default());
        let (admitted, spend) =
            pending.admit_spend(&user(), |current| (current, Some(Credits::new(5))));
        assert_eq!((admitted, spend.cost()), (Credits::ZERO, Credits::new(5)));
        assert_eq!(pending.total(&user()), Credits::new(5));
        drop(spend);
        assert_eq!(pending.total(&user()), Credits::ZERO, "dropped: given back");

        let (_, refused) = pending.admit_spend(&user(), |_| ((), None));
        assert_eq!(refused.cost(), Credits::ZERO);
        drop(refused);

        let mut recorded = pending.hold(&user(), Credits::new(3));
        recorded.hand_on();
        drop(recorded);
        assert_eq!(
            pending.total(&user()),
            Credits::new(3),
            "the outbox holds it now"
        );

        let mut confirmed = pending.hold(&user(), Credits::new(2));
        confirmed.confirm(Some(9), || Some(4));
        drop(confirmed);
        assert_eq!(
            pending.total(&user()),
            Credits::new(5),
            "confirmed: counted until the replica shows version 9"
        );
        pending.install(&user(), 9, || ());
        assert_eq!(pending.total(&user()), Credits::new(3));
    }

    #[test]
    fn refused_costs_and_smaller_commits_lower_the_total() {
        let pending = Pending::default();
        pending.add(&user(), Credits::new(100));
        pending.reduce(&user(), Credits::new(60));
        assert_eq!(pending.total(&user()), Credits::new(40));
        pending.drop_unconfirmed(&user(), Credits::new(40));
        assert_eq!(pending.total(&user()), Credits::ZERO);
    }
}
