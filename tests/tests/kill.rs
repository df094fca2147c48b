//! SIGKILL the proxy process in the middle of a load, restart it: the control plane ends
//! with the usage of every request that got a 2xx, plus at most the requests in flight at
//! the kill, and nothing counted twice.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use e2e::{ControlPlane, ROUTES, Upstream, eventually, proxy_config};
use reqwest::{Method, StatusCode};

const WORKERS: u64 = 8;

async fn outbox_depth(http: &reqwest::Client, admin: &str) -> Option<u64> {
    let text = http
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("qs_proxy_outbox_depth "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .and_then(|value| format!("{value:.0}").parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_loses_nothing_and_doubles_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let plane = ControlPlane::start(dir.path()).await;
    let upstream = Upstream::start().await;
    plane.grant("loaded", 1_000_000).await;
    let config_path = dir.path().join("proxy.toml");
    std::fs::write(
        &config_path,
        proxy_config(&plane, upstream.address, &dir.path().join("proxy"), ROUTES),
    )
    .expect("config written");
    let (mut child, address, admin) =
        e2e::spawn_proxy(env!("CARGO_BIN_EXE_e2e-proxy"), &config_path);
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
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    stop.store(true, Ordering::Release);
    for worker in workers {
        worker.await.expect("worker");
    }
    let succeeded = ok.load(Ordering::Acquire);

    // Restart on the same data directory: the outbox left behind is shipped.
    let (mut child, _address, admin_again) =
        e2e::spawn_proxy(env!("CARGO_BIN_EXE_e2e-proxy"), &config_path);
    eventually(
        "the restarted proxy to drain its outbox",
        Duration::from_secs(30),
        || async { (outbox_depth(&http, &admin_again).await == Some(0)).then_some(()) },
    )
    .await;
    let _ = admin;
    let charged = u64::try_from(plane.entries("loaded", "debit").await.len()).expect("count");
    eprintln!("{succeeded} requests got a 2xx before the kill; {charged} were charged");
    child.kill().expect("stop");
    child.wait().expect("reaped");
    assert!(
        charged >= succeeded,
        "lost usage: {succeeded} requests got a 2xx, {charged} were charged"
    );
    assert!(
        charged <= succeeded + WORKERS,
        "doubled usage: {succeeded} requests got a 2xx, {charged} were charged (at most {WORKERS} were in flight)"
    );
}
