//! Every endpoint's success path and the refusals it can produce, through the router.

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::support::Harness;
use crate::support::store_test;

// The seed's three steps: subscribe, check, record usage.
store_test! {
    async fn subscribe_check_record_usage(backend) {
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    let key = &tenant.test;
    harness.catalog(key).await;
    let subscription = harness
        .ok(
            "/v1/subscriptions",
            key,
            json!({"end_user_id": "user_123", "plan_variant_id": "pro/monthly"}),
            201,
        )
        .await;
    assert_eq!(subscription["status"], "active");
    assert_eq!(
        subscription["paid_through"],
        subscription["current_period_end"]
    );

    let check = harness
        .get(
            "/v1/entitlements/check?end_user_id=user_123&feature_key=api_calls&units=1",
            key,
        )
        .await;
    assert_eq!(check.status, StatusCode::OK);
    assert_eq!(check.body["allowed"], true);
    assert_eq!(check.body["balance"], 1000);
    assert_eq!(check.body["plan"], "pro");
    assert_eq!(check.body["source"], "ledger");

    let usage = harness
        .ok(
            "/v1/usage",
            key,
            json!({"end_user_id": "user_123", "feature_key": "api_calls", "units": 3}),
            201,
        )
        .await;
    assert_eq!(
        (
            usage["cost"].as_i64(),
            usage["covered"].as_i64(),
            usage["balance"].as_i64()
        ),
        (Some(3), Some(3), Some(997))
    );
    assert!(
        usage["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("led_"))
    );
    }
}

// Entitlement checks: boolean features, gated features, every denial, unknown features.
store_test! {
    async fn entitlement_checks(backend) {
    let harness = Harness::start(backend).await;
    let key = &harness.tenant("acme").await.test;
    harness.catalog(key).await;
    let check = |feature: &'static str| {
        let harness = harness.clone();
        let key = key.clone();
        async move {
            harness
                .get(
                    &format!("/v1/entitlements/check?end_user_id=u1&feature_key={feature}"),
                    &key,
                )
                .await
        }
    };
    let sso = check("sso").await;
    assert_eq!(
        (
            sso.body["allowed"].as_bool(),
            sso.body["reason"].as_str(),
            sso.body["balance"].is_null()
        ),
        (Some(false), Some("not_in_plan"), true)
    );
    assert_eq!(
        check("api_calls").await.body["reason"],
        "insufficient_balance"
    );
    assert_eq!(check("gpu").await.body["reason"], "not_in_plan");
    let unknown = check("nope").await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (StatusCode::NOT_FOUND, "feature_not_found")
    );

    let subscription = harness
        .ok(
            "/v1/subscriptions",
            key,
            json!({"end_user_id": "u1", "plan_variant_id": "pro/monthly"}),
            201,
        )
        .await;
    assert_eq!(check("sso").await.body["allowed"], true);
    assert_eq!(check("gpu").await.body["balance"], 1045);
    let id = subscription["id"].as_str().expect("id");
    harness
        .ok(
            &format!("/v1/subscriptions/{id}/pause"),
            key,
            json!({}),
            200,
        )
        .await;
    assert_eq!(check("gpu").await.body["reason"], "subscription_paused");

    let list = harness.get("/v1/entitlements?end_user_id=u1", key).await;
    assert_eq!(list.body["data"].as_array().map(Vec::len), Some(4));
    let bad = harness
        .get(
            "/v1/entitlements/check?end_user_id=u1&feature_key=api_calls&units=0",
            key,
        )
        .await;
    assert_eq!(
        (bad.status, bad.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request")
    );
    }
}

