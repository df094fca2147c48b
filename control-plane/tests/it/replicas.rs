//! Two control planes on one database behave as one: an idempotency key sent to both at
//! once has one effect, and due work run by both schedulers at once happens once.

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::support::store_test;
use crate::support::{Harness, Storage, T0, eventually};

// A catalog change made through one replica reaches another that had the catalog cached
// (within `server.catalog_cache_ms`), and so does a test-clock advance.
store_test! {
    async fn catalog_changes_reach_the_other_replica(backend) {
        let storage = Storage::new(backend).await;
        let mut config = control_plane::config::Config::for_tests();
        config.catalog_cache = std::time::Duration::from_millis(50);
        let first = Harness::on_with(&storage, config.clone()).await;
        let second = Harness::on_with(&storage, config).await;
        let key = first.tenant("acme").await.test;
        first.catalog(&key).await;
        // The second replica reads (and caches) the catalog before the new feature exists.
        let unknown = second.get("/v1/entitlements/check?end_user_id=u1&feature_key=images", &key).await;
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        first.ok("/v1/features", &key, json!({"key": "images", "name": "Images", "type": "metered"}), 201).await;
        eventually("the second replica sees the new feature", || async {
            second.get("/v1/entitlements/check?end_user_id=u1&feature_key=images", &key).await.status == StatusCode::OK
        })
        .await;

        let before = second.get("/v1/test-clock", &key).await.body["offset_seconds"].clone();
        first.ok("/v1/test-clock/advance", &key, json!({"seconds": 3600}), 200).await;
        eventually("the second replica's clock moved", || async {
            second.get("/v1/test-clock", &key).await.body["offset_seconds"] != before
        })
        .await;
    }
}

store_test! {
    async fn two_replicas_share_idempotency_and_jobs(backend) {
        let storage = Storage::new(backend).await;
        let first = Harness::on(&storage).await;
        let second = Harness::on(&storage).await;
        let key = first.tenant("acme").await.test;
        first.catalog(&key).await;
        second.grant(&key, "u1", 1000).await;

        // One idempotency key, 20 requests spread over both replicas at once.
        let mut tasks = Vec::new();
        for index in 0..20 {
            let replica = if index % 2 == 0 { first.clone() } else { second.clone() };
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                replica
                    .send(Method::POST, "/v1/usage", Some(&key), Some(json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 9})), &[("idempotency-key", "shared-key")])
                    .await
            }));
        }
        let mut bodies = Vec::new();
        for task in tasks {
            let answer = task.await.expect("task");
            assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
            bodies.push(answer.body);
        }
        assert!(bodies.iter().all(|body| *body == bodies[0]), "every replica answers the same");
        assert_eq!(first.available(&key, "u1").await, 991, "charged once");

        // Reservations expire once, whichever scheduler gets there.
        for _ in 0..10 {
            first.ok("/v1/reservations", &key, json!({"end_user_id": "u1", "feature_key": "api_calls", "amount": 5, "ttl_seconds": 60}), 201).await;
        }
        let later = T0.checked_add(ledger::Span::from_secs(3600).expect("span")).expect("instant");
        first.clock.set(later);
        second.clock.set(later);
        let (a, b) = tokio::join!(control_plane::jobs::tick(&first.state), control_plane::jobs::tick(&second.state));
        a.expect("first scheduler");
        b.expect("second scheduler");
        let expiries = second.get("/v1/ledger?end_user_id=u1&type=expire&limit=500", &key).await;
        assert_eq!(expiries.body["data"].as_array().map(Vec::len), Some(10), "one expire entry per reservation");
        let expired_events = second.get("/v1/events?limit=500", &key).await.body["data"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|event| event["type"] == "reservation.expired")
            .count();
        assert_eq!(expired_events, 10);
        assert_eq!(first.available(&key, "u1").await, 991);
    }
}

// On PostgreSQL a commit through one replica wakes the other's change streams at once
// (LISTEN/NOTIFY), not at their next poll: the other replica's store hears of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_through_one_replica_is_heard_by_the_other() {
    let Some(backend) = crate::support::Backend::postgres() else {
        return;
    };
    let storage = Storage::new(&backend).await;
    let first = Harness::on(&storage).await;
    let second = Harness::on(&storage).await;
    let key = first.tenant("acme").await.test;
    let mut heard = second
        .state
        .store()
        .commits_elsewhere()
        .expect("a PostgreSQL store hears other processes' commits");
    heard.borrow_and_update();
    first.grant(&key, "u1", 10).await;
    tokio::time::timeout(std::time::Duration::from_secs(10), heard.changed())
        .await
        .expect("heard within the deadline")
        .expect("the listener is alive");
}
