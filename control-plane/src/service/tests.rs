//! Group commit and claims under a held SQLite writer, and the transient-failure retry.

// A scenario test reads top to bottom as one story however long it is.
#![allow(clippy::too_many_lines)]

use std::sync::Arc;
use std::time::Duration;

use ledger::{Credits, EndUserId, GrantRequest, Timestamp};
use sqlx::Connection;

use super::mutate::retry_transient;
use super::{AppState, ClaimHold, KeyHold};
use crate::clock::ManualClock;
use crate::config::{Config, DatabaseUrl, Overrides};
use crate::error::ApiError;
use crate::service::Change;
use crate::store::LeaseAsk;
use crate::store::sqlite::SqliteStore;
use crate::store::{Changes, Claim, Env, Environment, StoreError};

// A transient failure is retried up to twice; a third one, or any other failure, is
// the answer.
#[tokio::test]
async fn transient_failures_are_retried_twice() {
    let tries = std::sync::atomic::AtomicU32::new(0);
    let failing = |fail_first: u32, error: fn() -> StoreError| {
        tries.store(0, std::sync::atomic::Ordering::SeqCst);
        let tries = &tries;
        retry_transient(move || async move {
            let tried = tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if tried < fail_first {
                Err(error())
            } else {
                Ok(tried)
            }
        })
    };
    let busy = || StoreError::Transient("busy".into());
    assert_eq!(failing(2, busy).await.expect("third try"), 2);
    assert!(
        failing(3, busy)
            .await
            .is_err_and(|error| error.is_transient())
    );
    assert_eq!(tries.load(std::sync::atomic::Ordering::SeqCst), 3);
    let broken = || StoreError::Fatal("no such table".into());
    assert!(matches!(
        failing(1, broken).await,
        Err(StoreError::Fatal(_))
    ));
    assert_eq!(
        tries.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "not retried"
    );
}

/// Polls `condition` until it holds, failing after a generous deadline.
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn grant(
    state: &AppState,
    env: &Env,
    end_user: &EndUserId,
    amount: i64,
) -> tokio::task::JoinHandle<Result<(), ApiError>> {
    let (state, env, end_user) = (state.clone(), env.clone(), end_user.clone());
    tokio::spawn(async move {
        state
            .mutate(
                Change::new(&env, &end_user, None).created(),
                move |user, cx, _| {
                    let applied = user.grant(cx, GrantRequest::new(Credits::new(amount)))?;
                    Ok(((), Changes::from_applied(applied).1))
                },
            )
            .await
    })
}

/// An app state on a SQLite file with one end user, `hot`, whose operations can be
/// made to queue: [`Held::lock`] has another connection hold the write lock.
struct Held {
    _directory: tempfile::TempDir,
    path: String,
    state: AppState,
    env: Env,
    hot: EndUserId,
}

impl Held {
    async fn new(tenant: &str) -> Held {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("held.db").display().to_string();
        let config = Config::parse(
            &format!("[database]\nurl = \"sqlite://{path}\"\n"),
            "test.toml",
            &Overrides::default(),
        )
        .expect("config");
        let store = SqliteStore::open(
            &DatabaseUrl::SqliteFile(path.clone()),
            config.synchronous,
            2,
        )
        .await
        .expect("store");
        let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
        Held {
            _directory: directory,
            path,
            state: AppState::new(config, Arc::new(store), Arc::new(clock), None),
            env: Env::new(tenant, Environment::Test),
            hot: EndUserId::new("hot").expect("id"),
        }
    }

    /// Takes SQLite's write lock on another connection and starts a grant of 1 to
    /// `hot`; returns once the grant's transaction waits for the lock (busy_timeout):
    /// its end user's drainer and its environment's have both taken it, so everything
    /// sent after it queues (the next groups of `hot` under `hot`, other end users'
    /// groups under the environment).
    async fn lock(
        &self,
    ) -> (
        sqlx::SqliteConnection,
        tokio::task::JoinHandle<Result<(), ApiError>>,
    ) {
        let mut blocker = sqlx::SqliteConnection::connect(&format!("sqlite://{}", self.path))
            .await
            .expect("connect");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut blocker)
            .await
            .expect("lock");
        let first = grant(&self.state, &self.env, &self.hot, 1);
        self.queued(0).await;
        until("the environment's drainer took the grant", || {
            self.state.inner.batches.queued(&self.env) == Some(0)
        })
        .await;
        (blocker, first)
    }

    /// Waits until `count` operations wait behind the one in flight.
    async fn queued(&self, count: usize) {
        let key = (self.env.clone(), self.hot.clone());
        until("operations queued", || {
            self.state.inner.groups.queued(&key) == Some(count)
        })
        .await;
    }

    async fn unlock(mut blocker: sqlx::SqliteConnection) {
        sqlx::query("ROLLBACK")
            .execute(&mut blocker)
            .await
            .expect("unlock");
    }
}

