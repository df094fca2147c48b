//! Leases from the proxy's side (SPEC 12.1): per (end user, feature) gated by balance,
//! credits the control plane holds for this proxy, spent locally.
//!
//! A request takes its cost from the slot's `room` under the slot's lock (no network
//! call, no disk wait); when the room is short it waits up to `leases.wait_ms` for the
//! background to take a lease or top one up. What an admitted request spent is appended
//! to the spend log ([`crate::spend_log`]) under the report sequence that is open at that
//! moment (durable before the response in `sync` durability) and reported from there, so
//! a report's content is fixed by what is on disk: after a crash the same sequence is
//! sent with the same content, and the control plane counts it once.
//!
//! The background (`run`) takes leases sized from the observed rate, reports spend every
//! `leases.report_interval_ms` (each report tops the lease up when its room runs low and
//! extends it), releases leases unused for `leases.idle_release_secs`, and on start
//! reports what a previous run left on disk and releases those leases.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ledger::{Credits, EndUserId, FeatureKey, Holder, LeaseId, Timestamp};
use protocol::{CreateLease, LeaseBatch, LeaseBatchResult, LeaseOperation, LeaseStep, ReportLease};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

use crate::config::{Durability, LeaseConfig};
use crate::disk::{Disk, DiskError, Flusher, LeaseMeta};
use crate::outbox::{Op, Outbox, Record};
use crate::replica::Replica;
use crate::spend_log::{Queued, SpendLog, Spent, Totals};

type SlotKey = (EndUserId, FeatureKey);

const SHARDS: usize = 64;
/// A lease stops being used this long before its TTL runs out (the report that extends
/// it may be in flight).
const EXPIRY_MARGIN: Duration = Duration::from_secs(2);
/// How long an acknowledged report's cost is remembered after the replica shows it (see
/// `Held::confirmed`): longer than a decision can take, its wait for a refill included
/// (twice `leases.wait_ms` when that is longer).
const CONFIRMED_KEPT: Duration = Duration::from_secs(10);
/// The longest a slow but regular slot keeps an unused lease (see `idle_after`).
const IDLE_MAX: Duration = Duration::from_secs(120);
/// A lease takes at most this fraction (1/n) of what the replica shows free, so that
/// proxies asking one after another near the end of a balance get similar shares.
const FREE_SHARE: i64 = 8;
/// Below this many `min_credits` free, leases shrink to one request's cost.
const LOW_WATER_LEASES: i64 = 4;
/// Below that, how long unused room is kept before it goes back.
const LOW_WATER_IDLE: Duration = Duration::from_secs(1);
/// After repeated refusals (nothing left), the longest a slot goes without asking the
/// control plane again (see `Exhausted`).
const EXHAUSTED_RETRY: Duration = Duration::from_millis(250);
/// The pause after the second refusal in a row; it doubles up to `EXHAUSTED_RETRY`.
const EXHAUSTED_FIRST_PAUSE: Duration = Duration::from_millis(2);
/// How long a batch waits for requests still writing spend under a report's sequence
/// before leaving that report for the next batch.
const WRITING_WAIT: Duration = Duration::from_millis(20);
/// How often the background plans the slots whose requests asked when nothing wakes it
/// (a slot whose acquisition waits out a pause stays asked).
const TICK: Duration = Duration::from_millis(25);
/// The longest between two plans of every slot (for what comes due with time alone:
/// reports, extensions, idle releases); shorter when `leases.report_interval_ms` is
/// short. What requests cause (a lease to take, room running low) asks at once.
const FULL_PLAN_MAX: Duration = Duration::from_millis(250);

/// The proxy's stable instance id, kept in its data directory: leases are held by it.
///
/// # Errors
/// The file cannot be read or written.
pub fn holder_id(dir: &std::path::Path) -> Result<Holder, DiskError> {
    let path = dir.join("holder");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().to_owned(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let id = format!("prx_{}", ulid::Ulid::new());
            std::fs::write(&path, &id)
                .map_err(|error| DiskError::new(format!("{}: {error}", path.display())))?;
            id
        }
        Err(error) => return Err(DiskError::new(format!("{}: {error}", path.display()))),
    };
    Holder::new(&text)
        .map_err(|error| DiskError::new(format!("{}: {text:?}: {error}", path.display())))
}

/// One lease of a slot.
#[derive(Debug)]
struct Held {
    id: Arc<str>,
    /// `id` parsed once (the request path names the lease by it).
    lease_id: LeaseId,
    /// Credits this proxy may still spend from it.
    room: Credits,
    /// Admitted and not yet covered by an acknowledged report.
    outstanding: Credits,
    /// Acknowledged reports' costs with the state version that includes each and when
    /// they were acknowledged: an answer decided on an older state counts them (the
    /// balance header). Kept until the replica shows the version and `CONFIRMED_KEPT`
    /// has passed (a decision may still hold an older state that long).
    confirmed: Vec<(u64, Credits, Instant)>,
    /// Requests admitted from it whose spend is not yet recorded or given back.
    in_flight: usize,
    /// The report sequence new spend records go under.
    open: u64,
    /// A report sent and not yet acknowledged: it is sent again, unchanged.
    unacked: Option<u64>,
    /// Spend records being written, per sequence (a report waits for its own).
    writing: BTreeMap<u64, usize>,
    /// Usable until (the lease's TTL, less a margin).
    usable_until: Instant,
    last_report: Instant,
    /// A report (or release) is in flight.
    reporting: bool,
    /// No new admissions: it is being released, or the control plane ended it.
    ended: bool,
    /// When the control plane last answered about it (the replica's clock).
    answered_at: Timestamp,
    /// The end user's state version of that answer and the feature's free credits
    /// beside the holds in it (an answer newer than the replica's state tells the end
    /// user's balance better).
    answered: Option<(u64, Credits)>,
}

impl Held {
    fn usable(&self, now: Instant) -> bool {
        !self.ended && now < self.usable_until
    }
}

/// The control plane's last word on a slot was "nothing left" (a creation or a top-up
/// refused). A refusal answers every request that arrived before its ask went out: those
/// are refused. A request that arrived later asks again (its ask reflects every grant
/// acknowledged before it arrived), except within a pause after repeated refusals (none
/// after the first, then 2 ms doubling to `EXHAUSTED_RETRY`), which bounds what an end
/// user with nothing left costs the control plane, or until the replica shows a newer
/// state of the end user than the one refused (a grant), which ends the spell.
#[derive(Debug, Default)]
struct Exhausted {
    asked: Option<Instant>,
    until: Option<Instant>,
    at_version: Option<u64>,
    pause: Duration,
}

impl Exhausted {
    /// The ask that went out at `asked` (on the replica's `version`) was refused at `now`.
    fn refused(&mut self, asked: Instant, now: Instant, version: u64) {
        self.asked = Some(asked);
        self.until = Some(now + self.pause);
        self.at_version = Some(version);
        self.pause = self
            .pause
            .saturating_mul(2)
            .clamp(EXHAUSTED_FIRST_PAUSE, EXHAUSTED_RETRY);
    }

    /// Credits came (a lease, a top-up, a newer state of the end user): the spell ends.
    fn clear(&mut self) {
        *self = Exhausted::default();
    }

    /// Ends the spell when the replica's `version` of the end user is newer than the one
    /// refused (credits may have come back: a grant, a release).
    fn outdated_by(&mut self, version: Option<u64>) {
        if let (Some(refused_at), Some(shown)) = (self.at_version, version)
            && shown > refused_at
        {
            self.clear();
        }
    }

    /// Whether a request that arrived at `arrived` is refused without asking again.
    fn refuses(&self, arrived: Instant, now: Instant) -> bool {
        self.asked.is_some_and(|asked| asked >= arrived) || self.pausing(now)
    }

    /// Whether asking again must wait.
    fn pausing(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }
}

#[derive(Debug)]
struct Slot {
    lease: Option<Held>,
    /// Ended leases still reporting their spend.
    retired: Vec<Held>,
    /// The largest cost a request is waiting for.
    wanted: Credits,
    /// Free credits the replica showed at the last decision (sizes leases).
    seen_available: Credits,
    /// The control plane said nothing is left.
    exhausted: Exhausted,
    /// When the creation or top-up under way went out (a refusal answers the requests
    /// that arrived before it).
    asked_at: Option<Instant>,
    /// The control plane could not be reached.
    unreachable_until: Option<Instant>,
    unreachable_backoff: Duration,
    /// A lease is being taken.
    acquiring: bool,
    /// The replica's version of the end user when the creation being tried was sent: a
    /// refusal ("nothing left") holds until the replica shows a newer one.
    acquire_seen: Option<u64>,
    /// The request id of the creation being tried: kept until the control plane answers
    /// it, so a retry after a lost answer finds the lease the first try made.
    acquire_request: Option<String>,
    /// Spend since `rate_since`, and the rate measured before (credits per second).
    recent: Credits,
    rate_since: Instant,
    rate_per_second: i64,
    last_used: Instant,
    /// When a request last spent from a lease here, and the typical gap between such
    /// spends (a moving average): a slot used every few seconds is not idle.
    last_spent: Option<Instant>,
    gap: Duration,
    notify: Arc<Notify>,
    /// In [`Leases::asked`]: requests wait here, or took the room below half the
    /// target, and the planner has not looked since.
    asked: bool,
    /// The lease size the last plan aimed at: a request leaving less than half of it
    /// in the room asks for a top-up.
    target: Credits,
}

impl Slot {
    fn new(now: Instant) -> Slot {
        Slot {
            lease: None,
            retired: Vec::new(),
            wanted: Credits::ZERO,
            seen_available: Credits::ZERO,
            exhausted: Exhausted::default(),
            asked_at: None,
            acquire_seen: None,
            unreachable_until: None,
            unreachable_backoff: Duration::ZERO,
            acquiring: false,
            acquire_request: None,
            recent: Credits::ZERO,
            rate_since: now,
            rate_per_second: 0,
            last_used: now,
            last_spent: None,
            gap: Duration::ZERO,
            notify: Arc::new(Notify::new()),
            asked: false,
            target: Credits::ZERO,
        }
    }

    /// A request spent from this slot's lease at `now`: the typical gap between spends
    /// (the first gap seen, then a moving average moved 1/8 by each new gap).
    fn note_spend(&mut self, now: Instant) {
        if let Some(last) = self.last_spent {
            let gap = now.saturating_duration_since(last);
            self.gap = if self.gap.is_zero() {
                gap
            } else {
                (self.gap.saturating_mul(7) + gap) / 8
            };
        }
        self.last_spent = Some(now);
    }

    fn held_mut(&mut self, id: &str) -> Option<&mut Held> {
        self.lease
            .iter_mut()
            .chain(self.retired.iter_mut())
            .find(|held| &*held.id == id)
    }

