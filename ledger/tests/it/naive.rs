//! Property tests against a deliberately naive model: random sequences of grants, usage
//! (strict and not), reservations (hold, commit, release), leases (hold, reports with
//! top-ups, extensions, replays and gaps, release, expiry), voids, adjustments and clock
//! jumps run through the engine (via `World`, which checks invariants, replay and the
//! serde round trip after every step) and through `Naive`, written from SPEC 3 and 7 with
//! plain loops and no shared code; the two must agree on every outcome and balance.

use std::sync::Arc;

use ledger::{
    AdjustRequest, BlockId, CommitSize, GrantRequest, HoldSize, Holder, LEASE_KEPT_SECS, LeaseId,
    LeaseReport, LeaseRequest, Refusal, ReservationId, ReserveRequest, Span, Timestamp,
};
use proptest::prelude::*;

use crate::support::{World, credits, key};

const FEATURES: [&str; 3] = ["api_calls", "tokens", "images"];

#[derive(Debug, Clone)]
enum Op {
    Grant {
        amount: i64,
        priority: u16,
        effective_in_secs: i64,
        lifetime_secs: Option<i64>,
        scope: Option<usize>,
        paid: bool,
        settles_debt: bool,
    },
    Usage {
        feature: usize,
        units: u64,
        strict: bool,
    },
    Void {
        block: usize,
    },
    Adjust {
        amount: i64,
        scope: Option<usize>,
    },
    Reserve {
        feature: usize,
        amount: i64,
        ttl_secs: i64,
    },
    Commit {
        reservation: usize,
        amount: Option<i64>,
    },
    Release {
        reservation: usize,
    },
    Lease {
        feature: usize,
        amount: i64,
        ttl_secs: i64,
        /// The holder's request id (a few, so repeats happen).
        request: Option<u8>,
    },
    Report {
        lease: usize,
        cost: i64,
        top_up: Option<i64>,
        ttl_secs: Option<i64>,
        /// 0: the next sequence; 1: one too far (a gap); -1: the last one again.
        skew: i64,
        release: bool,
    },
    Advance {
        secs: i64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1i64..400, prop::sample::select(vec![10u16, 100, 100, 500]), prop_oneof![3 => Just(0i64), 1 => 1i64..7200],
              prop::option::of(600i64..40_000), prop::option::of(0usize..3), any::<bool>(), prop::bool::weighted(0.8))
            .prop_map(|(amount, priority, effective_in_secs, lifetime_secs, scope, paid, settles_debt)| Op::Grant { amount, priority, effective_in_secs, lifetime_secs, scope, paid, settles_debt }),
        4 => (0usize..3, 1u64..3000, any::<bool>()).prop_map(|(feature, units, strict)| Op::Usage { feature, units, strict }),
        1 => (0usize..16).prop_map(|block| Op::Void { block }),
        1 => (-200i64..200, prop::option::of(0usize..3)).prop_filter("not zero", |(amount, _)| *amount != 0).prop_map(|(amount, scope)| Op::Adjust { amount, scope }),
        2 => (0usize..3, 1i64..300, 60i64..20_000).prop_map(|(feature, amount, ttl_secs)| Op::Reserve { feature, amount, ttl_secs }),
        2 => (0usize..8, prop::option::of(0i64..400)).prop_map(|(reservation, amount)| Op::Commit { reservation, amount }),
        1 => (0usize..8).prop_map(|reservation| Op::Release { reservation }),
        2 => (0usize..3, 1i64..300, 30i64..20_000, prop::option::of(0u8..4)).prop_map(|(feature, amount, ttl_secs, request)| Op::Lease { feature, amount, ttl_secs, request }),
        4 => (0usize..6, 0i64..150, prop::option::of(1i64..200), prop::option::of(30i64..20_000), prop::sample::select(vec![0i64, 0, 0, 0, 1, -1]), prop::bool::weighted(0.15))
            .prop_map(|(lease, cost, top_up, ttl_secs, skew, release)| Op::Report { lease, cost, top_up, ttl_secs, skew, release }),
        2 => (1i64..30_000).prop_map(|secs| Op::Advance { secs }),
    ]
}