// While the database is busy, operations on one end user queue behind the one in
// flight; when it frees, the queued ones commit in one transaction, a refused one
// among them leaving nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_operations_share_one_transaction() {
    let held = Held::new("t_group").await;
    let (state, env, hot) = (held.state.clone(), held.env.clone(), held.hot.clone());
    let (blocker, first) = held.lock().await;
    let mut queued = Vec::new();
    for index in 0..20 {
        // A zero grant is refused.
        queued.push(grant(&state, &env, &hot, if index == 7 { 0 } else { 1 }));
    }
    held.queued(20).await;
    Held::unlock(blocker).await;

    first.await.expect("task").expect("first commits");
    let mut refused = 0;
    for (index, task) in queued.into_iter().enumerate() {
        match task.await.expect("task") {
            Ok(()) => assert_ne!(index, 7),
            Err(ApiError::Refused(_)) if index == 7 => refused += 1,
            Err(error) => panic!("operation {index}: {error}"),
        }
    }
    assert_eq!(refused, 1);
    until("the drainer ends", || {
        state
            .inner
            .groups
            .queued(&(env.clone(), hot.clone()))
            .is_none()
    })
    .await;

    let stored = crate::store::testing::stored(state.store(), &env, &hot).await;
    let now = state.real_now();
    assert_eq!(
        stored.available(None, now).expect("available"),
        Credits::new(20)
    );
    let changes = feed(&state, &env).await;
    assert_eq!(
        changes.len(),
        2,
        "one transaction alone, then one for the group: {changes:?}"
    );
    let entries = state
        .store()
        .entries(
            &env,
            &crate::store::EntryFilter {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .expect("entries");
    assert_eq!(entries.len(), 20);
}

// While the database is busy, groups of many end users queue for their environment's
// next transaction; when it frees, they commit in one, each group on its own: a refused
// one among them (a lone zero grant, which fails its whole group) leaves nothing
// behind, and the others commit around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_users_groups_share_one_transaction() {
    let held = Held::new("t_shared").await;
    let (state, env) = (held.state.clone(), held.env.clone());
    let (blocker, first) = held.lock().await;
    let users: Vec<EndUserId> = (0..20)
        .map(|index| EndUserId::new(&format!("user_{index}")).expect("id"))
        .collect();
    let mut queued = Vec::new();
    for (index, end_user) in users.iter().enumerate() {
        // A zero grant is refused.
        queued.push(grant(
            &state,
            &env,
            end_user,
            if index == 7 { 0 } else { 2 },
        ));
    }
    until(
        "every end user's group queued for the next transaction",
        || state.inner.batches.queued(&env) == Some(20),
    )
    .await;
    Held::unlock(blocker).await;

    first.await.expect("task").expect("first commits");
    for (index, task) in queued.into_iter().enumerate() {
        match task.await.expect("task") {
            Ok(()) => assert_ne!(index, 7),
            Err(ApiError::Refused(_)) if index == 7 => {}
            Err(error) => panic!("operation {index}: {error}"),
        }
    }
    until("the environment's drainer ends", || {
        state.inner.batches.queued(&env).is_none()
    })
    .await;

    let now = state.real_now();
    for (index, end_user) in users.iter().enumerate() {
        let stored = state
            .store()
            .load_state(&env, end_user)
            .await
            .expect("load");
        match stored {
            None => assert_eq!(index, 7, "{end_user} was not stored"),
            Some(stored) => {
                assert_ne!(index, 7, "the refused grant left a state");
                assert_eq!(
                    stored.available(None, now).expect("available"),
                    Credits::new(2)
                );
            }
        }
    }
    let mut fed: Vec<Option<EndUserId>> = feed(&state, &env)
        .await
        .into_iter()
        .map(|change| change.end_user_id)
        .collect();
    fed.sort();
    let mut expected = vec![Some(held.hot.clone())];
    expected.extend(
        users
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != 7)
            .map(|(_, end_user)| Some(end_user.clone())),
    );
    expected.sort();
    assert_eq!(fed, expected, "one record each");
}

