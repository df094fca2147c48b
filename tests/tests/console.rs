//! The console in a real browser: Debian's Chromium driven through chromedriver (both
//! installed by `scripts/test` when missing), against a control plane on port 0. Every
//! page is photographed at 1280×800 into `target/console-screenshots/` (CI lists them).
//! The browser's log must hold no error at the end.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use e2e::ControlPlane;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};

/// chromedriver on a port of its own choosing (`--port=0`), stopped on drop.
struct Driver {
    child: std::process::Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        let binary = std::env::var("QS_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let mut child = std::process::Command::new(&binary)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot start `{binary}` ({error}): the browser tests need Debian's chromium and chromium-driver; `scripts/test` installs them"
                )
            });
        let stdout = child.stdout.take().expect("stdout");
        let (port_sender, port) = std::sync::mpsc::channel();
        // Reads its output to the end, so that it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    let _ = port_sender.send(rest.trim_end_matches('.').trim().parse::<u16>());
                }
            }
        });
        let port = port
            .recv_timeout(Duration::from_secs(30))
            .expect("chromedriver says its port within 30 s")
            .expect("a port number");
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn browser(&self) -> Client {
        let mut capabilities = serde_json::Map::new();
        let binary = std::env::var("QS_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": binary,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,800", "--hide-scrollbars", "--force-device-scale-factor=1"],
            }),
        );
        capabilities.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
        // chromedriver speaks plain HTTP on loopback: no TLS in the WebDriver client.
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a browser session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// chromedriver's log of the browser's console (not in W3C WebDriver; `goog` endpoint).
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({ "type": "browser" }).to_string()),
        )
    }
}

/// The folder screenshots go to.
fn screenshots() -> PathBuf {
    let dir = std::env::var_os("QS_SCREENSHOTS_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    dir
}

async fn photograph(browser: &Client, name: &str) {
    let png = browser.screenshot().await.expect("screenshot");
    std::fs::write(screenshots().join(format!("{name}.png")), png).expect("write screenshot");
}

async fn text_of(browser: &Client, css: &str) -> String {
    browser
        .wait()
        .for_element(Locator::Css(css))
        .await
        .expect(css)
        .text()
        .await
        .expect("text")
}

async fn fill(browser: &Client, css: &str, text: &str) {
    let field = browser.find(Locator::Css(css)).await.expect(css);
    field.clear().await.expect("clear");
    field.send_keys(text).await.expect("type");
}

async fn click(browser: &Client, css: &str) {
    browser
        .find(Locator::Css(css))
        .await
        .expect(css)
        .click()
        .await
        .expect("click");
}

async fn api(plane: &ControlPlane, key: &str, path: &str, body: Value) -> Value {
    let idempotency_key =
        body["end_user_id"].to_string() + &body["units"].to_string() + &body.to_string();
    let answer = e2e::http_client()
        .post(format!("{}{path}", plane.url))
        .bearer_auth(key)
        .header(
            "idempotency-key",
            format!("{:x}", sha_like(&idempotency_key)),
        )
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = answer.status();
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "POST {path}: {status} {body}");
    body
}

