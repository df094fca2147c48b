//! Data survives a restart on the same file, and due work resumes.

use serde_json::json;

use crate::support::store_test;
use crate::support::{Harness, Storage, T0};

store_test! {
    async fn everything_survives_a_restart_and_jobs_resume(backend) {
    let storage = Storage::new(backend).await;
    let (key, reservation) = {
        let harness = Harness::on(&storage).await;
        let key = harness.tenant("acme").await.test;
        harness.catalog(&key).await;
        harness.grant(&key, "u1", 100).await;
        harness
            .ok(
                "/v1/subscriptions",
                &key,
                json!({"end_user_id": "u1", "plan_variant_id": "pro/monthly"}),
                201,
            )
            .await;
        let reservation = harness.ok("/v1/reservations", &key, json!({"end_user_id": "u1", "feature_key": "api_calls", "amount": 30, "ttl_seconds": 60}), 201).await;
        // 100 granted, 1000 and a 45-credit window from the plan, 30 held.
        assert_eq!(harness.available(&key, "u1").await, 1145 - 30);
        (key, reservation["id"].as_str().expect("id").to_owned())
    };

    // A new process on the same file: everything is there.
    let harness = Harness::on(&storage).await;
    assert_eq!(harness.available(&key, "u1").await, 1115);
    assert_eq!(
        harness
            .get(&format!("/v1/reservations/{reservation}"), &key)
            .await
            .body["status"],
        "active"
    );
    assert_eq!(
        harness.get("/v1/features", &key).await.body["data"]
            .as_array()
            .map(Vec::len),
        Some(4)
    );

    // Its scheduler finds the reservation due once the clock passes its TTL.
    harness.clock.set(
        T0.checked_add(ledger::Span::from_secs(61).expect("span"))
            .expect("instant"),
    );
    control_plane::jobs::tick(&harness.state)
        .await
        .expect("scheduler pass");
    assert_eq!(
        harness
            .get(&format!("/v1/reservations/{reservation}"), &key)
            .await
            .body["status"],
        "expired"
    );
    assert_eq!(harness.available(&key, "u1").await, 1145);
    }
}
