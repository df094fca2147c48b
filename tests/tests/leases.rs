//! Leases across proxy processes (SPEC 12.1): several proxies gating one end user admit
//! exactly what the balance covers between them, with no debt; a proxy killed mid-load has
//! its spend charged from its disk after its restart; proxies holding leases keep
//! admitting within them while the control plane is down, and the totals converge when it
//! is back. Real processes (the proxy's command line) and sockets on port 0.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use e2e::{ControlPlane, ProxyProcess, ROUTES, Upstream, eventually, proxy_config};
use reqwest::StatusCode;

const BINARY: &str = env!("CARGO_BIN_EXE_e2e-proxy");

/// `count` proxy processes on `plane`, each with its own data directory.
fn proxies(
    dir: &Path,
    plane: &ControlPlane,
    upstream: &Upstream,
    count: usize,
    extra: &str,
) -> Vec<(ProxyProcess, PathBuf)> {
    (0..count)
        .map(|index| {
            let data = dir.join(format!("proxy-{index}"));
            let config = dir.join(format!("proxy-{index}.toml"));
            std::fs::write(&config, proxy_config(plane, upstream.address, &data, extra))
                .expect("config written");
            (ProxyProcess::spawn(BINARY, &config), config)
        })
        .collect()
}

fn holder_of(data: &Path) -> String {
    std::fs::read_to_string(data.join("holder"))
        .expect("holder id")
        .trim()
        .to_owned()
}

/// Sends `/work` for `end_user` through `proxy` until it is refused three times in a
/// row; counts the 2xx answers fully received.
async fn hammer(
    http: reqwest::Client,
    proxy: String,
    end_user: &'static str,
    admitted: Arc<AtomicI64>,
) {
    let mut refused_in_a_row = 0;
    while refused_in_a_row < 3 {
        let response = http
            .post(format!("{proxy}/work"))
            .header("x-end-user-id", end_user)
            .send()
            .await
            .expect("the proxy answers");
        match response.status() {
            StatusCode::OK => {
                refused_in_a_row = 0;
                if response.bytes().await.is_ok() {
                    admitted.fetch_add(1, Ordering::AcqRel);
                }
            }
            StatusCode::PAYMENT_REQUIRED => {
                refused_in_a_row += 1;
                // Credits may still come back from another proxy's lease.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("unexpected answer {other}"),
        }
    }
}

async fn exact_with(count: usize) {
    let dir = tempfile::tempdir().expect("dir");
    let plane = ControlPlane::start(dir.path()).await;
    let upstream = Upstream::start().await;
    let balance = 200;
    plane.grant("shared", balance).await;
    let mut running = proxies(dir.path(), &plane, &upstream, count, ROUTES);
    let http = e2e::http_client();
    for (proxy, _) in &running {
        eventually("the proxy to be ready", Duration::from_secs(30), || async {
            let ready = http
                .get(format!("{}/readyz", proxy.admin))
                .send()
                .await
                .ok()?;
            (ready.status() == StatusCode::OK).then_some(())
        })
        .await;
    }
    let admitted = Arc::new(AtomicI64::new(0));
    let mut workers = Vec::new();
    for (proxy, _) in &running {
        for _ in 0..3 {
            workers.push(tokio::spawn(hammer(
                http.clone(),
                proxy.address.clone(),
                "shared",
                admitted.clone(),
            )));
        }
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    let admitted = admitted.load(Ordering::Acquire);
    assert!(
        admitted <= balance,
        "{count} proxies admitted {admitted} of a balance of {balance}"
    );

    // Leases are visible while held: as `held` in the balance, listed by holder.
    let holders: Vec<String> = (0..count)
        .map(|index| holder_of(&dir.path().join(format!("proxy-{index}"))))
        .collect();
    let listed = plane
        .client
        .list_leases(None, Some(&holders[0]), None)
        .await
        .expect("leases");
    assert!(
        !listed.data.is_empty(),
        "the first proxy's leases are listed by holder"
    );
    assert!(listed.data.iter().all(|lease| lease.holder == holders[0]));

    for (proxy, _) in &mut running {
        proxy.terminate();
    }
    let shown = plane.client.balance("shared", None).await.expect("balance");
    assert_eq!(shown.debt, 0, "nothing admitted past the balance");
    assert_eq!(shown.held, 0, "every lease went back at shutdown");
    assert_eq!(
        e2e::charged(&plane, "shared").await,
        admitted,
        "charged exactly what was admitted"
    );
    assert_eq!(shown.available, balance - admitted);
    eprintln!("{count} proxies: {admitted} of {balance} admitted, no debt");
}

// Two, four and eight proxies on one end user, hammered closed-loop until refused:
// admitted cost <= the balance, debt 0, charged = admitted, nothing held afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_admit_at_most_the_balance() {
    exact_with(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_proxies_admit_at_most_the_balance() {
    exact_with(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_proxies_admit_at_most_the_balance() {
    exact_with(8).await;
}

// SIGKILL one of four proxies in the middle of the load: after its restart, the spend
// its disk kept is reported (charged once) and its lease released; totals are exact to
// within the requests in flight at the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_proxys_spend_is_charged_after_its_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let plane = ControlPlane::start(dir.path()).await;
    let upstream = Upstream::start().await;
    plane.grant("heavy", 1_000_000).await;
    let mut running = proxies(dir.path(), &plane, &upstream, 4, ROUTES);
    let http = e2e::http_client();
    let admitted = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    const WORKERS_EACH: i64 = 2;
    let mut workers = Vec::new();
    for (proxy, _) in &running {
        for _ in 0..WORKERS_EACH {
            let (http, address, admitted, stop) = (
                http.clone(),
                proxy.address.clone(),
                admitted.clone(),
                stop.clone(),
            );
            workers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Acquire) {
                    let Ok(response) = http
                        .post(format!("{address}/work"))
                        .header("x-end-user-id", "heavy")
                        .send()
                        .await
                    else {
                        // The killed proxy's connections fail: its workers stop.
                        return;
                    };
                    if response.status() == StatusCode::OK && response.bytes().await.is_ok() {
                        admitted.fetch_add(1, Ordering::AcqRel);
                    }
                }
            }));
        }
    }
    eventually(
        "a few hundred requests",
        Duration::from_secs(60),
        || async { (admitted.load(Ordering::Acquire) >= 400).then_some(()) },
    )
    .await;
    running[0].0.kill();
    stop.store(true, Ordering::Release);
    for worker in workers {
        worker.await.expect("worker");
    }
    let admitted = admitted.load(Ordering::Acquire);
    // The killed proxy restarts on its own data directory and reports what it left.
    let config = running[0].1.clone();
    running[0].0 = ProxyProcess::spawn(BINARY, &config);
    for (proxy, _) in &mut running {
        proxy.drained(&http).await;
        proxy.terminate();
    }
    let charged = e2e::charged(&plane, "heavy").await;
    let shown = plane.client.balance("heavy", None).await.expect("balance");
    assert_eq!(
        shown.held, 0,
        "the killed proxy's lease went back after its restart"
    );
    assert!(
        charged >= admitted,
        "lost spend: {admitted} admitted, {charged} charged"
    );
    assert!(
        charged <= admitted + WORKERS_EACH,
        "doubled spend: {admitted} admitted, {charged} charged (at most {WORKERS_EACH} in flight at the kill)"
    );
    eprintln!("{admitted} admitted before the kill; {charged} charged");
}

