//! A seeded simulation: thousands of random operations over a simulated month — grants,
//! usage, reservations, leases (holds, reports with top-ups, replays and gaps, releases,
//! expiries), voids, adjustments, subscriptions with monthly credits and 5-hour
//! windows (period- and first-use-anchored) with rollover and caps, and their lifecycle —
//! with the invariants, replay and the serde round trip checked after every step (by
//! `World`) and conservation at the end. The seed is printed when a run fails;
//! `QS_SIM_SEED` replays one, `QS_SIM_STEPS` scales the run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use ledger::{
    CancelAt, ChangeAt, CommitSize, Credits, ExpireAfter, GrantAnchor, GrantRequest, GrantTemplate,
    HoldSize, Holder, LeaseId, LeaseReport, LeaseRequest, OveragePolicy, PlanKind, ReservationId,
    ReserveRequest, Rollover, SubscribeRequest, SubscriptionId, VariantId,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::{World, credits, days, hours, key, monthly, secs, template, window};

const FEATURES: [&str; 3] = ["api_calls", "tokens", "images"];

fn steps() -> usize {
    std::env::var("QS_SIM_STEPS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(3000)
}

fn seeds() -> Vec<u64> {
    match std::env::var("QS_SIM_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
    {
        Some(seed) => vec![seed],
        None => vec![1, 2, 3, 0x00C0_FFEE],
    }
}

struct Catalog {
    basic: VariantId,
    pro: VariantId,
    addon: VariantId,
}

fn catalog(world: &mut World) -> Catalog {
    let free = world.add_plan(
        PlanKind::Base,
        &["api_calls"],
        OveragePolicy::Block,
        vec![monthly(0, vec![template(20)])],
    )[0];
    world.catalog.settings.free_plan_variant_id = Some(free);
    world.catalog.settings.low_balance_threshold = Some(credits(50));
    let rolling = GrantTemplate {
        rollover: Some(Rollover {
            percent: 50,
            max: Some(credits(300)),
        }),
        ..template(1000)
    };
    let capped = GrantTemplate {
        expire_after: ExpireAfter::Never,
        cap: Some(credits(500)),
        ..template(200)
    };
    let basic = world.add_plan(
        PlanKind::Base,
        &["api_calls", "images"],
        OveragePolicy::Block,
        vec![monthly(1000, vec![rolling, capped])],
    )[0];
    let windowed = GrantTemplate {
        priority: 10,
        ..window(45, hours(5), GrantAnchor::FirstUse)
    };
    let pro = world.add_plan(
        PlanKind::Base,
        &["api_calls", "images", "tokens"],
        OveragePolicy::Allow,
        vec![monthly(
            3000,
            vec![
                template(5000),
                windowed,
                window(30, hours(5), GrantAnchor::Period),
            ],
        )],
    )[0];
    let addon = world.add_plan(
        PlanKind::Addon,
        &["tokens"],
        OveragePolicy::Block,
        vec![monthly(500, vec![template(100)])],
    )[0];
    Catalog { basic, pro, addon }
}

/// One random operation; refusals are fine (World checks they changed nothing).
fn random_step(
    world: &mut World,
    rng: &mut StdRng,
    plans: &Catalog,
    reservations: &mut Vec<ReservationId>,
    leases: &mut Vec<LeaseId>,
) {
    let feature = FEATURES[rng.random_range(0..3)];
    let subscription = |world: &World| -> Option<SubscriptionId> {
        world.state.subscriptions().first().map(|s| s.id)
    };
    match rng.random_range(0..100) {
        0..=14 => {
            let mut request = GrantRequest::new(credits(rng.random_range(1..500)));
            request.priority = [10, 100, 100, 500][rng.random_range(0..4)];
            if rng.random_bool(0.5) {
                request.expires_at = world.now.checked_add(hours(rng.random_range(1..200))).ok();
            }
            if rng.random_bool(0.2) {
                request.feature_keys = Some(Arc::from(vec![key(feature)]));
            }
            request.price_paid = rng.random_bool(0.3).then_some(999);
            request.settles_debt = rng.random_bool(0.8);
            let _ = world.apply(|state, cx| state.grant(cx, request));
        }
        15..=39 => {
            let _ = world.try_usage(feature, rng.random_range(1..2000), rng.random_bool(0.3));
        }
        40 => {
            let request = LeaseRequest {
                feature_key: key(feature),
                holder: Holder::new(["proxy-a", "proxy-b"][rng.random_range(0..2)])
                    .expect("holder"),
                amount: credits(rng.random_range(1..300)),
                ttl_secs: rng.random_range(30..20_000),
                request_id: None,
            };
            if let Ok(lease) = world.apply(|state, cx| state.take_lease(cx, request)) {
                leases.push(lease.id);
            }
        }
        41..=44 if !leases.is_empty() => lease_step(world, rng, leases),
        45..=52 => {
            let request = ReserveRequest {
                feature_key: key(feature),
                size: HoldSize::Amount(credits(rng.random_range(1..200))),
                ttl_secs: Some(rng.random_range(60..50_000)),
            };
            if let Ok(reservation) = world.apply(|state, cx| state.reserve(cx, request)) {
                reservations.push(reservation.id);
            }
        }
        53..=60 if !reservations.is_empty() => {
            let id = reservations.swap_remove(rng.random_range(0..reservations.len()));
            let size = match rng.random_range(0..4) {
                0 => CommitSize::Hold,
                1 => CommitSize::Amount(Credits::ZERO),
                _ => CommitSize::Amount(credits(rng.random_range(0..400))),
            };
            let _ = if rng.random_bool(0.8) {
                world.apply(|state, cx| state.commit(cx, id, size))
            } else {
                world.apply(|state, cx| state.release(cx, id))
            };
        }
        61..=63 => {
            let blocks: Vec<_> = world.state.blocks().iter().map(|block| block.id).collect();
            if !blocks.is_empty() {
                let id = blocks[rng.random_range(0..blocks.len())];
                let _ = world.apply(|state, cx| state.void_block(cx, id));
            }
        }
        64..=66 => {
            let amount = credits(rng.random_range(-100..100))
                .checked_add(credits(0))
                .unwrap_or(Credits::ZERO);
            if !amount.is_zero() {
                let _ = world.apply(|state, cx| {
                    state.adjust(
                        cx,
                        ledger::AdjustRequest {
                            amount,
                            feature_keys: None,
                        },
                    )
                });
            }
        }
        67..=70 => {
            let variant = [plans.basic, plans.pro, plans.addon][rng.random_range(0..3)];
            let trial_days = rng.random_bool(0.2).then_some(7);
            let _ = world.apply(|state, cx| {
                state.subscribe(
                    cx,
                    SubscribeRequest {
                        plan_variant_id: variant,
                        trial_days,
                        start_at: None,
                    },
                )
            });
        }
        71..=76 => {
            if let Some(id) = subscription(world) {
                let _ = match rng.random_range(0..6) {
                    0 | 1 => world.apply(|state, cx| state.renew(cx, id, rng.random_range(1..3))),
                    2 => world.apply(|state, cx| state.pause(cx, id)),
                    3 => world.apply(|state, cx| state.resume(cx, id)),
                    4 => {
                        let at = if rng.random_bool(0.5) {
                            CancelAt::Immediate
                        } else {
                            CancelAt::PeriodEnd
                        };
                        let revoke = rng.random_bool(0.5);
                        world.apply(|state, cx| state.cancel(cx, id, at, revoke))
                    }
                    _ => {
                        let target = if rng.random_bool(0.5) {
                            plans.basic
                        } else {
                            plans.pro
                        };
                        let at = [None, Some(ChangeAt::Immediate), Some(ChangeAt::PeriodEnd)]
                            [rng.random_range(0..3)];
                        world.apply(|state, cx| state.change(cx, id, target, at))
                    }
                };
            }
        }
        _ => {
            // Clock jumps averaging about 15 minutes: thousands of steps cover a month.
            let jump = if rng.random_bool(0.05) {
                hours(rng.random_range(1..30))
            } else {
                secs(rng.random_range(1..1200))
            };
            world.advance_by(jump);
        }
    }
}

/// A report (now and then replayed, skipping a sequence, topping up, extending) or a
/// release of one of the leases taken so far.
fn lease_step(world: &mut World, rng: &mut StdRng, leases: &[LeaseId]) {
    let id = leases[rng.random_range(0..leases.len())];
    let Some(last) = world.state.lease(id).map(|lease| lease.sequence) else {
        return;
    };
    let sequence = match rng.random_range(0..10) {
        0 => last.max(1),
        1 => last + 2,
        _ => last + 1,
    };
    let cost = rng.random_range(0..200);
    let release = rng.random_bool(0.1);
    let report = LeaseReport {
        sequence,
        units: u64::try_from(cost).expect("units"),
        cost: credits(cost),
        requests: rng.random_range(0..50),
        top_up: (!release && rng.random_bool(0.4)).then(|| credits(rng.random_range(1..200))),
        ttl_secs: (!release && rng.random_bool(0.3)).then(|| rng.random_range(30..20_000)),
    };
    let _ = if release {
        world.apply(|state, cx| state.release_lease(cx, id, report))
    } else {
        world.apply(|state, cx| state.report_lease(cx, id, report))
    };
}

/// Every block's and the end user's credits are accounted for.
fn check_conservation(world: &World) {
    let totals = world.state.totals();
    let remaining: i64 = world
        .state
        .blocks()
        .iter()
        .map(|block| block.remaining.get())
        .sum();
    assert_eq!(
        totals.granted.get(),
        totals.burned.get() + totals.expired.get() + totals.voided.get() + remaining
    );
    let granted_in_entries: i64 = world
        .entries
        .iter()
        .filter_map(|entry| entry.block.as_ref())
        .map(|block| block.amount.get())
        .sum();
    assert_eq!(
        granted_in_entries,
        totals.granted.get(),
        "every granted credit has its entry"
    );
}

fn run(seed: u64) -> (usize, ledger::Timestamp) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut world = World::new();
    let plans = catalog(&mut world);
    let mut reservations = Vec::new();
    let mut leases = Vec::new();
    let start = world.now;
    for _ in 0..steps() {
        random_step(&mut world, &mut rng, &plans, &mut reservations, &mut leases);
    }
    // Let everything due by the month's end happen, then check the books.
    let month_end = start.checked_add(days(31)).expect("instant").max(world.now);
    world.advance_to(month_end);
    check_conservation(&world);
    (world.entries.len(), world.now)
}

// Thousands of random operations over a month keep every invariant, replay exactly, and
// conserve credits, for several seeds.
#[test]
fn a_simulated_month() {
    for seed in seeds() {
        match catch_unwind(AssertUnwindSafe(|| run(seed))) {
            Ok((entries, _)) => assert!(
                entries > 1000,
                "seed {seed}: the run did real work ({entries} entries)"
            ),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                panic!(
                    "simulation failed with seed {seed} (replay: QS_SIM_SEED={seed} cargo test -p ledger --test it month): {message}"
                );
            }
        }
    }
}
