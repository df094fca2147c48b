//! The outbox against a fake control plane: what is kept, shipped, quarantined.

use std::sync::atomic::AtomicU32;

use axum::Json;
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::*;

/// What the fake control plane answers one `/v1/usage/batch` call.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// The whole call answers this status with a problem.
    Status(u16),
    /// Events whose idempotency key starts with `bad` are refused with this status;
    /// the others are created.
    EventError(u16),
}

/// A fake control plane: its address, the batch calls it took, and the events each
/// held.
struct Fake {
    url: String,
    calls: Arc<AtomicU32>,
    sizes: Arc<std::sync::Mutex<Vec<usize>>>,
    /// Every batch call's events, in order.
    batches: Arc<std::sync::Mutex<Vec<Vec<RecordUsage>>>>,
}

/// A control plane whose `/v1/usage/batch` answers the given statuses in turn, then
/// accepts everything.
async fn fake_control_plane(refusals: Vec<u16>) -> (String, Arc<AtomicU32>) {
    fake_control_plane_at(refusals, 2).await
}

async fn fake_control_plane_at(refusals: Vec<u16>, ack_version: u64) -> (String, Arc<AtomicU32>) {
    let fake = fake(
        refusals.into_iter().map(Answer::Status).collect(),
        ack_version,
        axum::Router::new(),
    )
    .await;
    (fake.url, fake.calls)
}

fn problem_response(problem: &protocol::Problem) -> axum::response::Response {
    (
        StatusCode::from_u16(problem.status).expect("status"),
        Json(serde_json::to_value(problem).expect("json")),
    )
        .into_response()
}

