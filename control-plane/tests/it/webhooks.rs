//! Webhook delivery to a real HTTP receiver on port 0: signatures checked by an
//! independent implementation of the Standard Webhooks scheme, retries with growing
//! delays driven by the test clock, ordering per end user, redelivery, and the guard
//! against private addresses.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::support::Harness;
use crate::support::store_test;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

#[derive(Debug, Default)]
pub(crate) struct Receiver {
    received: Vec<Received>,
    /// End users whose events are answered 500 while listed.
    failing_users: Vec<String>,
    /// How many more requests to answer 500, whoever they are about.
    fail_next: usize,
    /// Answer 500 to the first this-many attempts of every message (by `webhook-id`).
    fail_first_attempts: usize,
    /// Attempts seen per message.
    attempts: std::collections::HashMap<String, usize>,
}

pub(crate) type Shared = Arc<Mutex<Receiver>>;

async fn receive(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let received = Received {
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        body: body.to_vec(),
    };
    let end_user = received.json()["data"]["end_user_id"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let mut receiver = shared.lock().expect("lock");
    let id = received.id.clone();
    receiver.received.push(received);
    let seen = receiver.attempts.entry(id).or_insert(0);
    *seen += 1;
    if *seen <= receiver.fail_first_attempts {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    if receiver.fail_next > 0 {
        receiver.fail_next -= 1;
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    if receiver.failing_users.contains(&end_user) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

/// Starts the receiver on 127.0.0.1:0; returns its URL and shared state.
pub(crate) async fn start_receiver() -> (String, Shared) {
    let shared: Shared = Arc::default();
    let app = axum::Router::new()
        .route("/hook", post(receive))
        .with_state(Arc::clone(&shared));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("receiver") });
    (format!("http://{address}/hook"), shared)
}

/// Standard Webhooks verification, written here from the scheme, not from the server's
/// code: HMAC-SHA256 over `id.timestamp.body` with the base64-decoded secret.
fn verify(secret: &str, received: &Received) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("secret");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("key");
    mac.update(format!("{}.{}.", received.id, received.timestamp).as_bytes());
    mac.update(&received.body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    received
        .signature
        .split(' ')
        .any(|signature| signature == format!("v1,{expected}"))
}

async fn setup(backend: &crate::support::Backend) -> (Harness, String, String, Shared) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    harness.catalog(&key).await;
    let (url, shared) = start_receiver().await;
    let endpoint = harness
        .ok(
            "/v1/webhook-endpoints",
            &key,
            json!({"url": url, "event_types": ["credits.granted", "credits.voided"]}),
            201,
        )
        .await;
    let secret = endpoint["secret"]
        .as_str()
        .expect("secret shown once")
        .to_owned();
    assert!(secret.starts_with("whsec_"));
    (harness, key, secret, shared)
}

pub(crate) fn received(shared: &Shared) -> Vec<Received> {
    shared.lock().expect("lock").received.clone()
}

// Deliveries are signed so that an independent verifier accepts them, carry the event,
// and only the subscribed types arrive.
store_test! {
    async fn deliveries_are_signed_and_filtered(backend) {
    let (harness, key, secret, shared) = setup(backend).await;
    harness.grant(&key, "alice", 10).await;
    harness
        .ok(
            "/v1/reservations",
            &key,
            json!({"end_user_id": "alice", "feature_key": "api_calls", "amount": 1}),
            201,
        )
        .await;
    harness.advance(&key, 1).await;
    let got = received(&shared);
    assert_eq!(got.len(), 1, "only credits.granted is subscribed: {got:?}");
    assert!(verify(&secret, &got[0]), "signature verifies");
    assert!(
        !verify(
            "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            &got[0]
        ),
        "a wrong secret does not"
    );
    let body = got[0].json();
    assert_eq!(
        (
            body["type"].as_str(),
            body["data"]["amount"].as_i64(),
            body["data"]["end_user_id"].as_str()
        ),
        (Some("credits.granted"), Some(10), Some("alice"))
    );
    let event = harness
        .get(&format!("/v1/events/{}", got[0].id), &key)
        .await
        .body;
    assert_eq!(event["deliveries"][0]["status"], "succeeded");
    assert_eq!(event["deliveries"][0]["response_status"], 200);
    }
}

// A failing receiver is retried on the schedule (5 s, 30 s, 2 min, …), driven by the
// test clock; the delays grow.
store_test! {
    async fn retries_back_off(backend) {
    let (harness, key, secret, shared) = setup(backend).await;
    shared.lock().expect("lock").fail_next = 3;
    harness.grant(&key, "alice", 10).await;
    harness.advance(&key, 1).await;
    assert_eq!(received(&shared).len(), 1, "first attempt at once");
    harness.advance(&key, 3).await;
    assert_eq!(received(&shared).len(), 1, "not before 5 s");
    harness.advance(&key, 3).await;
    assert_eq!(received(&shared).len(), 2, "second attempt after 5-6 s");
    harness.advance(&key, 37).await;
    assert_eq!(received(&shared).len(), 3, "third after 30-36 s");
    harness.advance(&key, 145).await;
    let got = received(&shared);
    assert_eq!(got.len(), 4, "fourth after 120-144 s, which succeeds");
    assert!(
        got.iter()
            .all(|request| request.id == got[0].id && verify(&secret, request)),
        "the same event each time"
    );

    let event = harness
        .get(&format!("/v1/events/{}", got[0].id), &key)
        .await
        .body;
    let deliveries = event["deliveries"].as_array().expect("deliveries");
    let statuses: Vec<&str> = deliveries
        .iter()
        .map(|delivery| delivery["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(statuses, vec!["failed", "failed", "failed", "succeeded"]);
    let times: Vec<ledger::Timestamp> = deliveries
        .iter()
        .map(|delivery| {
            ledger::Timestamp::parse_rfc3339(delivery["at"].as_str().expect("at")).expect("time")
        })
        .collect();
    let gaps: Vec<i64> = times
        .windows(2)
        .map(|pair| pair[1].since(pair[0]).expect("gap").as_millis())
        .collect();
    assert!(
        gaps[0] >= 5_000 && gaps[1] >= 30_000 && gaps[2] >= 120_000,
        "growing delays: {gaps:?}"
    );
    assert!(
        gaps.windows(2).all(|pair| pair[1] > pair[0]),
        "each delay longer than the last: {gaps:?}"
    );
    }
}

// A failing event holds back later events of the same end user only; once it goes
// through, the held ones follow in order. Redelivery sends an event again.
store_test! {
    async fn ordered_per_end_user_and_redelivered(backend) {
    let (harness, key, _secret, shared) = setup(backend).await;
    shared.lock().expect("lock").failing_users = vec!["alice".into()];
    harness.grant(&key, "alice", 1).await;
    harness.grant(&key, "alice", 2).await;
    harness.grant(&key, "bob", 3).await;
    harness.advance(&key, 1).await;
    let amounts = |shared: &Shared| -> Vec<(String, i64)> {
        received(shared)
            .iter()
            .map(|request| {
                let body = request.json();
                (
                    body["data"]["end_user_id"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                    body["data"]["amount"].as_i64().unwrap_or(0),
                )
            })
            .collect()
    };
    // Alice's and bob's first events go out together (in either order); alice's second
    // waits behind her failing first.
    let mut first_round = amounts(&shared);
    first_round.sort();
    assert_eq!(
        first_round,
        vec![("alice".into(), 1), ("bob".into(), 3)],
        "alice's second grant waits behind her first; bob is not held"
    );

    shared.lock().expect("lock").failing_users.clear();
    harness.advance(&key, 7).await;
    let of = |user: &str| -> Vec<i64> { amounts(&shared).into_iter().filter(|(who, _)| who == user).map(|(_, amount)| amount).collect() };
    assert_eq!(of("alice"), vec![1, 1, 2], "alice's first retried, then the held one, in order");
    assert_eq!(of("bob"), vec![3], "bob's went once");

    let first_event = received(&shared)
        .iter()
        .find(|request| request.json()["data"]["end_user_id"] == "alice")
        .map(|request| request.id.clone())
        .expect("alice's first event");
    let redelivered = harness
        .ok(
            &format!("/v1/events/{first_event}/redeliver"),
            &key,
            json!({}),
            202,
        )
        .await;
    assert_eq!(redelivered["id"], first_event.as_str());
    assert_eq!(
        received(&shared).last().map(|request| request.id.clone()),
        Some(first_event)
    );
    }
}

// Endpoint management: list without secrets, update, test ping, delete; bad URLs and
// types are refused; private targets are refused unless allowed.
store_test! {
    async fn endpoint_management_and_ssrf_guard(backend) {
    let (harness, key, secret, shared) = setup(backend).await;
    let list = harness.get("/v1/webhook-endpoints", &key).await.body;
    let id = list["data"][0]["id"].as_str().expect("id").to_owned();
    assert!(list["data"][0].get("secret").is_none());
    let ping = harness
        .ok(
            &format!("/v1/webhook-endpoints/{id}/test"),
            &key,
            json!({}),
            200,
        )
        .await;
    assert_eq!(
        (
            ping["type"].as_str(),
            ping["deliveries"][0]["status"].as_str()
        ),
        (Some("webhook.test"), Some("succeeded"))
    );
    assert!(verify(&secret, &received(&shared)[0]));
    let updated = harness
        .send(
            axum::http::Method::PATCH,
            &format!("/v1/webhook-endpoints/{id}"),
            Some(&key),
            Some(json!({"event_types": null})),
            &[],
        )
        .await;
    assert!(updated.body["event_types"].is_null());
    for (body, field) in [
        (json!({"url": "ftp://x"}), "url"),
        (
            json!({"url": "http://example.com", "event_types": ["nope"]}),
            "event_types",
        ),
    ] {
        let answer = harness.post("/v1/webhook-endpoints", &key, body).await;
        assert_eq!(answer.body["field"], field);
    }
    let deleted = harness
        .send(
            axum::http::Method::DELETE,
            &format!("/v1/webhook-endpoints/{id}"),
            Some(&key),
            None,
            &[],
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(
        harness
            .get(&format!("/v1/webhook-endpoints/{id}"), &key)
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    let mut config = control_plane::config::Config::for_tests();
    config.webhooks_allow_private = false;
    let guarded = Harness::start_with(backend, config).await;
    let guarded_key = guarded.tenant("acme").await.test;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://10.0.0.1/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
    ] {
        let refused = guarded
            .post("/v1/webhook-endpoints", &guarded_key, json!({"url": url}))
            .await;
        assert_eq!(
            (refused.status, refused.body["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("url")),
            "{url}"
        );
    }
    }
}

/// The attempts stored for an event, as `(attempt, status)`.
async fn attempts_of(harness: &Harness, key: &str, event_id: &str) -> Vec<(i64, String)> {
    let event = harness
        .get(&format!("/v1/events/{event_id}"), key)
        .await
        .body;
    event["deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .map(|delivery| {
            (
                delivery["attempt"].as_i64().unwrap_or(0),
                delivery["status"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

// SPEC 10.3: one advance delivers everything that falls due before its target, retries
// included, on the test clock. A receiver that fails each message's first two attempts:
// after one advance of three hours every event went through, in order per end user, with
// three attempts each (before, each advance made one delivery pass: 10 of 30 arrived
// over six advances).
store_test! {
    async fn an_advance_settles_the_retries_due_within_it(backend) {
    let (harness, key, _secret, shared) = setup(backend).await;
    shared.lock().expect("lock").fail_first_attempts = 2;
    let users = ["u1", "u2", "u3", "u4", "u5"];
    for round in 1..=6 {
        for user in users {
            harness.grant(&key, user, round).await;
        }
    }
    let answer = harness.advance(&key, 3 * 3600).await;
    assert_eq!(answer["settled"], true, "{answer}");
    assert_eq!(answer["webhook_attempts"], 90, "{answer}");
    assert_eq!(answer["pending"]["webhook_deliveries"], 0, "{answer}");

    // Every event arrived three times, and the successful deliveries came in grant order
    // per end user.
    let got = received(&shared);
    assert_eq!(got.len(), 90);
    let mut ids: Vec<String> = got.iter().map(|request| request.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 30);
    for user in users {
        let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        let mut delivered = Vec::new();
        for request in &got {
            let body = request.json();
            if body["data"]["end_user_id"] != user {
                continue;
            }
            let count = counts.entry(request.id.clone()).or_insert(0);
            *count += 1;
            if *count == 3 {
                delivered.push(body["data"]["amount"].as_i64().unwrap_or(0));
            }
        }
        assert_eq!(delivered, vec![1, 2, 3, 4, 5, 6], "{user}: in order");
    }
    for id in &ids {
        let attempts = attempts_of(&harness, &key, id).await;
        assert_eq!(
            attempts,
            vec![(1, "failed".into()), (2, "failed".into()), (3, "succeeded".into())],
            "{id}"
        );
    }
    }
}

// A receiver that never answers 2xx: one advance past the last backoff step (about 21 h
// plus up to 20 % jitter, twice over for the event that waits behind another) makes all
// nine attempts and marks the deliveries failed, without waiting in real time.
store_test! {
    async fn an_advance_past_the_last_retry_fails_the_deliveries(backend) {
    let (harness, key, _secret, shared) = setup(backend).await;
    shared.lock().expect("lock").failing_users = vec!["u1".into(), "u2".into()];
    harness.grant(&key, "u1", 1).await;
    harness.grant(&key, "u2", 2).await;
    harness.grant(&key, "u2", 3).await;
    let started = std::time::Instant::now();
    let answer = harness.advance(&key, 52 * 3600).await;
    assert!(
        started.elapsed() < control_plane::http::subscriptions::ADVANCE_BUDGET,
        "bounded in wall-clock time"
    );
    assert_eq!(answer["settled"], true, "{answer}");
    assert_eq!(answer["pending"]["webhook_deliveries"], 0, "{answer}");
    let got = received(&shared);
    // u1's event and u2's first each took nine attempts; u2's second waits behind its
    // first, whose delivery failed for good, and then gets its own nine.
    let ids: std::collections::BTreeSet<String> = got.iter().map(|request| request.id.clone()).collect();
    assert_eq!(ids.len(), 3);
    for id in &ids {
        let attempts = attempts_of(&harness, &key, id).await;
        assert_eq!(attempts.len(), 9, "{id}: {attempts:?}");
        assert!(attempts.iter().all(|(_, status)| status == "failed"), "{id}");
    }
    }
}

// A receiver that accepts connections and never answers ties up only its own
// environment's share of the webhook worker: another tenant's deliveries go out at once,
// and the scheduler's due work does not wait for webhooks at all (before, delivery ran
// inside the scheduler's pass, one environment after another).
store_test! {
    async fn a_black_hole_endpoint_holds_up_no_other_tenant(backend) {
    let mut config = control_plane::config::Config::for_tests();
    config.webhook_timeout = std::time::Duration::from_secs(60);
    let harness = Harness::start_with(backend, config).await;
    // Tenant A sorts first: the old scheduler reached B only after A's deliveries.
    let a = harness.tenant("a").await.test;
    let b = harness.tenant("b").await.test;
    harness.catalog(&a).await;
    harness.catalog(&b).await;

    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hole_url = format!("http://{}/hook", hole.local_addr().expect("address"));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let holding = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((socket, _)) = hole.accept().await {
            // Keep every connection open, unanswered.
            holding.lock().expect("lock").push(socket);
        }
    });
    harness.ok("/v1/webhook-endpoints", &a, json!({"url": hole_url}), 201).await;
    let (url, shared) = start_receiver().await;
    harness.ok("/v1/webhook-endpoints", &b, json!({"url": url}), 201).await;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(control_plane::webhooks::run(harness.state.deliveries().clone(), stopped));
    for index in 0..20 {
        harness.grant(&a, &format!("a{index}"), 1).await;
    }
    crate::support::eventually("A's attempts hang in the black hole", || async {
        !accepted.lock().expect("lock").is_empty()
    })
    .await;
    harness.grant(&b, "b1", 5).await;
    crate::support::eventually("B's event is delivered while A's hang", || async {
        !received(&shared).is_empty()
    })
    .await;

    // B's due work: a block that expires now runs on the next pass, while A's
    // deliveries still hang (none has an attempt recorded).
    let grant = json!({"end_user_id": "b2", "amount": 7, "expires_at": "2026-01-01T00:00:30Z"});
    harness.ok("/v1/credits/grants", &b, grant, 201).await;
    harness.clock.advance_ms(60_000);
    control_plane::jobs::tick(&harness.state).await.expect("tick");
    let balance = harness.get("/v1/credits/balance?end_user_id=b2", &b).await.body;
    assert_eq!(balance["available"], 0, "B's block expired on the pass: {balance}");
    let events = harness.get("/v1/events?limit=500", &a).await.body;
    let recorded = events["data"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|event| !event["deliveries"].as_array().is_none_or(Vec::is_empty))
        .count();
    assert_eq!(recorded, 0, "A's attempts are still hanging");
    stop.send(true).expect("stop");
    worker.await.expect("worker stops");
    }
}
