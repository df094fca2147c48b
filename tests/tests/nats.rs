//! A proxy following the feed over NATS JetStream when NATS goes away and comes back: it
//! follows the HTTP stream meanwhile and misses nothing, the control plane publishes what
//! NATS missed once it is back, and the proxy returns to NATS. The test runs a NATS server
//! of its own (Debian's `nats-server`, on a free port) so that it can stop it.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e::{ControlPlane, Proxy, ROUTES, Upstream, eventually, proxy_config};

/// `nats-server` on this machine, or `None` to skip (CI has it).
fn nats_server() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file());
    if found.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "CI must have nats-server installed"
        );
    }
    found
}

/// A NATS server with JetStream, killed when dropped.
struct NatsServer {
    child: Child,
}

impl NatsServer {
    async fn start(binary: &Path, port: u16, store: &Path) -> NatsServer {
        NatsServer::start_with(binary, port, store, None).await
    }

    /// The same, with a configuration file of its own (`max_payload`, say).
    async fn start_with(
        binary: &Path,
        port: u16,
        store: &Path,
        config: Option<&Path>,
    ) -> NatsServer {
        let mut command = Command::new(binary);
        if let Some(config) = config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let server = NatsServer { child };
        let url = format!("nats://127.0.0.1:{port}");
        eventually("NATS to answer", Duration::from_secs(20), || async {
            async_nats::connect(&url).await.ok().map(|_| ())
        })
        .await;
        server
    }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

/// A control plane in `dir` publishing its feed to the NATS server at `url`, and a ready
/// proxy following it there.
async fn publishing(dir: &Path, url: &str) -> (ControlPlane, Upstream, Proxy) {
    let plane = ControlPlane::start_publishing(dir, url).await;
    let upstream = Upstream::start().await;
    let config = proxy_config(
        &plane,
        upstream.address,
        &dir.join("proxy"),
        &format!("{ROUTES}\n[sync]\nnats_url = \"{url}\"\n"),
    );
    let proxy = Proxy::start(&config).await;
    proxy.ready().await;
    eventually(
        "the proxy to follow over NATS",
        Duration::from_secs(20),
        || async { proxy.running.replica.follows_over_nats().then_some(()) },
    )
    .await;
    (plane, upstream, proxy)
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_follows_http_while_nats_is_down_and_returns_to_it() {
    let Some(binary) = nats_server() else {
        return;
    };
    let port = free_port();
    let dir = tempfile::tempdir().expect("dir");
    let store = dir.path().join("jetstream");
    let url = format!("nats://127.0.0.1:{port}");
    let nats = NatsServer::start(&binary, port, &store).await;
    let (plane, _upstream, proxy) = publishing(dir.path(), &url).await;
    let over_nats = |expected: bool| {
        let proxy = &proxy;
        async move { (proxy.running.replica.follows_over_nats() == expected).then_some(()) }
    };
    plane.grant("before", 5).await;
    proxy.sees("before").await;

    // NATS goes away: the proxy follows the HTTP stream and misses nothing.
    drop(nats);
    plane.grant("while_down", 7).await;
    proxy.sees("while_down").await;
    eventually("the proxy to use HTTP", Duration::from_secs(30), || {
        over_nats(false)
    })
    .await;
    plane.grant("while_down", 1).await;

    // NATS is back (its stream kept on disk): the control plane publishes what it missed,
    // and the proxy follows over NATS again (it retries every 30 s).
    let _nats = NatsServer::start(&binary, port, &store).await;
    eventually(
        "the proxy to return to NATS",
        Duration::from_secs(60),
        || over_nats(true),
    )
    .await;
    plane.grant("after", 3).await;
    proxy.sees("after").await;
    let id = ledger::EndUserId::new("while_down").expect("id");
    eventually(
        "the proxy to hold the newest state",
        Duration::from_secs(10),
        || async {
            let state = proxy.running.replica.user(&id)?;
            let total: i64 = state
                .blocks()
                .iter()
                .map(|block| block.remaining.get())
                .sum();
            (total == 8).then_some(())
        },
    )
    .await;
    proxy.running.shutdown().await;
}

// A record larger than the NATS server's `max_payload` does not stall the feed: the
// control plane publishes a marker that sends followers to a new snapshot over HTTP,
// which carries it, and the proxy goes on following over NATS after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_nats_reaches_the_proxy_through_a_snapshot() {
    let Some(binary) = nats_server() else {
        return;
    };
    let port = free_port();
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("nats.conf");
    // 16 KiB: the publisher keeps 8 KiB for headers, so a state over 8 KiB is too large.
    std::fs::write(&config, "max_payload: 16384\n").expect("config");
    let url = format!("nats://127.0.0.1:{port}");
    let _nats =
        NatsServer::start_with(&binary, port, &dir.path().join("jetstream"), Some(&config)).await;
    let (plane, _upstream, proxy) = publishing(dir.path(), &url).await;
    // Each grant is a block of its own: 150 of them make a state of well over 8 KiB.
    for _ in 0..150 {
        plane.grant("large", 1).await;
    }
    plane.grant("small", 2).await;
    let large = ledger::EndUserId::new("large").expect("id");
    eventually(
        "the large state to reach the proxy",
        Duration::from_secs(30),
        || async {
            // Through the snapshot the marker asked for, not a fallback to HTTP (which
            // would also take the 10 s a silent feed needs to be noticed).
            assert!(
                proxy.running.replica.follows_over_nats(),
                "the proxy kept to NATS"
            );
            let state = proxy.running.replica.user(&large)?;
            (state.blocks().len() == 150).then_some(())
        },
    )
    .await;
    proxy.sees("small").await;
    eventually(
        "the proxy to follow over NATS again",
        Duration::from_secs(60),
        || async { proxy.running.replica.follows_over_nats().then_some(()) },
    )
    .await;
    proxy.running.shutdown().await;
}

// A feed position larger than a NATS message's body (512 KiB: here one usage batch of
// 1,000 end users, one position on SQLite) is published in parts: the proxy takes every
// end user's new state from them, and goes on following over NATS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_split_over_several_messages_reaches_the_proxy_whole() {
    let Some(binary) = nats_server() else {
        return;
    };
    let port = free_port();
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("nats://127.0.0.1:{port}");
    let _nats = NatsServer::start(&binary, port, &dir.path().join("jetstream")).await;
    let (plane, _upstream, proxy) = publishing(dir.path(), &url).await;
    // 1,000 end users with long ids (each record carries its id twice) and two blocks
    // each: their records together are well over 512 KiB.
    let ids: Vec<String> = (0..1000)
        .map(|n| format!("{n:04}-{}", "x".repeat(240)))
        .collect();
    for chunk in ids.chunks(25) {
        let mut grants = tokio::task::JoinSet::new();
        for id in chunk {
            for amount in [10, 20] {
                let (client, id) = (plane.client.clone(), id.clone());
                grants.spawn(async move {
                    client
                        .grant(&e2e::from(
                            serde_json::json!({"end_user_id": id, "amount": amount}),
                        ))
                        .await
                        .expect("grant");
                });
            }
        }
        while let Some(granted) = grants.join_next().await {
            granted.expect("a grant task");
        }
    }
    let remaining = |id: &str| {
        let id = ledger::EndUserId::new(id).expect("id");
        proxy.running.replica.user(&id).map(|state| {
            state
                .blocks()
                .iter()
                .map(|block| block.remaining.get())
                .sum::<i64>()
        })
    };
    eventually(
        "every end user at the proxy",
        Duration::from_secs(60),
        || async { ids.iter().all(|id| remaining(id) == Some(30)).then_some(()) },
    )
    .await;