/// A control plane whose `/v1/usage/batch` gives `answers` in turn, then accepts
/// everything (acknowledging at `ack_version`); `extra` serves the other endpoints.
async fn fake(answers: Vec<Answer>, ack_version: u64, extra: axum::Router) -> Fake {
    let calls = Arc::new(AtomicU32::new(0));
    let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let batches = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (counter, seen, taken) = (calls.clone(), sizes.clone(), batches.clone());
    let app = extra.route(
        "/v1/usage/batch",
        axum::routing::post(move |Json(batch): Json<UsageBatch>| {
            let call = counter.fetch_add(1, Ordering::AcqRel);
            seen.lock().expect("sizes").push(batch.events.len());
            taken.lock().expect("batches").push(batch.events.clone());
            let answer = answers
                .get(usize::try_from(call).unwrap_or(usize::MAX))
                .copied();
            async move {
                if let Some(Answer::Status(status)) = answer {
                    let problem = protocol::Problem::new(status, "refused", "Refused", "try later");
                    return problem_response(&problem);
                }
                let results: Vec<protocol::BatchResult> = batch
                    .events
                    .iter()
                    .enumerate()
                    .map(|(index, event)| {
                        let bad = event
                            .idempotency_key
                            .as_deref()
                            .is_some_and(|key| key.starts_with("bad"));
                        match answer {
                            Some(Answer::EventError(status)) if bad => protocol::BatchResult {
                                index,
                                status: BatchStatus::Error,
                                id: None,
                                cost: None,
                                covered: None,
                                debt: None,
                                version: None,
                                error: Some(protocol::Problem::new(
                                    status,
                                    "feature_not_found",
                                    "Feature not found",
                                    "no such feature",
                                )),
                                timestamp_clamped_from: None,
                            },
                            _ => protocol::BatchResult {
                                index,
                                status: BatchStatus::Created,
                                id: Some(format!("led_{index}")),
                                cost: Some(1),
                                covered: Some(1),
                                debt: Some(0),
                                version: Some(ack_version),
                                error: None,
                                timestamp_clamped_from: None,
                            },
                        }
                    })
                    .collect();
                Json(protocol::UsageBatchRecorded { results }).into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Fake {
        url,
        calls,
        sizes,
        batches,
    }
}

/// The outbox on `disk`, its usage log in `dir/usage`.
fn outbox_at(disk: Disk, dir: &std::path::Path) -> Outbox {
    Outbox::open(
        disk,
        &dir.join("usage"),
        1 << 20,
        Flusher::new(),
        Durability::Interval,
        500,
    )
    .expect("outbox")
}

/// A fresh outbox and replica in `dir`.
fn open(dir: &std::path::Path) -> (Disk, Replica, Outbox) {
    let disk = Disk::open(dir, 8).expect("disk");
    let replica = Replica::open(disk.clone(), Arc::default()).expect("replica");
    let outbox = outbox_at(disk.clone(), dir);
    (disk, replica, outbox)
}

fn one_try(url: &str) -> client::Client {
    client::Client::new(url, "qs_test_k")
        .expect("client")
        .retry(client::Retry {
            attempts: 1,
            ..client::Retry::default()
        })
}

fn user(id: &str) -> EndUserId {
    EndUserId::new(id).expect("id")
}

/// Pushes a usage record of 1 unit for `end_user`, counted as pending like an
/// admitted request.
async fn admit(outbox: &Outbox, replica: &Replica, key: &str, end_user: &str) {
    let mut record = usage(key);
    record.end_user_id = end_user.into();
    outbox.push(&record).await.expect("pushed");
    replica.pending.add(&user(end_user), Credits::new(1));
}

fn usage(key: &str) -> Record {
    Record {
        key: key.into(),
        end_user_id: "u1".into(),
        pending: 1,
        op: Op::usage("api_calls".into(), 1, 1_780_000_000_000),
    }
}

#[tokio::test]
async fn usage_waits_through_rate_limits_and_key_rotations_then_ships_once() {
    let dir = tempfile::tempdir().expect("dir");
    let disk = Disk::open(dir.path(), 8).expect("disk");
    let replica = Replica::open(disk.clone(), Arc::default()).expect("replica");
    let outbox = outbox_at(disk, dir.path());
    let (url, calls) = fake_control_plane(vec![429, 401, 503]).await;
    let client = client::Client::new(&url, "qs_test_k")
        .expect("client")
        .retry(client::Retry {
            attempts: 1,
            ..client::Retry::default()
        });
    for key in ["k1", "k2", "k3"] {
        outbox.push(&usage(key)).await.expect("pushed");
        replica
            .pending
            .add(&EndUserId::new("u1").expect("id"), Credits::new(1));
    }
    for _ in 0..3 {
        assert!(outbox.ship_once(&client, &replica, 500).await.is_err());
        assert_eq!(
            outbox.depth(),
            3,
            "nothing is dropped on a temporary refusal"
        );
    }
    assert!(
        !outbox
            .ship_once(&client, &replica, 500)
            .await
            .expect("shipped")
    );
    assert_eq!(outbox.depth(), 0);
    assert_eq!(calls.load(Ordering::Acquire), 4);
    // Acknowledged at version 2: pending until the replica shows it.
    let user = EndUserId::new("u1").expect("id");
    assert_eq!(replica.pending.total(&user), Credits::new(3));
    replica.pending.install(&user, 2, || ());
    assert_eq!(replica.pending.total(&user), Credits::ZERO);
}

/// A refusal of the whole batch call (an ingress 404 or 413 during a deploy, a 400)
/// is not about any one event: every record stays, the shipper backs off and tries
/// again, and a 413 halves the batch until it passes.
#[tokio::test]
async fn a_whole_batch_refusal_keeps_every_record_and_retries() {
    let dir = tempfile::tempdir().expect("dir");
    let (_disk, replica, outbox) = open(dir.path());
    let fake = fake(
        vec![
            Answer::Status(400),
            Answer::Status(404),
            Answer::Status(413),
        ],
        2,
        axum::Router::new(),
    )
    .await;
    let client = one_try(&fake.url);
    for key in ["k1", "k2", "k3", "k4"] {
        admit(&outbox, &replica, key, "u1").await;
    }
    for status in [400, 404, 413] {
        let error = outbox
            .ship_once(&client, &replica, 500)
            .await
            .expect_err("refused");
        assert!(error.contains(&status.to_string()), "{error}");
        assert_eq!(outbox.depth(), 4, "every record is kept after a {status}");
        assert_eq!(outbox.quarantine_depth(), 0);
        assert_eq!(replica.pending.total(&user("u1")), Credits::new(4));
    }
    assert!(
        outbox
            .ship_once(&client, &replica, 500)
            .await
            .expect("shipped"),
        "after the 413, half a batch at a time: more waits"
    );
    assert!(
        !outbox
            .ship_once(&client, &replica, 500)
            .await
            .expect("shipped")
    );
    assert_eq!(outbox.depth(), 0);
    assert_eq!(*fake.sizes.lock().expect("sizes"), [4, 4, 4, 2, 2]);
    replica.pending.install(&user("u1"), 2, || ());
    assert_eq!(replica.pending.total(&user("u1")), Credits::ZERO);
}

/// An event refused for good in a batch's results moves to the quarantine (out of the
/// outbox, its spend no longer pending), is listed with the refusal, and ships again
/// after a replay, by key or all at once.
#[tokio::test]
async fn a_refused_event_is_quarantined_listed_and_ships_after_a_replay() {
    let dir = tempfile::tempdir().expect("dir");
    let (_disk, replica, outbox) = open(dir.path());
    let fake = fake(vec![Answer::EventError(404)], 2, axum::Router::new()).await;
    let client = one_try(&fake.url);
    admit(&outbox, &replica, "good", "u1").await;
    admit(&outbox, &replica, "bad1", "u2").await;
    admit(&outbox, &replica, "bad2", "u2").await;
    outbox
        .ship_once(&client, &replica, 500)
        .await
        .expect("shipped");
    assert_eq!(outbox.depth(), 0, "nothing left to ship");
    assert_eq!(outbox.quarantine_depth(), 2);
    assert_eq!(
        replica.pending.total(&user("u2")),
        Credits::ZERO,
        "the control plane charged nothing for them"
    );

    let (listed, next) = outbox.quarantined(1, None).expect("listed");
    assert_eq!(listed.len(), 1);
    let first = &listed[0];
    let problem = first.quarantined.problem.as_ref().expect("the refusal");
    assert_eq!(
        (problem.status, problem.code.as_str()),
        (404, "feature_not_found")
    );
    let (rest, _) = outbox
        .quarantined(10, next.as_deref())
        .expect("the next page");
    assert_eq!(rest.len(), 1);
    let mut keys = [
        first.quarantined.record.key.as_str(),
        rest[0].quarantined.record.key.as_str(),
    ];
    keys.sort_unstable();
    assert_eq!(keys, ["bad1", "bad2"]);
    let json = serde_json::to_value(first).expect("json");
    assert_eq!(json["key"], first.key.as_str());
    assert_eq!(json["record"]["key"], first.quarantined.record.key.as_str());
    assert!(json["quarantined_at"].is_string());

    assert!(matches!(
        outbox.replay(&replica, Some("01ARZ3NDEKTSV4RRFFQ69G5FAV")),
        Err(ReplayError::NotFound(_))
    ));
    assert_eq!(outbox.replay(&replica, Some(&first.key)).expect("one"), 1);
    assert_eq!((outbox.depth(), outbox.quarantine_depth()), (1, 1));
    assert_eq!(outbox.replay(&replica, None).expect("the rest"), 1);
    assert_eq!((outbox.depth(), outbox.quarantine_depth()), (2, 0));
    assert_eq!(
        replica.pending.total(&user("u2")),
        Credits::new(2),
        "replayed spend counts again until acknowledged"
    );
    assert!(
        !outbox
            .ship_once(&client, &replica, 500)
            .await
            .expect("shipped")
    );
    assert_eq!((outbox.depth(), outbox.quarantine_depth()), (0, 0));
    assert_eq!(fake.calls.load(Ordering::Acquire), 2);
    replica.pending.install(&user("u2"), 2, || ());
    assert_eq!(replica.pending.total(&user("u2")), Credits::ZERO);
}

/// The quarantine is on disk: a restarted proxy still lists (and counts) it, and does
/// not count its spend as pending.
#[tokio::test]
async fn the_quarantine_survives_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let fake = fake(vec![Answer::EventError(400)], 2, axum::Router::new()).await;
    let client = one_try(&fake.url);
    {
        let (disk, replica, outbox) = open(dir.path());
        admit(&outbox, &replica, "bad", "u3").await;
        outbox
            .ship_once(&client, &replica, 500)
            .await
            .expect("shipped");
        disk.flush().expect("flushed");
    }
    let (_disk, replica, outbox) = open(dir.path());
    assert_eq!(outbox.restore_pending(&replica).expect("restored"), 0);
    assert_eq!(replica.pending.total(&user("u3")), Credits::ZERO);
    assert_eq!((outbox.depth(), outbox.quarantine_depth()), (0, 1));
    let (listed, _) = outbox.quarantined(10, None).expect("listed");
    assert_eq!(listed[0].quarantined.record.key, "bad");
}

#[tokio::test]
async fn acknowledged_spend_survives_a_crash_until_the_stored_replica_shows_it() {
    let dir = tempfile::tempdir().expect("dir");
    let user = EndUserId::new("u1").expect("id");
    let (url, _calls) = fake_control_plane_at(vec![], 1).await;
    let client = client::Client::new(&url, "qs_test_k").expect("client");
    {
        let disk = Disk::open(dir.path(), 8).expect("disk");
        let replica = Replica::open(disk.clone(), Arc::default()).expect("replica");
        let outbox = outbox_at(disk, dir.path());
        outbox.push(&usage("k1")).await.expect("pushed");
        replica.pending.add(&user, Credits::new(1));
        outbox
            .ship_once(&client, &replica, 500)
            .await
            .expect("shipped");
        assert_eq!(outbox.depth(), 0, "acknowledged records leave the outbox");
        assert_eq!(replica.pending.total(&user), Credits::new(1));
        // The process dies here, before its replica shows version 1.
    }
    let disk = Disk::open(dir.path(), 8).expect("disk");
    let replica = Replica::open(disk.clone(), Arc::default()).expect("replica");
    let outbox = outbox_at(disk.clone(), dir.path());
    assert_eq!(outbox.restore_acked(&replica).expect("restored"), 1);
    assert_eq!(
        replica.pending.total(&user),
        Credits::new(1),
        "still counted after the crash"
    );

    // The stream brings version 1: pending clears, and the next persist forgets it.
    let catalog_json: protocol::CatalogSnapshot = serde_json::from_value(serde_json::json!({
        "features": [], "plans": [], "variants": [],
        "settings": {"free_plan_variant_id": null, "low_balance_threshold": null}
    }))
    .expect("catalog");
    let catalog = catalog_json.to_ledger().expect("catalog");
    let now = ledger::Timestamp::from_millis(1_780_000_000_000);
    let mut state = ledger::EndUserState::new(user.clone(), now);
    let mut ids = ledger::SequentialIds::default();
    let mut cx = ledger::Cx {
        now,
        catalog: &catalog,
        ids: &mut ids,
    };
    state
        .grant(&mut cx, ledger::GrantRequest::new(Credits::new(5)))
        .expect("grant");
    assert_eq!(state.version(), 1);
    replica
        .apply(protocol::SyncRecord::EndUser {
            cursor: 4,
            end_user_id: "u1".into(),
            version: 1,
            state: state.into_parts(),
        })
        .expect("applied");
    assert_eq!(replica.pending.total(&user), Credits::ZERO);
    replica.persist().expect("persisted");
    assert!(disk.acked_all().expect("read").is_empty());
}

/// A control plane whose reservation commits all answer 409 `reservation_not_active`
/// with `current_status` (usage batches are accepted).
async fn not_active_plane(current_status: Option<&'static str>) -> Fake {
    let commit = axum::Router::new().route(
        "/v1/reservations/{id}/commit",
        axum::routing::post(move || async move {
            let mut problem = protocol::Problem::new(
                409,
                "reservation_not_active",
                "Reservation not active",
                "the reservation is not active",
            );
            problem.current_status = current_status.map(str::to_owned);
            problem_response(&problem)
        }),
    );
    fake(Vec::new(), 2, commit).await
}

fn commit(key: &str) -> Record {
    Record {
        key: key.into(),
        end_user_id: "u1".into(),
        pending: 0,
        op: Op::Commit {
            reservation_id: "rsv_1".into(),
            feature_key: "tokens".into(),
            units: 37,
        },
    }
}

/// A commit answered `reservation_not_active` becomes plain usage of the actual only
/// when the hold lapsed (`expired`, `released`). `committed` means an earlier try of
/// this commit succeeded and its answer was lost: charging again would count the work
/// twice, so the record is acknowledged and dropped. Without a status nobody can tell:
/// the record waits in the quarantine.
#[tokio::test]
async fn a_late_commit_becomes_usage_only_when_its_hold_lapsed() {
    for (current_status, becomes_usage, quarantined) in [
        (Some("committed"), false, 0),
        (Some("expired"), true, 0),
        (Some("released"), true, 0),
        (None, false, 1),
    ] {
        let dir = tempfile::tempdir().expect("dir");
        let (disk, replica, outbox) = open(dir.path());
        let fake = not_active_plane(current_status).await;
        let client = one_try(&fake.url);
        outbox.push(&commit("qsp_c1")).await.expect("pushed");
        outbox
            .ship_once(&client, &replica, 500)
            .await
            .expect("resolved");
        let waiting: Vec<Record> = disk
            .outbox_head(10)
            .expect("head")
            .into_iter()
            .map(|(_, json)| serde_json::from_slice(&json).expect("a record"))
            .collect();
        let usage: Vec<&Record> = waiting
            .iter()
            .filter(|record| matches!(record.op, Op::Usage { units: 37, .. }))
            .collect();
        assert_eq!(
            usage.len(),
            usize::from(becomes_usage),
            "{current_status:?}: {waiting:?}"
        );
        if becomes_usage {
            assert_eq!(usage[0].key, "qsp_c1-usage");
            outbox
                .ship_once(&client, &replica, 500)
                .await
                .expect("shipped");
        } else {
            assert!(waiting.is_empty(), "{current_status:?}: {waiting:?}");
        }
        assert_eq!(outbox.depth(), 0, "{current_status:?}");
        assert_eq!(outbox.quarantine_depth(), quarantined, "{current_status:?}");
        assert_eq!(
            fake.calls.load(Ordering::Acquire),
            u32::from(becomes_usage),
            "{current_status:?}: usage batches sent"
        );
    }
}

/// The release queued for a reservation that got no answer replays the reservation
/// under its key: a refusal for good (402) means the hold was never made, so there is
/// nothing to release and nothing for an operator to see.
#[tokio::test]
async fn an_unanswered_reservation_that_was_never_made_needs_no_release() {
    let dir = tempfile::tempdir().expect("dir");
    let (_disk, replica, outbox) = open(dir.path());
    let reserve = axum::Router::new().route(
        "/v1/reservations",
        axum::routing::post(|| async {
            problem_response(&protocol::Problem::new(
                402,
                "insufficient_balance",
                "Insufficient balance",
                "not enough credits",
            ))
        }),
    );
    let fake = fake(Vec::new(), 2, reserve).await;
    let client = one_try(&fake.url);
    outbox
        .push(&Record {
            key: "qsp_r1-undo".into(),
            end_user_id: "u1".into(),
            pending: 0,
            op: Op::Unreserve {
                reserve_key: "qsp_r1".into(),
                feature_key: "tokens".into(),
                units: 100,
                ttl_seconds: 300,
            },
        })
        .await
        .expect("pushed");
    outbox
        .ship_once(&client, &replica, 500)
        .await
        .expect("resolved");
    assert_eq!((outbox.depth(), outbox.quarantine_depth()), (0, 0));
}

/// What the aggregation tests start from: `T0`, a moment, and `WINDOW`, when a quota
/// window resets.
const T0: i64 = 1_780_000_000_000;
const WINDOW: i64 = T0 + 3_600_000;

/// A request's usage of `units` of `feature` by `end_user` at `at`, in `window`.
fn request(
    key: &str,
    end_user: &str,
    feature: &str,
    units: u64,
    at: i64,
    window: Option<i64>,
) -> Record {
    Record {
        key: key.into(),
        end_user_id: end_user.into(),
        pending: i64::try_from(units).expect("units"),
        op: Op::request_usage(feature.into(), units, at, window),
    }
}

/// The events of a batch as (key, end user, feature, units, timestamp), sorted.
fn events(batch: &[RecordUsage]) -> Vec<(String, String, String, u64, i64)> {
    let mut events: Vec<_> = batch
        .iter()
        .map(|event| {
            (
                event.idempotency_key.clone().expect("key"),
                event.end_user_id.clone(),
                event.feature_key.clone(),
                event.units,
                event.timestamp.expect("timestamp").0.as_millis(),
            )
        })
        .collect();
    events.sort();
    events
}

fn aggregating(dir: &std::path::Path) -> (Disk, Replica, Outbox) {
    let (disk, replica, outbox) = open(dir);
    (disk, replica, outbox.aggregating(Duration::from_secs(1)))
}

/// Requests' usage of one end user, feature and quota window within the span leaves as
/// one event (units and pending summed, at the latest timestamp); another end user,
/// feature, window, or a moment past the span, is another event. A retry after a lost
/// answer sends the same events under the same keys.
#[tokio::test]
async fn usage_of_one_window_leaves_as_one_event_and_a_retry_sends_the_same() {
    let dir = tempfile::tempdir().expect("dir");
    let (_disk, replica, outbox) = aggregating(dir.path());
    let fake = fake(vec![Answer::Status(503)], 7, axum::Router::new()).await;
    let client = one_try(&fake.url);
    let records = [
        request("a1", "u1", "chat", 1, T0, Some(WINDOW)),
        request("b1", "u2", "chat", 4, T0 + 1, Some(WINDOW)),
        request("a2", "u1", "chat", 2, T0 + 400, Some(WINDOW)),
        request("c1", "u1", "chat", 1, T0 + 500, Some(WINDOW + 1)),
        request("d1", "u1", "tokens", 9, T0 + 600, None),
        request("a3", "u1", "chat", 3, T0 + 1000, Some(WINDOW)),
        request("a4", "u1", "chat", 5, T0 + 1001, Some(WINDOW)),
        request("b2", "u2", "chat", 6, T0 + 900, Some(WINDOW)),
        request("d2", "u1", "tokens", 1, T0 + 700, None),
    ];
    for record in &records {
        outbox.push(record).await.expect("pushed");
        replica
            .pending
            .add(&user(&record.end_user_id), Credits::new(record.pending));
    }
    assert!(
        outbox.ship_once(&client, &replica, 500).await.is_err(),
        "503"
    );
    assert_eq!(outbox.depth(), 5, "nine records became five events on disk");
    assert!(
        !outbox
            .ship_once(&client, &replica, 500)
            .await
            .expect("shipped")
    );
    assert_eq!(outbox.depth(), 0);
    let batches = fake.batches.lock().expect("batches").clone();
    assert_eq!(batches.len(), 2);
    assert_eq!(
        events(&batches[0]),
        events(&batches[1]),
        "the retry sends the same events"
    );
    let sent: Vec<_> = events(&batches[1])
        .into_iter()
        .map(|(key, end_user, feature, units, at)| {
            // Merged as the log was handed on (under the group's first key) or when
            // the round sealed groups (a new `qsa_` key); alone under its own.
            assert!(
                key.starts_with("qsa_") || ["a1", "a4", "b1", "c1", "d1"].contains(&key.as_str()),
                "{key}"
            );
            (end_user, feature, units, at - T0)
        })
        .collect();
    let mut expected = vec![
        ("u1".to_owned(), "chat".to_owned(), 6, 1000), // a1 + a2 + a3: within a second of a1
        ("u1".to_owned(), "chat".to_owned(), 5, 1001), // a4: past a1's second
        ("u1".to_owned(), "chat".to_owned(), 1, 500),  // c1: another window
        ("u1".to_owned(), "tokens".to_owned(), 10, 700),
        ("u2".to_owned(), "chat".to_owned(), 10, 900),
    ];
    let mut got = sent;
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    // Acknowledged at version 7: every credit still pending until the replica shows it.
    assert_eq!(replica.pending.total(&user("u1")), Credits::new(22));
    assert_eq!(replica.pending.total(&user("u2")), Credits::new(10));
    replica.pending.install(&user("u1"), 7, || ());
    assert_eq!(replica.pending.total(&user("u1")), Credits::ZERO);
}

/// A record sent once (its answer lost) is never folded into another event later, and
/// records an earlier run left (which it may have sent) are shipped as they are; an
/// event made durable before a crash is sent under its key after it, not its parts.
#[tokio::test]
async fn what_may_have_been_sent_is_sent_again_as_it_was() {
    let dir = tempfile::tempdir().expect("dir");
    let fake = fake(
        vec![
            Answer::Status(503),
            Answer::Status(503),
            Answer::Status(503),
        ],
        2,
        axum::Router::new(),
    )
    .await;
    let client = one_try(&fake.url);
    {
        let (disk, replica, outbox) = aggregating(dir.path());
        outbox
            .push(&request("lone", "u1", "chat", 1, T0, None))
            .await
            .expect("pushed");
        assert!(outbox.ship_once(&client, &replica, 500).await.is_err());
        // Usage of the same group after the send: not merged into the one sent.
        outbox
            .push(&request("next", "u1", "chat", 1, T0 + 1, None))
            .await
            .expect("pushed");
        outbox
            .push(&request("then", "u1", "chat", 1, T0 + 2, None))
            .await
            .expect("pushed");
        assert!(outbox.ship_once(&client, &replica, 500).await.is_err());
        assert_eq!(outbox.depth(), 2, "`next` and `then` became one event");
        disk.flush().expect("flushed");
        // The process dies here.
    }
    {
        let (disk, replica, outbox) = aggregating(dir.path());
        assert_eq!(outbox.depth(), 2);
        outbox
            .push(&request("after", "u1", "chat", 1, T0 + 3, None))
            .await
            .expect("pushed");
        assert!(outbox.ship_once(&client, &replica, 500).await.is_err());
        disk.flush().expect("flushed");
    }
    let (_disk, replica, outbox) = aggregating(dir.path());
    assert!(
        !outbox
            .ship_once(&client, &replica, 500)
            .await
            .expect("shipped")
    );
    let batches = fake.batches.lock().expect("batches").clone();
    let keys = |batch: &[RecordUsage]| -> Vec<String> {
        events(batch).into_iter().map(|event| event.0).collect()
    };
    assert_eq!(keys(&batches[0]), ["lone"]);
    let merged = keys(&batches[1]);
    assert_eq!(merged.len(), 2);
    assert_eq!(merged[0], "lone");
    // `next` and `then`, merged as the log was handed on, under the first one's key.
    assert_eq!(merged[1], "next", "{merged:?}");
    // After the restart: the earlier run's two as they were, and `after` alone.
    assert_eq!(
        keys(&batches[2]),
        ["after".to_owned(), merged[0].clone(), merged[1].clone()]
    );
    assert_eq!(keys(&batches[3]), keys(&batches[2]));
    assert_eq!(outbox.depth(), 0);
}

/// With aggregation off, each request's usage is its own event.
#[tokio::test]
async fn without_aggregation_each_request_is_an_event() {
    let dir = tempfile::tempdir().expect("dir");
    let (_disk, replica, outbox) = open(dir.path());
    let fake = fake(vec![], 2, axum::Router::new()).await;
    let client = one_try(&fake.url);
    for (key, at) in [("a", T0), ("b", T0 + 1)] {
        outbox
            .push(&request(key, "u1", "chat", 1, at, None))
            .await
            .expect("pushed");
    }
    outbox
        .ship_once(&client, &replica, 500)
        .await
        .expect("shipped");
    let batches = fake.batches.lock().expect("batches").clone();
    assert_eq!(events(&batches[0]).len(), 2);
}

/// An outbox aggregating over a second whose replica runs on a clock the test moves.
fn aggregating_at(dir: &std::path::Path) -> (protocol::clock::ManualClock, Replica, Outbox) {
    let clock = protocol::clock::ManualClock::new(ledger::Timestamp::from_millis(T0));
    let disk = Disk::open(dir, 8).expect("disk");
    let pending = Arc::new(crate::pending::Pending::new(Arc::new(clock.clone())));
    let replica = Replica::open(disk.clone(), pending).expect("replica");
    let outbox = outbox_at(disk, dir).aggregating(Duration::from_secs(1));
    (clock, replica, outbox)
}

/// A group waits until its earliest record is a span old, gathering what comes
/// meanwhile; then it leaves as one event.
#[tokio::test]
async fn a_group_waits_for_its_span_then_leaves_as_one_event() {
    let dir = tempfile::tempdir().expect("dir");
    let (clock, replica, outbox) = aggregating_at(dir.path());
    let fake = fake(vec![], 2, axum::Router::new()).await;
    let client = one_try(&fake.url);
    outbox
        .push(&request("a1", "u1", "chat", 1, T0, None))
        .await
        .expect("pushed");
    assert!(
        !outbox
            .ship_once(&client, &replica, 500)
            .await
            .expect("round")
    );
    clock.advance_ms(300);
    outbox
        .push(&request("a2", "u1", "chat", 2, T0 + 300, None))
        .await
        .expect("pushed");
    clock.advance_ms(699);
    assert!(
        !outbox
            .ship_once(&client, &replica, 500)
            .await
            .expect("round")
    );
    assert_eq!(
        fake.calls.load(Ordering::Acquire),
        0,
        "the group is younger than a second"
    );
    assert_eq!(outbox.depth(), 2, "waiting records are left as they are");
    clock.advance_ms(1);
    outbox
        .ship_once(&client, &replica, 500)
        .await
        .expect("shipped");
    let batches = fake.batches.lock().expect("batches").clone();
    let sent = events(&batches[0]);
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].3, sent[0].4), (3, T0 + 300));
    assert_eq!(outbox.depth(), 0);
}

