//! The proxy's command line as an operator uses it: `--check-config`, the admin
//! endpoints, and a SIGHUP reload that changes routes without dropping connections (and
//! keeps the old configuration when the new one is invalid).

// A scenario reads top to bottom as one story however long it is.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

use std::process::Command;
use std::time::Duration;

use e2e::{ControlPlane, ProxyProcess, ROUTES, Upstream, eventually, proxy_config};
use reqwest::StatusCode;

const PROXY: &str = env!("CARGO_BIN_EXE_e2e-proxy");

#[test]
fn check_config_accepts_a_valid_file_and_names_the_setting_at_fault() {
    let dir = tempfile::tempdir().expect("dir");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "upstream = \"127.0.0.1:3000\"\n[control_plane]\nurl = \"http://127.0.0.1:8080\"\napi_key = \"k\"\n[[routes]]\npath = \"/v1\"\nfeature = \"api_calls\"\n",
    )
    .expect("written");
    let output = Command::new(PROXY)
        .args(["--check-config", "--config"])
        .arg(&good)
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok (1 routes)"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&good).expect("read").replace(
            "feature = \"api_calls\"",
            "feature = \"api_calls\"\nunits = 0",
        ),
    )
    .expect("written");
    let output = Command::new(PROXY)
        .args(["--check-config", "--config"])
        .arg(&bad)
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("routes[0].units"), "{stderr}");

    // A JWT identity must name its audience, or waive it explicitly.
    let no_audience = dir.path().join("no-audience.toml");
    let jwt = "[identity.jwt]\nalgorithm = \"HS256\"\nsecret = \"jwt-secret-of-some-length\"\n";
    let good_text = std::fs::read_to_string(&good).expect("read");
    std::fs::write(&no_audience, format!("{good_text}{jwt}")).expect("written");
    let output = Command::new(PROXY)
        .args(["--check-config", "--config"])
        .arg(&no_audience)
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("identity.jwt.audience") && stderr.contains("require_audience"),
        "{stderr}"
    );
    let waived = dir.path().join("waived.toml");
    std::fs::write(
        &waived,
        format!("{good_text}{jwt}require_audience = false\n"),
    )
    .expect("written");
    let output = Command::new(PROXY)
        .args(["--check-config", "--config"])
        .arg(&waived)
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_routes_without_dropping_connections() {
    let dir = tempfile::tempdir().expect("dir");
    let plane = ControlPlane::start(dir.path()).await;
    let upstream = Upstream::start().await;
    plane.grant("hup", 1_000).await;
    let config_path = dir.path().join("proxy.toml");
    let config = proxy_config(&plane, upstream.address, &dir.path().join("proxy"), ROUTES);
    std::fs::write(&config_path, &config).expect("config");
    let proxy = ProxyProcess::spawn(PROXY, &config_path);
    let (address, admin) = (&proxy.address, &proxy.admin);
    // One client, one keep-alive connection for the whole test.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .expect("client");
    let call = || {
        http.post(format!("{address}/work"))
            .header("x-end-user-id", "hup")
            .send()
    };
    // A measured call first waits for the calls before it to be shipped and acknowledged:
    // the replica can show a cost a moment before its acknowledgement reaches the outbox,
    // and in that moment a decision counts it twice (erring towards refusing), which
    // would make the balance an answer reports lower than exact.
    let measured = || async {
        proxy.drained(&http).await;
        call().await
    };
    let first = eventually("the proxy to admit", Duration::from_secs(20), || async {
        call()
            .await
            .ok()
            .filter(|response| response.status() == StatusCode::OK)
    })
    .await;
    let mut balance = e2e::balance_header(&first);

    // The admin endpoints.
    assert_eq!(
        http.get(format!("{admin}/healthz"))
            .send()
            .await
            .expect("healthz")
            .status(),
        StatusCode::OK
    );
    let ready = http
        .get(format!("{admin}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(ready.text().await.expect("body"), "ready");
    let metrics = http
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(metrics.contains("qs_proxy_decisions_total"), "{metrics}");
    // The feature is gated by balance: the decision spent from this proxy's lease.
    assert!(
        metrics.contains("source=\"lease\""),
        "decisions are labelled by source"
    );

    // /work now costs 5 units a request.
    std::fs::write(
        &config_path,
        config.replace(
            "path = \"/work\"\nfeature = \"api_calls\"",
            "path = \"/work\"\nfeature = \"api_calls\"\nunits = 5",
        ),
    )
    .expect("config");
    let hup = |pid: u32| {
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    };
    hup(proxy.id());
    // Poll (with a deadline) until a request is charged by the new route.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = measured()
            .await
            .expect("the connection survives the reload");
        assert_eq!(response.status(), StatusCode::OK);
        let now = e2e::balance_header(&response);
        // Pending spend makes each answer exact: 1 before the reload, 5 after.
        let spent = balance - now;
        assert!(spent == 1 || spent == 5, "spent {spent}");
        balance = now;
        if spent == 5 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reload never took effect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // An invalid file is refused and the running configuration stays.
    std::fs::write(&config_path, "this is not toml").expect("config");
    hup(proxy.id());
    let response = measured().await.expect("still serving");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(balance - e2e::balance_header(&response), 5);
}
