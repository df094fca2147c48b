//! The review's findings (issue #16), each as the attack or mishap it was found as:
//! every bound holds, and a refusal names what was wrong.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use serde_json::json;
use tower::ServiceExt;

use crate::support::{Harness, store_test};

/// A request as it arrives from `client` (the server's connect info).
async fn from_client(harness: &Harness, client: &str, key: &str) -> StatusCode {
    let address: SocketAddr = client.parse().expect("address");
    let request = Request::builder()
        .uri("/v1/entitlements?end_user_id=u1")
        .header("authorization", format!("Bearer {key}"))
        .extension(ConnectInfo(address))
        .body(Body::empty())
        .expect("request");
    harness
        .app
        .clone()
        .oneshot(request)
        .await
        .expect("response")
        .status()
}

// 100,000 made-up keys, each looked up once, leave the key cache at its bound: found keys
// and misses are apart, so the real key stays remembered. (Before, every lookup, miss or
// not, stayed in an unbounded map.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_keys_leave_the_key_cache_at_its_bound() {
    let harness = Harness::start(&crate::support::Backend::Sqlite).await;
    let key = harness.tenant("acme").await.test;
    harness
        .state
        .authenticate(&key, None)
        .await
        .expect("the real key");
    let bound = harness.state.config().key_cache.missing_len;
    for index in 0..100_000u32 {
        let made_up = format!("qs_live_{index:08}{}", "x".repeat(35));
        let refused = harness.state.authenticate(&made_up, None).await;
        assert!(refused.is_err());
    }
    assert_eq!(harness.state.key_cache_len(), (1, bound));
    harness
        .state
        .authenticate(&key, None)
        .await
        .expect("the real key still works");
}

// A client address sending made-up keys is answered 429 once past its budget of failed
// authentications, without a store read; other addresses and good keys from elsewhere
// are not affected.
store_test! {
    async fn failed_authentications_are_limited_per_client_address(backend) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    let burst = harness.state.config().key_cache.failures_burst;
    let mut statuses = Vec::new();
    for index in 0..burst + 5 {
        let made_up = format!("qs_test_{index:08}{}", "y".repeat(35));
        statuses.push(from_client(&harness, "203.0.113.9:40000", &made_up).await);
    }
    assert!(statuses[..usize::try_from(burst).expect("small")].iter().all(|status| *status == StatusCode::UNAUTHORIZED));
    assert_eq!(statuses.last(), Some(&StatusCode::TOO_MANY_REQUESTS));
    assert_eq!(from_client(&harness, "198.51.100.2:40000", &key).await, StatusCode::OK);
    let made_up = format!("qs_test_{}", "z".repeat(43));
    assert_eq!(from_client(&harness, "198.51.100.2:40001", &made_up).await, StatusCode::UNAUTHORIZED);
    }
}

// An event stamped outside the accepted window (a proxy whose clock runs six minutes
// fast; one cut off for longer than 35 days) is recorded at the window's nearest edge and
// the answer names what was sent. Before, it was refused for good, and the proxy dropped
// the admitted usage.
store_test! {
    async fn usage_timestamps_are_clamped_into_the_window(backend) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    harness.catalog(&key).await;
    // The harness's clock stands at 2026-01-01T00:00:00Z.
    let ahead = harness
        .ok("/v1/usage", &key, json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 1, "timestamp": "2026-01-01T00:06:00Z"}), 201)
        .await;
    assert_eq!(ahead["timestamp"], "2026-01-01T00:05:00Z");
    assert_eq!(ahead["timestamp_clamped_from"], "2026-01-01T00:06:00Z");
    let on_time = harness
        .ok("/v1/usage", &key, json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 1, "timestamp": "2025-12-31T23:00:00Z"}), 201)
        .await;
    assert_eq!(on_time["timestamp"], "2025-12-31T23:00:00Z");
    assert!(on_time.get("timestamp_clamped_from").is_none());
    let batch = json!({"events": [
        {"end_user_id": "u1", "feature_key": "api_calls", "units": 1, "timestamp": "2025-01-01T00:00:00Z", "idempotency_key": "old"},
        {"end_user_id": "u1", "feature_key": "api_calls", "units": 1, "timestamp": "2027-01-01T00:00:00Z", "idempotency_key": "new"},
    ]});
    let answer = harness.ok("/v1/usage/batch", &key, batch.clone(), 200).await;
    assert_eq!(answer["results"][0]["status"], "created", "{answer}");
    assert_eq!(answer["results"][0]["timestamp_clamped_from"], "2025-01-01T00:00:00Z");
    assert_eq!(answer["results"][1]["timestamp_clamped_from"], "2027-01-01T00:00:00Z");
    let again = harness.ok("/v1/usage/batch", &key, batch, 200).await;
    assert_eq!(again["results"][1]["status"], "duplicate");
    assert_eq!(again["results"][1]["timestamp_clamped_from"], "2027-01-01T00:00:00Z");
    }
}

