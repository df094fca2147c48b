//! Replication for proxies: a snapshot, then 1,000 mixed mutations followed through the
//! change stream, leave a follower with exactly the control plane's state for every end
//! user; a reconnect from a mid-stream cursor loses nothing; an expired cursor gets 410.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use protocol::SyncRecord;
use serde_json::json;
use tower::ServiceExt;

use crate::support::Harness;
use crate::support::store_test;

/// Reads records from a streamed response body as they arrive: NDJSON lines, or binary
/// frames where they were asked for.
struct Lines {
    body: Body,
    buffer: Vec<u8>,
    frames: Option<protocol::frames::FrameReader>,
}

impl Lines {
    async fn open(harness: &Harness, path: &str, key: &str) -> (StatusCode, Lines) {
        Lines::open_as(harness, path, key, false).await
    }

    async fn open_as(
        harness: &Harness,
        path: &str,
        key: &str,
        frames: bool,
    ) -> (StatusCode, Lines) {
        let mut request = Request::get(path).header("authorization", format!("Bearer {key}"));
        if frames {
            request = request.header("accept", protocol::frames::FEED_FRAMES);
        }
        let request = request.body(Body::empty()).expect("request");
        let response = harness
            .app
            .clone()
            .oneshot(request)
            .await
            .expect("response");
        let content_type = response
            .headers()
            .get("content-type")
            .map(|value| value.to_str().expect("text").to_owned());
        if response.status() == StatusCode::OK {
            let expected = if frames {
                protocol::frames::FEED_FRAMES
            } else {
                protocol::NDJSON
            };
            assert_eq!(content_type.as_deref(), Some(expected));
        }
        (
            response.status(),
            Lines {
                body: response.into_body(),
                buffer: Vec::new(),
                frames: frames.then(protocol::frames::FrameReader::new),
            },
        )
    }

    /// The next record, or `None` when the body ended.
    async fn next(&mut self) -> Option<SyncRecord> {
        loop {
            if let Some(reader) = &mut self.frames {
                if let Some(frame) = reader.next_frame().expect("a frame") {
                    return Some(frame.into_record().expect("a record"));
                }
            } else if let Some(position) = self.buffer.iter().position(|byte| *byte == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=position).collect();
                return Some(
                    serde_json::from_slice(&line[..line.len() - 1]).expect("a sync record"),
                );
            }
            let frame = tokio::time::timeout(std::time::Duration::from_secs(10), self.body.frame())
                .await
                .expect("a record within 10 s")?;
            if let Ok(data) = frame.expect("frame").into_data() {
                match &mut self.frames {
                    Some(reader) => reader.push(&data),
                    None => self.buffer.extend_from_slice(&data),
                }
            }
        }
    }
}

/// What a follower keeps: each end user's newest state, and its cursor.
#[derive(Debug, Default, Clone)]
struct Follower {
    cursor: i64,
    users: BTreeMap<String, (u64, ledger::StateParts)>,
    clock_offset_ms: i64,
    catalog_seen: bool,
}

impl Follower {
    fn apply(&mut self, record: SyncRecord) {
        if let Some(cursor) = record.cursor() {
            assert!(
                cursor >= self.cursor,
                "cursors never go back: {cursor} after {}",
                self.cursor
            );
            self.cursor = cursor;
        }
        match record {
            SyncRecord::EndUser {
                end_user_id,
                version,
                state,
                ..
            } => {
                let newer = self
                    .users
                    .get(&end_user_id)
                    .is_none_or(|(known, _)| version > *known);
                if newer {
                    self.users.insert(end_user_id, (version, state));
                }
            }
            SyncRecord::Header {
                clock_offset_ms, ..
            }
            | SyncRecord::Clock {
                clock_offset_ms, ..
            } => self.clock_offset_ms = clock_offset_ms,
            SyncRecord::Catalog { catalog, .. } => {
                catalog.to_ledger().expect("the replicated catalog builds");
                self.catalog_seen = true;
            }
            SyncRecord::Heartbeat { .. } | SyncRecord::End { .. } => {}
        }
    }

    async fn snapshot(harness: &Harness, key: &str) -> Follower {
        Follower::snapshot_as(harness, key, false).await
    }

