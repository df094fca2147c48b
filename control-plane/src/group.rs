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
//! Groups of different end users share transactions too: a drainer hands its group to
//! its environment's queue and waits; that queue's own drainer takes the groups queued
//! (as many as carry up to `database.group_commit_max` operations together) and
//! commits them in one transaction (`LedgerStore::mutate_each`), each group committed
//! or failed on its own (SQLite: a savepoint each; PostgreSQL: see its store). One
//! commit (SQLite: one fsync; PostgreSQL: one turn at the environment's feed head,
//! which serialises its commits) then serves many end users, where it used to serve
//! one. An end user's next group waits until its last one is answered, so each end
//! user's operations still commit in order.
//!
//! The drainer runs as its own task, so a caller that goes away (a client hanging up)
//! cannot cancel a transaction that carries other callers' operations: an operation once
//! queued runs to its end, with its idempotency answer in the same transaction.

use ledger::{Cx, EndUserId, EndUserState};

use crate::catalog::CatalogView;
use crate::error::ApiError;
use crate::queues::Queues;
use crate::store::{Changes, Claim, Env};

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

    /// The idempotency key the operation claims in the group's transaction, if any.
    fn claim(&self) -> Option<&Claim>;

    /// Marks the operation as not run: its claim found the key taken.
    fn skip(&mut self);

    /// What a claiming operation's refusal writes: its answer when the refusal is a
    /// stored decision, else the claim given back. `None` without a claim.
    ///
    /// # Errors
    /// A refusal that does not serialise.
    fn refusal(&self, error: &ApiError) -> Result<Option<Changes>, ApiError>;

    /// Answers the caller once the group's transaction ended: with the operation's value
    /// (or refusal) when it committed, with `outcome`'s error when it did not.
    fn finish(self: Box<Self>, outcome: Result<(), ApiError>);
}

/// Operations queued by end user.
pub(crate) type Groups = Queues<(Env, EndUserId), Box<dyn Member>>;

/// One end user's group waiting for a transaction it shares with other end users'
/// groups of its environment. `done` is told once its members are answered, so the
/// end user's next group follows this one.
pub(crate) struct Pending {
    pub(crate) end_user: EndUserId,
    pub(crate) members: Vec<Box<dyn Member>>,
    pub(crate) done: tokio::sync::oneshot::Sender<()>,
}

/// Groups waiting for a shared transaction, by environment.
pub(crate) type Batches = Queues<Env, Pending>;

/// Answers the members of a group its environment's drainer abandoned.
pub(crate) fn fail_pending(pending: Pending) {
    for member in pending.members {
        fail_member(member);
    }
}

/// Answers an operation its drainer abandoned.
pub(crate) fn fail_member(member: Box<dyn Member>) {
    member.finish(Err(ApiError::Internal(
        "the end user's group commit stopped unexpectedly; nothing was written".into(),
    )));
}

/// Runs a group's runnable operations (`runnable`: one flag per member; the others'
/// claims found their keys taken) in order on `state`, undoing each refused one; returns
/// the changes to commit: each committed operation's, and what a claiming operation's
/// refusal writes. One unclaimed operation alone is not undone by hand: its refusal is
/// returned, and the store writes nothing.
///
/// # Errors
/// A lone operation's refusal, or a failure to compute when the state next has due work.
pub(crate) fn apply(
    members: &mut [Box<dyn Member>],
    runnable: &[bool],
    state: &mut EndUserState,
    cx: &mut Cx<'_>,
    view: &CatalogView,
) -> Result<Vec<Changes>, ApiError> {
    // Only a group of one unclaimed operation may fail as a whole with its refusal: in a
    // larger group that failure would be every member's answer.
    if let [member] = members
        && member.claim().is_none()
    {
        let mut changes = member.run(state, cx, view)?;
        changes.next_due = state.next_due(&view.catalog)?;
        return Ok(vec![changes]);
    }
    for (member, _) in members
        .iter_mut()
        .zip(runnable)
        .filter(|(_, runnable)| !**runnable)
    {
        member.skip();
    }
    let mut applied = Vec::with_capacity(members.len());
    let running = members
        .iter_mut()
        .zip(runnable)
        .filter(|(_, runnable)| **runnable)
        .map(|(member, _)| member);
    for member in running {
        let before = state.clone();
        match member.run(state, cx, view) {
            Ok(mut changes) => {
                changes.next_due = state.next_due(&view.catalog)?;
                applied.push(changes);
            }
            Err(error) => {
                *state = before;
                if let Some(mut changes) = member.refusal(&error)? {
                    changes.next_due = state.next_due(&view.catalog)?;
                    applied.push(changes);
                }
            }
        }
    }
    Ok(applied)
}