/// The outcome of an operation, by kind of refusal.
fn class(result: &Result<(), Refusal>) -> &'static str {
    match result {
        Ok(()) => "ok",
        Err(Refusal::InsufficientBalance { .. }) => "insufficient_balance",
        Err(Refusal::BlockNotFound(_) | Refusal::ReservationNotFound(_)) => "not_found",
        Err(Refusal::BlockAlreadyVoided(_)) => "already_voided",
        Err(Refusal::ReservationNotActive { .. }) => "not_active",
        Err(Refusal::Conflict(_)) => "conflict",
        Err(Refusal::LeaseNotFound(_)) => "lease_not_found",
        Err(Refusal::LeaseNotActive { .. }) => "lease_not_active",
        Err(Refusal::SequenceGap { .. }) => "gap",
        Err(Refusal::Invalid {
            field: "top_up", ..
        }) => "invalid_release",
        Err(Refusal::Invalid {
            field: "request_id",
            ..
        }) => "invalid",
        Err(other) => panic!("unexpected refusal {other:?}"),
    }
}

// --- the naive model -----------------------------------------------------------------

#[derive(Debug, Clone)]
struct NBlock {
    id: BlockId,
    remaining: i64,
    held: i64,
    priority: u16,
    effective: i64,
    expires: Option<i64>,
    scope: Option<usize>,
    paid: bool,
    settles: bool,
    voided: bool,
}

#[derive(Debug, Clone)]
struct NReservation {
    id: ReservationId,
    feature: usize,
    parts: Vec<(usize, i64)>,
    expires: i64,
    live: bool,
}

#[derive(Debug, Clone)]
struct NLease {
    id: LeaseId,
    feature: usize,
    parts: Vec<(usize, i64)>,
    expires: i64,
    /// When it ended (expired or released), if it did.
    ended: Option<i64>,
    sequence: u64,
    forgotten: bool,
    request: Option<u8>,
}

/// Everything in plain integers (milliseconds, credits) and vectors that are never
/// pruned; every query scans from scratch.
#[derive(Debug, Clone, Default)]
struct Naive {
    now: i64,
    blocks: Vec<NBlock>,
    reservations: Vec<NReservation>,
    leases: Vec<NLease>,
    debt: [i64; 3],
    /// Reservations and blocks whose expiry this step's due work did.
    expired_reservations: Vec<ReservationId>,
    expired_blocks: Vec<usize>,
}

impl Naive {
    fn usable(&self, index: usize) -> bool {
        let block = &self.blocks[index];
        !block.voided
            && block.effective <= self.now
            && block.expires.is_none_or(|expires| self.now < expires)
    }

    fn applies(&self, index: usize, feature: Option<usize>) -> bool {
        match (self.blocks[index].scope, feature) {
            (Some(scope), Some(feature)) => scope == feature,
            _ => true,
        }
    }

    /// Usable blocks for `feature` (any when `None`) in the SPEC 3.1 order; creation order
    /// stands for "created_at, then id" (ids ascend as blocks are made).
    fn order(&self, feature: Option<usize>) -> Vec<usize> {
        let mut indices: Vec<usize> = (0..self.blocks.len())
            .filter(|&i| self.usable(i) && self.applies(i, feature))
            .collect();
        indices.sort_by_key(|&i| {
            let block = &self.blocks[i];
            (
                block.priority,
                block.expires.is_none(),
                block.expires.unwrap_or(0),
                block.paid,
                i,
            )
        });
        indices
    }

    fn available(&self, feature: Option<usize>) -> i64 {
        self.order(feature)
            .iter()
            .map(|&i| self.blocks[i].remaining - self.blocks[i].held)
            .sum()
    }

    /// Takes up to `amount` of unheld credits in order; burns or holds them.
    fn take(&mut self, feature: Option<usize>, amount: i64, hold: bool) -> Vec<(usize, i64)> {
        let mut left = amount;
        let mut parts = Vec::new();
        for i in self.order(feature) {
            let free = self.blocks[i].remaining - self.blocks[i].held;
            let take = free.min(left);
            if take > 0 {
                if hold {
                    self.blocks[i].held += take;
                } else {
                    self.blocks[i].remaining -= take;
                }
                left -= take;
                parts.push((i, take));
            }
        }
        parts
    }

    /// Debt is paid feature by feature in key order (api_calls, images, tokens).
    fn settle(&mut self) {
        let mut by_key: Vec<usize> = (0..3).collect();
        by_key.sort_by_key(|&feature| FEATURES[feature]);
        for feature in by_key {
            for i in self.order(Some(feature)) {
                if self.debt[feature] == 0 {
                    break;
                }
                if !self.blocks[i].settles {
                    continue;
                }
                let pay = (self.blocks[i].remaining - self.blocks[i].held).min(self.debt[feature]);
                self.blocks[i].remaining -= pay;
                self.debt[feature] -= pay;
            }
        }
    }

