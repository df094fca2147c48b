//! P9 (DESIGN.md, SPEC 12.1): N proxies gating by balance, N = 1, 2, 4, 8, closed-loop
//! load on all of them, with leases and, in the same run, the same proxies without.
//!
//! For each N and each mode (leases on, leases off) a fresh set of proxy processes runs
//! four phases:
//! - **one end user, exact**: one end user with `QS_P9_BALANCE` credits (default 2,000),
//!   every connection sending until every proxy has refused it twice since the last
//!   admission; then the proxies stop (releasing their leases) and the ledger is read:
//!   over-admission (debt, admitted past the balance), charged against admitted, false
//!   denials (402s after which that end user was admitted again: credits were left
//!   somewhere), credits never spent.
//! - **one end user, throughput**: an end user with a balance that does not run out,
//!   closed-loop for `QS_BENCH_SECS` (default 5): gated requests per second, refill waits
//!   (share of lease spends that waited, p99 wait from the proxies' histograms), lease
//!   round trips per second, credits parked in leases (mean of the proxies' gauges).
//! - **1,000 end users, exact** and **1,000 end users, throughput**: the same over 1,000
//!   end users (10 credits each in the exact phase), each request to a random end user
//!   through a random proxy.
//!
//! Run: `scripts/bench-leases` (installs cmake if missing, then
//! `cargo bench -p e2e --bench p9_leases`). Knobs: `QS_P9_PROXIES` (default `1,2,4,8`),
//! `QS_P9_CONNECTIONS` (closed-loop connections in all, spread over the proxies, default
//! 32), `QS_P9_BALANCE`, `QS_BENCH_SECS`, `QS_P9_LEASE_CONFIG` (more `[leases]` settings
//! for the proxies, `;`-separated TOML lines: `ttl_secs = 60; min_credits = 20`). The control plane (SQLite) runs in this process
//! on a runtime and threads of its own; the upstream and every proxy are processes of
//! their own; all share the machine's cores, which is why the throughput goal is a ratio
//! measured in one run.

// A bench prints its report; a setup failure panics; a scenario reads top to bottom.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines
)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::bench::Picker;
use e2e::{ControlPlane, ProxyProcess, eventually, proxy_config_for};
use reqwest::StatusCode;

const USERS: usize = 1_000;
const USER_BALANCE: i64 = 10;
const ENDLESS: i64 = 1_000_000_000_000;
/// How long a client of the exact phase pauses after a 402 or 503 before its next call.
const REFUSED_BACKOFF: Duration = Duration::from_millis(5);
/// Load before the throughput measurement starts (first leases, connections).
const WARM_UP_SECS: u64 = 1;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn ratio(part: u64, whole: u64) -> f64 {
    let whole = f64::from(u32::try_from(whole.max(1)).unwrap_or(u32::MAX));
    f64::from(u32::try_from(part).unwrap_or(u32::MAX)) / whole
}

/// One scrape of a proxy's `/metrics`: each sample by its full name with labels.
type Samples = HashMap<String, f64>;

async fn scrape(http: &reqwest::Client, admin: &str) -> Samples {
    let text = http
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The summed difference `after - before` over several proxies.
fn delta(before: &[Samples], after: &[Samples]) -> Samples {
    let mut total = Samples::new();
    for (before, after) in before.iter().zip(after) {
        for (name, value) in after {
            let old = before.get(name).copied().unwrap_or(0.0);
            *total.entry(name.clone()).or_default() += value - old;
        }
    }
    total
}

fn count(samples: &Samples, name: &str) -> u64 {
    let value = samples.get(name).copied().unwrap_or(0.0).max(0.0).round();
    format!("{value:.0}").parse().unwrap_or(0)
}

/// The `q` quantile of a Prometheus histogram in `samples`, interpolated within its
/// bucket as `histogram_quantile` does; `None` without observations.
fn quantile(samples: &Samples, histogram: &str, q: f64) -> Option<f64> {
    let prefix = format!("{histogram}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|(name, value)| {
            let bound = name.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().ok()?
            };
            Some((bound, *value))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (bound, cumulative) in buckets {
        if cumulative >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let share = (rank - lower.1) / (cumulative - lower.1).max(f64::MIN_POSITIVE);
            return Some(lower.0 + (bound - lower.0) * share);
        }
        lower = (bound, cumulative);
    }
    None
}

