//! The proxy end to end: control plane, upstream and proxy on real sockets (port 0).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use e2e::{ControlPlane, Echo, Proxy, ROUTES, Upstream, eventually, proxy_config, raw_request};
use reqwest::{Method, StatusCode};

async fn setup(extra: &str) -> (tempfile::TempDir, ControlPlane, Upstream, Proxy) {
    let dir = tempfile::tempdir().expect("dir");
    let plane = ControlPlane::start(dir.path()).await;
    let upstream = Upstream::start().await;
    let config = proxy_config(&plane, upstream.address, &dir.path().join("proxy"), extra);
    let proxy = Proxy::start(&config).await;
    proxy.ready().await;
    (dir, plane, upstream, proxy)
}

async fn status(proxy: &Proxy, path: &str, end_user: Option<&str>) -> StatusCode {
    proxy.send(Method::POST, path, end_user, &[]).await.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admits_while_credits_last_then_402_and_charges_every_admitted_request_once() {
    let (_dir, plane, _upstream, proxy) = setup(ROUTES).await;
    plane.grant("u1", 5).await;
    proxy.sees("u1").await;

    let mut balances = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let response = proxy.send(Method::POST, "/work", Some("u1"), &[]).await;
        statuses.push(response.status().as_u16());
        if response.status() == StatusCode::OK {
            assert_eq!(response.headers()["x-quota-source"], "replica");
            assert!(response.headers().contains_key("x-quota-as-of"));
            balances.push(
                response.headers()["x-quota-balance"]
                    .to_str()
                    .expect("ascii")
                    .to_owned(),
            );
            assert_eq!(response.text().await.expect("body"), "done");
        } else {
            let problem: serde_json::Value = response.json().await.expect("problem body");
            assert_eq!(problem["code"], "insufficient_balance");
            assert_eq!(problem["status"], 402);
        }
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 402, 402, 402]);
    assert_eq!(balances, ["4", "3", "2", "1", "0"]);

    proxy.drained().await;
    assert_eq!(
        e2e::charged(&plane, "u1").await,
        5,
        "every admitted request charged once (from the proxy's lease)"
    );
    assert_eq!(plane.available("u1").await, 0);

    // Public routes need no identity; gated ones do; unmatched paths are refused.
    assert_eq!(
        proxy.send(Method::GET, "/health", None, &[]).await.status(),
        StatusCode::OK
    );
    let missing = proxy.send(Method::POST, "/work", None, &[]).await;
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        status(&proxy, "/elsewhere", Some("u1")).await,
        StatusCode::NOT_FOUND
    );
    proxy.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_requests_on_one_end_user_never_overspend_and_5xx_is_not_charged() {
    let (_dir, plane, _upstream, proxy) = setup(ROUTES).await;
    plane.grant("racer", 10).await;
    proxy.sees("racer").await;
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let (http, url) = (proxy.http.clone(), proxy.url.clone());
        tasks.push(tokio::spawn(async move {
            e2e::send(&http, &url, Method::POST, "/work", Some("racer"), &[])
                .await
                .status()
        }));
    }
    let mut admitted = 0;
    for task in tasks {
        if task.await.expect("request") == StatusCode::OK {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10, "exactly the balance is admitted");
    proxy.drained().await;
    assert_eq!(e2e::charged(&plane, "racer").await, 10);

    // An upstream 5xx is not charged by default.
    plane.grant("racer", 3).await;
    eventually(
        "the grant to be visible",
        Duration::from_secs(10),
        || async {
            (status(&proxy, "/fail", Some("racer")).await == StatusCode::INTERNAL_SERVER_ERROR)
                .then_some(())
        },
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            status(&proxy, "/fail", Some("racer")).await,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    proxy.drained().await;
    assert_eq!(
        e2e::charged(&plane, "racer").await,
        10,
        "no 5xx was charged"
    );
    proxy.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_at_the_control_plane_is_honoured_within_a_deadline() {
    let (_dir, plane, _upstream, proxy) = setup(ROUTES).await;
    assert_eq!(
        status(&proxy, "/work", Some("late")).await,
        StatusCode::PAYMENT_REQUIRED
    );
    plane.grant("late", 2).await;
    eventually(
        "the proxy to admit after the grant",
        Duration::from_secs(5),
        || async { (status(&proxy, "/work", Some("late")).await == StatusCode::OK).then_some(()) },
    )
    .await;
    proxy.running.shutdown().await;
}

/// The README's walkthrough, many times over: spend a balance to 402, top up, and the
/// very next request is admitted with the balance after the top-up, whether or not the
/// proxy's replica shows the grant yet (a refusal remembered from before the grant must
/// not outlive it: the lease asked for after the request arrived sees the grant).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_is_spendable_on_the_next_request() {
    let (_dir, plane, _upstream, proxy) = setup(ROUTES).await;
    let feature = ledger::FeatureKey::new("api_calls").expect("a feature key");
    for round in 0..12 {
        let end_user = format!("topup-{round}");
        let id = ledger::EndUserId::new(&end_user).expect("an end user id");
        plane.grant(&end_user, 3).await;
        proxy.sees(&end_user).await;
        for expected in ["2", "1", "0"] {
            let response = proxy
                .send(Method::POST, "/work", Some(&end_user), &[])
                .await;
            assert_eq!(response.status(), StatusCode::OK, "round {round}");
            assert_eq!(
                response.headers()["x-quota-balance"],
                expected,
                "round {round}"
            );
        }
        assert_eq!(
            status(&proxy, "/work", Some(&end_user)).await,
            StatusCode::PAYMENT_REQUIRED,
            "round {round}: the fourth call is refused"
        );
        plane.grant(&end_user, 10).await;
        // Odd rounds go at once, even rounds once the replica shows the grant.
        if round % 2 == 1 {
            let response = proxy
                .send(Method::POST, "/work", Some(&end_user), &[])
                .await;
            let status = response.status();
            let balance = response.headers().get("x-quota-balance").cloned();
            let body = response.text().await.unwrap_or_default();
            assert_eq!(status, StatusCode::OK, "round {round} at once: {body}");
            assert_eq!(balance.unwrap(), "9", "round {round} at once");
            continue;
        }
        eventually(
            "the top-up to reach the proxy's replica",
            Duration::from_secs(10),
            || async {
                let state = proxy.running.replica.user(&id)?;
                let free = state
                    .available(Some(&feature), proxy.running.replica.now())
                    .ok()?;
                let held = state.held(Some(&feature)).ok()?;
                (free.checked_add(held).ok()?.get() >= 10).then_some(())
            },
        )
        .await;
        let response = proxy
            .send(Method::POST, "/work", Some(&end_user), &[])
            .await;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::OK, "round {round}: {body}");
        assert_eq!(headers["x-quota-balance"], "9", "round {round}");
    }
    proxy.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_then_commit_charges_the_actual_and_an_upstream_error_releases_the_hold() {
    let (_dir, plane, _upstream, proxy) = setup(ROUTES).await;
    plane.grant("writer", 1_000).await;
    proxy.sees("writer").await;
    let response = proxy
        .send(
            Method::POST,
            "/generate",
            Some("writer"),
            &[("x-test-actual", "37")],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    // The balance header reflects the actual (known from the upstream's answer), and
    // says so.
    assert_eq!(response.headers()["x-quota-balance"], "963");
    assert_eq!(response.headers()["x-quota-balance-basis"], "actual");
    proxy.drained().await;
    assert_eq!(
        plane.available("writer").await,
        1_000 - 37,
        "the actual is charged, not the estimate"
    );
    assert_eq!(plane.entries("writer", "commit").await.len(), 1);

    let failed = proxy
        .send(Method::POST, "/generate-fail", Some("writer"), &[])
        .await;
    assert_eq!(failed.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        failed.headers()["x-quota-balance"],
        "963",
        "a released hold costs nothing"
    );
    assert_eq!(failed.headers()["x-quota-balance-basis"], "actual");
    proxy.drained().await;
    assert_eq!(
        plane.available("writer").await,
        963,
        "the hold was released"
    );
    // The commit released its unused 63, the failed call its whole hold.
    assert_eq!(plane.entries("writer", "release").await.len(), 2);
    let balance = plane.client.balance("writer", None).await.expect("balance");
    assert_eq!(balance.held, 0);

    // No actual from the upstream: the estimate is committed, and the header says the
    // balance is after the estimate.
    let unmeasured = proxy
        .send(Method::POST, "/generate", Some("writer"), &[])
        .await;
    assert_eq!(unmeasured.status(), StatusCode::OK);
    assert_eq!(unmeasured.headers()["x-quota-balance"], "863");
    assert_eq!(unmeasured.headers()["x-quota-balance-basis"], "estimate");
    proxy.drained().await;
    assert_eq!(plane.available("writer").await, 863);

    // An estimate larger than the balance is refused before the upstream is called.
    let big = proxy
        .send(Method::POST, "/generate", Some("poor"), &[])
        .await;
    assert_eq!(big.status(), StatusCode::PAYMENT_REQUIRED);
    proxy.running.shutdown().await;
}

// The control plane stops while the proxy holds a lease (SPEC 12.1): the proxy keeps
// admitting within its lease, on every route; past it, the failure policy decides (the
// closed route answers 503, the open one admits within its outage budget). Back up, the
// spend is reported and the totals converge, nothing charged twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_control_plane_stopped_leases_then_the_failure_policy_then_convergence() {
    let extra = format!(
        "[failure]\nmax_staleness_secs = 3\n{}",
        ROUTES.replace(
            "path = \"/work\"\nfeature = \"api_calls\"",
            "path = \"/work\"\nfeature = \"api_calls\"\noutage_budget = 3"
        )
    );
    let (_dir, mut plane, _upstream, proxy) = setup(&extra).await;
    plane.grant("u9", 100).await;
    proxy.sees("u9").await;
    assert_eq!(status(&proxy, "/work", Some("u9")).await, StatusCode::OK);
    assert_eq!(status(&proxy, "/closed", Some("u9")).await, StatusCode::OK);
    proxy.drained().await;

    plane.stop().await;
    // Until max_staleness the replica still decides for an end user without a lease (one
    // without credits gets 402); after it, the closed route answers 503.
    eventually(
        "the closed route to fail closed",
        Duration::from_secs(15),
        || async {
            (status(&proxy, "/closed", Some("nobody")).await == StatusCode::SERVICE_UNAVAILABLE)
                .then_some(())
        },
    )
    .await;
    // u9's lease still has room: the closed route admits within it, then fails closed.
    let mut within_lease = 0;
    loop {
        let response = proxy.send(Method::POST, "/closed", Some("u9"), &[]).await;
        if response.status() != StatusCode::OK {
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            break;
        }
        assert_eq!(response.headers()["x-quota-source"], "replica");
        within_lease += 1;
        assert!(
            within_lease <= 100,
            "a lease never holds more than the balance"
        );
    }
    let mut admitted = 0;
    for _ in 0..5 {
        let response = proxy.send(Method::POST, "/work", Some("u9"), &[]).await;
        if response.status() == StatusCode::OK {
            assert_eq!(response.headers()["x-quota-source"], "fallback");
            admitted += 1;
        } else {
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            let problem: serde_json::Value = response.json().await.expect("problem");
            assert_eq!(problem["code"], "outage_budget_exhausted");
        }
    }
    assert_eq!(admitted, 3, "the outage budget bounds what fails open");

    plane.restart().await;
    proxy.drained().await;
    // 2 before the outage, the lease's room and 3 failing open during it, each once.
    assert_eq!(e2e::charged(&plane, "u9").await, 2 + within_lease + 3);
    eventually(
        "the proxy to be fresh again",
        Duration::from_secs(15),
        || async { (status(&proxy, "/closed", Some("u9")).await == StatusCode::OK).then_some(()) },
    )
    .await;
    proxy.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_on_one_tenant_admit_exactly_the_balance_between_them() {
    let dir = tempfile::tempdir().expect("dir");
    let plane = ControlPlane::start(dir.path()).await;
    let upstream = Upstream::start().await;
    let first = Proxy::start(&proxy_config(
        &plane,
        upstream.address,
        &dir.path().join("a"),
        ROUTES,
    ))
    .await;
    let second = Proxy::start(&proxy_config(
        &plane,
        upstream.address,
        &dir.path().join("b"),
        ROUTES,
    ))
    .await;
    first.ready().await;
    second.ready().await;
    plane.grant("shared", 20).await;
    for proxy in [&first, &second] {
        proxy.sees("shared").await;
    }
    // Each alone, hammered concurrently, admits at most the balance it knows of.
    let mut tasks = Vec::new();
    for proxy in [&first, &second] {
        for _ in 0..30 {
            let (http, url) = (proxy.http.clone(), proxy.url.clone());
            tasks.push(tokio::spawn(async move {
                e2e::send(&http, &url, Method::POST, "/work", Some("shared"), &[])
                    .await
                    .status()
            }));
        }
    }
    let mut admitted = 0;
    for task in tasks {
        if task.await.expect("request") == StatusCode::OK {
            admitted += 1;
        }
    }
    // Leases (SPEC 12.1): each proxy spends only what the control plane holds for it, so
    // across proxies exactly the balance is admitted.
    assert_eq!(admitted, 20, "exactly the balance, across both proxies");
    first.drained().await;
    second.drained().await;
    let debt = plane
        .client
        .balance("shared", None)
        .await
        .expect("balance")
        .debt;
    assert_eq!(debt, 0, "no debt: nothing was admitted past the balance");
    assert_eq!(
        e2e::charged(&plane, "shared").await,
        admitted,
        "every admitted request is charged exactly once"
    );
    first.running.shutdown().await;
    second.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_serves_from_its_sled_copy_at_once_even_without_the_control_plane() {
    let dir = tempfile::tempdir().expect("dir");
    let mut plane = ControlPlane::start(dir.path()).await;
    let upstream = Upstream::start().await;
    // Leases go back after a second unused, so the replica kept on disk shows the
    // balance free again.
    let routes = format!("[leases]\nwait_ms = 5000\nidle_release_secs = 1\n{ROUTES}");
    let config = proxy_config(&plane, upstream.address, &dir.path().join("proxy"), &routes);
    let proxy = Proxy::start(&config).await;
    proxy.ready().await;
    plane.grant("keeper", 3).await;
    eventually(
        "the grant to reach the proxy",
        Duration::from_secs(10),
        || async {
            (status(&proxy, "/work", Some("keeper")).await == StatusCode::OK).then_some(())
        },
    )
    .await;
    proxy.drained().await;
    let keeper = ledger::EndUserId::new("keeper").expect("id");
    eventually("the lease to go back", Duration::from_secs(10), || async {
        let free = proxy.running.replica.user(&keeper).is_some_and(|state| {
            state.leases().iter().all(|lease| lease.held.is_zero())
                && state.blocks().iter().all(|block| block.held.is_zero())
        });
        free.then_some(())
    })
    .await;
    proxy.running.shutdown().await;
    plane.stop().await;

    // The control plane is down: the new process decides from what sled kept.
    let proxy = Proxy::start(&config).await;
    let first = proxy.send(Method::POST, "/work", Some("keeper"), &[]).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["x-quota-source"], "replica");
    assert_eq!(first.headers()["x-quota-balance"], "1");
    assert_eq!(
        status(&proxy, "/work", Some("keeper")).await,
        StatusCode::OK
    );
    assert_eq!(
        status(&proxy, "/work", Some("keeper")).await,
        StatusCode::PAYMENT_REQUIRED
    );
    assert_eq!(proxy.running.outbox.depth(), 2);

    plane.restart().await;
    proxy.drained().await;
    assert_eq!(e2e::charged(&plane, "keeper").await, 3);
    proxy.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_expect_100_continue_is_charged_once() {
    let (_dir, plane, _upstream, proxy) = setup(ROUTES).await;
    plane.grant("uploader", 10).await;
    proxy.sees("uploader").await;
    let body = "x".repeat(4096);
    let response = proxy
        .http
        .post(format!("{}/upload", proxy.url))
        .header("x-end-user-id", "uploader")
        .header("expect", "100-continue")
        .body(body)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.expect("body"), "got 4096 bytes");
    proxy.drained().await;
    assert_eq!(e2e::charged(&plane, "uploader").await, 1, "charged once");
    proxy.running.shutdown().await;
}

/// Usage the control plane refuses for good (here: its feature is not in the catalog
/// yet) is never deleted: it waits in the quarantine, which the admin port lists and
/// `/metrics` counts, and is charged once an operator replays it after fixing the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_waits_in_quarantine_until_an_operator_replays_it() {
    let (_dir, plane, _upstream, proxy) = setup(ROUTES).await;
    plane.grant("held", 10).await;
    proxy.sees("held").await;
    let admin = format!("http://{}", proxy.running.admin_address);
    proxy
        .running
        .outbox
        .push(&proxy::outbox::Record {
            key: "qsp_e2e_later".into(),
            end_user_id: "held".into(),
            pending: 0,
            op: proxy::outbox::Op::usage(
                "later".into(),
                2,
                proxy.running.replica.now().as_millis(),
            ),
        })
        .await
        .expect("pushed");
    eventually(
        "the refused event to be quarantined",
        Duration::from_secs(10),
        || async { (proxy.running.outbox.quarantine_depth() == 1).then_some(()) },
    )
    .await;
    assert_eq!(proxy.running.outbox.depth(), 0);

    let listed: serde_json::Value = proxy
        .http
        .get(format!("{admin}/quarantine?limit=10"))
        .send()
        .await
        .expect("listed")
        .json()
        .await
        .expect("json");
    assert_eq!(listed["depth"], 1);
    let entry = &listed["data"][0];
    assert_eq!(entry["record"]["key"], "qsp_e2e_later");
    assert_eq!(entry["problem"]["code"], "feature_not_found");
    let bad_limit = proxy
        .http
        .get(format!("{admin}/quarantine?limit=0"))
        .send()
        .await
        .expect("answered");
    assert_eq!(bad_limit.status(), StatusCode::BAD_REQUEST);
    let metrics = proxy
        .http
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(metrics.contains("qs_proxy_quarantine_depth 1"), "{metrics}");

    // The operator fixes the cause, then replays.
    plane
        .client
        .create_feature(&e2e::from(serde_json::json!({
            "key": "later", "name": "later", "type": "metered"
        })))
        .await
        .expect("feature");
    let unknown = proxy
        .http
        .post(format!(
            "{admin}/quarantine/replay?key=01ARZ3NDEKTSV4RRFFQ69G5FAV"
        ))
        .send()
        .await
        .expect("answered");
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let key = entry["key"].as_str().expect("a key");
    let replayed: serde_json::Value = proxy
        .http
        .post(format!("{admin}/quarantine/replay?key={key}"))
        .send()
        .await
        .expect("replayed")
        .json()
        .await
        .expect("json");
    assert_eq!(replayed["replayed"], 1);
    proxy.drained().await;
    assert_eq!(proxy.running.outbox.quarantine_depth(), 0);
    assert_eq!(plane.entries("held", "debit").await.len(), 1);
    assert_eq!(plane.available("held").await, 8);
    proxy.running.shutdown().await;
}

/// The routes of config/proxy.toml: a public health check, a reservation route and a
/// catch-all priced per call.
const SHIPPED_ROUTES: &str = r#"
[[routes]]
path = "/healthz"
public = true

[[routes]]
method = "POST"
path = "/v1/generate"
feature = "tokens"
reserve = { estimate = 100, actual_header = "x-usage-units" }

[[routes]]
path = "/v1"
feature = "api_calls"
"#;

/// Routes match the normalised path, and the upstream is sent that same path (with the
/// query as it was): dot segments, repeated slashes and escaped unreserved characters
/// cannot climb out of a public route or dodge a reservation route, and what cannot be
/// normalised is refused with 400 `invalid_path`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_and_the_upstream_serves_the_normalised_path() {
    let (_dir, plane, _upstream, proxy) = setup(SHIPPED_ROUTES).await;
    plane.grant("walker", 1_000).await;
    proxy.sees("walker").await;
    let address = proxy.running.address;
    let walker = [("x-end-user-id", "walker")];

    // Out of the public route: gated as /v1/x (no identity: 401).
    let climbed = raw_request(address, "GET", "/healthz/../v1/x", &[]).await;
    assert_eq!(
        climbed.status,
        401,
        "{:?}",
        String::from_utf8_lossy(&climbed.body)
    );
    let served = raw_request(address, "GET", "/healthz/../v1/x?a=1&b=%2F", &walker).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.header("x-quota-source"), Some("replica"));
    let echo: Echo = served.json();
    assert_eq!(echo.path, "/v1/x");
    assert_eq!(echo.query.as_deref(), Some("a=1&b=%2F"));
    // The same in absolute-form, which is forwarded in origin-form.
    let absolute = format!("http://{address}/healthz/../v1/x");
    let climbed = raw_request(address, "GET", &absolute, &[]).await;
    assert_eq!(climbed.status, 401);
    let served = raw_request(address, "GET", &absolute, &walker).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.json::<Echo>().path, "/v1/x");
    // Into the public route: public, and the upstream sees the public path.
    let public = raw_request(address, "GET", "/v1/%2E%2E/healthz", &[]).await;
    assert_eq!(public.status, 200);
    assert_eq!(public.json::<Echo>().path, "/healthz");

    // Every spelling of /v1/generate holds a reservation and commits the actual.
    let spellings = [
        "/v1/./generate",
        "//v1//generate",
        "/v1/%2e/generate",
        "/%761/generate",
        "/v1/x/%2E%2E/generate",
    ];
    for target in spellings {
        let generated = raw_request(
            address,
            "POST",
            target,
            &[("x-end-user-id", "walker"), ("x-test-actual", "7")],
        )
        .await;
        assert_eq!(generated.status, 200, "{target}");
        assert_eq!(generated.json::<Echo>().path, "/v1/generate", "{target}");
    }
    proxy.drained().await;
    let commits = plane.entries("walker", "commit").await;
    let reservation_commits: Vec<_> = commits
        .iter()
        .filter(|entry| entry.reservation_id.is_some())
        .collect();
    assert_eq!(
        reservation_commits.len(),
        spellings.len(),
        "each one held and committed"
    );
    let calls: i64 = commits
        .iter()
        .chain(&plane.entries("walker", "debit").await)
        .filter(|entry| entry.feature_key.as_deref() == Some("api_calls"))
        .map(|entry| entry.amount)
        .sum();
    assert_eq!(calls, 2, "only /v1/x (twice) was charged as a call");
    assert_eq!(e2e::charged(&plane, "walker").await, 2 + 7 * 5);

    // What cannot be normalised is refused before any route.
    for target in ["/../v1/x", "/v1/a%2fb", "/v1/a%zz", "/healthz/..;/v1/x"] {
        let refused = raw_request(address, "GET", target, &walker).await;
        assert_eq!(refused.status, 400, "{target}");
        let problem: serde_json::Value = refused.json();
        assert_eq!(problem["code"], "invalid_path", "{target}");
    }
    proxy.running.shutdown().await;
}

