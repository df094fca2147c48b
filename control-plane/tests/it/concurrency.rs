//! Races on one end user: concurrent strict usage never over-spends, and one idempotency
//! key sent many times at once has exactly one effect.

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::support::Harness;
use crate::support::store_test;

// 200 concurrent strict usages of 1 credit against 100 credits: exactly 100 succeed,
// the balance ends at 0, and the ledger holds exactly 100 debits.
store_test! {
    async fn strict_usage_never_overspends(backend) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    harness.catalog(&key).await;
    harness.grant(&key, "hot", 100).await;

    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (harness, key) = (harness.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            harness.post("/v1/usage", &key, json!({"end_user_id": "hot", "feature_key": "api_calls", "units": 1, "strict": true})).await.status
        }));
    }
    let mut created = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.expect("task") {
            StatusCode::CREATED => created += 1,
            StatusCode::PAYMENT_REQUIRED => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((created, refused), (100, 100));
    let balance = harness
        .get("/v1/credits/balance?end_user_id=hot", &key)
        .await;
    assert_eq!(
        (
            balance.body["available"].as_i64(),
            balance.body["debt"].as_i64()
        ),
        (Some(0), Some(0))
    );
    let debits = harness
        .get("/v1/ledger?end_user_id=hot&type=debit&limit=500", &key)
        .await;
    assert_eq!(debits.body["data"].as_array().map(Vec::len), Some(100));
    }
}

// 50 requests with one idempotency key at once: one effect, and every answer is the same
// status and body (replays say so in a header).
store_test! {
    async fn one_idempotency_key_in_flight_many_times(backend) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    harness.catalog(&key).await;
    harness.grant(&key, "u1", 1000).await;

    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (harness, key) = (harness.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            harness
                .send(
                    Method::POST,
                    "/v1/usage",
                    Some(&key),
                    Some(json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 7})),
                    &[("idempotency-key", "same-key")],
                )
                .await
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    let first = &answers[0];
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(
        answers
            .iter()
            .all(|answer| answer.status == first.status && answer.body == first.body),
        "every answer is identical"
    );
    let replays = answers
        .iter()
        .filter(|answer| answer.headers.contains_key("idempotent-replayed"))
        .count();
    assert_eq!(replays, 49, "all but the first are replays");
    assert_eq!(harness.available(&key, "u1").await, 993, "charged once");

    let reused = harness
        .send(
            Method::POST,
            "/v1/usage",
            Some(&key),
            Some(json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 8})),
            &[("idempotency-key", "same-key")],
        )
        .await;
    assert_eq!(
        (reused.status, reused.code()),
        (StatusCode::CONFLICT, "idempotency_key_reused")
    );
    }
}

// Refusals are stored decisions too: a replay of a 402 answers the same 402, even after
// credits arrive; a 400 is not stored and may be retried with the key.
store_test! {
    async fn stored_refusals_and_retriable_errors(backend) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    harness.catalog(&key).await;
    let strict =
        json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 5, "strict": true});
    let first = harness
        .send(
            Method::POST,
            "/v1/usage",
            Some(&key),
            Some(strict.clone()),
            &[("idempotency-key", "k402")],
        )
        .await;
    assert_eq!(first.status, StatusCode::PAYMENT_REQUIRED);
    harness.grant(&key, "u1", 100).await;
    let replay = harness
        .send(
            Method::POST,
            "/v1/usage",
            Some(&key),
            Some(strict),
            &[("idempotency-key", "k402")],
        )
        .await;
    assert_eq!(
        (replay.status, replay.body.clone()),
        (StatusCode::PAYMENT_REQUIRED, first.body)
    );
    assert_eq!(replay.content_type(), "application/problem+json");

    let bad = json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 0});
    let invalid = harness
        .send(
            Method::POST,
            "/v1/usage",
            Some(&key),
            Some(bad),
            &[("idempotency-key", "k400")],
        )
        .await;
    assert_eq!(invalid.status, StatusCode::UNPROCESSABLE_ENTITY);
    let fixed = json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 1});
    let retried = harness
        .send(
            Method::POST,
            "/v1/usage",
            Some(&key),
            Some(fixed),
            &[("idempotency-key", "k400")],
        )
        .await;
    assert_eq!(retried.status, StatusCode::CREATED);
    let valid = json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 1});
    let bad_key = harness
        .send(
            Method::POST,
            "/v1/usage",
            Some(&key),
            Some(valid),
            &[("idempotency-key", "")],
        )
        .await;
    assert_eq!(bad_key.body["field"], "Idempotency-Key");
    }
}

