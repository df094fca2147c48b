//! SIGKILL the proxy process in the middle of a load, restart it: the control plane ends
//! with the usage of every request that got a 2xx, plus at most the requests in flight at
//! the kill, and nothing counted twice.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use e2e::{ControlPlane, ProxyProcess, ROUTES, Upstream, eventually, proxy_config};
use reqwest::{Method, StatusCode};

const WORKERS: u64 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_loses_nothing_and_doubles_nothing() {
    sigkill_mid_load("sync", true).await;
}

/// The same in `interval` durability: the spend of an answered request is in the kernel
/// (written, not yet synced) when the response goes out, so a killed process loses none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_in_interval_durability_loses_nothing_either() {
    sigkill_mid_load("interval", true).await;
}

/// Without leases every request's usage goes through the outbox, where groups of one end
/// user's usage wait to leave as one event (some merged and sealed, some waiting, some
/// sent without an answer when the kill comes): still nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_with_aggregated_usage_loses_nothing_and_doubles_nothing() {
    sigkill_mid_load("sync", false).await;
}

/// The same in `interval` durability: a request's usage is in the usage log (written to
/// the kernel, not yet synced) when its response goes out, so a killed process loses
/// none, as with lease spend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_with_aggregated_usage_in_interval_durability_loses_nothing() {
    sigkill_mid_load("interval", false).await;
}

async fn sigkill_mid_load(durability: &str, leases: bool) {
    let dir = tempfile::tempdir().expect("dir");
    let plane = ControlPlane::start(dir.path()).await;
    let upstream = Upstream::start().await;
    plane.grant("loaded", 1_000_000).await;
    let config_path = dir.path().join("proxy.toml");
    let routes = if leases {
        ROUTES.to_owned()
    } else {
        format!("[leases]\nenabled = false\n{ROUTES}")
    };
    std::fs::write(
        &config_path,
        proxy_config(&plane, upstream.address, &dir.path().join("proxy"), &routes).replace(
            "[usage]\n",
            &format!("[usage]\ndurability = \"{durability}\"\n"),
        ),
    )
    .expect("config written");
    let mut proxy = ProxyProcess::spawn(env!("CARGO_BIN_EXE_e2e-proxy"), &config_path);
    let address = proxy.address.clone();
    let http = e2e::http_client();
    eventually("the proxy to admit", Duration::from_secs(20), || async {
        let response = e2e::send(&http, &address, Method::POST, "/work", Some("loaded"), &[]).await;
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
    // That probe was a 2xx too.
    let ok = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (http, address, ok, stop) = (http.clone(), address.clone(), ok.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let sent = http
                    .post(format!("{address}/work"))
                    .header("x-end-user-id", "loaded")
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status() == StatusCode::OK => {
                        // Count only answers the client fully received.
                        if response.bytes().await.is_ok() {
                            ok.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }));
    }
    eventually(
        "a few hundred requests",
        Duration::from_secs(60),
        || async { (ok.load(Ordering::Acquire) >= 300).then_some(()) },
    )
    .await;
    proxy.kill();
    stop.store(true, Ordering::Release);
    for worker in workers {
        worker.await.expect("worker");
    }
    let succeeded = ok.load(Ordering::Acquire);

    // Restart on the same data directory: the outbox and the lease spend left behind are
    // reported (once: a report's sequence and content are fixed by what is on disk).
    let mut restarted = ProxyProcess::spawn(env!("CARGO_BIN_EXE_e2e-proxy"), &config_path);
    restarted.drained(&http).await;
    // Each request costs one credit: charged is what the ledger debited and what the
    // lease reports committed.
    let mut charged = 0u64;
    for entry_type in ["debit", "commit"] {
        for entry in plane.entries("loaded", entry_type).await {
            charged += u64::try_from(entry.amount).expect("amount");
        }
    }
    eprintln!("{succeeded} requests got a 2xx before the kill; {charged} were charged");
    restarted.kill();
    assert!(
        charged >= succeeded,
        "lost usage ({durability}, leases {leases}): {succeeded} requests got a 2xx, {charged} were charged"
    );
    assert!(
        charged <= succeeded + WORKERS,
        "doubled usage: {succeeded} requests got a 2xx, {charged} were charged (at most {WORKERS} were in flight)"
    );
}
