//! The subscription state machine (SPEC 10.2): every transition of the table, every
//! illegal one, upgrades versus downgrades, pending changes, grace, renewal, notices and
//! the free-plan fallback.

use ledger::{
    BillingMode, BlockSource, CancelAt, ChangeAt, EventKind, OveragePolicy, PlanKind, Refusal,
    SubscribeRequest, Subscription, SubscriptionChange, SubscriptionId, SubscriptionStatus,
    VariantId,
};

use crate::support::{World, at, days, monthly, template};

struct Catalog {
    world: World,
    basic: VariantId,
    pro: VariantId,
    free: VariantId,
    postpaid: VariantId,
}

/// A world with a free plan (the fallback), `basic` at 1000 a month granting 100, `pro`
/// at 3000 a month granting 500, and a postpaid variant.
fn catalog() -> Catalog {
    let mut world = World::new();
    let free = world.add_plan(
        PlanKind::Base,
        &["api_calls"],
        OveragePolicy::Block,
        vec![monthly(0, vec![template(10)])],
    )[0];
    let basic = world.add_plan(
        PlanKind::Base,
        &["api_calls"],
        OveragePolicy::Block,
        vec![monthly(1000, vec![template(100)])],
    )[0];
    let mut postpaid_variant = monthly(1000, vec![template(100)]);
    postpaid_variant.billing_mode = BillingMode::Postpaid;
    let pro_variants = world.add_plan(
        PlanKind::Base,
        &["api_calls", "sso"],
        OveragePolicy::Block,
        vec![monthly(3000, vec![template(500)]), postpaid_variant],
    );
    world.catalog.settings.free_plan_variant_id = Some(free);
    Catalog {
        world,
        basic,
        pro: pro_variants[0],
        free,
        postpaid: pro_variants[1],
    }
}

fn subscribe(
    world: &mut World,
    variant: VariantId,
    trial_days: Option<u32>,
) -> Result<Subscription, Refusal> {
    let request = SubscribeRequest {
        plan_variant_id: variant,
        trial_days,
        start_at: None,
    };
    world.apply(|state, cx| state.subscribe(cx, request))
}

fn status(world: &World, id: SubscriptionId) -> Option<SubscriptionStatus> {
    world
        .state
        .subscription(id)
        .map(|subscription| subscription.status)
}

fn base(world: &World) -> &Subscription {
    world
        .state
        .base_subscription()
        .expect("a base subscription")
}

fn last_subscription_change(world: &World) -> &SubscriptionChange {
    world
        .events
        .iter()
        .rev()
        .find_map(|event| match &event.kind {
            EventKind::Subscription { change, .. } => Some(change),
            _ => None,
        })
        .expect("a subscription event")
}

/// A `basic` subscription brought into `wanted`.
fn in_status(wanted: SubscriptionStatus) -> (Catalog, SubscriptionId) {
    let mut setup = catalog();
    let trial = (wanted == SubscriptionStatus::Trialing).then_some(14);
    let id = subscribe(&mut setup.world, setup.basic, trial)
        .expect("subscribe")
        .id;
    match wanted {
        SubscriptionStatus::PastDue => setup.world.advance_to(at(days(31))),
        SubscriptionStatus::Paused => {
            setup
                .world
                .apply(|state, cx| state.pause(cx, id))
                .expect("pause");
        }
        _ => {}
    }
    assert_eq!(status(&setup.world, id), Some(wanted));
    (setup, id)
}

// Create: active without a trial, trialing with one; the period's grants are issued at
// once and `subscription.created` is emitted.
#[test]
fn create_issues_grants_at_once() {
    let mut setup = catalog();
    let subscription = subscribe(&mut setup.world, setup.basic, None).expect("subscribe");
    assert_eq!(subscription.status, SubscriptionStatus::Active);
    assert_eq!(
        (
            subscription.current_period_start,
            subscription.current_period_end
        ),
        (at(days(0)), at(days(31)))
    );
    assert_eq!(setup.world.available("api_calls"), 100);
    assert!(setup.world.event_types().contains(&"subscription.created"));

    let mut trial = catalog();
    let trialing = subscribe(&mut trial.world, trial.pro, Some(14)).expect("subscribe");
    assert_eq!(
        (trialing.status, trialing.trial_end),
        (SubscriptionStatus::Trialing, Some(at(days(14))))
    );
    assert_eq!(trial.world.available("api_calls"), 500);
}

