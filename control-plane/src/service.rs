//! The service layer: shared state (store, clock, catalog cache, key cache, rate limits)
//! and the one way every end-user operation runs — load, call `ledger`, persist in one
//! transaction. Handlers parse and authenticate, then call in here.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ledger::{EndUserId, Timestamp};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth;
use crate::catalog::CatalogView;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::ApiError;
use crate::group;
use crate::store::{Env, Store};

mod callers;
pub mod feed;
mod mutate;

pub use callers::{Caller, OpenStream, StreamGuard};
use mutate::retry_transient;
pub use mutate::{Change, ClaimHold, KeyHold};

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
    /// Wrong operator tokens per client address: a budget of their own, so that bad API
    /// keys from an address (a load balancer's, say) never lock the operator out.
    failed_operator: auth::cache::FailedAuth,
    limiter: DefaultKeyedRateLimiter<Env>,
    metrics: Option<PrometheusHandle>,
    /// Webhook delivery (the worker's handle).
    deliveries: Arc<crate::webhooks::Deliveries>,
    /// Bumped after every committed change, so change streams wake at once.
    changes: tokio::sync::watch::Sender<u64>,
    /// Environments whose feed this process appended to since the NATS publisher last
    /// looked (it publishes them first).
    feed_dirty: Mutex<std::collections::HashSet<Env>>,
    /// The NATS connection, where `sync.nats_url` is set and the server connected it.
    nats: std::sync::OnceLock<async_nats::Client>,
    /// Told each time the NATS connection is made (first or again), so the publisher
    /// goes on at once rather than at its next look.
    nats_connected: Arc<tokio::sync::Notify>,
    /// Turns true when the server starts shutting down: long-lived streams end.
    closing: tokio::sync::watch::Sender<bool>,
    /// Queued mutations per end user (group commit).
    groups: Arc<group::Groups>,
    /// End users' groups waiting for a transaction they share, per environment (where
    /// the store shares them).
    batches: Arc<group::Batches>,
    /// End users whose due work failed, for the scheduler's backoff.
    due_failures: crate::backoff::DueFailures,
    /// Open sync streams per API key id.
    streams: Mutex<HashMap<String, usize>>,
    /// Every open sync stream, by a number of its own.
    open_streams: Mutex<HashMap<u64, callers::OpenStream>>,
    stream_ids: std::sync::atomic::AtomicU64,
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
    /// The state, encoded once per encoding the streams ask for.
    pub state: Arc<feed::EncodedState>,
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
                failed_operator: auth::cache::FailedAuth::new(&key_cache),
                limiter,
                metrics,
                deliveries,
                changes: tokio::sync::watch::Sender::new(0),
                feed_dirty: Mutex::default(),
                nats: std::sync::OnceLock::new(),
                nats_connected: Arc::default(),
                closing: tokio::sync::watch::Sender::new(false),
                groups: Arc::default(),
                batches: Arc::default(),
                due_failures: crate::backoff::DueFailures::default(),
                streams: Mutex::default(),
                open_streams: Mutex::default(),
                stream_ids: std::sync::atomic::AtomicU64::new(0),
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
        Ok(self.changes_after_read(env, cursor, limit).await?.0)
    }

    /// [`AppState::changes_after`], and whether this call read the store itself (`false`:
    /// the page of an earlier read, which may end before the last commit).
    ///
    /// # Errors
    /// Store failures.
    pub async fn changes_after_read(
        &self,
        env: &Env,
        cursor: i64,
        limit: u32,
    ) -> Result<(Arc<Vec<crate::store::ChangeRecord>>, bool), ApiError> {
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
            return Ok((records, read_here));
        }
        self.forget_feed_page(&key, &page);
        if read_here {
            return Ok((records, true));
        }
        Ok((
            Arc::new(self.store().changes_after(env, cursor, limit).await?),
            true,
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
        self.notify_changes(env);
        Ok(())
    }

    /// Wakes every change stream of this process and of the other processes on the same
    /// database (they look for new feed entries), after a commit to `env`'s feed.
    pub fn notify_changes(&self, env: &Env) {
        if self.inner.nats.get().is_some() {
            let mut dirty = self
                .inner
                .feed_dirty
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !dirty.contains(env) {
                dirty.insert(env.clone());
            }
        }
        self.inner
            .changes
            .send_modify(|count| *count = count.wrapping_add(1));
        // And the other replicas on this database (PostgreSQL), whose streams look too.
        self.store().announce_commit();
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

    /// The environments whose feed this process appended to since the last call.
    pub fn take_feed_dirty(&self) -> Vec<Env> {
        let mut dirty = self
            .inner
            .feed_dirty
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        dirty.drain().collect()
    }

    /// Gives the server its NATS connection (once; later calls are ignored).
    pub fn attach_nats(&self, client: async_nats::Client) {
        let _ = self.inner.nats.set(client);
    }

    /// Told when the NATS connection is made, first or again (shared with the client's
    /// event callback, which must not hold the state: the state holds the client).
    pub fn nats_connected(&self) -> &Arc<tokio::sync::Notify> {
        &self.inner.nats_connected
    }

    /// The NATS connection, where the feed is published there.
    pub fn nats(&self) -> Option<&async_nats::Client> {
        self.inner.nats.get()
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
}

#[cfg(test)]
mod tests;
