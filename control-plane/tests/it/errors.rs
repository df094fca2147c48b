//! Every failure answers an RFC 9457 problem with a stable code: malformed JSON, wrong
//! content type, unknown fields, oversized bodies, bad ids, out-of-range numbers, unknown
//! routes and methods.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

use crate::support::Harness;
use crate::support::store_test;

async fn raw(
    harness: &Harness,
    key: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, String, serde_json::Value) {
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v1/credits/grants")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", content_type)
        .body(Body::from(body))
        .expect("request");
    let response = harness
        .app
        .clone()
        .oneshot(request)
        .await
        .expect("response");
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        content_type,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

store_test! {
    async fn failures_are_problems(backend) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
        (
            "application/json",
            b"{not json".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "text/plain",
            br#"{"end_user_id":"u1","amount":5}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request",
        ),
        (
            "application/json",
            br#"{"end_user_id":"u1","amount":5,"colour":"red"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "application/json",
            br#"{"end_user_id":"u1","amount":99999999999999999999}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "application/json",
            br#"{"end_user_id":"u1","amount":"five"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "application/json",
            vec![b' '; 2 * 1024 * 1024],
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (content_type, body, status, code) in cases {
        let preview = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
        let (got_status, got_type, problem) = raw(&harness, &key, content_type, body).await;
        assert_eq!(
            (got_status, problem["code"].as_str()),
            (status, Some(code)),
            "{preview}: {problem}"
        );
        assert_eq!(got_type, "application/problem+json", "{preview}");
        assert_eq!(problem["status"].as_u64(), Some(u64::from(status.as_u16())));
        assert!(
            problem["type"].as_str().is_some_and(|t| t.ends_with(code))
                && problem["title"].is_string()
                && problem["detail"].is_string()
        );
    }
    let unknown_field = raw(
        &harness,
        &key,
        "application/json",
        br#"{"end_user_id":"u1","amount":5,"colour":"red"}"#.to_vec(),
    )
    .await
    .2;
    assert!(
        unknown_field["detail"]
            .as_str()
            .is_some_and(|detail| detail.contains("colour")),
        "the detail names the field: {unknown_field}"
    );

    let bad_id = harness.get("/v1/reservations/not-an-id", &key).await;
    assert_eq!(
        (bad_id.status, bad_id.code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    // An id whose escapes are not UTF-8: a problem naming the path, on reads and on
    // actions alike (axum's own extractor would answer plain text).
    for (method, path) in [
        (Method::GET, "/v1/reservations/%FF"),
        (Method::POST, "/v1/plans/p/variants/%FF/archive"),
        (Method::POST, "/v1/reservations/%FF/release"),
    ] {
        let answer = harness
            .send(method.clone(), path, Some(&key), Some(json!({})), &[])
            .await;
        assert_eq!(
            (answer.status, answer.code(), answer.content_type()),
            (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "application/problem+json"
            ),
            "{method} {path}: {}",
            answer.body
        );
    }
    let route = harness.get("/v1/nothing-here", &key).await;
    assert_eq!(
        (route.status, route.code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let method = harness
        .send(Method::DELETE, "/v1/usage", Some(&key), None, &[])
        .await;
    assert_eq!(
        (method.status, method.content_type()),
        (StatusCode::METHOD_NOT_ALLOWED, "application/problem+json")
    );
    let bad_query = harness
        .get("/v1/entitlements/check?end_user_id=u1", &key)
        .await;
    assert_eq!(
        (bad_query.status, bad_query.code()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let wrong_key = harness.get("/v1/features", "qs_test_not-a-real-key").await;
    assert_eq!(
        (wrong_key.status, wrong_key.code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    }
}

// Over the rate limit: 429 with Retry-After.
store_test! {
    async fn rate_limit_answers_429(backend) {
    let mut config = control_plane::config::Config::for_tests();
    config.rate_limit_per_second = 1;
    config.rate_limit_burst = 3;
    let harness = Harness::start_with(backend, config).await;
    let key = harness.tenant("acme").await.test;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(harness.get("/v1/features", &key).await);
    }
    let limited = statuses
        .iter()
        .find(|answer| answer.status == StatusCode::TOO_MANY_REQUESTS)
        .expect("a 429");
    assert_eq!(limited.code(), "rate_limited");
    assert!(limited.headers.get("retry-after").is_some());
    }
}

// A transaction that cannot take its lock in time (PostgreSQL's `lock_timeout`, here
// 200 ms, while another session holds the end users' table) is a transient failure: 503
// `unavailable` with `Retry-After`, nothing written; the same request retried with its
// Idempotency-Key once the lock is free applies once. (PostgreSQL only: SQLite's writer
// waits `busy_timeout`, five seconds, before it reports the same failure.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_database_failure_answers_503_and_its_retry_applies_once() {
    use crate::support::{Backend, Storage};
    use control_plane::config::DatabaseUrl;
    use sqlx::Connection;

    let Some(backend) = Backend::postgres() else {
        return;
    };
    let mut storage = Storage::new(&backend).await;
    let DatabaseUrl::Postgres(url) = &mut storage.database else {
        panic!("a PostgreSQL storage");
    };
    let locker_url = url.clone();
    url.push_str("%20-c%20lock_timeout%3D200");
    let harness = Harness::on(&storage).await;
    let key = harness.tenant("acme").await.test;
    harness.grant(&key, "u1", 100).await;

    let mut locker = sqlx::PgConnection::connect(&locker_url)
        .await
        .expect("a second session");
    sqlx::query("BEGIN")
        .execute(&mut locker)
        .await
        .expect("begin");
    sqlx::query("LOCK TABLE end_users IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .expect("lock");
    let grant = json!({"end_user_id": "u1", "amount": 40, "source": "purchase"});
    let headers = [("idempotency-key", "grant-during-lock")];
    let refused = harness
        .send(
            Method::POST,
            "/v1/credits/grants",
            Some(&key),
            Some(grant.clone()),
            &headers,
        )
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        "{:?}",
        refused.body
    );
    assert_eq!(
        refused
            .headers
            .get("retry-after")
            .and_then(|value| value.to_str().ok()),
        Some("1")
    );
    sqlx::query("ROLLBACK")
        .execute(&mut locker)
        .await
        .expect("unlock");

    let applied = harness
        .send(
            Method::POST,
            "/v1/credits/grants",
            Some(&key),
            Some(grant.clone()),
            &headers,
        )
        .await;
    assert_eq!(applied.status, StatusCode::CREATED, "{:?}", applied.body);
    let replayed = harness
        .send(
            Method::POST,
            "/v1/credits/grants",
            Some(&key),
            Some(grant),
            &headers,
        )
        .await;
    assert_eq!(
        replayed.body["id"], applied.body["id"],
        "a replay, not a second grant"
    );
    let balance = harness
        .get("/v1/credits/balance?end_user_id=u1", &key)
        .await;
    assert_eq!(balance.body["available"], 140, "the grant applied once");
}