/// At shutdown nothing waits: the last round ships young groups too.
#[tokio::test]
async fn the_last_round_at_shutdown_ships_what_was_waiting() {
    let dir = tempfile::tempdir().expect("dir");
    let (_clock, replica, outbox) = aggregating_at(dir.path());
    let outbox = Arc::new(outbox);
    let fake = fake(vec![], 2, axum::Router::new()).await;
    for (key, at) in [("a1", T0), ("a2", T0)] {
        outbox
            .push(&request(key, "u1", "chat", 1, at, None))
            .await
            .expect("pushed");
    }
    let (stop, stopped) = watch::channel(false);
    let shipper = tokio::spawn(outbox.clone().ship(
        one_try(&fake.url),
        Arc::new(replica),
        500,
        Duration::from_secs(3600),
        stopped,
    ));
    stop.send(true).expect("stop");
    shipper.await.expect("shipper");
    let batches = fake.batches.lock().expect("batches").clone();
    assert_eq!(batches.len(), 1);
    assert_eq!(events(&batches[0])[0].3, 2);
    assert_eq!(outbox.depth(), 0);
}

/// A group dated after now (the clock was set back) does not wait for the clock to
/// catch up.
#[tokio::test]
async fn usage_dated_after_now_does_not_wait() {
    let dir = tempfile::tempdir().expect("dir");
    let (_clock, replica, outbox) = aggregating_at(dir.path());
    let fake = fake(vec![], 2, axum::Router::new()).await;
    let client = one_try(&fake.url);
    for key in ["f1", "f2"] {
        outbox
            .push(&request(key, "u1", "chat", 1, T0 + 600_000, None))
            .await
            .expect("pushed");
    }
    outbox
        .ship_once(&client, &replica, 500)
        .await
        .expect("shipped");
    let batches = fake.batches.lock().expect("batches").clone();
    assert_eq!(batches.len(), 1);
    assert_eq!(events(&batches[0])[0].3, 2, "merged, and sent at once");
}