// 64 concurrent debits of one end user, each with its own idempotency key and metadata,
// while half of them run out of credits. Concurrent operations share transactions (group
// commit); each must still get its own answer, keep its own key and metadata on its entry,
// and replay its own answer, and the refused ones must leave nothing behind.
store_test! {
    async fn concurrent_operations_keep_their_own_answers(backend) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    harness.catalog(&key).await;
    harness.grant(&key, "hot", 320).await;

    let mut tasks = Vec::new();
    for index in 0..64 {
        let (harness, key) = (harness.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"end_user_id": "hot", "feature_key": "api_calls", "units": 10,
                              "strict": true, "metadata": {"n": index}});
            let idempotency_key = format!("debit-{index}");
            let answer = harness
                .send(Method::POST, "/v1/usage", Some(&key), Some(body.clone()),
                      &[("idempotency-key", idempotency_key.as_str())])
                .await;
            (index, body, answer)
        }));
    }
    let mut created = std::collections::BTreeMap::new();
    let mut refused = Vec::new();
    for task in tasks {
        let (index, body, answer) = task.await.expect("task");
        match answer.status {
            StatusCode::CREATED => {
                assert_eq!(answer.body["cost"], 10, "{}", answer.body);
                created.insert(answer.body["id"].as_str().expect("entry id").to_owned(), (index, body, answer));
            }
            StatusCode::PAYMENT_REQUIRED => refused.push((index, body, answer)),
            other => panic!("unexpected status {other}: {}", answer.body),
        }
    }
    assert_eq!((created.len(), refused.len()), (32, 32));
    assert_eq!(harness.available(&key, "hot").await, 0);

    let debits = harness
        .get("/v1/ledger?end_user_id=hot&type=debit&limit=500", &key)
        .await;
    let entries = debits.body["data"].as_array().expect("entries");
    assert_eq!(entries.len(), 32);
    for entry in entries {
        let id = entry["id"].as_str().expect("id");
        let (index, _, _) = &created[id];
        assert_eq!(entry["idempotency_key"], format!("debit-{index}"), "{entry}");
        assert_eq!(entry["metadata"]["n"], *index, "{entry}");
    }
    // Every answer, accepted or refused, replays as first given.
    for (index, body, first) in created.values().chain(&refused) {
        let idempotency_key = format!("debit-{index}");
        let replay = harness
            .send(Method::POST, "/v1/usage", Some(&key), Some(body.clone()),
                  &[("idempotency-key", idempotency_key.as_str())])
            .await;
        assert_eq!((replay.status, &replay.body), (first.status, &first.body));
    }
    }
}

// An operation whose idempotency key another request answered while it waited (its lease
// expired and a retry took the key over) must not apply a second time: its transaction
// rolls back with a retryable error, and a retry replays the stored answer.
store_test! {
    async fn an_answer_is_never_stored_twice(backend) {
    use control_plane::store::{Env, Environment, IdempotencyAnswer, IdempotencyBegin, LeaseAsk};
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    let key = tenant.test.clone();
    harness.catalog(&key).await;
    harness.grant(&key, "u1", 100).await;
    let env = Env { tenant_id: tenant.id.clone(), environment: Environment::Test };
    let store = harness.state.store();
    let now = harness.state.real_now();
    let begun = store.idempotency_begin(LeaseAsk::new(&env, "k1", &[7; 32], now, 30_000, now)).await.expect("begin");
    assert!(matches!(begun, IdempotencyBegin::Started));
    // The retry that took the key over answered first.
    store
        .idempotency_finish(&env, &IdempotencyAnswer { key: "k1".into(), status: 201, body: b"{}".to_vec() })
        .await
        .expect("finish");

    let end_user = ledger::EndUserId::new("u1").expect("id");
    let late = harness
        .state
        .mutate(control_plane::service::Change::new(&env, &end_user, Some(&control_plane::service::KeyHold::Leased("k1".into()))).created(), |user, cx, _| {
            let applied = user.adjust(cx, ledger::AdjustRequest { amount: ledger::Credits::new(-10), feature_keys: None })?;
            Ok(((), control_plane::store::Changes::from_applied(applied).1))
        })
        .await;
    let error = late.expect_err("the late operation is refused");
    assert!(error.to_string().contains("answered by another request"), "{error}");
    assert_eq!(harness.available(&key, "u1").await, 100, "nothing was applied");
    }
}

