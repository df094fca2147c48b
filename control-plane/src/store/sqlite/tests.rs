//! The SQLite-only behaviour: the writer's fsync, entry chains, optimistic batches and
//! the state cache. The shared behaviour is the control-plane suite's, run on both stores.

// A scenario test reads top to bottom as one story however long it is.
#![allow(clippy::too_many_lines)]

use ledger::{EndUserId, EndUserState, Timestamp};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

use super::end_users::ENVIRONMENT_ENTRIES;
use super::{CHAIN_STEPS, SqliteStore, cache};
use crate::store::LeaseAsk;
use crate::store::{
    Changes, DatabaseUrl, EntryFilter, Env, Environment, FeedStore, IdempotencyAnswer,
    IdempotencyAnswerStore, IdempotencyBegin, IdempotencyStore, LedgerStore, StoreError,
    StoreResult, Synchronous,
};

const T0: Timestamp = Timestamp::from_millis(1_767_225_600_000);

/// A store on a fresh SQLite file that fsyncs every commit, with its URL (to reopen
/// it) and its directory (deleted when dropped).
async fn file_store() -> (tempfile::TempDir, DatabaseUrl, SqliteStore) {
    let directory = tempfile::tempdir().expect("temp dir");
    let url = DatabaseUrl::SqliteFile(directory.path().join("store.db").display().to_string());
    let store = SqliteStore::open(&url, Synchronous::Full, 1)
        .await
        .expect("store");
    (directory, url, store)
}

async fn writer_synchronous(store: &SqliteStore) -> i64 {
    sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&store.writer)
        .await
        .expect("pragma")
}

// One batch answers each lease as if they had come one by one: a key repeated later
// in the batch finds the first one's lease.
#[tokio::test]
async fn a_batch_of_leases_answers_each_in_order() {
    let (_directory, _, store) = file_store().await;
    let env = Env::new("t", Environment::Test);
    let lease =
        |key: &str, fingerprint: u8| crate::store::testing::lease(&env, key, fingerprint, T0);
    let batch = [lease("a", 1), lease("b", 1), lease("a", 1), lease("a", 2)];
    let answers = store.take_leases(&batch).await.expect("batch");
    let kinds = crate::store::testing::kinds(&answers);
    assert_eq!(kinds, ["started", "started", "in flight", "mismatch"]);
    assert_eq!(writer_synchronous(&store).await, 2, "fsyncing again");
}

// Several end users' mutations in one transaction, a savepoint each: a refused one, or
// one whose answer finds its key answered already (after its rows were written), is
// rolled back to its savepoint, and those before and after it commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_mutation_commits_or_fails_alone() {
    let (_directory, _, store) = file_store().await;
    let env = Env::new("t", Environment::Test);
    crate::store::testing::each_mutation_commits_or_fails_alone(&store, &env, T0).await;
}

// Leases are written without an fsync, and the writer fsyncs again after every kind
// of answer (started, in flight, mismatch, replay).
#[tokio::test]
async fn the_writer_fsyncs_again_after_a_lease() {
    let (_directory, _, store) = file_store().await;
    const FULL: i64 = 2;
    assert_eq!(writer_synchronous(&store).await, FULL);
    let env = Env::new("t", Environment::Test);
    let begin = |fingerprint: [u8; 32]| {
        let (store, env) = (store.clone(), env.clone());
        async move {
            store
                .idempotency_begin(LeaseAsk::new(&env, "k", &fingerprint, T0, 30_000, T0))
                .await
                .expect("begin")
        }
    };
    assert!(matches!(begin([1; 32]).await, IdempotencyBegin::Started));
    assert_eq!(writer_synchronous(&store).await, FULL);
    assert!(matches!(begin([1; 32]).await, IdempotencyBegin::InFlight));
    assert_eq!(writer_synchronous(&store).await, FULL);
    assert!(matches!(begin([2; 32]).await, IdempotencyBegin::Mismatch));
    assert_eq!(writer_synchronous(&store).await, FULL);
    store
        .idempotency_finish(
            &env,
            &IdempotencyAnswer {
                key: "k".into(),
                status: 201,
                body: b"{}".to_vec(),
            },
        )
        .await
        .expect("finish");
    assert!(matches!(
        begin([1; 32]).await,
        IdempotencyBegin::Replay { status: 201, .. }
    ));
    assert_eq!(writer_synchronous(&store).await, FULL);
}