/// A record refused and quarantined was sent: replayed, it goes under its own key,
/// never merged with newer usage.
#[tokio::test]
async fn a_replayed_record_is_sent_as_it_was() {
    let dir = tempfile::tempdir().expect("dir");
    let (_clock, replica, outbox) = aggregating_at(dir.path());
    let fake = fake(vec![Answer::EventError(400)], 2, axum::Router::new()).await;
    let client = one_try(&fake.url);
    outbox
        .push(&request("bad1", "u1", "chat", 1, T0 - 5_000, None))
        .await
        .expect("pushed");
    outbox
        .ship_once(&client, &replica, 500)
        .await
        .expect("round");
    assert_eq!((outbox.depth(), outbox.quarantine_depth()), (0, 1));
    assert_eq!(outbox.replay(&replica, None).expect("replayed"), 1);
    outbox
        .push(&request("x1", "u1", "chat", 1, T0 - 4_000, None))
        .await
        .expect("pushed");
    outbox
        .ship_once(&client, &replica, 500)
        .await
        .expect("shipped");
    let batches = fake.batches.lock().expect("batches").clone();
    let keys: Vec<String> = events(&batches[1])
        .into_iter()
        .map(|event| event.0)
        .collect();
    assert_eq!(keys, ["bad1", "x1"]);
    assert_eq!(outbox.depth(), 0);
}