// A second base subscription is refused; addons are not limited.
#[test]
fn one_base_subscription_at_a_time() {
    let mut setup = catalog();
    subscribe(&mut setup.world, setup.basic, None).expect("first");
    assert!(matches!(
        subscribe(&mut setup.world, setup.pro, None),
        Err(Refusal::Conflict(_))
    ));
    let addon = setup.world.add_plan(
        PlanKind::Addon,
        &["sso"],
        OveragePolicy::Block,
        vec![monthly(500, vec![])],
    )[0];
    subscribe(&mut setup.world, addon, None).expect("addon");
    subscribe(&mut setup.world, addon, None).expect("another addon");
}

// Prepaid period end: renewed when paid with `/renew`, else past due; renew from past
// due is active again; grace end expires it and falls back to the free plan.
#[test]
fn prepaid_renewal_past_due_grace_and_fallback() {
    let (mut setup, id) = in_status(SubscriptionStatus::Active);
    setup
        .world
        .apply(|state, cx| state.renew(cx, id, 1))
        .expect("renew");
    setup.world.advance_to(at(days(31)));
    assert_eq!(status(&setup.world, id), Some(SubscriptionStatus::Active));
    assert!(matches!(
        last_subscription_change(&setup.world),
        SubscriptionChange::Renewed { .. }
    ));
    assert!(
        !setup
            .world
            .event_types()
            .contains(&"subscription.renewal_due"),
        "the next period was already paid"
    );

    setup.world.advance_to(at(days(59)));
    let notice = setup
        .world
        .events
        .iter()
        .find(|event| event.kind.type_name() == "subscription.renewal_due");
    assert_eq!(
        notice.map(|event| event.at),
        Some(at(days(56))),
        "three days before the unpaid period end"
    );
    assert_eq!(status(&setup.world, id), Some(SubscriptionStatus::PastDue));
    setup
        .world
        .apply(|state, cx| state.renew(cx, id, 1))
        .expect("renew from past due");
    let renewed = base(&setup.world);
    assert_eq!(
        (renewed.status, renewed.current_period_start),
        (SubscriptionStatus::Active, at(days(59)))
    );

    setup.world.advance_to(at(days(90)));
    assert_eq!(status(&setup.world, id), Some(SubscriptionStatus::PastDue));
    setup.world.advance_to(at(days(93)));
    assert_eq!(
        status(&setup.world, id),
        None,
        "expired after three days of grace"
    );
    assert_eq!(
        last_subscription_change(&setup.world),
        &SubscriptionChange::Created
    );
    let fallback = base(&setup.world);
    assert_eq!(
        (fallback.plan_variant_id, fallback.status),
        (setup.free, SubscriptionStatus::Active)
    );
    assert!(setup.world.event_types().contains(&"subscription.expired"));
}

// Postpaid renews by itself and reports the period's usage.
#[test]
fn postpaid_renews_with_a_usage_summary() {
    let mut setup = catalog();
    let id = subscribe(&mut setup.world, setup.postpaid, None)
        .expect("subscribe")
        .id;
    setup.world.usage("api_calls", 7);
    setup.world.usage("api_calls", 5);
    setup.world.advance_to(at(days(31)));
    assert_eq!(status(&setup.world, id), Some(SubscriptionStatus::Active));
    match last_subscription_change(&setup.world) {
        SubscriptionChange::Renewed {
            usage,
            period_start,
            ..
        } => {
            assert_eq!(*period_start, at(days(31)));
            assert_eq!(usage.len(), 1);
            assert_eq!((usage[0].units, usage[0].cost.get()), (12, 12));
        }
        other => panic!("expected renewed, got {other:?}"),
    }
    let refused = setup.world.apply(|state, cx| state.renew(cx, id, 1));
    assert!(
        matches!(refused, Err(Refusal::Conflict(_))),
        "postpaid needs no renew"
    );
}

// Trial end: unpaid prepaid goes past due; paid during the trial becomes active; a
// `trial_ending` notice comes three days before.
#[test]
fn trial_end() {
    let (mut unpaid, unpaid_id) = in_status(SubscriptionStatus::Trialing);
    unpaid.world.advance_to(at(days(14)));
    assert_eq!(
        status(&unpaid.world, unpaid_id),
        Some(SubscriptionStatus::PastDue)
    );
    let notice = unpaid
        .world
        .events
        .iter()
        .find(|event| event.kind.type_name() == "subscription.trial_ending")
        .expect("notice");
    assert_eq!(notice.at, at(days(11)));

    let (mut paid, paid_id) = in_status(SubscriptionStatus::Trialing);
    paid.world
        .apply(|state, cx| state.renew(cx, paid_id, 1))
        .expect("pay during the trial");
    paid.world.advance_to(at(days(14)));
    let subscription = base(&paid.world);
    assert_eq!(
        (
            subscription.status,
            subscription.current_period_start,
            subscription.current_period_end
        ),
        (SubscriptionStatus::Active, at(days(14)), at(days(14 + 31)))
    );
}

