//! Leases (SPEC 12.1): a hold for one proxy, spent in sequence-numbered reports through
//! its parts in burn order, topped up and extended as it goes, released or expired, and
//! late reports charged once each. The fixture checks the invariants and replays the
//! entries after every step.

use ledger::{
    Credits, GrantRequest, Holder, LEASE_KEPT_SECS, Lease, LeaseId, LeaseReport, LeaseReported,
    LeaseRequest, LeaseStatus, Refusal, Span, TierMode,
};

use crate::support::{World, at, credits, key, secs};

fn holder(name: &str) -> Holder {
    Holder::new(name).expect("holder")
}

fn take(world: &mut World, amount: i64, ttl_secs: i64) -> Result<Lease, Refusal> {
    world.apply(|state, cx| {
        state.take_lease(
            cx,
            LeaseRequest {
                feature_key: key("api_calls"),
                holder: holder("proxy-a"),
                amount: credits(amount),
                ttl_secs,
                request_id: None,
            },
        )
    })
}

fn report(sequence: u64, cost: i64) -> LeaseReport {
    LeaseReport {
        sequence,
        units: u64::try_from(cost).expect("units"),
        cost: credits(cost),
        requests: u64::try_from(cost).expect("requests"),
        top_up: None,
        ttl_secs: None,
    }
}

fn send(world: &mut World, id: LeaseId, report: LeaseReport) -> Result<LeaseReported, Refusal> {
    world.apply(|state, cx| state.report_lease(cx, id, report))
}

fn held_total(world: &World) -> i64 {
    world
        .state
        .blocks()
        .iter()
        .map(|block| block.held.get())
        .sum()
}

// A lease holds as much as is available (never nothing), in burn order; the held credits
// are no longer available to anyone else.
#[test]
fn a_lease_holds_what_is_available() {
    let mut world = World::new();
    world.grant(GrantRequest {
        priority: 10,
        ..GrantRequest::new(credits(30))
    });
    world.grant_amount(70);
    let lease = take(&mut world, 50, 60).expect("lease");
    assert_eq!(lease.held, credits(50));
    assert_eq!(
        lease.parts.len(),
        2,
        "the priority-10 block first, then the other"
    );
    assert_eq!(lease.parts[0].amount, credits(30));
    assert_eq!(world.available("api_calls"), 50);
    let partial = take(&mut world, 80, 60).expect("partial lease");
    assert_eq!(partial.held, credits(50), "only what is left");
    assert_eq!(world.available("api_calls"), 0);
    let refused = take(&mut world, 1, 60);
    assert!(
        matches!(refused, Err(Refusal::InsufficientBalance { .. })),
        "{refused:?}"
    );
    assert_eq!(world.entry_types(), vec!["grant", "grant", "hold", "hold"]);
}

// Reports debit their cost from the hold through its parts in order, count units toward
// the period, top up and extend; each report is one commit entry.
#[test]
fn reports_spend_the_hold_in_order_and_top_it_up() {
    let mut world = World::new();
    world.grant(GrantRequest {
        priority: 10,
        ..GrantRequest::new(credits(5))
    });
    let second = world.grant_amount(100);
    let lease = take(&mut world, 20, 60).expect("lease");
    let reported = send(&mut world, lease.id, report(1, 8)).expect("report");
    assert_eq!(reported.lease.held, credits(12));
    assert_eq!(reported.beyond_hold, Credits::ZERO);
    assert_eq!(
        world.remaining_of(second),
        97,
        "5 from the first block, 3 from the second"
    );
    let topped = send(
        &mut world,
        lease.id,
        LeaseReport {
            top_up: Some(credits(30)),
            ttl_secs: Some(120),
            ..report(2, 4)
        },
    )
    .expect("report with top-up");
    assert_eq!(topped.topped_up, credits(30));
    assert_eq!(topped.lease.held, credits(38));
    assert_eq!(topped.lease.expires_at, at(secs(120)));
    assert_eq!(topped.lease.granted, credits(50));
    assert_eq!(topped.lease.spent, credits(12));
    assert_eq!(topped.lease.units, 12);
    assert_eq!(held_total(&world), 38);
    assert_eq!(world.available("api_calls"), 105 - 12 - 38);
    let commits: Vec<i64> = world
        .entries
        .iter()
        .filter(|entry| entry.entry_type.as_str() == "commit")
        .map(|entry| entry.amount.get())
        .collect();
    assert_eq!(commits, vec![8, 4], "one commit entry per report");
}