async fn grant(store: &SqliteStore, env: &Env, end_user: &str, amount: i64) {
    let end_user = EndUserId::new(end_user).expect("end user id");
    crate::store::testing::grant(store, env, &end_user, amount, T0).await;
}

fn by_user(end_user: &str) -> EntryFilter {
    EntryFilter {
        end_user_id: Some(end_user.into()),
        limit: 100,
        ..EntryFilter::default()
    }
}

fn amounts(entries: &[(i64, protocol::LedgerEntry)]) -> Vec<i64> {
    entries.iter().map(|(_, entry)| entry.amount).collect()
}

/// `end_user`'s state kept by `store`, if any.
fn kept(store: &SqliteStore, env: &Env, end_user: &str) -> Option<cache::Cached> {
    store.states.get_many(env, &[end_user]).pop().flatten()
}

/// `end_user`'s stored state and entries (newest first), after checking that the
/// store kept exactly that state, with its chain's newest entry as head.
async fn stored_and_kept(
    store: &SqliteStore,
    env: &Env,
    end_user: &str,
) -> (EndUserState, Vec<(i64, protocol::LedgerEntry)>) {
    let id = EndUserId::new(end_user).expect("end user id");
    let state = crate::store::testing::stored(store, env, &id).await;
    let entries = store
        .entries(env, &by_user(end_user))
        .await
        .expect("entries");
    let kept = kept(store, env, end_user).expect("kept");
    assert_eq!(*kept.state, state, "{end_user}'s kept state");
    assert_eq!(
        kept.head,
        entries.first().map(|(seq, _)| *seq),
        "{end_user}'s head"
    );
    (state, entries)
}

fn everyone() -> EntryFilter {
    EntryFilter {
        limit: 100,
        ..EntryFilter::default()
    }
}