// An operation that panics in a shared transaction fails its own group alone: the
// end users beside it commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_operation_fails_its_group_alone() {
    let held = Held::new("t_panic").await;
    let (state, env) = (held.state.clone(), held.env.clone());
    let (blocker, first) = held.lock().await;
    let (before, panicking, after) = (
        EndUserId::new("before").expect("id"),
        EndUserId::new("panicking").expect("id"),
        EndUserId::new("after").expect("id"),
    );
    let granted_before = grant(&state, &env, &before, 3);
    until("the first group queued", || {
        state.inner.batches.queued(&env) == Some(1)
    })
    .await;
    let failing = {
        let (state, env, end_user) = (state.clone(), env.clone(), panicking.clone());
        tokio::spawn(async move {
            state
                .mutate(
                    Change::new(&env, &end_user, None),
                    |_, _, _| -> Result<((), Changes), ApiError> {
                        panic!("an operation that panics")
                    },
                )
                .await
        })
    };
    until("the panicking group queued", || {
        state.inner.batches.queued(&env) == Some(2)
    })
    .await;
    let granted_after = grant(&state, &env, &after, 4);
    until("all three queued for one transaction", || {
        state.inner.batches.queued(&env) == Some(3)
    })
    .await;
    Held::unlock(blocker).await;

    first.await.expect("task").expect("the held grant commits");
    granted_before
        .await
        .expect("task")
        .expect("the group before commits");
    granted_after
        .await
        .expect("task")
        .expect("the group after commits");
    let failed = failing
        .await
        .expect("the caller's task itself does not panic");
    assert!(matches!(failed, Err(ApiError::Internal(_))), "{failed:?}");
    let now = state.real_now();
    for (end_user, amount) in [(&before, 3), (&after, 4)] {
        let stored = crate::store::testing::stored(state.store(), &env, end_user).await;
        assert_eq!(
            stored.available(None, now).expect("available"),
            Credits::new(amount)
        );
    }
    assert!(
        state
            .store()
            .load_state(&env, &panicking)
            .await
            .expect("load")
            .is_none()
    );
}

/// An operation under a claim on `key` (fingerprint `[1; 32]`): a grant of `outcome`'s
/// amount, or `outcome`'s refusal.
fn claiming(
    state: &AppState,
    env: &Env,
    end_user: &EndUserId,
    key: &str,
    outcome: Result<i64, ApiError>,
) -> Task {
    let (state, env, end_user) = (state.clone(), env.clone(), end_user.clone());
    let now = state.real_now();
    let hold = ClaimHold::new(Claim {
        key: key.into(),
        fingerprint: [1; 32],
        now,
        keep_until: now,
    });
    tokio::spawn(async move {
        let outcome = state
            .mutate(
                Change::new(&env, &end_user, Some(&KeyHold::Claim(hold.clone()))).created(),
                move |user, cx, _| {
                    let amount = outcome?;
                    let applied = user.grant(cx, GrantRequest::new(Credits::new(amount)))?;
                    Ok(((), Changes::from_applied(applied).1))
                },
            )
            .await;
        match outcome {
            Err(ApiError::IdempotencyKeyInFlight) if hold.was_taken() => Err(Taken),
            other => Ok(other),
        }
    })
}

/// An operation whose claim found its key taken.
#[derive(Debug)]
struct Taken;

/// A spawned operation: its answer, or `Taken`.
type Task = tokio::task::JoinHandle<Result<Result<(), ApiError>, Taken>>;

