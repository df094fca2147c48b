//! Blocks, the burn order, debt and settlement, grants, voids, adjustments and expiry
//! (SPEC 3 and 8), through the `World` fixture.

use std::sync::Arc;

use ledger::{AdjustRequest, BlockSource, Credits, EntryType, GrantRequest, Refusal};

use crate::support::{World, at, credits, days, hours, key, secs};

/// Grants blocks built by `edit`, one per entry of `specs`, in the given order.
/// A block's name and how its terms differ from the defaults.
type Spec<'a> = (&'a str, fn(&mut GrantRequest));

fn grant_each(world: &mut World, specs: &[Spec<'_>]) -> Vec<(String, ledger::BlockId)> {
    specs
        .iter()
        .map(|(name, edit)| {
            let mut request = GrantRequest::new(credits(10));
            edit(&mut request);
            (name.to_string(), world.grant(request))
        })
        .collect()
}

// Blocks created in shuffled order burn by priority, then expiry (never last), then free
// before paid, then creation time, then id; a debit spanning blocks records its parts.
#[test]
fn burn_order_applies_every_tie_break() {
    let mut world = World::new();
    // Created in this order at T0, so their ids ascend in this order too.
    let mut created = grant_each(
        &mut world,
        &[
            ("d_paid_10d", |r| {
                r.expires_at = Some(at(days(10)));
                r.price_paid = Some(500);
            }),
            ("e_never_lower_id", |r| r.expires_at = None),
            ("c_free_10d", |r| r.expires_at = Some(at(days(10)))),
            ("a_priority_10", |r| {
                r.priority = 10;
                r.price_paid = Some(900);
            }),
            ("b_expires_5d", |r| {
                r.expires_at = Some(at(days(5)));
                r.price_paid = Some(500);
            }),
            ("f_never_higher_id", |r| r.expires_at = None),
        ],
    );
    world.advance_by(secs(1));
    created.extend(grant_each(
        &mut world,
        &[("g_never_created_later", |r| r.expires_at = None)],
    ));
    let id = |name: &str| {
        created
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
            .expect("block")
    };

    let order: Vec<ledger::BlockId> = world.remaining().into_iter().map(|(id, _)| id).collect();
    let expected: Vec<ledger::BlockId> = [
        "a_priority_10",
        "b_expires_5d",
        "c_free_10d",
        "d_paid_10d",
        "e_never_lower_id",
        "f_never_higher_id",
        "g_never_created_later",
    ]
    .into_iter()
    .map(id)
    .collect();
    assert_eq!(order, expected);

    world.usage("api_calls", 25);
    let debit = world.entries.last().expect("debit");
    assert_eq!(debit.entry_type, EntryType::Debit);
    let parts: Vec<(ledger::BlockId, i64)> = debit
        .parts
        .iter()
        .map(|part| (part.block_id, part.amount.get()))
        .collect();
    assert_eq!(
        parts,
        vec![
            (id("a_priority_10"), 10),
            (id("b_expires_5d"), 10),
            (id("c_free_10d"), 5)
        ]
    );
    assert_eq!(world.available("api_calls"), 45);
}

// Free before paid decides between blocks equal in priority and expiry.
#[test]
fn free_burns_before_paid() {
    let mut world = World::new();
    let mut paid = GrantRequest::new(credits(10));
    paid.price_paid = Some(100);
    let paid = world.grant(paid);
    let mut zero_price = GrantRequest::new(credits(10));
    zero_price.price_paid = Some(0);
    let free = world.grant(zero_price);
    world.usage("api_calls", 4);
    assert_eq!(world.remaining_of(free), 6);
    assert_eq!(world.remaining_of(paid), 10);
}

// A block is usable on [effective_at, expires_at): not before it starts, and not at the
// instant it expires.
#[test]
fn usability_window_is_half_open() {
    let mut world = World::new();
    let mut future = GrantRequest::new(credits(7));
    future.effective_at = Some(at(hours(2)));
    world.grant(future);
    let mut expiring = GrantRequest::new(credits(5));
    expiring.expires_at = Some(at(hours(1)));
    world.grant(expiring);

    assert_eq!(
        world.available("api_calls"),
        5,
        "only the block already effective"
    );
    world.advance_to(
        at(hours(1))
            .checked_sub(ledger::Span::from_millis(1))
            .expect("instant"),
    );
    assert_eq!(
        world.available("api_calls"),
        5,
        "one millisecond before expiry"
    );
    world.advance_to(at(hours(1)));
    assert_eq!(
        world.available("api_calls"),
        0,
        "expired at exactly expires_at"
    );
    let expire = world
        .entries
        .iter()
        .find(|entry| entry.entry_type == EntryType::Expire)
        .expect("expire entry");
    assert_eq!((expire.amount.get(), expire.created_at), (5, at(hours(1))));
    world.advance_to(at(hours(2)));
    assert_eq!(
        world.available("api_calls"),
        7,
        "effective at exactly effective_at"
    );
}

// Usage before any block becomes debt; the next grant settles it first.
#[test]
fn debt_from_usage_is_settled_by_the_next_grant() {
    let mut world = World::new();
    let outcome = world.usage("api_calls", 30);
    assert_eq!(
        (
            outcome.cost.get(),
            outcome.covered.get(),
            outcome.debt.get()
        ),
        (30, 0, 30)
    );
    assert_eq!(world.debt("api_calls"), 30);
    assert_eq!(world.available("api_calls"), 0);

    let block = world.grant_amount(100);
    assert_eq!(world.debt("api_calls"), 0);
    assert_eq!(world.remaining_of(block), 70);
    let settle = world.entries.last().expect("settle");
    assert_eq!(
        (settle.entry_type, settle.amount.get()),
        (EntryType::Settle, 30)
    );
    assert_eq!(settle.feature_key, Some(key("api_calls")));
}

// A grant with `settles_debt: false` leaves debt alone; a grant smaller than the debt pays
// part of it.
#[test]
fn settlement_respects_settles_debt_and_partial_cover() {
    let mut world = World::new();
    world.usage("api_calls", 50);
    let mut keep = GrantRequest::new(credits(40));
    keep.settles_debt = false;
    let kept = world.grant(keep);
    assert_eq!(world.debt("api_calls"), 50);
    assert_eq!(world.remaining_of(kept), 40);

    let small = world.grant_amount(20);
    assert_eq!(world.debt("api_calls"), 30);
    assert_eq!(world.remaining_of(small), 0);
    assert_eq!(world.available("api_calls"), 40);
}

// Debt is per feature: a block scoped to another feature does not settle it.
#[test]
fn scoped_blocks_apply_only_to_their_features() {
    let mut world = World::new();
    world.usage("images", 5);
    let mut tokens_only = GrantRequest::new(credits(100));
    tokens_only.feature_keys = Some(Arc::from(vec![key("tokens")]));
    let block = world.grant(tokens_only);
    assert_eq!(
        world.debt("images"),
        5,
        "a tokens block does not pay image debt"
    );
    assert_eq!(world.available("images"), 0);
    assert_eq!(world.available("tokens"), 100);
    assert_eq!(world.available_all(), 100);
    let outcome = world.usage("images", 2);
    assert_eq!(outcome.debt.get(), 2);
    assert_eq!(world.remaining_of(block), 100);
}

// A future block settles debt when it becomes effective, not before.
#[test]
fn a_future_block_settles_debt_when_it_becomes_effective() {
    let mut world = World::new();
    let mut future = GrantRequest::new(credits(50));
    future.effective_at = Some(at(hours(3)));
    let block = world.grant(future);
    world.usage("api_calls", 10);
    assert_eq!(world.debt("api_calls"), 10);
    world.advance_to(at(hours(3)));
    assert_eq!(world.debt("api_calls"), 0);
    assert_eq!(world.remaining_of(block), 40);
    let settle = world.entries.last().expect("settle");
    assert_eq!(
        (settle.entry_type, settle.created_at),
        (EntryType::Settle, at(hours(3)))
    );
}

// Strict usage refuses with the amounts and changes nothing.
#[test]
fn strict_usage_refuses_when_short() {
    let mut world = World::new();
    world.grant_amount(3);
    let refusal = world
        .try_usage("api_calls", 5, true)
        .expect_err("strict refuses");
    assert_eq!(
        refusal,
        Refusal::InsufficientBalance {
            needed: credits(5),
            available: credits(3)
        }
    );
    assert_eq!(world.available("api_calls"), 3);
    assert!(world.try_usage("api_calls", 3, true).is_ok());
    assert_eq!(world.available("api_calls"), 0);
}

// Void forfeits the unheld remainder only; voiding twice is refused.
#[test]
fn void_forfeits_the_remainder() {
    let mut world = World::new();
    let block = world.grant_amount(100);
    world.usage("api_calls", 30);
    let voided = world
        .apply(|state, cx| state.void_block(cx, block))
        .expect("void");
    assert_eq!(voided.get(), 70);
    assert_eq!(world.available_all(), 0);
    assert!(
        world.state.blocks().is_empty(),
        "a voided block with nothing held leaves the live state"
    );
    assert!(
        world
            .event_types()
            .ends_with(&["credits.voided", "credits.depleted"])
    );
    let again = world.apply(|state, cx| state.void_block(cx, block));
    assert_eq!(again, Err(Refusal::BlockNotFound(block)));
}

// Grant validation names the field.
#[test]
fn grants_refuse_bad_terms() {
    let mut world = World::new();
    let cases: Vec<(GrantRequest, &str)> = vec![
        (GrantRequest::new(credits(0)), "amount"),
        (
            GrantRequest {
                priority: 1001,
                ..GrantRequest::new(credits(1))
            },
            "priority",
        ),
        (
            GrantRequest {
                expires_at: Some(world.now),
                ..GrantRequest::new(credits(1))
            },
            "expires_at",
        ),
        (
            GrantRequest {
                effective_at: Some(at(hours(2))),
                expires_at: Some(at(hours(1))),
                ..GrantRequest::new(credits(1))
            },
            "expires_at",
        ),
        (
            GrantRequest {
                price_paid: Some(-1),
                ..GrantRequest::new(credits(1))
            },
            "price_paid",
        ),
        (
            GrantRequest {
                feature_keys: Some(Arc::from(vec![key("nope")])),
                ..GrantRequest::new(credits(1))
            },
            "feature_keys",
        ),
        (
            GrantRequest {
                feature_keys: Some(Arc::from(vec![key("sso")])),
                ..GrantRequest::new(credits(1))
            },
            "feature_keys",
        ),
    ];
    for (request, field) in cases {
        match world.apply(|state, cx| state.grant(cx, request.clone())) {
            Err(Refusal::Invalid { field: named, .. }) => assert_eq!(named, field, "{request:?}"),
            other => panic!("{request:?} answered {other:?}"),
        }
    }
}

// Amounts that would overflow i64 are refused, never wrapped.
#[test]
fn overflow_is_a_refusal() {
    let mut world = World::new();
    world.grant_amount(i64::MAX);
    let refusal = world.apply(|state, cx| state.grant(cx, GrantRequest::new(credits(1))));
    assert_eq!(refusal, Err(Refusal::Overflow));
    assert_eq!(world.available_all(), i64::MAX);
}

// Positive adjustments create a block; negative ones burn in burn order and refuse
// beyond what is available.
#[test]
fn adjustments_grant_and_burn() {
    let mut world = World::new();
    let first = world.grant_amount(10);
    let created = world
        .apply(|state, cx| {
            state.adjust(
                cx,
                AdjustRequest {
                    amount: credits(5),
                    feature_keys: None,
                },
            )
        })
        .expect("positive adjustment");
    let created = created.expect("a block");
    assert_eq!(
        world
            .state
            .blocks()
            .iter()
            .find(|b| b.id == created)
            .map(|b| b.source),
        Some(BlockSource::Manual)
    );
    assert_eq!(world.available_all(), 15);

    world
        .apply(|state, cx| {
            state.adjust(
                cx,
                AdjustRequest {
                    amount: credits(-12),
                    feature_keys: None,
                },
            )
        })
        .expect("negative");
    assert_eq!(world.remaining_of(first), 0);
    assert_eq!(world.remaining_of(created), 3);
    let adjust = world.entries.last().expect("adjust");
    assert_eq!(
        (adjust.entry_type, adjust.amount.get()),
        (EntryType::Adjust, -12)
    );

    let short = world.apply(|state, cx| {
        state.adjust(
            cx,
            AdjustRequest {
                amount: credits(-4),
                feature_keys: None,
            },
        )
    });
    assert_eq!(
        short,
        Err(Refusal::InsufficientBalance {
            needed: credits(4),
            available: credits(3)
        })
    );
    let zero = world.apply(|state, cx| {
        state.adjust(
            cx,
            AdjustRequest {
                amount: Credits::ZERO,
                feature_keys: None,
            },
        )
    });
    assert!(matches!(
        zero,
        Err(Refusal::Invalid {
            field: "amount",
            ..
        })
    ));
}

// Entries carry the balance after them and the unknown feature is refused.
#[test]
fn entries_record_balance_after_and_unknown_features_are_refused() {
    let mut world = World::new();
    world.grant_amount(10);
    let outcome = world.usage("api_calls", 4);
    assert_eq!(outcome.balance.get(), 6);
    assert_eq!(
        world.entries.last().map(|entry| entry.balance_after.get()),
        Some(6)
    );
    let unknown = world.try_usage("unknown", 1, false);
    assert_eq!(unknown, Err(Refusal::FeatureNotFound(key("unknown"))));
    let boolean = world.try_usage("sso", 1, false);
    assert_eq!(boolean, Err(Refusal::FeatureNotMetered(key("sso"))));
}

// `credits.low` fires when available credits cross the threshold, `credits.depleted` when
// they reach zero.
#[test]
fn low_and_depleted_events() {
    let mut world = World::new();
    world.catalog.settings.low_balance_threshold = Some(credits(10));
    world.grant_amount(20);
    world.usage("api_calls", 5);
    assert!(!world.event_types().contains(&"credits.low"));
    world.usage("api_calls", 6);
    assert_eq!(
        world
            .event_types()
            .iter()
            .filter(|t| **t == "credits.low")
            .count(),
        1
    );
    world.usage("api_calls", 1);
    assert_eq!(
        world
            .event_types()
            .iter()
            .filter(|t| **t == "credits.low")
            .count(),
        1,
        "only on crossing"
    );
    world.usage("api_calls", 8);
    assert_eq!(world.event_types().last(), Some(&"credits.depleted"));
}