/// The upstream learns who was charged from the proxy, never from the client: in JWT
/// mode a spoofed `x-end-user-id` is replaced by the token's subject, a public route
/// gets none, and in header mode a second copy of the header is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_sees_the_identity_that_was_charged_not_the_clients_header() {
    const SECRET: &str = "an-e2e-secret-of-some-length";
    let jwt = format!(
        "[identity.jwt]\nalgorithm = \"HS256\"\nsecret = \"{SECRET}\"\naudience = \"e2e-api\"\n{SHIPPED_ROUTES}"
    );
    let (_dir, plane, _upstream, proxy) = setup(&jwt).await;
    plane.grant("jwt_user", 10).await;
    proxy.sees("jwt_user").await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
        + 300;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "jwt_user", "exp": exp, "aud": "e2e-api"}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("a token");
    let bearer = format!("Bearer {token}");
    let spoofed = proxy
        .send(
            Method::GET,
            "/v1/x",
            Some("someone-else"),
            &[("authorization", &bearer)],
        )
        .await;
    assert_eq!(spoofed.status(), StatusCode::OK);
    let echo: Echo = spoofed.json().await.expect("echo");
    assert_eq!(
        echo.end_user_ids,
        ["jwt_user"],
        "the identity that was charged"
    );
    let public = proxy
        .send(Method::GET, "/healthz", Some("someone-else"), &[])
        .await;
    assert_eq!(public.status(), StatusCode::OK);
    let echo: Echo = public.json().await.expect("echo");
    assert!(echo.end_user_ids.is_empty(), "{echo:?}");
    proxy.drained().await;
    assert_eq!(e2e::charged(&plane, "jwt_user").await, 1);
    proxy.running.shutdown().await;

    // Header mode: the header is the identity; one copy is forwarded, two are refused.
    let (_dir, plane, _upstream, proxy) = setup(SHIPPED_ROUTES).await;
    plane.grant("h1", 10).await;
    proxy.sees("h1").await;
    let single = proxy.send(Method::GET, "/v1/x", Some("h1"), &[]).await;
    assert_eq!(single.status(), StatusCode::OK);
    assert_eq!(
        single.json::<Echo>().await.expect("echo").end_user_ids,
        ["h1"]
    );
    let doubled = proxy
        .send(Method::GET, "/v1/x", Some("h1"), &[("x-end-user-id", "h2")])
        .await;
    assert_eq!(doubled.status(), StatusCode::BAD_REQUEST);
    let problem: serde_json::Value = doubled.json().await.expect("problem");
    assert_eq!(problem["code"], "ambiguous_identity");
    proxy.drained().await;
    assert_eq!(e2e::charged(&plane, "h1").await, 1);
    assert_eq!(e2e::charged(&plane, "h2").await, 0);
    proxy.running.shutdown().await;
}

