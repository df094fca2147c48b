//! What P4's rows cost SQLite alone: the storage floor under `p4_ingest`.
//!
//! Run: `cargo bench -p control-plane --bench p4_floor` (release build). It records one
//! batch of 500 usage events through the control plane to get real rows, then writes
//! `QS_P4_BATCHES` (default 200) batches' worth of the same rows straight into the same
//! SQLite file (`synchronous = full`), one transaction per batch as the store does: the
//! end-user upserts, 500 entries, 500 usage keys and the change feed's row naming the
//! batch's end users, and the batch's run of entries (entries and end users carry the
//! chain's columns as the store writes them; the values are plausible, not real links). No HTTP, no JSON parsing, no engine: what is left is SQLite and the
//! driver. It does so twice, each time on a fresh database:
//! - through sqlx, in multi-row statements of 200 rows, as the store does;
//! - through rusqlite (the same SQLite library, called directly on this thread), one
//!   cached prepared statement per kind of row, executed once per row.
//!
//! `QS_P4_FLOOR_DRIVER=sqlx` or `=rusqlite` runs only one; `QS_P4_FLOOR_DROP=index,index`
//! drops those indexes first, to price them. The rusqlite run also prints its time by
//! kind of row and for the commit; `QS_P4_FLOOR_UPDATE=1` writes known end users with a
//! plain `UPDATE` instead of the store's upsert.

// A benchmark program: it prints its report and panics on setup failures.
// A bench prints its report; a setup failure panics; a scenario reads top to bottom.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines
)]

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use axum::http::Request;
use control_plane::config::DatabaseUrl;
use serde_json::json;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use support::{env_or, send, setup};

const USERS: u64 = 1000;
const BATCH_LEN: u64 = 500;
const ROWS_PER_STATEMENT: usize = 200;

const UPSERT_TAIL: &str = " ON CONFLICT (tenant_id, environment, end_user_id) DO UPDATE SET state = excluded.state, version = excluded.version, next_due_at = excluded.next_due_at, updated_at = excluded.updated_at, last_entry_seq = COALESCE(excluded.last_entry_seq, last_entry_seq)";

/// Real rows to copy: an entry, a state and a usage key of a recorded batch.
struct Sample {
    tenant: String,
    environment: String,
    entry_type: String,
    body: String,
    state: String,
    fingerprint: Vec<u8>,
    result: String,
}

/// One batch's event numbers and the end users they touch.
fn batch_rows(batch: u64) -> (Vec<u64>, Vec<String>) {
    let indexes: Vec<u64> = (0..BATCH_LEN)
        .map(|offset| batch * BATCH_LEN + offset)
        .collect();
    let users: BTreeSet<u64> = indexes.iter().map(|index| index % USERS).collect();
    (
        indexes,
        users.iter().map(|user| format!("user_{user}")).collect(),
    )
}

/// A batch's run of entries as the store records it (migration 0008): plausible
/// numbers, past those of the batch recorded through the control plane.
fn run_of(batch: u64) -> (i64, i64) {
    let first = small(1_000_000_000 + batch * BATCH_LEN);
    (
        first,
        first.checked_add(small(BATCH_LEN - 1)).expect("small"),
    )
}

fn small(value: u64) -> i64 {
    i64::try_from(value).expect("small")
}

/// The previous entry of the same end user, as a chain link would name it.
fn prev_of(index: u64) -> Option<i64> {
    index.checked_sub(USERS).map(small)
}

async fn pool(path: &Path) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full);
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("pool")
}