    /// Credits per second, over the last few seconds.
    fn rate(&mut self, now: Instant) -> i64 {
        let elapsed = now.saturating_duration_since(self.rate_since);
        if elapsed >= Duration::from_secs(2) {
            let millis = i64::try_from(elapsed.as_millis())
                .unwrap_or(i64::MAX)
                .max(1);
            let measured = self
                .recent
                .get()
                .saturating_mul(1000)
                .checked_div(millis)
                .unwrap_or(0);
            self.rate_per_second = measured.max(self.rate_per_second.saturating_div(2));
            self.recent = Credits::ZERO;
            self.rate_since = now;
        }
        let since = i64::try_from(elapsed.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let current = self
            .recent
            .get()
            .saturating_mul(1000)
            .checked_div(since.max(250))
            .unwrap_or(0);
        self.rate_per_second.max(current)
    }
}

/// What taking a request's cost from its lease came to.
#[derive(Debug)]
pub enum Taken {
    /// Spent from the lease; the guard gives it back unless recorded.
    Spent(Spend),
    /// The control plane says nothing is left for this end user and feature.
    Exhausted,
    /// The control plane could not be reached for a lease: the route's failure policy
    /// decides.
    Unavailable,
    /// No lease or top-up came within `leases.wait_ms` although the control plane is
    /// reachable (it is slow, or overloaded): the request is refused for now (503), never
    /// admitted past what is held.
    Late,
}

/// A request's cost taken from a lease: recorded once the request is charged, or given
/// back when dropped unrecorded (the upstream failed, the client left).
#[derive(Debug)]
pub struct Spend {
    leases: Arc<Leases>,
    key: SlotKey,
    lease: Arc<str>,
    lease_id: LeaseId,
    cost: Credits,
    /// What the lease has left after this request.
    pub room_after: Credits,
    /// What this proxy spent from the lease, this request included, that the replica
    /// does not show yet (not reported, or reported in a state it does not hold yet).
    pub outstanding_after: Credits,
    /// When the control plane last answered about the lease (for `x-quota-as-of`).
    pub answered_at: Timestamp,
    /// What the end user can still spend by the control plane's last answer about the
    /// lease, when that answer is newer than the state the decision was made on (its
    /// free credits then, plus the lease's room after this request).
    pub balance_by_answer: Option<Credits>,
    done: bool,
}

impl Spend {
    pub fn cost(&self) -> Credits {
        self.cost
    }

    /// The lease it was taken from.
    pub fn lease_id(&self) -> LeaseId {
        self.lease_id
    }

    /// Writes what the request spent (durable before this returns in `sync`
    /// durability), to be reported under the lease's open sequence.
    ///
    /// # Errors
    /// [`Unrecorded::NotWritten`]: the spend log refused the record; the cost went back
    /// to the lease and nothing is charged. [`Unrecorded::NotDurable`]: the record is in
    /// the log (a killed process keeps it, and it will be reported and charged) but the
    /// `sync` flush failed, so a power loss could lose it; the caller decides, by the
    /// route's failure policy, whether the response goes out.
    pub async fn record(mut self, units: u64) -> Result<(), Unrecorded> {
        let leases = Arc::clone(&self.leases);
        let sequence = leases
            .with_slot(&self.key, |slot| {
                let held = slot.held_mut(&self.lease)?;
                let sequence = held.open;
                *held.writing.entry(sequence).or_insert(0) += 1;
                held.in_flight = held.in_flight.saturating_sub(1);
                Some(sequence)
            })
            .flatten()
            .ok_or_else(|| {
                Unrecorded::NotWritten(DiskError::new(
                    "the lease of an admitted request vanished".into(),
                ))
            })?;
        self.done = true;
        leases.spent.increment(1);
        let mut writing = Writing {
            spend: &self,
            sequence,
            queued: None,
        };
        let spent = Spent {
            units,
            cost: self.cost,
        };
        let written = match leases.spend_log.queue(self.lease_id, sequence, spent) {
            Ok(queued) => {
                writing.queued = Some(queued);
                // The other requests answered in this pass of the scheduler queue theirs
                // meanwhile: the first back writes them all.
                tokio::task::yield_now().await;
                writing
                    .queued
                    .take()
                    .map_or(Ok(()), Queued::write)
                    .map_err(Unrecorded::NotWritten)
            }
            Err(error) => Err(Unrecorded::NotWritten(error)),
        };
        let written = match written {
            Ok(()) => leases.flushed(leases.flusher.wrote()).await,
            Err(error) => {
                // Not in the log: the spend goes back to the lease (the request is
                // refused). A record in the log stays charged whatever else fails: it
                // is reported, and the report's cost comes off the outstanding spend.
                leases.give_back(&self.key, &self.lease, self.cost, false);
                Err(error)
            }
        };
        drop(writing);
        written
    }
}

/// A spend being written under its lease's report `sequence`: the report waits until it
/// drops. Dropped with its record still queued (the request was dropped meanwhile), it
/// writes the record first, so a report never goes without a spend that will be in the
/// log.
struct Writing<'a> {
    spend: &'a Spend,
    sequence: u64,
    queued: Option<Queued<'a>>,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let spend = self.spend;
        if let Some(queued) = self.queued.take()
            && let Err(error) = queued.write()
        {
            tracing::error!(%error, "the lease spend of a dropped request could not be written; it goes back to the lease");
            spend
                .leases
                .give_back(&spend.key, &spend.lease, spend.cost, false);
        }
        let settled = spend.leases.with_slot(&spend.key, |slot| {
            let Some(held) = slot.held_mut(&spend.lease) else {
                return false;
            };
            let Some(count) = held.writing.get_mut(&self.sequence) else {
                return false;
            };
            *count = count.saturating_sub(1);
            if *count > 0 {
                return false;
            }
            held.writing.remove(&self.sequence);
            spend.leases.ask_if_ended(&spend.key, &spend.lease, slot);
            true
        });
        if settled == Some(true) {
            spend.leases.written.notify_waiters();
        }
    }
}

/// Why a lease spend is not recorded as a `sync` request needs it.
#[derive(Debug)]
pub enum Unrecorded {
    /// Not in the spend log: not charged.
    NotWritten(DiskError),
    /// In the spend log (charged) but not flushed to disk.
    NotDurable(DiskError),
}

impl std::fmt::Display for Unrecorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unrecorded::NotWritten(error) => write!(f, "not written: {error}"),
            Unrecorded::NotDurable(error) => write!(f, "written but not flushed: {error}"),
        }
    }
}

impl Drop for Spend {
    fn drop(&mut self) {
        if !self.done {
            self.leases
                .give_back(&self.key, &self.lease, self.cost, true);
        }
    }
}

/// Every lease this proxy holds, and the background that keeps them.
#[derive(Debug)]
pub struct Leases {
    holder: Holder,
    config: LeaseConfig,
    /// Which end user and feature each lease is for.
    disk: Disk,
    /// What requests spent, until reported.
    spend_log: Arc<SpendLog>,
    /// Group commit for the spend log.
    flusher: Arc<Flusher>,
    durability: Durability,
    shards: Vec<Mutex<HashMap<SlotKey, Slot>>>,
    wake: Notify,
    /// The slots whose requests wait for a lease or a top-up, or took the room low (set
    /// by `try_take`): a wake-up or a [`TICK`] plans these alone, so its cost does not
    /// grow with the number of slots; every slot is planned at most [`FULL_PLAN_MAX`]
    /// apart.
    asked: Mutex<Vec<SlotKey>>,
    /// Signalled when the last write of spend under a report's sequence finishes (a
    /// batch may be waiting to send that report: `settled_writes`).
    written: Notify,
    /// `qs_proxy_lease_spend_total`, registered once.
    spent: metrics::Counter,
}

fn shard_of(key: &SlotKey) -> usize {
    use std::hash::BuildHasher;
    let hash =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one(key);
    usize::try_from(hash % 64).unwrap_or(0)
}

fn credits_of(value: i64) -> Credits {
    Credits::new(value.max(0))
}

impl Leases {
    pub fn new(
        holder: Holder,
        config: LeaseConfig,
        disk: Disk,
        spend_log: Arc<SpendLog>,
        flusher: Arc<Flusher>,
        durability: Durability,
    ) -> Leases {
        Leases {
            holder,
            config,
            disk,
            spend_log,
            flusher,
            durability,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            wake: Notify::new(),
            asked: Mutex::new(Vec::new()),
            written: Notify::new(),
            spent: metrics::counter!("qs_proxy_lease_spend_total"),
        }
    }

    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    fn with_slot<T>(&self, key: &SlotKey, f: impl FnOnce(&mut Slot) -> T) -> Option<T> {
        let shard = &self.shards[shard_of(key) % self.shards.len()];
        let mut guard = shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.get_mut(key).map(f)
    }

    fn with_slot_or_new<T>(
        &self,
        key: &SlotKey,
        now: Instant,
        f: impl FnOnce(&mut Slot) -> T,
    ) -> T {
        let shard = &self.shards[shard_of(key) % self.shards.len()];
        let mut guard = shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(guard.entry(key.clone()).or_insert_with(|| Slot::new(now)))
    }

