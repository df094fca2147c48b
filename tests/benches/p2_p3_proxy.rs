//! P2 and P3 (DESIGN.md), plus the idle proxy's RSS (P8):
//! - P2: latency the gated proxy adds over direct-to-upstream, against a plain pingora
//!   pass-through's, open-loop: with `durability = "interval"` p50 <= 1.2x and p99 <= 1.5x
//!   the pass-through's added latency, added p99 < 1 ms; with `"sync"` at most one shared
//!   flush more (the measured flush is reported beside it).
//! - P3: gated throughput on one worker thread >= 0.85x the plain pingora pass-through and
//!   >= 0.6x nginx as a pass-through.
//!
//! Run: `scripts/bench-proxy` (installs nginx from Debian if missing, then
//! `cargo bench -p e2e --bench p2_p3_proxy`). Knobs: `QS_P2_RATE` (open-loop requests/s,
//! default 1,000), `QS_P3_CONNECTIONS` (closed-loop connections, default 32), `QS_BENCH_SECS`
//! (seconds per measurement, default 5), `QS_P3_LEASES=off` (the gated proxies without
//! leases: every request's usage goes through the outbox) and `QS_P3_AGGREGATE_MS`
//! (their `usage.aggregate_ms`; 0 ships one event per request).
//!
//! Every proxy is its own process on one worker thread (`e2e-passthrough`: the same pingora
//! and the same hosting code as the gate; `e2e-proxy`: the gate's command line with
//! `QS_PROXY_THREADS=1`; nginx: one worker, `master_process off`, upstream keep-alive), in
//! front of the same upstream process (`e2e-upstream`, axum on one thread), driven by the
//! same load generator in this process; the control plane runs in this process too. All of
//! it shares the machine's cores, which is why the goals are ratios measured in one run.

// A bench prints its report; a setup failure panics; a scenario reads top to bottom.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines
)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use e2e::bench::{cpu_time, percentile, rss_bytes};
use e2e::{ControlPlane, eventually};