    /// Releases held parts; what lands on a voided or expired block is lost at once.
    fn release(&mut self, parts: &[(usize, i64)]) {
        for &(i, amount) in parts {
            self.blocks[i].held -= amount;
            let expired = self.blocks[i]
                .expires
                .is_some_and(|expires| expires <= self.now);
            if self.blocks[i].voided || expired {
                let free = self.blocks[i].remaining - self.blocks[i].held;
                self.blocks[i].remaining -= free;
            }
        }
    }

    /// Moves the clock to `to`, doing due work in time order: reservation expiries
    /// before block expiries at one instant, debt settled after each.
    fn run_to(&mut self, to: i64) {
        loop {
            let reservation = self
                .reservations
                .iter()
                .enumerate()
                .filter(|(_, r)| r.live && r.expires <= to)
                .min_by_key(|(_, r)| r.expires)
                .map(|(i, r)| (r.expires, 0, i));
            let block = (0..self.blocks.len())
                .filter(|&i| {
                    !self.blocks[i].voided
                        && self.blocks[i].remaining > self.blocks[i].held
                        && self.blocks[i].expires.is_some_and(|e| e <= to)
                })
                .map(|i| (self.blocks[i].expires.unwrap_or(0), 1, i))
                .min();
            let effective = (0..self.blocks.len())
                .filter(|&i| self.blocks[i].effective > self.now && self.blocks[i].effective <= to)
                .map(|i| (self.blocks[i].effective, 3, i))
                .min();
            // Leases expire after reservations and before blocks at one instant; ended
            // ones are forgotten an hour after their end.
            let lease = self
                .leases
                .iter()
                .enumerate()
                .filter(|(_, l)| l.ended.is_none() && l.expires <= to)
                .map(|(i, l)| (l.expires, 1, i))
                .min();
            let forget = self
                .leases
                .iter()
                .enumerate()
                .filter_map(|(i, l)| {
                    let at = l.ended? + LEASE_KEPT_SECS * 1000;
                    (!l.forgotten && at <= to).then_some((at, 4, i))
                })
                .min();
            let block = block.map(|(at, _, i)| (at, 2, i));
            let Some((at, kind, index)) = [reservation, lease, block, effective, forget]
                .into_iter()
                .flatten()
                .min()
            else {
                break;
            };
            self.now = self.now.max(at);
            match kind {
                0 => {
                    self.reservations[index].live = false;
                    self.expired_reservations.push(self.reservations[index].id);
                    let parts = self.reservations[index].parts.clone();
                    self.release(&parts);
                }
                1 => {
                    self.leases[index].ended = Some(at);
                    let parts = std::mem::take(&mut self.leases[index].parts);
                    self.release(&parts);
                }
                2 => {
                    let free = self.blocks[index].remaining - self.blocks[index].held;
                    self.blocks[index].remaining -= free;
                    self.expired_blocks.push(index);
                }
                4 => self.leases[index].forgotten = true,
                _ => {}
            }
            self.settle();
        }
        self.now = to;
        self.settle();
    }
}

// --- running both --------------------------------------------------------------------

fn at_ms(world: &World, offset: i64) -> Timestamp {
    world
        .now
        .checked_add(Span::from_millis(offset))
        .expect("instant")
}

/// Applies `op` to both and returns (engine outcome, model outcome). Like the engine, the
/// model keeps nothing of a refused step, not even the due work done at its start.
fn step(
    world: &mut World,
    naive: &mut Naive,
    reservations: &mut Vec<ReservationId>,
    op: &Op,
) -> (&'static str, &'static str) {
    let before = naive.clone();
    naive.expired_reservations.clear();
    naive.expired_blocks.clear();
    let outcome = step_inner(world, naive, reservations, op);
    if outcome.1 != "ok" {
        *naive = before;
    }
    outcome
}

