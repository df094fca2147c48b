//! The one way every end-user operation runs: queued by end user and committed in
//! groups (`group.rs`), with the request's idempotency key held by a lease or claimed in
//! the same transaction; batches over many end users in one transaction; transient
//! store failures retried where running again is safe.

use std::sync::{Arc, Mutex};

use ledger::{Cx, EndUserId, EndUserState, Timestamp};

use super::AppState;
use crate::catalog::CatalogView;
use crate::clock::UlidSource;
use crate::error::ApiError;
use crate::group;
use crate::store::Mutation;
use crate::store::{Annotations, Changes, Claim, Env, IdempotencyAnswer, StoreError, StoreResult};

/// What an end-user operation changes and how its answer is kept: the end user, the
/// request's idempotency key (if any), the annotations of what it creates and the HTTP
/// status its answer is stored with.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    pub env: &'a Env,
    pub end_user: &'a EndUserId,
    pub idempotency: Option<&'a KeyHold>,
    pub annotations: Annotations,
    pub status: u16,
}

impl<'a> Change<'a> {
    /// A change answered 200, with no annotations.
    #[must_use]
    pub fn new(env: &'a Env, end_user: &'a EndUserId, idempotency: Option<&'a KeyHold>) -> Self {
        Change {
            env,
            end_user,
            idempotency,
            annotations: Annotations::default(),
            status: 200,
        }
    }

    /// Answered 201: the operation created something.
    #[must_use]
    pub fn created(self) -> Self {
        Change {
            status: 201,
            ..self
        }
    }

    /// What it creates carries `annotations`.
    #[must_use]
    pub fn annotated(self, annotations: Annotations) -> Self {
        Change {
            annotations,
            ..self
        }
    }
}

/// How an operation holds its request's idempotency key.
#[derive(Debug, Clone)]
pub enum KeyHold {
    /// A lease taken before the operation ran (the classic path, `idempotency::run`).
    Leased(String),
    /// To be claimed in the operation's own transaction (`idempotency::run_claiming`).
    Claim(ClaimHold),
}

impl KeyHold {
    pub fn key(&self) -> &str {
        match self {
            KeyHold::Leased(key) => key,
            KeyHold::Claim(hold) => &hold.claim.key,
        }
    }
}

/// A claim on an idempotency key, and whether the operation's transaction found the key
/// taken (answered, or leased by a request on the classic path): then the operation did
/// not run, its caller got `IdempotencyKeyInFlight`, and the request goes the classic
/// way (`idempotency::run_claiming` asks [`ClaimHold::was_taken`]). Clones share the flag.
#[derive(Debug, Clone)]
pub struct ClaimHold {
    pub claim: Claim,
    taken: Arc<std::sync::atomic::AtomicBool>,
}

impl ClaimHold {
    pub fn new(claim: Claim) -> ClaimHold {
        ClaimHold {
            claim,
            taken: Arc::default(),
        }
    }

    /// Whether an operation under this claim found its key taken and did not run.
    pub fn was_taken(&self) -> bool {
        self.taken.load(std::sync::atomic::Ordering::Acquire)
    }

