//! The PostgreSQL-only guarantees, against a real server: each test makes its own
//! schema on `QS_TEST_POSTGRES_URL` and returns at once when it is unset. The shared
//! behaviour is the control-plane suite's, run on both stores.

// A scenario test reads top to bottom as one story however long it is.
#![allow(clippy::too_many_lines)]

use std::sync::Arc;
use std::time::Duration;

use ledger::{EndUserId, EndUserState, Timestamp};
use sqlx::PgPool;

use super::PostgresStore;
use super::end_users::lock_state;
use super::write::{insert_change, take_positions};
use crate::store::LeaseAsk;
use crate::store::{
    ApiKeyRecord, AttemptRecord, CatalogRecord, CatalogStore, Changes, DeliveryClaim,
    DeliveryLease, EndpointRecord, EndpointStore, EntryFilter, Env, EnvRecord, Environment,
    FeedReadStore, FeedStore, IdempotencyAnswer, IdempotencyAnswerStore, IdempotencyBegin,
    IdempotencyStore, JobStore, LedgerStore, Mutation, RecordStore, StoreError, StoreResult,
    TenancyStore, TenantRecord, WebhookStore, user_key,
};

const T0: Timestamp = Timestamp::from_millis(1_767_225_600_000);

// The key is on disk: it must never change for a given end user.
#[test]
fn user_keys_are_stable_and_narrow() {
    let env = |tenant: &str, environment| Env {
        tenant_id: tenant.into(),
        environment,
    };
    let key = user_key(&env("ten_1", Environment::Live), "user_1");
    // Python: int.from_bytes(sha256(b"ten_1\0live\0user_1").digest()[:4], "big") >> 1
    assert_eq!(key, 0x7318_89a9, "the stored key changed");
    assert!(key >= 0, "31 bits, never negative");
    assert_ne!(key, user_key(&env("ten_1", Environment::Test), "user_1"));
    assert_ne!(key, user_key(&env("ten_2", Environment::Live), "user_1"));
    assert_ne!(key, user_key(&env("ten_1", Environment::Live), "user_2"));
}

/// A store on a fresh schema, dropped with it.
struct TestStore {
    store: PostgresStore,
    url: String,
    schema: String,
}

impl std::ops::Deref for TestStore {
    type Target = PostgresStore;