// Pause stops grants and freezes plan credits; resume starts a new period now.
#[test]
fn pause_and_resume() {
    let (mut setup, id) = in_status(SubscriptionStatus::Active);
    setup
        .world
        .apply(|state, cx| state.pause(cx, id))
        .expect("pause");
    assert_eq!(
        setup.world.available("api_calls"),
        0,
        "plan credits are frozen while paused"
    );
    setup.world.advance_to(at(days(40)));
    assert_eq!(
        status(&setup.world, id),
        Some(SubscriptionStatus::Paused),
        "no period end while paused"
    );
    setup
        .world
        .apply(|state, cx| state.resume(cx, id))
        .expect("resume");
    let resumed = base(&setup.world);
    assert_eq!(
        (resumed.current_period_start, resumed.current_period_end),
        (at(days(40)), at(days(68))),
        "Feb 10 to Mar 10"
    );
    assert_eq!(
        setup.world.available("api_calls"),
        100,
        "the old block expired at day 31; a new one granted"
    );
    assert!(
        setup
            .world
            .event_types()
            .ends_with(&["subscription.resumed", "credits.granted"])
    );
}

// Cancel at period end keeps the plan until then; immediate cancel voids plan blocks
// unless told not to; both fall back to the free plan.
#[test]
fn cancel_at_period_end_and_now() {
    let (mut later, id) = in_status(SubscriptionStatus::Active);
    later
        .world
        .apply(|state, cx| state.cancel(cx, id, CancelAt::PeriodEnd, true))
        .expect("cancel");
    assert!(base(&later.world).cancel_at_period_end);
    assert_eq!(later.world.available("api_calls"), 100);
    later.world.advance_to(at(days(31)));
    assert_eq!(base(&later.world).plan_variant_id, later.free);

    let (mut now, id) = in_status(SubscriptionStatus::Active);
    now.world
        .apply(|state, cx| state.cancel(cx, id, CancelAt::Immediate, true))
        .expect("cancel");
    assert_eq!(
        now.world.available("api_calls"),
        10,
        "plan credits voided; the free plan's 10 granted"
    );

    let (mut keep, id) = in_status(SubscriptionStatus::Active);
    keep.world
        .apply(|state, cx| state.cancel(cx, id, CancelAt::Immediate, false))
        .expect("cancel");
    assert_eq!(
        keep.world.available("api_calls"),
        110,
        "revoke_credits: false keeps them"
    );

    let (mut paused, id) = in_status(SubscriptionStatus::Paused);
    paused
        .world
        .apply(|state, cx| state.cancel(cx, id, CancelAt::PeriodEnd, true))
        .expect("cancel");
    assert_eq!(
        status(&paused.world, id),
        None,
        "no running period: canceled now"
    );
}

// An upgrade applies now: new period, old plan blocks voided, new grants issued.
#[test]
fn upgrade_applies_now() {
    let (mut setup, id) = in_status(SubscriptionStatus::Active);
    setup.world.advance_to(at(days(10)));
    setup.world.usage("api_calls", 30);
    let pro = setup.pro;
    setup
        .world
        .apply(|state, cx| state.change(cx, id, pro, None))
        .expect("upgrade");
    let changed = base(&setup.world);
    assert_eq!(
        (changed.plan_variant_id, changed.current_period_start),
        (setup.pro, at(days(10)))
    );
    assert_eq!(setup.world.available("api_calls"), 500);
    assert_eq!(setup.world.state.totals().voided.get(), 70);
    assert!(matches!(
        setup
            .world
            .events
            .iter()
            .rev()
            .find(|event| event.kind.type_name() == "subscription.changed")
            .map(|e| &e.kind),
        Some(EventKind::Subscription {
            change: SubscriptionChange::Changed { .. },
            ..
        })
    ));
}