// Grants, the balance in burn order, voids, adjustments and the ledger with filters and
// cursor pagination.
store_test! {
    async fn credits_and_ledger(backend) {
    let harness = Harness::start(backend).await;
    let key = &harness.tenant("acme").await.test;
    harness.catalog(key).await;
    let block = harness
        .ok(
            "/v1/credits/grants",
            key,
            json!({"end_user_id": "u1", "amount": 500, "source": "purchase", "price_paid": 999, "currency": "usd",
                   "external_payment_id": "pi_123", "metadata": {"order": 7}, "priority": 50}),
            201,
        )
        .await;
    assert_eq!(
        (
            block["remaining"].as_i64(),
            block["external_payment_id"].as_str()
        ),
        (Some(500), Some("pi_123"))
    );
    harness.grant(key, "u1", 100).await;
    let balance = harness.get("/v1/credits/balance?end_user_id=u1", key).await;
    assert_eq!(balance.body["available"], 600);
    assert_eq!(
        balance.body["blocks"][0]["id"], block["id"],
        "priority 50 burns first"
    );
    assert_eq!(balance.body["blocks"][0]["metadata"]["order"], 7);

    let negative = harness
        .ok(
            "/v1/credits/adjustments",
            key,
            json!({"end_user_id": "u1", "amount": -50, "reason": "refund"}),
            201,
        )
        .await;
    assert_eq!(negative["balance"], 550);
    let positive = harness
        .ok(
            "/v1/credits/adjustments",
            key,
            json!({"end_user_id": "u1", "amount": 5, "reason": "goodwill"}),
            201,
        )
        .await;
    assert!(positive["block"]["id"].is_string());
    let short = harness
        .post(
            "/v1/credits/adjustments",
            key,
            json!({"end_user_id": "u1", "amount": -10000, "reason": "oops"}),
        )
        .await;
    assert_eq!(
        (short.status, short.code(), short.body["needed"].as_i64()),
        (
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_balance",
            Some(10000)
        )
    );

    let block_id = block["id"].as_str().expect("id");
    let voided = harness
        .ok(
            &format!("/v1/credits/blocks/{block_id}/void"),
            key,
            json!({"reason": "chargeback"}),
            200,
        )
        .await;
    assert!(voided["voided_at"].is_string());
    let again = harness
        .post(
            &format!("/v1/credits/blocks/{block_id}/void"),
            key,
            json!({}),
        )
        .await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "conflict")
    );
    let missing = harness
        .post(
            "/v1/credits/blocks/blk_01ARZ3NDEKTSV4RRFFQ69G5FAV/void",
            key,
            json!({}),
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(harness.available(key, "u1").await, 105);

    let page = harness.get("/v1/ledger?end_user_id=u1&limit=2", key).await;
    let entries = page.body["data"].as_array().expect("entries");
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["type"], "void", "newest first");
    let cursor = page.body["next_cursor"].as_str().expect("cursor");
    let next = harness
        .get(
            &format!("/v1/ledger?end_user_id=u1&limit=2&cursor={cursor}"),
            key,
        )
        .await;
    assert_ne!(next.body["data"][0]["id"], entries[0]["id"]);
    let grants = harness
        .get("/v1/ledger?end_user_id=u1&type=grant", key)
        .await;
    assert!(
        grants.body["data"]
            .as_array()
            .expect("grants")
            .iter()
            .all(|entry| entry["type"] == "grant")
    );
    let bad_type = harness.get("/v1/ledger?type=steal", key).await;
    assert_eq!(
        (bad_type.status, bad_type.body["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("type"))
    );
    let bad_limit = harness.get("/v1/ledger?limit=501", key).await;
    assert_eq!(bad_limit.body["field"], "limit");
    }
}

