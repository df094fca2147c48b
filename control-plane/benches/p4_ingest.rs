//! P4 (DESIGN.md): durable, idempotent usage ingestion in batches of 500, against the
//! one-event-per-transaction baseline measured in the same run.
//!
//! Run: `cargo bench -p control-plane --bench p4_ingest` (release build). On SQLite (a
//! temporary file, `synchronous = full`: every commit is fsynced) and, when
//! `QS_BENCH_POSTGRES_URL` is set, on PostgreSQL, it sends:
//! - baseline: `QS_P4_SINGLES` (default 2,000) `POST /v1/usage` requests, one event each
//!   with an `Idempotency-Key`, two in flight;
//! - batched: `QS_P4_BATCHES` (default 200) `POST /v1/usage/batch` requests of 500 events
//!   each with per-event keys, two in flight;
//!
//! over 1,000 end users, through the router in process (no sockets: this measures the
//! store, not the network), and prints events per second for both and their ratio. Every
//! request body is written before the clock starts (the client's work is not the server's).

// A benchmark program: it prints its report and panics on setup failures.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::http::Request;
use control_plane::config::DatabaseUrl;
use serde_json::json;
use support::{env_or, send_text, setup};

const USERS: u64 = 1000;
const BATCH_LEN: u64 = 500;

/// Runs `count` jobs with two in flight at all times (two client tasks, each sending its
/// next request as soon as its last one is answered, as a server sees two busy
/// connections); returns the seconds taken.
async fn two_in_flight<F, Fut>(count: u64, job: F) -> f64
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let job = std::sync::Arc::new(job);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (job, next) = (job.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if index >= count {
                        break;
                    }
                    job(index).await;
                }
            })
        })
        .collect();
    for client in clients {
        client.await.expect("client");
    }
    started.elapsed().as_secs_f64()
}

async fn measure(label: &str, database: DatabaseUrl) {
    let singles = env_or("QS_P4_SINGLES", 2000);
    let batches = env_or("QS_P4_BATCHES", 200);
    // Every request body is written before the clock starts: the client's work is not
    // the server's.
    let single_bodies: Arc<Vec<Bytes>> = Arc::new(
        (0..singles)
            .map(|index| {
                Bytes::from(json!({"end_user_id": format!("user_{}", index % USERS), "feature_key": "api_calls", "units": 1}).to_string())
            })
            .collect(),
    );
    let batch_bodies: Arc<Vec<Bytes>> = Arc::new(
        (0..batches)
            .map(|batch| {
                let events: Vec<serde_json::Value> = (0..BATCH_LEN)
                    .map(|offset| {
                        let index = batch * BATCH_LEN + offset;
                        json!({"end_user_id": format!("user_{}", index % USERS), "feature_key": "api_calls", "units": 1, "idempotency_key": format!("event-{index}")})
                    })
                    .collect();
                Bytes::from(json!({ "events": events }).to_string())
            })
            .collect(),
    );
    let (app, key) = setup(database, |_| {}).await;
    let (single_app, single_key) = (app.clone(), key.clone());
    let baseline_secs = two_in_flight(singles, move |index| {
        let (app, key, bodies) = (
            single_app.clone(),
            single_key.clone(),
            single_bodies.clone(),
        );
        async move {
            let request =
                Request::post("/v1/usage").header("idempotency-key", format!("single-{index}"));
            send_text(
                &app,
                &key,
                request,
                bodies.get(usize::try_from(index).expect("small")).cloned(),
            )
            .await;
        }
    })
    .await;
    let batched_secs = two_in_flight(batches, move |batch| {
        let (app, key, bodies) = (app.clone(), key.clone(), batch_bodies.clone());
        async move {
            let body = bodies.get(usize::try_from(batch).expect("small")).cloned();
            send_text(&app, &key, Request::post("/v1/usage/batch"), body).await;
        }
    })
    .await;
    let baseline = singles as f64 / baseline_secs;
    let batched = (batches * BATCH_LEN) as f64 / batched_secs;
    println!(
        "P4 {label}: one event per transaction {baseline:.0} events/s; batches of {BATCH_LEN}: {batched:.0} events/s; ratio {:.1}x",
        batched / baseline
    );
}

fn main() {
    let runtime = support::runtime();
    runtime.block_on(async {
        let directory = tempfile::tempdir().expect("temp dir");
        measure(
            "SQLite",
            DatabaseUrl::SqliteFile(directory.path().join("p4.db").display().to_string()),
        )
        .await;
        if let Ok(url) = std::env::var("QS_BENCH_POSTGRES_URL") {
            measure("PostgreSQL", DatabaseUrl::Postgres(url)).await;
        }
    });
}
