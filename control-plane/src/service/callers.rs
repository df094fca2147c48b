//! Who is calling: API keys authenticated (through the key cache, with failed
//! attempts limited per client address), rate limits per environment, and the sync
//! streams each key holds open.

use ledger::Timestamp;

use super::AppState;
use crate::auth;
use crate::error::ApiError;
use crate::store::{ApiKeyRecord, Env};

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

/// An open sync stream, counted against its key until dropped, and listed (with the
/// feed position it has sent up to) for the console's proxies page.
#[derive(Debug)]
pub struct StreamGuard {
    state: AppState,
    key_id: String,
    id: u64,
    cursor: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

/// A sync stream open on this process, as the console shows it.
#[derive(Debug, Clone)]
pub struct OpenStream {
    pub env: Env,
    pub key_id: String,
    /// When it opened (real clock).
    pub opened_at: Timestamp,
    /// The feed position it has sent up to.
    pub cursor: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl StreamGuard {
    /// Records that the stream has sent everything up to feed position `cursor`.
    pub fn at(&self, cursor: i64) {
        self.cursor
            .store(cursor, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.state
            .inner
            .open_streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
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

impl AppState {
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
        self.admit(record)
    }

    /// Checks a presented operator token against the configured one, counting a wrong
    /// one against the client's address in a budget of the operator's own (past it: 429
    /// without comparing). Failed API keys do not spend it.
    ///
    /// # Errors
    /// `Unauthorized` (no token configured, or a wrong one), `RateLimited`.
    pub fn check_operator_token(
        &self,
        presented: &str,
        client: Option<std::net::IpAddr>,
    ) -> Result<(), ApiError> {
        let now = self.real_now();
        if let Some(retry_after_secs) =
            client.and_then(|client| self.inner.failed_operator.refused(client, now))
        {
            return Err(ApiError::RateLimited { retry_after_secs });
        }
        let configured = self
            .config()
            .operator_token
            .as_ref()
            .ok_or(ApiError::Unauthorized)?;
        if auth::hashes_equal(
            &auth::hash_key(presented),
            &auth::hash_key(configured.expose()),
        ) {
            return Ok(());
        }
        if let Some(client) = client {
            self.inner.failed_operator.failed(client, now);
        }
        Err(ApiError::Unauthorized)
    }

    /// The caller of a console session made with the key whose hash is `key_hash`: the
    /// key must still work (not revoked), and the environment's rate limit applies as
    /// to any request.
    ///
    /// # Errors
    /// `Unauthorized` for a key that no longer works, `RateLimited`, or store failures.
    pub async fn resume(&self, key_hash: &[u8; 32]) -> Result<Caller, ApiError> {
        let now = self.real_now();
        let record = match self.inner.keys.get(key_hash, now) {
            Some(auth::cache::Cached::Found(record)) => Some(record),
            Some(auth::cache::Cached::Missing) => None,
            None => {
                let record = self.store().api_key_by_hash(key_hash).await?;
                self.inner.keys.put(*key_hash, record.clone(), now);
                record
            }
        };
        match record {
            Some(record)
                if record.revoked_at.is_none()
                    && auth::hashes_equal(&record.key_hash, key_hash) =>
            {
                self.admit(record)
            }
            _ => Err(ApiError::Unauthorized),
        }
    }

    /// The operator acting in `env` through the console: every scope, the environment's
    /// rate limit.
    ///
    /// # Errors
    /// `RateLimited`.
    pub fn operator_in(&self, env: Env) -> Result<Caller, ApiError> {
        self.limit(&env)?;
        Ok(Caller {
            env,
            key_id: "operator".into(),
            key_hash: [0; 32],
            scopes: vec!["*".into()],
        })
    }

    /// A known key's caller, within its environment's rate limit.
    fn admit(&self, record: ApiKeyRecord) -> Result<Caller, ApiError> {
        let env = Env::new(record.tenant_id, record.environment);
        self.limit(&env)?;
        Ok(Caller {
            env,
            key_id: record.id,
            key_hash: record.key_hash,
            scopes: record.scopes,
        })
    }

    /// The environment's rate limit (SPEC 2).
    fn limit(&self, env: &Env) -> Result<(), ApiError> {
        if let Err(not_until) = self.inner.limiter.check_key(env) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            return Err(ApiError::RateLimited {
                retry_after_secs: wait.as_secs().max(1),
            });
        }
        Ok(())
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
        drop(streams);
        let id = self
            .inner
            .stream_ids
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cursor = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(-1));
        self.inner
            .open_streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                id,
                OpenStream {
                    env: caller.env.clone(),
                    key_id: caller.key_id.clone(),
                    opened_at: self.real_now(),
                    cursor: std::sync::Arc::clone(&cursor),
                },
            );
        Ok(StreamGuard {
            state: self.clone(),
            key_id: caller.key_id.clone(),
            id,
            cursor,
        })
    }

    /// The sync streams of `env` open on this process.
    pub fn open_streams(&self, env: &Env) -> Vec<OpenStream> {
        self.inner
            .open_streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|stream| &stream.env == env)
            .cloned()
            .collect()
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
        self.inner.failed_operator.housekeep();
    }
}