const USERS: usize = 1_000;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A child process that prints `... <prefix><address>` on stdout.
struct Process {
    child: Child,
    address: String,
    /// Everything else it printed.
    lines: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Process {
    fn spawn(mut command: Command, prefix: &str) -> Process {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("a benchmark process starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let address = loop {
            let line = lines
                .next()
                .expect("the process prints its address")
                .expect("line");
            if let Some(at) = line.find(prefix) {
                break line[at + prefix.len()..]
                    .trim()
                    .trim_start_matches("http://")
                    .to_owned();
            }
        };
        let rest = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = rest.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().expect("lines").push(line);
            }
        });
        Process {
            child,
            address,
            lines: rest,
        }
    }

    /// The text after `prefix` on a later line of its output.
    async fn later(&self, prefix: &str) -> String {
        eventually(
            &format!("a line starting {prefix:?}"),
            Duration::from_secs(30),
            || async {
                self.lines.lock().expect("lines").iter().find_map(|line| {
                    line.trim()
                        .strip_prefix(prefix)
                        .map(|rest| rest.trim().trim_start_matches("http://").to_owned())
                })
            },
        )
        .await
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Target {
    name: &'static str,
    address: String,
    pid: u32,
    gated: bool,
}

#[derive(Default)]
struct Figures {
    throughput: f64,
    cpu_us: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
}

fn request(http: &reqwest::Client, target: &Target, counter: u64) -> reqwest::RequestBuilder {
    let request = http.get(format!("http://{}/v1/work", target.address));
    if target.gated {
        let user = counter % u64::try_from(USERS).unwrap_or(1);
        request.header("x-end-user-id", format!("b{user}"))
    } else {
        request
    }
}

async fn closed_loop(target: &Target, connections: u64, secs: u64) -> (f64, f64, u64) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::try_from(connections).unwrap_or(32))
        .build()
        .expect("client");
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let cpu_before = cpu_time(target.pid);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..connections {
        let (http, done, errors) = (http.clone(), done.clone(), errors.clone());
        let target = Target {
            name: target.name,
            address: target.address.clone(),
            pid: target.pid,
            gated: target.gated,
        };
        tasks.push(tokio::spawn(async move {
            let mut counter = worker;
            while Instant::now() < until {
                counter += connections;
                match request(&http, &target, counter).send().await {
                    Ok(response) if response.status().is_success() => {
                        if response.bytes().await.is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_time(target.pid).saturating_sub(cpu_before);
    let count = done.load(Ordering::Relaxed);
    let per_request_us =
        cpu.as_secs_f64() * 1e6 / f64::from(u32::try_from(count.max(1)).unwrap_or(u32::MAX));
    (
        f64::from(u32::try_from(count).unwrap_or(u32::MAX)) / elapsed,
        per_request_us,
        errors.load(Ordering::Relaxed),
    )
}

async fn open_loop(target: &Target, rate: u64, secs: u64) -> (u64, u64, u64) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
    let total = rate * secs;
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for index in 0..total {
        let scheduled = start + interval * u32::try_from(index).unwrap_or(u32::MAX);
        tokio::time::sleep_until(scheduled).await;
        let request = request(&http, target, index);
        tasks.push(tokio::spawn(async move {
            // From the send: tokio's timers release requests in 1 ms bursts, and that
            // lateness is the generator's, not the proxy's.
            let sent = Instant::now();
            let ok = match request.send().await {
                Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                Err(_) => false,
            };
            (
                ok,
                u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX),
            )
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut errors = 0;
    for task in tasks {
        let (ok, micros) = task.await.expect("request");
        if ok {
            latencies.push(micros);
        } else {
            errors += 1;
        }
    }
    latencies.sort_unstable();
    (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        errors,
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn nginx(dir: &Path, upstream: &str) -> Option<Process> {
    let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|path| Path::new(path).exists())?;
    // nginx takes its port from its config: pick a free one (the only fixed-port moment of
    // the suite, and only in this benchmark).
    let port = free_port();
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).expect("nginx dir");
    let conf = format!(
        r#"daemon off;
master_process off;
worker_processes 1;
user root;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log crit;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  upstream up {{ server {upstream}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"#,
        prefix = prefix.display(),
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("nginx conf");
    let child = Command::new(binary)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    Some(Process {
        child,
        address: format!("127.0.0.1:{port}"),
        lines: Arc::default(),
    })
}

async fn wait_http(address: &str, path: &str, header: Option<(&str, &str)>) {
    let http = reqwest::Client::new();
    eventually(
        &format!("{address}{path} to answer"),
        Duration::from_secs(30),
        || {
            let mut request = http.get(format!("http://{address}{path}"));
            if let Some((name, value)) = header {
                request = request.header(name, value);
            }
            async move {
                request
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            }
        },
    )
    .await;
}

/// A proxy's metrics page (empty when it cannot be read).
async fn metrics_of(admin: &str) -> String {
    match reqwest::get(format!("http://{admin}/metrics")).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// An unlabelled metric's value on a metrics page.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|rest| rest.trim().parse::<f64>().ok())
}

fn flush_mean_ms(text: &str) -> Option<f64> {
    let (sum, count) = (
        metric(text, "qs_proxy_flush_seconds_sum")?,
        metric(text, "qs_proxy_flush_seconds_count")?,
    );
    (count > 0.0).then(|| sum / count * 1000.0)
}

/// The flush histogram's cumulative buckets: (bound in seconds, flushes at or below).
fn flush_buckets(text: &str) -> Vec<(f64, f64)> {
    buckets(text, "qs_proxy_flush_seconds")
}

/// A histogram's cumulative buckets: (bound in seconds, observations at or below).
fn buckets(text: &str, histogram: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{histogram}_bucket{{le=\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(prefix.as_str())?;
            let (bound, rest) = rest.split_once("\"}")?;
            Some((bound.parse::<f64>().ok()?, rest.trim().parse::<f64>().ok()?))
        })
        .collect()
}

/// The bucket bound (ms) at or below which 99% of the observations fell, from cumulative
/// buckets (`before`'s counts taken off: the observations between two readings).
fn flush_p99_ms(after: &[(f64, f64)], before: &[(f64, f64)]) -> Option<f64> {
    let between: Vec<(f64, f64)> = after
        .iter()
        .map(|&(bound, below)| {
            let earlier = before
                .iter()
                .find(|(known, _)| *known == bound)
                .map_or(0.0, |(_, below)| *below);
            (bound, below - earlier)
        })
        .collect();
    let count = between.iter().map(|(_, below)| *below).fold(0.0, f64::max);
    (count > 0.0)
        .then(|| between.iter().find(|(_, below)| *below >= count * 0.99))
        .flatten()
        .map(|(bound, _)| bound * 1000.0)
}

fn main() {
    let rate = env_or("QS_P2_RATE", 1_000);
    let connections = env_or("QS_P3_CONNECTIONS", 32);
    let secs = env_or("QS_BENCH_SECS", 5);
    let leases = std::env::var("QS_P3_LEASES").map_or(true, |value| value != "off");
    let aggregate = std::env::var("QS_P3_AGGREGATE_MS")
        .ok()
        .map(|value| {
            format!(
                "aggregate_ms = {}\n",
                value.parse::<u64>().expect("QS_P3_AGGREGATE_MS")
            )
        })
        .unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("dir");
        let upstream = Process::spawn(Command::new(env!("CARGO_BIN_EXE_e2e-upstream")), "listening on ");
        let plane = ControlPlane::start(dir.path()).await;
        for user in 0..USERS {
            plane.grant(&format!("b{user}"), 1_000_000_000_000).await;
        }
        let passthrough = {
            let mut command = Command::new(env!("CARGO_BIN_EXE_e2e-passthrough"));
            command.arg(&upstream.address);
            Process::spawn(command, "listening on ")
        };
        let mut gated = Vec::new();
        for durability in ["interval", "sync"] {
            let config = format!(
                r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
upstream = "{upstream}"
data_dir = "{data}"
cache_mb = 32
[control_plane]
url = "{url}"
api_key = "{key}"
[usage]
durability = "{durability}"
{aggregate}[leases]
enabled = {leases}
[[routes]]
path = "/"
feature = "api_calls"
"#,
                upstream = upstream.address,
                data = dir.path().join(durability).display(),
                url = plane.url,
                key = plane.key,
            );
            let path = dir.path().join(format!("{durability}.toml"));
            std::fs::write(&path, config).expect("config");
            let mut command = Command::new(env!("CARGO_BIN_EXE_e2e-proxy"));
            command.arg("--config").arg(&path).env("QS_PROXY_THREADS", "1").env("QS_LOG", "error");
            let process = Process::spawn(command, "QuotaStack proxy listening on ");
            gated.push((durability, process));
        }
        let nginx = nginx(dir.path(), &upstream.address);
        wait_http(&upstream.address, "/", None).await;
        wait_http(&passthrough.address, "/", None).await;
        for (_, process) in &gated {
            wait_http(&process.address, "/v1/work", Some(("x-end-user-id", "b0"))).await;
        }
        if let Some(nginx) = &nginx {
            wait_http(&nginx.address, "/", None).await;
        }
        let idle_rss = gated.first().map(|(_, process)| rss_bytes(Some(process.pid()))).unwrap_or(0);

        let mut targets = vec![
            Target { name: "direct to upstream", address: upstream.address.clone(), pid: upstream.pid(), gated: false },
            Target { name: "plain pingora pass-through", address: passthrough.address.clone(), pid: passthrough.pid(), gated: false },
        ];
        if let Some(nginx) = &nginx {
            targets.push(Target { name: "nginx pass-through", address: nginx.address.clone(), pid: nginx.pid(), gated: false });
        }
        for (durability, process) in &gated {
            targets.push(Target {
                name: if *durability == "sync" { "gated, durability sync" } else { "gated, durability interval" },
                address: process.address.clone(),
                pid: process.pid(),
                gated: true,
            });
        }
        let mut admins = Vec::new();
        for target in &targets {
            let process = gated.iter().find(|(_, process)| process.pid() == target.pid);
            admins.push(match process {
                Some((_, process)) => Some(process.later("admin (healthz, readyz, metrics) on ").await),
                None => None,
            });
        }
        let mut figures = Vec::new();
        // Per gated target: the bounds 99% of its flushes, and of its requests' waits for
        // one, fell within during the open loop.
        let mut open_flush_p99 = Vec::new();
        let mut open_wait_p99 = Vec::new();
        for (target, admin) in targets.iter().zip(&admins) {
            // Warm the connections and the replica.
            let _ = closed_loop(target, connections, 1).await;
            let (throughput, cpu_us, errors) = closed_loop(target, connections, secs).await;
            let before = match admin {
                Some(admin) => metrics_of(admin).await,
                None => String::new(),
            };
            let (p50_us, p99_us, open_errors) = open_loop(target, rate, secs).await;
            let after = match admin {
                Some(admin) => metrics_of(admin).await,
                None => String::new(),
            };
            open_flush_p99.push(flush_p99_ms(&flush_buckets(&after), &flush_buckets(&before)));
            let waits = |text: &str| buckets(text, "qs_proxy_flush_wait_seconds");
            open_wait_p99.push(flush_p99_ms(&waits(&after), &waits(&before)));
            figures.push(Figures { throughput, cpu_us, p50_us, p99_us, errors: errors + open_errors });
        }
        let direct = (figures[0].p50_us, figures[0].p99_us);
        let plain = &figures[1];
        let plain_added = (plain.p50_us.saturating_sub(direct.0), plain.p99_us.saturating_sub(direct.1));
        println!(
            "P2/P3: {connections} connections closed-loop for throughput; {rate}/s open-loop for latency; {secs} s each"
        );
        println!("| target | throughput | vs pingora | CPU per request | p50 | p99 | added p50 | added p99 | errors |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for (target, figure) in targets.iter().zip(&figures) {
            println!(
                "| {} | {:.0}/s | {:.2}x | {:.0} µs | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {} |",
                target.name,
                figure.throughput,
                figure.throughput / plain.throughput.max(1.0),
                figure.cpu_us,
                f64::from(u32::try_from(figure.p50_us).unwrap_or(u32::MAX)) / 1000.0,
                f64::from(u32::try_from(figure.p99_us).unwrap_or(u32::MAX)) / 1000.0,
                f64::from(u32::try_from(figure.p50_us.saturating_sub(direct.0)).unwrap_or(u32::MAX)) / 1000.0,
                f64::from(u32::try_from(figure.p99_us.saturating_sub(direct.1)).unwrap_or(u32::MAX)) / 1000.0,
                figure.errors,
            );
        }
        let ratio = |a: u64, b: u64| f64::from(u32::try_from(a).unwrap_or(u32::MAX)) / f64::from(u32::try_from(b.max(1)).unwrap_or(u32::MAX));
        for (target, figure) in targets.iter().zip(&figures).filter(|(target, _)| target.gated) {
            let added = (figure.p50_us.saturating_sub(direct.0), figure.p99_us.saturating_sub(direct.1));
            println!(
                "{}: added latency {:.2}x (p50) and {:.2}x (p99) the pass-through's; throughput {:.2}x pingora{}",
                target.name,
                ratio(added.0, plain_added.0),
                ratio(added.1, plain_added.1),
                figure.throughput / plain.throughput.max(1.0),
                nginx
                    .as_ref()
                    .map(|_| format!(", {:.2}x nginx", figure.throughput / figures[2].throughput.max(1.0)))
                    .unwrap_or_default()
            );
        }
        // `sync` at most one shared flush over `interval` (P2): the gap at p99 beside the
        // bound 99% of the `sync` proxy's flushes fell within during the same open loop.
        let at = |name: &str| targets.iter().position(|target| target.name == name);
        if let (Some(interval), Some(sync)) = (at("gated, durability interval"), at("gated, durability sync")) {
            let gap = figures[sync].p99_us.saturating_sub(figures[interval].p99_us);
            let gap_ms = f64::from(u32::try_from(gap).unwrap_or(u32::MAX)) / 1000.0;
            let bound = |p99: Option<f64>| p99.map_or_else(|| "unknown".to_owned(), |p99| format!("{p99} ms"));
            println!(
                "sync over interval at p99: {gap_ms:.3} ms; in that open loop 99% of the sync proxy's flushes took within {}, and 99% of the waits of its requests that waited for a flush within {}: {}",
                bound(open_flush_p99[sync]),
                bound(open_wait_p99[sync]),
                match open_flush_p99[sync] {
                    Some(flush) if gap_ms <= flush => "within one flush",
                    Some(_) => "more than one flush",
                    None => "no flush measured",
                }
            );
        }
        println!("idle gated proxy RSS (after loading {USERS} end users): {:.1} MiB", f64::from(u32::try_from(idle_rss / 1024).unwrap_or(u32::MAX)) / 1024.0);
        for (durability, process) in &gated {
            let admin = process.later("admin (healthz, readyz, metrics) on ").await;
            let text = metrics_of(&admin).await;
            if let Some(mean) = flush_mean_ms(&text) {
                let p99 = flush_p99_ms(&flush_buckets(&text), &[])
                    .map_or_else(|| "unknown".to_owned(), |p99| format!("{p99} ms"));
                println!(
                    "{durability}: mean outbox flush (fsync) {mean:.2} ms, 99% of flushes within {p99}"
                );
            }
            if leases {
                let spends = metric(&text, "qs_proxy_lease_spend_total").unwrap_or(0.0);
                let writes = metric(&text, "qs_proxy_spend_log_writes_total").unwrap_or(0.0);
                println!(
                    "{durability}: {spends:.0} lease spends in {writes:.0} spend log writes ({:.2} per write)",
                    spends / writes.max(1.0)
                );
            }
            if !leases {
                let written = metric(&text, "qs_proxy_outbox_written_total").unwrap_or(0.0);
                let shipped = metric(&text, "qs_proxy_usage_shipped_total").unwrap_or(0.0);
                println!(
                    "{durability}: {written:.0} requests' usage written to the outbox, shipped as {shipped:.0} events ({:.4} per request)",
                    shipped / written.max(1.0)
                );
            }
        }
        drop(nginx);
        drop(gated);
        drop(passthrough);
        drop(upstream);
    });
}