// A proxy told to follow the feed over NATS follows the HTTP stream while it cannot:
// NATS unreachable (a port nothing listens on), or reachable while the control plane
// publishes nothing there (`404 nats_not_configured`). Either way grants reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_told_to_use_nats_follows_http_while_it_cannot() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    };
    let mut urls = vec![format!("nats://{closed}")];
    if let Ok(url) = std::env::var("QS_TEST_NATS_URL")
        && !url.is_empty()
    {
        urls.push(url);
    }
    for url in urls {
        let (_dir, plane, _upstream, proxy) =
            setup(&format!("{ROUTES}\n[sync]\nnats_url = \"{url}\"\n")).await;
        plane.grant("u1", 3).await;
        proxy.sees("u1").await;
        assert!(
            !proxy.running.replica.follows_over_nats(),
            "{url}: the HTTP stream carried it"
        );
        assert_eq!(
            status(&proxy, "/work", Some("u1")).await,
            StatusCode::OK,
            "{url}: the proxy gates as ever"
        );
    }
}

/// Sends `full`'s requests to the route that fails closed until one is refused (at most
/// `most`): that refusal must be 503 `usage_log_full`. Answers how many were admitted.
async fn closed_until_full(proxy: &Proxy, most: usize) -> usize {
    let mut admitted = 0usize;
    for _ in 0..most {
        let response = proxy.send(Method::POST, "/closed", Some("full"), &[]).await;
        match response.status() {
            StatusCode::OK => admitted += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                let problem: serde_json::Value = response.json().await.expect("problem");
                assert_eq!(problem["code"], "usage_log_full", "{problem}");
                return admitted;
            }
            other => panic!("unexpected {other}"),
        }
    }
    panic!("the closed route was never refused ({admitted} admitted): the log never filled");
}

