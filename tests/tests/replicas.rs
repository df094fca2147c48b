//! Control-plane replicas as the separate processes they are in production: two
//! `e2e-control-plane` processes on one PostgreSQL database (publishing the feed to NATS
//! too where `QS_TEST_NATS_URL` is set, and the proxies then following it there), a proxy
//! following each, the same workload driven through both.
//!
//! - the same idempotency key sent to both replicas at once is recorded once;
//! - each due job (reservations expiring) runs once, though both schedulers look;
//! - the feed repeats no position, and a follower of either replica ends with exactly
//!   the stored state (on NATS: each message names the one before it, so none is
//!   skipped);
//! - a proxy moved from one replica to the other mid-stream loses nothing;
//! - one replica SIGKILLed mid-load: the other carries on, and every usage event is
//!   recorded exactly once (a client retries a failed call on the other replica with the
//!   same key, as a load balancer would).
//!
//! Skipped without `QS_TEST_POSTGRES_URL` (CI sets it, and `QS_TEST_NATS_URL`).

// A scenario reads top to bottom as one story however long it is.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use e2e::{
    ControlPlaneProcess, Proxy, ROUTES, Upstream, charged_via, entries_of, eventually, from,
    proxy_config_for,
};
use protocol::SyncRecord;
use serde_json::json;

const CONTROL_PLANE: &str = env!("CARGO_BIN_EXE_e2e-control-plane");

/// `name` from the environment, or `None` to skip; under CI it must be set.
fn required(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => Some(value),
        _ => {
            assert!(std::env::var("CI").is_err(), "CI must set {name}");
            None
        }
    }
}

/// A fresh schema on the test's PostgreSQL server, dropped afterwards.
struct Schema {
    server: String,
    name: String,
    /// The server's URL with the schema as its search path.
    url: String,
}

impl Schema {
    async fn create(server: &str) -> Schema {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_nanos();
        let name = format!("qs_e2e_{}_{nanos}", std::process::id());
        let admin = sqlx::PgPool::connect(server)
            .await
            .expect("QS_TEST_POSTGRES_URL answers");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&admin)
            .await
            .expect("create schema");
        admin.close().await;
        let separator = if server.contains('?') { '&' } else { '?' };
        let url = format!("{server}{separator}options=-c%20search_path%3D{name}");
        Schema {
            server: server.to_owned(),
            name,
            url,
        }
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot block on itself.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                if let Ok(admin) = sqlx::PgPool::connect(&server).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS {name} CASCADE"
                    )))
                    .execute(&admin)
                    .await;
                    admin.close().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Creates a tenant with the control plane's own command; answers its sandbox key.