// Claims in one group: the first of a key runs and its answer is stored; a repeat of
// it, and a key another request holds a lease on, do not run (their requests go the
// classic way); a claimed refusal that is a stored decision is stored as the key's
// answer, any other gives the key back; an unkeyed operation beside them commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_in_a_group_run_once_and_keep_their_answers() {
    let held = Held::new("t_claims").await;
    let (state, env, hot) = (held.state.clone(), held.env.clone(), held.hot.clone());
    let now = state.real_now();
    let leased = state
        .store()
        .idempotency_begin(LeaseAsk::new(&env, "held", &[1; 32], now, 30_000, now))
        .await
        .expect("lease");
    assert!(matches!(leased, crate::store::IdempotencyBegin::Started));

    let (blocker, first) = held.lock().await;
    let queue: [&dyn Fn() -> Task; 6] = [
        &|| claiming(&state, &env, &hot, "a", Ok(5)),
        &|| claiming(&state, &env, &hot, "a", Ok(5)),
        &|| {
            claiming(
                &state,
                &env,
                &hot,
                "b",
                Err(ApiError::Conflict("no".into())),
            )
        },
        &|| {
            claiming(
                &state,
                &env,
                &hot,
                "c",
                Err(ApiError::bad_request("x", "bad")),
            )
        },
        &|| claiming(&state, &env, &hot, "held", Ok(7)),
        &|| {
            let task = grant(&state, &env, &hot, 2);
            tokio::spawn(async move { Ok(task.await.expect("task")) })
        },
    ];
    let mut group = Vec::new();
    for (index, start) in queue.iter().enumerate() {
        group.push(start());
        held.queued(index + 1).await;
    }
    Held::unlock(blocker).await;
    first.await.expect("task").expect("first commits");
    let mut outcomes = Vec::new();
    for task in group {
        outcomes.push(match task.await.expect("task") {
            Err(Taken) => "taken",
            Ok(Ok(())) => "ok",
            Ok(Err(ApiError::Conflict(_))) => "conflict",
            Ok(Err(ApiError::Invalid { .. })) => "bad request",
            Ok(Err(error)) => panic!("unexpected: {error}"),
        });
    }
    assert_eq!(
        outcomes,
        ["ok", "taken", "conflict", "bad request", "taken", "ok"]
    );

    let begin = |key: &'static str| {
        let (state, env) = (state.clone(), env.clone());
        async move {
            state
                .store()
                .idempotency_begin(LeaseAsk::new(&env, key, &[1; 32], now, 30_000, now))
                .await
                .expect("begin")
        }
    };
    assert!(
        matches!(
            begin("a").await,
            crate::store::IdempotencyBegin::Replay { status: 201, .. }
        ),
        "the claimed answer is stored"
    );
    assert!(
        matches!(
            begin("b").await,
            crate::store::IdempotencyBegin::Replay { status: 409, .. }
        ),
        "a stored decision is the key's answer"
    );
    assert!(
        matches!(begin("c").await, crate::store::IdempotencyBegin::Started),
        "a refusal that is not stored gave the key back"
    );
    assert!(
        matches!(
            begin("held").await,
            crate::store::IdempotencyBegin::InFlight
        ),
        "the classic lease is untouched"
    );
    let stored = crate::store::testing::stored(state.store(), &env, &hot).await;
    assert_eq!(
        stored.available(None, now).expect("available"),
        Credits::new(1 + 5 + 2),
        "only the operations that ran committed"
    );
    let changes = feed(&state, &env).await;
    assert_eq!(
        changes.len(),
        2,
        "the first alone, then one group: {changes:?}"
    );

    // A group whose only runnable operation is unclaimed and refused: the refusal is
    // that operation's answer alone, not the skipped one's.
    let (blocker, first) = held.lock().await;
    let repeat = claiming(&state, &env, &hot, "a", Ok(5));
    held.queued(1).await;
    let refused = grant(&state, &env, &hot, 0);
    held.queued(2).await;
    Held::unlock(blocker).await;
    first.await.expect("task").expect("first commits");
    assert!(matches!(repeat.await.expect("task"), Err(Taken)));
    assert!(matches!(
        refused.await.expect("task"),
        Err(ApiError::Refused(_))
    ));
}

/// The environment's change feed from its start (up to 100 positions).
async fn feed(state: &AppState, env: &Env) -> Vec<crate::store::ChangeRecord> {
    state
        .store()
        .changes_after(env, 0, 100)
        .await
        .expect("feed")
}

// A read of the feed says when more may follow it: the NATS publisher reads on at once
// only then, and lets later commits gather for its linger otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_read_says_when_more_may_follow_it() {
    let held = Held::new("t_feed_more").await;
    let grant_to = |index: usize| {
        let end_user = EndUserId::new(&format!("u{index}")).expect("id");
        grant(&held.state, &held.env, &end_user, 1)
    };
    for index in 0..3 {
        grant_to(index).await.expect("join").expect("grant");
    }
    let encoding = super::feed::Encoding::Frames;
    let read = |limit| held.state.feed_lines(&held.env, 0, limit, encoding);
    let two = read(2).await.expect("read").expect("changes");
    assert!(two.maybe_more, "two of three changes");
    assert_eq!(two.lines.len(), 2);
    let exact = read(3).await.expect("read").expect("changes");
    assert!(
        exact.maybe_more,
        "a read that reaches its limit may have more after it"
    );
    let all = read(10).await.expect("read").expect("changes");
    assert!(!all.maybe_more, "every change, under the limit");
    assert_eq!(all.lines.len(), 3);
    let after = held
        .state
        .feed_lines(&held.env, all.last, 10, encoding)
        .await
        .expect("read");
    assert!(after.is_none(), "nothing after the last change");
    // A commit after that read: the same read again is the page the streams of this
    // process share, which ends before it; it says more may follow.
    grant_to(3).await.expect("join").expect("grant");
    let shared = read(10).await.expect("read").expect("changes");
    assert_eq!(shared.lines.len(), 3, "the shared page");
    assert!(
        shared.maybe_more,
        "a shared page may end before the last commit"
    );
    let rest = held
        .state
        .feed_lines(&held.env, shared.last, 10, encoding)
        .await
        .expect("read")
        .expect("the commit after the shared page");
    assert_eq!(rest.lines.len(), 1);
    assert!(!rest.maybe_more);
}