    async fn snapshot_as(harness: &Harness, key: &str, frames: bool) -> Follower {
        let (status, mut lines) = Lines::open_as(harness, "/v1/sync/snapshot", key, frames).await;
        assert_eq!(status, StatusCode::OK);
        let mut follower = Follower::default();
        while let Some(record) = lines.next().await {
            let end = matches!(record, SyncRecord::End { .. });
            follower.apply(record);
            if end {
                return follower;
            }
        }
        panic!("the snapshot ended without its end line");
    }

    /// Follows the feed over `transport` until the cursor reaches `until` (or stops after
    /// `stop_after` records, to simulate a dropped connection).
    async fn follow(
        &mut self,
        harness: &Harness,
        key: &str,
        until: i64,
        stop_after: Option<usize>,
        transport: &Transport,
    ) {
        match transport {
            Transport::Http => {
                self.follow_http(harness, key, until, stop_after, false)
                    .await
            }
            Transport::HttpFrames => {
                self.follow_http(harness, key, until, stop_after, true)
                    .await
            }
            Transport::Nats(client) => {
                let mut lines = nats_lines(harness, key, client, self.cursor)
                    .await
                    .expect("the NATS feed opens");
                let mut seen = 0usize;
                while self.cursor < until {
                    let record =
                        tokio::time::timeout(std::time::Duration::from_secs(10), lines.next())
                            .await
                            .expect("a record within 10 s")
                            .expect("the NATS feed stays open");
                    self.apply(record.into_record().expect("a record"));
                    seen += 1;
                    if stop_after.is_some_and(|limit| seen >= limit) {
                        return;
                    }
                }
            }
        }
    }