fn create_tenant(config: &Path, database: &str) -> String {
    let output = std::process::Command::new(CONTROL_PLANE)
        .env("QS_CONFIG", config)
        .env("QS_DATABASE_URL", database)
        .env("QS_LOG_LEVEL", "warn")
        .args(["tenant", "create", "--name", "e2e", "--print", "test-key"])
        .output()
        .expect("the control plane runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// A client that tries once: the test picks the replica of each retry itself.
fn client(url: &str, key: &str) -> client::Client {
    client::Client::new(url, key)
        .expect("client")
        .retry(client::Retry {
            attempts: 1,
            ..client::Retry::default()
        })
}

/// Records one unit of `api_calls` for `end_user` under `key`, through `first` and, while
/// that fails, through the others in turn (the same key each time), for up to a minute.
async fn record_once(
    clients: &[client::Client],
    first: usize,
    end_user: &str,
    key: &str,
) -> String {
    let usage: protocol::RecordUsage = from(json!({
        "end_user_id": end_user, "feature_key": "api_calls", "units": 1,
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut turn = first;
    loop {
        let client = &clients[turn % clients.len()];
        match client.with_key(key).record_usage(&usage).await {
            Ok(recorded) => return recorded.id,
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "usage {key} was never recorded: {error}"
                );
                // The other replica next, at once: a refused connection fails fast, and a
                // twin still in flight is waited for by the server itself.
                turn += 1;
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Every end user's version as a snapshot of `client`'s environment shows it.
async fn snapshot_versions(client: &client::Client) -> BTreeMap<String, u64> {
    let mut lines = client
        .clone()
        .sync_frames(true)
        .sync_snapshot()
        .await
        .expect("snapshot");
    let mut versions = BTreeMap::new();
    while let Some(record) = lines.next().await.expect("a record") {
        match record {
            SyncRecord::EndUser {
                end_user_id,
                version,
                ..
            } => {
                versions.insert(end_user_id, version);
            }
            SyncRecord::End { .. } => break,
            _ => {}
        }
    }
    versions
}

/// Waits until `proxy`'s replica holds every end user at the version `versions` gives.
async fn converged(proxy: &Proxy, versions: &BTreeMap<String, u64>, what: &str) {
    eventually(what, Duration::from_secs(30), || async {
        versions
            .iter()
            .all(|(id, version)| {
                let id = ledger::EndUserId::new(id).expect("id");
                proxy.running.replica.version(&id) == Some(*version)
            })
            .then_some(())
    })
    .await;
}

/// Follows `client`'s HTTP change stream from 0 to `head`: positions never repeat or go
/// back, and the newest version of every end user is what `versions` says.
async fn stream_matches(client: &client::Client, head: i64, versions: &BTreeMap<String, u64>) {
    let mut lines = client.sync_stream(0).await.expect("stream");
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut positions = BTreeSet::new();
    let mut cursor = 0;
    while cursor < head {
        let record = tokio::time::timeout(Duration::from_secs(10), lines.next())
            .await
            .expect("a record within 10 s")
            .expect("a record")
            .expect("the stream stays open");
        if let SyncRecord::EndUser {
            cursor: at,
            end_user_id,
            version,
            ..
        } = record
        {
            assert!(at >= cursor, "the stream went back: {at} after {cursor}");
            // Lines sharing a position carry the one before it, except the last.
            assert!(
                positions.insert((at, end_user_id.clone())),
                "{end_user_id} repeated at {at}"
            );
            cursor = at;
            let newest = seen.entry(end_user_id).or_default();
            *newest = (*newest).max(version);
        } else if let Some(at) = record.cursor() {
            assert!(at >= cursor, "the stream went back: {at} after {cursor}");
            cursor = at;
        }
    }
    assert_eq!(&seen, versions, "the stream ends at every end user's state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replica_processes_share_one_database_and_survive_a_sigkill() {
    let Some(postgres) = required("QS_TEST_POSTGRES_URL") else {
        return;
    };
    let nats = required("QS_TEST_NATS_URL");
    let dir = tempfile::tempdir().expect("dir");
    let schema = Schema::create(&postgres).await;
    let nats_section = nats
        .as_deref()
        .map(|url| format!("[sync]\nnats_url = \"{url}\"\n"))
        .unwrap_or_default();
    let config = dir.path().join("control-plane.toml");
    std::fs::write(
        &config,
        format!(
            "[rate_limit]\nrequests_per_second = 1000000\nburst = 1000000\n[jobs]\ninterval_ms = 50\n{nats_section}"
        ),
    )
    .expect("config");
    let key = create_tenant(&config, &schema.url);
    let mut first = ControlPlaneProcess::spawn(CONTROL_PLANE, &config, &schema.url);
    let second = ControlPlaneProcess::spawn(CONTROL_PLANE, &config, &schema.url);
    let one = client(&first.url, &key);
    let two = client(&second.url, &key);
    let both = [one.clone(), two.clone()];
    for feature in ["api_calls", "tokens"] {
        one.create_feature(&from(
            json!({"key": feature, "name": feature, "type": "metered"}),
        ))
        .await
        .expect("feature");
    }
    let users: Vec<String> = (0..8).map(|user| format!("user_{user}")).collect();
    for (index, user) in users.iter().enumerate() {
        both[index % 2]
            .grant(&from(json!({"end_user_id": user, "amount": 10_000})))
            .await
            .expect("grant");
    }

    // A proxy following each replica.
    let upstream = Upstream::start().await;
    let proxy_toml = |url: &str, data: &Path| {
        proxy_config_for(
            url,
            &key,
            upstream.address,
            data,
            &format!("{ROUTES}\n{nats_section}"),
        )
    };
    let (data_a, data_b) = (dir.path().join("proxy-a"), dir.path().join("proxy-b"));
    let proxy_a = Proxy::start(&proxy_toml(&first.url, &data_a)).await;
    let proxy_b = Proxy::start(&proxy_toml(&second.url, &data_b)).await;
    proxy_a.ready().await;
    proxy_b.ready().await;
    if nats.is_some() {
        eventually(
            "both proxies follow over NATS",
            Duration::from_secs(20),
            || async {
                (proxy_a.running.replica.follows_over_nats()
                    && proxy_b.running.replica.follows_over_nats())
                .then_some(())
            },
        )
        .await;
    }

    // The same idempotency key sent to both replicas at once is recorded once.
    for round in 0..40 {
        let user = &users[round % users.len()];
        let key = format!("twin-{round}");
        let (left, right) = tokio::join!(
            record_once(&both, 0, user, &key),
            record_once(&both, 1, user, &key)
        );
        assert_eq!(
            left, right,
            "both replicas answer the one recording of {key}"
        );
    }

    // Each due job runs once though both schedulers look: reservations made through
    // either replica expire, each releasing its hold once.
    let mut reservations = Vec::new();
    for round in 0..12 {
        let reserved = both[round % 2]
            .reserve(&from(json!({
                "end_user_id": users[round % users.len()], "feature_key": "api_calls",
                "amount": 5, "ttl_seconds": 60,
            })))
            .await
            .expect("reserve");
        reservations.push(reserved.id);
    }
    two.advance_test_clock(&from(json!({"seconds": 120})))
        .await
        .expect("advance");
    for id in &reservations {
        eventually(
            &format!("{id} to expire"),
            Duration::from_secs(20),
            || async {
                let status = one.get_reservation(id).await.expect("reservation").status;
                (status == "expired").then_some(())
            },
        )
        .await;
    }

    // Gated requests through both proxies on one end user: what they admit is charged.
    let mut admitted = 0i64;
    for round in 0..30 {
        for proxy in [&proxy_a, &proxy_b] {
            let answer = proxy
                .send(reqwest::Method::GET, "/work", Some("gated"), &[])
                .await;
            if answer.status().is_success() {
                admitted += 1;
            }
        }
        if round == 0 {
            // The end user appears once granted; the first requests may find it unknown.
            one.grant(&from(json!({"end_user_id": "gated", "amount": 1000})))
                .await
                .expect("grant");
            proxy_a.sees("gated").await;
            proxy_b.sees("gated").await;
        }
    }
    assert!(admitted > 0, "the proxies admit requests");

    // Proxy A moves from the first replica to the second mid-stream (its copy and cursor
    // kept on disk) while usage goes on through both.
    let writer = {
        let (both, users) = (both.clone(), users.clone());
        tokio::spawn(async move {
            for round in 0..60 {
                record_once(
                    &both,
                    round,
                    &users[round % users.len()],
                    &format!("moving-{round}"),
                )
                .await;
            }
        })
    };
    proxy_a.drained().await;
    proxy_a.running.shutdown().await;
    let proxy_a = Proxy::start(&proxy_toml(&second.url, &data_a)).await;
    writer.await.expect("writer");
    proxy_a.ready().await;
    proxy_b.drained().await;

    // One replica is SIGKILLed mid-load; every call it failed is retried on the other.
    let load = {
        let (both, users) = (both.clone(), users.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for round in 0..200 {
                let user = &users[round % users.len()];
                ids.push(record_once(&both, round, user, &format!("load-{round}")).await);
            }
            ids
        })
    };
    eventually(
        "the load to be under way",
        Duration::from_secs(30),
        || async {
            let recorded = entries_of(&two, &users[0], "debit").await.len();
            // 5 twins, about 8 moving and then some of the load for user_0.
            (recorded >= 20).then_some(())
        },
    )
    .await;
    first.kill();
    let ids = load.await.expect("the load");
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        200,
        "each event its own recording"
    );

    // Nothing lost or doubled: each key's one debit, through the replica still up.
    for (index, user) in users.iter().enumerate() {
        let debits = entries_of(&two, user, "debit").await;
        let expected = [40usize, 60, 200]
            .iter()
            .map(|count| {
                (0..*count)
                    .filter(|round| round % users.len() == index)
                    .count()
            })
            .sum::<usize>();
        assert_eq!(debits.len(), expected, "{user}'s usage, each event once");
    }
    proxy_a.drained().await;
    proxy_b.drained().await;
    assert_eq!(
        charged_via(&two, "gated").await,
        admitted,
        "what the proxies admitted is what was charged"
    );
    let mut expiries = 0;
    for user in &users {
        expiries += entries_of(&two, user, "expire").await.len();
    }
    assert_eq!(
        expiries,
        reservations.len(),
        "each reservation expired once"
    );

    // Both proxies (one moved mid-stream) hold exactly the stored state, and the feed
    // repeats no position.
    let versions = snapshot_versions(&two).await;
    converged(&proxy_a, &versions, "the moved proxy to converge").await;
    converged(&proxy_b, &versions, "the other proxy to converge").await;
    let head = {
        let mut lines = two.sync_snapshot().await.expect("snapshot");
        match lines.next().await.expect("a record") {
            Some(SyncRecord::Header { cursor, .. }) => cursor,
            other => panic!("a header first, not {other:?}"),
        }
    };
    stream_matches(&two, head, &versions).await;
    if let Some(url) = &nats {
        let connection = async_nats::connect(url).await.expect("NATS");
        let feed = two.sync_nats().await.expect("the NATS feed");
        let context = async_nats::jetstream::new(connection.clone());
        let mut stream = context.get_stream(&feed.stream).await.expect("stream");
        let held = stream.info().await.expect("info").state.clone();
        let mut previous_position = None;
        for sequence in held.first_sequence..=held.last_sequence {
            let message = stream.get_raw_message(sequence).await.expect("message");
            let number = |name: &str| -> i64 {
                message
                    .headers
                    .get(name)
                    .expect("header")
                    .as_str()
                    .parse()
                    .expect("a number")
            };
            let (position, previous) = (
                number(protocol::NATS_POSITION),
                number(protocol::NATS_PREVIOUS),
            );
            if let Some(before) = previous_position {
                assert_eq!(
                    previous, before,
                    "message {sequence} names the one before it"
                );
                assert!(position > before, "positions rise at {sequence}");
            }
            previous_position = Some(position);
        }
        assert_eq!(
            previous_position,
            Some(head),
            "everything committed was published"
        );
        let _ = context.delete_stream(&feed.stream).await;
    }
    proxy_a.running.shutdown().await;
    proxy_b.running.shutdown().await;
}