/// A database at `path` holding one recorded batch (indexes dropped as asked), and rows
/// of it to copy.
async fn prepare(path: &Path) -> Sample {
    let (app, key) = setup(DatabaseUrl::SqliteFile(path.display().to_string()), |_| {}).await;
    let events: Vec<serde_json::Value> = (0..BATCH_LEN)
        .map(|index| json!({"end_user_id": format!("user_{}", index % USERS), "feature_key": "api_calls", "units": 1, "idempotency_key": format!("sample-{index}")}))
        .collect();
    send(
        &app,
        &key,
        Request::post("/v1/usage/batch"),
        Some(json!({ "events": events })),
    )
    .await;
    drop(app);
    let pool = pool(path).await;
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
    let entry = sqlx::query(
        "SELECT tenant_id, environment, type, body FROM entries ORDER BY seq DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .expect("an entry");
    let state: String = sqlx::query_scalar("SELECT state FROM end_users LIMIT 1")
        .fetch_one(&pool)
        .await
        .expect("a state");
    let usage_key = sqlx::query("SELECT fingerprint, result FROM usage_keys LIMIT 1")
        .fetch_one(&pool)
        .await
        .expect("a usage key");
    pool.close().await;
    Sample {
        tenant: entry.get(0),
        environment: entry.get(1),
        entry_type: entry.get(2),
        body: entry.get(3),
        state,
        fingerprint: usage_key.get(0),
        result: usage_key.get(1),
    }
}

/// The rows through sqlx, as the store writes them; returns the seconds taken.
async fn write_sqlx(path: &Path, s: &Sample, batches: u64) -> f64 {
    let pool = pool(path).await;
    let started = Instant::now();
    for batch in 0..batches {
        let (indexes, users) = batch_rows(batch);
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
        for chunk in users.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO end_users (tenant_id, environment, end_user_id, state, version, next_due_at, updated_at, last_entry_seq) ",
            );
            query.push_values(chunk, |mut row, user| {
                row.push_bind(&s.tenant)
                    .push_bind(&s.environment)
                    .push_bind(user)
                    .push_bind(&s.state)
                    .push_bind(small(batch))
                    .push_bind(None::<i64>)
                    .push_bind(0_i64)
                    .push_bind(small(batch * BATCH_LEN));
            });
            query.push(UPSERT_TAIL);
            query.build().execute(&mut *tx).await.expect("end users");
        }
        for chunk in indexes.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO entries (id, tenant_id, environment, end_user_id, prev_seq, type, created_at, body) ",
            );
            query.push_values(chunk, |mut row, index| {
                row.push_bind(format!("ent_{index:026}"))
                    .push_bind(&s.tenant)
                    .push_bind(&s.environment)
                    .push_bind(format!("user_{}", index % USERS))
                    .push_bind(prev_of(*index))
                    .push_bind(&s.entry_type)
                    .push_bind(0_i64)
                    .push_bind(&s.body);
            });
            query.build().execute(&mut *tx).await.expect("entries");
        }
        let (first, last) = run_of(batch);
        sqlx::query("INSERT INTO entry_runs (tenant_id, environment, first_seq, last_seq) VALUES (?, ?, ?, ?)")
            .bind(&s.tenant)
            .bind(&s.environment)
            .bind(first)
            .bind(last)
            .execute(&mut *tx)
            .await
            .expect("entry run");
        for chunk in indexes.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO usage_keys (tenant_id, environment, key, fingerprint, entry_id, result, keep_until) ",
            );
            query.push_values(chunk, |mut row, index| {
                row.push_bind(&s.tenant)
                    .push_bind(&s.environment)
                    .push_bind(format!("event-{index}"))
                    .push_bind(s.fingerprint.as_slice())
                    .push_bind(format!("ent_{index:026}"))
                    .push_bind(&s.result)
                    .push_bind(i64::MAX);
            });
            query.build().execute(&mut *tx).await.expect("usage keys");
        }
        sqlx::query("INSERT INTO changes (tenant_id, environment, kind, end_user_ids, created_at) VALUES (?, ?, 'end_users', ?, 0)")
            .bind(&s.tenant)
            .bind(&s.environment)
            .bind(serde_json::to_string(&users).expect("ids"))
            .execute(&mut *tx)
            .await
            .expect("change");
        tx.commit().await.expect("commit");
    }
    let secs = started.elapsed().as_secs_f64();
    pool.close().await;
    secs
}