    /// Takes `cost` from the end user's lease for `feature`, waiting up to
    /// `leases.wait_ms` for a lease or a top-up when the room is short. `available` is
    /// what the replica shows free for the feature (it sizes the next lease), `version`
    /// the replica's version of the end user (a newer one ends an exhausted spell).
    pub async fn take(
        self: &Arc<Self>,
        end_user: &EndUserId,
        feature: &FeatureKey,
        cost: Credits,
        available: Credits,
        version: Option<u64>,
    ) -> Taken {
        let key = (end_user.clone(), feature.clone());
        let started = Instant::now();
        let deadline = started + Duration::from_millis(self.config.wait_ms);
        // Why the first look found no room: `no_lease` (none yet, or it ended) or
        // `short` (the lease has less room than the cost).
        let mut waited: Option<&'static str> = None;
        let answered = |waited: Option<&'static str>, taken: Taken| {
            if let Some(reason) = waited {
                metrics::counter!("qs_proxy_lease_waits_total", "reason" => reason).increment(1);
                metrics::histogram!("qs_proxy_lease_wait_seconds")
                    .record(started.elapsed().as_secs_f64());
            }
            taken
        };
        loop {
            let now = Instant::now();
            let (notify, reason) = match self.try_take(&key, cost, available, version, started, now)
            {
                Ok(taken) => return answered(waited, taken),
                Err(short) => short,
            };
            self.wake.notify_one();
            if now >= deadline {
                metrics::counter!("qs_proxy_lease_waits_total", "reason" => waited.unwrap_or(reason))
                    .increment(1);
                metrics::counter!("qs_proxy_lease_wait_timeouts_total").increment(1);
                metrics::histogram!("qs_proxy_lease_wait_seconds")
                    .record(started.elapsed().as_secs_f64());
                return Taken::Late;
            }
            waited = waited.or(Some(reason));
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Look once more now that a wake-up cannot be missed.
            match self.try_take(&key, cost, available, version, started, Instant::now()) {
                Ok(taken) => return answered(waited, taken),
                Err(_) => {
                    let _ = tokio::time::timeout(
                        deadline.saturating_duration_since(Instant::now()),
                        notified,
                    )
                    .await;
                }
            }
        }
    }

    /// `Err((notify, why))` when the caller should wait for the background.
    fn try_take(
        self: &Arc<Self>,
        key: &SlotKey,
        cost: Credits,
        available: Credits,
        version: Option<u64>,
        arrived: Instant,
        now: Instant,
    ) -> Result<Taken, (Arc<Notify>, &'static str)> {
        self.with_slot_or_new(key, now, |slot| {
            slot.last_used = now;
            slot.seen_available = available;
            if let Some(held) = slot.lease.as_mut().filter(|held| held.usable(now))
                && held.room >= cost
            {
                held.room = held.room.saturating_sub_floor(cost);
                held.outstanding = held.outstanding.checked_add(cost).unwrap_or(Credits::MAX);
                // Reports the decision's state does not include yet count as unshown
                // (filtered, not pruned: a concurrent decision may hold an older state).
                let shown = version.unwrap_or(0);
                let unshown = held
                    .confirmed
                    .iter()
                    .filter(|(included, _, _)| *included > shown)
                    .fold(held.outstanding, |total, (_, cost, _)| {
                        total.checked_add(*cost).unwrap_or(Credits::MAX)
                    });
                held.in_flight = held.in_flight.saturating_add(1);
                slot.recent = slot.recent.checked_add(cost).unwrap_or(Credits::MAX);
                let spend = Spend {
                    leases: Arc::clone(self),
                    key: key.clone(),
                    lease: held.id.clone(),
                    lease_id: held.lease_id,
                    cost,
                    room_after: held.room,
                    outstanding_after: unshown,
                    answered_at: held.answered_at,
                    balance_by_answer: held
                        .answered
                        .filter(|(answered, _)| *answered > shown)
                        .map(|(_, free)| free.checked_add(held.room).unwrap_or(Credits::MAX)),
                    done: false,
                };
                // Less than half the target left, and no report under way to top it up:
                // the planner's next tick plans the slot (no wake-up: nothing waits on
                // it yet), not its next look at every slot. (Not while a failed report
                // waits out its backoff, nor sooner than a tick after the last report: a
                // top-up granted short leaves the room low, and the next one waits its
                // turn as it did when a tick found it.)
                let low = held.room.get().saturating_mul(2) < slot.target.get()
                    && !held.reporting
                    && held.unacked.is_none()
                    && now.saturating_duration_since(held.last_report) >= TICK
                    && slot.unreachable_until.is_none_or(|until| now >= until);
                if low && !slot.asked {
                    self.ask(key, slot);
                }
                slot.note_spend(now);
                return Ok(Taken::Spent(spend));
            }
            // Credits may have come back since the refusal (a grant, a release): the
            // replica shows a newer state of the end user.
            slot.exhausted.outdated_by(version);
            if slot.exhausted.refuses(arrived, now) {
                return Ok(Taken::Exhausted);
            }
            if slot.unreachable_until.is_some_and(|until| now < until) {
                return Ok(Taken::Unavailable);
            }
            slot.wanted = slot.wanted.max(cost);
            self.ask(key, slot);
            let why = if slot.lease.as_ref().is_some_and(|held| held.usable(now)) {
                "short"
            } else {
                "no_lease"
            };
            Err((Arc::clone(&slot.notify), why))
        })
    }

    /// Notes that requests wait on `slot` (under its shard's lock): the next wake-up of
    /// the background plans it.
    fn ask(&self, key: &SlotKey, slot: &mut Slot) {
        if !slot.asked {
            slot.asked = true;
            self.asked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(key.clone());
        }
    }

    /// Puts an admitted request's cost back (it was not charged, or not recorded).
    fn give_back(&self, key: &SlotKey, lease: &str, cost: Credits, in_flight: bool) {
        self.with_slot(key, |slot| {
            if let Some(held) = slot.held_mut(lease) {
                held.outstanding = held.outstanding.saturating_sub_floor(cost);
                if in_flight {
                    held.in_flight = held.in_flight.saturating_sub(1);
                }
                if !held.ended {
                    held.room = held.room.checked_add(cost).unwrap_or(Credits::MAX);
                }
            }
            if in_flight {
                self.ask_if_ended(key, lease, slot);
            }
            slot.recent = slot.recent.saturating_sub_floor(cost);
            slot.notify.notify_waiters();
        });
    }

    /// The last request of ended lease `lease` is done with it (none in flight, none
    /// writing): the planner hears of it now, so its final report and release go at
    /// once rather than at the next plan of every slot (the control plane counts its
    /// room as held until then).
    fn ask_if_ended(&self, key: &SlotKey, lease: &str, slot: &mut Slot) {
        let done = slot
            .held_mut(lease)
            .is_some_and(|held| held.ended && held.in_flight == 0 && held.writing.is_empty());
        if done && !slot.asked {
            self.ask(key, slot);
            self.wake.notify_one();
        }
    }

    /// In `sync` durability, waits until the spend log's write `ticket` is on disk.
    async fn flushed(&self, ticket: u64) -> Result<(), Unrecorded> {
        if self.durability == Durability::Sync {
            self.flusher
                .durable(ticket)
                .await
                .map_err(Unrecorded::NotDurable)?;
        }
        Ok(())
    }

    /// Whether a spend can be recorded now (the spend log has room).
    pub fn can_record(&self) -> bool {
        self.spend_log.has_room()
    }

    /// Credits parked in this proxy's leases, and how many leases it holds.
    pub fn parked(&self) -> (Credits, usize) {
        let mut credits = Credits::ZERO;
        let mut count = 0usize;
        for shard in &self.shards {
            let guard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for slot in guard.values() {
                if let Some(held) = &slot.lease {
                    credits = credits.checked_add(held.room).unwrap_or(Credits::MAX);
                    count = count.saturating_add(1);
                }
            }
        }
        (credits, count)
    }
}

// === the background ===

/// What the background decided to do about one slot.
#[derive(Debug)]
enum Work {
    Acquire {
        amount: Credits,
        request_id: String,
    },
    Report {
        lease: String,
        sequence: u64,
        top_up: Option<Credits>,
        release: bool,
    },
}

/// Which lanes `Leases::plan` may fill (a lane with a batch in flight waits).
#[derive(Debug, Clone, Copy)]
struct Lanes {
    urgent: bool,
    routine: bool,
}

impl Lanes {
    const ALL: Lanes = Lanes {
        urgent: true,
        routine: true,
    };
}

/// What `Leases::plan` found due, by lane: acquisitions and top-ups that requests wait
/// for, and everything else (routine reports, releases).
#[derive(Debug, Default)]
struct Planned {
    urgent: Vec<(SlotKey, Work)>,
    routine: Vec<(SlotKey, Work)>,
}

/// Everything the background needs.
#[derive(Debug, Clone)]
pub struct Context {
    pub client: client::Client,
    pub replica: Arc<Replica>,
    pub outbox: Arc<Outbox>,
}

