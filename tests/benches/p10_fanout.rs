//! P10 (issue #21): the change feed's fan-out. N followers of one environment, a steady
//! rate of changes: the lag from a change's write to each follower, and the control
//! plane's CPU per change, over HTTP streams and over NATS JetStream side by side.
//!
//! Run: `cargo bench -p e2e --bench p10_fanout`. Knobs: `QS_FANOUT_FOLLOWERS` (counts
//! to run, default `10,1000`), `QS_FANOUT_TRANSPORTS` (default `http,nats`), `QS_FANOUT_RATE` (changes per second, default 1,000),
//! `QS_FANOUT_SECS` (default 30), `QS_FANOUT_NATS_URL` (default
//! `nats://127.0.0.1:4222`), `QS_FANOUT_LINGER_MS` (the control plane's
//! `sync.nats_linger_ms`, default 10).
//!
//! The control plane is a process of its own (the `e2e-control-plane` binary, SQLite file,
//! `sync.nats_url` set), so its CPU time is its own (`/proc/<pid>/stat`). The followers
//! are lightweight and in this process: each holds its own HTTP stream, or follows NATS
//! as a proxy does (`client::nats::NatsLines`: the live subject, catching up from the
//! stream on a gap; one NATS connection per 50 followers), takes the feed in binary
//! frames (`protocol::frames`, as proxies do) and reads each change's head (its end
//! user), not its state: the bench measures the transport, not the proxy's replica. Each
//! change is a grant to a new end user, so every change is one record. Two lags:
//! - from commit (the measure): from the time the control plane's operation ran
//!   at (the state's `advanced_to`, read on the same machine's clock in milliseconds, so
//!   at or before the commit: an upper bound, by at most a millisecond of rounding) until
//!   a follower holds the frame. Decoding each state costs what a proxy pays only for end
//!   users it holds, so a sample of at most 50 followers does it (every one up to 50,
//!   then every `⌈followers / 50⌉`-th), all others reading the head alone;
//! - from the grant's request being sent, on every follower: it adds the write's own
//!   latency before the commit (the API's queueing and transaction), shown on its own as
//!   "write p50 / p99".
//!
//! The writer runs on a thread and runtime of its own, so the followers' backlog delays
//! neither its sends nor its answers. Both sides share the machine's two cores, as do the
//! NATS server's.

#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use e2e::ControlPlaneProcess;
use e2e::bench::cpu_time;
use protocol::frames::{Frame, FrameReader};

/// The proxy's allocator (its binary sets the same), so the followers cost what a
/// proxy's follower does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONTROL_PLANE: &str = env!("CARGO_BIN_EXE_e2e-control-plane");
/// Lag histogram resolution and range: 0.1 ms buckets up to 20 s.
const BUCKET_US: u64 = 100;
const BUCKETS: usize = 200_000;
/// Followers per NATS connection.
const PER_CONNECTION: usize = 50;

fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Followers that decode each state for its commit time, at most.
const SAMPLED: usize = 50;

/// What every follower shares: when each change was sent (µs since `start`, 0: not yet)
/// and the lag histograms.
struct Shared {
    start: Instant,
    sent_us: Vec<AtomicU64>,
    lags: Histogram,
    /// From each change's commit (its state's `advanced_to`), on the sampled followers.
    commit_lags: Histogram,
    /// Each grant's own latency, from its send to its answer.
    writes: Histogram,
    received: AtomicU64,
    /// Catch-ups from the stream the NATS followers made (live messages they lost).
    catch_ups: AtomicU64,
}

