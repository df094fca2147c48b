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
struct Received {
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
struct Receiver {
    received: Vec<Received>,
    /// End users whose events are answered 500 while listed.
    failing_users: Vec<String>,
    /// How many more requests to answer 500, whoever they are about.
    fail_next: usize,
}

type Shared = Arc<Mutex<Receiver>>;

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
    receiver.received.push(received);
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
async fn start_receiver() -> (String, Shared) {
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

fn received(shared: &Shared) -> Vec<Received> {
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
    harness.advance(&key, 4).await;
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
            (StatusCode::BAD_REQUEST, Some("url")),
            "{url}"
        );
    }
    }
}
