//! The scheduler keeps tenants apart: an end user whose due work fails is given a retry
//! time with backoff and skipped, so every other end user and environment still gets its
//! renewals, expiries and webhooks.

use serde_json::json;

use crate::support::{Harness, store_test};
use crate::webhooks::{received, start_receiver};

/// Due end users of the environment `key` belongs to, by its clock now.
async fn due(harness: &Harness, key: &str) -> usize {
    let caller = harness.state.authenticate(key, None).await.expect("key");
    let view = harness.state.view(&caller.env).await.expect("view");
    let now = harness.state.env_now(&view);
    harness
        .state
        .store()
        .due_end_users(&caller.env, now, 100)
        .await
        .expect("due")
        .len()
}

// One poisoned end user in tenant A (their next five-hour window takes their lifetime
// grants past i64::MAX, so their due work fails every time) no longer stops the pass:
// tenant B, sorted after A, still gets its period end, its expiry and its webhooks on the
// next tick, and the poisoned end user is retried with backoff instead of every tick.
// Before, `tick` returned at the first failing end user and B got nothing, forever.
store_test! {
    async fn a_poisoned_end_user_stops_no_other_tenant(backend) {
    let harness = Harness::start(backend).await;
    let a = harness.tenant("a").await.test;
    let b = harness.tenant("b").await.test;
    for key in [&a, &b] {
        harness.catalog(key).await;
        harness.ok("/v1/subscriptions", key, json!({"end_user_id": "u1", "plan_variant_id": "pro/monthly"}), 201).await;
    }
    // 1,000 + 45 granted by the plan so far; this takes the lifetime total to
    // i64::MAX - 1, and the next window's 45 overflows it.
    harness.grant(&a, "u1", 9_223_372_036_854_775_806 - 1045).await;
    harness.ok("/v1/credits/grants", &b, json!({"end_user_id": "u2", "amount": 7, "expires_at": "2026-01-01T01:00:00Z"}), 201).await;
    let (url, shared) = start_receiver().await;
    harness.ok("/v1/webhook-endpoints", &b, json!({"url": url, "event_types": ["subscription.past_due"]}), 201).await;

    // A month and a day later: A's u1 fails at its first window; B's subscription reached
    // its period end unpaid, and its block expired.
    harness.clock.advance_ms(32 * 86_400_000);
    control_plane::jobs::tick(&harness.state).await.expect("the pass goes on");
    let subscriptions = harness.get("/v1/subscriptions?end_user_id=u1", &b).await.body;
    assert_eq!(subscriptions["data"][0]["status"], "past_due", "{subscriptions}");
    assert_eq!(harness.available(&b, "u2").await, 0, "B's block expired");
    assert_eq!(due(&harness, &b).await, 0);

    // B's webhook goes out.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(control_plane::webhooks::run(harness.state.deliveries().clone(), stopped));
    crate::support::eventually("B's past_due webhook", || async { !received(&shared).is_empty() }).await;
    stop.send(true).expect("stop");
    worker.await.expect("worker");

    // The poisoned end user waits for its retry time (30 s, then 1 min, …) instead of
    // being tried on every pass.
    assert_eq!(due(&harness, &a).await, 0, "postponed");
    harness.clock.advance_ms(29_000);
    assert_eq!(due(&harness, &a).await, 0, "not before 30 s");
    harness.clock.advance_ms(2_000);
    assert_eq!(due(&harness, &a).await, 1, "retried after 30 s");
    control_plane::jobs::tick(&harness.state).await.expect("the pass goes on");
    assert_eq!(due(&harness, &a).await, 0, "failed again, postponed again");
    harness.clock.advance_ms(31_000);
    assert_eq!(due(&harness, &a).await, 0, "the second wait is a minute");
    harness.clock.advance_ms(30_000);
    assert_eq!(due(&harness, &a).await, 1);
    }
}

// An end user far behind is caught up in chunks, one transaction each, across batches:
// a test-clock advance of 60 days over one-minute windows (86,400 windows) answers once
// its budget is spent, saying what is left, and the scheduler finishes the rest.
store_test! {
    async fn catch_up_runs_in_chunks(backend) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    harness.catalog(&key).await;
    harness.ok("/v1/plans", &key, json!({"key": "minutely", "name": "Minutely", "kind": "base", "features": {"api_calls": {"enabled": true}}}), 201).await;
    harness.ok("/v1/plans/minutely/variants", &key, json!({"key": "monthly", "interval": {"every": 1, "unit": "month"}, "billing_mode": "postpaid", "grants": [{"amount": 1, "every": "1m"}]}), 201).await;
    harness.ok("/v1/subscriptions", &key, json!({"end_user_id": "u1", "plan_variant_id": "minutely/monthly"}), 201).await;
    let answer = harness.advance(&key, 3 * 3600).await;
    assert_eq!(answer["settled"], true, "three hours of minutes fit one advance: {answer}");
    // An operation on an end user more than one operation's worth behind is refused
    // with 503 and Retry-After until the chunks caught up.
    harness.clock.advance_ms(3 * 86_400_000);
    let refused = harness.post("/v1/usage", &key, json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 1})).await;
    assert_eq!(refused.status.as_u16(), 503, "{}", refused.body);
    assert_eq!(refused.code(), "catching_up");
    assert_eq!(refused.headers.get("retry-after").and_then(|value| value.to_str().ok()), Some("1"));
    let mut passes = 0;
    while due(&harness, &key).await > 0 {
        control_plane::jobs::tick(&harness.state).await.expect("tick");
        passes += 1;
        assert!(passes < 100, "caught up in bounded passes");
    }
    harness.ok("/v1/usage", &key, json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 1}), 201).await;
    }
}
