//! Recurring grants (SPEC 10.1): period grants, 5-hour windows anchored to the period or to
//! first use, `expire_after`, rollover with `max`, accumulation `cap`, and `advance`
//! producing due work in time order.

use ledger::{
    BlockSource, ExpireAfter, GrantAnchor, GrantTemplate, OveragePolicy, PlanKind, Rollover,
    SubscribeRequest, SubscriptionId, VariantId,
};

use crate::support::{World, at, credits, days, hours, monthly, template, window};

fn world_with(templates: Vec<GrantTemplate>) -> (World, VariantId) {
    let mut world = World::new();
    let variants = world.add_plan(
        PlanKind::Base,
        &["api_calls"],
        OveragePolicy::Block,
        vec![monthly(2000, templates)],
    );
    (world, variants[0])
}

fn subscribe(world: &mut World, variant: VariantId) -> SubscriptionId {
    let request = SubscribeRequest {
        plan_variant_id: variant,
        trial_days: None,
        start_at: None,
    };
    world
        .apply(|state, cx| state.subscribe(cx, request))
        .expect("subscribe")
        .id
}

fn renew(world: &mut World, id: SubscriptionId, periods: u32) {
    world
        .apply(|state, cx| state.renew(cx, id, periods))
        .expect("renew");
}

/// Sum of live blocks' remaining credits issued by the plan, by source.
fn plan_credits(world: &World, source: BlockSource) -> i64 {
    world
        .state
        .blocks()
        .iter()
        .filter(|block| block.source == source)
        .map(|block| block.remaining.get())
        .sum()
}

// A first-use 5-hour window opens at the first use and the quota is back exactly five
// hours after that first use, not after the last one.
#[test]
fn first_use_window_resets_five_hours_after_first_use() {
    let (mut world, variant) = world_with(vec![window(45, hours(5), GrantAnchor::FirstUse)]);
    subscribe(&mut world, variant);
    assert!(
        world.state.blocks().is_empty(),
        "no window is open before the first use"
    );

    world.advance_to(at(hours(1)));
    world.usage("api_calls", 10);
    let block = world.state.blocks().first().expect("window block").clone();
    assert_eq!(
        (block.effective_at, block.expires_at),
        (at(hours(1)), Some(at(hours(6))))
    );
    world.advance_to(at(hours(4)));
    world.usage("api_calls", 35);
    assert_eq!(world.available("api_calls"), 0);
    assert!(
        world.try_usage("api_calls", 1, true).is_err(),
        "the window is spent"
    );

    world.advance_to(
        at(hours(6))
            .checked_sub(ledger::Span::from_millis(1))
            .expect("instant"),
    );
    assert!(
        world.try_usage("api_calls", 1, true).is_err(),
        "still spent just before the reset"
    );
    world.advance_to(at(hours(6)));
    assert_eq!(
        world
            .try_usage("api_calls", 1, true)
            .expect("back at first use + 5h")
            .covered
            .get(),
        1
    );
    let second = world.state.blocks().first().expect("second window").clone();
    assert_eq!(
        (second.effective_at, second.expires_at),
        (at(hours(6)), Some(at(hours(11))))
    );
}

// Period-anchored windows start every 5 hours from the period start; unused credits are
// gone at each reset.
#[test]
fn period_anchored_windows_reset_on_the_clock() {
    let (mut world, variant) = world_with(vec![window(45, hours(5), GrantAnchor::Period)]);
    subscribe(&mut world, variant);
    assert_eq!(world.available("api_calls"), 45);
    world.usage("api_calls", 40);
    world.advance_to(at(hours(5)));
    assert_eq!(
        world.available("api_calls"),
        45,
        "a fresh window, the 5 unused gone"
    );
    world.advance_to(at(hours(23)));
    assert_eq!(world.available("api_calls"), 45);
    let grants = world
        .entries
        .iter()
        .filter(|entry| entry.entry_type == ledger::EntryType::Grant)
        .count();
    assert_eq!(grants, 5, "windows at 0, 5, 10, 15 and 20 hours");
    assert_eq!(world.state.totals().expired.get(), 5 + 45 * 3);
}