/// A group never holds more than one event may (`UNITS_MAX` units): what would pass it
/// starts a group of its own.
#[tokio::test]
async fn a_group_never_passes_the_units_one_event_may_hold() {
    let dir = tempfile::tempdir().expect("dir");
    let (_clock, replica, outbox) = aggregating_at(dir.path());
    let fake = fake(vec![], 2, axum::Router::new()).await;
    let client = one_try(&fake.url);
    for (key, units) in [("big", ledger::UNITS_MAX - 1), ("two", 2), ("one", 1)] {
        let mut record = request(key, "u1", "chat", units, T0 - 5_000, None);
        record.pending = 1;
        outbox.push(&record).await.expect("pushed");
    }
    outbox
        .ship_once(&client, &replica, 500)
        .await
        .expect("shipped");
    let batches = fake.batches.lock().expect("batches").clone();
    let mut units: Vec<u64> = events(&batches[0])
        .into_iter()
        .map(|event| event.3)
        .collect();
    units.sort_unstable();
    assert_eq!(units, [3, ledger::UNITS_MAX - 1]);
}

/// A round sends at most a batch of events and says more are ready; what it sent and
/// got acknowledged is forgotten.
#[tokio::test]
async fn a_round_sends_at_most_a_batch_and_says_when_more_is_ready() {
    let dir = tempfile::tempdir().expect("dir");
    let (_clock, replica, outbox) = aggregating_at(dir.path());
    let fake = fake(vec![], 2, axum::Router::new()).await;
    let client = one_try(&fake.url);
    for end_user in ["u1", "u2", "u3"] {
        for key in ["a", "b"] {
            outbox
                .push(&request(
                    &format!("{end_user}{key}"),
                    end_user,
                    "chat",
                    1,
                    T0 - 5_000,
                    None,
                ))
                .await
                .expect("pushed");
        }
    }
    assert!(
        outbox.ship_once(&client, &replica, 2).await.expect("first"),
        "more is ready"
    );
    assert!(
        !outbox
            .ship_once(&client, &replica, 2)
            .await
            .expect("second")
    );
    let sizes = fake.sizes.lock().expect("sizes").clone();
    assert_eq!(sizes, [2, 1]);
    assert_eq!(outbox.depth(), 0);
    assert!(outbox.sent.lock().expect("sent").is_empty());
}

