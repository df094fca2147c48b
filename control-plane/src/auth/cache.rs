//! What authentication remembers between requests, every part of it bounded: found keys
//! and misses in two LRU caches with a time to live (so random keys never evict found
//! ones, and a flood of them leaves both at their bound), and a limit on failed
//! authentications per client address (so a loop of made-up keys costs the store at
//! most a few reads a second per address before it is answered 429 without one).

use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Mutex;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ledger::{Span, Timestamp};
use lru::LruCache;

use crate::store::ApiKeyRecord;

/// The bounds, from `[auth]` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyCacheLimits {
    /// Keys found in the store that are remembered (least recently used go first).
    pub found_len: usize,
    /// How long a found key is trusted before the store is asked again: how long a
    /// revocation made through another replica takes to apply here.
    pub found_ttl: Span,
    /// Unknown keys that are remembered.
    pub missing_len: usize,
    /// How long an unknown key is remembered as unknown (a key created meanwhile through
    /// another replica works after at most this long here).
    pub missing_ttl: Span,
    /// Failed authentications per second one client address may make, sustained.
    pub failures_per_second: u32,
    /// … and in a burst.
    pub failures_burst: u32,
}

impl Default for KeyCacheLimits {
    fn default() -> KeyCacheLimits {
        KeyCacheLimits {
            found_len: 10_000,
            found_ttl: Span::from_millis(5_000),
            missing_len: 10_000,
            missing_ttl: Span::from_millis(1_000),
            failures_per_second: 10,
            failures_burst: 50,
        }
    }
}

/// A cached lookup.
#[derive(Debug)]
pub enum Cached {
    Found(ApiKeyRecord),
    Missing,
}

/// Found keys and misses, each in its own bounded LRU with a time to live.
#[derive(Debug)]
pub struct KeyCache {
    limits: KeyCacheLimits,
    found: Mutex<LruCache<[u8; 32], (ApiKeyRecord, Timestamp)>>,
    missing: Mutex<LruCache<[u8; 32], Timestamp>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn capacity(len: usize) -> NonZeroUsize {
    NonZeroUsize::new(len).unwrap_or(NonZeroUsize::MIN)
}

fn fresh(stored_at: Timestamp, now: Timestamp, ttl: Span) -> bool {
    now.since(stored_at)
        .is_ok_and(|age| age.as_millis() >= 0 && age < ttl)
}

impl KeyCache {
    pub fn new(limits: KeyCacheLimits) -> KeyCache {
        KeyCache {
            limits,
            found: Mutex::new(LruCache::new(capacity(limits.found_len))),
            missing: Mutex::new(LruCache::new(capacity(limits.missing_len))),
        }
    }

    /// The remembered lookup of `hash`, if still fresh at `now`.
    pub fn get(&self, hash: &[u8; 32], now: Timestamp) -> Option<Cached> {
        {
            let mut found = lock(&self.found);
            if let Some((record, stored_at)) = found.get(hash) {
                if fresh(*stored_at, now, self.limits.found_ttl) {
                    return Some(Cached::Found(record.clone()));
                }
                found.pop(hash);
            }
        }
        let mut missing = lock(&self.missing);
        if let Some(stored_at) = missing.get(hash) {
            if fresh(*stored_at, now, self.limits.missing_ttl) {
                return Some(Cached::Missing);
            }
            missing.pop(hash);
        }
        None
    }

    /// Remembers what the store answered for `hash` at `now`.
    pub fn put(&self, hash: [u8; 32], record: Option<ApiKeyRecord>, now: Timestamp) {
        match record {
            Some(record) => {
                lock(&self.missing).pop(&hash);
                lock(&self.found).put(hash, (record, now));
            }
            None => {
                lock(&self.found).pop(&hash);
                lock(&self.missing).put(hash, now);
            }
        }
    }

    /// Forgets `hash` (after a revocation).
    pub fn forget(&self, hash: &[u8; 32]) {
        lock(&self.found).pop(hash);
        lock(&self.missing).pop(hash);
    }

    /// How many found keys and misses are remembered.
    pub fn len(&self) -> (usize, usize) {
        (lock(&self.found).len(), lock(&self.missing).len())
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }
}

/// Client addresses over their budget of failed authentications that are remembered at
/// once (the least recently refused go first).
const BLOCKED_LEN: usize = 10_000;

/// Failed authentications per client address (IPv6 by its /64: one host's whole range
/// counts as one address).
#[derive(Debug)]
pub struct FailedAuth {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    /// Addresses that used up their budget, and until when (real time) they are refused
    /// without a store read.
    blocked: Mutex<LruCache<IpAddr, Timestamp>>,
}

/// The address a client's failures count against: IPv4 as it is, IPv6 by its /64.
pub fn client_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let segments = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(
                    segments[0],
                    segments[1],
                    segments[2],
                    segments[3],
                    0,
                    0,
                    0,
                    0,
                ))
            }
        },
    }
}