// The control plane stops while two proxies hold leases: they keep admitting within
// them, then fail closed; back up, their spend is reported and the totals converge,
// nothing charged twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_carry_proxies_through_a_control_plane_outage() {
    let dir = tempfile::tempdir().expect("dir");
    let mut plane = ControlPlane::start(dir.path()).await;
    let upstream = Upstream::start().await;
    plane.grant("steady", 10_000).await;
    let routes = format!(
        "[failure]\nmax_staleness_secs = 2\non_unavailable = \"closed\"\n[leases]\nwait_ms = 5000\nmin_credits = 50\n{ROUTES}"
    );
    let mut running = proxies(dir.path(), &plane, &upstream, 2, &routes);
    let http = e2e::http_client();
    let send = |address: String| {
        let http = http.clone();
        async move {
            http.post(format!("{address}/work"))
                .header("x-end-user-id", "steady")
                .send()
                .await
                .expect("the proxy answers")
                .status()
        }
    };
    let mut admitted = 0i64;
    for (proxy, _) in &running {
        eventually("the proxy to admit", Duration::from_secs(30), || async {
            (send(proxy.address.clone()).await == StatusCode::OK).then_some(())
        })
        .await;
        admitted += 1;
    }
    plane.stop().await;
    // Within their leases they keep admitting; past them (or once the leases are due to
    // expire), the route fails closed.
    let mut during = 0i64;
    for (proxy, _) in &running {
        loop {
            match send(proxy.address.clone()).await {
                StatusCode::OK => during += 1,
                StatusCode::SERVICE_UNAVAILABLE => break,
                other => panic!("unexpected answer {other}"),
            }
            assert!(during <= 10_000, "never more than the balance");
        }
    }
    assert!(
        during > 0,
        "the leases carried the proxies through the outage"
    );
    admitted += during;
    plane.restart().await;
    for (proxy, _) in &mut running {
        proxy.drained(&http).await;
        proxy.terminate();
    }
    assert_eq!(
        e2e::charged(&plane, "steady").await,
        admitted,
        "each admitted request charged once"
    );
    let shown = plane.client.balance("steady", None).await.expect("balance");
    assert_eq!((shown.held, shown.debt), (0, 0));
    eprintln!("{during} admitted within leases while the control plane was down");
}

