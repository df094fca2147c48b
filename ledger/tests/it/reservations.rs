//! Reservations (SPEC 7): holds across blocks, commits below, at and above the hold,
//! releases, extensions, expiry, and held credits protected from void and expiry.

use ledger::{
    CommitSize, EntryType, GrantRequest, HoldSize, Refusal, Reservation, ReservationId,
    ReservationStatus, ReserveRequest,
};

use crate::support::{World, at, credits, hours, key, secs, units};

fn reserve(world: &mut World, amount: i64, ttl_secs: Option<i64>) -> Result<Reservation, Refusal> {
    let request = ReserveRequest {
        feature_key: key("api_calls"),
        size: HoldSize::Amount(credits(amount)),
        ttl_secs,
    };
    world.apply(|state, cx| state.reserve(cx, request))
}

fn commit(world: &mut World, id: ReservationId, size: CommitSize) -> Result<Reservation, Refusal> {
    world.apply(|state, cx| state.commit(cx, id, size))
}

/// `(committed, released, available afterwards, debt afterwards)` of committing `size`
/// against a hold of 60 on blocks of 50 and 50.
fn check_commit(size: CommitSize) -> (i64, i64, i64, i64) {
    let mut world = World::new();
    world.grant_amount(50);
    world.grant_amount(50);
    let reservation = reserve(&mut world, 60, None).expect("hold");
    assert_eq!(
        world.available("api_calls"),
        40,
        "held credits are not available"
    );
    let committed = commit(&mut world, reservation.id, size).expect("commit");
    assert_eq!(committed.status, ReservationStatus::Committed);
    assert!(world.state.reservations().is_empty());
    (
        committed.committed_amount.get(),
        committed.released_amount.get(),
        world.available("api_calls"),
        world.debt("api_calls"),
    )
}

// A hold spans blocks in burn order and is binding at once.
#[test]
fn holds_span_blocks_in_burn_order() {
    let mut world = World::new();
    let first = world.grant(GrantRequest {
        priority: 10,
        ..GrantRequest::new(credits(30))
    });
    let second = world.grant_amount(50);
    let reservation = reserve(&mut world, 40, None).expect("hold");
    let parts: Vec<(ledger::BlockId, i64)> = reservation
        .parts
        .iter()
        .map(|part| (part.block_id, part.amount.get()))
        .collect();
    assert_eq!(parts, vec![(first, 30), (second, 10)]);
    assert_eq!(world.available("api_calls"), 40);
    assert_eq!(world.state.held(None).expect("held").get(), 40);
    let too_much = reserve(&mut world, 41, None);
    assert_eq!(
        too_much,
        Err(Refusal::InsufficientBalance {
            needed: credits(41),
            available: credits(40)
        })
    );
    assert_eq!(world.event_types().last(), Some(&"reservation.created"));
}

// Commit below the hold releases the rest.
#[test]
fn commit_below_the_hold() {
    assert_eq!(
        check_commit(CommitSize::Amount(credits(45))),
        (45, 15, 55, 0)
    );
}

// Commit at the hold, explicitly or with no amount.
#[test]
fn commit_at_the_hold() {
    assert_eq!(
        check_commit(CommitSize::Amount(credits(60))),
        (60, 0, 40, 0)
    );
    assert_eq!(check_commit(CommitSize::Hold), (60, 0, 40, 0));
}

// Commit above the hold charges the excess like usage: available credits, then debt.
#[test]
fn commit_above_the_hold() {
    assert_eq!(
        check_commit(CommitSize::Amount(credits(90))),
        (90, 0, 10, 0)
    );
    assert_eq!(
        check_commit(CommitSize::Amount(credits(130))),
        (130, 0, 0, 30)
    );
}

// `amount: 0` commits nothing and releases everything.
#[test]
fn commit_zero_releases_all() {
    assert_eq!(
        check_commit(CommitSize::Amount(credits(0))),
        (0, 60, 100, 0)
    );
}

// Commit by units prices them now; the entry trail is commit, release, debit.
#[test]
fn commit_by_units_and_entry_trail() {
    let mut world = World::new();
    world.grant_amount(100);
    let request = ReserveRequest {
        feature_key: key("tokens"),
        size: HoldSize::Units(units(10_000)),
        ttl_secs: None,
    };
    let reservation = world
        .apply(|state, cx| state.reserve(cx, request))
        .expect("hold");
    assert_eq!(reservation.amount.get(), 30, "10,000 tokens at 3 per 1000");
    let committed =
        commit(&mut world, reservation.id, CommitSize::Units(units(4_001))).expect("commit");
    assert_eq!(
        committed.committed_amount.get(),
        13,
        "ceil(4001 * 3 / 1000)"
    );
    assert_eq!(world.available("tokens"), 87);
    let types: Vec<&str> = world.entry_types().into_iter().skip(1).collect();
    assert_eq!(types, vec!["hold", "commit", "release"]);

    let reservation = reserve(&mut world, 10, None).expect("hold");
    commit(&mut world, reservation.id, CommitSize::Amount(credits(12))).expect("commit above");
    let types: Vec<&str> = world.entry_types().into_iter().rev().take(2).collect();
    assert_eq!(types, vec!["debit", "commit"]);
    assert_eq!(
        world.entries.last().and_then(|entry| entry.reservation_id),
        Some(reservation.id)
    );
}