// POST /v1/usage claims its key inside its own transaction. A key that another request
// holds on the classic path (a lease) is not taken over: the claiming request waits and
// answers what the holder stored. A refusal that comes before the transaction (an
// unknown feature) is still stored as the key's answer and replayed.
store_test! {
    async fn a_claim_defers_to_a_lease_and_refusals_stay_stored(backend) {
    use control_plane::store::{Env, Environment, IdempotencyAnswer, LeaseAsk};
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    let key = tenant.test.clone();
    harness.catalog(&key).await;
    harness.grant(&key, "u1", 100).await;
    let env = Env { tenant_id: tenant.id.clone(), environment: Environment::Test };
    let body = json!({"end_user_id": "u1", "feature_key": "api_calls", "units": 3});
    // The fingerprint the classic path computes for this request (`send` sends the
    // body's compact JSON).
    let bytes = body.to_string();
    let fingerprint: [u8; 32] = {
        use sha2::{Digest, Sha256};
        Sha256::new()
            .chain_update("POST")
            .chain_update([0])
            .chain_update("/v1/usage")
            .chain_update([0])
            .chain_update(&bytes)
            .finalize()
            .into()
    };
    let now = harness.state.real_now();
    let store = harness.state.store();
    let begun = store.idempotency_begin(LeaseAsk::new(&env, "held", &fingerprint, now, 30_000, now)).await.expect("lease");
    assert!(matches!(begun, control_plane::store::IdempotencyBegin::Started));

    let waiting = {
        let (harness, key, body) = (harness.clone(), key.clone(), body.clone());
        tokio::spawn(async move {
            harness
                .send(Method::POST, "/v1/usage", Some(&key), Some(body), &[("idempotency-key", "held")])
                .await
        })
    };
    store
        .idempotency_finish(&env, &IdempotencyAnswer { key: "held".into(), status: 201, body: br#"{"held":true}"#.to_vec() })
        .await
        .expect("the holder answers");
    let answer = waiting.await.expect("task");
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(answer.body, json!({"held": true}), "the holder's answer");
    assert!(answer.headers.contains_key("idempotent-replayed"));
    assert_eq!(harness.available(&key, "u1").await, 100, "the claim did not run");

    let unknown = json!({"end_user_id": "u1", "feature_key": "no_such_feature", "units": 1});
    let first = harness
        .send(Method::POST, "/v1/usage", Some(&key), Some(unknown.clone()), &[("idempotency-key", "k404")])
        .await;
    assert_eq!(first.status, StatusCode::NOT_FOUND);
    assert!(!first.headers.contains_key("idempotent-replayed"));
    let replay = harness
        .send(Method::POST, "/v1/usage", Some(&key), Some(unknown), &[("idempotency-key", "k404")])
        .await;
    assert_eq!((replay.status, &replay.body), (StatusCode::NOT_FOUND, &first.body));
    assert!(replay.headers.contains_key("idempotent-replayed"));

    // A refusal stored with its claim writes the key's answer and nothing else: an end
    // user first seen in a refused request is not created.
    let strict = json!({"end_user_id": "newcomer", "feature_key": "api_calls", "units": 5, "strict": true});
    let refused = harness
        .send(Method::POST, "/v1/usage", Some(&key), Some(strict.clone()), &[("idempotency-key", "k402")])
        .await;
    assert_eq!(refused.status, StatusCode::PAYMENT_REQUIRED);
    let replayed = harness
        .send(Method::POST, "/v1/usage", Some(&key), Some(strict), &[("idempotency-key", "k402")])
        .await;
    assert_eq!((replayed.status, &replayed.body), (StatusCode::PAYMENT_REQUIRED, &refused.body));
    assert!(replayed.headers.contains_key("idempotent-replayed"));
    let newcomer = ledger::EndUserId::new("newcomer").expect("id");
    assert!(store.load_state(&env, &newcomer).await.expect("load").is_none());
    }
}
