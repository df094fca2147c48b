//! Group commit for a hot end user (DESIGN P5).
//!
//! Mutations of one end user are serialised (by SQLite's writer, by the end user's row lock
//! on PostgreSQL), so a naive server commits them one transaction — one fsync — at a time,
//! however many arrive together. Here each mutation is queued under its end user instead.
//! The first one in finds no queue and starts a *drainer* task; the drainer takes what is
//! queued (up to `database.group_commit_max` operations), runs them in order on one loaded
//! state, commits them in one transaction, answers each caller, and goes round again
//! while anything is queued. Under load the queue fills while a transaction runs, so one
//! commit carries many operations; alone, an operation is a group of one.
//!
//! Each operation sees the state its predecessors in the group left, exactly as if they
//! had committed one by one. A refused operation is undone (the state goes back to what it
//! was before it) and answered with its refusal; the others still commit. If the
//! transaction fails, every operation of the group gets the failure and nothing of any of
//! them is written.
//!
//! The drainer runs as its own task, so a caller that goes away (a client hanging up)
//! cannot cancel a transaction that carries other callers' operations: an operation once
//! queued runs to its end, with its idempotency answer in the same transaction.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Mutex, MutexGuard, PoisonError};

use ledger::{Cx, EndUserId, EndUserState};

use crate::error::ApiError;
use crate::service::CatalogView;
use crate::store::{Changes, Env};

/// One queued operation, with the way back to its caller.
pub(crate) trait Member: Send {
    /// Runs the operation on `state`. An error is its refusal: the caller of `run` puts
    /// the state back as it was.
    fn run(
        &mut self,
        state: &mut EndUserState,
        cx: &mut Cx<'_>,
        view: &CatalogView,
    ) -> Result<Changes, ApiError>;

    /// Answers the caller once the group's transaction ended: with the operation's value
    /// (or refusal) when it committed, with `outcome`'s error when it did not.
    fn finish(self: Box<Self>, outcome: Result<(), ApiError>);
}

type Key = (Env, EndUserId);

/// The queues of end users that have a drainer running. A key is present exactly while
/// its drainer runs: [`Groups::push`] starts one when it inserts the key, and
/// [`Groups::take`] removes the key when it finds nothing left, both under one lock, so an
/// operation is never queued without a drainer to take it.
#[derive(Default)]
pub(crate) struct Groups {
    queues: Mutex<HashMap<Key, Vec<Box<dyn Member>>>>,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups")
            .field("end_users", &self.lock().len())
            .finish()
    }
}

impl Groups {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Vec<Box<dyn Member>>>> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `member` under its end user; true when the caller must start the drainer.
    pub(crate) fn push(&self, env: &Env, end_user: &EndUserId, member: Box<dyn Member>) -> bool {
        match self.lock().entry((env.clone(), end_user.clone())) {
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

    /// Up to `max` queued operations, oldest first; `None` (and the drainer ends) when
    /// there are none.
    pub(crate) fn take(
        &self,
        env: &Env,
        end_user: &EndUserId,
        max: usize,
    ) -> Option<Vec<Box<dyn Member>>> {
        let mut queues = self.lock();
        let key = (env.clone(), end_user.clone());
        let queue = queues.get_mut(&key)?;
        if queue.is_empty() {
            queues.remove(&key);
            return None;
        }
        let count = max.max(1).min(queue.len());
        Some(queue.drain(..count).collect())
    }

    /// Forgets the end user's queue, failing what it holds: for a drainer that did not
    /// end normally (its task panicked), so the next operation starts a new one.
    pub(crate) fn abandon(&self, env: &Env, end_user: &EndUserId) {
        let members = self
            .lock()
            .remove(&(env.clone(), end_user.clone()))
            .unwrap_or_default();
        for member in members {
            member.finish(Err(ApiError::Internal(
                "the end user's group commit stopped unexpectedly; nothing was written".into(),
            )));
        }
    }

    /// How many operations wait in the end user's queue; `None` when no drainer runs
    /// for it (for tests).
    #[cfg(test)]
    pub(crate) fn queued(&self, env: &Env, end_user: &EndUserId) -> Option<usize> {
        self.lock()
            .get(&(env.clone(), end_user.clone()))
            .map(Vec::len)
    }
}

/// Runs a group's operations in order on `state`, undoing each refused one; returns the
/// committed operations' changes. One operation alone is not undone by hand: its refusal
/// is returned, and the store writes nothing.
///
/// # Errors
/// A lone operation's refusal, or a failure to compute when the state next has due work.
pub(crate) fn apply(
    members: &mut [Box<dyn Member>],
    state: &mut EndUserState,
    cx: &mut Cx<'_>,
    view: &CatalogView,
) -> Result<Vec<Changes>, ApiError> {
    if let [member] = members {
        let mut changes = member.run(state, cx, view)?;
        changes.next_due = state.next_due(&view.catalog)?;
        return Ok(vec![changes]);
    }
    let mut applied = Vec::with_capacity(members.len());
    for member in members.iter_mut() {
        let before = state.clone();
        match member.run(state, cx, view) {
            Ok(mut changes) => {
                changes.next_due = state.next_due(&view.catalog)?;
                applied.push(changes);
            }
            Err(_) => *state = before,
        }
    }
    Ok(applied)
}

/// Fails the end user's queue if its drainer is dropped before it ended normally.
pub(crate) struct DrainGuard<'a> {
    pub(crate) groups: &'a Groups,
    pub(crate) env: &'a Env,
    pub(crate) end_user: &'a EndUserId,
    pub(crate) finished: bool,
}

impl Drop for DrainGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.groups.abandon(self.env, self.end_user);
        }
    }
}