    fn mark_taken(&self) {
        self.taken.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// How many times a transient store failure is retried where running the work again is
/// safe (reads, and a usage or lease batch, whose operations may run more than once).
/// Group commit's operations run once, so their transient failures are answered 503.
const TRANSIENT_RETRIES: u32 = 2;

/// Waits before retry `tries` (1-based) after `error`: 10 ms, then 20 ms, with jitter.
async fn transient_pause(tries: u32, error: &StoreError) {
    metrics::counter!("quotastack_store_retries_total").increment(1);
    tracing::debug!(%error, tries, "transient store failure; retrying");
    let base = 10_u64.saturating_mul(1 << tries.min(4)) / 2;
    let jitter = rand::random_range(0..=base);
    tokio::time::sleep(std::time::Duration::from_millis(
        base.saturating_add(jitter),
    ))
    .await;
}

/// Runs `work`, again up to [`TRANSIENT_RETRIES`] times while it fails transiently. For
/// work that may run more than once: reads, or writes whose failure wrote nothing.
///
/// # Errors
/// The last failure.
pub(super) async fn retry_transient<T, F, Fut>(mut work: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StoreResult<T>>,
{
    let mut tries = 0;
    loop {
        match work().await {
            Err(error) if error.is_transient() && tries < TRANSIENT_RETRIES => {
                tries += 1;
                transient_pause(tries, &error).await;
            }
            outcome => return outcome,
        }
    }
}

/// The error a store mutation ended with: the operation's own refusal when it declined
/// (`declined` holds it), the store's failure otherwise.
fn mutation_error(error: StoreError, declined: Option<ApiError>) -> ApiError {
    match (error, declined) {
        (StoreError::Declined, Some(refusal)) => refusal,
        (StoreError::Declined, None) => {
            ApiError::Internal("an operation declined without saying why".into())
        }
        (other, _) => other.into(),
    }
}

impl AppState {
    /// Runs one operation on an end user: loads the state, calls `operation` with the
    /// environment's `now`, persists the new state and its changes in one transaction
    /// (with the idempotent answer, when `idempotency_key` is given), and returns the
    /// operation's value. Concurrent operations on one end user share transactions
    /// (group commit, see `group.rs`); each still sees the state its predecessors left.
    ///
    /// # Errors
    /// The operation's refusal, or store failures; nothing of it is written then.
    pub async fn mutate<T, F>(&self, change: Change<'_>, operation: F) -> Result<T, ApiError>
    where
        T: serde::Serialize + Send + 'static,
        F: FnOnce(&mut EndUserState, &mut Cx<'_>, &CatalogView) -> Result<(T, Changes), ApiError>
            + Send
            + 'static,
    {
        let Change {
            env,
            end_user,
            idempotency,
            annotations,
            status,
        } = change;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let member = Box::new(Operation {
            operation: Some(operation),
            hold: idempotency.cloned(),
            annotations,
            status,
            value: None,
            reply,
        });
        let key = (env.clone(), end_user.clone());
        if self.inner.groups.push(&key, member) {
            let guard = crate::queues::DrainGuard {
                queues: Arc::clone(&self.inner.groups),
                key,
                fail: group::fail_member,
                finished: false,
            };
            let state = self.clone();
            tokio::spawn(async move { state.drain(guard).await });
        }
        answer.await.map_err(|_| {
            ApiError::Internal("the end user's group commit ended without an answer".into())
        })?
    }

    /// Commits the end user's queued operations, a group per transaction, until none are
    /// left.
    async fn drain(
        &self,
        mut guard: crate::queues::DrainGuard<(Env, EndUserId), Box<dyn group::Member>>,
    ) {
        let max = self.config().group_commit_max;
        let mut last = 0;
        loop {
            // The callers of the group just committed were answered and, under load,
            // send their next operations at once: a few yields let those queue so they
            // ride one transaction together rather than one alone and the rest after
            // it. Only while fewer wait than the last group carried; free when idle.
            for _ in 0..GATHER_YIELDS {
                if guard.queues.queued(&guard.key).unwrap_or(0) >= last.min(max) {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let Some(members) = guard.queues.take(&guard.key, max) else {
                break;
            };
            last = members.len();
            let (env, end_user) = &guard.key;
            self.commit_shared(env, end_user, members).await;
        }
        guard.finished = true;
    }

    /// Queues the end user's group for a transaction shared with other end users'
    /// groups of its environment and waits until it has committed or failed (its members
    /// are answered by then). The first group queued starts the environment's drainer;
    /// groups that queue while its transaction runs share the next one.
    async fn commit_shared(&self, env: &Env, end_user: &EndUserId, members: Members) {
        let (done, committed) = tokio::sync::oneshot::channel();
        let pending = group::Pending {
            end_user: end_user.clone(),
            members,
            done,
        };
        if self.inner.batches.push(env, pending) {
            let guard = crate::queues::DrainGuard {
                queues: Arc::clone(&self.inner.batches),
                key: env.clone(),
                fail: group::fail_pending,
                finished: false,
            };
            let state = self.clone();
            tokio::spawn(async move { state.drain_shared(guard).await });
        }
        // An error: the drainer went away, and its guard answered the members.
        let _ = committed.await;
    }

    /// Commits the environment's queued groups, as many a transaction as carry up to
    /// `database.group_commit_max` operations together (a larger group alone), until
    /// none are left: the bound on how long one transaction holds SQLite's one writer.
    async fn drain_shared(&self, mut guard: crate::queues::DrainGuard<Env, group::Pending>) {
        let max = self.config().group_commit_max;
        while let Some(pending) = guard
            .queues
            .take_weighed(&guard.key, max, |group| group.members.len())
        {
            let mut groups = Vec::with_capacity(pending.len());
            let mut done = Vec::with_capacity(pending.len());
            for group in pending {
                groups.push((group.end_user, group.members));
                done.push(group.done);
            }
            self.commit_groups(&guard.key, groups).await;
            for done in done {
                let _ = done.send(());
            }
        }
        guard.finished = true;
    }

    /// Commits each end user's group of operations (see `group.rs`) through
    /// [`LedgerStore::mutate_each`](crate::store::LedgerStore::mutate_each): each
    /// commits or fails on its own, and every member is answered.
    async fn commit_groups(&self, env: &Env, groups: Vec<(EndUserId, Members)>) {
        let view = match self.view(env).await {
            Ok(view) => view,
            Err(error) => {
                for member in groups.into_iter().flat_map(|(_, members)| members) {
                    member.finish(Err(error.clone()));
                }
                return;
            }
        };
        let now = self.env_now(&view);
        metrics::histogram!("quotastack_transaction_end_users")
            .record(u32::try_from(groups.len()).map_or(f64::MAX, f64::from));
        let mut slots: Vec<Slot> = groups
            .into_iter()
            .map(|(end_user, members)| {
                metrics::histogram!("quotastack_group_commit_operations")
                    .record(u32::try_from(members.len()).map_or(f64::MAX, f64::from));
                let claims = members
                    .iter()
                    .filter_map(|member| member.claim().cloned())
                    .collect();
                Slot {
                    end_user,
                    claims,
                    members,
                    declined: None,
                }
            })
            .collect();
        let outcome = {
            let mut targets = Vec::with_capacity(slots.len());
            let mut runs: Vec<Box<crate::store::ClaimingFn<'_>>> = Vec::with_capacity(slots.len());
            for slot in &mut slots {
                targets.push(Mutation {
                    env,
                    end_user: &slot.end_user,
                    now,
                    claims: &slot.claims,
                });
                runs.push(Box::new(group_run(
                    &mut slot.members,
                    &mut slot.declined,
                    &view,
                    now,
                )));
            }
            let mut each: Vec<(Mutation<'_>, &mut crate::store::ClaimingFn<'_>)> = targets
                .into_iter()
                .zip(runs.iter_mut().map(|run| &mut **run))
                .collect();
            self.store().mutate_each(&mut each).await
        };
        let outcomes: Vec<Result<(), ApiError>> = match outcome {
            Ok(outcomes) => outcomes
                .into_iter()
                .zip(&mut slots)
                .map(|(outcome, slot)| {
                    outcome.map_err(|error| mutation_error(error, slot.declined.take()))
                })
                .collect(),
            Err(error) => {
                let error = ApiError::from(error);
                slots.iter().map(|_| Err(error.clone())).collect()
            }
        };
        if outcomes.iter().any(Result::is_ok) {
            self.notify_changes(env);
        }
        for (slot, outcome) in slots.into_iter().zip(outcomes) {
            for member in slot.members {
                member.finish(outcome.clone());
            }
        }
    }

    /// Runs one operation on each of several end users in one transaction (a usage
    /// batch): all commit or none. Each operation reports one `Changes` per step it took
    /// (a batch's events, each with its own annotations). Returns each end user's value.
    /// An operation may run more than once, on a newer state each time (SQLite runs a
    /// batch before taking its writer): only the last run's value is returned, so an
    /// operation must have no effect beyond the state it is given and what it returns.
    ///
    /// # Errors
    /// The first failing operation's error, or store failures; nothing is written then.
    pub async fn mutate_many<T, F>(
        &self,
        env: &Env,
        users: Vec<(EndUserId, F)>,
    ) -> Result<Vec<(EndUserId, T)>, ApiError>
    where
        T: Send,
        F: FnMut(
                &mut EndUserState,
                &mut Cx<'_>,
                &CatalogView,
            ) -> Result<(T, Vec<Changes>), ApiError>
            + Send,
    {
        let view = self.view(env).await?;
        let now = self.env_now(&view);
        let mut slots: Vec<Option<T>> = users.iter().map(|_| None).collect();
        // The refusal of the operation that declined last (the one whose run counts).
        let declined = Mutex::new(None);
        let mut ids = Vec::with_capacity(users.len());
        let mut runs: Vec<Box<crate::store::MutateFn<'_>>> = Vec::with_capacity(users.len());
        for ((end_user, mut operation), slot) in users.into_iter().zip(slots.iter_mut()) {
            ids.push(end_user);
            let (view, declined) = (&view, &declined);
            runs.push(Box::new(
                move |state: &mut EndUserState| -> StoreResult<Vec<Changes>> {
                    let mut source = UlidSource::at(now);
                    let mut cx = Cx {
                        now,
                        catalog: &view.catalog,
                        ids: &mut source,
                    };
                    let ran = operation(state, &mut cx, view).and_then(|(value, mut changes)| {
                        if let Some(last) = changes.last_mut() {
                            last.next_due = state.next_due(&view.catalog)?;
                        }
                        Ok((value, changes))
                    });
                    match ran {
                        Ok((value, changes)) => {
                            *slot = Some(value);
                            Ok(changes)
                        }
                        Err(refusal) => {
                            *declined
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(refusal);
                            Err(StoreError::Declined)
                        }
                    }
                },
            ));
        }
        let mut items: Vec<(EndUserId, &mut crate::store::MutateFn<'_>)> = ids
            .iter()
            .cloned()
            .zip(runs.iter_mut().map(|run| &mut **run))
            .collect();
        // The operations may run again (see MutateFn), and nothing of a failed
        // transaction was written: a transient failure is retried.
        let mut tries = 0;
        let outcome = loop {
            match self.store().mutate_many(env, now, &mut items).await {
                Err(error) if error.is_transient() && tries < TRANSIENT_RETRIES => {
                    tries += 1;
                    transient_pause(tries, &error).await;
                }
                outcome => break outcome,
            }
        };
        drop(items);
        drop(runs);
        if let Err(error) = outcome {
            let declined = declined
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            return Err(mutation_error(error, declined));
        }
        self.notify_changes(env);
        ids.into_iter()
            .zip(slots)
            .map(|(end_user, slot)| {
                slot.map(|value| (end_user, value)).ok_or_else(|| {
                    ApiError::Internal("a batch operation finished without a result".into())
                })
            })
            .collect()
    }

    /// The end user's state as stored (a new, empty one if unknown).
    ///
    /// # Errors
    /// Store failures.
    pub async fn state(
        &self,
        env: &Env,
        end_user: &EndUserId,
        now: Timestamp,
    ) -> Result<EndUserState, ApiError> {
        Ok(retry_transient(|| self.store().load_state(env, end_user))
            .await?
            .unwrap_or_else(|| EndUserState::new(end_user.clone(), now)))
    }
}

/// How many times a drainer yields, at most, for the next group to gather.
const GATHER_YIELDS: usize = 16;

/// An end user's queued operations, as one group commits them.
type Members = Vec<Box<dyn group::Member>>;

/// One end user's group in a transaction: the keys its members claim, and the refusal
/// of the operation that declined, if one did.
struct Slot {
    end_user: EndUserId,
    claims: Vec<Claim>,
    members: Members,
    declined: Option<ApiError>,
}

/// The store's operation for one end user's group: runs the members the store's claims
/// let run (see `group::apply`), each on the state its predecessors left; a refusal
/// that fails the whole group is kept in `declined`.
fn group_run<'a>(
    members: &'a mut Members,
    declined: &'a mut Option<ApiError>,
    view: &'a CatalogView,
    now: Timestamp,
) -> impl FnMut(&mut EndUserState, &[bool]) -> StoreResult<Vec<Changes>> + Send + 'a {
    move |state: &mut EndUserState, claimed: &[bool]| {
        let mut flags = claimed.iter();
        let runnable: Vec<bool> = members
            .iter()
            .map(|member| member.claim().is_none() || flags.next().copied().unwrap_or(false))
            .collect();
        let mut ids = UlidSource::at(now);
        let mut cx = Cx {
            now,
            catalog: &view.catalog,
            ids: &mut ids,
        };
        // A panic fails this group alone, not every group of its shared transaction.
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            group::apply(members, &runnable, state, &mut cx, view)
        }))
        .map_err(|_| {
            tracing::error!(
                end_user = %state.end_user_id(),
                "an operation panicked; nothing of its end user's group is written"
            );
            StoreError::Fatal("an operation panicked; nothing of it was written".into())
        })?;
        applied.map_err(|refusal| {
            *declined = Some(refusal);
            StoreError::Declined
        })
    }
}

/// A caller's operation waiting in its end user's group commit.
struct Operation<T, F> {
    operation: Option<F>,
    hold: Option<KeyHold>,
    annotations: Annotations,
    status: u16,
    /// What the operation answered, kept until its transaction ends.
    value: Option<Result<T, ApiError>>,
    reply: tokio::sync::oneshot::Sender<Result<T, ApiError>>,
}

impl<T, F> group::Member for Operation<T, F>
where
    T: serde::Serialize + Send + 'static,
    F: FnOnce(&mut EndUserState, &mut Cx<'_>, &CatalogView) -> Result<(T, Changes), ApiError>
        + Send
        + 'static,
{
    fn run(
        &mut self,
        state: &mut EndUserState,
        cx: &mut Cx<'_>,
        view: &CatalogView,
    ) -> Result<Changes, ApiError> {
        let operation = self
            .operation
            .take()
            .ok_or_else(|| ApiError::Internal("an operation was run twice".into()))?;
        let ran = operation(state, cx, view).and_then(|(value, mut changes)| {
            changes.annotations = Annotations {
                idempotency_key: self.hold.as_ref().map(|hold| hold.key().to_owned()),
                ..self.annotations.clone()
            };
            if let Some(key) = self.hold.as_ref().map(KeyHold::key) {
                let body = serde_json::to_vec(&value)
                    .map_err(|error| ApiError::Internal(error.to_string()))?;
                changes.idempotency = Some(IdempotencyAnswer {
                    key: key.to_owned(),
                    status: self.status,
                    body,
                });
            }
            Ok((value, changes))
        });
        match ran {
            Ok((value, changes)) => {
                self.value = Some(Ok(value));
                Ok(changes)
            }
            Err(error) => {
                self.value = Some(Err(error.clone()));
                Err(error)
            }
        }
    }

    fn claim(&self) -> Option<&Claim> {
        match &self.hold {
            Some(KeyHold::Claim(hold)) => Some(&hold.claim),
            _ => None,
        }
    }

    fn skip(&mut self) {
        if let Some(KeyHold::Claim(hold)) = &self.hold {
            hold.mark_taken();
        }
        self.value = Some(Err(ApiError::IdempotencyKeyInFlight));
    }

    fn refusal(&self, error: &ApiError) -> Result<Option<Changes>, ApiError> {
        let Some(claim) = self.claim() else {
            return Ok(None);
        };
        if !error.is_stored_decision() {
            return Ok(Some(Changes {
                release: Some(claim.key.clone()),
                ..Changes::default()
            }));
        }
        let problem = error.problem();
        let body =
            serde_json::to_vec(&problem).map_err(|error| ApiError::Internal(error.to_string()))?;
        Ok(Some(Changes {
            idempotency: Some(IdempotencyAnswer {
                key: claim.key.clone(),
                status: problem.status,
                body,
            }),
            ..Changes::default()
        }))
    }

    fn finish(self: Box<Self>, outcome: Result<(), ApiError>) {
        let answer = match outcome {
            Ok(()) => self.value.unwrap_or_else(|| {
                Err(ApiError::Internal(
                    "a committed operation had no answer".into(),
                ))
            }),
            Err(error) => Err(error),
        };
        // The caller may have gone (a client that hung up); what committed stays.
        let _ = self.reply.send(answer);
    }
}