fn step_inner(
    world: &mut World,
    naive: &mut Naive,
    reservations: &mut Vec<ReservationId>,
    op: &Op,
) -> (&'static str, &'static str) {
    let now = world.now.as_millis();
    naive.run_to(now);
    match op.clone() {
        Op::Grant {
            amount,
            priority,
            effective_in_secs,
            lifetime_secs,
            scope,
            paid,
            settles_debt,
        } => {
            let effective = now + effective_in_secs * 1000;
            let expires = lifetime_secs.map(|secs| effective + secs * 1000);
            let request = GrantRequest {
                amount: credits(amount),
                priority,
                effective_at: Some(at_ms(world, effective_in_secs * 1000)),
                expires_at: expires.map(Timestamp::from_millis),
                source: ledger::BlockSource::Purchase,
                feature_keys: scope.map(|s| Arc::from(vec![key(FEATURES[s])])),
                price_paid: paid.then_some(100),
                currency: None,
                settles_debt,
            };
            let result = world.apply(|state, cx| state.grant(cx, request));
            if let Ok(id) = &result {
                naive.blocks.push(NBlock {
                    id: *id,
                    remaining: amount,
                    held: 0,
                    priority,
                    effective,
                    expires,
                    scope,
                    paid,
                    settles: settles_debt,
                    voided: false,
                });
                naive.settle();
            }
            (class(&result.map(|_| ())), "ok")
        }
        Op::Usage {
            feature,
            units,
            strict,
        } => {
            let cost = if feature == 1 {
                (i64::try_from(units).expect("units") * 3 + 999) / 1000
            } else {
                i64::try_from(units).expect("units")
            };
            let expected = if strict && naive.available(Some(feature)) < cost {
                "insufficient_balance"
            } else {
                let covered: i64 = naive
                    .take(Some(feature), cost, false)
                    .iter()
                    .map(|(_, a)| a)
                    .sum();
                naive.debt[feature] += cost - covered;
                naive.settle();
                "ok"
            };
            let result = world
                .try_usage(FEATURES[feature], units, strict)
                .map(|_| ());
            (class(&result), expected)
        }
        Op::Void { block } => {
            if naive.blocks.is_empty() {
                return ("ok", "ok");
            }
            let index = block % naive.blocks.len();
            let id = naive.blocks[index].id;
            let target = &naive.blocks[index];
            let expired = target.expires.is_some_and(|e| e <= now);
            let expected = if target.voided && target.remaining > 0 {
                "already_voided"
            } else if expired && (target.remaining > 0 || naive.expired_blocks.contains(&index)) {
                "conflict"
            } else if target.remaining == 0 {
                "not_found"
            } else {
                let free = target.remaining - target.held;
                naive.blocks[index].remaining -= free;
                naive.blocks[index].voided = true;
                "ok"
            };
            (
                class(
                    &world
                        .apply(|state, cx| state.void_block(cx, id))
                        .map(|_| ()),
                ),
                expected,
            )
        }
        Op::Adjust { amount, scope } => {
            let expected = if amount > 0 {
                naive.blocks.push(NBlock {
                    id: BlockId(ledger::Ulid(0)),
                    remaining: amount,
                    held: 0,
                    priority: 100,
                    effective: now,
                    expires: None,
                    scope,
                    paid: false,
                    settles: true,
                    voided: false,
                });
                naive.settle();
                "ok"
            } else if naive.available(scope) < -amount {
                "insufficient_balance"
            } else {
                naive.take(scope, -amount, false);
                "ok"
            };
            let request = AdjustRequest {
                amount: credits(amount),
                feature_keys: scope.map(|s| Arc::from(vec![key(FEATURES[s])])),
            };
            let result = world.apply(|state, cx| state.adjust(cx, request));
            if let (Ok(Some(id)), true, Some(last)) = (&result, amount > 0, naive.blocks.last_mut())
            {
                last.id = *id;
            }
            (class(&result.map(|_| ())), expected)
        }
        Op::Reserve {
            feature,
            amount,
            ttl_secs,
        } => {
            let request = ReserveRequest {
                feature_key: key(FEATURES[feature]),
                size: HoldSize::Amount(credits(amount)),
                ttl_secs: Some(ttl_secs),
            };
            let expected = if naive.available(Some(feature)) < amount {
                "insufficient_balance"
            } else {
                "ok"
            };
            let result = world.apply(|state, cx| state.reserve(cx, request));
            if let Ok(reservation) = &result {
                let parts = naive.take(Some(feature), amount, true);
                naive.reservations.push(NReservation {
                    id: reservation.id,
                    feature,
                    parts,
                    expires: now + ttl_secs * 1000,
                    live: true,
                });
                reservations.push(reservation.id);
            }
            (class(&result.map(|_| ())), expected)
        }
        Op::Commit { .. } | Op::Release { .. } if reservations.is_empty() => ("ok", "ok"),
        Op::Commit {
            reservation,
            amount,
        } => {
            let id = reservations[reservation % reservations.len()];
            let size = amount.map_or(CommitSize::Hold, |a| CommitSize::Amount(credits(a)));
            let expected = resolve(naive, id, Some(amount));
            (
                class(
                    &world
                        .apply(|state, cx| state.commit(cx, id, size))
                        .map(|_| ()),
                ),
                expected,
            )
        }
        Op::Release { reservation } => {
            let id = reservations[reservation % reservations.len()];
            let expected = resolve(naive, id, None);
            (
                class(&world.apply(|state, cx| state.release(cx, id)).map(|_| ())),
                expected,
            )
        }
        Op::Lease {
            feature,
            amount,
            ttl_secs,
            request: request_id,
        } => {
            let available = naive.available(Some(feature));
            // A request id this holder used for a lease still kept answers that lease
            // (same feature) or is refused (another feature), changing nothing.
            let earlier = request_id.and_then(|wanted| {
                naive
                    .leases
                    .iter()
                    .find(|lease| !lease.forgotten && lease.request == Some(wanted))
                    .map(|lease| (lease.id, lease.feature))
            });
            let request = LeaseRequest {
                feature_key: key(FEATURES[feature]),
                holder: Holder::new("proxy-a").expect("holder"),
                amount: credits(amount),
                ttl_secs,
                request_id: request_id.map(|id| format!("req-{id}")),
            };
            if let Some((id, earlier_feature)) = earlier {
                let result = world.apply(|state, cx| state.take_lease(cx, request));
                let expected = if earlier_feature == feature {
                    "ok"
                } else {
                    "invalid"
                };
                if let Ok(lease) = &result {
                    assert_eq!(lease.id, id, "a repeated request id answers its lease");
                }
                return (class(&result.map(|_| ())), expected);
            }
            let expected = if available <= 0 {
                "insufficient_balance"
            } else {
                "ok"
            };
            let result = world.apply(|state, cx| state.take_lease(cx, request));
            if let Ok(lease) = &result {
                let parts = naive.take(Some(feature), amount.min(available), true);
                naive.leases.push(NLease {
                    id: lease.id,
                    feature,
                    parts,
                    expires: now + ttl_secs * 1000,
                    ended: None,
                    sequence: 0,
                    forgotten: false,
                    request: request_id,
                });
            }
            (class(&result.map(|_| ())), expected)
        }
        Op::Report { .. } if naive.leases.is_empty() => ("ok", "ok"),
        Op::Report {
            lease,
            cost,
            top_up,
            ttl_secs,
            skew,
            release,
        } => {
            let index = lease % naive.leases.len();
            let last = naive.leases[index].sequence;
            let sequence = match skew {
                1 => last + 2,
                -1 if last > 0 => last,
                _ => last + 1,
            };
            let report = LeaseReport {
                sequence,
                units: u64::try_from(cost).expect("units"),
                cost: credits(cost),
                requests: 1,
                top_up: top_up.filter(|_| !release).map(credits),
                ttl_secs: ttl_secs.filter(|_| !release),
            };
            let expected = naive_report(naive, index, &report, release);
            let id = naive.leases[index].id;
            let result = if release {
                world.apply(|state, cx| state.release_lease(cx, id, report))
            } else {
                world.apply(|state, cx| state.report_lease(cx, id, report))
            };
            (class(&result.map(|_| ())), expected)
        }
        Op::Advance { secs } => {
            world.advance_to(at_ms(world, secs * 1000));
            naive.run_to(world.now.as_millis());
            ("ok", "ok")
        }
    }
}