// Units reported count toward the period's usage: a tiered feature prices the next event
// by the units the lease reported.
#[test]
fn reported_units_count_toward_tiers() {
    let mut world = World::new();
    world.add_feature(crate::support::metered(
        "tiered",
        Some(ledger::Pricing::Tiered {
            mode: TierMode::Graduated,
            tiers: vec![
                ledger::Tier {
                    up_to: Some(10),
                    unit_cost: credits(2),
                },
                ledger::Tier {
                    up_to: None,
                    unit_cost: credits(1),
                },
            ],
        }),
    ));
    world.grant_amount(1000);
    let lease = world
        .apply(|state, cx| {
            state.take_lease(
                cx,
                LeaseRequest {
                    feature_key: key("tiered"),
                    holder: holder("proxy-a"),
                    amount: credits(100),
                    ttl_secs: 60,
                    request_id: None,
                },
            )
        })
        .expect("lease");
    send(
        &mut world,
        lease.id,
        LeaseReport {
            units: 10,
            cost: credits(20),
            requests: 10,
            ..report(1, 0)
        },
    )
    .expect("report");
    // The first ten units were in the 2-credit tier: the next one costs 1.
    assert_eq!(world.usage("tiered", 1).cost, credits(1));
}

// A sequence taken before changes nothing and answers the lease as it stands; one that
// skips answers the expected sequence.
#[test]
fn sequences_make_reports_exactly_once() {
    let mut world = World::new();
    world.grant_amount(100);
    let lease = take(&mut world, 50, 60).expect("lease");
    send(&mut world, lease.id, report(1, 5)).expect("first");
    let version = world.state.version();
    let replayed = send(&mut world, lease.id, report(1, 5)).expect("replay");
    assert!(replayed.replayed);
    assert_eq!(replayed.lease.held, credits(45));
    assert_eq!(world.state.version(), version, "nothing changed");
    let gap = send(&mut world, lease.id, report(3, 5));
    assert_eq!(gap, Err(Refusal::SequenceGap { expected: 2 }));
    send(&mut world, lease.id, report(2, 5)).expect("second");
    assert!(
        send(&mut world, lease.id, report(1, 5))
            .expect("old")
            .replayed
    );
    assert_eq!(
        world.state.lease(lease.id).expect("lease").spent,
        credits(10)
    );
}

// A report costing more than the hold: the hold covers what it can, the rest is charged
// like usage (available credits, then debt): the work was done.
#[test]
fn cost_beyond_the_hold_is_charged_like_usage() {
    let mut world = World::new();
    world.grant_amount(10);
    let lease = take(&mut world, 6, 60).expect("lease");
    let reported = send(&mut world, lease.id, report(1, 13)).expect("report");
    assert_eq!(reported.beyond_hold, credits(7));
    assert_eq!(reported.lease.held, Credits::ZERO);
    assert_eq!(world.available("api_calls"), 0);
    assert_eq!(
        world.debt("api_calls"),
        3,
        "4 available covered, 3 became debt"
    );
}