// A key created with an Idempotency-Key: the first answer shows the secret; a replay
// says the key exists and that its secret was shown once, and the stored answer does
// not hold it. Before, the whole answer, secret included, was kept 24 h and replayed.
store_test! {
    async fn key_secrets_are_never_stored_for_replays(backend) {
    let harness = Harness::start(backend).await;
    let admin = harness.tenant("acme").await.test;
    let body = json!({"name": "ci", "scopes": ["read"]});
    let headers = [("idempotency-key", "create-ci-key")];
    let first = harness.send(axum::http::Method::POST, "/v1/api-keys", Some(&admin), Some(body.clone()), &headers).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let secret = first.body["secret"].as_str().expect("secret shown once").to_owned();
    let replay = harness.send(axum::http::Method::POST, "/v1/api-keys", Some(&admin), Some(body), &headers).await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.headers.get("idempotent-replayed").and_then(|value| value.to_str().ok()), Some("true"));
    assert_eq!(replay.body["id"], first.body["id"]);
    assert!(replay.body.get("secret").is_none(), "{}", replay.body);
    assert_eq!(replay.body["secret_shown_once"], true);
    assert!(!replay.body.to_string().contains(&secret));
    // The key itself works.
    assert_eq!(harness.get("/v1/entitlements?end_user_id=u1", &secret).await.status, StatusCode::OK);
    }
}

// A key can only create keys with scopes it has itself: an `admin` key cannot mint `*`
// (before it could, escalating to every scope).
store_test! {
    async fn new_keys_get_at_most_their_creators_scopes(backend) {
    let harness = Harness::start(backend).await;
    let root = harness.tenant("acme").await.test;
    let admin = harness.ok("/v1/api-keys", &root, json!({"scopes": ["admin"]}), 201).await["secret"].as_str().expect("secret").to_owned();
    for scopes in [json!(["*"]), json!(["admin", "write"]), json!(["sync"])] {
        let refused = harness.post("/v1/api-keys", &admin, json!({"scopes": scopes})).await;
        assert_eq!((refused.status, refused.code()), (StatusCode::FORBIDDEN, "missing_scope"), "{scopes}");
    }
    harness.ok("/v1/api-keys", &admin, json!({"scopes": ["admin"]}), 201).await;
    harness.ok("/v1/api-keys", &root, json!({"scopes": ["*"]}), 201).await;
    }
}