impl Shared {
    fn new(changes: usize) -> Shared {
        Shared {
            start: Instant::now(),
            sent_us: (0..changes).map(|_| AtomicU64::new(0)).collect(),
            lags: Histogram::new(),
            commit_lags: Histogram::new(),
            writes: Histogram::new(),
            received: AtomicU64::new(0),
            catch_ups: AtomicU64::new(0),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Takes the frames `bytes` completes (an HTTP stream's chunk).
    fn seen_chunk(&self, reader: &mut FrameReader, bytes: &[u8], sampled: bool) {
        reader.push(bytes);
        while let Some(frame) = reader.next_frame().expect("a frame") {
            self.seen(&frame, sampled);
        }
    }

    /// Records the lag of an end user's frame (`c<n>`) from its send, read from its
    /// head: the state stays undecoded, as a proxy holding that version leaves it. A
    /// sampled follower decodes the state too, for the lag from its commit.
    fn seen(&self, frame: &Frame, sampled: bool) {
        let now = self.now_us();
        let Frame::EndUser(frame) = frame else {
            return;
        };
        let Some(index) = frame
            .end_user_id
            .strip_prefix('c')
            .and_then(|digits| digits.parse::<usize>().ok())
        else {
            return;
        };
        let Some(sent) = self
            .sent_us
            .get(index)
            .map(|sent| sent.load(Ordering::Acquire))
        else {
            return;
        };
        if sent == 0 {
            return;
        }
        self.lags.record(now.saturating_sub(sent));
        self.received.fetch_add(1, Ordering::Relaxed);
        if sampled {
            let committed_ms = frame.parts().expect("a state").advanced_to.as_millis();
            let wall_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_micros();
            let committed_us = u128::try_from(committed_ms).expect("after 1970") * 1000;
            self.commit_lags
                .record(u64::try_from(wall_us.saturating_sub(committed_us)).unwrap_or(u64::MAX));
        }
    }
}

/// Counts of durations in `BUCKET_US` buckets up to `BUCKETS` of them.
struct Histogram(Vec<AtomicU64>);

impl Histogram {
    fn new() -> Histogram {
        Histogram((0..BUCKETS).map(|_| AtomicU64::new(0)).collect())
    }

    fn record(&self, us: u64) {
        let bucket = usize::try_from(us / BUCKET_US)
            .unwrap_or(BUCKETS - 1)
            .min(BUCKETS - 1);
        self.0[bucket].fetch_add(1, Ordering::Relaxed);
    }

    fn percentile_ms(&self, fraction: f64) -> f64 {
        let counts: Vec<u64> = self
            .0
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        #[allow(
            clippy::as_conversions,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let rank = ((total as f64) * fraction).ceil() as u64;
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank.max(1) {
                #[allow(clippy::as_conversions, clippy::cast_precision_loss)]
                return (bucket as f64 + 1.0) * (BUCKET_US as f64) / 1000.0;
            }
        }
        f64::NAN
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Http,
    Nats,
}

struct Setup {
    plane: ControlPlaneProcess,
    key: String,
    nats_url: String,
    http: reqwest::Client,
}

fn main() {
    let counts: Vec<usize> = std::env::var("QS_FANOUT_FOLLOWERS")
        .unwrap_or_else(|_| "10,1000".into())
        .split(',')
        .filter_map(|count| count.trim().parse().ok())
        .collect();
    let rate: u64 = knob("QS_FANOUT_RATE", 1000);
    let secs: u64 = knob("QS_FANOUT_SECS", 30);
    let nats_url: String = knob("QS_FANOUT_NATS_URL", "nats://127.0.0.1:4222".to_owned());
    let linger_ms: u64 = knob("QS_FANOUT_LINGER_MS", 10);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("dir");
        let config = dir.path().join("control-plane.toml");
        std::fs::write(
            &config,
            format!(
                "[rate_limit]\nrequests_per_second = 1000000\nburst = 1000000\n[database]\nsynchronous = \"normal\"\n[sync]\nstreams_per_key = 100000\nnats_url = \"{nats_url}\"\nnats_linger_ms = {linger_ms}\n"
            ),
        )
        .expect("config");
        let database = format!("sqlite://{}", dir.path().join("cp.db").display());
        let output = std::process::Command::new(CONTROL_PLANE)
            .env("QS_CONFIG", &config)
            .env("QS_DATABASE_URL", &database)
            .env("QS_LOG_LEVEL", "warn")
            .args(["tenant", "create", "--name", "bench", "--print", "test-key"])
            .output()
            .expect("tenant");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let key = String::from_utf8(output.stdout).expect("utf-8").trim().to_owned();
        let plane = ControlPlaneProcess::spawn(CONTROL_PLANE, &config, &database);
        // As the proxy's binary does (and after the control plane started, which keeps
        // its own setting): without it, mimalloc's arenas fault in and zero 2 MiB pages
        // under this churn, an eighth of the followers' time.
        proxy::cli::no_huge_pages();
        let setup = Setup {
            plane,
            key,
            nats_url,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(4096)
                .build()
                .expect("http"),
        };
        println!(
            "P10 fan-out: {rate} changes/s for {secs} s; followers {counts:?}; lag from commit (sampled followers) and from the write's send (all); NATS linger {linger_ms} ms"
        );
        println!(
            "| followers | transport | changes | delivered | from commit p50 / p99 | from send p50 | from send p99 | from send max≈ | write p50 / p99 | control-plane CPU per change | NATS server CPU | followers' CPU | catch-ups | feed messages a second |"
        );
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let transports: Vec<Transport> = std::env::var("QS_FANOUT_TRANSPORTS")
            .unwrap_or_else(|_| "http,nats".into())
            .split(',')
            .filter_map(|name| match name.trim() {
                "http" => Some(Transport::Http),
                "nats" => Some(Transport::Nats),
                _ => None,
            })
            .collect();
        let mut offset = 0usize;
        for &followers in &counts {
            for &transport in &transports {
                let changes = usize::try_from(rate * secs).expect("changes");
                run(&setup, transport, followers, rate, changes, offset).await;
                offset += changes;
            }
        }
    });
}

/// Whether follower `index` of `followers` decodes states for the lag from commit (at
/// most `SAMPLED` of them).
fn is_sampled(index: usize, followers: usize) -> bool {
    index.is_multiple_of(followers.div_ceil(SAMPLED).max(1))
}

/// Waits (up to a minute) until the control plane is idle: an earlier run's followers
/// may have left it work (streams to end) that must not be counted in this one.
async fn settle(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let before = cpu_time(pid);
        tokio::time::sleep(Duration::from_millis(500)).await;
        if cpu_time(pid).saturating_sub(before) <= Duration::from_millis(20) {
            return;
        }
    }
}