    fn deref(&self) -> &PostgresStore {
        &self.store
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        // Drop runs inside the test's runtime, which cannot block on itself: clean up
        // on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                if let Ok(admin) = PgPool::connect(&url).await {
                    let drop_schema = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                    if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(drop_schema))
                        .execute(&admin)
                        .await
                    {
                        eprintln!("could not drop test schema {schema}: {error}");
                    }
                    admin.close().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A store on a fresh schema, or `None` without a server to test against.
async fn store() -> Option<TestStore> {
    let url = std::env::var("QS_TEST_POSTGRES_URL")
        .ok()
        .filter(|url| !url.is_empty())?;
    let schema = format!("qs_t_{:016x}", rand::random::<u64>());
    let admin = PgPool::connect(&url).await.expect("the server answers");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .expect("create schema");
    admin.close().await;
    let separator = if url.contains('?') { '&' } else { '?' };
    let scoped = format!("{url}{separator}options=-c%20search_path%3D{schema}");
    let store = PostgresStore::open(&scoped, 32).await.expect("store opens");
    Some(TestStore { store, url, schema })
}

fn env(tenant: &str) -> Env {
    Env::new(tenant, Environment::Test)
}

async fn tenant(store: &PostgresStore, id: &str) -> Env {
    let record = TenantRecord {
        id: id.into(),
        name: id.into(),
        created_at: T0,
    };
    store.create_tenant(&record, &[]).await.expect("tenant");
    env(id)
}

fn user(id: &str) -> EndUserId {
    EndUserId::new(id).expect("end user id")
}

/// Grants `amount` to `end_user`: a state change, an entry, a block and an event.
async fn grant(store: &PostgresStore, env: &Env, end_user: &EndUserId, amount: i64) {
    crate::store::testing::grant(store, env, end_user, amount, T0).await;
}

// Several end users' mutations in one transaction, each answered on its own: a refused
// one, or one whose answer finds its key answered already, leaves nothing and gives its
// claim back; the others commit.
#[tokio::test]
async fn each_mutation_commits_or_fails_alone() {
    let Some(store) = store().await else { return };
    let env = tenant(&store, "t_each").await;
    crate::store::testing::each_mutation_commits_or_fails_alone(&*store, &env, T0).await;
}

// One batch of leases answers each as if they had come one by one: a key repeated
// later in the batch finds the first one's lease, a different request with it is a
// mismatch, an answered key replays.
#[tokio::test]
async fn a_batch_of_leases_answers_each_in_order() {
    let Some(store) = store().await else { return };
    let env = tenant(&store, "t_batch").await;
    let lease =
        |key: &str, fingerprint: u8| crate::store::testing::lease(&env, key, fingerprint, T0);
    store
        .take_leases(&[lease("done", 1)])
        .await
        .expect("first lease");
    store
        .idempotency_finish(
            &env,
            &IdempotencyAnswer {
                key: "done".into(),
                status: 201,
                body: b"{}".to_vec(),
            },
        )
        .await
        .expect("finish");
    let batch = [
        lease("b", 1),
        lease("a", 1),
        lease("b", 1),
        lease("a", 2),
        lease("done", 1),
    ];
    let answers = store.take_leases(&batch).await.expect("batch");
    let kinds = crate::store::testing::kinds(&answers);
    assert_eq!(
        kinds,
        ["started", "started", "in flight", "mismatch", "replay"]
    );
}

/// Forces the interleaving a feed must survive: transaction A takes the next position
/// and stays open; transaction B (an ordinary mutation) tries to append after it and
/// would commit first. B is made to wait on A's `feed_heads` row (seen in
/// `pg_stat_activity`, not guessed with a sleep) and no reader sees B's position
/// before A's; once A commits, a reader by cursor sees A's position, then B's, with no
/// hole — the opposite commit order cannot happen.
#[tokio::test]
async fn a_later_position_cannot_commit_before_an_earlier_one() {
    let Some(store) = store().await else { return };
    let store = Arc::new(store);
    let env = tenant(&store, "ten_order").await;
    grant(&store, &env, &user("u0"), 1).await;
    let before = store.last_change(&env).await.expect("head");

    // A: takes the next change position and holds its transaction open.
    let mut first = store.pool.begin().await.expect("begin A");
    let heads = take_positions(&mut first, &env, 0, 1)
        .await
        .expect("A takes a position");
    let first_seq = heads.last_change;
    assert_eq!(first_seq, before + 1);
    let first_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *first)
        .await
        .expect("A's backend");

    // B: an ordinary mutation of another end user, started after A.
    let second = {
        let (store, env) = (store.clone(), env.clone());
        tokio::spawn(async move { grant(&store, &env, &user("u1"), 1).await })
    };
    // B is blocked on A's lock: it cannot commit position first_seq + 1 yet.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = bind!(sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
        ); first_pid)
        .fetch_one(&store.pool)
        .await
        .expect("pg_stat_activity");
        if waiting >= 1 {
            break;
        }
        assert!(
            !second.is_finished(),
            "B committed while A held the feed head"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "B never reached the feed head"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        store
            .changes_after(&env, before, 100)
            .await
            .expect("read")
            .is_empty(),
        "nothing after A's position is visible while A is open"
    );

    // A commits its change; B goes through after it.
    insert_change(&mut first, &env, first_seq, Some("u_a"), T0)
        .await
        .expect("A's change");
    first.commit().await.expect("A commits");
    second.await.expect("B finishes");
    let seen: Vec<i64> = store
        .changes_after(&env, before, 100)
        .await
        .expect("read")
        .iter()
        .map(|change| change.seq)
        .collect();
    assert_eq!(seen, vec![first_seq, first_seq + 1], "in order, no hole");
}