/// A full spend log (`usage.spend_log_max_kb`, here 1 KiB: 21 records, with no report due
/// for a minute): a route that fails closed refuses with 503 `usage_log_full` before the
/// upstream; one that fails open is decided by the replica and recorded in the outbox.
/// Nothing logged is lost: once the proxy stops (its leases' final reports), every
/// admitted request is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spend_log_fails_each_route_by_its_policy_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let plane = ControlPlane::start(dir.path()).await;
    let upstream = Upstream::start().await;
    let extra = format!(
        "{ROUTES}\n[leases]\nwait_ms = 5000\nttl_secs = 600\nreport_interval_ms = 60000\nmin_credits = 1000\nidle_release_secs = 600\n"
    );
    let config = proxy_config(&plane, upstream.address, &dir.path().join("proxy"), &extra)
        .replace("[usage]\n", "[usage]\nspend_log_max_kb = 1\n");
    let proxy = Proxy::start(&config).await;
    proxy.ready().await;
    plane.grant("full", 10_000).await;
    proxy.sees("full").await;

    let mut admitted = closed_until_full(&proxy, 40).await;
    assert!(
        (15..=21).contains(&admitted),
        "about 21 records fit in 1 KiB: {admitted}"
    );
    // The open route: admitted by the replica, its usage in the outbox.
    for _ in 0..5 {
        let response = proxy.send(Method::POST, "/work", Some("full"), &[]).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-quota-source"], "replica");
        admitted += 1;
    }
    proxy.drained_outbox().await;
    proxy.running.shutdown().await;
    eventually(
        "every admitted request to be charged",
        Duration::from_secs(20),
        || async {
            (e2e::charged(&plane, "full").await == i64::try_from(admitted).ok()?).then_some(())
        },
    )
    .await;
}