// Entries written before migration 0005 (no chains) are chained by it, and the chains
// go on from there; migration 0008 gives them their environment's runs, and 0009
// carries them into a table without the index on their ids.
#[tokio::test]
async fn the_migration_chains_entries_written_before_it() {
    let env = Env::new("t", Environment::Live);
    let sandbox = Env::new("t", Environment::Test);
    // Rows as the store wrote them: made by today's store, copied into a database
    // migrated only up to 0004. The two environments' entries interleave.
    let (_made_directory, _, made) = file_store().await;
    for (on, end_user, amount) in [
        (&env, "u1", 5),
        (&sandbox, "u1", 3),
        (&env, "u2", 7),
        (&env, "u1", 9),
        (&sandbox, "u1", 4),
    ] {
        grant(&made, on, end_user, amount).await;
    }
    let entries: Vec<(String, String, String, String, String, i64, String)> = sqlx::query_as(
        "SELECT id, tenant_id, environment, end_user_id, type, created_at, body FROM entries ORDER BY seq",
    )
    .fetch_all(&made.reader)
    .await
    .expect("entries");
    let users: Vec<(String, String, String, String, i64, i64)> = sqlx::query_as(
        "SELECT tenant_id, environment, end_user_id, state, version, updated_at FROM end_users",
    )
    .fetch_all(&made.reader)
    .await
    .expect("end users");

    let directory = tempfile::tempdir().expect("temp dir");
    let path = directory.path().join("old.db");
    let old = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal),
        )
        .await
        .expect("old database");
    sqlx::migrate!("./migrations/sqlite")
        .run_to(4, &old)
        .await
        .expect("migrated to 0004");
    for (id, tenant, environment, end_user, entry_type, created_at, body) in &entries {
        sqlx::query("INSERT INTO entries (id, tenant_id, environment, end_user_id, type, created_at, body) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(id).bind(tenant).bind(environment).bind(end_user).bind(entry_type).bind(created_at).bind(body)
            .execute(&old)
            .await
            .expect("old entry");
    }
    // A number given to an entry no longer there: never given again.
    sqlx::query("INSERT INTO entries (id, tenant_id, environment, end_user_id, type, created_at, body) VALUES ('gone', 't', 'live', 'u1', 'grant', 0, '{}')")
        .execute(&old)
        .await
        .expect("entry");
    sqlx::query("DELETE FROM entries WHERE id = 'gone'")
        .execute(&old)
        .await
        .expect("deleted");
    for (tenant, environment, end_user, state, version, updated_at) in &users {
        sqlx::query("INSERT INTO end_users (tenant_id, environment, end_user_id, state, version, updated_at) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(tenant).bind(environment).bind(end_user).bind(state).bind(version).bind(updated_at)
            .execute(&old)
            .await
            .expect("old end user");
    }
    old.close().await;

    let url = DatabaseUrl::SqliteFile(path.display().to_string());
    let store = SqliteStore::open(&url, Synchronous::Full, 1)
        .await
        .expect("migrated on open");
    assert_eq!(
        amounts(&store.entries(&env, &by_user("u1")).await.expect("u1")),
        [9, 5]
    );
    assert_eq!(
        amounts(&store.entries(&env, &by_user("u2")).await.expect("u2")),
        [7]
    );
    assert_eq!(
        amounts(&store.entries(&env, &everyone()).await.expect("live")),
        [9, 7, 5]
    );
    assert_eq!(
        amounts(&store.entries(&sandbox, &everyone()).await.expect("test")),
        [4, 3]
    );
    grant(&store, &env, "u1", 11).await;
    assert_eq!(
        amounts(&store.entries(&env, &by_user("u1")).await.expect("u1")),
        [11, 9, 5]
    );
    assert_eq!(
        amounts(&store.entries(&env, &everyone()).await.expect("live")),
        [11, 9, 7, 5]
    );
    let runs: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT environment, first_seq, last_seq FROM entry_runs ORDER BY first_seq",
    )
    .fetch_all(&store.reader)
    .await
    .expect("runs");
    assert_eq!(
        runs.iter()
            .map(|(environment, ..)| environment.as_str())
            .collect::<Vec<_>>(),
        ["live", "test", "live", "test", "live"],
        "{runs:?}"
    );
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'entries'",
    )
    .fetch_all(&store.reader)
    .await
    .expect("indexes");
    // No index by end user (0005), by environment (0008) or by id (0009).
    assert!(indexes.is_empty(), "{indexes:?}");
    // The rebuilt table (0009) carried every entry and AUTOINCREMENT's record on.
    let (recorded, highest, count): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT seq FROM sqlite_sequence WHERE name = 'entries'), (SELECT MAX(seq) FROM entries), (SELECT COUNT(*) FROM entries)",
    )
    .fetch_one(&store.reader)
    .await
    .expect("sequence");
    assert_eq!((recorded, highest, count), (7, 7, 6));
}

