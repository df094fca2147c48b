//! What P4's rows cost SQLite alone: the storage floor under `p4_ingest`.
//!
//! Run: `cargo bench -p control-plane --bench p4_floor` (release build). It records one
//! batch of 500 usage events through the control plane to get real rows, then writes
//! `QS_P4_BATCHES` (default 200) batches' worth of the same rows straight into the same
//! SQLite file (`synchronous = full`), one transaction per batch as the store does: the
//! end-user upserts, 500 entries, 500 usage keys and the change-feed rows, in multi-row
//! statements of 200 rows (entries and end users carry the chain's columns as the store
//! writes them; the values are plausible, not real links). No HTTP, no JSON parsing, no engine: what is left is SQLite and the
//! driver. `QS_P4_FLOOR_DROP=index,index` drops those indexes first, to price them.

// A benchmark program: it prints its report and panics on setup failures.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::time::Instant;

use axum::http::Request;
use control_plane::config::DatabaseUrl;
use serde_json::json;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite};
use support::{env_or, send, setup};

const USERS: u64 = 1000;
const BATCH_LEN: u64 = 500;
const ROWS_PER_STATEMENT: usize = 200;

fn main() {
    let runtime = support::runtime();
    runtime.block_on(async {
        let batches = env_or("QS_P4_BATCHES", 200);
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("floor.db");
        let (app, key) = setup(DatabaseUrl::SqliteFile(path.display().to_string()), |_| {}).await;
        let events: Vec<serde_json::Value> = (0..BATCH_LEN)
            .map(|index| json!({"end_user_id": format!("user_{}", index % USERS), "feature_key": "api_calls", "units": 1, "idempotency_key": format!("sample-{index}")}))
            .collect();
        send(&app, &key, Request::post("/v1/usage/batch"), Some(json!({ "events": events }))).await;

        let options = SqliteConnectOptions::new()
            .filename(&path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .expect("pool");
        if let Ok(indexes) = std::env::var("QS_P4_FLOOR_DROP") {
            for index in indexes.split(',').filter(|index| !index.is_empty()) {
                assert!(
                    index.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "QS_P4_FLOOR_DROP takes index names, not `{index}`"
                );
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX {index}")))
                    .execute(&pool)
                    .await
                    .expect("an index of the schema");
            }
        }
        // Real rows to copy: an entry, a state and a usage key of the batch just recorded.
        let entry = sqlx::query("SELECT tenant_id, environment, type, body FROM entries ORDER BY seq DESC LIMIT 1")
            .fetch_one(&pool)
            .await
            .expect("an entry");
        let (tenant, environment): (String, String) = (entry.get(0), entry.get(1));
        let (entry_type, body): (String, String) = (entry.get(2), entry.get(3));
        let state: String = sqlx::query_scalar("SELECT state FROM end_users LIMIT 1")
            .fetch_one(&pool)
            .await
            .expect("a state");
        let usage_key = sqlx::query("SELECT fingerprint, result FROM usage_keys LIMIT 1")
            .fetch_one(&pool)
            .await
            .expect("a usage key");
        let (fingerprint, result): (Vec<u8>, String) = (usage_key.get(0), usage_key.get(1));

        let started = Instant::now();
        for batch in 0..batches {
            let indexes: Vec<u64> = (0..BATCH_LEN).map(|offset| batch * BATCH_LEN + offset).collect();
            let users: BTreeSet<u64> = indexes.iter().map(|index| index % USERS).collect();
            let users: Vec<String> = users.iter().map(|user| format!("user_{user}")).collect();
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
            for chunk in users.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::<Sqlite>::new("INSERT INTO end_users (tenant_id, environment, end_user_id, state, version, next_due_at, updated_at, last_entry_seq) ");
                query.push_values(chunk, |mut row, user| {
                    row.push_bind(&tenant).push_bind(&environment).push_bind(user).push_bind(&state)
                        .push_bind(i64::try_from(batch).expect("small")).push_bind(None::<i64>).push_bind(0_i64)
                        .push_bind(i64::try_from(batch * BATCH_LEN).expect("small"));
                });
                query.push(" ON CONFLICT (tenant_id, environment, end_user_id) DO UPDATE SET state = excluded.state, version = excluded.version, next_due_at = excluded.next_due_at, updated_at = excluded.updated_at, last_entry_seq = COALESCE(excluded.last_entry_seq, last_entry_seq)");
                query.build().execute(&mut *tx).await.expect("end users");
            }
            for chunk in indexes.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::<Sqlite>::new("INSERT INTO entries (id, tenant_id, environment, end_user_id, prev_seq, type, created_at, body) ");
                query.push_values(chunk, |mut row, index| {
                    let user = index % USERS;
                    // The store links each entry to its end user's previous one (a value of
                    // that kind; the cost of writing it is what counts here).
                    let prev = index.checked_sub(USERS).map(|prev| i64::try_from(prev).expect("small"));
                    row.push_bind(format!("ent_{index:026}")).push_bind(&tenant).push_bind(&environment)
                        .push_bind(format!("user_{user}")).push_bind(prev).push_bind(&entry_type)
                        .push_bind(0_i64).push_bind(&body);
                });
                query.build().execute(&mut *tx).await.expect("entries");
            }
            for chunk in indexes.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::<Sqlite>::new("INSERT INTO usage_keys (tenant_id, environment, key, fingerprint, entry_id, result, keep_until) ");
                query.push_values(chunk, |mut row, index| {
                    row.push_bind(&tenant).push_bind(&environment).push_bind(format!("event-{index}"))
                        .push_bind(fingerprint.as_slice()).push_bind(format!("ent_{index:026}"))
                        .push_bind(&result).push_bind(i64::MAX);
                });
                query.build().execute(&mut *tx).await.expect("usage keys");
            }
            for chunk in users.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::<Sqlite>::new("INSERT INTO changes (tenant_id, environment, kind, end_user_id, created_at) ");
                query.push_values(chunk, |mut row, user| {
                    row.push_bind(&tenant).push_bind(&environment).push_bind("end_user").push_bind(user).push_bind(0_i64);
                });
                query.build().execute(&mut *tx).await.expect("changes");
            }
            tx.commit().await.expect("commit");
        }
        let secs = started.elapsed().as_secs_f64();
        let events = (batches * BATCH_LEN) as f64;
        println!(
            "P4 floor (SQLite, rows only): {:.0} events/s, {:.2} ms per batch of {BATCH_LEN}",
            events / secs,
            secs * 1000.0 / batches as f64
        );
    });
}