impl FailedAuth {
    pub fn new(limits: &KeyCacheLimits) -> FailedAuth {
        let per_second = NonZeroU32::new(limits.failures_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.failures_burst).unwrap_or(NonZeroU32::MIN);
        FailedAuth {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            blocked: Mutex::new(LruCache::new(capacity(BLOCKED_LEN))),
        }
    }

    /// How many seconds `client` must wait, when it used up its budget of failures.
    pub fn refused(&self, client: IpAddr, now: Timestamp) -> Option<u64> {
        let key = client_key(client);
        let mut blocked = lock(&self.blocked);
        let until = *blocked.get(&key)?;
        match until.since(now) {
            Ok(wait) if wait.is_positive() => {
                Some(u64::try_from(wait.as_millis().div_euclid(1000)).map_or(1, |secs| secs.max(1)))
            }
            _ => {
                blocked.pop(&key);
                None
            }
        }
    }

    /// Counts one failed authentication from `client`; past its budget, the address is
    /// refused until its budget refills.
    pub fn failed(&self, client: IpAddr, now: Timestamp) {
        let key = client_key(client);
        if let Err(not_until) = self.limiter.check_key(&key) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            let wait = Span::from_millis(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
            lock(&self.blocked).put(key, now.checked_add(wait).unwrap_or(now));
            metrics::counter!("quotastack_auth_clients_refused_total").increment(1);
        }
    }

    /// Forgets the limiter's state of addresses that are back to a full budget (called by
    /// the scheduler, so the limiter does not grow with every address ever seen).
    pub fn housekeep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Addresses the limiter holds state for.
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> ApiKeyRecord {
        ApiKeyRecord {
            id: id.into(),
            tenant_id: "ten_1".into(),
            environment: crate::store::Environment::Test,
            name: Some("k".into()),
            prefix: "qs_test_abcd".into(),
            key_hash: [0; 32],
            scopes: vec!["*".into()],
            created_at: Timestamp::from_millis(0),
            revoked_at: None,
        }
    }

    // Found keys live for their TTL, misses for theirs; a flood of misses evicts only
    // misses, and both caches stay at their bound.
    #[test]
    fn found_and_missing_are_bounded_apart() {
        let mut limits = KeyCacheLimits::default();
        (limits.found_len, limits.missing_len) = (4, 8);
        let cache = KeyCache::new(limits);
        let t0 = Timestamp::from_millis(1_000_000);
        cache.put([1; 32], Some(record("key_1")), t0);
        for index in 0..1000u32 {
            let mut hash = [0; 32];
            hash[..4].copy_from_slice(&index.to_be_bytes());
            hash[31] = 9;
            cache.put(hash, None, t0);
        }
        assert_eq!(cache.len(), (1, 8));
        assert!(matches!(cache.get(&[1; 32], t0), Some(Cached::Found(_))));
        let later = t0.checked_add(Span::from_millis(1_500)).expect("instant");
        let mut last = [0; 32];
        last[..4].copy_from_slice(&999u32.to_be_bytes());
        last[31] = 9;
        assert!(cache.get(&last, later).is_none(), "a miss lives one second");
        assert!(matches!(cache.get(&[1; 32], later), Some(Cached::Found(_))));
        let stale = t0.checked_add(Span::from_millis(5_000)).expect("instant");
        assert!(
            cache.get(&[1; 32], stale).is_none(),
            "a found key lives five"
        );
    }

    // An address past its budget of failures is refused; another address is not; IPv6
    // counts by /64.
    #[test]
    fn failures_are_limited_per_address() {
        let limits = KeyCacheLimits {
            failures_per_second: 1,
            failures_burst: 3,
            ..KeyCacheLimits::default()
        };
        let failed = FailedAuth::new(&limits);
        let now = Timestamp::from_millis(1_000_000);
        let attacker: IpAddr = "2001:db8::1".parse().expect("ip");
        let neighbour: IpAddr = "2001:db8::ffff".parse().expect("ip");
        let other: IpAddr = "192.0.2.7".parse().expect("ip");
        for _ in 0..3 {
            assert_eq!(failed.refused(attacker, now), None);
            failed.failed(attacker, now);
        }
        failed.failed(attacker, now);
        assert!(failed.refused(attacker, now).is_some());
        assert!(failed.refused(neighbour, now).is_some(), "same /64");
        assert_eq!(failed.refused(other, now), None);
        let later = now.checked_add(Span::from_millis(10_000)).expect("instant");
        assert_eq!(failed.refused(attacker, later), None, "the budget refills");
    }
}