// A downgrade waits for the period end; a later change replaces the pending one.
#[test]
fn downgrade_waits_and_later_changes_replace_it() {
    let mut setup = catalog();
    let id = subscribe(&mut setup.world, setup.pro, None)
        .expect("subscribe")
        .id;
    setup
        .world
        .apply(|state, cx| state.renew(cx, id, 1))
        .expect("renew");
    let basic = setup.basic;
    setup
        .world
        .apply(|state, cx| state.change(cx, id, basic, None))
        .expect("downgrade");
    let pending = base(&setup.world).pending_change.expect("pending");
    assert_eq!(
        (pending.plan_variant_id, pending.effective_at),
        (setup.basic, at(days(31)))
    );
    assert_eq!(
        base(&setup.world).plan_variant_id,
        setup.pro,
        "still pro until period end"
    );

    let postpaid = setup.postpaid;
    setup
        .world
        .apply(|state, cx| state.change(cx, id, postpaid, Some(ChangeAt::PeriodEnd)))
        .expect("replace");
    assert_eq!(
        base(&setup.world)
            .pending_change
            .map(|change| change.plan_variant_id),
        Some(setup.postpaid)
    );
    setup.world.advance_to(at(days(31)));
    let changed = base(&setup.world);
    assert_eq!(
        (changed.plan_variant_id, changed.status),
        (setup.postpaid, SubscriptionStatus::Active)
    );
    assert_eq!(setup.world.available("api_calls"), 100);
}

// Upgrade versus downgrade compares yearly-normalised prices.
#[test]
fn upgrade_compares_yearly_prices() {
    let monthly_1000 = monthly(1000, vec![]);
    let mut yearly_11000 = monthly(11000, vec![]);
    yearly_11000.interval = ledger::Interval {
        every: 1,
        unit: ledger::IntervalUnit::Year,
    };
    assert!(
        !ledger::is_upgrade(&monthly_1000, &yearly_11000),
        "11,000 a year is less than 12,000"
    );
    assert!(ledger::is_upgrade(&yearly_11000, &monthly_1000));
    assert!(
        ledger::is_upgrade(&monthly_1000, &monthly(1000, vec![])),
        "equal counts as an upgrade"
    );
}

// Subscribing to a paid base plan replaces the free-plan fallback subscription.
#[test]
fn a_paid_plan_replaces_the_free_plan() {
    let mut setup = catalog();
    let free = setup.free;
    subscribe(&mut setup.world, free, None).expect("free");
    let paid = subscribe(&mut setup.world, setup.basic, None).expect("paid replaces free");
    assert_eq!(base(&setup.world).id, paid.id);
    assert_eq!(setup.world.state.subscriptions().len(), 1);
}

// Every operation from every live status: allowed ones go through, the rest answer
// `invalid_transition` (or a conflict for renewals that need no payment).
#[test]
fn every_illegal_transition_is_refused() {
    use SubscriptionStatus::{Active, PastDue, Paused, Trialing};
    let operations: [(&str, &[SubscriptionStatus]); 5] = [
        ("renew", &[Active, Trialing, PastDue]),
        ("pause", &[Trialing, Active, PastDue]),
        ("resume", &[Paused]),
        ("cancel", &[Trialing, Active, PastDue, Paused]),
        ("change", &[Active, Trialing]),
    ];
    for from in [Trialing, Active, PastDue, Paused] {
        for (operation, allowed_from) in operations {
            let (mut setup, id) = in_status(from);
            let pro = setup.pro;
            let result = setup.world.apply(|state, cx| match operation {
                "renew" => state.renew(cx, id, 1),
                "pause" => state.pause(cx, id),
                "resume" => state.resume(cx, id),
                "cancel" => state.cancel(cx, id, CancelAt::Immediate, true),
                _ => state.change(cx, id, pro, None),
            });
            if allowed_from.contains(&from) {
                assert!(result.is_ok(), "{operation} from {from}: {result:?}");
            } else {
                assert_eq!(
                    result.map(|_| ()),
                    Err(Refusal::InvalidTransition { from, operation }),
                    "{operation} from {from}"
                );
            }
        }
    }
}

// Terminal subscriptions leave the live state: operations on them are not found here
// (the control plane answers `invalid_transition` from its store).
#[test]
fn terminal_subscriptions_are_not_live() {
    let (mut setup, id) = in_status(SubscriptionStatus::Active);
    let ended = setup
        .world
        .apply(|state, cx| state.cancel(cx, id, CancelAt::Immediate, true))
        .expect("cancel");
    assert_eq!(ended.status, SubscriptionStatus::Canceled);
    assert_eq!(
        setup
            .world
            .apply(|state, cx| state.resume(cx, id))
            .map(|_| ()),
        Err(Refusal::SubscriptionNotFound(id))
    );
    assert_eq!(
        setup
            .world
            .state
            .blocks()
            .iter()
            .filter(|block| block.source == BlockSource::Plan)
            .count(),
        1
    );
}