// A long chain is walked across statements: pages that follow their cursors, a time
// filter only the oldest entries pass, a type no entry has, a cursor naming another
// end user's entry. Every answer is compared with the same question asked of the
// table directly.
#[tokio::test]
async fn a_long_chain_is_walked_with_filters_and_cursors() {
    // Without an fsync per commit: this test makes hundreds of grants (each a block,
    // so keep them few: every grant writes the whole, growing state).
    let directory = tempfile::tempdir().expect("temp dir");
    let url = DatabaseUrl::SqliteFile(directory.path().join("chain.db").display().to_string());
    let store = SqliteStore::open(&url, Synchronous::Normal, 1)
        .await
        .expect("store");
    let env = Env::new("t", Environment::Live);
    // More than one statement's worth of links (CHAIN_STEPS), one millisecond apart.
    let count = 600_i64;
    let (long, other) = (
        EndUserId::new("long").expect("id"),
        EndUserId::new("other").expect("id"),
    );
    let sandbox = Env::new("t", Environment::Test);
    for amount in 1..=count {
        let at = T0
            .checked_add(ledger::Span::from_millis(amount))
            .expect("time");
        crate::store::testing::grant(&store, &env, &long, amount, at).await;
        if amount % 50 == 0 {
            crate::store::testing::grant(&store, &env, &other, amount, at).await;
        }
        if amount % 7 == 0 {
            crate::store::testing::grant(&store, &sandbox, &other, amount, at).await;
        }
        if amount % 100 == 0 {
            // Runs of several entries too, as a usage batch writes them.
            crate::store::testing::grant_many(&store, &env, &["b1", "b2", "b3"], amount, at).await;
        }
    }
    // The environment-wide listing walks runs and entries in order, without a sort.
    let plan: Vec<String> = {
        let connection =
            rusqlite::Connection::open(directory.path().join("chain.db")).expect("open");
        let mut statement = connection
            .prepare(&format!("EXPLAIN QUERY PLAN {ENVIRONMENT_ENTRIES}"))
            .expect("plan");
        statement
            .query_map(
                rusqlite::params![
                    "t",
                    "live",
                    i64::MAX,
                    None::<String>,
                    None::<i64>,
                    None::<i64>,
                    10
                ],
                |row| row.get::<_, String>(3),
            )
            .expect("plan")
            .collect::<Result<_, _>>()
            .expect("plan")
    };
    assert!(
        !plan.is_empty() && plan.iter().all(|step| !step.contains("TEMP B-TREE")),
        "{plan:?}"
    );
    // The environment-wide listing (its runs of entries) against the table, with
    // cursors in and between runs and filters, for both environments.
    for (on, name) in [(&env, "live"), (&sandbox, "test")] {
        let all: Vec<(i64, String, i64)> = bind!(sqlx::query_as(
            "SELECT seq, type, created_at FROM entries WHERE environment = ? ORDER BY seq DESC",
        ); name)
        .fetch_all(&store.reader)
        .await
        .expect("all");
        let middle_created = all[all.len() / 2].2;
        // `all[1]` is inside the newest batch's run of three in the live environment.
        for before in [
            None,
            Some(all[1].0),
            Some(all[3].0),
            Some(all[all.len() / 3].0 + 1),
            Some(1),
        ] {
            for (entry_type, from, to) in [
                (None, None, None),
                (Some("grant"), Some(middle_created), None),
                (None, None, Some(middle_created)),
                (Some("debit"), None, None),
            ] {
                for limit in [1_u32, 7, 500] {
                    let filter = EntryFilter {
                        entry_type: entry_type.map(str::to_owned),
                        from: from.map(Timestamp::from_millis),
                        to: to.map(Timestamp::from_millis),
                        before_seq: before,
                        limit,
                        ..EntryFilter::default()
                    };
                    let expected: Vec<i64> = all
                        .iter()
                        .filter(|(seq, kind, created_at)| {
                            before.is_none_or(|before| *seq < before)
                                && entry_type.is_none_or(|wanted| kind == wanted)
                                && from.is_none_or(|from| *created_at >= from)
                                && to.is_none_or(|to| *created_at < to)
                        })
                        .map(|(seq, ..)| *seq)
                        .take(usize::try_from(limit).expect("small"))
                        .collect();
                    let listed: Vec<i64> = store
                        .entries(on, &filter)
                        .await
                        .expect("listed")
                        .iter()
                        .map(|(seq, _)| *seq)
                        .collect();
                    assert_eq!(listed, expected, "{name}, {filter:?}");
                }
            }
        }
    }
    // (seq, created_at, amount) of every entry of `long`, newest first.
    let truth: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT seq, created_at, body ->> '$.amount' FROM entries WHERE end_user_id = 'long' ORDER BY seq DESC",
    )
    .fetch_all(&store.reader)
    .await
    .expect("truth");
    let seqs = |entries: &[(i64, protocol::LedgerEntry)]| -> Vec<i64> {
        entries.iter().map(|(seq, _)| *seq).collect()
    };
    let first_page = store.entries(&env, &by_user("long")).await.expect("page");
    assert_eq!(
        amounts(&first_page),
        (count - 99..=count).rev().collect::<Vec<_>>()
    );

    // Follow the cursor to the end: every entry once, newest first.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let mut filter = by_user("long");
        filter.limit = 500;
        filter.before_seq = cursor;
        let page = store.entries(&env, &filter).await.expect("page");
        let Some((last, _)) = page.last() else { break };
        cursor = Some(*last);
        seen.extend(amounts(&page));
    }
    assert_eq!(seen, (1..=count).rev().collect::<Vec<_>>());

    // A time filter that only the two oldest entries pass: the whole chain is walked.
    let oldest_created = truth.last().expect("entries").1;
    let mut filter = by_user("long");
    filter.to = Some(Timestamp::from_millis(oldest_created.saturating_add(2)));
    let expected: Vec<i64> = truth
        .iter()
        .filter(|(_, created_at, _)| *created_at < oldest_created.saturating_add(2))
        .map(|(seq, ..)| *seq)
        .collect();
    assert_eq!(expected.len(), 2);
    assert_eq!(
        seqs(&store.entries(&env, &filter).await.expect("filtered")),
        expected
    );
    // And `from` with it: only the second oldest.
    filter.from = Some(Timestamp::from_millis(oldest_created.saturating_add(1)));
    assert_eq!(
        seqs(&store.entries(&env, &filter).await.expect("filtered")),
        expected[..1]
    );

    let mut filter = by_user("long");
    filter.entry_type = Some("debit".into());
    assert!(store.entries(&env, &filter).await.expect("none").is_empty());

    // A filter every entry passes, with a cursor of the same end user, for more links
    // than one statement reads.
    let mut filter = by_user("long");
    filter.entry_type = Some("grant".into());
    filter.before_seq = Some(truth[49].0);
    filter.limit = 600;
    let expected: Vec<i64> = truth.iter().map(|(seq, ..)| *seq).skip(50).collect();
    assert!(expected.len() > usize::try_from(CHAIN_STEPS).expect("small"));
    assert_eq!(
        seqs(&store.entries(&env, &filter).await.expect("page")),
        expected
    );

    // The writer numbered the entries itself and kept AUTOINCREMENT's record.
    let (recorded, highest): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT seq FROM sqlite_sequence WHERE name = 'entries'), (SELECT MAX(seq) FROM entries)",
    )
    .fetch_one(&store.reader)
    .await
    .expect("sequence");
    assert_eq!(recorded, highest);

    // A cursor naming another end user's entry: the walk starts at the newest and
    // skips what is not older than it.
    let others = store.entries(&env, &by_user("other")).await.expect("other");
    let (middle, _) = others[others.len() / 2];
    let mut filter = by_user("long");
    filter.before_seq = Some(middle);
    let expected: Vec<i64> = truth
        .iter()
        .map(|(seq, ..)| *seq)
        .filter(|seq| *seq < middle)
        .take(100)
        .collect();
    assert_eq!(
        seqs(&store.entries(&env, &filter).await.expect("page")),
        expected
    );
}
// A chain that loops (a link to a newer entry) or names a missing entry is reported
// as corruption instead of walked forever or cut short.
#[tokio::test]
async fn a_broken_chain_is_reported() {
    let (_directory, _, store) = file_store().await;
    let env = Env::new("t", Environment::Live);
    for amount in [1, 2, 3] {
        grant(&store, &env, "u1", amount).await;
    }
    let newest: i64 = sqlx::query_scalar("SELECT MAX(seq) FROM entries")
        .fetch_one(&store.reader)
        .await
        .expect("newest");
    let mut filter = by_user("u1");
    filter.entry_type = Some("debit".into());
    bind!(sqlx::query("UPDATE entries SET prev_seq = ? WHERE seq = (SELECT MIN(seq) FROM entries)");
        newest)
        .execute(&store.writer)
        .await
        .expect("loop made");
    let error = store.entries(&env, &filter).await.expect_err("a loop");
    assert!(error.to_string().contains("newer"), "{error}");

    bind!(sqlx::query("UPDATE end_users SET last_entry_seq = ?"); newest.saturating_add(100))
        .execute(&store.writer)
        .await
        .expect("dangling head");
    let error = store
        .entries(&env, &by_user("u1"))
        .await
        .expect_err("missing");
    assert!(error.to_string().contains("does not exist"), "{error}");
}

