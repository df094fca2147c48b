//! Queues of waiting work by key, each drained by one task while it has any: the shape
//! both group commit (`group.rs`, operations by end user) and the stores' idempotency
//! leases (by environment) use. A leaf: it knows nothing of what it queues.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Queues of waiting work by key, each with a drainer task while it has any. A key is
/// present exactly while its drainer runs: [`Queues::push`] says to start one when it
/// inserts the key, and [`Queues::take`] removes the key when it finds nothing left, both
/// under one lock, so nothing is ever queued without a drainer to take it. Group commit
/// queues operations by end user; both stores queue idempotency leases.
pub(crate) struct Queues<K, M> {
    queues: Mutex<HashMap<K, Vec<M>>>,
}

impl<K, M> Default for Queues<K, M> {
    fn default() -> Self {
        Queues {
            queues: Mutex::new(HashMap::new()),
        }
    }
}

impl<K, M> std::fmt::Debug for Queues<K, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let active = self
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("Queues").field("active", &active).finish()
    }
}

impl<K: Eq + std::hash::Hash + Clone, M> Queues<K, M> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Vec<M>>> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `member` under `key`; true when the caller must start the drainer.
    pub(crate) fn push(&self, key: &K, member: M) -> bool {
        match self.lock().entry(key.clone()) {
            Entry::Occupied(mut queue) => {
                queue.get_mut().push(member);
                false
            }
            Entry::Vacant(slot) => {
                slot.insert(vec![member]);
                true
            }
        }
    }

    /// Up to `max` queued members, oldest first; `None` (and the drainer ends) when there
    /// are none.
    pub(crate) fn take(&self, key: &K, max: usize) -> Option<Vec<M>> {
        self.take_weighed(key, max, |_| 1)
    }

    /// Queued members, oldest first, while their `weight`s add up to at most `max` (at
    /// least one, whatever it weighs); `None` (and the drainer ends) when there are none.
    pub(crate) fn take_weighed(
        &self,
        key: &K,
        max: usize,
        weight: impl Fn(&M) -> usize,
    ) -> Option<Vec<M>> {
        let mut queues = self.lock();
        let queue = queues.get_mut(key)?;
        if queue.is_empty() {
            queues.remove(key);
            return None;
        }
        let mut total = 0_usize;
        let count = queue
            .iter()
            .take_while(|member| {
                total = total.saturating_add(weight(member));
                total <= max
            })
            .count()
            .max(1);
        Some(queue.drain(..count).collect())
    }

    /// Forgets `key`'s queue and returns what it held: for a drainer that did not end
    /// normally (its task panicked), so the next push starts a new one.
    pub(crate) fn abandon(&self, key: &K) -> Vec<M> {
        self.lock().remove(key).unwrap_or_default()
    }

    /// How many members wait under `key`; `None` when no drainer runs for it.
    pub(crate) fn queued(&self, key: &K) -> Option<usize> {
        self.lock().get(key).map(Vec::len)
    }
}

/// Fails what a drainer leaves queued if it is dropped before it ended normally: a task
/// that panicked, or one dropped before it first ran (a runtime shutting down). Made
/// before the drainer is spawned and moved into it, so no queue is ever left behind
/// without a drainer.
pub(crate) struct DrainGuard<K: Eq + std::hash::Hash + Clone, M> {
    pub(crate) queues: std::sync::Arc<Queues<K, M>>,
    pub(crate) key: K,
    /// Answers one abandoned member.
    pub(crate) fail: fn(M),
    pub(crate) finished: bool,
}

impl<K: Eq + std::hash::Hash + Clone, M> Drop for DrainGuard<K, M> {
    fn drop(&mut self) {
        if !self.finished {
            for member in self.queues.abandon(&self.key) {
                (self.fail)(member);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Queues;

    // A drainer takes members while their weights fit the bound, and a member heavier
    // than the bound alone.
    #[test]
    fn members_are_taken_while_their_weights_fit() {
        let queues: Queues<&str, usize> = Queues::default();
        assert!(queues.push(&"k", 3));
        for weight in [4, 2, 70, 1] {
            assert!(!queues.push(&"k", weight));
        }
        let take = || queues.take_weighed(&"k", 8, |weight| *weight);
        assert_eq!(take(), Some(vec![3, 4]));
        assert_eq!(take(), Some(vec![2]), "70 would not fit beside it");
        assert_eq!(take(), Some(vec![70]), "alone, however heavy");
        assert_eq!(take(), Some(vec![1]));
        assert_eq!(take(), None, "and the drainer ends");
        assert_eq!(queues.queued(&"k"), None);
    }
}