// Bounds on what one request may make, each refused with the field or limit named: a
// grant's currency, a template's window, a subscription's past start, a clock advance.
store_test! {
    async fn catalog_and_grant_bounds_name_what_is_wrong(backend) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    harness.catalog(&key).await;
    let cases = [
        ("/v1/credits/grants", json!({"end_user_id": "u1", "amount": 1, "currency": "x".repeat(100_000)}), "currency"),
        ("/v1/credits/grants", json!({"end_user_id": "u1", "amount": 1, "currency": "us1"}), "currency"),
        ("/v1/plans/pro/variants", json!({"key": "fast", "interval": {"every": 1, "unit": "day"}, "billing_mode": "prepaid", "grants": [{"amount": 1, "every": "1s"}]}), "grants[0].every"),
        ("/v1/subscriptions", json!({"end_user_id": "u1", "plan_variant_id": "pro/monthly", "start_at": "1970-01-01T00:00:00Z"}), "start_at"),
        ("/v1/test-clock/advance", json!({"seconds": 400 * 86_400}), "seconds"),
    ];
    for (path, body, field) in cases {
        let refused = harness.post(path, &key, body).await;
        assert_eq!(
            (refused.status, refused.body["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{path}: {}",
            refused.body
        );
    }
    harness.ok("/v1/credits/grants", &key, json!({"end_user_id": "u1", "amount": 1, "currency": "usd"}), 201).await;
    }
}

// One end user holds at most 1,000 live blocks from grants: the next grant is refused
// with 422 naming the limit, and spending a block makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_blocks_per_end_user_are_bounded() {
    let harness = Harness::start(&crate::support::Backend::Sqlite).await;
    let key = harness.tenant("acme").await.test;
    harness.catalog(&key).await;
    for _ in 0..ledger::BLOCKS_PER_END_USER_MAX {
        harness.grant(&key, "u1", 1).await;
    }
    let refused = harness
        .post(
            "/v1/credits/grants",
            &key,
            json!({"end_user_id": "u1", "amount": 1}),
        )
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "limit_reached"),
        "{}",
        refused.body
    );
    assert!(
        refused.body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("1000")
    );
    harness
        .ok(
            "/v1/usage",
            &key,
            json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 1}),
            201,
        )
        .await;
    harness.grant(&key, "u1", 1).await;
}

// What one environment may create is bounded, each bound answered 422 `limit_reached`
// naming it: 16 webhook endpoints (every event makes a delivery per endpoint), 100 live
// API keys; revoking or deleting makes room.
store_test! {
    async fn environments_hold_bounded_endpoints_and_keys(backend) {
    let harness = Harness::start(backend).await;
    let root = harness.tenant("acme").await.test;
    let mut endpoint = String::new();
    for index in 0..control_plane::limits::ENDPOINTS_PER_ENVIRONMENT_MAX {
        let created = harness.ok("/v1/webhook-endpoints", &root, json!({"url": format!("http://127.0.0.1:9/hook{index}")}), 201).await;
        endpoint = created["id"].as_str().expect("id").to_owned();
    }
    let refused = harness.post("/v1/webhook-endpoints", &root, json!({"url": "http://127.0.0.1:9/one-more"})).await;
    assert_eq!((refused.status, refused.code()), (StatusCode::UNPROCESSABLE_ENTITY, "limit_reached"), "{}", refused.body);
    assert!(refused.body["detail"].as_str().unwrap_or("").contains("16"));
    let deleted = harness.send(axum::http::Method::DELETE, &format!("/v1/webhook-endpoints/{endpoint}"), Some(&root), None, &[]).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    harness.ok("/v1/webhook-endpoints", &root, json!({"url": "http://127.0.0.1:9/one-more"}), 201).await;

    // The tenant's first key counts: 99 more fit.
    let mut last = String::new();
    for _ in 1..control_plane::limits::KEYS_PER_ENVIRONMENT_MAX {
        last = harness.ok("/v1/api-keys", &root, json!({"scopes": ["read"]}), 201).await["id"].as_str().expect("id").to_owned();
    }
    let refused = harness.post("/v1/api-keys", &root, json!({"scopes": ["read"]})).await;
    assert_eq!((refused.status, refused.code()), (StatusCode::UNPROCESSABLE_ENTITY, "limit_reached"), "{}", refused.body);
    harness.ok(&format!("/v1/api-keys/{last}/revoke"), &root, json!({}), 200).await;
    harness.ok("/v1/api-keys", &root, json!({"scopes": ["read"]}), 201).await;
    }
}