/// A usage batch whose operation for `u1` saw a state that another writer changed
/// before the batch took the write lock: that other write commits from inside the
/// batch's first run of the operation (before the lock is taken). The operation
/// grants 10 but refuses while nothing is available, as a strict debit would.
/// Who makes the concurrent write of `batch_over_a_concurrent_write`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Concurrent {
    /// This store (the batch's own writer and direct connection).
    ThisStore,
    /// This store, which then purges the whole change feed.
    ThisStorePurging,
    /// This store, in a batch over two end users (one feed row names both).
    ThisStoreBatch,
    /// A second store on the same file, as another process would be: its own writer
    /// and direct connection, SQLite's file lock between them.
    OtherStore,
}

/// `initial` is granted first, by a batch when `cached` (so that the batch finds
/// `u1`'s state in this store's cache rather than reading it) and by a single
/// `mutate` otherwise.
async fn batch_over_a_concurrent_write(
    initial: Option<i64>,
    cached: bool,
    concurrent: Concurrent,
) -> (i64, usize, usize) {
    let (_directory, url, store) = file_store().await;
    let env = Env::new("t", Environment::Live);
    match initial {
        Some(amount) if cached => {
            crate::store::testing::grant_many(&store, &env, &["u1"], amount, T0).await;
            assert!(kept(&store, &env, "u1").is_some(), "u1's state kept");
        }
        Some(amount) => grant(&store, &env, "u1", amount).await,
        None => {}
    }
    let catalog = ledger::Catalog::default();
    let runs = std::sync::atomic::AtomicUsize::new(0);
    let mut operation = |state: &mut EndUserState| -> StoreResult<Vec<Changes>> {
        if runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            let (store, env, url) = (store.clone(), env.clone(), url.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async {
                    let writer = if concurrent == Concurrent::OtherStore {
                        SqliteStore::open(&url, Synchronous::Full, 1)
                            .await
                            .expect("second store")
                    } else {
                        store
                    };
                    if concurrent == Concurrent::ThisStoreBatch {
                        crate::store::testing::grant_many(&writer, &env, &["u0", "u1"], 5, T0)
                            .await;
                    } else {
                        grant(&writer, &env, "u1", 5).await;
                    }
                    if concurrent == Concurrent::ThisStorePurging {
                        // The whole feed, the grant's entry included.
                        writer
                            .purge_changes(Timestamp::from_millis(i64::MAX))
                            .await
                            .expect("purge");
                    }
                });
            })
            .join()
            .expect("concurrent grant");
        }
        let mut ids = crate::clock::UlidSource::at(T0);
        let mut cx = ledger::Cx {
            now: T0,
            catalog: &catalog,
            ids: &mut ids,
        };
        let available = state
            .available(None, T0)
            .map_err(|_| StoreError::Declined)?;
        if available.is_zero() {
            return Err(StoreError::Declined);
        }
        let applied = state
            .grant(&mut cx, ledger::GrantRequest::new(ledger::Credits::new(10)))
            .map_err(|_| StoreError::Declined)?;
        Ok(vec![Changes::from_applied(applied).1])
    };
    let end_user = EndUserId::new("u1").expect("end user id");
    store
        .mutate_many(&env, T0, &mut [(end_user.clone(), &mut operation)])
        .await
        .expect("batch");
    // The batch kept what it wrote: the stored state and its chain's newest entry.
    let (state, entries) = stored_and_kept(&store, &env, end_user.as_str()).await;
    (
        state.available(None, T0).expect("available").get(),
        entries.len(),
        runs.load(std::sync::atomic::Ordering::SeqCst),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reruns_an_operation_whose_state_changed_before_the_lock() {
    // 1 + 5 from the concurrent grant + 10 from the batch, each with its entry: the
    // batch did not overwrite the concurrent write with a state computed before it.
    for cached in [false, true] {
        for concurrent in [
            Concurrent::ThisStore,
            // The feed that would name the concurrent write purged meanwhile.
            Concurrent::ThisStorePurging,
            Concurrent::ThisStoreBatch,
            Concurrent::OtherStore,
        ] {
            assert_eq!(
                batch_over_a_concurrent_write(Some(1), cached, concurrent).await,
                (16, 3, 2),
                "{concurrent:?}, cached: {cached}"
            );
        }
    }
}

/// A batch on end users whose states this store kept: no read, the states and
/// their chains carried on from the kept ones; a state kept by an older
/// transaction never replaces a newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_on_the_states_it_kept() {
    let (_directory, _, store) = file_store().await;
    let env = Env::new("t", Environment::Live);
    for _ in 0..3 {
        crate::store::testing::grant_many(&store, &env, &["u1", "u2"], 2, T0).await;
    }
    for end_user in ["u1", "u2"] {
        let (state, entries) = stored_and_kept(&store, &env, end_user).await;
        assert_eq!(state.available(None, T0).expect("available").get(), 6);
        assert_eq!(entries.len(), 3, "{end_user}'s chain");
        // An older transaction's state, kept late, is ignored.
        let at = kept(&store, &env, end_user).expect("kept").at;
        let older = EndUserState::new(state.end_user_id().clone(), T0);
        store.states.put_many(&env, at - 1, [(older, None)]);
        assert_eq!(kept(&store, &env, end_user).map(|kept| kept.at), Some(at));
    }
    // The batch runs on the kept state itself (no read): a state planted in the
    // cache at its position, 100 credits richer than the stored one, is what the
    // next batch builds on.
    let current = kept(&store, &env, "u1").expect("kept");
    let mut planted = current.state.as_ref().clone();
    crate::store::testing::grant_to(&mut planted, 100, T0).expect("grant");
    store
        .states
        .put_many(&env, current.at, [(planted, current.head)]);
    crate::store::testing::grant_many(&store, &env, &["u1"], 2, T0).await;
    let u1 = EndUserId::new("u1").expect("end user id");
    let state = crate::store::testing::stored(&store, &env, &u1).await;
    assert_eq!(state.available(None, T0).expect("available").get(), 108);
    // A batch that writes nothing for an end user forgets its kept state.
    let mut nothing = |_: &mut EndUserState| -> StoreResult<Vec<Changes>> { Ok(Vec::new()) };
    store
        .mutate_many(&env, T0, &mut [(u1, &mut nothing)])
        .await
        .expect("batch");
    assert!(kept(&store, &env, "u1").is_none());
    // Another environment's end user of the same id is not this one.
    let other = Env::new("t", Environment::Test);
    assert!(kept(&store, &other, "u1").is_none());
}