/// A shipping round against a control plane that answers 503: it fails (after handing
/// the usage log on to sled).
async fn ship_into_an_outage(outbox: &Outbox, replica: &Replica) {
    let (url, _calls) = fake_control_plane(vec![503]).await;
    assert!(
        outbox
            .ship_once(&one_try(&url), replica, 500)
            .await
            .is_err(),
        "the round fails while the control plane answers 503"
    );
}

/// Usage files in `dir/usage`.
fn usage_segments(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("usage"))
        .expect("usage dir")
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|entry| entry.path().extension().is_some_and(|ext| ext == "log"))
        })
        .count()
}

/// A request's record goes to the usage log, not sled; what a run logged and never
/// handed on (it was killed) is in the outbox when the next run opens it, once, and
/// ships from there.
#[tokio::test]
async fn what_a_killed_run_logged_reaches_the_outbox_at_the_next_start_once() {
    let dir = tempfile::tempdir().expect("dir");
    {
        let (disk, replica, outbox) = open(dir.path());
        for key in ["k1", "k2", "k3"] {
            admit(&outbox, &replica, key, "u1").await;
        }
        assert_eq!(outbox.depth(), 3);
        assert_eq!(disk.outbox_len(), 0, "nothing in sled on the request path");
        // Killed: nothing handed on.
    }
    for _ in 0..2 {
        let (disk, replica, outbox) = open(dir.path());
        assert_eq!(disk.outbox_len(), 3, "in sled once, however often it opens");
        assert_eq!(outbox.depth(), 3);
        assert_eq!(outbox.restore_pending(&replica).expect("restore"), 3);
        assert_eq!(outbox.log().waiting(), 0);
    }
    let (_disk, replica, outbox) = open(dir.path());
    let (url, calls) = fake_control_plane(vec![]).await;
    outbox
        .ship_once(&one_try(&url), &replica, 500)
        .await
        .expect("shipped");
    assert_eq!(calls.load(Ordering::Acquire), 1);
    assert_eq!(outbox.depth(), 0);
}