// Migration 0002 computes the key of entries already written in SQL: it must give
// what `user_key` gives for every later entry, or those end users' history would be
// split. Run on entries written now with their keys zeroed, then listed by end user.
#[tokio::test]
async fn the_migration_keys_entries_as_the_store_does() {
    let Some(store) = store().await else { return };
    let env = tenant(&store, "ten_keys").await;
    for (end_user, amount) in [("u1", 5), ("ü-2", 7), ("u1", 9)] {
        grant(&store, &env, &user(end_user), amount).await;
    }
    sqlx::query("UPDATE entries SET user_key = 0")
        .execute(&store.pool)
        .await
        .expect("zero keys");
    let migration = include_str!("../../../migrations/postgres/0002_entries_user_key.sql");
    let update = migration
        .split(';')
        .map(str::trim)
        .map(|statement| {
            statement
                .lines()
                .filter(|line| !line.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .find(|statement| statement.trim_start().starts_with("UPDATE entries"))
        .expect("the migration's UPDATE");
    sqlx::query(sqlx::AssertSqlSafe(update))
        .execute(&store.pool)
        .await
        .expect("the migration's UPDATE runs");
    let keyed: Vec<(String, i32)> =
        sqlx::query_as("SELECT end_user_id, user_key FROM entries ORDER BY seq")
            .fetch_all(&store.pool)
            .await
            .expect("keys");
    assert_eq!(keyed.len(), 3);
    for (end_user, key) in keyed {
        assert_eq!(key, user_key(&env, &end_user), "{end_user}");
    }
    let filter = |end_user: &str| EntryFilter {
        end_user_id: Some(end_user.into()),
        limit: 10,
        ..EntryFilter::default()
    };
    let amounts = |entries: Vec<(i64, protocol::LedgerEntry)>| -> Vec<i64> {
        entries.iter().map(|(_, entry)| entry.amount).collect()
    };
    assert_eq!(
        amounts(store.entries(&env, &filter("u1")).await.expect("u1")),
        [9, 5]
    );
    assert_eq!(
        amounts(store.entries(&env, &filter("ü-2")).await.expect("ü-2")),
        [7]
    );
}

// Catalog keys are unique per environment with SQLite's message; lists keep insertion
// order; API keys, environment records and tenancy round-trip.
#[tokio::test]
async fn catalog_and_tenancy_round_trip() {
    let Some(store) = store().await else { return };
    let acme = tenant(&store, "ten_acme").await;
    let other = tenant(&store, "ten_other").await;
    let feature = |id: &str, key: &str| CatalogRecord {
        id: id.into(),
        key: key.into(),
        parent_id: None,
        body: serde_json::from_value::<protocol::CreateFeature>(
            serde_json::json!({"key": key, "name": key, "type": "metered"}),
        )
        .expect("feature body"),
        archived: false,
        created_at: T0,
    };
    for (id, key) in [("ftr_2", "zeta"), ("ftr_1", "alpha")] {
        store
            .insert_feature(&acme, &feature(id, key))
            .await
            .expect("insert");
    }
    let duplicate = store.insert_feature(&acme, &feature("ftr_3", "zeta")).await;
    match duplicate {
        Err(StoreError::Conflict(message)) => {
            assert_eq!(message, "a feature with key `zeta` already exists");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    store
        .insert_feature(&other, &feature("ftr_4", "zeta"))
        .await
        .expect("another tenant may use the key");
    let keys: Vec<String> = store
        .features(&acme)
        .await
        .expect("list")
        .into_iter()
        .map(|record| record.key)
        .collect();
    assert_eq!(keys, ["zeta", "alpha"]);

    let key = ApiKeyRecord {
        id: "key_1".into(),
        tenant_id: "ten_acme".into(),
        environment: Environment::Test,
        name: Some("ci".into()),
        scopes: vec!["all".into()],
        prefix: "qs_test_".into(),
        key_hash: [7; 32],
        created_at: T0,
        revoked_at: None,
    };
    store.insert_api_key(&key).await.expect("key");
    let found = store.api_key_by_hash(&[7; 32]).await.expect("lookup");
    assert_eq!(found.map(|key| key.id).as_deref(), Some("key_1"));
    let revoked = store
        .revoke_api_key(&acme, "key_1", T0)
        .await
        .expect("revoke")
        .expect("the key");
    assert_eq!(revoked.revoked_at, Some(T0));
    assert!(
        store
            .revoke_api_key(&other, "key_1", T0)
            .await
            .expect("revoke")
            .is_none(),
        "another tenant's key is not found"
    );
    let record = EnvRecord {
        clock_offset_ms: 42,
        ..EnvRecord::default()
    };
    store.put_env_record(&acme, &record).await.expect("put");
    assert_eq!(
        store.env_record(&acme).await.expect("get").clock_offset_ms,
        42
    );
    assert_eq!(store.environments().await.expect("environments").len(), 4);
}

// Many writers on different end users and a follower paging by cursor at the same
// time: every page the follower reads starts right after its cursor and has no holes,
// so positions become visible in order and nothing is ever skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn feeds_never_skip_under_concurrent_writers() {
    let Some(store) = store().await else { return };
    let store = Arc::new(store);
    let env = tenant(&store, "ten_acme").await;
    const WRITERS: usize = 8;
    const GRANTS: usize = 20;
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let (store, env) = (store.clone(), env.clone());
        writers.push(tokio::spawn(async move {
            for grant_index in 0..GRANTS {
                grant(&store, &env, &user(&format!("u{writer}")), 1).await;
                if grant_index % 5 == 0 {
                    store
                        .record_catalog_change(&env, T0)
                        .await
                        .expect("catalog");
                }
            }
        }));
    }
    let expected_changes = i64::try_from(WRITERS * (GRANTS + GRANTS / 5)).expect("count");
    let expected_events = i64::try_from(WRITERS * GRANTS).expect("count");
    let (mut change_cursor, mut event_cursor) = (0i64, 0i64);
    while change_cursor < expected_changes || event_cursor < expected_events {
        for change in store
            .changes_after(&env, change_cursor, 7)
            .await
            .expect("changes")
        {
            assert_eq!(
                change.seq,
                change_cursor + 1,
                "changes are dense and in order"
            );
            change_cursor = change.seq;
        }
        for event in store
            .events(&env, Some(event_cursor), 7)
            .await
            .expect("events")
        {
            assert_eq!(event.seq, event_cursor + 1, "events are dense and in order");
            event_cursor = event.seq;
        }
        tokio::task::yield_now().await;
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    assert_eq!(
        store.last_change(&env).await.expect("last"),
        expected_changes
    );
    let after = store.changes_after(&env, change_cursor, 10).await;
    assert!(after.expect("changes").is_empty());
}

// Concurrent mutations of one end user are serialised: none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_end_users_mutations_are_serialised() {
    let Some(store) = store().await else { return };
    let store = Arc::new(store);
    let env = tenant(&store, "ten_acme").await;
    let mut tasks = Vec::new();
    for amount in 1..=30 {
        let (store, env) = (store.clone(), env.clone());
        tasks.push(tokio::spawn(async move {
            grant(&store, &env, &user("hot"), amount).await;
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let state = crate::store::testing::stored(&**store, &env, &user("hot")).await;
    assert_eq!(state.version(), 30);
    let total: i64 = state
        .blocks()
        .iter()
        .map(|block| block.remaining.get())
        .sum();
    assert_eq!(total, (1..=30).sum::<i64>());
    let filter = EntryFilter {
        end_user_id: Some("hot".into()),
        limit: 100,
        ..EntryFilter::default()
    };
    let entries = store.entries(&env, &filter).await.expect("entries");
    assert_eq!(entries.len(), 30);
    assert!(
        entries.windows(2).all(|pair| pair[0].0 > pair[1].0),
        "newest first"
    );
}

// While a mutation holds one end user's row, another end user's mutation goes
// through at once and a second one for the same end user waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_same_end_user_waits() {
    let Some(store) = store().await else { return };
    let env = tenant(&store, "ten_acme").await;
    grant(&store, &env, &user("busy"), 1).await;
    // A mutation in flight on `busy`: its transaction holds the row lock.
    let mut in_flight = store.pool.begin().await.expect("begin");
    lock_state(&mut in_flight, &env, &user("busy"), T0)
        .await
        .expect("lock");
    tokio::time::timeout(
        Duration::from_secs(5),
        grant(&store, &env, &user("other"), 1),
    )
    .await
    .expect("another end user does not wait");
    let waiting = tokio::time::timeout(
        Duration::from_millis(300),
        grant(&store, &env, &user("busy"), 1),
    )
    .await;
    assert!(waiting.is_err(), "the same end user waits");
    in_flight.commit().await.expect("commit");
    tokio::time::timeout(
        Duration::from_secs(5),
        grant(&store, &env, &user("busy"), 2),
    )
    .await
    .expect("the lock is free again");
    let state = crate::store::testing::stored(&*store, &env, &user("busy")).await;
    assert_eq!(state.version(), 2, "the abandoned attempt wrote nothing");
}

// A refused mutation writes nothing, not even its end user's placeholder row.
#[tokio::test]
async fn a_refusal_writes_nothing() {
    let Some(store) = store().await else { return };
    let env = tenant(&store, "ten_acme").await;
    let mut refuse = |_: &mut EndUserState, _: &[bool]| -> StoreResult<Vec<Changes>> {
        Err(StoreError::Declined)
    };
    let result = store
        .mutate(
            Mutation {
                env: &env,
                end_user: &user("nobody"),
                now: T0,
                claims: &[],
            },
            &mut refuse,
        )
        .await;
    assert!(matches!(result, Err(StoreError::Declined)));
    assert!(
        store
            .load_state(&env, &user("nobody"))
            .await
            .expect("load")
            .is_none()
    );
    assert!(
        store
            .end_user_states(&env, None, 10)
            .await
            .expect("states")
            .is_empty()
    );
    assert_eq!(store.last_change(&env).await.expect("last"), 0);
}

// Many first requests with one key at once: exactly one starts; then the state
// machine: replay, mismatch, abandon only while unfinished, take-over after the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_keys_start_once() {
    let Some(store) = store().await else { return };
    let store = Arc::new(store);
    let env = tenant(&store, "ten_acme").await;
    let keep = Timestamp::from_millis(T0.as_millis() + 86_400_000);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (store, env) = (store.clone(), env.clone());
        tasks.push(tokio::spawn(async move {
            store
                .idempotency_begin(LeaseAsk::new(&env, "k", &[1; 32], T0, 10_000, keep))
                .await
                .expect("begin")
        }));
    }
    let mut started = 0;
    for task in tasks {
        match task.await.expect("task") {
            IdempotencyBegin::Started => started += 1,
            IdempotencyBegin::InFlight => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(started, 1);
    let mismatch = store
        .idempotency_begin(LeaseAsk::new(&env, "k", &[2; 32], T0, 10_000, keep))
        .await
        .expect("begin");
    assert!(matches!(mismatch, IdempotencyBegin::Mismatch));
    let later = Timestamp::from_millis(T0.as_millis() + 10_001);
    let taken = store
        .idempotency_begin(LeaseAsk::new(&env, "k", &[1; 32], later, 10_000, keep))
        .await
        .expect("begin");
    assert!(
        matches!(taken, IdempotencyBegin::Started),
        "a dead holder's key is taken over"
    );
    let answer = IdempotencyAnswer {
        key: "k".into(),
        status: 201,
        body: b"{}".to_vec(),
    };
    store
        .idempotency_finish(&env, &answer)
        .await
        .expect("finish");
    store.idempotency_abandon(&env, "k").await.expect("abandon");
    match store
        .idempotency_begin(LeaseAsk::new(&env, "k", &[1; 32], later, 10_000, keep))
        .await
        .expect("begin")
    {
        IdempotencyBegin::Replay { status, body } => {
            assert_eq!((status, body.as_slice()), (201, b"{}".as_slice()));
        }
        other => panic!("expected a replay, got {other:?}"),
    }
    store
        .idempotency_begin(LeaseAsk::new(&env, "gone", &[1; 32], T0, 10_000, keep))
        .await
        .expect("begin");
    store
        .idempotency_abandon(&env, "gone")
        .await
        .expect("abandon");
    assert!(matches!(
        store
            .idempotency_begin(LeaseAsk::new(&env, "gone", &[3; 32], T0, 10_000, keep))
            .await
            .expect("begin"),
        IdempotencyBegin::Started
    ));
    let purged = store
        .purge_expired(Timestamp::from_millis(keep.as_millis() + 1))
        .await;
    assert_eq!(purged.expect("purge"), 2);
}

// Two replicas claiming at once never take the same delivery, and only the oldest
// pending delivery of an endpoint and end user is claimable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_are_claimed_once_and_in_order() {
    let Some(store) = store().await else { return };
    let store = Arc::new(store);
    let env = tenant(&store, "ten_acme").await;
    let endpoint = EndpointRecord {
        id: "we_1".into(),
        url: "https://example.com/hook".into(),
        event_types: None,
        secret: "whsec_x".into(),
        created_at: T0,
        updated_at: T0,
    };
    store
        .insert_endpoint(&env, &endpoint)
        .await
        .expect("endpoint");
    for index in 0..20 {
        grant(&store, &env, &user(&format!("u{index}")), 1).await;
    }
    grant(&store, &env, &user("u0"), 2).await;
    let claim = |store: Arc<TestStore>, env: Env| async move {
        store
            .claim_deliveries(
                &env,
                &DeliveryClaim {
                    due_by: T0,
                    lease: DeliveryLease {
                        now: T0,
                        until: T0
                            .checked_add(ledger::Span::from_millis(60_000))
                            .expect("instant"),
                    },
                    limit: 100,
                },
            )
            .await
            .expect("claim")
    };
    let (first, second) = tokio::join!(
        tokio::spawn(claim(store.clone(), env.clone())),
        tokio::spawn(claim(store.clone(), env.clone()))
    );
    let mut claimed: Vec<i64> = first
        .expect("task")
        .iter()
        .chain(second.expect("task").iter())
        .map(|job| job.delivery_id)
        .collect();
    let count = claimed.len();
    claimed.sort_unstable();
    claimed.dedup();
    assert_eq!(claimed.len(), count, "no delivery is claimed twice");
    assert_eq!(count, 20, "u0's second event waits for its first");
    assert!(claim(store.clone(), env.clone()).await.is_empty());

    let first_of_u0 = claimed[0];
    store
        .record_attempt(&AttemptRecord {
            delivery_id: first_of_u0,
            attempt: 1,
            at: T0,
            succeeded: true,
            response_status: Some(200),
            error: None,
            retry_at: None,
        })
        .await
        .expect("attempt");
    let next = claim(store.clone(), env.clone()).await;
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].event.end_user_id.as_deref(), Some("u0"));
    let event = store
        .event(&env, &next[0].event.id)
        .await
        .expect("event")
        .expect("stored");
    assert!(event.event.deliveries.is_empty());
}

// Purging moves the watermark to the newest position deleted; the feed's last
// position never goes back.
#[tokio::test]
async fn purging_changes_moves_the_watermark() {
    let Some(store) = store().await else { return };
    let env = tenant(&store, "ten_acme").await;
    for _ in 0..3 {
        store.record_catalog_change(&env, T0).await.expect("change");
    }
    let later = Timestamp::from_millis(T0.as_millis() + 1);
    store
        .record_catalog_change(&env, later)
        .await
        .expect("change");
    assert_eq!(store.purge_changes(later).await.expect("purge"), 3);
    assert_eq!(store.purged_through(&env).await.expect("watermark"), 3);
    assert_eq!(store.last_change(&env).await.expect("last"), 4);
    let far = Timestamp::from_millis(T0.as_millis() + 1_000);
    assert_eq!(store.purge_changes(far).await.expect("purge"), 1);
    assert_eq!(store.purged_through(&env).await.expect("watermark"), 4);
    assert_eq!(store.last_change(&env).await.expect("last"), 4);
    assert_eq!(store.purge_changes(far).await.expect("purge"), 0);
    assert_eq!(store.purged_through(&env).await.expect("watermark"), 4);
}

// Commits announced by one process are heard by another on the same database, and a
// process ignores its own announcements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_commits_are_heard_by_other_processes_only() {
    let Some(first) = store().await else {
        return;
    };
    let separator = if first.url.contains('?') { '&' } else { '?' };
    let scoped = format!(
        "{}{separator}options=-c%20search_path%3D{}",
        first.url, first.schema
    );
    let second = PostgresStore::open(&scoped, 4).await.expect("second store");
    let deadline = Duration::from_secs(10);
    let mut first_heard = first.store.commits_elsewhere().expect("PostgreSQL listens");
    let mut second_heard = second.commits_elsewhere().expect("PostgreSQL listens");

    first.store.announce_commit();
    tokio::time::timeout(deadline, second_heard.changed())
        .await
        .expect("the second process hears the first")
        .expect("listener alive");
    second.announce_commit();
    tokio::time::timeout(deadline, first_heard.changed())
        .await
        .expect("the first process hears the second")
        .expect("listener alive");
    // The first process's own announcement reached its listener before the second's
    // (notifications arrive in commit order) and was not counted.
    assert_eq!(*first_heard.borrow_and_update(), 1);
}
