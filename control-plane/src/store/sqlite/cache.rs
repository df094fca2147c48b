//! End users' states this process wrote, kept for the next usage batch's pre-read
//! (`mutate_many`): reading and parsing a batch's 500 states was a seventh of the
//! control plane's CPU under P4 (docs/BENCHMARKS.md).
//!
//! A state is kept with its chain's head and the change-feed position of the
//! transaction that wrote it. It is never trusted on its own: the writer checks, under
//! the lock, that the feed names no change of its end user after that position (as it
//! does for states read from the database, after the read's position), and reruns the
//! operation on a fresh read otherwise. So a state written by another process, by
//! another path of this one, or after an eviction is never missed; at worst a stale
//! entry costs a rerun.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};

use ledger::EndUserState;
use lru::LruCache;

use super::super::Env;

/// The most blocks, reservations and subscriptions together of a state kept: a larger
/// one (tens of KiB and up) is read from the database each time.
const KEPT_PARTS: usize = 64;

/// A state as one transaction committed it.
#[derive(Debug, Clone)]
pub(super) struct Cached {
    pub(super) state: Arc<EndUserState>,
    /// The end user's newest entry after that transaction.
    pub(super) head: Option<i64>,
    /// The change-feed position of that transaction's row.
    pub(super) at: i64,
}

/// The most recently written states, up to a fixed number of end users.
#[derive(Debug)]
pub(super) struct States {
    kept: Mutex<LruCache<String, Cached>>,
}

/// The cache's key: the environment and the end user, NUL-separated (none of them
/// holds a NUL).
fn key(env: &Env, end_user: &str) -> String {
    format!(
        "{}\0{}\0{end_user}",
        env.tenant_id,
        env.environment.as_str()
    )
}

/// Whether `state` is too large to keep.
fn large(state: &EndUserState) -> bool {
    state
        .blocks()
        .len()
        .saturating_add(state.reservations().len())
        .saturating_add(state.subscriptions().len())
        > KEPT_PARTS
}

impl States {
    pub(super) fn new(capacity: NonZeroUsize) -> States {
        States {
            kept: Mutex::new(LruCache::new(capacity)),
        }
    }

    /// The kept states of `ids`, in their order (`None` where none is kept).
    pub(super) fn get_many(&self, env: &Env, ids: &[&str]) -> Vec<Option<Cached>> {
        let keys: Vec<String> = ids.iter().map(|id| key(env, id)).collect();
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        keys.iter().map(|key| kept.get(key).cloned()).collect()
    }

    /// Forgets the kept states of `ids` kept at feed position `at` or before (a state
    /// kept later comes from a transaction this caller did not see, and stays).
    pub(super) fn forget_many(&self, env: &Env, ids: &[&str], at: i64) {
        let keys: Vec<String> = ids.iter().map(|id| key(env, id)).collect();
        let mut dropped = Vec::new();
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        for key in &keys {
            if kept.peek(key).is_some_and(|cached| cached.at <= at) {
                dropped.extend(kept.pop(key));
            }
        }
        drop(kept);
        drop(dropped);
    }

    /// Keeps states one transaction committed at feed position `at`, with their chains'
    /// heads after it, unless a state written later is kept already (transactions may
    /// call this in any order once committed, never before). A large state (see
    /// `KEPT_PARTS`) is forgotten instead.
    pub(super) fn put_many(
        &self,
        env: &Env,
        at: i64,
        written: impl IntoIterator<Item = (EndUserState, Option<i64>)>,
    ) {
        let entries: Vec<(String, Cached)> = written
            .into_iter()
            .map(|(state, head)| {
                let key = key(env, state.end_user_id().as_str());
                let cached = Cached {
                    state: Arc::new(state),
                    head,
                    at,
                };
                (key, cached)
            })
            .collect();
        // What is replaced or evicted is dropped after the lock is released.
        let mut dropped = Vec::with_capacity(entries.len());
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        for (key, cached) in entries {
            if kept.peek(&key).is_some_and(|newer| newer.at > at) {
                dropped.push(cached);
            } else if large(&cached.state) {
                dropped.extend(kept.pop(&key));
                dropped.push(cached);
            } else if let Some((_, old)) = kept.push(key, cached) {
                dropped.push(old);
            }
        }
        drop(kept);
        drop(dropped);
    }
}