// Usage: debt when short, strict refusal, validation of units and fields.
store_test! {
    async fn usage_debt_and_strict(backend) {
    let harness = Harness::start(backend).await;
    let key = &harness.tenant("acme").await.test;
    harness.catalog(key).await;
    harness.grant(key, "u1", 5).await;
    let over = harness
        .ok(
            "/v1/usage",
            key,
            json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 8}),
            201,
        )
        .await;
    assert_eq!(
        (over["covered"].as_i64(), over["debt"].as_i64()),
        (Some(5), Some(3))
    );
    let strict = harness
        .post(
            "/v1/usage",
            key,
            json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 1, "strict": true}),
        )
        .await;
    assert_eq!(
        (strict.status, strict.code()),
        (StatusCode::PAYMENT_REQUIRED, "insufficient_balance")
    );
    let gated = harness
        .post(
            "/v1/usage",
            key,
            json!({"end_user_id": "u1", "feature_key": "gpu", "units": 1, "strict": true}),
        )
        .await;
    assert_eq!(
        (gated.status, gated.code()),
        (StatusCode::FORBIDDEN, "not_in_plan")
    );
    let settled = harness.grant(key, "u1", 10).await;
    assert_eq!(
        settled["remaining"], 7,
        "the grant paid the debt of 3 first"
    );

    for (body, field) in [
        (
            json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 0}),
            "units",
        ),
        (
            json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 1_000_000_000_001_u64}),
            "units",
        ),
        (
            json!({"end_user_id": "u1", "feature_key": "Bad Key", "units": 1}),
            "feature_key",
        ),
        (
            json!({"end_user_id": "", "feature_key": "api_calls", "units": 1}),
            "end_user_id",
        ),
        (
            json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 1, "metadata": [1]}),
            "metadata",
        ),
    ] {
        let answer = harness.post("/v1/usage", key, body.clone()).await;
        assert_eq!(
            (answer.status, answer.body["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{body}"
        );
    }
    let unknown = harness
        .post(
            "/v1/usage",
            key,
            json!({"end_user_id": "u1", "feature_key": "nope", "units": 1}),
        )
        .await;
    assert_eq!(unknown.code(), "feature_not_found");
    }
}