/// A full usage log (`usage.usage_log_max_kb`, here 64 KiB: about 300 requests' usage,
/// with no shipping round or hand-on to sled due for a minute, as if sled refused
/// writes; leases off, so usage goes through the outbox): a route that fails closed refuses with 503 `usage_log_full` before the
/// upstream; one that fails open answers, its usage recorded while the log takes it and
/// lost (logged and counted) once it does not. Nothing logged is lost: once the proxy
/// stops (its last round hands the log on to sled and ships), every recorded request is
/// charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_usage_log_fails_each_route_by_its_policy_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let plane = ControlPlane::start(dir.path()).await;
    let upstream = Upstream::start().await;
    let extra = format!(
        "{ROUTES}\n[leases]\nenabled = false\n[usage]\nusage_log_max_kb = 64\nship_interval_ms = 60000\n"
    );
    let config = proxy_config(&plane, upstream.address, &dir.path().join("proxy"), &extra);
    let proxy = Proxy::start(&config).await;
    proxy.ready().await;
    plane.grant("full", 10_000).await;
    proxy.sees("full").await;

    let admitted = closed_until_full(&proxy, 1000).await;
    assert!(
        (200..=400).contains(&admitted),
        "about 300 records fit in 64 KiB: {admitted}"
    );
    assert_eq!(proxy.running.outbox.depth(), admitted);
    // The open route answers; past the log's last bytes its usage is lost.
    let open = 40usize;
    for _ in 0..open {
        let response = proxy.send(Method::POST, "/work", Some("full"), &[]).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let recorded = proxy.running.outbox.depth();
    assert!(
        (admitted..admitted + open).contains(&recorded),
        "some of the open route's usage was recorded, not all: {recorded} of {}",
        admitted + open
    );
    proxy.running.shutdown().await;
    eventually(
        "every recorded request to be charged",
        Duration::from_secs(20),
        || async {
            (e2e::charged(&plane, "full").await == i64::try_from(recorded).ok()?).then_some(())
        },
    )
    .await;
}

