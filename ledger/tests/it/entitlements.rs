//! The entitlement decision (SPEC 5): metered and boolean features, plan access and
//! `requires_plan`, overage policy, every denial reason, the caller's unconfirmed spend,
//! and `resets_at`.

use ledger::{
    CancelAt, Credits, Decision, DenyReason, Feature, FeatureType, GrantAnchor, OveragePolicy,
    PlanKind, Refusal, SubscribeRequest, SubscriptionStatus, VariantId,
};

use crate::support::{World, at, credits, hours, key, monthly, template, units, window};

fn check(world: &World, feature: &str, count: u64, pending: i64) -> Decision {
    world
        .state
        .decide(
            &world.catalog,
            &key(feature),
            units(count),
            credits(pending),
            world.now,
        )
        .expect("decision")
}

fn subscribe(world: &mut World, variant: VariantId) -> ledger::SubscriptionId {
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

fn gated(world: &mut World, name: &str) {
    world.add_feature(Feature {
        key: key(name),
        feature_type: FeatureType::Metered,
        pricing: None,
        requires_plan: true,
    });
}

// Metered: allowed while available covers the cost; the answer carries balance, cost and
// debt; the caller's unconfirmed spend counts against the balance.
#[test]
fn metered_checks_compare_balance_and_cost() {
    let mut world = World::new();
    world.grant_amount(10);
    let decision = check(&world, "tokens", 2000, 0);
    assert_eq!(
        (
            decision.allowed,
            decision.balance,
            decision.cost,
            decision.debt,
            decision.reason
        ),
        (
            true,
            Some(credits(10)),
            Some(credits(6)),
            Credits::ZERO,
            None
        )
    );
    let short = check(&world, "tokens", 4000, 0);
    assert_eq!(
        (short.allowed, short.reason),
        (false, Some(DenyReason::InsufficientBalance))
    );
    let pending = check(&world, "api_calls", 5, 6);
    assert_eq!(
        (pending.allowed, pending.balance),
        (false, Some(credits(4)))
    );
    assert!(check(&world, "api_calls", 4, 6).allowed);
}

// Unknown features are refused, not denied.
#[test]
fn unknown_features_are_not_found() {
    let world = World::new();
    let refusal = world.state.decide(
        &world.catalog,
        &key("nope"),
        units(1),
        Credits::ZERO,
        world.now,
    );
    assert_eq!(refusal, Err(Refusal::FeatureNotFound(key("nope"))));
}

// Boolean features are on only through a plan in good standing; balance and cost are
// absent. The free plan counts for a user without a subscription.
#[test]
fn boolean_features_follow_plans() {
    let mut world = World::new();
    let denied = check(&world, "sso", 1, 0);
    assert_eq!(
        (denied.allowed, denied.reason, denied.balance, denied.cost),
        (false, Some(DenyReason::NotInPlan), None, None)
    );

    let free = world.add_plan(
        PlanKind::Base,
        &["sso"],
        OveragePolicy::Block,
        vec![monthly(0, vec![])],
    );
    world.catalog.settings.free_plan_variant_id = Some(free[0]);
    let via_free = check(&world, "sso", 1, 0);
    assert!(
        via_free.allowed,
        "the free plan enables sso for a user with no subscription"
    );
    assert_eq!(
        via_free.plan_id,
        world.catalog.variant(free[0]).map(|v| v.plan_id)
    );
    assert_eq!(via_free.subscription_status, None);
}

// A metered feature with `requires_plan` needs a plan enabling it; credits alone are not
// enough. Strict usage refuses with the same reason.
#[test]
fn requires_plan_gates_metered_features() {
    let mut world = World::new();
    gated(&mut world, "gpu");
    world.grant_amount(100);
    assert_eq!(
        check(&world, "gpu", 1, 0).reason,
        Some(DenyReason::NotInPlan)
    );
    assert_eq!(
        world.try_usage("gpu", 1, true),
        Err(Refusal::NotInPlan(key("gpu")))
    );
    assert!(
        world.try_usage("gpu", 1, false).is_ok(),
        "usage is a fact and is recorded without strict"
    );

    let pro = world.add_plan(
        PlanKind::Base,
        &["gpu"],
        OveragePolicy::Block,
        vec![monthly(2000, vec![])],
    );
    subscribe(&mut world, pro[0]);
    let decision = check(&world, "gpu", 1, 0);
    assert!(decision.allowed);
    assert_eq!(
        decision.subscription_status,
        Some(SubscriptionStatus::Active)
    );
}

// Overage `allow` admits beyond the balance; the shortfall becomes debt.
#[test]
fn overage_allow_admits_into_debt() {
    let mut world = World::new();
    let pro = world.add_plan(
        PlanKind::Base,
        &["api_calls"],
        OveragePolicy::Allow,
        vec![monthly(2000, vec![])],
    );
    subscribe(&mut world, pro[0]);
    world.grant_amount(2);
    let decision = check(&world, "api_calls", 5, 0);
    assert_eq!(
        (decision.allowed, decision.balance),
        (true, Some(credits(2)))
    );
    let outcome = world
        .try_usage("api_calls", 5, true)
        .expect("strict usage admitted by overage");
    assert_eq!((outcome.covered.get(), outcome.debt.get()), (2, 3));
    assert_eq!(check(&world, "api_calls", 1, 0).debt, credits(3));
}

// A paused subscription denies its plan's gated features with `subscription_paused`, and
// a past-due one with `subscription_past_due` when its variant disallows usage then.
#[test]
fn paused_and_past_due_subscriptions_deny() {
    let mut world = World::new();
    gated(&mut world, "gpu");
    let mut strict_variant = monthly(2000, vec![]);
    strict_variant.allow_usage_while_past_due = false;
    let pro = world.add_plan(
        PlanKind::Base,
        &["gpu", "sso"],
        OveragePolicy::Block,
        vec![strict_variant],
    );
    let subscription = subscribe(&mut world, pro[0]);
    world.grant_amount(100);
    world
        .apply(|state, cx| state.pause(cx, subscription))
        .expect("pause");
    assert_eq!(
        check(&world, "gpu", 1, 0).reason,
        Some(DenyReason::SubscriptionPaused)
    );
    assert_eq!(
        check(&world, "sso", 1, 0).reason,
        Some(DenyReason::SubscriptionPaused)
    );
    assert!(
        check(&world, "api_calls", 1, 0).allowed,
        "other credits stay usable"
    );
    world
        .apply(|state, cx| state.resume(cx, subscription))
        .expect("resume");
    assert!(check(&world, "gpu", 1, 0).allowed);

    // The period ends unpaid: past due.
    let period_end = world
        .state
        .subscription(subscription)
        .expect("live")
        .current_period_end;
    world.advance_to(period_end);
    assert_eq!(
        world.state.subscription(subscription).map(|s| s.status),
        Some(SubscriptionStatus::PastDue)
    );
    assert_eq!(
        check(&world, "gpu", 1, 0).reason,
        Some(DenyReason::SubscriptionPastDue)
    );
    assert_eq!(
        world.try_usage("gpu", 1, true),
        Err(Refusal::SubscriptionPastDue(key("gpu")))
    );
    world
        .apply(|state, cx| state.cancel(cx, subscription, CancelAt::Immediate, true))
        .expect("cancel");
    assert_eq!(
        check(&world, "gpu", 1, 0).reason,
        Some(DenyReason::NotInPlan)
    );
}

// An addon opens its features on top of the base plan.
#[test]
fn addons_open_their_features() {
    let mut world = World::new();
    gated(&mut world, "gpu");
    let base = world.add_plan(
        PlanKind::Base,
        &[],
        OveragePolicy::Block,
        vec![monthly(1000, vec![])],
    );
    let addon = world.add_plan(
        PlanKind::Addon,
        &["gpu"],
        OveragePolicy::Block,
        vec![monthly(500, vec![])],
    );
    subscribe(&mut world, base[0]);
    world.grant_amount(10);
    assert_eq!(
        check(&world, "gpu", 1, 0).reason,
        Some(DenyReason::NotInPlan)
    );
    subscribe(&mut world, addon[0]);
    assert!(check(&world, "gpu", 1, 0).allowed);
}

// `resets_at` is the soonest expiry of an applicable recurring-grant block; a check at the
// reset instant already sees the next window (due work is taken into account without
// changing the state).
#[test]
fn resets_at_and_checks_across_a_reset() {
    let mut world = World::new();
    let pro = world.add_plan(
        PlanKind::Base,
        &["api_calls"],
        OveragePolicy::Block,
        vec![monthly(
            2000,
            vec![window(45, hours(5), GrantAnchor::Period)],
        )],
    );
    subscribe(&mut world, pro[0]);
    world.usage("api_calls", 45);
    let spent = check(&world, "api_calls", 1, 0);
    assert_eq!(
        (spent.allowed, spent.resets_at),
        (false, Some(at(hours(5))))
    );
    let before = world.state.clone();
    world.now = at(hours(5));
    let reset = check(&world, "api_calls", 1, 0);
    assert_eq!(
        (reset.allowed, reset.balance, reset.resets_at),
        (true, Some(credits(45)), Some(at(hours(10))))
    );
    assert_eq!(world.state, before, "deciding never changes the state");
}

// Before the first use, a first-use window's quota is visible to checks.
#[test]
fn first_use_quota_is_visible_before_first_use() {
    let mut world = World::new();
    let pro = world.add_plan(
        PlanKind::Base,
        &["api_calls"],
        OveragePolicy::Block,
        vec![monthly(
            2000,
            vec![window(10, hours(5), GrantAnchor::FirstUse), template(100)],
        )],
    );
    subscribe(&mut world, pro[0]);
    let decision = check(&world, "api_calls", 1, 0);
    assert_eq!(
        (decision.allowed, decision.balance),
        (true, Some(credits(110)))
    );
}