    async fn follow_http(
        &mut self,
        harness: &Harness,
        key: &str,
        until: i64,
        stop_after: Option<usize>,
        frames: bool,
    ) {
        let (status, mut lines) = Lines::open_as(
            harness,
            &format!("/v1/sync/stream?cursor={}", self.cursor),
            key,
            frames,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let mut seen = 0usize;
        while self.cursor < until {
            let record = lines.next().await.expect("the stream stays open");
            self.apply(record);
            seen += 1;
            if stop_after.is_some_and(|limit| seen >= limit) {
                return;
            }
        }
    }
}

/// How a follower receives the feed after its snapshot.
#[derive(Debug, Clone)]
enum Transport {
    /// The HTTP stream in NDJSON.
    Http,
    /// The HTTP stream in binary frames (as proxies take it).
    HttpFrames,
    Nats(async_nats::Client),
}

/// The feed of `key`'s environment on NATS, from `cursor` on.
async fn nats_lines(
    harness: &Harness,
    key: &str,
    client: &async_nats::Client,
    cursor: i64,
) -> Result<client::nats::NatsLines, client::nats::NatsError> {
    let answer = harness.get("/v1/sync/nats", key).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let feed: protocol::NatsFeed = serde_json::from_value(answer.body).expect("a NATS feed");
    client::nats::NatsLines::open(client, &feed, cursor).await
}

/// Stamps each `async fn name(backend, transport) { … }` out once per store and per feed
/// transport: over HTTP always (in NDJSON and in frames), over NATS when
/// `QS_TEST_NATS_URL` is set (the harness publishes to it, and the tenant's streams are
/// deleted afterwards).
macro_rules! feed_test {
    ($(async fn $name:ident($backend:ident, $harness:ident, $transport:ident) $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn case(
                $backend: &crate::support::Backend,
                $harness: &Harness,
                $transport: &Transport,
            ) -> crate::support::Tenant $body

            /// `kind`: "http", "frames" (the HTTP stream in frames) or "nats".
            async fn over(backend: &crate::support::Backend, kind: &str) {
                let harness = Harness::start(backend).await;
                match kind {
                    "http" => {
                        case(backend, &harness, &Transport::Http).await;
                    }
                    "frames" => {
                        case(backend, &harness, &Transport::HttpFrames).await;
                    }
                    _ => {
                        let Some(url) = crate::support::nats_url() else { return };
                        let publishing = harness.publish_to_nats(&url).await;
                        let transport = Transport::Nats(publishing.client.clone());
                        let tenant = case(backend, &harness, &transport).await;
                        crate::support::delete_streams(&publishing.client, &tenant).await;
                    }
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_http() {
                over(&crate::support::Backend::Sqlite, "http").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_frames() {
                over(&crate::support::Backend::Sqlite, "frames").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_nats() {
                over(&crate::support::Backend::Sqlite, "nats").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_http() {
                if let Some(backend) = crate::support::Backend::postgres() {
                    over(&backend, "http").await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_frames() {
                if let Some(backend) = crate::support::Backend::postgres() {
                    over(&backend, "frames").await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_nats() {
                if let Some(backend) = crate::support::Backend::postgres() {
                    over(&backend, "nats").await;
                }
            }
        }
    )*};
}

feed_test! {
    async fn snapshot_then_stream_replicates_exactly(_backend, harness, transport) {
    let tenant = harness.tenant("acme").await;
    let key = tenant.test.as_str();
    harness.catalog(key).await;
    for user in 0..5 {
        harness.grant(key, &format!("early_{user}"), 50).await;
    }
    let mut follower = Follower::snapshot_as(harness, key, matches!(transport, Transport::HttpFrames)).await;
    assert!(follower.catalog_seen);
    assert_eq!(follower.users.len(), 5);
    let mut mid_follower: Option<Follower> = None;

    // 1,000 mixed mutations over 20 end users (each starts with some credits).
    for user in 0..20 {
        harness.grant(key, &format!("user_{user}"), 100).await;
    }
    let mut reservations: Vec<String> = Vec::new();
    for step in 0..1000u32 {
        let user = format!("user_{}", step % 20);
        match step % 10 {
            0 | 1 => {
                harness
                    .grant(key, &user, i64::from(step % 7 + 1) * 10)
                    .await;
            }
            2..=4 => {
                harness.ok("/v1/usage", key, json!({"end_user_id": user, "feature_key": "api_calls", "units": step % 5 + 1}), 201).await;
            }
            5 => {
                let answer = harness
                    .post(
                        "/v1/reservations",
                        key,
                        json!({"end_user_id": user, "feature_key": "api_calls", "amount": 2}),
                    )
                    .await;
                if answer.status == StatusCode::CREATED {
                    reservations.push(answer.body["id"].as_str().expect("id").to_owned());
                }
            }
            6 => {
                if let Some(id) = reservations.pop() {
                    harness
                        .post(
                            &format!("/v1/reservations/{id}/commit"),
                            key,
                            json!({"amount": 1}),
                        )
                        .await;
                }
            }
            7 => {
                harness
                    .post(
                        "/v1/subscriptions",
                        key,
                        json!({"end_user_id": user, "plan_variant_id": "pro/monthly"}),
                    )
                    .await;
            }
            8 => {
                harness
                    .ok(
                        "/v1/credits/adjustments",
                        key,
                        json!({"end_user_id": user, "amount": 3, "reason": "goodwill"}),
                        201,
                    )
                    .await;
            }
            _ => {
                harness.post("/v1/usage", key, json!({"end_user_id": user, "feature_key": "tokens", "units": 1500, "strict": true})).await;
            }
        }
        if step == 500 {
            // A second follower catches up to here, then drops its connection.
            let mut second = follower.clone();
            let here = harness
                .state
                .store()
                .last_change(&env(&tenant))
                .await
                .expect("cursor");
            second.follow(harness, key, here, Some(25), transport).await;
            mid_follower = Some(second);
        }
    }
    let last = harness
        .state
        .store()
        .last_change(&env(&tenant))
        .await
        .expect("cursor");
    follower.follow(harness, key, last, None, transport).await;
    assert_states_match(harness, &tenant, &follower, 25).await;

    // The dropped follower reconnects from its own cursor and loses nothing.
    let mut second = mid_follower.expect("the mid-stream follower");
    assert!(second.cursor > 0 && second.cursor < last);
    second.follow(harness, key, last, None, transport).await;
    assert_states_match(harness, &tenant, &second, 25).await;
    tenant
    }
}

fn env(tenant: &crate::support::Tenant) -> control_plane::store::Env {
    control_plane::store::Env::new(tenant.id.clone(), control_plane::store::Environment::Test)
}

async fn assert_states_match(
    harness: &Harness,
    tenant: &crate::support::Tenant,
    follower: &Follower,
    users: usize,
) {
    let mut stored = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = harness
            .state
            .store()
            .end_user_states(&env(tenant), after.as_deref(), 100)
            .await
            .expect("states");
        let Some(last) = page.last() else { break };
        after = Some(last.end_user_id().to_string());
        for user in page {
            stored.insert(user.end_user_id().to_string(), user.into_parts());
        }
    }
    assert_eq!(stored.len(), users);
    assert_eq!(
        follower.users.len(),
        stored.len(),
        "the follower knows every end user"
    );
    for (id, state) in &stored {
        assert_eq!(
            follower.users.get(id).map(|(_, parts)| parts),
            Some(state),
            "replica of {id} differs"
        );
    }
}

// A usage batch over several end users: on SQLite they share one position of the feed
// (one row names them all). A follower whose connection drops after any of the batch's
// lines resumes from its cursor and still gets every end user.
feed_test! {
    async fn a_follower_dropped_inside_a_batch_loses_none_of_its_end_users(backend, harness, transport) {
    let tenant = harness.tenant("acme").await;
    let key = tenant.test.as_str();
    harness.catalog(key).await;
    const USERS: usize = 6;
    for user in 0..USERS {
        harness.grant(key, &format!("user_{user}"), 100).await;
    }
    let follower = Follower::snapshot_as(harness, key, matches!(transport, Transport::HttpFrames)).await;
    let events: Vec<_> = (0..USERS)
        .map(|user| json!({"end_user_id": format!("user_{user}"), "feature_key": "api_calls", "units": 1 + user, "idempotency_key": format!("event-{user}")}))
        .collect();
    harness
        .ok("/v1/usage/batch", key, json!({ "events": events }), 200)
        .await;
    let last = harness
        .state
        .store()
        .last_change(&env(&tenant))
        .await
        .expect("cursor");
    let feed = harness
        .state
        .store()
        .changes_after(&env(&tenant), follower.cursor, 1)
        .await
        .expect("feed");
    assert!(
        feed.iter().all(|change| change.seq == feed[0].seq),
        "one position's records: {feed:?}"
    );
    if matches!(backend, crate::support::Backend::Sqlite) {
        assert_eq!(feed.len(), USERS, "the batch is one position naming every end user");
    }
    for dropped_after in 1..USERS {
        let mut dropped = follower.clone();
        dropped.follow(harness, key, last, Some(dropped_after), transport).await;
        dropped.follow(harness, key, last, None, transport).await;
        assert_states_match(harness, &tenant, &dropped, USERS).await;
    }
    tenant
    }
}

// The stream says it is alive at once, carries catalog and clock changes, and a cursor
// behind the retained feed answers 410.
store_test! {
    async fn heartbeats_clock_and_expired_cursors(backend) {
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    let key = tenant.test.as_str();
    harness.catalog(key).await;
    let follower = Follower::snapshot(&harness, key).await;
    let (_, mut lines) = Lines::open(
        &harness,
        &format!("/v1/sync/stream?cursor={}", follower.cursor),
        key,
    )
    .await;
    assert!(
        matches!(lines.next().await, Some(SyncRecord::Heartbeat { .. })),
        "a heartbeat first"
    );
    harness.advance(key, 3600).await;
    let mut clock = None;
    while clock.is_none() {
        if let Some(SyncRecord::Clock {
            clock_offset_ms, ..
        }) = lines.next().await
        {
            clock = Some(clock_offset_ms);
        }
    }
    assert_eq!(
        clock,
        Some(3_600_000),
        "followers learn the test clock's offset"
    );

    let no_scope = harness
        .ok("/v1/api-keys", key, json!({"scopes": ["read"]}), 201)
        .await;
    let (forbidden, _) = Lines::open(
        &harness,
        "/v1/sync/snapshot",
        no_scope["secret"].as_str().expect("secret"),
    )
    .await;
    assert_eq!(forbidden, StatusCode::FORBIDDEN);

    let far_future = ledger::Timestamp::from_millis(i64::MAX / 2);
    harness
        .state
        .store()
        .purge_changes(far_future)
        .await
        .expect("purge");
    let (gone, _) = Lines::open(&harness, "/v1/sync/stream?cursor=0", key).await;
    assert_eq!(gone, StatusCode::GONE);
    let current = harness
        .state
        .store()
        .last_change(&env(&tenant))
        .await
        .expect("cursor");
    let (fine, _) = Lines::open(&harness, &format!("/v1/sync/stream?cursor={current}"), key).await;
    assert_eq!(fine, StatusCode::OK, "a follower at the watermark is fine");
    }
}

// Two control-plane processes on one database: a follower connected to one sees the
// changes committed through the other, in order.
store_test! {
    async fn a_follower_of_one_replica_sees_writes_through_another(backend) {
    let storage = crate::support::Storage::new(backend).await;
    let writer = Harness::on(&storage).await;
    let tenant = writer.tenant("acme").await;
    let key = tenant.test.as_str();
    writer.catalog(key).await;
    let reader = Harness::on(&storage).await;
    let mut follower = Follower::snapshot(&reader, key).await;
    for amount in 1..=20 {
        writer.grant(key, "shared", amount).await;
    }
    let last = writer
        .state
        .store()
        .last_change(&env(&tenant))
        .await
        .expect("cursor");
    follower.follow(&reader, key, last, None, &Transport::Http).await;
    let (version, state) = follower.users.get("shared").expect("the end user").clone();
    assert_eq!(version, 20);
    let total: i64 = state.blocks.iter().map(|block| block.remaining.get()).sum();
    assert_eq!(total, (1..=20).sum::<i64>());
    }
}

/// Every message of an environment's NATS stream: (position, previous, more).
async fn stream_chain(
    client: &async_nats::Client,
    tenant: &crate::support::Tenant,
) -> Vec<(i64, i64, bool)> {
    let context = async_nats::jetstream::new(client.clone());
    let mut stream = context
        .get_stream(control_plane::nats::feed_names(&env(tenant)).stream)
        .await
        .expect("the stream");
    let held = stream.info().await.expect("info").state.clone();
    let mut chain = Vec::new();
    // A stream just made holds nothing yet (its first and last sequence are 0, and
    // asking for message 0 is a bad request).
    if held.messages == 0 {
        return chain;
    }
    for sequence in held.first_sequence..=held.last_sequence {
        let message = stream.get_raw_message(sequence).await.expect("a message");
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|value| value.as_str().parse::<i64>().expect("a number"))
        };
        chain.push((
            header(protocol::NATS_POSITION).expect("a position"),
            header(protocol::NATS_PREVIOUS).expect("a previous"),
            message.headers.get(protocol::NATS_MORE).is_some(),
        ));
    }
    chain
}

// Two control-plane processes on one database, both publishing to NATS, each writing
// concurrently: the stream holds each position once, in order, each message naming the
// one before it, and a follower of the stream ends with exactly the stored state.
store_test! {
    async fn two_replicas_publish_one_ordered_stream(backend) {
    let Some(url) = crate::support::nats_url() else { return };
    let storage = crate::support::Storage::new(backend).await;
    let first = Harness::on(&storage).await;
    let tenant = first.tenant("acme").await;
    let key = tenant.test.clone();
    first.catalog(&key).await;
    let second = Harness::on(&storage).await;
    let mut follower = Follower::snapshot(&second, &key).await;
    let publishing = first.publish_to_nats(&url).await;
    let _also = second.publish_to_nats(&url).await;
    let mut writers = Vec::new();
    for (index, harness) in [first.clone(), second.clone()].into_iter().enumerate() {
        let key = key.clone();
        writers.push(tokio::spawn(async move {
            for round in 0..60 {
                harness.grant(&key, &format!("u{}", (index * 7 + round) % 9), 1).await;
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    let last = first.state.store().last_change(&env(&tenant)).await.expect("head");
    follower
        .follow(&first, &key, last, None, &Transport::Nats(publishing.client.clone()))
        .await;
    assert_states_match(&first, &tenant, &follower, 9).await;
    let chain = stream_chain(&publishing.client, &tenant).await;
    assert!(chain.iter().all(|(_, _, more)| !more), "no position is split here");
    for pair in chain.windows(2) {
        assert!(pair[1].0 > pair[0].0, "positions rise: {pair:?}");
        assert_eq!(pair[1].1, pair[0].0, "each message names the one before it: {pair:?}");
    }
    assert_eq!(chain.last().map(|link| link.0), Some(last), "published to the head");
    crate::support::delete_streams(&publishing.client, &tenant).await;
    }
}

// What was committed while no process published (NATS down, or every replica restarted)
// is published once a publisher runs again: nothing committed is left behind.
store_test! {
    async fn what_was_committed_unpublished_is_published_after_a_restart(backend) {
    let Some(url) = crate::support::nats_url() else { return };
    let storage = crate::support::Storage::new(backend).await;
    let before = Harness::on(&storage).await;
    let tenant = before.tenant("acme").await;
    let key = tenant.test.clone();
    before.catalog(&key).await;
    let mut follower = Follower::snapshot(&before, &key).await;
    for user in 0..10 {
        before.grant(&key, &format!("u{user}"), 5).await;
    }
    drop(before);
    let after = Harness::on(&storage).await;
    let publishing = after.publish_to_nats(&url).await;
    let last = after.state.store().last_change(&env(&tenant)).await.expect("head");
    follower
        .follow(&after, &key, last, None, &Transport::Nats(publishing.client.clone()))
        .await;
    assert_states_match(&after, &tenant, &follower, 10).await;
    crate::support::delete_streams(&publishing.client, &tenant).await;
    }
}

// Over NATS as over HTTP: heartbeats say the follower is current, a clock change
// arrives, and a follower whose cursor the stream no longer holds is told to re-snapshot
// while one at the head goes on.
store_test! {
    async fn nats_heartbeats_clock_and_expired_cursors(backend) {
    let Some(url) = crate::support::nats_url() else { return };
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    let key = tenant.test.as_str();
    harness.catalog(key).await;
    let publishing = harness.publish_to_nats(&url).await;
    let client = publishing.client.clone();
    let follower = Follower::snapshot(&harness, key).await;
    let mut lines = nats_lines(&harness, key, &client, follower.cursor)
        .await
        .expect("the NATS feed opens");
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next())
        .await
        .expect("a heartbeat within 10 s")
        .expect("a record")
        .into_record()
        .expect("decodes");
    assert_eq!(
        first,
        SyncRecord::Heartbeat { cursor: follower.cursor, now: match &first {
            SyncRecord::Heartbeat { now, .. } => *now,
            other => panic!("a heartbeat first, not {other:?}"),
        }},
    );
    harness.advance(key, 3600).await;
    let clock = loop {
        let record = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next())
            .await
            .expect("the clock change within 10 s")
            .expect("a record")
            .into_record()
            .expect("decodes");
        if let SyncRecord::Clock { clock_offset_ms, .. } = record {
            break clock_offset_ms;
        }
    };
    assert_eq!(clock, 3_600_000);

    for amount in 1..=5 {
        harness.grant(key, "u", amount).await;
    }
    let head = harness.state.store().last_change(&env(&tenant)).await.expect("head");
    crate::support::eventually_value("the stream holds the head", || async {
        (stream_chain(&client, &tenant).await.last().map(|link| link.0) == Some(head))
            .then_some(())
    })
    .await;
    // The stream forgets all but its last message, as retention would.
    let context = async_nats::jetstream::new(client.clone());
    let mut stream = context
        .get_stream(control_plane::nats::feed_names(&env(&tenant)).stream)
        .await
        .expect("stream");
    let last_sequence = stream.info().await.expect("info").state.last_sequence;
    stream.purge().sequence(last_sequence).await.expect("purge");
    let expired = nats_lines(&harness, key, &client, follower.cursor).await;
    assert!(
        matches!(expired, Err(client::nats::NatsError::CursorExpired { .. })),
        "an expired cursor is told to re-snapshot: {expired:?}"
    );
    // An idle environment whose stream aged to empty and whose feed was purged: a
    // follower behind the purge is told so, though the stream holds nothing to compare.
    stream.purge().await.expect("purge all");
    harness
        .state
        .store()
        .purge_changes(ledger::Timestamp::from_millis(i64::MAX / 2))
        .await
        .expect("purge the feed");
    let expired = nats_lines(&harness, key, &client, follower.cursor).await;
    assert!(
        matches!(expired, Err(client::nats::NatsError::CursorExpired { .. })),
        "behind the purge, even on an empty stream: {expired:?}"
    );
    let mut fresh = Follower::snapshot(&harness, key).await;
    assert_eq!(fresh.cursor, head);
    fresh.follow(&harness, key, head, None, &Transport::Nats(client.clone())).await;
    let mut at_head = nats_lines(&harness, key, &client, head).await.expect("opens at the head");
    let beat = tokio::time::timeout(std::time::Duration::from_secs(10), at_head.next())
        .await
        .expect("a heartbeat within 10 s")
        .expect("a record")
        .into_record()
        .expect("decodes");
    assert!(matches!(beat, SyncRecord::Heartbeat { cursor, .. } if cursor == head));
    crate::support::delete_streams(&client, &tenant).await;
    }
}

// A follower that loses live messages (as a slow consumer's overflow or a reconnect
// would) catches up from the stream and ends with exactly the stored state: when the
// lost messages were the last before a quiet spell (heartbeats reveal them, after
// three seconds), and when the next live message shows the gap (at once).
store_test! {
    async fn a_follower_that_loses_live_messages_catches_up_from_the_stream(backend) {
    let Some(url) = crate::support::nats_url() else { return };
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    let key = tenant.test.as_str();
    harness.catalog(key).await;
    let publishing = harness.publish_to_nats(&url).await;
    let mut follower = Follower::snapshot(&harness, key).await;
    let mut lines = nats_lines(&harness, key, &publishing.client, follower.cursor)
        .await
        .expect("opens");
    // One message per grant: each waits until the stream holds the last.
    let grant_each = |users: std::ops::Range<usize>| {
        let (harness, client, tenant) = (&harness, &publishing.client, &tenant);
        async move {
            let mut heads = Vec::new();
            for user in users {
                harness.grant(key, &format!("u{user}"), 5).await;
                let head = harness.state.store().last_change(&env(tenant)).await.expect("head");
                crate::support::eventually_value("the stream holds the head", || async {
                    (stream_chain(client, tenant).await.last().map(|link| link.0) == Some(head))
                        .then_some(())
                })
                .await;
                heads.push(head);
            }
            heads
        }
    };
    // Every message lost: only heartbeats say the follower is behind.
    let heads = grant_each(0..10).await;
    let head = *heads.last().expect("a head");
    lines.lose_live_through(head);
    read_until(&mut lines, &mut follower, |f| f.cursor >= head).await;
    assert_eq!(follower.cursor, head, "every lost change was caught up");
    assert_eq!(lines.catch_ups(), 1, "one catch-up, after the heartbeats");
    assert_states_match(&harness, &tenant, &follower, 10).await;

    // Three lost, then two heard: the first heard goes on from a position not taken.
    let heads = grant_each(10..15).await;
    lines.lose_live_through(heads[2]);
    let head = *heads.last().expect("a head");
    let started = std::time::Instant::now();
    read_until(&mut lines, &mut follower, |f| f.cursor >= head).await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "the gap was filled at once, not after the heartbeats"
    );
    assert_eq!(follower.cursor, head, "every lost change was caught up");
    assert_eq!(lines.catch_ups(), 2);
    assert_states_match(&harness, &tenant, &follower, 15).await;
    crate::support::delete_streams(&publishing.client, &tenant).await;
    }
}

/// Applies records from `lines` until `done` holds of the follower.
async fn read_until(
    lines: &mut client::nats::NatsLines,
    follower: &mut Follower,
    done: impl Fn(&Follower) -> bool,
) {
    while !done(follower) {
        let record = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next())
            .await
            .unwrap_or_else(|_| panic!("a record within 10 s: {lines:?} {}", follower.cursor))
            .expect("the NATS feed stays open")
            .into_record()
            .expect("decodes");
        follower.apply(record);
    }
}

// Without `sync.nats_url` the control plane says so, and proxies keep to HTTP.
#[tokio::test]
async fn without_nats_the_feed_says_it_is_http_only() {
    let harness = Harness::start(&crate::support::Backend::Sqlite).await;
    let tenant = harness.tenant("acme").await;
    let answer = harness.get("/v1/sync/nats", &tenant.test).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.code(), "nats_not_configured");
}

// A revoked key's open change stream ends within about a second (before, it kept
// receiving every end user's state), and one key holds at most `sync.streams_per_key`
// streams open at once.
store_test! {
    async fn revoked_keys_lose_their_streams_and_streams_are_capped(backend) {
    let mut config = control_plane::config::Config::for_tests();
    config.streams_per_key = 2;
    let harness = Harness::start_with(backend, config).await;
    let admin = harness.tenant("acme").await.test;
    let created = harness.ok("/v1/api-keys", &admin, json!({"name": "proxy", "scopes": ["sync"]}), 201).await;
    let key = created["secret"].as_str().expect("secret").to_owned();
    let id = created["id"].as_str().expect("id").to_owned();

    let (status, mut first) = Lines::open(&harness, "/v1/sync/stream?cursor=0", &key).await;
    assert_eq!(status, StatusCode::OK);
    assert!(matches!(first.next().await, Some(SyncRecord::Heartbeat { .. })));
    let (status, mut second) = Lines::open(&harness, "/v1/sync/stream?cursor=0", &key).await;
    assert_eq!(status, StatusCode::OK);
    assert!(matches!(second.next().await, Some(SyncRecord::Heartbeat { .. })));
    let (status, _third) = Lines::open(&harness, "/v1/sync/stream?cursor=0", &key).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "a third stream of one key");
    drop(second);
    let (status, _fourth) = crate::support::eventually_value("a closed stream frees its slot", || async {
        let (status, lines) = Lines::open(&harness, "/v1/sync/stream?cursor=0", &key).await;
        (status == StatusCode::OK).then_some((status, lines))
    })
    .await;
    assert_eq!(status, StatusCode::OK);

    let revoked_at = std::time::Instant::now();
    harness.ok(&format!("/v1/api-keys/{id}/revoke"), &admin, json!({}), 200).await;
    while first.next().await.is_some() {}
    assert!(
        revoked_at.elapsed() < std::time::Duration::from_millis(1500),
        "the stream ended within a second of the revocation: {:?}",
        revoked_at.elapsed()
    );
    }
}

// Several followers at one cursor share the control plane's reads of the feed (and of
// each changed end user's state): four streams, followed while eight tasks write 240
// grants over 12 end users, each end with exactly the stored state of every end user.
store_test! {
    async fn followers_sharing_reads_each_get_every_change(backend) {
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    let key = tenant.test.clone();
    harness.catalog(&key).await;
    for user in 0..12 {
        harness.grant(&key, &format!("u{user}"), 1).await;
    }
    let start = Follower::snapshot(&harness, &key).await;
    let (target, watched) = tokio::sync::watch::channel(i64::MAX);
    let mut followers = Vec::new();
    for _ in 0..4 {
        let (harness, key, mut follower, watched) =
            (harness.clone(), key.clone(), start.clone(), watched.clone());
        followers.push(tokio::spawn(async move {
            let (status, mut lines) = Lines::open(
                &harness,
                &format!("/v1/sync/stream?cursor={}", follower.cursor),
                &key,
            )
            .await;
            assert_eq!(status, StatusCode::OK);
            // Heartbeats (every 2 s) carry the cursor, so a follower at the head sees
            // the target once it is set.
            while follower.cursor < *watched.borrow() {
                let record = lines.next().await.expect("the stream stays open");
                follower.apply(record);
            }
            follower
        }));
    }
    let mut writers = Vec::new();
    for writer in 0..8 {
        let (harness, key) = (harness.clone(), key.clone());
        writers.push(tokio::spawn(async move {
            for round in 0..30 {
                harness
                    .grant(&key, &format!("u{}", (writer * 30 + round) % 12), 1)
                    .await;
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    let head = harness
        .state
        .store()
        .last_change(&env(&tenant))
        .await
        .expect("head");
    target.send(head).expect("followers listen");
    for follower in followers {
        let follower = follower.await.expect("follower");
        assert_states_match(&harness, &tenant, &follower, 12).await;
    }
    }
}
