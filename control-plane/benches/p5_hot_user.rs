//! P5 (DESIGN.md): 32 concurrent debitors on one end user, with group commit against the
//! naive one-commit-per-debit baseline measured in the same run, on both stores.
//!
//! Run: `cargo bench -p control-plane --bench p5_hot_user` (release build). On SQLite (a
//! temporary file, `synchronous = full`: every commit is fsynced) and, when
//! `QS_BENCH_POSTGRES_URL` is set, on PostgreSQL, 32 tasks each send `QS_P5_DEBITS`
//! (default 100) `POST /v1/usage` requests for one end user, one after another (once
//! without idempotency keys, once with a key each), through the router in process (no sockets: this measures
//! the store). The baseline is the same server with `database.group_commit_max = 1`
//! (every debit its own transaction); the grouped run uses the default (64). Each run
//! starts from a fresh database and checks the end user's final balance to the credit.
//!
//! A third pair of runs spreads the same debitors over 32 end users, one each, without
//! keys: nothing to group per end user, so what the default gains there is SQLite's
//! transactions shared among end users (`group.rs`; PostgreSQL commits each end user's
//! group on its own, concurrently).

// A benchmark program: it prints its report and panics on setup failures.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Instant;

use axum::http::Request;
use control_plane::config::DatabaseUrl;
use serde_json::json;
use support::{env_or, send, setup};

const DEBITORS: u64 = 32;
const GRANT: u64 = 1_000_000_000;

/// The end user debitor `debitor` debits: the hot one, or one of its own (`spread`).
fn end_user(debitor: u64, spread: bool) -> String {
    if spread {
        format!("user_{debitor}")
    } else {
        "hot".into()
    }
}

/// Debits per second with `group_commit_max`, after checking the final balances.
async fn run(
    database: DatabaseUrl,
    group_commit_max: usize,
    debits: u64,
    (keyed, spread): (bool, bool),
) -> f64 {
    let (app, key) = setup(database, |config| {
        config.max_connections = 64;
        config.group_commit_max = group_commit_max;
    })
    .await;
    let users = if spread { DEBITORS } else { 1 };
    for debitor in 0..users {
        send(
            &app,
            &key,
            Request::post("/v1/credits/grants"),
            Some(json!({"end_user_id": end_user(debitor, spread), "amount": GRANT})),
        )
        .await;
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for debitor in 0..DEBITORS {
        let (app, key) = (app.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            for index in 0..debits {
                let mut request = Request::post("/v1/usage");
                if keyed {
                    request = request.header("idempotency-key", format!("debit-{debitor}-{index}"));
                }
                let body = json!({
                    "end_user_id": end_user(debitor, spread), "feature_key": "api_calls", "units": 1,
                });
                send(&app, &key, request, Some(body)).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("debitor");
    }
    let seconds = started.elapsed().as_secs_f64();
    let total = DEBITORS * debits;
    for debitor in 0..users {
        let balance = send(
            &app,
            &key,
            Request::get(format!(
                "/v1/credits/balance?end_user_id={}",
                end_user(debitor, spread)
            )),
            None,
        )
        .await;
        assert_eq!(
            balance["available"].as_u64(),
            Some(GRANT - total / users),
            "the final balance is exact"
        );
    }
    total as f64 / seconds
}

async fn measure(label: &str, database: impl Fn() -> DatabaseUrl) {
    let debits = env_or("QS_P5_DEBITS", 100);
    for (keyed, spread, what) in [
        (false, false, "on one end user, no keys"),
        (true, false, "on one end user, an Idempotency-Key each"),
        (false, true, "on an end user each, no keys"),
    ] {
        let naive = run(database(), 1, debits, (keyed, spread)).await;
        let grouped = run(database(), 64, debits, (keyed, spread)).await;
        println!(
            "P5 {label}, {DEBITORS} debitors {what}: one commit per debit {naive:.0} debits/s; group commit {grouped:.0} debits/s; ratio {:.1}x (final balances exact)",
            grouped / naive
        );
    }
}

fn main() {
    let runtime = support::runtime();
    runtime.block_on(async {
        let directory = tempfile::tempdir().expect("temp dir");
        let runs = std::sync::atomic::AtomicU32::new(0);
        measure("SQLite", || {
            let run = runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            DatabaseUrl::SqliteFile(
                directory
                    .path()
                    .join(format!("p5-{run}.db"))
                    .display()
                    .to_string(),
            )
        })
        .await;
        if let Ok(url) = std::env::var("QS_BENCH_POSTGRES_URL") {
            measure("PostgreSQL", || DatabaseUrl::Postgres(url.clone())).await;
        }
    });
}