/// The model's lease report (and release): SPEC 12.1 read plainly.
fn naive_report(
    naive: &mut Naive,
    index: usize,
    report: &LeaseReport,
    release: bool,
) -> &'static str {
    let lease = naive.leases[index].clone();
    if lease.forgotten {
        return "lease_not_found";
    }
    if report.sequence <= lease.sequence {
        return "ok";
    }
    if report.sequence != lease.sequence + 1 {
        return "gap";
    }
    let active = lease.ended.is_none();
    if !active && (report.top_up.is_some() || report.ttl_secs.is_some()) {
        return "lease_not_active";
    }
    let cost = report.cost.get();
    let held: i64 = lease.parts.iter().map(|(_, a)| a).sum();
    let from_hold = if active { cost.min(held) } else { 0 };
    let mut left = from_hold;
    let mut rest = Vec::new();
    for (i, amount) in lease.parts {
        let burn = amount.min(left);
        naive.blocks[i].held -= burn;
        naive.blocks[i].remaining -= burn;
        left -= burn;
        if amount > burn {
            rest.push((i, amount - burn));
        }
    }
    let beyond = cost - from_hold;
    if beyond > 0 {
        let covered: i64 = naive
            .take(Some(lease.feature), beyond, false)
            .iter()
            .map(|(_, a)| a)
            .sum();
        naive.debt[lease.feature] += beyond - covered;
    }
    if let (Some(top_up), true) = (report.top_up, active) {
        let wanted = top_up.get().min(naive.available(Some(lease.feature)));
        if wanted > 0 {
            rest.extend(naive.take(Some(lease.feature), wanted, true));
        }
    }
    let now = naive.now;
    let stored = &mut naive.leases[index];
    stored.parts = rest;
    stored.sequence = report.sequence;
    if let Some(ttl_secs) = report.ttl_secs {
        stored.expires = now + ttl_secs * 1000;
    }
    if release && active {
        stored.ended = Some(now);
        let parts = std::mem::take(&mut stored.parts);
        naive.release(&parts);
    }
    naive.settle();
    "ok"
}