// Release returns everything; resolving again is refused; other ids are not found.
#[test]
fn release_and_resolved_reservations() {
    let mut world = World::new();
    world.grant_amount(10);
    let reservation = reserve(&mut world, 10, None).expect("hold");
    let released = world
        .apply(|state, cx| state.release(cx, reservation.id))
        .expect("release");
    assert_eq!(
        (released.status, released.released_amount.get()),
        (ReservationStatus::Released, 10)
    );
    assert_eq!(world.available("api_calls"), 10);
    // The engine keeps only live reservations; the control plane answers
    // `reservation_not_active` from its store for resolved ones.
    assert_eq!(
        commit(&mut world, reservation.id, CommitSize::Hold),
        Err(Refusal::ReservationNotFound(reservation.id))
    );
}

// A reservation expires at `expires_at`, releasing its hold with an `expire` entry; a
// commit arriving at that instant finds it expired.
#[test]
fn reservations_expire_at_their_ttl() {
    let mut world = World::new();
    world.grant_amount(10);
    let reservation = reserve(&mut world, 8, Some(60)).expect("hold");
    world.advance_to(at(secs(59)));
    assert_eq!(world.available("api_calls"), 2);
    world.now = at(secs(60));
    assert_eq!(
        commit(&mut world, reservation.id, CommitSize::Hold),
        Err(Refusal::ReservationNotActive {
            status: ReservationStatus::Expired
        })
    );
    world.advance_to(at(secs(60)));
    assert_eq!(world.available("api_calls"), 10);
    let expire = world.entries.last().expect("expire");
    assert_eq!(
        (
            expire.entry_type,
            expire.reservation_id,
            expire.amount.get()
        ),
        (EntryType::Expire, Some(reservation.id), 8)
    );
    assert_eq!(world.event_types().last(), Some(&"reservation.expired"));
}

// Extending moves the expiry; bad TTLs are refused.
#[test]
fn extend_is_a_heartbeat() {
    let mut world = World::new();
    world.grant_amount(10);
    let reservation = reserve(&mut world, 5, Some(60)).expect("hold");
    world.advance_to(at(secs(50)));
    let extended = world
        .apply(|state, cx| state.extend(cx, reservation.id, 600))
        .expect("extend");
    assert_eq!(extended.expires_at, at(secs(650)));
    world.advance_to(at(secs(649)));
    assert_eq!(world.state.reservations().len(), 1);
    for ttl in [0, 7 * 24 * 3600 + 1] {
        let refused = world.apply(|state, cx| state.extend(cx, reservation.id, ttl));
        assert!(
            matches!(
                refused,
                Err(Refusal::Invalid {
                    field: "ttl_seconds",
                    ..
                })
            ),
            "ttl {ttl}"
        );
    }
}

// Voiding a partly held block forfeits only the unheld part; the held part is voided when
// the reservation releases it, and can still be committed.
#[test]
fn void_of_a_partly_held_block() {
    let mut world = World::new();
    let block = world.grant_amount(100);
    let reservation = reserve(&mut world, 30, None).expect("hold");
    let voided = world
        .apply(|state, cx| state.void_block(cx, block))
        .expect("void");
    assert_eq!(voided.get(), 70);
    assert_eq!(world.available("api_calls"), 0);
    assert_eq!(
        world.remaining_of(block),
        30,
        "the held part survives the void"
    );

    let committed = commit(&mut world, reservation.id, CommitSize::Amount(credits(20)))
        .expect("commit from held");
    assert_eq!(committed.committed_amount.get(), 20);
    assert_eq!(
        world.remaining_of(block),
        0,
        "the released 10 were voided at once"
    );
    let tail: Vec<&str> = world.entry_types().into_iter().rev().take(3).collect();
    assert_eq!(tail, vec!["void", "release", "commit"]);
    assert_eq!(world.state.totals().voided.get(), 80);
}

// Held credits do not expire with their block; released later, they expire at once.
#[test]
fn held_credits_survive_expiry() {
    let mut world = World::new();
    let block = world.grant(GrantRequest {
        expires_at: Some(at(hours(1))),
        ..GrantRequest::new(credits(50))
    });
    let reservation = reserve(&mut world, 20, Some(7200)).expect("hold");
    world.advance_to(at(hours(1)));
    assert_eq!(world.remaining_of(block), 20, "only the unheld 30 expired");
    assert_eq!(world.available("api_calls"), 0);
    world
        .apply(|state, cx| state.release(cx, reservation.id))
        .expect("release");
    assert_eq!(world.remaining_of(block), 0);
    assert_eq!(world.state.totals().expired.get(), 50);
}

// Bad reservation requests are refused with the field named.
#[test]
fn reservation_requests_are_validated() {
    let mut world = World::new();
    world.grant_amount(10);
    assert!(matches!(
        reserve(&mut world, 0, None),
        Err(Refusal::Invalid {
            field: "amount",
            ..
        })
    ));
    assert!(matches!(
        reserve(&mut world, 1, Some(0)),
        Err(Refusal::Invalid {
            field: "ttl_seconds",
            ..
        })
    ));
    let default_ttl = reserve(&mut world, 1, None).expect("hold");
    assert_eq!(default_ttl.expires_at, at(secs(300)));
    let negative = commit(&mut world, default_ttl.id, CommitSize::Amount(credits(-1)));
    assert!(matches!(
        negative,
        Err(Refusal::Invalid {
            field: "amount",
            ..
        })
    ));
}