// At its TTL the unspent hold goes back (entry `expire`, event `lease.expired`); a late
// report is still charged once, like usage; an hour after the end the lease is gone.
#[test]
fn an_expired_lease_takes_late_reports_then_is_forgotten() {
    let mut world = World::new();
    world.grant_amount(100);
    let lease = take(&mut world, 40, 30).expect("lease");
    send(&mut world, lease.id, report(1, 10)).expect("report");
    world.advance_to(at(secs(30)));
    let expired = world.state.lease(lease.id).expect("kept").clone();
    assert_eq!(expired.status, LeaseStatus::Expired);
    assert_eq!(held_total(&world), 0);
    assert_eq!(world.available("api_calls"), 90);
    assert!(world.event_types().contains(&"lease.expired"));
    let late = send(&mut world, lease.id, report(2, 7)).expect("late report");
    assert_eq!(late.beyond_hold, credits(7));
    assert_eq!(world.available("api_calls"), 83);
    assert!(
        send(&mut world, lease.id, report(2, 7))
            .expect("again")
            .replayed
    );
    let top_up = send(
        &mut world,
        lease.id,
        LeaseReport {
            top_up: Some(credits(5)),
            ..report(3, 0)
        },
    );
    assert!(matches!(top_up, Err(Refusal::LeaseNotActive { .. })));
    world.advance_by(Span::from_secs(LEASE_KEPT_SECS).expect("span"));
    assert!(world.state.lease(lease.id).is_none(), "forgotten");
    assert_eq!(
        send(&mut world, lease.id, report(3, 1)),
        Err(Refusal::LeaseNotFound(lease.id))
    );
}

// A release is a final report, then the rest of the hold goes back at once.
#[test]
fn a_release_reports_then_returns_the_rest() {
    let mut world = World::new();
    world.grant_amount(100);
    let lease = take(&mut world, 40, 60).expect("lease");
    let released = world
        .apply(|state, cx| state.release_lease(cx, lease.id, report(1, 15)))
        .expect("release");
    assert_eq!(released.lease.status, LeaseStatus::Released);
    assert_eq!(released.lease.spent, credits(15));
    assert_eq!(held_total(&world), 0);
    assert_eq!(world.available("api_calls"), 85);
    let again = world
        .apply(|state, cx| state.release_lease(cx, lease.id, report(1, 15)))
        .expect("replayed release");
    assert!(again.replayed);
    assert_eq!(world.available("api_calls"), 85);
}

// A held part is protected like a reservation's: its block's unheld remainder expires,
// the held part only once the lease lets it go.
#[test]
fn held_credits_survive_their_blocks_expiry_until_released() {
    let mut world = World::new();
    let block = world.grant(GrantRequest {
        expires_at: Some(at(secs(10))),
        ..GrantRequest::new(credits(50))
    });
    let lease = take(&mut world, 20, 60).expect("lease");
    world.advance_to(at(secs(10)));
    assert_eq!(world.remaining_of(block), 20, "the unheld 30 expired");
    send(&mut world, lease.id, report(1, 5)).expect("spent from the hold");
    world
        .apply(|state, cx| state.release_lease(cx, lease.id, report(2, 0)))
        .expect("release");
    assert_eq!(
        world.remaining_of(block),
        0,
        "the released 15 expired at once"
    );
}

// A creation that repeats a request id its holder used before (the answer was lost)
// answers that lease and holds nothing more; the id used for another feature is refused;
// another holder's request ids are its own.
#[test]
fn a_repeated_request_id_answers_the_same_lease() {
    let mut world = World::new();
    world.grant_amount(1000);
    let request = |holder_name: &str, feature: &str, amount: i64| LeaseRequest {
        feature_key: key(feature),
        holder: holder(holder_name),
        amount: credits(amount),
        ttl_secs: 60,
        request_id: Some("req-1".into()),
    };
    let first = world
        .apply(|state, cx| state.take_lease(cx, request("proxy-a", "api_calls", 100)))
        .expect("lease");
    let entries = world.state.version();
    let again = world
        .apply(|state, cx| state.take_lease(cx, request("proxy-a", "api_calls", 300)))
        .expect("the same lease");
    assert_eq!(again.id, first.id);
    assert_eq!(again.held, credits(100), "nothing more held");
    assert_eq!(world.state.version(), entries, "nothing changed");
    assert_eq!(held_total(&world), 100);
    let other_feature =
        world.apply(|state, cx| state.take_lease(cx, request("proxy-a", "images", 10)));
    assert!(
        matches!(
            other_feature,
            Err(Refusal::Invalid {
                field: "request_id",
                ..
            })
        ),
        "{other_feature:?}"
    );
    let other_holder = world
        .apply(|state, cx| state.take_lease(cx, request("proxy-b", "api_calls", 50)))
        .expect("another holder's lease");
    assert_ne!(other_holder.id, first.id);
    assert_eq!(held_total(&world), 150);
}