impl Leases {
    /// Keeps the leases until `stop`, then releases them all (bounded).
    pub async fn run(self: Arc<Self>, context: Context, mut stop: watch::Receiver<bool>) {
        // The leases a previous run left, read before this run takes any: reported and
        // released in the background, retried until the control plane takes them.
        let remembered = match self.disk.leases_all() {
            Ok(remembered) => remembered,
            Err(error) => {
                tracing::error!(%error, "cannot read the leases a previous run left; they are reported on the next start");
                Vec::new()
            }
        };
        // And any lease with spend in the log that sled does not name (its record did
        // not reach the disk): reported all the same.
        let mut remembered: Vec<String> = remembered.into_iter().map(|(lease, _)| lease).collect();
        for (lease, _) in self.spend_log.index() {
            if !remembered.contains(&lease) {
                remembered.push(lease);
            }
        }
        let recovery = tokio::spawn(Arc::clone(&self).recover_until_done(
            context.clone(),
            remembered,
            stop.clone(),
        ));
        // Two lanes, each with one batch in flight at most: urgent work (acquisitions,
        // top-ups that requests wait for) never queues behind routine reports.
        let urgent_lane = Arc::new(Semaphore::new(1));
        let routine_lane = Arc::new(Semaphore::new(1));
        let mut running = tokio::task::JoinSet::new();
        let full_every =
            (Duration::from_millis(self.config.report_interval_ms) / 2).clamp(TICK, FULL_PLAN_MAX);
        let mut last_full = Instant::now()
            .checked_sub(full_every)
            .unwrap_or_else(Instant::now);
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(TICK) => {}
                _ = stop.changed() => break,
            }
            while running.try_join_next().is_some() {}
            // A lane is planned only while it has no batch in flight: what comes due
            // meanwhile rides its next batch together (a busy proxy sends fewer, larger
            // batches rather than many small ones queueing).
            let mut urgent = Arc::clone(&urgent_lane).try_acquire_owned().ok();
            let mut routine = Arc::clone(&routine_lane).try_acquire_owned().ok();
            if urgent.is_none() && routine.is_none() {
                tokio::select! {
                    permit = Arc::clone(&urgent_lane).acquire_owned() => urgent = permit.ok(),
                    permit = Arc::clone(&routine_lane).acquire_owned() => routine = permit.ok(),
                    _ = stop.changed() => break,
                }
            }
            let lanes = Lanes {
                urgent: urgent.is_some(),
                routine: routine.is_some(),
            };
            // Every slot every `full_every`; in between, a wake-up or a tick plans the
            // slots whose requests asked (when the urgent lane is free: else they wait
            // for it).
            // A plan of every slot counts only with the routine lane free (what it finds
            // due is mostly routine; a busy lane ends with a wake-up that runs it).
            let now = Instant::now();
            let full = lanes.routine && now.saturating_duration_since(last_full) >= full_every;
            let planned = if full {
                last_full = now;
                self.plan(now, false, lanes)
            } else if lanes.urgent {
                self.plan_asked(now, lanes)
            } else {
                Planned::default()
            };
            for (permit, work, lane) in [
                (urgent, planned.urgent, &urgent_lane),
                (routine, planned.routine, &routine_lane),
            ] {
                let Some(permit) = permit else { continue };
                if work.is_empty() {
                    continue;
                }
                let (leases, context, lane) =
                    (Arc::clone(&self), context.clone(), Arc::clone(lane));
                running.spawn(async move {
                    leases.perform_lane(&context, work, permit, &lane).await;
                });
            }
            if full {
                self.gauges();
            }
        }
        // Shutdown: what is running finishes, then every lease is released.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::timeout_at(deadline, running.join_next())
            .await
            .ok()
            .flatten()
            .is_some()
        {}
        let planned = self.plan(Instant::now(), true, Lanes::ALL);
        let mut work = planned.urgent;
        work.extend(planned.routine);
        while !work.is_empty() {
            let rest = work.split_off(work.len().min(protocol::LEASE_BATCH_MAX));
            let chunk = std::mem::replace(&mut work, rest);
            let _ = tokio::time::timeout_at(deadline, self.perform(&context, chunk)).await;
        }
        // What the recovery has not reported stays on disk for the next start.
        let _ = tokio::time::timeout_at(deadline, recovery).await;
    }

    /// Sends one lane's `work` in batches of at most `protocol::LEASE_BATCH_MAX`, one at
    /// a time under the lane's permit, then wakes the planner for what came due.
    async fn perform_lane(
        &self,
        context: &Context,
        mut work: Vec<(SlotKey, Work)>,
        permit: OwnedSemaphorePermit,
        lane: &Arc<Semaphore>,
    ) {
        let mut permit = Some(permit);
        while !work.is_empty() {
            let rest = work.split_off(work.len().min(protocol::LEASE_BATCH_MAX));
            let chunk = std::mem::replace(&mut work, rest);
            let _permit = match permit.take() {
                Some(permit) => permit,
                None => match Arc::clone(lane).acquire_owned().await {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            self.perform(context, chunk).await;
        }
        self.wake.notify_one();
    }

    /// Reports and releases `remembered` (a previous run's leases), retrying with
    /// backoff (up to 30 s apart) until every one is done or `stop`.
    async fn recover_until_done(
        self: Arc<Self>,
        context: Context,
        remembered: Vec<String>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let outcome = self.recover(&context, &remembered).await;
            let pending = remembered
                .iter()
                .filter(|lease| matches!(self.disk.lease_get(lease), Ok(Some(_)) | Err(_)))
                .count();
            metrics::gauge!("qs_proxy_lease_recovery_pending")
                .set(f64::from(u32::try_from(pending).unwrap_or(u32::MAX)));
            match outcome {
                Ok(()) => return,
                Err(error) => {
                    metrics::counter!("qs_proxy_lease_recovery_failures_total").increment(1);
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis(), "reporting the spend a previous run left failed; retrying");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = backoff.saturating_mul(2).min(Duration::from_secs(30));
        }
    }

    fn gauges(&self) {
        let (credits, count) = self.parked();
        metrics::gauge!("qs_proxy_leases").set(f64::from(u32::try_from(count).unwrap_or(u32::MAX)));
        let parked = u32::try_from(credits.get()).unwrap_or(u32::MAX);
        metrics::gauge!("qs_proxy_lease_credits_parked").set(f64::from(parked));
    }

    /// The target size of a slot's lease: its observed rate over the horizon, within
    /// the configured bounds, at least what a request waits for, and at most half of what
    /// the replica shows free beyond that (so several proxies share what is left). When
    /// little is left free (under four times `min_credits`), what waiting requests need
    /// and nothing ahead: credits parked here cannot be spent through another proxy, so
    /// near the end of a balance each proxy holds no more than it is about to spend.
    fn target(&self, slot: &mut Slot, now: Instant) -> Credits {
        let rate = slot.rate(now);
        let horizon = i64::try_from(self.config.horizon_secs).unwrap_or(i64::MAX);
        let wanted = slot.wanted.get();
        let sized = rate
            .saturating_mul(horizon)
            .clamp(self.config.min_credits, self.config.max_credits);
        let free = slot.seen_available.get();
        if free < self.config.min_credits.saturating_mul(LOW_WATER_LEASES) {
            // Nothing ahead of need (zero while no request waits: no top-up).
            return credits_of(wanted);
        }
        credits_of(
            sized
                .min(free.saturating_div(FREE_SHARE).max(wanted))
                .max(wanted)
                .max(1),
        )
    }

    /// What each slot needs now (`shutdown`: release everything).
    fn plan(&self, now: Instant, shutdown: bool, lanes: Lanes) -> Planned {
        let mut planned = Planned::default();
        let idle = Duration::from_secs(self.config.idle_release_secs);
        // Every slot is looked at below: what was asked is planned with the rest (when
        // the urgent lane is free; else it stays asked for the lane's next plan).
        if lanes.urgent {
            self.asked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        }
        for shard in &self.shards {
            let mut guard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            guard.retain(|_, slot| {
                slot.lease.is_some()
                    || !slot.retired.is_empty()
                    || slot.acquiring
                    || now.saturating_duration_since(slot.last_used) < idle_after(idle, slot)
            });
            for (key, slot) in guard.iter_mut() {
                self.plan_slot(key, slot, now, shutdown, lanes, &mut planned);
            }
        }
        planned
    }

    /// The work of the slots whose requests asked since the last plan (an acquisition
    /// or a top-up they wait for; the release of a lease that ended, when the routine
    /// lane is free), without looking at any other slot. Called with the urgent lane.
    fn plan_asked(&self, now: Instant, lanes: Lanes) -> Planned {
        let asked = std::mem::take(
            &mut *self
                .asked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut planned = Planned::default();
        for key in asked {
            let shard = &self.shards[shard_of(&key) % self.shards.len()];
            let mut guard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // (A key whose slot a full plan has looked at since it asked is left.)
            if let Some(slot) = guard.get_mut(&key).filter(|slot| slot.asked) {
                self.plan_slot(&key, slot, now, false, lanes, &mut planned);
            }
        }
        planned
    }

    /// The final reports of a slot's retired leases that nothing uses any more (they
    /// are forgotten once taken), in the routine lane.
    fn plan_retired(
        &self,
        key: &SlotKey,
        slot: &mut Slot,
        lanes: Lanes,
        asked: bool,
        routine: &mut Vec<(SlotKey, Work)>,
    ) {
        let mut release_waits = false;
        for held in &mut slot.retired {
            if held.reporting || held.in_flight > 0 || !held.writing.is_empty() {
                continue;
            }
            if !lanes.routine {
                release_waits = true;
                continue;
            }
            routine.push((key.clone(), final_report(held)));
        }
        if release_waits && asked && lanes.urgent {
            // Asked for (its last request finished with it): asked again, so the
            // routine lane's next plan sends it.
            self.ask(key, slot);
        }
    }

    /// What one slot needs now, added to `planned` in the lanes that are open.
    fn plan_slot(
        &self,
        key: &SlotKey,
        slot: &mut Slot,
        now: Instant,
        shutdown: bool,
        lanes: Lanes,
        planned: &mut Planned,
    ) {
        let report_every = Duration::from_millis(self.config.report_interval_ms);
        let idle = Duration::from_secs(self.config.idle_release_secs);
        let Planned {
            urgent,
            routine: work,
        } = planned;
        let asked = slot.asked;
        if lanes.urgent {
            slot.asked = false;
        }
        let target = self.target(slot, now);
        slot.target = target;
        let slot_idle = idle_after(idle, slot);
        self.plan_retired(key, slot, lanes, asked, work);
        let Some(held) = slot.lease.as_mut() else {
            if lanes.urgent && !shutdown {
                match acquire(slot, now, target) {
                    Some(work) => urgent.push((key.clone(), work)),
                    // Waiting out a pause (nothing left, or the control plane away):
                    // asked again at the next tick, not at the next plan of every slot.
                    None if asked && slot.wanted.is_positive() && !slot.acquiring => {
                        self.ask(key, slot);
                    }
                    None => {}
                }
            }
            return;
        };
        if held.reporting {
            return;
        }
        // A lease with no room left admits nothing until a top-up: it is kept for
        // `idle_release_secs` only (keeping it longer would cost an extension
        // at the control plane for nothing). Near the end of the end user's
        // balance, room nobody here is using goes back within a second: it may
        // be all another proxy's requests are waiting for (a lease taken for a
        // request that stopped waiting, say).
        let low_water =
            slot.seen_available.get() < self.config.min_credits.saturating_mul(LOW_WATER_LEASES);
        let keep = if !held.room.is_positive() {
            idle
        } else if low_water {
            LOW_WATER_IDLE.min(slot_idle)
        } else {
            slot_idle
        };
        let unused = now.saturating_duration_since(slot.last_used) >= keep;
        let expired = now >= held.usable_until;
        let ending = shutdown || (unused && held.in_flight == 0) || held.ended || expired;
        if ending && !lanes.routine {
            // The release waits for the routine lane; requests waiting here stay asked,
            // so the next wake-up with that lane free releases it (and they re-ask).
            if asked && lanes.urgent {
                self.ask(key, slot);
            }
            return;
        }
        if ending {
            // Release: no new admissions; the final report waits for what is in
            // flight (requests still at the upstream record under it).
            held.ended = true;
            if held.in_flight == 0 {
                work.push((key.clone(), final_report(held)));
            } else if let Some(held) = slot.lease.take() {
                slot.retired.push(held);
            }
            return;
        }
        let low = held.room.get().saturating_mul(2) < target.get() || slot.wanted > held.room;
        // Spend waiting to be reported, for long enough (an unused lease makes no
        // calls until it needs extending or goes idle).
        let due = held.outstanding.is_positive()
            && now.saturating_duration_since(held.last_report) >= report_every;
        let stretched = held
            .usable_until
            .saturating_duration_since(now)
            .as_secs()
            .saturating_mul(2)
            < self.config.ttl_secs;
        // Requests wait for this report's top-up: it goes in the urgent lane.
        let waiting = slot.wanted > held.room;
        let lane_open = if waiting { lanes.urgent } else { lanes.routine };
        let needed = low || due || stretched || held.unacked.is_some();
        if needed && !lane_open && asked && lanes.urgent {
            // A top-up asked for while the routine lane is busy: asked again, so the
            // lane's next plan sends it.
            self.ask(key, slot);
            return;
        }
        if lane_open && needed {
            let top_up = low
                .then(|| target.saturating_sub_floor(held.room))
                .filter(|top_up| top_up.is_positive());
            held.reporting = true;
            let sequence = next_sequence(held);
            let report = Work::Report {
                lease: held.id.to_string(),
                sequence,
                top_up,
                release: false,
            };
            if waiting {
                urgent.push((key.clone(), report));
            } else {
                work.push((key.clone(), report));
            }
        }
    }
}

/// The acquisition a slot without a lease needs now: when requests want credits, it is
/// not backing off (nothing left, or the control plane unreachable) and none is under way.
/// The request id is kept until an answer comes, so a retry is the same request.
fn acquire(slot: &mut Slot, now: Instant, amount: Credits) -> Option<Work> {
    let blocked =
        slot.exhausted.pausing(now) || slot.unreachable_until.is_some_and(|until| now < until);
    if !slot.wanted.is_positive() || blocked || slot.acquiring {
        return None;
    }
    slot.acquiring = true;
    let request_id = slot
        .acquire_request
        .get_or_insert_with(|| format!("acq_{}", ulid::Ulid::new()))
        .clone();
    Some(Work::Acquire { amount, request_id })
}

/// How long a slot goes unused before its lease is released: `idle_release_secs`, or
/// four of its typical gaps between requests when that is longer (up to `IDLE_MAX`), so
/// an end user calling every few seconds keeps the lease rather than taking a new one
/// (and waiting for it) on most calls.
fn idle_after(idle: Duration, slot: &Slot) -> Duration {
    idle.max(slot.gap.saturating_mul(4).min(IDLE_MAX))
}

impl Leases {
    /// The control plane took a report (`answer` is the lease after it): what the slot
    /// learns (the lease's new hold and state). Its spend leaves the disk once the slot
    /// has learnt it ([`Leases::settle_report`]).
    fn reported(cost: Credits, answer: &protocol::Lease, release: bool) -> Reported {
        Reported::Done {
            cost,
            amount: Some(answer.amount),
            active: answer.status == "active" && !release,
            version: answer.version,
            available: answer.available,
        }
    }
}

/// The last reports of an ended lease: an unacknowledged report first (unchanged), then
/// the release with what is left.
fn final_report(held: &mut Held) -> Work {
    held.reporting = true;
    let release = held.unacked.is_none();
    Work::Report {
        lease: held.id.to_string(),
        sequence: next_sequence(held),
        top_up: None,
        release,
    }
}

/// The sequence the next report of `held` carries: the unacknowledged one again, or the
/// open one (new spend goes under the next from now on).
fn next_sequence(held: &mut Held) -> u64 {
    if let Some(sequence) = held.unacked {
        return sequence;
    }
    let sequence = held.open;
    held.open = held.open.saturating_add(1);
    held.unacked = Some(sequence);
    sequence
}

/// Whether a report's refusal is one the single report path repairs: no such lease, a
/// sequence gap, or a lease no longer active.
fn needs_repair(result: &LeaseBatchResult) -> bool {
    result.error.as_ref().is_some_and(|problem| {
        result.status == 404 || matches!(problem.code.as_str(), "sequence_gap" | "lease_not_active")
    })
}

/// Sends one lease batch; answers each of its `expected` operations' result in order
/// (`None` for all when the batch failed or answered the wrong number).
async fn send_batch(
    context: &Context,
    operations: Vec<LeaseOperation>,
    expected: usize,
) -> Vec<Option<LeaseBatchResult>> {
    metrics::counter!("qs_proxy_lease_batches_total").increment(1);
    metrics::histogram!("qs_proxy_lease_batch_operations").record(f64::from(
        u32::try_from(operations.len()).unwrap_or(u32::MAX),
    ));
    let sent = Instant::now();
    let answer = context.client.lease_batch(&LeaseBatch { operations }).await;
    metrics::histogram!("qs_proxy_lease_batch_seconds").record(sent.elapsed().as_secs_f64());
    match answer {
        Ok(answer) if answer.results.len() == expected => {
            answer.results.into_iter().map(Some).collect::<Vec<_>>()
        }
        Ok(answer) => {
            tracing::error!(
                sent = expected,
                answered = answer.results.len(),
                "a lease batch answered the wrong number of results"
            );
            vec![None; expected]
        }
        Err(error) => {
            if error
                .status()
                .is_some_and(|status| status.is_client_error())
            {
                tracing::error!(%error, "the control plane refused a lease batch");
            } else {
                tracing::debug!(%error, "a lease batch failed; it is sent again");
            }
            vec![None; expected]
        }
    }
}

impl Leases {
    /// The creation of a lease of `amount` for a slot (its request id kept across tries).
    fn create_operation(&self, key: &SlotKey, amount: Credits, request_id: &str) -> LeaseOperation {
        metrics::counter!("qs_proxy_lease_calls_total", "call" => "create").increment(1);
        LeaseOperation::Create(CreateLease {
            end_user_id: key.0.to_string(),
            feature_key: key.1.to_string(),
            holder: self.holder.to_string(),
            amount: amount.get(),
            ttl_seconds: i64::try_from(self.config.ttl_secs).unwrap_or(30),
            request_id: Some(request_id.to_owned()),
        })
    }

    /// Sends `work` (planned together) in one lease batch and settles each slot with its
    /// answer. A report whose sequence may still get spend written (a request took it
    /// just before it closed) waits briefly, else goes in a later batch. A report the
    /// batch answers with a gap, an ended lease or no lease goes through the single
    /// report path, which repairs those.
    async fn perform(&self, context: &Context, work: Vec<(SlotKey, Work)>) {
        let work = self.settled_writes(work).await;
        let mut operations = Vec::with_capacity(work.len());
        let mut costs = Vec::with_capacity(work.len());
        let mut ready = Vec::with_capacity(work.len());
        for (key, item) in work {
            match &item {
                Work::Acquire { amount, request_id } => {
                    let seen = context.replica.version(&key.0);
                    self.with_slot(&key, |slot| {
                        slot.acquire_seen = seen;
                        slot.asked_at = Some(Instant::now());
                    });
                    operations.push(self.create_operation(&key, *amount, request_id));
                    costs.push(Credits::ZERO);
                }
                Work::Report {
                    lease,
                    sequence,
                    top_up,
                    release,
                } => {
                    let totals = match self.spend_log.totals(lease, *sequence) {
                        Ok(totals) => totals,
                        Err(error) => {
                            tracing::error!(%error, lease, "cannot read a lease's spend");
                            self.settle_report(
                                context,
                                &key,
                                (lease, *sequence),
                                *top_up,
                                *release,
                                Reported::Later,
                            );
                            continue;
                        }
                    };
                    if top_up.is_some() {
                        self.with_slot(&key, |slot| slot.asked_at = Some(Instant::now()));
                    }
                    metrics::counter!("qs_proxy_lease_calls_total", "call" => if *release { "release" } else { "report" }).increment(1);
                    let body =
                        report_body(*sequence, totals, *top_up, *release, self.config.ttl_secs);
                    costs.push(Credits::new(body.cost));
                    let step = LeaseStep::new(lease.clone(), body);
                    operations.push(if *release {
                        LeaseOperation::Release(step)
                    } else {
                        LeaseOperation::Report(step)
                    });
                }
            }
            ready.push((key, item));
        }
        if operations.is_empty() {
            return;
        }
        let mut results = send_batch(context, operations, ready.len()).await;
        self.remember_new_leases(&ready, &results).await;
        for (((key, item), result), cost) in ready.into_iter().zip(results.iter_mut()).zip(costs) {
            let result = result.take();
            match item {
                Work::Acquire { .. } => {
                    let outcome = match result {
                        Some(LeaseBatchResult {
                            lease: Some(lease), ..
                        }) => Ok(lease),
                        other => Err(other.map(|result| result.status)),
                    };
                    self.settle_acquire(context, &key, outcome);
                }
                Work::Report {
                    lease,
                    sequence,
                    top_up,
                    release,
                } => {
                    let outcome = match result {
                        Some(LeaseBatchResult {
                            lease: Some(answer),
                            ..
                        }) => Self::reported(cost, &answer, release),
                        Some(result) if needs_repair(&result) => {
                            self.send_report(context, &lease, sequence, top_up, release)
                                .await
                        }
                        _ => Reported::Later,
                    };
                    self.settle_report(context, &key, (&lease, sequence), top_up, release, outcome);
                }
            }
        }
    }
    /// Settles a slot with the answer to its lease creation: the lease, or the status
    /// the control plane refused it with (`None`: no answer).
    /// Writes which end user and feature each lease the batch created is for, durable
    /// (one sled flush) before any request can spend from them: after a crash, the
    /// spend log's records of a lease are reported (or turned into usage) through this.
    async fn remember_new_leases(
        &self,
        ready: &[(SlotKey, Work)],
        results: &[Option<LeaseBatchResult>],
    ) {
        let mut remembered = 0usize;
        for ((key, item), result) in ready.iter().zip(results) {
            if let (
                Work::Acquire { .. },
                Some(LeaseBatchResult {
                    lease: Some(lease), ..
                }),
            ) = (item, result)
            {
                let meta = LeaseMeta {
                    end_user_id: key.0.to_string(),
                    feature_key: key.1.to_string(),
                };
                match self.disk.lease_put(&lease.id, &meta) {
                    Ok(()) => remembered = remembered.saturating_add(1),
                    Err(error) => tracing::error!(%error, "cannot remember a lease on disk"),
                }
            }
        }
        if remembered > 0 {
            let disk = self.disk.clone();
            match tokio::task::spawn_blocking(move || disk.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(%error, "cannot flush new leases to disk"),
                Err(error) => tracing::error!(%error, "the lease flush task failed"),
            }
        }
    }

    fn settle_acquire(
        &self,
        context: &Context,
        key: &SlotKey,
        answer: Result<protocol::Lease, Option<u16>>,
    ) {
        let end_user = &key.0;
        let now = Instant::now();
        match answer {
            Ok(lease) if lease.status != "active" => {
                // A repeated request id found a lease that ended meanwhile: try again
                // under a new id.
                self.with_slot(key, |slot| {
                    slot.acquiring = false;
                    slot.acquire_request = None;
                    // Whoever waits asks again (and the next wake-up plans the slot).
                    slot.notify.notify_waiters();
                });
            }
            Ok(lease) => {
                let Some(lease_id) = LeaseId::parse(&lease.id) else {
                    tracing::error!(
                        lease = lease.id,
                        "the control plane answered a lease id that is not one; not used"
                    );
                    self.with_slot(key, |slot| {
                        slot.acquiring = false;
                        slot.acquire_request = None;
                        slot.notify.notify_waiters();
                    });
                    return;
                };
                let answered_at = context.replica.now();
                self.with_slot(key, |slot| {
                    slot.acquiring = false;
                    slot.acquire_request = None;
                    slot.wanted = Credits::ZERO;
                    slot.exhausted.clear();
                    slot.unreachable_until = None;
                    slot.unreachable_backoff = Duration::ZERO;
                    slot.lease = Some(Held {
                        id: Arc::from(lease.id.as_str()),
                        lease_id,
                        room: credits_of(lease.amount),
                        outstanding: Credits::ZERO,
                        confirmed: Vec::new(),
                        in_flight: 0,
                        open: lease.sequence.saturating_add(1),
                        unacked: None,
                        writing: BTreeMap::new(),
                        usable_until: now
                            + Duration::from_secs(self.config.ttl_secs)
                                .saturating_sub(EXPIRY_MARGIN),
                        last_report: now,
                        reporting: false,
                        ended: false,
                        answered_at,
                        answered: lease.version.zip(lease.available.map(Credits::new)),
                    });
                    slot.notify.notify_waiters();
                });
            }
            Err(status) => {
                let version = context.replica.version(end_user);
                self.with_slot(key, |slot| {
                    slot.acquiring = false;
                    match status {
                        Some(402 | 403 | 404 | 422) => {
                            slot.acquire_request = None;
                            // As of the state the creation was sent on: the replica's
                            // version now may already include a grant made meanwhile.
                            slot.exhausted.refused(
                                slot.asked_at.unwrap_or(now),
                                now,
                                slot.acquire_seen.or(version).unwrap_or(0),
                            );
                        }
                        _ => {
                            tracing::debug!(?status, "taking a lease failed");
                            slot.unreachable_backoff = (slot.unreachable_backoff.saturating_mul(2))
                                .clamp(Duration::from_millis(50), Duration::from_secs(2));
                            slot.unreachable_until = Some(now + slot.unreachable_backoff);
                        }
                    }
                    slot.wanted = Credits::ZERO;
                    slot.notify.notify_waiters();
                });
            }
        }
    }

    /// Settles a slot with what became of a report (or release) `sequence` of `lease`;
    /// a report taken then leaves the spend log. In that order: until the slot has
    /// taken a report's cost off its outstanding spend (and noted it confirmed), the
    /// spend log still holds it, so nothing that waits for the log to empty (a drain,
    /// `qs_proxy_outbox_depth 0`) sees a moment where decisions count it twice.
    fn settle_report(
        &self,
        context: &Context,
        key: &SlotKey,
        (lease, sequence): (&str, u64),
        top_up: Option<Credits>,
        release: bool,
        outcome: Reported,
    ) {
        let taken = matches!(outcome, Reported::Done { .. });
        let now = Instant::now();
        let answered_at = context.replica.now();
        let version = context.replica.version(&key.0);
        self.with_slot(key, |slot| {
            let ttl = Duration::from_secs(self.config.ttl_secs).saturating_sub(EXPIRY_MARGIN);
            let Some(held) = slot.held_mut(lease) else {
                return;
            };
            held.reporting = false;
            match outcome {
                Reported::Done {
                    cost,
                    amount,
                    active,
                    version: included,
                    available,
                } => {
                    held.unacked = None;
                    held.last_report = now;
                    held.answered_at = answered_at;
                    if let (Some(_), Some(free)) = (amount, available) {
                        held.answered = Some((included.unwrap_or(0), Credits::new(free)));
                    }
                    held.outstanding = held.outstanding.saturating_sub_floor(cost);
                    // Whether or not the replica shows it yet: a decision made on the
                    // state before it may still be on its way to `try_take`.
                    if let Some(included) = included
                        && cost.is_positive()
                    {
                        held.confirmed.push((included, cost, now));
                    }
                    let shown = version.unwrap_or(0);
                    let kept = CONFIRMED_KEPT
                        .max(Duration::from_millis(self.config.wait_ms).saturating_mul(2));
                    held.confirmed.retain(|(included, _, at)| {
                        *included > shown || now.saturating_duration_since(*at) < kept
                    });
                    match amount {
                        Some(amount) if active => {
                            held.room = credits_of(amount).saturating_sub_floor(held.outstanding);
                            held.usable_until = now + ttl;
                        }
                        // Ended at the control plane (expired, say): no more admissions;
                        // the plan releases it once its spend is reported.
                        Some(_) if !release => {
                            held.ended = true;
                            held.room = Credits::ZERO;
                        }
                        _ => {}
                    }
                    let room = held.room;
                    slot.unreachable_until = None;
                    slot.unreachable_backoff = Duration::ZERO;
                    if release {
                        if slot.lease.as_ref().is_some_and(|held| &*held.id == lease) {
                            slot.lease = None;
                        }
                        slot.retired.retain(|held| &*held.id != lease);
                    } else if top_up.is_some() && slot.wanted > room {
                        // Topped up as far as the balance goes, and a request still needs
                        // more: nothing is left for it, as of the state the control plane
                        // decided on. A replica version past that one (a grant made
                        // meanwhile, which the replica may show already) ends the spell;
                        // the replica's own version at this moment could include that
                        // grant and keep the proxy refusing credits it has.
                        slot.exhausted.refused(
                            slot.asked_at.unwrap_or(now),
                            now,
                            included.or(version).unwrap_or(0),
                        );
                        // The requests waiting are refused by it; asking again is for
                        // requests that come later (not a report per batch meanwhile).
                        slot.wanted = Credits::ZERO;
                    } else if top_up.is_some() {
                        slot.exhausted.clear();
                    }
                    if slot.wanted <= room {
                        slot.wanted = Credits::ZERO;
                    }
                }
                Reported::Gone => {
                    held.ended = true;
                    held.room = Credits::ZERO;
                    held.unacked = None;
                    if slot.lease.as_ref().is_some_and(|held| &*held.id == lease) {
                        slot.lease = None;
                    }
                    slot.retired.retain(|held| &*held.id != lease);
                }
                Reported::Later => {
                    slot.unreachable_backoff = (slot.unreachable_backoff.saturating_mul(2))
                        .clamp(Duration::from_millis(50), Duration::from_secs(2));
                    slot.unreachable_until = Some(now + slot.unreachable_backoff);
                }
            }
            slot.notify.notify_waiters();
        });
        // A released lease is forgotten only once all its spend is off the log: a
        // restart in between (or after an acknowledgement that did not go in, this one
        // or an earlier report's) still finds the lease and its end user, and reports
        // the spend (the control plane answers a replay).
        if taken
            && self.acknowledge(lease, sequence)
            && release
            && self
                .spend_log
                .sequences_of(lease)
                .is_ok_and(|left| left.is_empty())
            && let Err(error) = self.disk.lease_forget(lease)
        {
            tracing::warn!(%error, "cannot forget a released lease on disk");
        }
    }

    /// Waits (up to `WRITING_WAIT`) for requests still writing spend under a report's
    /// sequence; reports still written to after that go back to their slots for a later
    /// batch (with the same sequence).
    async fn settled_writes(&self, work: Vec<(SlotKey, Work)>) -> Vec<(SlotKey, Work)> {
        let writing = |key: &SlotKey, lease: &str, sequence: u64| {
            self.with_slot(key, |slot| {
                slot.held_mut(lease)
                    .is_some_and(|held| held.writing.get(&sequence).copied().unwrap_or(0) > 0)
            })
            .unwrap_or(false)
        };
        let busy = |work: &[(SlotKey, Work)]| {
            work.iter().any(|(key, item)| match item {
                Work::Report {
                    lease, sequence, ..
                } => writing(key, lease, *sequence),
                Work::Acquire { .. } => false,
            })
        };
        let deadline = tokio::time::Instant::now() + WRITING_WAIT;
        loop {
            // Registered before the look, so a write finishing in between is not missed.
            let written = self.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            if !busy(&work) || tokio::time::timeout_at(deadline, written).await.is_err() {
                break;
            }
        }
        work.into_iter()
            .filter(|(key, item)| match item {
                Work::Report {
                    lease, sequence, ..
                } if writing(key, lease, *sequence) => {
                    self.with_slot(key, |slot| {
                        if let Some(held) = slot.held_mut(lease) {
                            held.reporting = false;
                        }
                        // A top-up left for the next batch: whoever waits for it asks
                        // again.
                        slot.notify.notify_waiters();
                    });
                    false
                }
                _ => true,
            })
            .collect()
    }
    /// The report (or release) call, with gaps filled and a lease that is gone turned
    /// into plain usage.
    async fn send_report(
        &self,
        context: &Context,
        lease: &str,
        sequence: u64,
        top_up: Option<Credits>,
        release: bool,
    ) -> Reported {
        let totals = match self.spend_log.totals(lease, sequence) {
            Ok(totals) => totals,
            Err(error) => {
                tracing::error!(%error, lease, "cannot read a lease's spend");
                return Reported::Later;
            }
        };
        let body = report_body(sequence, totals, top_up, release, self.config.ttl_secs);
        let cost = Credits::new(body.cost);
        let mut answer = call(context, lease, &body, release).await;
        metrics::counter!("qs_proxy_lease_calls_total", "call" => if release { "release" } else { "report" }).increment(1);
        // A gap: earlier sequences carried nothing that is still on disk (they were
        // acknowledged, or never had spend); send them empty, then this one again.
        if let Err(error) = &answer
            && error.code() == Some("sequence_gap")
            && let Some(expected) = problem_expected(error)
        {
            if expected > sequence {
                // This sequence was taken before (its answer was lost).
                return Reported::Done {
                    cost,
                    amount: None,
                    active: true,
                    version: None,
                    available: None,
                };
            }
            // Plain (no extension): a lease that has ended (expired while this proxy was
            // away, say) refuses an extension, and its missing reports must still go in
            // for the spend after them to.
            for missing in expected..sequence {
                let empty =
                    report_body(missing, Totals::default(), None, true, self.config.ttl_secs);
                if call(context, lease, &empty, false).await.is_err() {
                    return Reported::Later;
                }
            }
            answer = call(context, lease, &body, release).await;
        }
        // An ended lease takes no top-up or extension: send the spend alone.
        if let Err(error) = &answer
            && error.code() == Some("lease_not_active")
        {
            let plain = report_body(sequence, totals, None, true, self.config.ttl_secs);
            answer = call(context, lease, &plain, release).await;
        }
        match answer {
            Ok(lease_answer) => Self::reported(cost, &lease_answer, release),
            Err(error) if error.status().is_some_and(|status| status.as_u16() == 404) => {
                // The lease is gone (ended more than an hour ago): its spend is charged
                // as plain usage, once (the keys name lease and sequence).
                match self.to_usage(context, lease).await {
                    Ok(()) => Reported::Gone,
                    Err(error) => {
                        tracing::error!(%error, lease, "cannot turn a vanished lease's spend into usage");
                        Reported::Later
                    }
                }
            }
            Err(error) => {
                tracing::debug!(%error, lease, sequence, "reporting a lease failed; it is sent again");
                Reported::Later
            }
        }
    }

    /// Moves the spend of `lease` into the usage outbox, one usage event per report
    /// sequence (its units summed), keyed by lease and sequence so that each is charged
    /// once however often this runs.
    async fn to_usage(&self, context: &Context, lease: &str) -> Result<(), DiskError> {
        let Some(meta) = self.disk.lease_get(lease)? else {
            return Err(DiskError::new(format!(
                "lease {lease} has spend but no end user on disk"
            )));
        };
        for sequence in self.spend_log.sequences_of(lease)? {
            let totals = self.spend_log.totals(lease, sequence)?;
            if totals.requests > 0 {
                let record = Record {
                    key: format!("{lease}-{sequence}"),
                    end_user_id: meta.end_user_id.clone(),
                    pending: 0,
                    op: Op::usage(
                        meta.feature_key.clone(),
                        totals.units.max(1),
                        context.replica.now().as_millis(),
                    ),
                };
                context.outbox.push(&record).await?;
            }
            self.spend_log.acknowledge(lease, sequence)?;
        }
        self.disk.lease_forget(lease)?;
        Ok(())
    }

    /// The control plane took (or had taken) `lease`'s report `sequence`: its spend
    /// leaves the log. Should the acknowledgement not go in, the spend stays and is
    /// sent again after a restart, where the control plane answers it as a replay.
    fn acknowledge(&self, lease: &str, sequence: u64) -> bool {
        match self.spend_log.acknowledge(lease, sequence) {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(%error, lease, sequence, "cannot acknowledge reported spend");
                false
            }
        }
    }

    /// After a restart: every lease a previous run remembered has its spend reported
    /// (what the control plane already took is dropped, the rest sent in order) and is
    /// released. Stops at the first lease the control plane does not take (the caller
    /// tries again).
    async fn recover(&self, context: &Context, remembered: &[String]) -> Result<(), DiskError> {
        for lease in remembered {
            let sequences = self.spend_log.sequences_of(lease)?;
            // Done by an earlier attempt.
            if self.disk.lease_get(lease)?.is_none() && sequences.is_empty() {
                continue;
            }
            let taken = match context.client.get_lease(lease).await {
                Ok(found) => found.sequence,
                Err(error) if error.status().is_some_and(|status| status.as_u16() == 404) => {
                    self.to_usage(context, lease).await?;
                    continue;
                }
                Err(error) => {
                    return Err(DiskError::new(format!("reading lease {lease}: {error}")));
                }
            };
            let mut next = taken.saturating_add(1);
            let mut gone = false;
            for sequence in sequences {
                if sequence <= taken {
                    self.spend_log.acknowledge(lease, sequence)?;
                    continue;
                }
                match self
                    .send_report(context, lease, sequence, None, false)
                    .await
                {
                    Reported::Done { .. } => {
                        self.spend_log.acknowledge(lease, sequence)?;
                        next = sequence.saturating_add(1);
                    }
                    // Turned into usage, and forgotten.
                    Reported::Gone => {
                        gone = true;
                        break;
                    }
                    Reported::Later => {
                        return Err(DiskError::new(format!(
                            "lease {lease}: the control plane did not take report {sequence}"
                        )));
                    }
                }
            }
            if !gone {
                if let Reported::Done { .. } =
                    self.send_report(context, lease, next, None, true).await
                {
                    self.spend_log.acknowledge(lease, next)?;
                }
                self.disk.lease_forget(lease)?;
            }
            tracing::info!(lease, "reported and released a lease a previous run held");
        }
        Ok(())
    }
}

/// What a report call came to.
#[derive(Debug)]
enum Reported {
    /// Taken: its cost, the lease's hold after it (unknown when only replayed), whether
    /// the lease is still active, the state version that includes it and what the
    /// feature had free beside the holds in that state.
    Done {
        cost: Credits,
        amount: Option<i64>,
        active: bool,
        version: Option<u64>,
        available: Option<i64>,
    },
    /// The lease is gone; its spend went to the usage outbox.
    Gone,
    /// Not taken now (the control plane is away): sent again later, unchanged.
    Later,
}

fn report_body(
    sequence: u64,
    totals: Totals,
    top_up: Option<Credits>,
    plain: bool,
    ttl_secs: u64,
) -> ReportLease {
    ReportLease {
        sequence,
        units: totals.units,
        cost: totals.cost.get(),
        requests: totals.requests,
        top_up: if plain {
            None
        } else {
            top_up.map(Credits::get)
        },
        ttl_seconds: (!plain).then(|| i64::try_from(ttl_secs).unwrap_or(30)),
    }
}

async fn call(
    context: &Context,
    lease: &str,
    body: &ReportLease,
    release: bool,
) -> Result<protocol::Lease, client::Error> {
    // No idempotency key of ours: the sequence makes a report exactly-once, and a resent
    // report may carry another top-up (the client's own retries reuse its key).
    if release {
        context.client.release_lease(lease, body).await
    } else {
        context.client.report_lease(lease, body).await
    }
}

fn problem_expected(error: &client::Error) -> Option<u64> {
    match error {
        client::Error::Api { problem, .. } => problem.expected,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_used_every_few_seconds_keeps_its_lease_longer_than_the_idle_setting() {
        let idle = Duration::from_secs(10);
        let start = Instant::now();
        let mut slot = Slot::new(start);
        assert_eq!(idle_after(idle, &slot), idle, "no spend yet: the setting");
        slot.note_spend(start);
        assert_eq!(idle_after(idle, &slot), idle, "one spend: no gap yet");
        slot.note_spend(start + Duration::from_secs(5));
        assert_eq!(
            idle_after(idle, &slot),
            Duration::from_secs(20),
            "the first gap (5 s) is the estimate at once: four gaps"
        );
        slot.note_spend(start + Duration::from_secs(6));
        assert_eq!(
            slot.gap,
            Duration::from_millis(4_500),
            "then a moving average"
        );
        slot.note_spend(start + Duration::from_secs(600));
        assert_eq!(idle_after(idle, &slot), IDLE_MAX, "bounded");
    }
    fn leases(dir: &std::path::Path) -> Leases {
        let disk = Disk::open(dir, 8).expect("disk");
        let spend_log = Arc::new(SpendLog::open(&dir.join("spend"), 1 << 20).expect("spend log"));
        Leases::new(
            Holder::new("prx_test").expect("holder"),
            LeaseConfig::default(),
            disk,
            spend_log,
            Flusher::new(),
            Durability::Interval,
        )
    }

    fn held(room: i64, now: Instant) -> Held {
        Held {
            id: Arc::from("lse_01J00000000000000000000000"),
            lease_id: LeaseId::parse("lse_01J00000000000000000000000").expect("a lease id"),
            room: Credits::new(room),
            outstanding: Credits::ZERO,
            confirmed: Vec::new(),
            in_flight: 0,
            open: 1,
            unacked: None,
            writing: BTreeMap::new(),
            usable_until: now + Duration::from_secs(60),
            last_report: now,
            reporting: false,
            ended: false,
            answered_at: Timestamp::from_millis(0),
            answered: None,
        }
    }

    /// End user `u1`'s slot for `api_calls`.
    fn u1() -> SlotKey {
        (
            EndUserId::new("u1").expect("id"),
            FeatureKey::new("api_calls").expect("feature"),
        )
    }

    /// Whether any slot is asked.
    fn any_asked(leases: &Leases) -> bool {
        !leases.asked.lock().expect("asked").is_empty()
    }

    /// The plan of the asked slots once the routine lane is free, after checking that a
    /// plan while it is busy sends nothing and keeps them asked.
    fn planned_once_the_routine_lane_frees(leases: &Leases, now: Instant) -> Planned {
        let routine_busy = Lanes {
            urgent: true,
            routine: false,
        };
        let planned = leases.plan_asked(now, routine_busy);
        assert!(planned.urgent.is_empty() && planned.routine.is_empty());
        assert!(any_asked(leases), "kept for the routine lane's next plan");
        leases.plan_asked(now, Lanes::ALL)
    }

    #[test]
    fn a_lease_is_sized_to_the_rate_but_takes_at_most_an_eighth_of_what_is_free() {
        let dir = tempfile::tempdir().expect("dir");
        let leases = leases(dir.path());
        let now = Instant::now();
        let mut slot = Slot::new(now);
        slot.rate_per_second = 10_000;
        slot.seen_available = Credits::new(1_000_000);
        assert_eq!(
            leases.target(&mut slot, now),
            Credits::new(50_000),
            "five seconds at the rate"
        );
        slot.seen_available = Credits::new(1_000);
        assert_eq!(
            leases.target(&mut slot, now),
            Credits::new(125),
            "an eighth"
        );
        slot.wanted = Credits::new(300);
        assert_eq!(
            leases.target(&mut slot, now),
            Credits::new(300),
            "never less than a waiting request needs"
        );
        slot.seen_available = Credits::new(30);
        slot.wanted = Credits::new(2);
        assert_eq!(
            leases.target(&mut slot, now),
            Credits::new(2),
            "below four times min_credits free: exactly what waits"
        );
    }

    #[test]
    fn near_the_end_of_a_balance_unused_room_goes_back_after_a_second() {
        let dir = tempfile::tempdir().expect("dir");
        let leases = leases(dir.path());
        let start = Instant::now();
        let key = u1();
        for (free, expect_release) in [(30, true), (1_000, false)] {
            leases.with_slot_or_new(&key, start, |slot| {
                slot.lease = Some(held(3, start));
                slot.seen_available = Credits::new(free);
                slot.last_used = start;
            });
            let planned = leases.plan(start + Duration::from_secs(2), false, Lanes::ALL);
            let released = planned
                .routine
                .iter()
                .any(|(_, work)| matches!(work, Work::Report { release: true, .. }));
            assert_eq!(released, expect_release, "{free} free");
            leases.with_slot(&key, |slot| {
                slot.lease = None;
                slot.retired.clear();
            });
        }
    }

    /// A wake-up plans the slots whose requests asked, and no other: its cost does not
    /// grow with the number of slots. The tick's plan still looks at every slot.
    #[test]
    fn a_wake_up_plans_only_the_slots_whose_requests_wait() {
        let dir = tempfile::tempdir().expect("dir");
        let leases = Arc::new(leases(dir.path()));
        let now = Instant::now();
        let key = |user: &str| -> SlotKey {
            (
                EndUserId::new(user).expect("id"),
                FeatureKey::new("api_calls").expect("feature"),
            )
        };
        let (waiting, quiet) = (key("u_waiting"), key("u_quiet"));
        // A slot that would want a lease, but no request of its waits now.
        leases.with_slot_or_new(&quiet, now, |slot| slot.wanted = Credits::new(5));
        // A request finds no lease: it asks (twice: asked once).
        let request = || {
            leases.try_take(
                &waiting,
                Credits::new(5),
                Credits::new(1_000),
                None,
                now,
                now,
            )
        };
        assert!(request().is_err(), "no lease yet: the request waits");
        assert!(request().is_err());
        let planned = leases.plan_asked(now, Lanes::ALL);
        let keys: Vec<&SlotKey> = planned.urgent.iter().map(|(key, _)| key).collect();
        assert_eq!(keys, [&waiting], "the asking slot alone, once");
        assert!(
            matches!(planned.urgent[0].1, Work::Acquire { .. }),
            "{planned:?}"
        );
        assert!(planned.routine.is_empty());
        assert!(
            leases.plan_asked(now, Lanes::ALL).urgent.is_empty(),
            "asked once, planned once"
        );
        // A plan while the urgent lane is busy leaves what is asked for its next plan.
        leases.with_slot(&waiting, |slot| slot.acquiring = false);
        let _ = request();
        let routine_only = Lanes {
            urgent: false,
            routine: true,
        };
        assert!(leases.plan(now, false, routine_only).urgent.is_empty());
        let planned = leases.plan_asked(now, Lanes::ALL);
        let keys: Vec<&SlotKey> = planned.urgent.iter().map(|(key, _)| key).collect();
        assert_eq!(keys, [&waiting], "still asked after a routine-only plan");
        // The tick's plan finds the other slot.
        let planned = leases.plan(now, false, Lanes::ALL);
        let keys: Vec<&SlotKey> = planned.urgent.iter().map(|(key, _)| key).collect();
        assert_eq!(
            keys,
            [&quiet],
            "the waiting slot's acquisition is under way"
        );
    }

    /// A request leaving less than half the target in the room asks for a top-up then
    /// (not at the next plan of every slot, up to `FULL_PLAN_MAX` away), once, and not
    /// while a report is under way; a routine lane busy at the plan keeps it asked.
    #[test]
    fn a_request_taking_the_room_low_asks_for_a_top_up() {
        let dir = tempfile::tempdir().expect("dir");
        let leases = Arc::new(leases(dir.path()));
        let now = Instant::now();
        let key = u1();
        let before = now
            .checked_sub(Duration::from_secs(1))
            .expect("an earlier instant");
        leases.with_slot_or_new(&key, now, |slot| {
            let mut lease = held(20, now);
            lease.last_report = before;
            slot.lease = Some(lease);
            slot.target = Credits::new(20);
        });
        let take = || match leases.try_take(
            &key,
            Credits::new(5),
            Credits::new(1_000_000),
            None,
            now,
            now,
        ) {
            Ok(Taken::Spent(spend)) => spend,
            other => panic!("the lease has room: {other:?}"),
        };
        let asked = || any_asked(&leases);
        let mut spends = vec![take(), take()];
        assert!(!asked(), "10 of 20 left: not low yet");
        spends.push(take());
        assert!(asked(), "5 of 20 left: low");
        let planned = planned_once_the_routine_lane_frees(&leases, now);
        assert!(
            matches!(
                planned.routine.as_slice(),
                [(_, Work::Report { top_up: Some(top_up), .. })] if top_up.is_positive()
            ),
            "{planned:?}"
        );
        assert!(!asked());
        spends.push(take());
        assert!(!asked(), "the report under way tops it up: no second ask");
        // The report failed: its retry is the full plan's, after the backoff; requests
        // taking the room low meanwhile do not hurry it. Each condition alone holds
        // the ask back.
        let before_report = before;
        let set = |unreachable: bool, unacked: Option<u64>, last_report: Instant| {
            leases.with_slot(&key, |slot| {
                let held = slot.lease.as_mut().expect("held");
                held.reporting = false;
                held.room = Credits::new(15);
                held.unacked = unacked;
                held.last_report = last_report;
                slot.unreachable_until = unreachable.then(|| now + Duration::from_secs(1));
            });
        };
        set(true, None, before_report);
        spends.push(take());
        assert!(!asked(), "backing off");
        set(false, Some(1), before_report);
        spends.push(take());
        assert!(
            !asked(),
            "an unacknowledged report: its retry is the full plan's"
        );
        set(false, None, now);
        spends.push(take());
        assert!(!asked(), "within a tick of the last report");
        set(false, None, before_report);
        spends.push(take());
        assert!(asked(), "none of those: a low room asks again");
        drop(spends);
    }

    /// The last request of an ended lease finishing with it asks the planner, so the
    /// lease's final report and release go at once (not at the next plan of every slot).
    #[tokio::test(flavor = "current_thread")]
    async fn the_last_write_to_an_ended_lease_asks_for_its_release() {
        let dir = tempfile::tempdir().expect("dir");
        let leases = Arc::new(leases(dir.path()));
        let now = Instant::now();
        let key = u1();
        leases.with_slot_or_new(&key, now, |slot| slot.lease = Some(held(20, now)));
        let take =
            || match leases.try_take(&key, Credits::new(1), Credits::new(1_000), None, now, now) {
                Ok(Taken::Spent(spend)) => spend,
                other => panic!("the lease has room: {other:?}"),
            };
        let (first, second) = (take(), take());
        // The lease ends (idle, expired) while both requests are at the upstream.
        leases.with_slot(&key, |slot| {
            let held = slot.lease.as_mut().expect("held");
            held.ended = true;
            let retired = slot.lease.take().expect("held");
            slot.retired.push(retired);
        });
        let asked = || any_asked(&leases);
        first.record(1).await.expect("recorded");
        assert!(!asked(), "one request still in flight");
        drop(second);
        assert!(asked(), "the last one given back: the release can go");
        let planned = planned_once_the_routine_lane_frees(&leases, now);
        assert!(
            matches!(
                planned.routine.as_slice(),
                [(_, Work::Report { release: true, .. })]
            ),
            "{planned:?}"
        );
    }

    /// A request waiting on a lease that ended: its release waits for the routine lane,
    /// and the slot stays asked until a wake-up with that lane free releases it.
    #[test]
    fn an_asked_slot_whose_lease_ended_is_released_when_the_routine_lane_is_free() {
        let dir = tempfile::tempdir().expect("dir");
        let leases = Arc::new(leases(dir.path()));
        let now = Instant::now();
        let key: SlotKey = (
            EndUserId::new("u_ended").expect("id"),
            FeatureKey::new("api_calls").expect("feature"),
        );
        leases.with_slot_or_new(&key, now, |slot| {
            let mut lease = held(0, now);
            lease.ended = true;
            slot.lease = Some(lease);
        });
        let asked = leases.try_take(&key, Credits::new(5), Credits::new(1_000), None, now, now);
        assert!(
            asked.is_err(),
            "an ended lease admits nothing: the request waits"
        );
        let urgent_only = Lanes {
            urgent: true,
            routine: false,
        };
        let planned = leases.plan_asked(now, urgent_only);
        assert!(planned.urgent.is_empty() && planned.routine.is_empty());
        let planned = leases.plan_asked(now, Lanes::ALL);
        assert!(
            planned.routine.iter().any(|(planned, work)| planned == &key
                && matches!(work, Work::Report { release: true, .. })),
            "still asked, and released once the routine lane is free: {planned:?}"
        );
    }

    /// A disk whose every flush fails (a full or failing disk).
    struct Refusing;

    impl crate::disk::Flush for Refusing {
        fn flush(&self) -> Result<(), DiskError> {
            Err(DiskError::new("the disk is full".into()))
        }
    }

    /// In `sync` durability: a spend the log took but whose flush failed stays charged
    /// (the log reports it; the lease keeps it as outstanding, its room spent), where
    /// one the log refused goes back to the lease. Before, both went back, and the
    /// report of the first then took its cost off the outstanding spend a second time.
    #[tokio::test]
    async fn a_spend_in_the_log_stays_charged_when_its_flush_fails() {
        let dir = tempfile::tempdir().expect("dir");
        let flusher = Flusher::new();
        let (stop_tx, stop) = watch::channel(false);
        let flushing = tokio::spawn(flusher.clone().run(
            Arc::new(Refusing),
            Duration::from_secs(3600),
            stop,
        ));
        let now = Instant::now();
        let key = u1();
        for (log_bytes, written) in [(1 << 20, true), (0, false)] {
            let spend_log = Arc::new(
                SpendLog::open(&dir.path().join(format!("spend-{log_bytes}")), log_bytes)
                    .expect("spend log"),
            );
            let leases = Arc::new(Leases::new(
                Holder::new("prx_test").expect("holder"),
                LeaseConfig::default(),
                Disk::open(&dir.path().join(format!("disk-{log_bytes}")), 8).expect("disk"),
                Arc::clone(&spend_log),
                Arc::clone(&flusher),
                Durability::Sync,
            ));
            leases.with_slot_or_new(&key, now, |slot| slot.lease = Some(held(10, now)));
            let Ok(Taken::Spent(spend)) =
                leases.try_take(&key, Credits::new(3), Credits::new(100), None, now, now)
            else {
                panic!("the lease has room");
            };
            let outcome = spend.record(1).await;
            let (outstanding, room) = leases
                .with_slot(&key, |slot| {
                    let held = slot.lease.as_ref().expect("held");
                    (held.outstanding.get(), held.room.get())
                })
                .expect("slot");
            let logged = spend_log
                .totals("lse_01J00000000000000000000000", 1)
                .expect("totals")
                .cost
                .get();
            if written {
                assert!(
                    matches!(outcome, Err(Unrecorded::NotDurable(_))),
                    "{outcome:?}"
                );
                assert_eq!((outstanding, room, logged), (3, 7, 3), "charged");
            } else {
                assert!(
                    matches!(outcome, Err(Unrecorded::NotWritten(_))),
                    "{outcome:?}"
                );
                assert_eq!((outstanding, room, logged), (0, 10, 0), "given back");
            }
        }
        stop_tx.send(true).expect("stop");
        flushing.await.expect("the flusher ends");
    }

    /// Requests answered in one pass record their spends together (one write for all),
    /// and a request dropped after queueing its spend (a client gone, a shutdown) still
    /// has it written before its report may go: charged, and no sequence left waiting.
    #[tokio::test(flavor = "current_thread")]
    async fn spends_recorded_together_or_dropped_midway_are_all_in_the_log() {
        let dir = tempfile::tempdir().expect("dir");
        let spend_log =
            Arc::new(SpendLog::open(&dir.path().join("spend"), 1 << 20).expect("spend log"));
        let leases = Arc::new(Leases::new(
            Holder::new("prx_test").expect("holder"),
            LeaseConfig::default(),
            Disk::open(&dir.path().join("disk"), 8).expect("disk"),
            Arc::clone(&spend_log),
            Flusher::new(),
            Durability::Interval,
        ));
        let now = Instant::now();
        let key = u1();
        leases.with_slot_or_new(&key, now, |slot| slot.lease = Some(held(100, now)));
        let take =
            || match leases.try_take(&key, Credits::new(2), Credits::new(500), None, now, now) {
                Ok(Taken::Spent(spend)) => spend,
                other => panic!("the lease has room: {other:?}"),
            };
        let logged = |sequence| {
            spend_log
                .totals("lse_01J00000000000000000000000", sequence)
                .expect("totals")
        };
        // Each request queues its spend and yields; the first back writes all four.
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        let mut recording: Vec<_> = (0..4).map(|_| Box::pin(take().record(1))).collect();
        for record in &mut recording {
            assert!(record.as_mut().poll(&mut context).is_pending(), "queued");
        }
        assert_eq!(spend_log.bytes(), 0, "queued, none written yet");
        let four = u64::try_from(4 * crate::spend_log::RECORD_BYTES).expect("fits");
        let mut first = recording.remove(0);
        assert!(matches!(
            first.as_mut().poll(&mut context),
            std::task::Poll::Ready(Ok(()))
        ));
        assert_eq!(
            spend_log.bytes(),
            four,
            "the first back wrote every queued spend"
        );
        assert_eq!((logged(1).requests, logged(1).cost.get()), (4, 8));
        let recorded = finish_recording(recording).await;
        assert!(recorded.iter().all(Result::is_ok), "{recorded:?}");
        assert_eq!(spend_log.bytes(), four, "the others found theirs written");

        // Dropped while its spend waits in the queue.
        let mut recording = Box::pin(take().record(1));
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        assert!(
            recording.as_mut().poll(&mut context).is_pending(),
            "queued, yielding to the others of its pass"
        );
        drop(recording);
        assert_eq!((logged(1).requests, logged(1).cost.get()), (5, 10));
        let (outstanding, room, writing) = leases
            .with_slot(&key, |slot| {
                let held = slot.lease.as_ref().expect("held");
                (held.outstanding.get(), held.room.get(), held.writing.len())
            })
            .expect("slot");
        assert_eq!(
            (outstanding, room, writing),
            (10, 90, 0),
            "charged, and settled"
        );
    }

    /// Drives recordings already started to their end, one after the other.
    async fn finish_recording<F>(recording: Vec<std::pin::Pin<Box<F>>>) -> Vec<F::Output>
    where
        F: std::future::Future,
    {
        let mut outcomes = Vec::new();
        for record in recording {
            outcomes.push(record.await);
        }
        outcomes
    }

    #[test]
    fn a_refusal_answers_the_requests_before_its_ask_and_pauses_only_when_repeated() {
        let start = Instant::now();
        let later = |millis| start + Duration::from_millis(millis);
        let mut exhausted = Exhausted::default();
        // The ask went out at 10 ms and was refused at 12 ms, on version 4.
        exhausted.refused(later(10), later(12), 4);
        assert!(
            exhausted.refuses(later(5), later(12)),
            "arrived before the ask"
        );
        assert!(
            !exhausted.refuses(later(11), later(12)),
            "after it: asks again"
        );
        // Refused again: a pause of 2 ms, then 4 ms.
        exhausted.refused(later(13), later(14), 4);
        assert!(exhausted.refuses(later(15), later(15)), "within the pause");
        assert!(!exhausted.refuses(later(15), later(16)), "after it");
        exhausted.refused(later(17), later(18), 4);
        assert!(exhausted.pausing(later(21)));
        assert!(!exhausted.pausing(later(22)));
        // A newer state of the end user (a grant) ends the spell.
        exhausted.outdated_by(Some(4));
        assert!(
            exhausted.pausing(later(21)),
            "the same version: still refused"
        );
        exhausted.outdated_by(Some(5));
        assert!(!exhausted.refuses(later(1), later(19)));
    }
}
