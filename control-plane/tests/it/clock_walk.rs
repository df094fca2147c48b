//! A month (and more) on the test clock: a monthly plan with a 5-hour resetting quota,
//! rollover, renewal via `/renew`, a missed renewal going `past_due` then `expired`, and
//! the free-plan fallback. Advancing runs every due job before it answers.

use serde_json::json;

use crate::support::Harness;
use crate::support::store_test;

const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;

store_test! {
    async fn a_month_on_the_test_clock(backend) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    let key = key.as_str();
    harness
        .ok(
            "/v1/features",
            key,
            json!({"key": "chat", "name": "Chat", "type": "metered"}),
            201,
        )
        .await;
    harness.ok("/v1/plans", key, json!({"key": "free", "name": "Free", "kind": "base", "features": {"chat": {"enabled": true}}}), 201).await;
    harness.ok("/v1/plans/free/variants", key, json!({"key": "m", "interval": {"every": 1, "unit": "month"}, "billing_mode": "prepaid", "grants": [{"amount": 5}]}), 201).await;
    harness.ok("/v1/plans", key, json!({"key": "pro", "name": "Pro", "kind": "base", "features": {"chat": {"enabled": true}}}), 201).await;
    harness
        .ok(
            "/v1/plans/pro/variants",
            key,
            json!({"key": "m", "interval": {"every": 1, "unit": "month"}, "billing_mode": "prepaid", "price": {"amount": 2000, "currency": "usd"},
                   "grants": [{"amount": 45, "every": "5h", "priority": 10}, {"amount": 1000, "rollover": {"percent": 50, "max": 200}}]}),
            201,
        )
        .await;
    harness
        .send(
            axum::http::Method::PATCH,
            "/v1/settings",
            Some(key),
            Some(json!({"free_plan_variant_id": "free/m"})),
            &[],
        )
        .await;
    let subscription = harness
        .ok(
            "/v1/subscriptions",
            key,
            json!({"end_user_id": "dev", "plan_variant_id": "pro/m"}),
            201,
        )
        .await;
    let id = subscription["id"].as_str().expect("id").to_owned();
    let check = |units: u64| {
        let (harness, key) = (harness.clone(), key.to_owned());
        async move {
            harness
                .get(
                    &format!(
                        "/v1/entitlements/check?end_user_id=dev&feature_key=chat&units={units}"
                    ),
                    &key,
                )
                .await
                .body
        }
    };

    // The 5-hour window: 45 messages, burned first (priority 10), back after 5 hours.
    assert_eq!(check(1).await["balance"], 1045);
    harness
        .ok(
            "/v1/usage",
            key,
            json!({"end_user_id": "dev", "feature_key": "chat", "units": 45}),
            201,
        )
        .await;
    assert_eq!(
        check(1).await["balance"],
        1000,
        "the window is spent; the monthly credits remain"
    );
    harness.advance(key, 5 * HOUR).await;
    assert_eq!(
        check(1).await["balance"],
        1045,
        "the window reset after exactly five hours"
    );

    // Spend 700 of the monthly 1000, pay for the next month, and cross the period end.
    harness
        .ok(
            "/v1/usage",
            key,
            json!({"end_user_id": "dev", "feature_key": "chat", "units": 745}),
            201,
        )
        .await;
    harness
        .ok(
            &format!("/v1/subscriptions/{id}/renew"),
            key,
            json!({"periods": 1}),
            200,
        )
        .await;
    harness.advance(key, 31 * DAY).await;
    let renewed = harness
        .get(&format!("/v1/subscriptions/{id}"), key)
        .await
        .body;
    assert_eq!(renewed["status"], "active");
    let balance = harness
        .get("/v1/credits/balance?end_user_id=dev", key)
        .await
        .body;
    let rollover: i64 = balance["blocks"]
        .as_array()
        .expect("blocks")
        .iter()
        .filter(|block| block["source"] == "rollover")
        .map(|block| block["remaining"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(
        rollover, 150,
        "50% of the 300 left rolled over (under the 200 max)"
    );

    // Nobody pays for the third month: past due at the period end, expired after grace,
    // and the free plan takes over.
    let period_end_secs = 28 * DAY; // February 2026
    harness.advance(key, period_end_secs).await;
    assert_eq!(
        harness
            .get(&format!("/v1/subscriptions/{id}"), key)
            .await
            .body["status"],
        "past_due"
    );
    harness.advance(key, 3 * DAY).await;
    let expired = harness
        .get(&format!("/v1/subscriptions/{id}"), key)
        .await
        .body;
    assert_eq!(expired["status"], "expired");
    let current = harness
        .get("/v1/subscriptions?end_user_id=dev", key)
        .await
        .body;
    let active: Vec<&serde_json::Value> = current["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter(|s| s["status"] == "active")
        .collect();
    assert_eq!(active.len(), 1);
    assert_eq!(check(1).await["plan"], "free");

    let mut types: Vec<String> = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = harness
            .get(&format!("/v1/events?limit=500{cursor}"), key)
            .await
            .body;
        let data = page["data"].as_array().expect("events");
        if data.is_empty() {
            break;
        }
        types.extend(
            data.iter()
                .map(|event| event["type"].as_str().unwrap_or("").to_owned()),
        );
        cursor = format!("&cursor={}", page["next_cursor"].as_str().expect("cursor"));
    }
    for expected in [
        "subscription.created",
        "subscription.renewed",
        "subscription.renewal_due",
        "subscription.past_due",
        "subscription.expired",
        "credits.expired",
    ] {
        assert!(types.iter().any(|t| t == expected), "{expected} missing");
    }
    let clock = harness.get("/v1/test-clock", key).await.body;
    assert_eq!(
        clock["offset_seconds"],
        5 * HOUR + 31 * DAY + 28 * DAY + 3 * DAY
    );
    }
}

// The test clock moves only forward, and only in the test environment.
store_test! {
    async fn the_test_clock_is_guarded(backend) {
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    let backwards = harness
        .post(
            "/v1/test-clock/advance",
            &tenant.test,
            json!({"seconds": -5}),
        )
        .await;
    assert_eq!(backwards.body["field"], "seconds");
    let both = harness
        .post(
            "/v1/test-clock/advance",
            &tenant.test,
            json!({"seconds": 5, "to": "2030-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(both.status.as_u16(), 422);
    let live = harness
        .post(
            "/v1/test-clock/advance",
            &tenant.live,
            json!({"seconds": 5}),
        )
        .await;
    assert_eq!(live.code(), "conflict");
    let to = harness
        .ok(
            "/v1/test-clock/advance",
            &tenant.test,
            json!({"to": "2026-02-01T00:00:00Z"}),
            200,
        )
        .await;
    assert_eq!(to["now"], "2026-02-01T00:00:00Z");
    assert_eq!(
        harness.get("/v1/test-clock", &tenant.live).await.body["offset_seconds"],
        0
    );
    }
}
