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
    let _ = json!({});
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