/// The same rows through rusqlite on this thread; returns the seconds taken.
fn write_rusqlite(path: &Path, s: &Sample, batches: u64) -> f64 {
    let mut connection = rusqlite::Connection::open(path).expect("open");
    let mode: String = connection
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .expect("journal mode");
    assert_eq!(mode, "wal");
    connection
        .pragma_update(None, "synchronous", "FULL")
        .expect("synchronous");
    // Time spent on each kind of row and on the commit, over all batches.
    let mut phases = [std::time::Duration::ZERO; 5];
    let mut lap = Instant::now();
    let mut phase = |index: usize| {
        let now = Instant::now();
        phases[index] += now - lap;
        lap = now;
    };
    let updates = std::env::var("QS_P4_FLOOR_UPDATE").is_ok();
    let started = Instant::now();
    for batch in 0..batches {
        let (indexes, users) = batch_rows(batch);
        let tx = connection
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .expect("begin");
        {
            let mut upsert = tx
                .prepare_cached(&format!("INSERT INTO end_users (tenant_id, environment, end_user_id, state, version, next_due_at, updated_at, last_entry_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?){UPSERT_TAIL}"))
                .expect("prepare");
            let mut update = tx
                .prepare_cached("UPDATE end_users SET state = ?4, version = ?5, next_due_at = ?6, updated_at = ?7, last_entry_seq = COALESCE(?8, last_entry_seq) WHERE tenant_id = ?1 AND environment = ?2 AND end_user_id = ?3")
                .expect("prepare");
            phase(4);
            for user in &users {
                let values = rusqlite::params![
                    s.tenant,
                    s.environment,
                    user,
                    s.state,
                    small(batch),
                    None::<i64>,
                    0_i64,
                    small(batch * BATCH_LEN)
                ];
                if !(updates && update.execute(values).expect("end user") == 1) {
                    upsert.execute(values).expect("end user");
                }
            }
            phase(0);
            let mut entry = tx
                .prepare_cached("INSERT INTO entries (id, tenant_id, environment, end_user_id, prev_seq, type, created_at, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
                .expect("prepare");
            for index in &indexes {
                entry
                    .execute(rusqlite::params![
                        format!("ent_{index:026}"),
                        s.tenant,
                        s.environment,
                        format!("user_{}", index % USERS),
                        prev_of(*index),
                        s.entry_type,
                        0_i64,
                        s.body
                    ])
                    .expect("entry");
            }
            let (first, last) = run_of(batch);
            tx.prepare_cached("INSERT INTO entry_runs (tenant_id, environment, first_seq, last_seq) VALUES (?, ?, ?, ?)")
                .expect("prepare")
                .execute(rusqlite::params![s.tenant, s.environment, first, last])
                .expect("entry run");
            phase(1);
            let mut usage_key = tx
                .prepare_cached("INSERT INTO usage_keys (tenant_id, environment, key, fingerprint, entry_id, result, keep_until) VALUES (?, ?, ?, ?, ?, ?, ?)")
                .expect("prepare");
            for index in &indexes {
                usage_key
                    .execute(rusqlite::params![
                        s.tenant,
                        s.environment,
                        format!("event-{index}"),
                        s.fingerprint,
                        format!("ent_{index:026}"),
                        s.result,
                        i64::MAX
                    ])
                    .expect("usage key");
            }
            phase(2);
            tx.prepare_cached("INSERT INTO changes (tenant_id, environment, kind, end_user_ids, created_at) VALUES (?, ?, 'end_users', ?, 0)")
                .expect("prepare")
                .execute(rusqlite::params![
                    s.tenant,
                    s.environment,
                    serde_json::to_string(&users).expect("ids")
                ])
                .expect("change");
            phase(3);
        }
        tx.commit().expect("commit");
        phase(4);
    }
    let secs = started.elapsed().as_secs_f64();
    let per_batch = |index: usize| phases[index].as_secs_f64() * 1000.0 / batches as f64;
    println!(
        "  ms per batch: end users {:.2}, entries {:.2}, usage keys {:.2}, feed {:.2}, begin and commit {:.2}",
        per_batch(0),
        per_batch(1),
        per_batch(2),
        per_batch(3),
        per_batch(4)
    );
    secs
}

fn report(driver: &str, secs: f64, batches: u64) {
    let events = (batches * BATCH_LEN) as f64;
    println!(
        "P4 floor (SQLite, rows only, {driver}): {:.0} events/s, {:.2} ms per batch of {BATCH_LEN}",
        events / secs,
        secs * 1000.0 / batches as f64
    );
}

fn main() {
    let batches = env_or("QS_P4_BATCHES", 200);
    let driver = std::env::var("QS_P4_FLOOR_DRIVER").unwrap_or_else(|_| "both".into());
    assert!(
        ["both", "sqlx", "rusqlite"].contains(&driver.as_str()),
        "QS_P4_FLOOR_DRIVER is sqlx, rusqlite or both, not `{driver}`"
    );
    let runtime = support::runtime();
    if driver != "rusqlite" {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("floor.db");
        let secs = runtime.block_on(async {
            let sample = prepare(&path).await;
            write_sqlx(&path, &sample, batches).await
        });
        report("sqlx, multi-row statements", secs, batches);
    }
    if driver != "sqlx" {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("floor.db");
        let sample = runtime.block_on(prepare(&path));
        let secs = write_rusqlite(&path, &sample, batches);
        report("rusqlite, prepared statements", secs, batches);
    }
}