/// One measured run; `offset` numbers this run's end users after the earlier runs'.
async fn run(
    setup: &Setup,
    transport: Transport,
    followers: usize,
    rate: u64,
    changes: usize,
    offset: usize,
) {
    settle(setup.plane_pid()).await;
    let shared = Arc::new(Shared::new(offset + changes));
    let client = client::Client::new(&setup.plane.url, &setup.key).expect("client");
    // Every follower starts at the feed's head.
    let head = {
        let mut lines = client.sync_snapshot().await.expect("snapshot");
        match lines.next().await.expect("header") {
            Some(protocol::SyncRecord::Header { cursor, .. }) => cursor,
            other => panic!("a header first, not {other:?}"),
        }
    };
    // The NATS feed's stream, whose messages published over the run are counted.
    let stream = match transport {
        Transport::Http => None,
        Transport::Nats => {
            let feed = client.sync_nats().await.expect("the NATS feed");
            let nats = async_nats::connect(&setup.nats_url).await.expect("NATS");
            Some(
                async_nats::jetstream::new(nats)
                    .get_stream(&feed.stream)
                    .await
                    .expect("the feed's stream"),
            )
        }
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let ready = Arc::new(AtomicU64::new(0));
    match transport {
        Transport::Http => {
            for index in 0..followers {
                let sampled = is_sampled(index, followers);
                let (shared, http, ready, mut stopped) = (
                    shared.clone(),
                    setup.http.clone(),
                    ready.clone(),
                    stopped.clone(),
                );
                let url = format!("{}/v1/sync/stream?cursor={head}", setup.plane.url);
                let key = setup.key.clone();
                tasks.push(tokio::spawn(async move {
                    let mut response = http
                        .get(url)
                        .bearer_auth(key)
                        .header("accept", protocol::frames::FEED_FRAMES)
                        .send()
                        .await
                        .expect("stream");
                    assert!(response.status().is_success(), "{}", response.status());
                    ready.fetch_add(1, Ordering::Relaxed);
                    let mut reader = FrameReader::new();
                    loop {
                        tokio::select! {
                            chunk = response.chunk() => match chunk.expect("chunk") {
                                Some(bytes) => shared.seen_chunk(&mut reader, &bytes, sampled),
                                None => return,
                            },
                            _ = stopped.changed() => return,
                        }
                    }
                }));
            }
        }
        Transport::Nats => {
            let feed = client.sync_nats().await.expect("the NATS feed");
            let mut connection = None;
            for index in 0..followers {
                if index % PER_CONNECTION == 0 {
                    connection = Some(async_nats::connect(&setup.nats_url).await.expect("NATS"));
                }
                let nats = connection.clone().expect("connection");
                let sampled = is_sampled(index, followers);
                let (shared, ready, mut stopped, feed) =
                    (shared.clone(), ready.clone(), stopped.clone(), feed.clone());
                tasks.push(tokio::spawn(async move {
                    let mut lines = client::nats::NatsLines::open(&nats, &feed, head)
                        .await
                        .expect("the NATS feed opens");
                    ready.fetch_add(1, Ordering::Relaxed);
                    loop {
                        tokio::select! {
                            frame = lines.next() => match frame {
                                Ok(frame) => shared.seen(&frame, sampled),
                                Err(error) => {
                                    eprintln!("follower: {error}");
                                    return;
                                }
                            },
                            _ = stopped.changed() => {
                                shared.catch_ups.fetch_add(lines.catch_ups(), Ordering::Relaxed);
                                return;
                            }
                        }
                    }
                }));
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready.load(Ordering::Relaxed) < u64::try_from(followers).expect("count") {
        assert!(
            Instant::now() < deadline,
            "followers did not connect in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The writer: `rate` grants a second, paced in 10 ms ticks, each to a new end user.
    let sequence_before = last_sequence(stream.as_ref()).await;
    let cpu_before = cpu_time(setup.plane_pid());
    let nats_pid = nats_server_pid();
    let nats_before = nats_pid.map(cpu_time).unwrap_or_default();
    let own_before = cpu_time(std::process::id());
    let writer = {
        let (url, key, shared) = (setup.plane.url.clone(), setup.key.clone(), shared.clone());
        std::thread::spawn(move || write(&url, &key, &shared, rate, changes, offset))
    };
    let wrote_in = tokio::task::spawn_blocking(move || writer.join().expect("the writer"))
        .await
        .expect("the writer");
    // Delivered: every follower holds every change (or 20 s pass).
    let expected = u64::try_from(changes * followers).expect("expected");
    let deadline = Instant::now() + Duration::from_secs(20);
    while shared.received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if std::env::var("QS_FANOUT_DEBUG").is_ok() {
        eprintln!(
            "received {} of {expected}",
            shared.received.load(Ordering::Relaxed)
        );
    }
    let cpu = cpu_time(setup.plane_pid()).saturating_sub(cpu_before);
    let nats_cpu = nats_pid
        .map(cpu_time)
        .unwrap_or_default()
        .saturating_sub(nats_before);
    let own_cpu = cpu_time(std::process::id()).saturating_sub(own_before);
    let published = last_sequence(stream.as_ref())
        .await
        .saturating_sub(sequence_before);
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }
    let received = shared.received.load(Ordering::Relaxed);
    #[allow(clippy::as_conversions, clippy::cast_precision_loss)]
    let cpu_per_change_us = cpu.as_secs_f64() * 1e6 / changes as f64;
    println!(
        "| {followers} | {} | {changes} in {:.1} s | {:.1} % | {:.1} / {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} / {:.1} ms | {cpu_per_change_us:.0} µs | {:.1} s | {:.1} s | {} | {} |",
        match transport {
            Transport::Http => "HTTP streams",
            Transport::Nats => "NATS JetStream",
        },
        wrote_in.as_secs_f64(),
        {
            #[allow(clippy::as_conversions, clippy::cast_precision_loss)]
            let share = received as f64 * 100.0 / expected as f64;
            share
        },
        shared.commit_lags.percentile_ms(0.50),
        shared.commit_lags.percentile_ms(0.99),
        shared.lags.percentile_ms(0.50),
        shared.lags.percentile_ms(0.99),
        shared.lags.percentile_ms(1.0),
        shared.writes.percentile_ms(0.50),
        shared.writes.percentile_ms(0.99),
        nats_cpu.as_secs_f64(),
        own_cpu.as_secs_f64(),
        match transport {
            Transport::Http => "–".to_owned(),
            Transport::Nats => shared.catch_ups.load(Ordering::Relaxed).to_string(),
        },
        match transport {
            Transport::Http => "–".to_owned(),
            Transport::Nats => {
                #[allow(clippy::as_conversions, clippy::cast_precision_loss)]
                let per_second = published as f64 / wrote_in.as_secs_f64();
                format!("{per_second:.0}")
            }
        },
    );
}

/// The stream's last sequence (0 without a stream): the messages published to it so far.
async fn last_sequence(stream: Option<&async_nats::jetstream::stream::Stream>) -> u64 {
    match stream {
        Some(stream) => {
            let mut stream = stream.clone();
            stream
                .info()
                .await
                .expect("stream info")
                .state
                .last_sequence
        }
        None => 0,
    }
}

/// The writer: `rate` grants a second, paced in 10 ms ticks, each to a new end user; how
/// long they took. On a runtime of its own, as the API's clients are not on the
/// followers' machine: on theirs, a grant's send and its answer would wait behind the
/// followers' work, and the lag measured from the send with them.
fn write(
    url: &str,
    key: &str,
    shared: &Arc<Shared>,
    rate: u64,
    changes: usize,
    offset: usize,
) -> Duration {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the writer's runtime");
    runtime.block_on(async move {
        let client = client::Client::new(url, key).expect("client");
        let started = Instant::now();
        let per_tick = usize::try_from(rate / 100).expect("rate").max(1);
        let mut ticker = tokio::time::interval(Duration::from_millis(10));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut writes = tokio::task::JoinSet::new();
        let mut sent = 0usize;
        while sent < changes {
            ticker.tick().await;
            for _ in 0..per_tick.min(changes - sent) {
                let index = offset + sent;
                let (client, shared) = (client.clone(), shared.clone());
                writes.spawn(async move {
                    let sent = shared.now_us().max(1);
                    shared.sent_us[index].store(sent, Ordering::Release);
                    client
                        .grant(&e2e::from(serde_json::json!({
                            "end_user_id": format!("c{index}"), "amount": 1,
                        })))
                        .await
                        .expect("grant");
                    shared.writes.record(shared.now_us().saturating_sub(sent));
                });
                sent += 1;
            }
            while writes.try_join_next().is_some() {}
        }
        while writes.join_next().await.is_some() {}
        started.elapsed()
    })
}

/// The NATS server's process id, where it runs on this machine.
fn nats_server_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (name.trim() == "nats-server").then_some(pid)
        })
}

impl Setup {
    fn plane_pid(&self) -> u32 {
        self.plane.id()
    }
}