/// The model's commit (`commit: Some(amount)`) or release (`None`).
fn resolve(naive: &mut Naive, id: ReservationId, commit: Option<Option<i64>>) -> &'static str {
    let Some(index) = naive.reservations.iter().position(|r| r.id == id) else {
        return "not_found";
    };
    if !naive.reservations[index].live {
        // Expired by the due work of this very step, or resolved earlier.
        return if naive.expired_reservations.contains(&id) {
            "not_active"
        } else {
            "not_found"
        };
    }
    naive.reservations[index].live = false;
    let parts = naive.reservations[index].parts.clone();
    let held: i64 = parts.iter().map(|(_, a)| a).sum();
    let actual = match commit {
        None => 0,
        Some(None) => held,
        Some(Some(amount)) => amount,
    };
    let mut left = actual.min(held);
    let mut rest = Vec::new();
    for (i, amount) in parts {
        let burn = amount.min(left);
        naive.blocks[i].held -= burn;
        naive.blocks[i].remaining -= burn;
        left -= burn;
        if amount > burn {
            rest.push((i, amount - burn));
        }
    }
    naive.release(&rest);
    if actual > held {
        let feature = naive.reservations[index].feature;
        let excess = actual - held;
        let covered: i64 = naive
            .take(Some(feature), excess, false)
            .iter()
            .map(|(_, a)| a)
            .sum();
        naive.debt[feature] += excess - covered;
    }
    naive.settle();
    "ok"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    // The engine and the naive model agree on every outcome, every available balance
    // (per feature and over all), every debt and the total held, after every step.
    #[test]
    fn engine_agrees_with_the_naive_model(ops in prop::collection::vec(op(), 1..40)) {
        let mut world = World::new();
        let mut naive = Naive { now: world.now.as_millis(), ..Naive::default() };
        let mut reservations = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            let (engine, model) = step(&mut world, &mut naive, &mut reservations, op);
            prop_assert_eq!(engine, model, "outcome of step {} {:?}", index, op);
            // Compare as of now, with due work done on copies (a refused step leaves the
            // engine's state as it was, due work included, and so does the model).
            let settled = world.settled();
            let mut model = naive.clone();
            model.run_to(world.now.as_millis());
            let now = world.now;
            for (feature, name) in FEATURES.iter().enumerate() {
                prop_assert_eq!(settled.available(Some(&key(name)), now).expect("available").get(), model.available(Some(feature)), "available {} after step {} {:?}", name, index, op);
                prop_assert_eq!(settled.debt(&key(name)).get(), model.debt[feature], "debt {} after step {} {:?}", name, index, op);
            }
            prop_assert_eq!(settled.available(None, now).expect("available").get(), model.available(None), "available after step {} {:?}", index, op);
            let held: i64 = model.blocks.iter().map(|b| b.held).sum();
            prop_assert_eq!(settled.held(None).expect("held").get(), held, "held after step {} {:?}", index, op);
        }
    }
}