/// Usage that goes through the outbox (here: leases off) leaves the proxy aggregated:
/// many requests of one end user and feature become a few `usage/batch` events, and the
/// control plane charges exactly what was admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_usage_reaches_the_control_plane_as_a_few_events_charged_exactly() {
    // Each end user's usage of a feature waits up to usage.aggregate_ms (a second) for
    // more before it leaves.
    let settings = format!("[leases]\nenabled = false\n{ROUTES}");
    let (_dir, plane, _upstream, proxy) = setup(&settings).await;
    plane.grant("many", 1000).await;
    proxy.sees("many").await;
    for _ in 0..50 {
        assert_eq!(status(&proxy, "/work", Some("many")).await, StatusCode::OK);
    }
    proxy.drained().await;
    assert_eq!(
        e2e::charged(&plane, "many").await,
        50,
        "every request charged once"
    );
    let events = plane.entries("many", "debit").await.len();
    assert!(
        (1..=10).contains(&events),
        "50 requests within a few seconds reached the control plane as {events} events"
    );
    assert_eq!(plane.available("many").await, 950);
    proxy.running.shutdown().await;
}

// A lease's report taken by the control plane leaves the spend log only once the proxy
// has taken its cost off the lease's outstanding spend: whenever nothing is left
// unacknowledged, the next answer's balance is exact (before, a drain could see the log
// empty a moment before that, and the next decision counted the reported spend twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_drain_every_answers_balance_is_exact() {
    let (_dir, plane, _upstream, proxy) = setup(&format!(
        "[leases]\nwait_ms = 5000\nreport_interval_ms = 10\n{ROUTES}"
    ))
    .await;
    plane.grant("exact", 1_000).await;
    proxy.sees("exact").await;
    let first = proxy.send(Method::POST, "/work", Some("exact"), &[]).await;
    assert_eq!(first.status(), StatusCode::OK);
    let mut balance = e2e::balance_header(&first);
    for round in 0..100 {
        // Polled as tightly as the runtime allows, to land in any gap between the
        // acknowledgement and what decisions count.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while proxy::server::unacknowledged(&proxy.running.outbox, &proxy.running.spend_log) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: never drained"
            );
            tokio::task::yield_now().await;
        }
        let response = proxy.send(Method::POST, "/work", Some("exact"), &[]).await;
        assert_eq!(response.status(), StatusCode::OK, "round {round}");
        let now = e2e::balance_header(&response);
        assert_eq!(balance - now, 1, "round {round}: one credit a request");
        balance = now;
    }
    proxy.drained().await;
    assert_eq!(e2e::charged(&plane, "exact").await, 101);
}