// A proxy killed, then restarted while the control plane is down: its recovery of the
// spend its disk kept fails and is retried, so once the control plane is back the spend
// is charged (once) and the lease released, without another restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_reports_its_old_spend_once_the_control_plane_is_back() {
    let dir = tempfile::tempdir().expect("dir");
    let mut plane = ControlPlane::start(dir.path()).await;
    let upstream = Upstream::start().await;
    plane.grant("patient", 1_000).await;
    let mut running = proxies(dir.path(), &plane, &upstream, 1, ROUTES);
    let http = e2e::http_client();
    let mut admitted = 0i64;
    while admitted < 20 {
        let response = http
            .post(format!("{}/work", running[0].0.address))
            .header("x-end-user-id", "patient")
            .send()
            .await
            .expect("the proxy answers");
        assert_eq!(response.status(), StatusCode::OK);
        admitted += 1;
    }
    running[0].0.kill();
    plane.stop().await;
    let config = running[0].1.clone();
    running[0].0 = ProxyProcess::spawn(BINARY, &config);
    let proxy = &running[0].0;
    eventually(
        "the recovery to fail once",
        Duration::from_secs(30),
        || async {
            (proxy
                .metric(&http, "qs_proxy_lease_recovery_failures_total")
                .await
                >= Some(1))
            .then_some(())
        },
    )
    .await;
    plane.restart().await;
    eventually(
        "the recovery to finish",
        Duration::from_secs(60),
        || async {
            (proxy.metric(&http, "qs_proxy_lease_recovery_pending").await == Some(0)).then_some(())
        },
    )
    .await;
    assert_eq!(
        e2e::charged(&plane, "patient").await,
        admitted,
        "charged once, after the restart"
    );
    let shown = plane
        .client
        .balance("patient", None)
        .await
        .expect("balance");
    assert_eq!(
        (shown.held, shown.debt),
        (0, 0),
        "the old lease was released"
    );
    running[0].0.terminate();
}

// A proxy killed and not restarted: its lease's unspent hold goes back at the lease's TTL
// (the control plane's scheduler), while what it spent and had not reported stays on its
// disk; restarted later, it reports that spend, charged beyond the expired hold, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_proxys_hold_returns_at_expiry_and_its_spend_is_charged_when_it_returns() {
    let dir = tempfile::tempdir().expect("dir");
    let plane = ControlPlane::start(dir.path()).await;
    let upstream = Upstream::start().await;
    plane.grant("orphan", 1_000).await;
    let routes = format!(
        "[leases]\nwait_ms = 5000\nttl_secs = 5\nreport_interval_ms = 2500\nmin_credits = 100\n{ROUTES}"
    );
    let mut running = proxies(dir.path(), &plane, &upstream, 1, &routes);
    let http = e2e::http_client();
    let mut admitted = 0i64;
    while admitted < 10 {
        let response = http
            .post(format!("{}/work", running[0].0.address))
            .header("x-end-user-id", "orphan")
            .send()
            .await
            .expect("the proxy answers");
        assert_eq!(response.status(), StatusCode::OK);
        admitted += 1;
    }
    let held = plane
        .client
        .balance("orphan", None)
        .await
        .expect("balance")
        .held;
    assert!(held > 0, "the proxy holds a lease");
    running[0].0.kill();
    // The hold goes back at expiry; what was reported before the kill (the lease may
    // have been extended, with its spend, once) is all that is charged until the proxy
    // returns.
    let shown = eventually("the lease to expire", Duration::from_secs(60), || async {
        let shown = plane.client.balance("orphan", None).await.ok()?;
        (shown.held == 0).then_some(shown)
    })
    .await;
    let reported = e2e::charged(&plane, "orphan").await;
    assert_eq!(
        shown.available,
        1_000 - reported,
        "the unspent hold came back"
    );
    let config = running[0].1.clone();
    running[0].0 = ProxyProcess::spawn(BINARY, &config);
    eventually(
        "the old spend to be reported",
        Duration::from_secs(60),
        || async {
            (running[0]
                .0
                .metric(&http, "qs_proxy_lease_recovery_pending")
                .await
                == Some(0))
            .then_some(())
        },
    )
    .await;
    assert_eq!(
        e2e::charged(&plane, "orphan").await,
        admitted,
        "charged once, beyond the expired hold"
    );
    let shown = plane.client.balance("orphan", None).await.expect("balance");
    assert_eq!(
        (shown.available, shown.held, shown.debt),
        (1_000 - admitted, 0, 0)
    );
    running[0].0.terminate();
}