/// The end users of a phase and how a request picks one.
#[derive(Clone)]
struct Crowd {
    names: Arc<Vec<String>>,
}

impl Crowd {
    fn new(prefix: &str, size: usize) -> Crowd {
        Crowd {
            names: Arc::new((0..size).map(|index| format!("{prefix}-{index}")).collect()),
        }
    }
}

/// Per end user during an exact phase: admissions, refusals since the last admission by
/// proxy, and refusals later followed by an admission (false denials).
#[derive(Default, Clone)]
struct Tally {
    admitted: u64,
    refused_since: Vec<u8>,
    refusals_pending: u64,
    false_denials: u64,
    unavailable: u64,
    retired: bool,
}

#[derive(Default)]
struct Exact {
    balance: i64,
    admitted: u64,
    false_denials: u64,
    unavailable: u64,
    charged: i64,
    debt: i64,
    unspent: i64,
}

/// Sends until every end user has been refused twice by every proxy since its last
/// admission, then stops the proxies (their leases go back) and reads the ledger.
async fn exact(
    plane: &Plane,
    running: &mut [ProxyProcess],
    crowd: &Crowd,
    balance_each: i64,
    connections: usize,
) -> Exact {
    let proxies = running.len();
    let tallies = Arc::new(Mutex::new(vec![
        Tally {
            refused_since: vec![0; proxies],
            ..Tally::default()
        };
        crowd.names.len()
    ]));
    let left = Arc::new(AtomicU64::new(
        u64::try_from(crowd.names.len()).unwrap_or(u64::MAX),
    ));
    let addresses: Arc<Vec<String>> =
        Arc::new(running.iter().map(|proxy| proxy.address.clone()).collect());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let mut workers = Vec::new();
    for worker in 0..connections {
        let (http, tallies, left, addresses, crowd) = (
            http.clone(),
            tallies.clone(),
            left.clone(),
            addresses.clone(),
            crowd.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut picker = Picker::new(0x9e37_79b9 + u64::try_from(worker).unwrap_or(0));
            while left.load(Ordering::Acquire) > 0 {
                // A random end user still in play; with one end user, that one.
                let user = {
                    let tallies = tallies.lock().expect("tallies");
                    let mut user = picker.below(crowd.names.len());
                    let mut tries = 0;
                    while tallies[user].retired && tries < crowd.names.len() {
                        user = (user + 1) % crowd.names.len();
                        tries += 1;
                    }
                    if tallies[user].retired {
                        break;
                    }
                    user
                };
                // With one end user, connections stay on their proxy; with many, each
                // request goes to a random one.
                let proxy = if crowd.names.len() == 1 {
                    worker % addresses.len()
                } else {
                    picker.below(addresses.len())
                };
                let response = http
                    .post(format!("{}/work", addresses[proxy]))
                    .header("x-end-user-id", &crowd.names[user])
                    .send()
                    .await
                    .expect("the proxy answers");
                let status = response.status();
                let admitted = status == StatusCode::OK && response.bytes().await.is_ok();
                let refused = {
                    let mut tallies = tallies.lock().expect("tallies");
                    let tally = &mut tallies[user];
                    if admitted {
                        tally.admitted += 1;
                        tally.false_denials += tally.refusals_pending;
                        tally.refusals_pending = 0;
                        tally.refused_since.iter_mut().for_each(|seen| *seen = 0);
                        false
                    } else if status == StatusCode::PAYMENT_REQUIRED {
                        tally.refusals_pending += 1;
                        tally.refused_since[proxy] = tally.refused_since[proxy].saturating_add(1);
                        if !tally.retired && tally.refused_since.iter().all(|seen| *seen >= 2) {
                            tally.retired = true;
                            left.fetch_sub(1, Ordering::AcqRel);
                        }
                        true
                    } else if status == StatusCode::SERVICE_UNAVAILABLE {
                        // `lease_pending`: the control plane was slower than `wait_ms`;
                        // the answer says to retry.
                        tally.unavailable += 1;
                        true
                    } else {
                        panic!("unexpected answer {status}");
                    }
                };
                if refused {
                    // The client's back-off after a refusal (part of the workload, as a
                    // real client's; not a wait for any condition): without it, the
                    // connections of one end user spin on 402s while another proxy
                    // hands its last credits back.
                    tokio::time::sleep(REFUSED_BACKOFF).await;
                }
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    for proxy in running.iter_mut() {
        proxy.drained(&http).await;
        proxy.terminate();
    }
    let tallies = tallies.lock().expect("tallies").clone();
    let mut result = Exact {
        balance: balance_each
            .checked_mul(i64::try_from(crowd.names.len()).unwrap_or(i64::MAX))
            .unwrap_or(i64::MAX),
        ..Exact::default()
    };
    for (name, tally) in crowd.names.iter().zip(&tallies) {
        result.admitted += tally.admitted;
        result.false_denials += tally.false_denials;
        result.unavailable += tally.unavailable;
        let shown = plane.client.balance(name, None).await.expect("balance");
        assert_eq!(shown.held, 0, "{name}: leases all released at shutdown");
        let charged = balance_each - shown.available + shown.debt;
        result.charged += charged;
        result.debt += shown.debt;
        result.unspent += shown.available;
    }
    result
}

#[derive(Default)]
struct Throughput {
    per_second: f64,
    spends: u64,
    waits: u64,
    /// Of `waits`: the lease was there but short (the rest had none yet).
    waits_short: u64,
    wait_timeouts: u64,
    wait_p99_ms: Option<f64>,
    lease_calls_per_second: f64,
    batches_per_second: f64,
    batch_p50_ms: Option<f64>,
    batch_p99_ms: Option<f64>,
    parked_mean: f64,
    /// Answers other than 200, by status and problem code (in all, and during the
    /// warm-up).
    failed: HashMap<String, u64>,
    warm_failed: HashMap<String, u64>,
    /// Latency of each proxy's first request for each end user (its first lease).
    cold_p50_ms: f64,
    cold_p99_ms: f64,
}

fn ms(micros: u64) -> f64 {
    f64::from(u32::try_from(micros).unwrap_or(u32::MAX)) / 1_000.0
}

async fn throughput(
    running: &[ProxyProcess],
    crowd: &Crowd,
    connections: usize,
    secs: u64,
) -> Throughput {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let addresses: Arc<Vec<String>> =
        Arc::new(running.iter().map(|proxy| proxy.address.clone()).collect());
    let admins: Vec<String> = running.iter().map(|proxy| proxy.admin.clone()).collect();
    // Every proxy serves every end user once first (its first lease for each: a cold
    // start, timed here), so the measurement below sees the steady state.
    let cold = {
        let pairs: Vec<(usize, usize)> = (0..crowd.names.len())
            .flat_map(|user| (0..addresses.len()).map(move |proxy| (user, proxy)))
            .collect();
        let next = Arc::new(AtomicU64::new(0));
        let pairs = Arc::new(pairs);
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (http, next, pairs, addresses, crowd) = (
                http.clone(),
                next.clone(),
                pairs.clone(),
                addresses.clone(),
                crowd.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut micros = Vec::new();
                loop {
                    let index =
                        usize::try_from(next.fetch_add(1, Ordering::AcqRel)).unwrap_or(usize::MAX);
                    let Some(&(user, proxy)) = pairs.get(index) else {
                        return micros;
                    };
                    let sent = Instant::now();
                    let response = http
                        .post(format!("{}/work", addresses[proxy]))
                        .header("x-end-user-id", &crowd.names[user])
                        .send()
                        .await
                        .expect("the proxy answers");
                    let ok = response.status() == StatusCode::OK;
                    let _ = response.bytes().await;
                    if ok {
                        micros.push(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
                    }
                }
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.expect("warm-up"));
        }
        all.sort_unstable();
        (
            e2e::bench::percentile(&all, 0.5),
            e2e::bench::percentile(&all, 0.99),
        )
    };
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..connections {
        let (http, done, failed, stop, addresses, crowd) = (
            http.clone(),
            done.clone(),
            failed.clone(),
            stop.clone(),
            addresses.clone(),
            crowd.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut picker = Picker::new(0x51f1_5eed + u64::try_from(worker).unwrap_or(0));
            while !stop.load(Ordering::Acquire) {
                let user = picker.below(crowd.names.len());
                let proxy = if crowd.names.len() == 1 {
                    worker % addresses.len()
                } else {
                    picker.below(addresses.len())
                };
                let response = http
                    .post(format!("{}/work", addresses[proxy]))
                    .header("x-end-user-id", &crowd.names[user])
                    .send()
                    .await
                    .expect("the proxy answers");
                let status = response.status();
                let body = response.bytes().await;
                if status == StatusCode::OK && body.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    // An endless balance is never refused: anything else is counted and
                    // reported, with its problem code.
                    let code = body
                        .ok()
                        .and_then(|body| serde_json::from_slice::<serde_json::Value>(&body).ok())
                        .and_then(|problem| problem["code"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    *failed
                        .lock()
                        .expect("failed")
                        .entry(format!("{} {code}", status.as_u16()))
                        .or_default() += 1;
                }
            }
        }));
    }
    // A warm-up (each proxy takes its first leases), then the measurement.
    tokio::time::sleep(Duration::from_secs(WARM_UP_SECS)).await;
    let warm_done = done.load(Ordering::Relaxed);
    let warm_failed = failed.lock().expect("failed").clone();
    let started = Instant::now();
    let mut before = Vec::new();
    for admin in &admins {
        before.push(scrape(&http, admin).await);
    }
    // Credits parked in leases, sampled from the proxies' gauges while the load runs.
    let mut parked = Vec::new();
    let until = started + Duration::from_secs(secs);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut sum = 0.0;
        for admin in &admins {
            sum += scrape(&http, admin)
                .await
                .get("qs_proxy_lease_credits_parked")
                .copied()
                .unwrap_or(0.0);
        }
        parked.push(sum);
    }
    stop.store(true, Ordering::Release);
    for worker in workers {
        worker.await.expect("worker");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut after = Vec::new();
    for admin in &admins {
        after.push(scrape(&http, admin).await);
    }
    let changed = delta(&before, &after);
    let calls: u64 = ["create", "report", "release"]
        .iter()
        .map(|call| {
            count(
                &changed,
                &format!("qs_proxy_lease_calls_total{{call=\"{call}\"}}"),
            )
        })
        .sum();
    let samples = u32::try_from(parked.len().max(1)).unwrap_or(u32::MAX);
    Throughput {
        per_second: f64::from(
            u32::try_from(done.load(Ordering::Relaxed).saturating_sub(warm_done))
                .unwrap_or(u32::MAX),
        ) / elapsed,
        spends: count(&changed, "qs_proxy_lease_spend_total"),
        waits: count(&changed, "qs_proxy_lease_waits_total{reason=\"no_lease\"}")
            + count(&changed, "qs_proxy_lease_waits_total{reason=\"short\"}"),
        waits_short: count(&changed, "qs_proxy_lease_waits_total{reason=\"short\"}"),
        wait_timeouts: count(&changed, "qs_proxy_lease_wait_timeouts_total"),
        wait_p99_ms: quantile(&changed, "qs_proxy_lease_wait_seconds", 0.99)
            .map(|seconds| seconds * 1_000.0),
        lease_calls_per_second: f64::from(u32::try_from(calls).unwrap_or(u32::MAX)) / elapsed,
        batches_per_second: f64::from(
            u32::try_from(count(&changed, "qs_proxy_lease_batches_total")).unwrap_or(u32::MAX),
        ) / elapsed,
        batch_p50_ms: quantile(&changed, "qs_proxy_lease_batch_seconds", 0.5)
            .map(|seconds| seconds * 1_000.0),
        batch_p99_ms: quantile(&changed, "qs_proxy_lease_batch_seconds", 0.99)
            .map(|seconds| seconds * 1_000.0),
        parked_mean: parked.iter().sum::<f64>() / f64::from(samples),
        failed: std::mem::take(&mut *failed.lock().expect("failed")),
        warm_failed,
        cold_p50_ms: ms(cold.0),
        cold_p99_ms: ms(cold.1),
    }
}

/// The control plane, serving from a runtime of its own on its own threads: in the
/// benchmark's runtime, its handlers would queue behind the load generator's tasks, and
/// lease round trips would measure that queue.
struct Plane {
    url: String,
    key: String,
    client: client::Client,
    _stop: std::sync::mpsc::Sender<()>,
}

fn start_plane(dir: &Path) -> Plane {
    let dir = dir.to_owned();
    let (started, ready) = std::sync::mpsc::channel();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("control-plane runtime");
        let plane = runtime.block_on(ControlPlane::start(&dir));
        started
            .send((plane.url.clone(), plane.key.clone()))
            .expect("the benchmark waits");
        // Serves until the benchmark ends (the sender drops).
        let _ = stopped.recv();
        drop(plane);
    });
    let (url, key) = ready.recv().expect("the control plane starts");
    let client = client::Client::new(&url, &key).expect("client");
    Plane {
        url,
        key,
        client,
        _stop: stop,
    }
}