/// A short stable digest of a request body, for its idempotency key.
fn sha_like(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A catalog with a plan to subscribe to, an end user with history, one refused end
/// user, and a webhook endpoint with deliveries.
async fn seed(plane: &ControlPlane) -> String {
    let key = &plane.key;
    api(plane, key, "/v1/plans", json!({"key": "pro", "name": "Pro", "kind": "base", "features": {"api_calls": {"enabled": true}}})).await;
    api(plane, key, "/v1/plans/pro/variants", json!({"key": "monthly", "interval": {"every": 1, "unit": "month"}, "billing_mode": "postpaid", "grants": [{"amount": 500}]})).await;
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hook = format!("http://{}/hook", receiver.local_addr().expect("address"));
    tokio::spawn(async move {
        let app = axum::Router::new().route("/hook", axum::routing::post(|| async { "ok" }));
        let _ = axum::serve(receiver, app).await;
    });
    api(plane, key, "/v1/webhook-endpoints", json!({"url": hook})).await;
    let subscription = api(
        plane,
        key,
        "/v1/subscriptions",
        json!({"end_user_id": "user-1", "plan_variant_id": "pro/monthly"}),
    )
    .await;
    plane.grant("user-1", 1_000).await;
    for index in 0..20 {
        api(plane, key, "/v1/usage", json!({"end_user_id": "user-1", "feature_key": "api_calls", "units": 7, "metadata": {"n": index}})).await;
    }
    plane.grant("poor-user", 3).await;
    subscription["id"]
        .as_str()
        .expect("subscription id")
        .to_owned()
}

async fn sign_in(browser: &Client, plane: &ControlPlane, key: &str) {
    browser
        .goto(&format!("{}/console/login", plane.url))
        .await
        .expect("login page");
    fill(browser, "#key", key).await;
    click(browser, "#sign-in").await;
    browser
        .wait()
        .for_element(Locator::Css("#end-users"))
        .await
        .expect("the end users list");
}

async fn sign_out(browser: &Client) {
    click(browser, "#sign-out").await;
    browser
        .wait()
        .for_element(Locator::Css("#login-form"))
        .await
        .expect("signed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_browser() {
    let dir = tempfile::tempdir().expect("dir");
    let plane = ControlPlane::start(dir.path()).await;
    let subscription = seed(&plane).await;
    let driver = Driver::start();
    let browser = driver.browser().await;
    browser
        .set_window_size(1280, 800)
        .await
        .expect("window size");
    let base = &plane.url;

    // Signed out: the sign-in page; a wrong key is refused there.
    browser
        .goto(&format!("{base}/console/end-users"))
        .await
        .expect("goto");
    browser
        .wait()
        .for_element(Locator::Css("#login-form"))
        .await
        .expect("sent to sign in");
    photograph(&browser, "sign-in").await;
    fill(&browser, "#key", "qs_test_this-is-not-a-real-key").await;
    click(&browser, "#sign-in").await;
    assert!(text_of(&browser, "#problem").await.contains("not known"));

    // Sign in, find the end user, read a block's bar.
    sign_in(&browser, &plane, &plane.key).await;
    assert_eq!(
        text_of(&browser, "#environment").await.to_lowercase(),
        "test"
    );
    fill(&browser, "#search", "user-").await;
    click(&browser, "form[action='/console/end-users'] button").await;
    e2e::eventually("the search's page", Duration::from_secs(10), || async {
        browser
            .current_url()
            .await
            .ok()
            .filter(|url| url.query().is_some_and(|query| query.contains("q=user-")))
    })
    .await;
    let found = browser
        .wait()
        .for_element(Locator::Css("a[href='/console/end-users/user-1']"))
        .await
        .expect("found");
    photograph(&browser, "end-users").await;
    found.click().await.expect("open");
    browser
        .wait()
        .for_element(Locator::Css("#blocks"))
        .await
        .expect("the end user page");
    let before: i64 = text_of(&browser, "#available")
        .await
        .parse()
        .expect("a number");
    let bars = browser
        .find_all(Locator::Css("#blocks meter"))
        .await
        .expect("bars");
    assert!(!bars.is_empty(), "each block has its bar");
    let mut seen = Vec::new();
    for bar in &bars {
        let value: i64 = bar
            .attr("value")
            .await
            .expect("attr")
            .expect("value")
            .parse()
            .expect("number");
        let max: i64 = bar
            .attr("max")
            .await
            .expect("attr")
            .expect("max")
            .parse()
            .expect("number");
        assert!((0..=max).contains(&value));
        seen.push((value, max));
    }
    assert!(
        seen.contains(&(1_000 - 140, 1_000))
            || seen.iter().any(|(value, max)| *max == 500 && *value < 500),
        "the burned block shows what is left of it: {seen:?}"
    );
    photograph(&browser, "end-user").await;

    // Grant through the form: the balance shows it.
    fill(&browser, "#grant-amount", "25").await;
    click(&browser, "#grant-submit").await;
    assert!(text_of(&browser, "#notice").await.contains("granted"));
    let after: i64 = text_of(&browser, "#available")
        .await
        .parse()
        .expect("a number");
    assert_eq!(after, before + 25);

    // Pause and resume the subscription, each behind its confirmation.
    for (action, status) in [("pause", "paused"), ("resume", "active")] {
        click(&browser, &format!("#{action}-{subscription}")).await;
        let confirm = browser
            .wait()
            .for_element(Locator::Css("#confirm"))
            .await
            .expect("a confirmation");
        if action == "pause" {
            photograph(&browser, "confirm").await;
        }
        confirm.click().await.expect("confirm");
        let shown = text_of(
            &browser,
            &format!("tr[data-subscription='{subscription}'] td.status"),
        )
        .await;
        assert!(shown.starts_with(status), "{action}: {shown}");
    }

    // Explain a refused end user.
    browser
        .goto(&format!("{base}/console/explain"))
        .await
        .expect("explain");
    fill(&browser, "#explain-end-user", "poor-user").await;
    fill(&browser, "input[name='units']", "50").await;
    click(&browser, "#explain-submit").await;
    assert_eq!(text_of(&browser, "#verdict").await, "Refused");
    assert_eq!(text_of(&browser, "#reason").await, "insufficient_balance");
    photograph(&browser, "explain").await;

    // Redeliver a webhook.
    browser
        .goto(&format!("{base}/console/webhooks"))
        .await
        .expect("webhooks");
    browser
        .wait()
        .for_element(Locator::Css("#deliveries tr[data-event] button"))
        .await
        .expect("a delivery")
        .click()
        .await
        .expect("redeliver");
    assert!(text_of(&browser, "#notice").await.contains("queued"));
    photograph(&browser, "webhooks").await;
    for page in ["catalog", "proxies"] {
        browser
            .goto(&format!("{base}/console/{page}"))
            .await
            .expect("page");
        browser
            .wait()
            .for_element(Locator::Css("main h1"))
            .await
            .expect("rendered");
        photograph(&browser, page).await;
    }

    // The test clock moves from the header.
    let clock = text_of(&browser, "#clock").await;
    click(&browser, "#advance-clock").await;
    let moved = e2e::eventually("the clock to move", Duration::from_secs(10), || async {
        let now = browser
            .find(Locator::Css("#clock"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (now != clock).then_some(now)
    })
    .await;
    assert!(moved.contains("Test clock"), "{moved}");

    // A form posted without its CSRF token is refused (the session's cookie, no token).
    let cookies = browser.get_all_cookies().await.expect("cookies");
    let session = cookies
        .iter()
        .find(|cookie| cookie.name() == "qs_console")
        .expect("the session cookie");
    assert!(session.http_only().unwrap_or(false), "HttpOnly");
    let unchanged = plane.available("user-1").await;
    let posted = e2e::http_client()
        .post(format!("{base}/console/end-users/user-1/grant"))
        .header("cookie", format!("qs_console={}", session.value()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("amount=1000000&idempotency_key=forged")
        .send()
        .await
        .expect("post");
    assert_eq!(posted.status(), reqwest::StatusCode::FORBIDDEN);
    assert_eq!(
        plane.available("user-1").await,
        unchanged,
        "nothing granted"
    );

    // Sign out; a live key sees nothing of the test environment.
    sign_out(&browser).await;
    let live_key = plane.live_key.clone().expect("the tenant's live key");
    sign_in(&browser, &plane, &live_key).await;
    assert_eq!(
        text_of(&browser, "#environment").await.to_lowercase(),
        "live"
    );
    let list = text_of(&browser, "#end-users").await;
    assert!(
        !list.contains("user-1"),
        "a live key sees no test end user: {list}"
    );
    browser
        .goto(&format!("{base}/console/end-users/user-1"))
        .await
        .expect("peek");
    browser
        .wait()
        .for_element(Locator::Css("#unknown"))
        .await
        .expect("nothing of the test end user in live");
    photograph(&browser, "live").await;
    // And the other way round: a live end user is not in the test environment.
    let live_client = client::Client::new(&plane.url, &live_key).expect("client");
    live_client
        .grant(&e2e::from(json!({"end_user_id": "only-live", "amount": 5})))
        .await
        .expect("grant");
    browser
        .goto(&format!("{base}/console/end-users"))
        .await
        .expect("list");
    assert!(
        text_of(&browser, "#end-users").await.contains("only-live"),
        "the live session lists it"
    );
    sign_out(&browser).await;

    sign_in(&browser, &plane, &plane.key).await;
    assert!(
        !text_of(&browser, "#end-users").await.contains("only-live"),
        "a test key sees no live end user"
    );
    sign_out(&browser).await;

    // No error in the browser's console all along.
    let log = browser.issue_cmd(BrowserLog).await.expect("browser log");
    let errors: Vec<&Value> = log
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|entry| entry["level"] == "SEVERE")
                .collect()
        })
        .unwrap_or_default();
    assert!(errors.is_empty(), "browser console errors: {errors:?}");
    browser.close().await.expect("close");
}