/// Usage keys are purged oldest first up to the first one still kept; a key kept
/// longer than the ones after it does not hold them back for long: the sweep,
/// `sweep_rows` keys a time, takes them (and never a key still kept).
#[tokio::test]
async fn usage_keys_are_purged_oldest_first() {
    let (_directory, _, mut store) = file_store().await;
    store.sweep_rows = 2;
    for (key, keep_until) in [("a", 10), ("b", 30), ("c", 20), ("d", 40), ("e", 15)] {
        bind!(sqlx::query("INSERT INTO usage_keys (tenant_id, environment, key, fingerprint, entry_id, result, keep_until) VALUES ('t', 'live', ?, x'00', 'led', '{}', ?)");
            key, keep_until)
            .execute(&store.writer)
            .await
            .expect("key");
    }
    let left = || async {
        sqlx::query_scalar::<_, String>("SELECT key FROM usage_keys ORDER BY rowid")
            .fetch_all(&store.writer)
            .await
            .expect("keys")
    };
    let purge = |at: i64| store.purge_expired(Timestamp::from_millis(at));
    // Nothing expired (the sweep reads a and b).
    assert_eq!(purge(5).await.expect("purge"), 0);
    // a oldest first, b stops that; the sweep reads c and d: c goes.
    assert_eq!(purge(25).await.expect("purge"), 2);
    assert_eq!(left().await, ["b", "d", "e"]);
    // The sweep reads e, then starts over.
    assert_eq!(purge(25).await.expect("purge"), 1);
    assert_eq!(left().await, ["b", "d"]);
    assert_eq!(purge(25).await.expect("purge"), 0);
    assert_eq!(purge(35).await.expect("purge"), 1);
    assert_eq!(left().await, ["d"]);
    assert_eq!(purge(50).await.expect("purge"), 1);
    assert!(left().await.is_empty());
    assert_eq!(purge(60).await.expect("purge"), 0);
}

