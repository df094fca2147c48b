//! Backoff for end users whose due work fails: the scheduler (`jobs.rs`) counts their
//! failures here and waits longer between tries; the service keeps one [`DueFailures`]
//! so that counts outlive a pass.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use ledger::{EndUserId, Span};
use lru::LruCache;

use crate::store::Env;

/// The first retry after an end user's due work failed; it doubles with every further
/// failure, up to [`RETRY_MAX_SECS`].
pub const RETRY_FIRST_SECS: i64 = 30;
/// The longest wait between retries of a failing end user's due work.
pub const RETRY_MAX_SECS: i64 = 3_600;
/// How many failing end users the scheduler remembers (for their backoff); beyond it the
/// least recently failed start their backoff over.
const FAILURES_REMEMBERED: usize = 10_000;

/// Failures of end users' due work, for backoff. Kept in memory: a restart retries each
/// once at the first step again.
#[derive(Debug)]
pub struct DueFailures {
    failures: Mutex<LruCache<(Env, EndUserId), u32>>,
}

impl Default for DueFailures {
    fn default() -> DueFailures {
        DueFailures {
            failures: Mutex::new(LruCache::new(
                NonZeroUsize::new(FAILURES_REMEMBERED).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }
}

impl DueFailures {
    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<(Env, EndUserId), u32>> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one more failure; returns how long to wait before the next try.
    pub fn failed(&self, env: &Env, end_user: &EndUserId) -> Span {
        let mut failures = self.lock();
        let count = failures
            .get(&(env.clone(), end_user.clone()))
            .copied()
            .unwrap_or(0)
            .saturating_add(1);
        failures.put((env.clone(), end_user.clone()), count);
        Span::from_millis(retry_delay_secs(count).saturating_mul(1000))
    }

    pub fn succeeded(&self, env: &Env, end_user: &EndUserId) {
        self.lock().pop(&(env.clone(), end_user.clone()));
    }
}

/// The wait before retrying after `failures` failures in a row: 30 s, 1 min, 2 min, …,
/// at most an hour.
pub fn retry_delay_secs(failures: u32) -> i64 {
    let doublings = failures.saturating_sub(1).min(16);
    RETRY_FIRST_SECS
        .checked_mul(1_i64 << doublings)
        .unwrap_or(RETRY_MAX_SECS)
        .min(RETRY_MAX_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Retries of a failing end user back off from 30 s, doubling, to an hour.
    #[test]
    fn retry_delays_double_up_to_an_hour() {
        let delays: Vec<i64> = (1..=9).map(retry_delay_secs).collect();
        assert_eq!(delays, vec![30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(retry_delay_secs(u32::MAX), 3600);
    }
}
