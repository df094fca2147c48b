//! The console's pages for an end user with 10,000 ledger entries (issue: "pages answer
//! in under 100 ms"): a release control plane in process on a durable SQLite file, one
//! end user with `QS_CONSOLE_ENTRIES` entries (default 10,000) spread over the last 29
//! days, `QS_CONSOLE_USERS` other end users (default 1,000), a signed-in session. Each
//! page is fetched `QS_CONSOLE_ROUNDS` times (default 50) one after another; prints
//! p50, p99 and the slowest answer per page. `QS_CONSOLE_POSTGRES_URL` (an empty
//! database) runs it on PostgreSQL instead.
//!
//! `cargo bench -p control-plane --bench console_pages`

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

mod support;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, header};
use http_body_util::BodyExt;
use serde_json::json;
use support::{env_or, runtime, send, setup};
use tower::ServiceExt;

const DAY_MS: i64 = 86_400_000;

fn main() {
    let entries = env_or("QS_CONSOLE_ENTRIES", 10_000);
    let users = env_or("QS_CONSOLE_USERS", 1_000);
    let rounds = env_or("QS_CONSOLE_ROUNDS", 50);
    let dir = tempfile::tempdir().expect("dir");
    let database = match std::env::var("QS_CONSOLE_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => control_plane::config::DatabaseUrl::Postgres(url),
        _ => control_plane::config::DatabaseUrl::SqliteFile(
            dir.path().join("console.db").display().to_string(),
        ),
    };
    runtime().block_on(async move {
        let (app, key) = setup(database, |_| {}).await;
        seed(&app, &key, entries, users).await;
        let cookie = sign_in(&app, &key).await;
        println!("console pages, {entries} ledger entries for `heavy`, {users} other end users, {rounds} rounds each (ms):");
        println!("{:<52} {:>8} {:>8} {:>8}", "page", "p50", "p99", "max");
        for path in [
            "/console/end-users",
            "/console/end-users?q=user-9",
            "/console/end-users/heavy",
            "/console/end-users/heavy?type=grant",
            "/console/explain?end_user=heavy&feature=api_calls&units=100",
            "/console/catalog",
            "/console/webhooks",
            "/console/proxies",
        ] {
            let mut times = Vec::new();
            for _ in 0..rounds {
                let started = Instant::now();
                fetch(&app, &cookie, path).await;
                times.push(started.elapsed());
            }
            times.sort();
            let at = |fraction: f64| {
                let index = ((times.len() as f64 - 1.0) * fraction).round() as usize;
                times[index]
            };
            let ms = |duration: Duration| duration.as_secs_f64() * 1000.0;
            println!("{path:<52} {:>8.2} {:>8.2} {:>8.2}", ms(at(0.5)), ms(at(0.99)), ms(*times.last().unwrap()));
        }
    });
}

/// `heavy` gets one grant and `entries - 1` usage events, 1,000 a batch, stamped over
/// the last 29 days; `users` others one grant each.
async fn seed(app: &axum::Router, key: &str, entries: u64, users: u64) {
    send(
        app,
        key,
        Request::post("/v1/credits/grants"),
        Some(json!({"end_user_id": "heavy", "amount": 1_000_000_000})),
    )
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    let now = i64::try_from(now).expect("ms");
    let span = 29 * DAY_MS;
    let usage = entries.saturating_sub(1);
    let mut index = 0;
    while index < usage {
        let events: Vec<_> = (index..usage.min(index + 1_000))
            .map(|event| {
                let at = now - span + span * i64::try_from(event).expect("small") / i64::try_from(usage).expect("small");
                let at = ledger::Timestamp::from_millis(at).to_string();
                json!({"end_user_id": "heavy", "feature_key": "api_calls", "units": 1 + event % 5, "idempotency_key": format!("h-{event}"), "timestamp": at})
            })
            .collect();
        index += u64::try_from(events.len()).expect("small");
        send(
            app,
            key,
            Request::post("/v1/usage/batch"),
            Some(json!({ "events": events })),
        )
        .await;
    }
    for user in 0..users {
        send(
            app,
            key,
            Request::post("/v1/credits/grants"),
            Some(json!({"end_user_id": format!("user-{user}"), "amount": 100})),
        )
        .await;
    }
}

async fn sign_in(app: &axum::Router, key: &str) -> String {
    let form: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("key", key)
        .finish();
    let request = Request::post("/console/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form))
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("response");
    let cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .expect("signed in")
        .to_str()
        .expect("text");
    cookie.split(';').next().expect("cookie").to_owned()
}

async fn fetch(app: &axum::Router, cookie: &str, path: &str) {
    let request = Request::get(path)
        .header(header::COOKIE, cookie)
        .body(Body::empty())
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert!(
        status.is_success(),
        "{path}: {status} {}",
        String::from_utf8_lossy(&body)
    );
}