/// A round hands the log on to sled before it calls the control plane, so records wait
/// in sled through an outage; once handed on, a reopen does not bring them back from
/// the log (no double count), and the log's old segments are gone.
#[tokio::test]
async fn a_round_hands_the_log_on_even_when_the_control_plane_is_down() {
    let dir = tempfile::tempdir().expect("dir");
    {
        let (disk, replica, outbox) = open(dir.path());
        for key in ["k1", "k2"] {
            admit(&outbox, &replica, key, "u1").await;
        }
        ship_into_an_outage(&outbox, &replica).await;
        assert_eq!(disk.outbox_len(), 2, "handed on before the call");
        assert_eq!(outbox.log().waiting(), 0);
        assert_eq!(outbox.depth(), 2);
        admit(&outbox, &replica, "k3", "u1").await;
        assert_eq!(outbox.depth(), 3);
    }
    let (disk, replica, outbox) = open(dir.path());
    assert_eq!(disk.outbox_len(), 3, "two from sled, one from the log");
    assert_eq!(outbox.restore_pending(&replica).expect("restore"), 3);
    assert_eq!(usage_segments(dir.path()), 1, "only the new run's segment");
}

/// A full usage log refuses a record with a clear error; nothing it holds is lost, and
/// a round makes room again.
#[tokio::test]
async fn a_full_usage_log_refuses_clearly_and_a_round_makes_room() {
    let dir = tempfile::tempdir().expect("dir");
    let disk = Disk::open(dir.path(), 8).expect("disk");
    let replica = Replica::open(disk.clone(), Arc::default()).expect("replica");
    let outbox = Outbox::open(
        disk.clone(),
        &dir.path().join("usage"),
        16 << 10,
        Flusher::new(),
        Durability::Interval,
        500,
    )
    .expect("outbox");
    let mut pushed = 0usize;
    while outbox.can_record() {
        admit(&outbox, &replica, &format!("k{pushed}"), "u1").await;
        pushed += 1;
        assert!(pushed < 1000, "the bound never applied");
    }
    let mut record = usage("over");
    record.end_user_id = "u1".into();
    // Past `can_record`, appends go on until the bound itself.
    let error = loop {
        match outbox.push(&record).await {
            Ok(()) => pushed += 1,
            Err(error) => break error,
        }
        assert!(pushed < 1000, "the bound never applied");
    };
    assert!(error.to_string().contains("usage log is full"), "{error}");
    assert_eq!(outbox.depth(), pushed, "nothing held is lost");
    ship_into_an_outage(&outbox, &replica).await;
    assert_eq!(disk.outbox_len(), pushed, "all of it in sled");
    assert!(outbox.can_record(), "room again");
    outbox
        .push(&record)
        .await
        .expect("pushed once there is room");
}