// Period grants arrive at each paid renewal and expire with their period by default;
// `expire_after` can set another lifetime.
#[test]
fn period_grants_follow_renewals() {
    let short_lived = GrantTemplate {
        expire_after: ExpireAfter::After(days(7)),
        ..template(10)
    };
    let (mut world, variant) = world_with(vec![template(100), short_lived]);
    let subscription = subscribe(&mut world, variant);
    assert_eq!(world.available("api_calls"), 110);
    world.advance_to(at(days(7)));
    assert_eq!(world.available("api_calls"), 100, "the 7-day block expired");
    renew(&mut world, subscription, 1);
    let period_end = world
        .state
        .subscription(subscription)
        .expect("live")
        .current_period_end;
    assert_eq!(period_end, at(days(31)));
    world.usage("api_calls", 30);
    world.advance_to(period_end);
    assert_eq!(
        world.available("api_calls"),
        110,
        "new period: 70 left expired, 110 granted"
    );
    assert_eq!(world.state.totals().expired.get(), 10 + 70);
}

// Rollover moves a percentage of what is left into a new block, capped by `max`, expiring
// one interval later.
#[test]
fn rollover_is_capped_by_max() {
    let rolling = GrantTemplate {
        rollover: Some(Rollover {
            percent: 50,
            max: Some(credits(30)),
        }),
        ..template(100)
    };
    let (mut world, variant) = world_with(vec![rolling]);
    let subscription = subscribe(&mut world, variant);
    renew(&mut world, subscription, 2);
    world.usage("api_calls", 20);
    world.advance_to(at(days(31)));
    assert_eq!(
        plan_credits(&world, BlockSource::Rollover),
        30,
        "50% of 80 is 40, capped at 30"
    );
    let rollover = world
        .state
        .blocks()
        .iter()
        .find(|block| block.source == BlockSource::Rollover)
        .expect("rollover");
    assert_eq!(
        rollover.expires_at,
        Some(at(days(31 + 28))),
        "one interval (a month) later"
    );
    assert_eq!(world.available("api_calls"), 130);

    world.usage("api_calls", 110);
    world.advance_to(at(days(31 + 28)));
    // At the second period end the rollover block expires with 0 left (it burned first:
    // it expires sooner), the period block had 20 left: 10 roll over.
    assert_eq!(plan_credits(&world, BlockSource::Rollover), 10);
}

// `cap` bounds the live credits from one template: never-expiring monthly grants
// accumulate only up to it.
#[test]
fn template_cap_bounds_accumulation() {
    let accumulating = GrantTemplate {
        expire_after: ExpireAfter::Never,
        cap: Some(credits(250)),
        ..template(100)
    };
    let (mut world, variant) = world_with(vec![accumulating]);
    let subscription = subscribe(&mut world, variant);
    renew(&mut world, subscription, 5);
    assert_eq!(world.available("api_calls"), 100);
    world.advance_to(at(days(31)));
    assert_eq!(world.available("api_calls"), 200);
    world.advance_to(at(days(31 + 28)));
    assert_eq!(
        world.available("api_calls"),
        250,
        "the third grant is cut to 50"
    );
    world.advance_to(at(days(31 + 28 + 31)));
    assert_eq!(
        world.available("api_calls"),
        250,
        "a full template grants nothing"
    );
    world.usage("api_calls", 70);
    world.advance_to(at(days(31 + 28 + 31 + 30)));
    assert_eq!(world.available("api_calls"), 250, "refilled up to the cap");
}

// One `advance` over a long jump does every piece of due work in time order.
#[test]
fn advance_does_due_work_in_time_order() {
    let (mut world, variant) = world_with(vec![
        window(5, hours(5), GrantAnchor::Period),
        template(100),
    ]);
    let subscription = subscribe(&mut world, variant);
    renew(&mut world, subscription, 1);
    let start = world.entries.len();
    world.advance_to(at(days(60)));
    let times: Vec<ledger::Timestamp> = world.entries[start..]
        .iter()
        .map(|entry| entry.created_at)
        .collect();
    assert!(
        times.windows(2).all(|pair| pair[0] <= pair[1]),
        "entries come out in time order"
    );
    assert!(
        times.len() > 100,
        "every window of 59 days was issued and expired"
    );
    let event_times: Vec<ledger::Timestamp> = world.events.iter().map(|event| event.at).collect();
    assert!(
        event_times.windows(2).all(|pair| pair[0] <= pair[1]),
        "events too"
    );
    // Two periods paid (the first and one renewal), then past due at the second period
    // end (day 59): windows stop, and the next due work is the grace end.
    let status = world.state.subscription(subscription).map(|s| s.status);
    assert_eq!(status, Some(ledger::SubscriptionStatus::PastDue));
    assert_eq!(
        world.state.next_due(&world.catalog).expect("next due"),
        Some(at(days(31 + 28 + 3)))
    );
}
