//! The service layer: shared state (store, clock, catalog cache, key cache, rate limits)
//! and the one way every end-user operation runs — load, call `ledger`, persist in one
//! transaction. Handlers parse and authenticate, then call in here.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ledger::{Cx, EndUserId, EndUserState, Timestamp};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth;
use crate::catalog::CatalogView;
use crate::clock::{Clock, UlidSource};
use crate::config::Config;
use crate::error::ApiError;
use crate::group;
use crate::store::{
    Annotations, ApiKeyRecord, Changes, Claim, Env, IdempotencyAnswer, Store, StoreError,
    StoreResult,
};

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
async fn retry_transient<T, F, Fut>(mut work: F) -> StoreResult<T>
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

/// The authenticated caller: a key of one tenant's environment, with its scopes.
#[derive(Debug, Clone)]
pub struct Caller {
    pub env: Env,
    pub key_id: String,
    /// The key's hash, to check later that it still works (long-lived streams).
    pub key_hash: [u8; 32],
    pub scopes: Vec<String>,
}

impl Caller {
    /// # Errors
    /// `MissingScope` when the key lacks `scope`.
    pub fn require(&self, scope: auth::Scope) -> Result<(), ApiError> {
        if auth::allows(&self.scopes, scope) {
            Ok(())
        } else {
            Err(ApiError::MissingScope(scope.as_str()))
        }
    }
}

#[derive(Debug)]
struct Inner {
    config: Config,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    /// Each environment's catalog view and when it was read.
    catalogs: Mutex<HashMap<Env, (Arc<CatalogView>, std::time::Instant)>>,
    /// Bumped by every invalidation: a view read while one happened is not cached (it may
    /// predate the change).
    catalog_generation: std::sync::atomic::AtomicU64,
    keys: auth::cache::KeyCache,
    failed_auth: auth::cache::FailedAuth,
    limiter: DefaultKeyedRateLimiter<Env>,
    metrics: Option<PrometheusHandle>,
    /// Webhook delivery (the worker's handle).
    deliveries: Arc<crate::webhooks::Deliveries>,
    /// Bumped after every committed change, so change streams wake at once.
    changes: tokio::sync::watch::Sender<u64>,
    /// Turns true when the server starts shutting down: long-lived streams end.
    closing: tokio::sync::watch::Sender<bool>,
    /// Queued mutations per end user (group commit).
    groups: Arc<group::Groups>,
    /// End users whose due work failed, for the scheduler's backoff.
    due_failures: crate::backoff::DueFailures,
    /// Open sync streams per API key id.
    streams: Mutex<HashMap<String, usize>>,
    /// Bumped by every revocation in this process (streams check their keys at once).
    revocations: tokio::sync::watch::Sender<u64>,
    /// Which end user a lease belongs to (it never changes), so a report finds its end
    /// user without a store read.
    lease_owners: Mutex<lru::LruCache<(Env, ledger::LeaseId), EndUserId>>,
    streamed_states: Mutex<lru::LruCache<(Env, EndUserId), StreamedState>>,
    feed_pages: Mutex<lru::LruCache<(Env, i64, u32), FeedPage>>,
}

/// One read of the change feed, shared by the streams that want it (see
/// `AppState::changes_after`).
type FeedPage = Arc<tokio::sync::OnceCell<Arc<Vec<crate::store::ChangeRecord>>>>;

/// Feed reads kept for other streams at the same cursor.
const FEED_PAGES_KEPT: usize = 256;

/// Leases whose owner this process remembers.
const LEASE_OWNERS_REMEMBERED: usize = 100_000;
/// End users' states kept as change streams sent them (see `StreamedState`).
const STREAMED_STATES_KEPT: usize = 2_048;

/// An end user's state as a change stream sends it, shared by this process's streams:
/// N proxies following one environment read and serialise each changed end user once
/// between them, not once each.
#[derive(Debug, Clone)]
pub struct StreamedState {
    /// The feed position this state includes at least (the change it was read for).
    pub includes: i64,
    pub version: u64,
    /// `ledger::StateParts` as JSON.
    pub state: Arc<serde_json::value::RawValue>,
}

/// An open sync stream, counted against its key until dropped.
#[derive(Debug)]
pub struct StreamGuard {
    state: AppState,
    key_id: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut streams = self
            .state
            .inner
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(open) = streams.get_mut(&self.key_id) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                streams.remove(&self.key_id);
            }
        }
    }
}

/// The state every handler and job shares. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