/// The upstream, a process of its own (`e2e-upstream`: one thread, answers everything).
struct Upstream {
    child: std::process::Child,
    address: std::net::SocketAddr,
}

impl Upstream {
    fn start() -> Upstream {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_e2e-upstream"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the upstream starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the upstream prints its address");
        let address = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|address| address.parse().ok())
            .expect("an address");
        Upstream { child, address }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `count` proxies (leases on or off) and waits until each is ready.
async fn start_proxies(
    dir: &Path,
    plane: &Plane,
    upstream: &Upstream,
    count: usize,
    leases: bool,
    tag: &str,
) -> Vec<ProxyProcess> {
    // `QS_P9_LEASE_CONFIG`: more `[leases]` settings for the proxies (TOML lines,
    // `;`-separated), to try other sizes, TTLs or report intervals.
    let tuning = std::env::var("QS_P9_LEASE_CONFIG")
        .unwrap_or_default()
        .replace(';', "\n");
    let extra = format!(
        "[leases]\nenabled = {leases}\n{tuning}\n\n[[routes]]\npath = \"/work\"\nfeature = \"api_calls\"\n"
    );
    let http = e2e::http_client();
    let mut running = Vec::new();
    for index in 0..count {
        let data = dir.join(format!("{tag}-{index}"));
        let config = dir.join(format!("{tag}-{index}.toml"));
        std::fs::write(
            &config,
            proxy_config_for(&plane.url, &plane.key, upstream.address, &data, &extra),
        )
        .expect("config written");
        let proxy = ProxyProcess::spawn(env!("CARGO_BIN_EXE_e2e-proxy"), &config);
        eventually("the proxy to be ready", Duration::from_secs(60), || async {
            let ready = http
                .get(format!("{}/readyz", proxy.admin))
                .send()
                .await
                .ok()?;
            (ready.status() == StatusCode::OK).then_some(())
        })
        .await;
        running.push(proxy);
    }
    running
}