/// A kept state that another path of this store (a single operation, which keeps
/// nothing) or another process wrote over since is not used: the batch reruns on the
/// stored state, and keeps what it wrote then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_state_written_over_since_is_not_used() {
    let (_directory, url, store) = file_store().await;
    let other = SqliteStore::open(&url, Synchronous::Full, 1)
        .await
        .expect("second store");
    let env = Env::new("t", Environment::Live);
    let batch = |amount: i64| crate::store::testing::grant_many(&store, &env, &["u1"], amount, T0);
    batch(1).await;
    grant(&store, &env, "u1", 10).await;
    batch(100).await;
    grant(&other, &env, "u1", 1_000).await;
    batch(10_000).await;
    let (state, entries) = stored_and_kept(&store, &env, "u1").await;
    assert_eq!(state.available(None, T0).expect("available").get(), 11_111);
    assert_eq!(amounts(&entries), [10_000, 1_000, 100, 10, 1]);
}

/// A state past `cache::KEPT_PARTS` blocks is read each time, not kept: the cache's
/// memory stays bounded by its count of end users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_state_is_not_kept() {
    let (_directory, _, store) = file_store().await;
    let env = Env::new("t", Environment::Live);
    // Each grant is a block of its own.
    for _ in 0..64 {
        crate::store::testing::grant_many(&store, &env, &["u1"], 1, T0).await;
    }
    assert!(kept(&store, &env, "u1").is_some());
    crate::store::testing::grant_many(&store, &env, &["u1"], 1, T0).await;
    assert!(kept(&store, &env, "u1").is_none());
    let id = EndUserId::new("u1").expect("end user id");
    let state = crate::store::testing::stored(&store, &env, &id).await;
    assert_eq!(state.blocks().len(), 65);
    // The next batch reads it, and still does not keep it.
    crate::store::testing::grant_many(&store, &env, &["u1"], 1, T0).await;
    assert!(kept(&store, &env, "u1").is_none());
    let entries = store.entries(&env, &by_user("u1")).await.expect("entries");
    assert_eq!(entries.len(), 66);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reruns_an_operation_refused_on_a_stale_state() {
    // Refused on the state read first (nothing available), granted on the state the
    // concurrent grant left.
    for concurrent in [Concurrent::ThisStore, Concurrent::OtherStore] {
        assert_eq!(
            batch_over_a_concurrent_write(None, false, concurrent).await,
            (15, 2, 2),
            "{concurrent:?}"
        );
    }
}
