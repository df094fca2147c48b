//! P6 (DESIGN.md): `GET /v1/entitlements/check` over HTTP on loopback at 5,000 checks/s,
//! goal p50 < 1 ms and p99 < 2 ms.
//!
//! Run: `cargo bench -p control-plane --bench p6_check` (release build). It starts a
//! control plane on a temporary SQLite file on port 0, fills it with `QS_P6_USERS` end
//! users (default 10,000) on a plan, then sends checks open-loop at `QS_P6_RATE` per
//! second (default 5,000) for `QS_P6_SECS` seconds (default 10) over keep-alive
//! connections, for random end users. The schedule is open-loop (requests are released on
//! time whatever the answers do); latency is measured from each request's send to its
//! full response, and the generator's own lateness against the schedule is reported
//! beside it. `QS_P6_BASELINE=1` sends the same load to `/healthz` instead.

// A benchmark program: it prints its report and panics on setup failures.
// A bench prints its report; a setup failure panics; a scenario reads top to bottom.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use control_plane::clock::SystemClock;
use control_plane::config::{Config, DatabaseUrl};
use control_plane::service::AppState;
use serde_json::json;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[u64], fraction: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (fraction * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn main() {
    let users = env_or("QS_P6_USERS", 10_000);
    let rate = env_or("QS_P6_RATE", 5_000);
    let secs = env_or("QS_P6_SECS", 10);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(users, rate, secs));
}

async fn run(users: u64, rate: u64, secs: u64) {
    let directory = tempfile::tempdir().expect("temp dir");
    let mut config = Config::for_tests();
    config.database = DatabaseUrl::SqliteFile(directory.path().join("p6.db").display().to_string());
    config.rate_limit_per_second = 1_000_000;
    config.rate_limit_burst = 1_000_000;
    let store = control_plane::open_store(&config).await.expect("store");
    let state = AppState::new(config, store, Arc::new(SystemClock), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(control_plane::run(state.clone(), listener, async move {
        let _ = stopped.await;
    }));
    let base = format!("http://{address}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
    let key = control_plane::http::tenancy::create_tenant(&state, "bench")
        .await
        .expect("tenant")
        .api_keys
        .test;
    let post = |path: &str, body: serde_json::Value| {
        let request = client
            .post(format!("{base}{path}"))
            .bearer_auth(&key)
            .json(&body);
        async move {
            let response = request.send().await.expect("send");
            assert!(
                response.status().is_success(),
                "{}",
                response.text().await.unwrap_or_default()
            );
        }
    };
    post(
        "/v1/features",
        json!({"key": "api_calls", "name": "API calls", "type": "metered"}),
    )
    .await;
    post("/v1/plans", json!({"key": "pro", "name": "Pro", "kind": "base", "features": {"api_calls": {"enabled": true}}})).await;
    post("/v1/plans/pro/variants", json!({"key": "m", "interval": {"every": 1, "unit": "month"}, "billing_mode": "prepaid", "grants": [{"amount": 1000}, {"amount": 45, "every": "5h"}]})).await;
    let setup = Instant::now();
    for chunk in (0..users).collect::<Vec<_>>().chunks(64) {
        let mut tasks = Vec::new();
        for user in chunk {
            tasks.push(post(
                "/v1/subscriptions",
                json!({"end_user_id": format!("user_{user}"), "plan_variant_id": "pro/m"}),
            ));
        }
        futures_join_all(tasks).await;
    }
    println!(
        "setup: {users} end users subscribed in {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    // Warm up connections and caches.
    for user in 0..200u64 {
        let url = format!(
            "{base}/v1/entitlements/check?end_user_id=user_{}&feature_key=api_calls",
            user % users
        );
        client
            .get(url)
            .bearer_auth(&key)
            .send()
            .await
            .expect("warm-up")
            .bytes()
            .await
            .expect("body");
    }

    // QS_P6_BASELINE=1 sends the same load to /healthz: what the HTTP stack and the load
    // generator cost on this machine, to read the check's own share against.
    let baseline = env_or("QS_P6_BASELINE", 0) == 1;
    let total = rate * secs;
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<(u64, u64, bool)>();
    let started = Instant::now();
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    for index in 0..total {
        let scheduled = started + interval * u32::try_from(index).expect("index");
        tokio::time::sleep_until(scheduled.into()).await;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let url = if baseline {
            format!("{base}/healthz")
        } else {
            format!(
                "{base}/v1/entitlements/check?end_user_id=user_{}&feature_key=api_calls",
                seed % users
            )
        };
        let request = client.get(url).bearer_auth(&key);
        let sender = sender.clone();
        tokio::spawn(async move {
            let sent = Instant::now();
            let ok = match request.send().await {
                Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                Err(_) => false,
            };
            let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
            let late = u64::try_from(sent.saturating_duration_since(scheduled).as_micros())
                .unwrap_or(u64::MAX);
            let _ = sender.send((micros, late, ok));
        });
    }
    drop(sender);
    let mut latencies = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut lateness = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut failures = 0u64;
    while let Some((micros, late, ok)) = receiver.recv().await {
        latencies.push(micros);
        lateness.push(late);
        if !ok {
            failures += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    lateness.sort_unstable();
    println!(
        "P6 {} over HTTP: target {rate}/s for {secs} s, achieved {:.0}/s, {failures} failures",
        if baseline {
            "baseline /healthz"
        } else {
            "check"
        },
        latencies.len() as f64 / elapsed
    );
    println!(
        "latency from send to full response: p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
        percentile(&latencies, 0.50) as f64 / 1000.0,
        percentile(&latencies, 0.90) as f64 / 1000.0,
        percentile(&latencies, 0.99) as f64 / 1000.0,
        percentile(&latencies, 0.999) as f64 / 1000.0,
        latencies.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    println!(
        "load generator lateness (send time after schedule; tokio timers tick every 1 ms): p50 {:.3} ms  p99 {:.3} ms",
        percentile(&lateness, 0.50) as f64 / 1000.0,
        percentile(&lateness, 0.99) as f64 / 1000.0,
    );
    let _ = stop.send(());
    let _ = server.await;
}

/// Awaits every future (a tiny join_all, to avoid a dependency for setup).
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(futures: Vec<F>) {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    for handle in handles {
        handle.await.expect("setup task");
    }
}