    // One batch, one transaction, one feed position for all of them.
    let events: Vec<serde_json::Value> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            serde_json::json!({
                "end_user_id": id, "feature_key": "api_calls", "units": 1,
                "idempotency_key": format!("split-{n}"),
            })
        })
        .collect();
    plane
        .client
        .record_usage_batch(&e2e::from(serde_json::json!({ "events": events })))
        .await
        .expect("the batch");

    // Every end user's new state reaches the proxy, over NATS.
    eventually(
        "every end user's state after the batch at the proxy",
        Duration::from_secs(60),
        || async { ids.iter().all(|id| remaining(id) == Some(29)).then_some(()) },
    )
    .await;
    assert!(
        proxy.running.replica.follows_over_nats(),
        "the proxy kept to NATS"
    );
    // And that position was published in parts (what this test is about).
    let feed = plane.client.sync_nats().await.expect("the NATS feed");
    let nats = async_nats::connect(&url).await.expect("NATS");
    let mut stream = async_nats::jetstream::new(nats)
        .get_stream(&feed.stream)
        .await
        .expect("the stream");
    let state = stream.info().await.expect("info").state.clone();
    let mut parts = 0;
    for sequence in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(sequence).await.expect("a message");
        if message.headers.get(protocol::NATS_PART).is_some() {
            assert!(
                message.headers.get(protocol::NATS_PUBLICATION).is_some(),
                "a part names its publication"
            );
            parts += 1;
        }
    }
    assert!(parts >= 2, "the batch's position was split ({parts} parts)");
    proxy.running.shutdown().await;
}