async fn grant_all(plane: &Plane, crowd: &Crowd, amount: i64) {
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in crowd.names.chunks(crowd.names.len().div_ceil(16).max(1)) {
        let (client, chunk) = (plane.client.clone(), chunk.to_vec());
        tasks.spawn(async move {
            for name in chunk {
                client
                    .grant(&e2e::from(serde_json::json!({
                        "end_user_id": name, "amount": amount
                    })))
                    .await
                    .expect("grant");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("grants");
    }
}

struct Row {
    proxies: usize,
    users: usize,
    leases: bool,
    exact: Exact,
    throughput: Throughput,
}

fn main() {
    let counts: Vec<usize> = std::env::var("QS_P9_PROXIES")
        .unwrap_or_else(|_| "1,2,4,8".into())
        .split(',')
        .filter_map(|count| count.trim().parse().ok())
        .collect();
    let connections = usize::try_from(env_or("QS_P9_CONNECTIONS", 32)).unwrap_or(32);
    let balance = i64::try_from(env_or("QS_P9_BALANCE", 2_000)).unwrap_or(2_000);
    let secs = env_or("QS_BENCH_SECS", 5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("dir");
        let plane = start_plane(dir.path());
        let upstream = Upstream::start();
        let mut rows = Vec::new();
        for &proxies in &counts {
            for leases in [true, false] {
                let tag = format!("n{proxies}-{}", if leases { "on" } else { "off" });
                // Every end user of the set exists before its proxies start, so each
                // proxy's first snapshot holds them.
                let one = Crowd::new(&format!("{tag}-one"), 1);
                let one_endless = Crowd::new(&format!("{tag}-one-endless"), 1);
                let many = Crowd::new(&format!("{tag}-many"), USERS);
                let many_endless = Crowd::new(&format!("{tag}-many-endless"), USERS);
                grant_all(&plane, &one, balance).await;
                grant_all(&plane, &one_endless, ENDLESS).await;
                grant_all(&plane, &many, USER_BALANCE).await;
                grant_all(&plane, &many_endless, ENDLESS).await;
                for (users, exact_crowd, endless, each) in [
                    (1, &one, &one_endless, balance),
                    (USERS, &many, &many_endless, USER_BALANCE),
                ] {
                    let mut running = start_proxies(
                        dir.path(),
                        &plane,
                        &upstream,
                        proxies,
                        leases,
                        &format!("{tag}-{users}"),
                    )
                    .await;
                    let throughput = throughput(&running, endless, connections, secs).await;
                    let exact = exact(&plane, &mut running, exact_crowd, each, connections).await;
                    let row = Row {
                        proxies,
                        users,
                        leases,
                        exact,
                        throughput,
                    };
                    print_row(&row);
                    rows.push(row);
                }
            }
        }
        println!();
        summary(&rows);
    });
}

fn print_row(row: &Row) {
    let Row {
        proxies,
        users,
        leases,
        exact,
        throughput,
    } = row;
    let waits = if *leases {
        format!(
            "; waited {:.3}% of {} lease spends ({} with a short lease, {} timed out), p99 wait {}; {:.0} lease operations/s in {:.0} batches/s (p50 {}, p99 {}); {:.0} credits parked",
            ratio(throughput.waits, throughput.spends) * 100.0,
            throughput.spends,
            throughput.waits_short,
            throughput.wait_timeouts,
            throughput
                .wait_p99_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.2} ms")),
            throughput.lease_calls_per_second,
            throughput.batches_per_second,
            throughput
                .batch_p50_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.2} ms")),
            throughput
                .batch_p99_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.2} ms")),
            throughput.parked_mean,
        )
    } else {
        String::new()
    };
    println!(
        "N={proxies} users={users} leases={leases}: admitted {} of {} (charged {}, debt {}, never spent {}, false denials {}); {:.0} req/s{waits}",
        exact.admitted,
        exact.balance,
        exact.charged,
        exact.debt,
        exact.unspent,
        exact.false_denials,
        throughput.per_second,
    );
    println!(
        "    first request of each end user on each proxy: p50 {:.2} ms, p99 {:.2} ms",
        throughput.cold_p50_ms, throughput.cold_p99_ms
    );
    if !throughput.failed.is_empty() {
        println!(
            "    not admitted in the throughput phase: {:?} (of which in the warm-up: {:?})",
            throughput.failed, throughput.warm_failed
        );
    }
    if exact.unavailable > 0 {
        println!(
            "    503 lease_pending in the exact phase: {}",
            exact.unavailable
        );
    }
}