// Batches: independent results, per-event keys deduplicated within and across batches,
// a reused key with another body refused for that event only.
store_test! {
    async fn usage_batches(backend) {
    let harness = Harness::start(backend).await;
    let key = &harness.tenant("acme").await.test;
    harness.catalog(key).await;
    harness.grant(key, "u1", 100).await;
    let event = |user: &str, units: u64, event_key: &str| json!({"end_user_id": user, "feature_key": "api_calls", "units": units, "idempotency_key": event_key});
    let first = harness
        .ok("/v1/usage/batch", key, json!({"events": [event("u1", 2, "e1"), event("u2", 3, "e2"), event("u1", 2, "e1"), {"end_user_id": "u1", "feature_key": "nope", "units": 1, "idempotency_key": "e3"}]}), 200)
        .await;
    let results = first["results"].as_array().expect("results");
    assert_eq!(
        results
            .iter()
            .map(|result| result["status"].as_str().unwrap_or(""))
            .collect::<Vec<_>>(),
        vec!["created", "created", "duplicate", "error"]
    );
    assert_eq!(results[2]["id"], results[0]["id"]);
    assert_eq!(results[3]["error"]["code"], "feature_not_found");

    let second = harness
        .ok(
            "/v1/usage/batch",
            key,
            json!({"events": [event("u1", 2, "e1"), event("u1", 9, "e2")]}),
            200,
        )
        .await;
    assert_eq!(second["results"][0]["status"], "duplicate");
    assert_eq!(second["results"][0]["id"], results[0]["id"]);
    assert_eq!(
        second["results"][1]["error"]["code"],
        "idempotency_key_reused"
    );
    assert_eq!(harness.available(key, "u1").await, 98);

    // Each recorded event's entry keeps its own key and metadata, even when one end
    // user's events share a transaction.
    let tagged = |units: u64, event_key: &str, n: u64| json!({"end_user_id": "u3", "feature_key": "api_calls", "units": units, "idempotency_key": event_key, "metadata": {"n": n}});
    harness
        .ok("/v1/usage/batch", key, json!({"events": [tagged(1, "m1", 1), tagged(2, "m2", 2)]}), 200)
        .await;
    let entries = harness.get("/v1/ledger?end_user_id=u3&type=debit", key).await;
    let mut seen: Vec<(String, u64)> = entries.body["data"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|entry| {
            (
                entry["idempotency_key"].as_str().unwrap_or("").to_owned(),
                entry["metadata"]["n"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(seen, vec![("m1".to_owned(), 1), ("m2".to_owned(), 2)]);

    let missing_key = harness
        .ok(
            "/v1/usage/batch",
            key,
            json!({"events": [{"end_user_id": "u1", "feature_key": "api_calls", "units": 1}]}),
            200,
        )
        .await;
    assert_eq!(
        missing_key["results"][0]["error"]["field"],
        "events[0].idempotency_key"
    );
    let empty = harness
        .post("/v1/usage/batch", key, json!({"events": []}))
        .await;
    assert_eq!(empty.status, StatusCode::UNPROCESSABLE_ENTITY);
    }
}

// A batch event's key is kept for the retention by the real clock, as the purge counts
// it, even when the environment's test clock runs far ahead.
store_test! {
    async fn batch_event_keys_are_kept_by_the_real_clock(backend) {
    let harness = Harness::start(backend).await;
    let key = &harness.tenant("acme").await.test;
    harness.catalog(key).await;
    harness.advance(key, 200 * 86_400).await;
    harness.advance(key, 200 * 86_400).await;
    let batch = json!({"events": [{"end_user_id": "u1", "feature_key": "api_calls", "units": 1, "idempotency_key": "k1"}]});
    let status = |answer: &serde_json::Value| answer["results"][0]["status"].as_str().unwrap_or("").to_owned();
    assert_eq!(status(&harness.ok("/v1/usage/batch", key, batch.clone(), 200).await), "created");
    let retention = harness.state.config().usage_key_retention;
    // Just inside the retention the key is remembered; just past it, forgotten.
    harness.clock.advance_ms(i64::try_from(retention.as_millis()).expect("small") - 1000);
    control_plane::jobs::tick(&harness.state).await.expect("jobs");
    assert_eq!(status(&harness.ok("/v1/usage/batch", key, batch.clone(), 200).await), "duplicate");
    harness.clock.advance_ms(2000);
    control_plane::jobs::tick(&harness.state).await.expect("jobs");
    assert_eq!(status(&harness.ok("/v1/usage/batch", key, batch, 200).await), "created");
    }
}

// Reservations: create, get, commit (more than held), release, extend, and refusals.
store_test! {
    async fn reservations(backend) {
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    let key = &tenant.test;
    harness.catalog(key).await;
    harness.grant(key, "u1", 100).await;
    // The state version an answer names is the end user's state right after it.
    let version_now = || async {
        let env = control_plane::store::Env::new(tenant.id.clone(), control_plane::store::Environment::Test);
        let end_user = ledger::EndUserId::new("u1").expect("end user id");
        harness
            .state
            .store()
            .load_state(&env, &end_user)
            .await
            .expect("state")
            .expect("stored")
            .version()
    };
    let hold = harness.ok("/v1/reservations", key, json!({"end_user_id": "u1", "feature_key": "tokens", "units": 10000, "ttl_seconds": 60}), 201).await;
    assert_eq!(
        (hold["amount"].as_i64(), hold["status"].as_str()),
        (Some(30), Some("active"))
    );
    assert_eq!(hold["version"].as_u64(), Some(version_now().await));
    let id = hold["id"].as_str().expect("id");
    let read = harness.get(&format!("/v1/reservations/{id}"), key).await.body;
    assert_eq!(read["status"], "active");
    assert!(read.get("version").is_none(), "a read names no version: {read}");
    assert_eq!(harness.available(key, "u1").await, 70);
    let extended = harness
        .ok(
            &format!("/v1/reservations/{id}/extend"),
            key,
            json!({"ttl_seconds": 600}),
            200,
        )
        .await;
    assert_ne!(extended["expires_at"], hold["expires_at"]);
    assert_eq!(extended["version"].as_u64(), Some(version_now().await));
    assert!(extended["version"].as_u64() > hold["version"].as_u64());
    let committed = harness
        .ok(
            &format!("/v1/reservations/{id}/commit"),
            key,
            json!({"amount": 40}),
            200,
        )
        .await;
    assert_eq!(
        (
            committed["status"].as_str(),
            committed["committed_amount"].as_i64()
        ),
        (Some("committed"), Some(40))
    );
    assert_eq!(committed["version"].as_u64(), Some(version_now().await));
    assert_eq!(harness.available(key, "u1").await, 60);
    let again = harness
        .post(&format!("/v1/reservations/{id}/release"), key, json!({}))
        .await;
    assert_eq!(
        (
            again.status,
            again.code(),
            again.body["current_status"].as_str()
        ),
        (
            StatusCode::CONFLICT,
            "reservation_not_active",
            Some("committed")
        )
    );

    let second = harness
        .ok(
            "/v1/reservations",
            key,
            json!({"end_user_id": "u1", "feature_key": "api_calls", "amount": 10}),
            201,
        )
        .await;
    let second_id = second["id"].as_str().expect("id");
    let released = harness
        .send(
            Method::POST,
            &format!("/v1/reservations/{second_id}/release"),
            Some(key),
            None,
            &[],
        )
        .await;
    assert_eq!(released.body["released_amount"], 10);
    let too_much = harness
        .post(
            "/v1/reservations",
            key,
            json!({"end_user_id": "u1", "feature_key": "api_calls", "amount": 1000}),
        )
        .await;
    assert_eq!(too_much.code(), "insufficient_balance");
    let both = harness
        .post(
            "/v1/reservations",
            key,
            json!({"end_user_id": "u1", "feature_key": "api_calls", "amount": 1, "units": 1}),
        )
        .await;
    assert_eq!(both.status, StatusCode::UNPROCESSABLE_ENTITY);
    let missing = harness
        .get("/v1/reservations/rsv_01ARZ3NDEKTSV4RRFFQ69G5FAV", key)
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    }
}

// Subscriptions: create, get, list, renew, change, cancel, and invalid transitions.
store_test! {
    async fn subscription_lifecycle(backend) {
    let harness = Harness::start(backend).await;
    let key = &harness.tenant("acme").await.test;
    harness.catalog(key).await;
    let created = harness
        .ok(
            "/v1/subscriptions",
            key,
            json!({"end_user_id": "u1", "plan_variant_id": "free/monthly"}),
            201,
        )
        .await;
    let pro = harness
        .ok(
            "/v1/subscriptions",
            key,
            json!({"end_user_id": "u1", "plan_variant_id": "pro/monthly", "trial_days": 14}),
            201,
        )
        .await;
    assert_eq!(pro["status"], "trialing");
    let free_id = created["id"].as_str().expect("id");
    assert_eq!(
        harness
            .get(&format!("/v1/subscriptions/{free_id}"), key)
            .await
            .body["status"],
        "canceled",
        "replaced by pro"
    );
    let id = pro["id"].as_str().expect("id");
    let renewed = harness
        .ok(
            &format!("/v1/subscriptions/{id}/renew"),
            key,
            json!({"periods": 2}),
            200,
        )
        .await;
    assert!(renewed["paid_through"].is_string());
    let conflict = harness
        .post(
            "/v1/subscriptions",
            key,
            json!({"end_user_id": "u1", "plan_variant_id": "pro/monthly"}),
        )
        .await;
    assert_eq!(
        (conflict.status, conflict.code()),
        (StatusCode::CONFLICT, "conflict")
    );
    let downgrade = harness
        .ok(
            &format!("/v1/subscriptions/{id}/change"),
            key,
            json!({"plan_variant_id": "free/monthly"}),
            200,
        )
        .await;
    assert!(downgrade["pending_change"].is_object());
    let canceled = harness
        .ok(
            &format!("/v1/subscriptions/{id}/cancel"),
            key,
            json!({"at": "immediate"}),
            200,
        )
        .await;
    assert_eq!(canceled["status"], "canceled");
    let resume = harness
        .post(&format!("/v1/subscriptions/{id}/resume"), key, json!({}))
        .await;
    assert_eq!(
        (
            resume.status,
            resume.code(),
            resume.body["current_status"].as_str()
        ),
        (StatusCode::CONFLICT, "invalid_transition", Some("canceled"))
    );
    let list = harness.get("/v1/subscriptions?end_user_id=u1", key).await;
    let statuses: Vec<&str> = list.body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|s| s["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        statuses.len(),
        3,
        "free, pro, and the free fallback: {statuses:?}"
    );
    let unknown = harness
        .post(
            "/v1/subscriptions",
            key,
            json!({"end_user_id": "u2", "plan_variant_id": "var_01ARZ3NDEKTSV4RRFFQ69G5FAV"}),
        )
        .await;
    assert_eq!(unknown.body["field"], "plan_variant_id");
    }
}

// Catalog: features, plans, variants (by id or key), settings, duplicate keys, archive.
store_test! {
    async fn catalog_endpoints(backend) {
    let harness = Harness::start(backend).await;
    let key = &harness.tenant("acme").await.test;
    harness.catalog(key).await;
    assert_eq!(
        harness.get("/v1/features", key).await.body["data"]
            .as_array()
            .map(Vec::len),
        Some(4)
    );
    assert_eq!(
        harness.get("/v1/features/tokens", key).await.body["pricing"]["per"],
        1000
    );
    let plan = harness.get("/v1/plans/pro", key).await;
    let plan_id = plan.body["id"].as_str().expect("id");
    assert_eq!(
        harness.get(&format!("/v1/plans/{plan_id}"), key).await.body["key"],
        "pro"
    );
    assert_eq!(plan.body["variants"][0]["grants"][1]["every"], "5h");
    let duplicate = harness
        .post(
            "/v1/features",
            key,
            json!({"key": "tokens", "name": "Again", "type": "metered"}),
        )
        .await;
    assert_eq!(
        (duplicate.status, duplicate.code()),
        (StatusCode::CONFLICT, "conflict")
    );
    for (body, field) in [
        (
            json!({"key": "x", "name": "X", "type": "boolean", "pricing": {"model": "flat", "amount": 1}}),
            "pricing",
        ),
        (
            json!({"key": "x", "name": "X", "type": "metered", "pricing": {"model": "per_unit", "unit_cost": 1, "per": 0}}),
            "pricing.per",
        ),
        (json!({"key": "X!", "name": "X", "type": "metered"}), "key"),
    ] {
        let answer = harness.post("/v1/features", key, body.clone()).await;
        assert_eq!(
            (answer.status, answer.body["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{body}"
        );
    }
    let bad_variant = harness
        .post("/v1/plans/pro/variants", key, json!({"key": "w", "interval": {"every": 1, "unit": "week"}, "billing_mode": "prepaid", "grants": [{"amount": 5, "every": "5 hours"}]}))
        .await;
    assert_eq!(bad_variant.body["field"], "grants[0].every");
    let archived = harness
        .ok(
            "/v1/plans/pro/variants/monthly/archive",
            key,
            json!({}),
            200,
        )
        .await;
    assert_eq!(archived["archived"], true);
    let refused = harness
        .post(
            "/v1/subscriptions",
            key,
            json!({"end_user_id": "u9", "plan_variant_id": "pro/monthly"}),
        )
        .await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    let settings = harness.get("/v1/settings", key).await;
    assert!(
        settings.body["free_plan_variant_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("var_"))
    );
    let cleared = harness
        .send(
            Method::PATCH,
            "/v1/settings",
            Some(key),
            Some(json!({"free_plan_variant_id": null, "low_balance_threshold": 5})),
            &[],
        )
        .await;
    assert_eq!(
        (
            cleared.body["free_plan_variant_id"].is_null(),
            cleared.body["low_balance_threshold"].as_i64()
        ),
        (true, Some(5))
    );
    }
}

// API keys: create with scopes, list without secrets, revoke; scopes are enforced.
store_test! {
    async fn api_keys_and_scopes(backend) {
    let harness = Harness::start(backend).await;
    let key = &harness.tenant("acme").await.test;
    harness.catalog(key).await;
    let reader = harness
        .ok(
            "/v1/api-keys",
            key,
            json!({"name": "dashboard", "scopes": ["read"]}),
            201,
        )
        .await;
    let secret = reader["secret"].as_str().expect("secret shown once");
    assert!(secret.starts_with("qs_test_"));
    let listed = harness.get("/v1/api-keys", key).await;
    assert!(
        listed.body["data"]
            .as_array()
            .expect("keys")
            .iter()
            .all(|key| key.get("secret").is_none())
    );
    assert_eq!(
        harness
            .get("/v1/credits/balance?end_user_id=u1", secret)
            .await
            .status,
        StatusCode::OK
    );
    let denied = harness
        .post(
            "/v1/credits/grants",
            secret,
            json!({"end_user_id": "u1", "amount": 1}),
        )
        .await;
    assert_eq!(
        (denied.status, denied.code()),
        (StatusCode::FORBIDDEN, "missing_scope")
    );
    let no_scopes = harness
        .post("/v1/api-keys", key, json!({"scopes": []}))
        .await;
    assert_eq!(no_scopes.body["field"], "scopes");
    let id = reader["id"].as_str().expect("id");
    let revoked = harness
        .ok(&format!("/v1/api-keys/{id}/revoke"), key, json!({}), 200)
        .await;
    assert!(revoked["revoked_at"].is_string());
    assert_eq!(
        harness
            .get("/v1/credits/balance?end_user_id=u1", secret)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let anonymous = harness
        .send(Method::GET, "/v1/features", None, None, &[])
        .await;
    assert_eq!(
        (anonymous.status, anonymous.code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let x_api_key = harness
        .send(
            Method::GET,
            "/v1/features",
            None,
            None,
            &[("x-api-key", key)],
        )
        .await;
    assert_eq!(x_api_key.status, StatusCode::OK);
    }
}

// The operator endpoint needs the operator token.
store_test! {
    async fn operator_creates_tenants(backend) {
    let mut config = control_plane::config::Config::for_tests();
    config.operator_token = Some(control_plane::config::Secret::new(
        "operator-secret-0123456789",
    ));
    let harness = Harness::start_with(backend, config).await;
    let wrong = harness
        .post(
            "/v1/operator/tenants",
            "qs_live_nope",
            json!({"name": "acme"}),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let created = harness
        .ok(
            "/v1/operator/tenants",
            "operator-secret-0123456789",
            json!({"name": "acme"}),
            201,
        )
        .await;
    let live = created["api_keys"]["live"].as_str().expect("live key");
    assert_eq!(
        harness.get("/v1/features", live).await.status,
        StatusCode::OK
    );
    }
}

// Events: every state change is in the log, in order, resumable by cursor.
store_test! {
    async fn event_log(backend) {
    let harness = Harness::start(backend).await;
    let key = &harness.tenant("acme").await.test;
    harness.catalog(key).await;
    harness
        .ok(
            "/v1/subscriptions",
            key,
            json!({"end_user_id": "u1", "plan_variant_id": "pro/monthly"}),
            201,
        )
        .await;
    harness
        .ok(
            "/v1/reservations",
            key,
            json!({"end_user_id": "u1", "feature_key": "api_calls", "amount": 5}),
            201,
        )
        .await;
    let page = harness.get("/v1/events?limit=2", key).await;
    let types: Vec<&str> = page.body["data"]
        .as_array()
        .expect("events")
        .iter()
        .map(|event| event["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types, vec!["subscription.created", "credits.granted"]);
    let cursor = page.body["next_cursor"].as_str().expect("cursor");
    let rest = harness
        .get(&format!("/v1/events?cursor={cursor}"), key)
        .await;
    let rest_types: Vec<&str> = rest.body["data"]
        .as_array()
        .expect("events")
        .iter()
        .map(|event| event["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(rest_types.last(), Some(&"reservation.created"));
    let id = rest.body["data"][0]["id"].as_str().expect("id");
    assert_eq!(
        harness.get(&format!("/v1/events/{id}"), key).await.body["id"],
        id
    );
    }
}
