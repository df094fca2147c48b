//! P7 (DESIGN.md): a change committed at the control plane is visible in a proxy's replica
//! within p50 <= 20 ms, p99 <= 100 ms, at 100 changes/s.
//!
//! Run: `cargo bench -p e2e --bench p7_lag` (knob `QS_P7_CHANGES`, default 1,000). A
//! control plane (SQLite file) and a proxy run in this process on port 0; every 10 ms a
//! grant is made to one of 100 end users; the lag is from the grant's HTTP answer (the
//! commit is done by then) until the proxy's in-memory replica holds a newer version of
//! that end user, watched by a task that polls the index without sleeping.
//!
//! With `QS_P7_POSTGRES_URL` (an empty database) it runs two control-plane replicas on
//! PostgreSQL instead, the proxy following the second: the lag of a change committed
//! through that replica, then through the other one (woken by LISTEN/NOTIFY).

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use control_plane::config::DatabaseUrl;
use e2e::bench::percentile;
use e2e::{ControlPlane, Proxy, ROUTES, Upstream, proxy_config};

fn main() {
    let changes: usize = std::env::var("QS_P7_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let postgres = std::env::var("QS_P7_POSTGRES_URL")
        .ok()
        .filter(|url| !url.is_empty());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("dir");
        let upstream = Upstream::start().await;
        let Some(url) = postgres else {
            let plane = ControlPlane::start(dir.path()).await;
            measure(
                "SQLite, one control plane",
                changes,
                &plane,
                &plane,
                &upstream,
                dir.path(),
            )
            .await;
            return;
        };
        // Two replicas on one PostgreSQL database; the proxy follows the second.
        let first = ControlPlane::start_on(DatabaseUrl::Postgres(url.clone()), None).await;
        for key in ["api_calls", "tokens"] {
            first
                .client
                .create_feature(&e2e::from(
                    serde_json::json!({"key": key, "name": key, "type": "metered"}),
                ))
                .await
                .expect("feature");
        }
        let second =
            ControlPlane::start_on(DatabaseUrl::Postgres(url), Some(first.key.clone())).await;
        measure(
            "PostgreSQL, committed through the replica the proxy follows",
            changes,
            &second,
            &second,
            &upstream,
            &dir.path().join("same"),
        )
        .await;
        measure(
            "PostgreSQL, committed through the other replica",
            changes,
            &first,
            &second,
            &upstream,
            &dir.path().join("other"),
        )
        .await;
    });
}

/// `changes` grants through `commit`, one every 10 ms, each timed until a proxy
/// following `follow` holds it.
async fn measure(
    label: &str,
    changes: usize,
    commit: &ControlPlane,
    follow: &ControlPlane,
    upstream: &Upstream,
    dir: &std::path::Path,
) {
    let proxy = Proxy::start(&proxy_config(
        follow,
        upstream.address,
        &dir.join("proxy"),
        ROUTES,
    ))
    .await;
    proxy.ready().await;
    let replica = proxy.running.replica.clone();
    let mut lags = Vec::with_capacity(changes);
    let mut next = tokio::time::Instant::now();
    let started = Instant::now();
    for index in 0..changes {
        tokio::time::sleep_until(next).await;
        next += Duration::from_millis(10);
        let user = format!("lag{}", index % 100);
        let id = ledger::EndUserId::new(&user).expect("id");
        let before = replica.version(&id);
        commit.grant(&user, 1).await;
        let committed = Instant::now();
        loop {
            if replica.version(&id) > before {
                break;
            }
            assert!(
                committed.elapsed() < Duration::from_secs(10),
                "change never arrived"
            );
            tokio::task::yield_now().await;
        }
        lags.push(u64::try_from(committed.elapsed().as_micros()).unwrap_or(u64::MAX));
    }
    let elapsed = started.elapsed();
    lags.sort_unstable();
    println!(
        "P7 ({label}): {changes} changes in {:.1} s ({:.0}/s); lag from commit to the proxy's index",
        elapsed.as_secs_f64(),
        f64::from(u32::try_from(changes).unwrap_or(0)) / elapsed.as_secs_f64()
    );
    println!("| p50 | p90 | p99 | max |");
    println!("|---|---|---|---|");
    let ms = |micros: u64| {
        format!(
            "{:.2} ms",
            f64::from(u32::try_from(micros).unwrap_or(u32::MAX)) / 1000.0
        )
    };
    println!(
        "| {} | {} | {} | {} |",
        ms(percentile(&lags, 0.5)),
        ms(percentile(&lags, 0.9)),
        ms(percentile(&lags, 0.99)),
        ms(*lags.last().unwrap_or(&0))
    );
    proxy.running.shutdown().await;
}