/// The markdown table for docs/BENCHMARKS.md.
fn summary(rows: &[Row]) {
    println!(
        "| N | end users | leases | admitted / balance | over-admitted (debt) | charged = admitted | false denials | never spent | req/s | vs without | waited | p99 wait | lease calls/s | parked |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let without = rows
            .iter()
            .find(|other| other.proxies == row.proxies && other.users == row.users && !other.leases)
            .map_or(0.0, |other| other.throughput.per_second);
        let exact = &row.exact;
        let throughput = &row.throughput;
        let admitted = i64::try_from(exact.admitted).unwrap_or(i64::MAX);
        let (waited, p99, calls, parked) = if row.leases {
            (
                format!("{:.2}%", ratio(throughput.waits, throughput.spends) * 100.0),
                throughput
                    .wait_p99_ms
                    .map_or_else(|| "none".to_owned(), |ms| format!("{ms:.2} ms")),
                format!("{:.0}", throughput.lease_calls_per_second),
                format!("{:.0}", throughput.parked_mean),
            )
        } else {
            ("—".into(), "—".into(), "—".into(), "—".into())
        };
        println!(
            "| {} | {} | {} | {} / {} | {} ({}) | {} | {} | {} | {:.0} | {} | {waited} | {p99} | {calls} | {parked} |",
            row.proxies,
            row.users,
            if row.leases { "on" } else { "off" },
            exact.admitted,
            exact.balance,
            (admitted - exact.balance).max(0),
            exact.debt,
            if exact.charged == admitted {
                "yes".to_owned()
            } else {
                format!("no ({})", exact.charged)
            },
            exact.false_denials,
            exact.unspent,
            throughput.per_second,
            if row.leases && without > 0.0 {
                format!("{:.2}×", throughput.per_second / without)
            } else {
                "—".into()
            },
        );
    }
}