impl AppState {
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        metrics: Option<PrometheusHandle>,
    ) -> AppState {
        let key_cache = config.key_cache;
        let per_second = NonZeroU32::new(config.rate_limit_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(NonZeroU32::MIN);
        let limiter = RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst));
        let deliveries = Arc::new(crate::webhooks::Deliveries::new(
            &config,
            Arc::clone(&store),
            Arc::clone(&clock),
        ));
        AppState {
            inner: Arc::new(Inner {
                config,
                store,
                clock,
                catalogs: Mutex::new(HashMap::new()),
                catalog_generation: std::sync::atomic::AtomicU64::new(0),
                keys: auth::cache::KeyCache::new(key_cache),
                failed_auth: auth::cache::FailedAuth::new(&key_cache),
                limiter,
                metrics,
                deliveries,
                changes: tokio::sync::watch::Sender::new(0),
                closing: tokio::sync::watch::Sender::new(false),
                groups: Arc::default(),
                due_failures: crate::backoff::DueFailures::default(),
                streams: Mutex::default(),
                revocations: tokio::sync::watch::Sender::new(0),
                lease_owners: Mutex::new(lru::LruCache::new(
                    std::num::NonZeroUsize::new(LEASE_OWNERS_REMEMBERED)
                        .unwrap_or(std::num::NonZeroUsize::MIN),
                )),
                feed_pages: Mutex::new(lru::LruCache::new(
                    std::num::NonZeroUsize::new(FEED_PAGES_KEPT)
                        .unwrap_or(std::num::NonZeroUsize::MIN),
                )),
                streamed_states: Mutex::new(lru::LruCache::new(
                    std::num::NonZeroUsize::new(STREAMED_STATES_KEPT)
                        .unwrap_or(std::num::NonZeroUsize::MIN),
                )),
            }),
        }
    }

    /// The scheduler's record of failing end users.
    pub fn due_failures(&self) -> &crate::backoff::DueFailures {
        &self.inner.due_failures
    }

    /// The change feed after `cursor` (at most `limit` records), read once for every
    /// stream of this process at that cursor: N proxies woken by one commit make one
    /// read, not N. A page is what one read returned, so a stream served an earlier
    /// read's page sees a prefix of what is there now and reads on from its end. An
    /// empty page is not kept, and a stream that joined someone else's read and got
    /// nothing reads again itself (the commit that woke it may have landed after that
    /// read began).
    ///
    /// # Errors
    /// Store failures.
    pub async fn changes_after(
        &self,
        env: &Env,
        cursor: i64,
        limit: u32,
    ) -> Result<Arc<Vec<crate::store::ChangeRecord>>, ApiError> {
        let key = (env.clone(), cursor, limit);
        let page: FeedPage = {
            let mut pages = self
                .inner
                .feed_pages
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(pages.get_or_insert(key.clone(), FeedPage::default))
        };
        let mut read_here = false;
        let records = page
            .get_or_try_init(|| async {
                read_here = true;
                self.store()
                    .changes_after(env, cursor, limit)
                    .await
                    .map(Arc::new)
            })
            .await
            .map(Arc::clone);
        let records = match records {
            Ok(records) => records,
            Err(error) => {
                self.forget_feed_page(&key, &page);
                return Err(error.into());
            }
        };
        if !records.is_empty() {
            return Ok(records);
        }
        self.forget_feed_page(&key, &page);
        if read_here {
            return Ok(records);
        }
        Ok(Arc::new(
            self.store().changes_after(env, cursor, limit).await?,
        ))
    }

    fn forget_feed_page(&self, key: &(Env, i64, u32), page: &FeedPage) {
        let mut pages = self
            .inner
            .feed_pages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pages.peek(key).is_some_and(|kept| Arc::ptr_eq(kept, page)) {
            pages.pop(key);
        }
    }

    /// `end_user`'s state as a stream of this process last sent it, when that includes
    /// the change at feed position `at`.
    pub fn streamed_state(
        &self,
        env: &Env,
        end_user: &EndUserId,
        at: i64,
    ) -> Option<StreamedState> {
        let mut states = self
            .inner
            .streamed_states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        states
            .get(&(env.clone(), end_user.clone()))
            .filter(|state| state.includes >= at)
            .cloned()
    }

    /// Keeps `state` for the other streams (unless a newer one is kept already).
    pub fn remember_streamed_state(&self, env: &Env, end_user: &EndUserId, state: StreamedState) {
        let mut states = self
            .inner
            .streamed_states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (env.clone(), end_user.clone());
        if states
            .peek(&key)
            .is_some_and(|kept| kept.includes >= state.includes)
        {
            return;
        }
        states.put(key, state);
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn store(&self) -> &dyn Store {
        self.inner.store.as_ref()
    }

    /// Webhook delivery: the worker's handle, and what a test-clock advance settles with.
    pub fn deliveries(&self) -> &Arc<crate::webhooks::Deliveries> {
        &self.inner.deliveries
    }

    pub fn metrics(&self) -> Option<&PrometheusHandle> {
        self.inner.metrics.as_ref()
    }

    /// The real clock's instant.
    pub fn real_now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// The environment's instant: the real clock, moved by the test clock's offset.
    pub fn env_now(&self, view: &CatalogView) -> Timestamp {
        let now = self.real_now();
        now.checked_add(ledger::Span::from_millis(view.env.clock_offset_ms))
            .unwrap_or(now)
    }

    /// The environment's catalog, settings and clock offset, cached for
    /// `server.catalog_cache_ms`: this process forgets it at once when it changes it, and
    /// sees a change made through another replica when it reads it again.
    ///
    /// # Errors
    /// Store failures.
    pub async fn view(&self, env: &Env) -> Result<Arc<CatalogView>, ApiError> {
        if let Some((view, read_at)) = self.lock_catalogs().get(env)
            && read_at.elapsed() < self.config().catalog_cache
        {
            return Ok(Arc::clone(view));
        }
        let read_at = std::time::Instant::now();
        let generation = self
            .inner
            .catalog_generation
            .load(std::sync::atomic::Ordering::SeqCst);
        let store = self.store();
        // Reads only: safe to run again after a transient failure.
        let view = Arc::new(
            retry_transient(|| async {
                CatalogView::build(
                    store.features(env).await?,
                    store.plans(env).await?,
                    store.variants(env).await?,
                    store.env_record(env).await?,
                )
            })
            .await?,
        );
        let mut catalogs = self.lock_catalogs();
        // Under the lock, so an invalidation cannot slip between this check and the insert.
        if self
            .inner
            .catalog_generation
            .load(std::sync::atomic::Ordering::SeqCst)
            == generation
        {
            catalogs.insert(env.clone(), (Arc::clone(&view), read_at));
        }
        drop(catalogs);
        Ok(view)
    }

    /// Forgets the cached catalog after this process changed it.
    pub fn invalidate(&self, env: &Env) {
        let mut catalogs = self.lock_catalogs();
        self.inner
            .catalog_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        catalogs.remove(env);
    }

    /// After a catalog, settings or clock change: forget the cached catalog, append to the
    /// change feed, and wake change streams.
    ///
    /// # Errors
    /// Store failures.
    pub async fn catalog_changed(&self, env: &Env) -> Result<(), ApiError> {
        self.invalidate(env);
        self.store()
            .record_catalog_change(env, self.real_now())
            .await?;
        self.notify_changes();
        Ok(())
    }

    /// Wakes every change stream (they look for new feed entries).
    pub fn notify_changes(&self) {
        self.inner
            .changes
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// Tells long-lived streams (`/v1/sync/stream`) to end, so a graceful shutdown does
    /// not wait on followers that never hang up.
    pub fn begin_shutdown(&self) {
        self.inner.closing.send_replace(true);
    }

    /// A receiver that turns true when the server is shutting down.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.closing.subscribe()
    }

    /// A receiver that sees a new value after each committed change.
    pub fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    fn lock_catalogs(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Env, (Arc<CatalogView>, std::time::Instant)>> {
        self.inner
            .catalogs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Authenticates a presented key: known, not revoked, matching its prefix's
    /// environment; then applies the environment's rate limit. `client` is the caller's
    /// address: past its budget of failed authentications it is refused (429) without a
    /// store read. `None` (a request from inside the process) is not limited.
    ///
    /// # Errors
    /// `Unauthorized`, `RateLimited`, or store failures.
    pub async fn authenticate(
        &self,
        secret: &str,
        client: Option<std::net::IpAddr>,
    ) -> Result<Caller, ApiError> {
        let now = self.real_now();
        let record = self.key_record(secret, client, now).await;
        let record = match record {
            Ok(record) => record,
            Err(error) => {
                if matches!(error, ApiError::Unauthorized)
                    && let Some(client) = client
                {
                    self.inner.failed_auth.failed(client, now);
                }
                return Err(error);
            }
        };
        let env = Env {
            tenant_id: record.tenant_id,
            environment: record.environment,
        };
        if let Err(not_until) = self.inner.limiter.check_key(&env) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            return Err(ApiError::RateLimited {
                retry_after_secs: wait.as_secs().max(1),
            });
        }
        Ok(Caller {
            env,
            key_id: record.id,
            key_hash: record.key_hash,
            scopes: record.scopes,
        })
    }

    /// Whether the key `caller` authenticated with still works (not revoked): asked of
    /// the key cache, so a revocation through this process shows at once and one
    /// through another replica within the cache's time to live.
    ///
    /// # Errors
    /// Store failures.
    pub async fn key_is_live(&self, caller: &Caller) -> Result<bool, ApiError> {
        let now = self.real_now();
        let record = match self.inner.keys.get(&caller.key_hash, now) {
            Some(auth::cache::Cached::Found(record)) => Some(record),
            Some(auth::cache::Cached::Missing) => None,
            None => {
                let record = self.store().api_key_by_hash(&caller.key_hash).await?;
                self.inner.keys.put(caller.key_hash, record.clone(), now);
                record
            }
        };
        Ok(record.is_some_and(|record| record.revoked_at.is_none()))
    }

    /// Counts a sync stream of `caller`'s key as open until the guard is dropped.
    ///
    /// # Errors
    /// `TooManyStreams` when the key already has `sync.streams_per_key` open here.
    pub fn open_stream(&self, caller: &Caller) -> Result<StreamGuard, ApiError> {
        let limit = self.config().streams_per_key;
        let mut streams = self
            .inner
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let open = streams.entry(caller.key_id.clone()).or_insert(0);
        if *open >= limit {
            return Err(ApiError::TooManyStreams { limit });
        }
        *open = open.saturating_add(1);
        Ok(StreamGuard {
            state: self.clone(),
            key_id: caller.key_id.clone(),
        })
    }

    /// The live key record a secret names, from the cache or the store.
    async fn key_record(
        &self,
        secret: &str,
        client: Option<std::net::IpAddr>,
        now: Timestamp,
    ) -> Result<ApiKeyRecord, ApiError> {
        let claimed = auth::key_environment(secret).ok_or(ApiError::Unauthorized)?;
        let hash = auth::hash_key(secret);
        let record = match self.inner.keys.get(&hash, now) {
            Some(auth::cache::Cached::Found(record)) => record,
            Some(auth::cache::Cached::Missing) => return Err(ApiError::Unauthorized),
            None => {
                if let Some(retry_after_secs) =
                    client.and_then(|client| self.inner.failed_auth.refused(client, now))
                {
                    return Err(ApiError::RateLimited { retry_after_secs });
                }
                let record = self.store().api_key_by_hash(&hash).await?;
                self.inner.keys.put(hash, record.clone(), now);
                record.ok_or(ApiError::Unauthorized)?
            }
        };
        if !auth::hashes_equal(&record.key_hash, &hash)
            || record.revoked_at.is_some()
            || record.environment != claimed
        {
            return Err(ApiError::Unauthorized);
        }
        Ok(record)
    }

    /// Drops a key from the lookup cache after its revocation, and tells this process's
    /// sync streams to check their keys at once.
    pub fn forget_key(&self, hash: &[u8; 32]) {
        self.inner.keys.forget(hash);
        self.inner
            .revocations
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// The end user lease `id` of `env` belongs to, when this process remembers it.
    pub fn lease_owner(&self, env: &Env, id: ledger::LeaseId) -> Option<EndUserId> {
        self.inner
            .lease_owners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(env.clone(), id))
            .cloned()
    }

    /// Remembers which end user a lease belongs to.
    pub fn remember_lease_owner(&self, env: &Env, id: &str, end_user: &EndUserId) {
        if let Some(id) = ledger::LeaseId::parse(id) {
            self.inner
                .lease_owners
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .put((env.clone(), id), end_user.clone());
        }
    }

    /// A receiver that sees a new value after each revocation in this process.
    pub fn subscribe_revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.revocations.subscribe()
    }

    /// How many found keys and misses the key cache holds.
    pub fn key_cache_len(&self) -> (usize, usize) {
        self.inner.keys.len()
    }

    /// Failed authentications per client address: forget addresses back at a full
    /// budget (the scheduler calls this every pass).
    pub fn housekeep_auth(&self) {
        self.inner.failed_auth.housekeep();
    }

    /// Runs one operation on an end user: loads the state, calls `operation` with the
    /// environment's `now`, persists the new state and its changes in one transaction
    /// (with the idempotent answer, when `idempotency_key` is given), and returns the
    /// operation's value. Concurrent operations on one end user share transactions
    /// (group commit, see `group.rs`); each still sees the state its predecessors left.
    ///
    /// # Errors
    /// The operation's refusal, or store failures; nothing of it is written then.
    pub async fn mutate<T, F>(
        &self,
        env: &Env,
        end_user: &EndUserId,
        idempotency: Option<&KeyHold>,
        annotations: Annotations,
        status: u16,
        operation: F,
    ) -> Result<T, ApiError>
    where
        T: serde::Serialize + Send + 'static,
        F: FnOnce(&mut EndUserState, &mut Cx<'_>, &CatalogView) -> Result<(T, Changes), ApiError>
            + Send
            + 'static,
    {
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
            self.commit_group(env, end_user, members).await;
        }
        guard.finished = true;
    }

    async fn commit_group(
        &self,
        env: &Env,
        end_user: &EndUserId,
        mut members: Vec<Box<dyn group::Member>>,
    ) {
        let outcome = match self.view(env).await {
            Ok(view) => {
                let now = self.env_now(&view);
                metrics::histogram!("quotastack_group_commit_operations")
                    .record(u32::try_from(members.len()).map_or(f64::MAX, f64::from));
                let claims: Vec<Claim> = members
                    .iter()
                    .filter_map(|member| member.claim().cloned())
                    .collect();
                let mut declined = None;
                let mut run =
                    |state: &mut EndUserState, claimed: &[bool]| -> StoreResult<Vec<Changes>> {
                        let mut flags = claimed.iter();
                        let runnable: Vec<bool> = members
                            .iter()
                            .map(|member| {
                                member.claim().is_none() || flags.next().copied().unwrap_or(false)
                            })
                            .collect();
                        let mut ids = UlidSource::at(now);
                        let mut cx = Cx {
                            now,
                            catalog: &view.catalog,
                            ids: &mut ids,
                        };
                        group::apply(&mut members, &runnable, state, &mut cx, &view).map_err(
                            |refusal| {
                                declined = Some(refusal);
                                StoreError::Declined
                            },
                        )
                    };
                let outcome = self
                    .store()
                    .mutate(env, end_user, now, &claims, &mut run)
                    .await;
                outcome.map_err(|error| mutation_error(error, declined))
            }
            Err(error) => Err(error),
        };
        if outcome.is_ok() {
            self.notify_changes();
        }
        for member in members {
            member.finish(outcome.clone());
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
        self.notify_changes();
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ledger::{Credits, GrantRequest};
    use sqlx::Connection;

    use super::*;
    use crate::clock::ManualClock;
    use crate::config::{DatabaseUrl, Overrides};
    use crate::store::Environment;
    use crate::store::sqlite::SqliteStore;

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
                    &env,
                    &end_user,
                    None,
                    Annotations::default(),
                    201,
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
                env: Env {
                    tenant_id: tenant.into(),
                    environment: Environment::Test,
                },
                hot: EndUserId::new("hot").expect("id"),
            }
        }

        /// Takes SQLite's write lock on another connection and starts a grant of 1 to
        /// `hot`; returns once the grant's transaction waits for the lock (busy_timeout),
        /// so everything sent after it queues.
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

        let stored = state
            .store()
            .load_state(&env, &hot)
            .await
            .expect("load")
            .expect("stored");
        let now = state.real_now();
        assert_eq!(
            stored.available(None, now).expect("available"),
            Credits::new(20)
        );
        let changes = state
            .store()
            .changes_after(&env, 0, 100)
            .await
            .expect("feed");
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
                    &env,
                    &end_user,
                    Some(&KeyHold::Claim(hold.clone())),
                    Annotations::default(),
                    201,
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
            .idempotency_begin(&env, "held", &[1; 32], now, 30_000, now)
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
                    .idempotency_begin(&env, key, &[1; 32], now, 30_000, now)
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
        let stored = state
            .store()
            .load_state(&env, &hot)
            .await
            .expect("load")
            .expect("stored");
        assert_eq!(
            stored.available(None, now).expect("available"),
            Credits::new(1 + 5 + 2),
            "only the operations that ran committed"
        );
        let changes = state
            .store()
            .changes_after(&env, 0, 100)
            .await
            .expect("feed");
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
}
