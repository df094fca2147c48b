//! The bounds the engine keeps so that no single operation or transaction does unbounded
//! work: catch-up in chunks (`advance_bounded`), operations refused while an end user is
//! far behind (`CatchingUp`), a past `start_at` bounded to one period, the shortest
//! template window, and the most live blocks one end user may hold.

use ledger::{
    BLOCKS_PER_END_USER_MAX, GrantAnchor, GrantRequest, OPERATION_STEPS_MAX, OveragePolicy,
    PlanKind, Refusal, SubscribeRequest, TEMPLATE_EVERY_MIN_SECS, VariantId,
};

use crate::support::{World, at, credits, days, hours, monthly, secs, window};

/// A world whose end user subscribes at `T0` to a monthly plan with a one-hour window of
/// 10 credits (anchored to the period).
fn hourly_world() -> (World, VariantId) {
    let mut world = World::new();
    let variants = world.add_plan(
        PlanKind::Base,
        &["api_calls"],
        OveragePolicy::Block,
        vec![monthly(0, vec![window(10, hours(1), GrantAnchor::Period)])],
    );
    let variant = variants[0];
    world
        .apply(|state, cx| {
            state.subscribe(
                cx,
                SubscribeRequest {
                    plan_variant_id: variant,
                    trial_days: None,
                    start_at: None,
                },
            )
        })
        .expect("subscribe");
    (world, variant)
}

// Catching up in chunks ends in the same state, with the same entries and events, as one
// advance over the whole span; every chunk stays near the bound and says whether it is
// done.
#[test]
fn bounded_advance_in_chunks_equals_one_advance() {
    let (mut chunked, _) = hourly_world();
    let (mut whole, _) = hourly_world();
    let to = at(days(20));
    whole.advance_to(to);

    chunked.now = to;
    let mut chunks = 0;
    loop {
        let entries_before = chunked.entries.len();
        let done = chunked
            .apply(|state, cx| state.advance_bounded(cx, 50))
            .expect("chunk");
        chunks += 1;
        // One hourly window is a grant and an expiry: two entries a step.
        assert!(chunked.entries.len() - entries_before <= 2 * 50 + 2);
        if done {
            break;
        }
        assert!(
            chunked.state.advanced_to() < to,
            "an unfinished chunk stops short of now"
        );
    }
    assert!(chunks > 5, "20 days of hourly windows take several chunks");
    assert_eq!(chunked.state.blocks(), whole.state.blocks());
    assert_eq!(chunked.state.advanced_to(), whole.state.advanced_to());
    let amounts = |world: &World| -> Vec<(&'static str, i64)> {
        world
            .entries
            .iter()
            .map(|entry| (entry.entry_type.as_str(), entry.amount.get()))
            .collect()
    };
    assert_eq!(amounts(&chunked), amounts(&whole));
    assert_eq!(chunked.event_types(), whole.event_types());
    assert_eq!(
        chunked
            .events
            .iter()
            .map(|event| event.at)
            .collect::<Vec<_>>(),
        whole
            .events
            .iter()
            .map(|event| event.at)
            .collect::<Vec<_>>()
    );
}

// An operation on an end user with more due work waiting than one operation runs is
// refused (nothing changes); once the chunks caught up, it goes through.
#[test]
fn an_operation_far_behind_is_refused_until_caught_up() {
    let (mut world, _) = hourly_world();
    // More hourly windows than one operation may run.
    let behind = i64::try_from(OPERATION_STEPS_MAX).expect("fits") + 24;
    world.now = at(hours(behind));
    let refused = world.try_usage("api_calls", 1, false);
    assert!(
        matches!(refused, Err(Refusal::CatchingUp { .. })),
        "{refused:?}"
    );
    while !world
        .apply(|state, cx| state.advance_bounded(cx, 500))
        .expect("chunk")
    {}
    assert_eq!(world.usage("api_calls", 1).cost, credits(1));
}

// A past start aligns a migrated subscriber's current period: at most one period back.
#[test]
fn start_at_reaches_back_at_most_one_period() {
    let mut world = World::new();
    let variants = world.add_plan(
        PlanKind::Base,
        &["api_calls"],
        OveragePolicy::Block,
        vec![monthly(0, vec![window(10, hours(5), GrantAnchor::Period)])],
    );
    world.now = at(days(400));
    let subscribe = |world: &mut World, start| {
        world.apply(|state, cx| {
            state.subscribe(
                cx,
                SubscribeRequest {
                    plan_variant_id: variants[0],
                    trial_days: None,
                    start_at: Some(start),
                },
            )
        })
    };
    let refused = subscribe(&mut world, at(days(300)));
    assert!(
        matches!(
            refused,
            Err(Refusal::Invalid {
                field: "start_at",
                ..
            })
        ),
        "{refused:?}"
    );
    let subscription = subscribe(&mut world, at(days(380))).expect("within a period");
    assert_eq!(subscription.current_period_start, at(days(380)));
    // Four days of five-hour windows were issued and expired on the way.
    assert!(world.entries.len() > 30);
}

// Templates may not reset faster than once a minute.
#[test]
fn template_windows_are_at_least_a_minute() {
    let mut variant = monthly(0, vec![window(1, secs(1), GrantAnchor::Period)]);
    let error = variant.validate().expect_err("one second is too short");
    assert_eq!(error.field, "grants[0].every");
    variant.grants = vec![window(
        1,
        secs(TEMPLATE_EVERY_MIN_SECS),
        GrantAnchor::Period,
    )];
    variant.validate().expect("one minute is allowed");
}

// A billing interval spans 1 to 1,000 units, as the API documents (the fuzzer found 1,001
// accepted).
#[test]
fn billing_intervals_span_one_to_a_thousand_units() {
    let mut variant = monthly(0, Vec::new());
    for (every, valid) in [(0, false), (1, true), (1000, true), (1001, false)] {
        variant.interval.every = every;
        match variant.validate() {
            Ok(()) => assert!(valid, "every = {every} was accepted"),
            Err(error) => {
                assert!(!valid, "every = {every} was refused: {error:?}");
                assert_eq!(error.field, "interval.every");
            }
        }
    }
}

// Grants and positive adjustments stop at the most live blocks one end user may hold;
// spending blocks makes room again.
#[test]
fn live_blocks_per_end_user_are_bounded() {
    let mut world = World::new();
    for _ in 0..BLOCKS_PER_END_USER_MAX {
        world.grant_amount(1);
    }
    let refused = world.apply(|state, cx| state.grant(cx, GrantRequest::new(credits(1))));
    assert!(
        matches!(refused, Err(Refusal::LimitReached { .. })),
        "{refused:?}"
    );
    world.usage("api_calls", 1);
    world.grant_amount(5);
}
