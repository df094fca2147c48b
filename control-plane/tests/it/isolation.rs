//! Tenants and environments share nothing: another tenant's or environment's objects
//! answer 404 and never appear in lists.

use axum::http::StatusCode;
use serde_json::json;

use crate::support::Harness;
use crate::support::store_test;

// A key of tenant B, or of tenant A's `live` environment, cannot see or touch objects
// made with tenant A's `test` key.
store_test! {
    async fn other_tenants_and_environments_get_404(backend) {
    let harness = Harness::start(backend).await;
    let a = harness.tenant("a").await;
    let b = harness.tenant("b").await;
    assert!(a.id.starts_with("ten_") && a.id != b.id);
    harness.catalog(&a.test).await;
    harness.catalog(&b.test).await;
    let block = harness.grant(&a.test, "shared_user", 100).await;
    let subscription = harness
        .ok(
            "/v1/subscriptions",
            &a.test,
            json!({"end_user_id": "shared_user", "plan_variant_id": "pro/monthly"}),
            201,
        )
        .await;
    let reservation = harness
        .ok(
            "/v1/reservations",
            &a.test,
            json!({"end_user_id": "shared_user", "feature_key": "api_calls", "amount": 5}),
            201,
        )
        .await;
    let event = harness.get("/v1/events", &a.test).await.body["data"][0]["id"]
        .as_str()
        .expect("event")
        .to_owned();
    let plan = harness.get("/v1/plans/pro", &a.test).await.body["id"]
        .as_str()
        .expect("plan")
        .to_owned();

    for outsider in [&b.test, &a.live] {
        let paths = [
            format!(
                "/v1/subscriptions/{}",
                subscription["id"].as_str().expect("id")
            ),
            format!(
                "/v1/reservations/{}",
                reservation["id"].as_str().expect("id")
            ),
            format!("/v1/events/{event}"),
            format!("/v1/plans/{plan}"),
        ];
        for path in &paths {
            let answer = harness.get(path, outsider).await;
            assert_eq!(
                answer.status,
                StatusCode::NOT_FOUND,
                "GET {path} with an outsider key: {}",
                answer.body
            );
        }
        let void = harness
            .post(
                &format!(
                    "/v1/credits/blocks/{}/void",
                    block["id"].as_str().expect("id")
                ),
                outsider,
                json!({}),
            )
            .await;
        assert_eq!(void.status, StatusCode::NOT_FOUND);
        let commit = harness
            .post(
                &format!(
                    "/v1/reservations/{}/commit",
                    reservation["id"].as_str().expect("id")
                ),
                outsider,
                json!({}),
            )
            .await;
        assert_eq!(commit.status, StatusCode::NOT_FOUND);
        let cancel = harness
            .post(
                &format!(
                    "/v1/subscriptions/{}/cancel",
                    subscription["id"].as_str().expect("id")
                ),
                outsider,
                json!({}),
            )
            .await;
        assert_eq!(cancel.status, StatusCode::NOT_FOUND);

        // Lists and balances show nothing of A's test environment.
        let balance = harness
            .get("/v1/credits/balance?end_user_id=shared_user", outsider)
            .await;
        assert_eq!(
            (
                balance.body["available"].as_i64(),
                balance.body["blocks"].as_array().map(Vec::len)
            ),
            (Some(0), Some(0))
        );
        for list in ["/v1/ledger", "/v1/events", "/v1/subscriptions"] {
            let answer = harness.get(list, outsider).await;
            let leaked = answer.body["data"]
                .as_array()
                .expect("data")
                .iter()
                .any(|item| item.to_string().contains("shared_user"));
            assert!(
                !leaked,
                "{list} leaks another tenant's or environment's objects"
            );
        }
    }
    // And A's own test key still sees everything: 100 granted, 1000 and a 45-credit window
    // from the plan, 5 held.
    assert_eq!(harness.available(&a.test, "shared_user").await, 1140);
    }
}