/// The hand-on loop moves the log to sled on its interval while nothing ships (the
/// control plane down), and once more when it stops.
#[tokio::test]
async fn the_hand_on_loop_runs_without_the_control_plane_and_at_stop() {
    let dir = tempfile::tempdir().expect("dir");
    let (disk, replica, outbox) = open(dir.path());
    let outbox = Arc::new(outbox);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(Arc::clone(&outbox).hand_on_loop(Duration::from_millis(10), stopped));
    admit(&outbox, &replica, "k1", "u1").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while disk.outbox_len() < 1 {
        assert!(std::time::Instant::now() < deadline, "never handed on");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(outbox.log().waiting(), 0);
    stop.send(true).expect("stop");
    admit(&outbox, &replica, "k2", "u1").await;
    task.await.expect("loop");
    assert_eq!(disk.outbox_len(), 2, "handed on at stop");
    assert_eq!(outbox.depth(), 2);
}

fn logged(n: u8, record: &Record) -> crate::usage_log::Logged {
    crate::usage_log::Logged {
        key: [n; 16],
        json: serde_json::to_vec(record).expect("json"),
        end: crate::usage_log::Position {
            segment: 1,
            offset: u64::from(n),
        },
    }
}

/// Handing the log on merges each end user's usage of a feature and window within the
/// span into the group's first record (its key, its place), keeping the earliest
/// timestamp; anything else passes as it was, and a span of 0 merges nothing.
#[test]
fn the_hand_on_merges_usage_into_the_first_record_of_each_group() {
    let commit = commit("c");
    let records = [
        request("a1", "u1", "chat", 1, T0 + 10, Some(WINDOW)),
        request("b1", "u2", "chat", 4, T0, Some(WINDOW)),
        request("a2", "u1", "chat", 2, T0, Some(WINDOW)),
        commit.clone(),
        request("w1", "u1", "chat", 1, T0, Some(WINDOW + 1)),
        request("a3", "u1", "chat", 3, T0 + 1010, Some(WINDOW)),
        usage("plain"),
    ];
    let mut chunk: Vec<_> = (0u8..).zip(&records).map(|(n, r)| logged(n, r)).collect();
    chunk.push(crate::usage_log::Logged {
        key: [99; 16],
        json: b"not json".to_vec(),
        end: crate::usage_log::Position {
            segment: 1,
            offset: 99,
        },
    });
    let (unmerged, none) = premerge(&chunk, 0);
    assert_eq!(none, 0);
    assert_eq!(unmerged.len(), chunk.len());

    let (merged, count) = premerge(&chunk, 1000);
    assert_eq!(count, 1, "a2 joined a1; a3 is past a2's second");
    let keys: Vec<u8> = merged.iter().map(|(key, _)| key[0]).collect();
    assert_eq!(keys, [0, 1, 3, 4, 5, 6, 99]);
    let read =
        |index: usize| -> Record { serde_json::from_slice(&merged[index].1).expect("a record") };
    let mut first = records[0].clone();
    first.pending = 3;
    first.op = Op::Usage {
        feature_key: "chat".into(),
        units: 3,
        timestamp_ms: T0 + 10,
        window_ms: Some(WINDOW),
        aggregable: true,
        since_ms: Some(T0),
    };
    assert_eq!(
        read(0),
        first,
        "a1 + a2 under a1's key, from a2's timestamp"
    );
    assert_eq!(read(1), records[1]);
    assert_eq!(read(2), commit);
    assert_eq!(read(3), records[4], "another window");
    assert_eq!(
        read(4),
        records[5],
        "past the span from the group's earliest"
    );
    assert_eq!(read(5), records[6], "not aggregable");
    assert_eq!(
        merged[6].1, b"not json",
        "unreadable, passed on for the round to drop"
    );
}
