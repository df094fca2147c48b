//! Idempotency leases taken together: requests that arrive at once queue their keys
//! (`queues.rs`), and one drainer takes them in one transaction. Both backends use it.

use ledger::Timestamp;

use super::records::IdempotencyBegin;
use super::{Env, StoreError, StoreResult};

/// What an idempotency lease asks for: the key, the request's fingerprint, when, how
/// long the lease holds, and how long the key is kept.
#[derive(Debug, Clone, Copy)]
pub struct LeaseAsk<'a> {
    pub env: &'a Env,
    pub key: &'a str,
    pub fingerprint: &'a [u8; 32],
    pub now: Timestamp,
    pub lease_ms: i64,
    pub keep_until: Timestamp,
}

impl<'a> LeaseAsk<'a> {
    /// An ask with its parts in the order the struct names them.
    #[must_use]
    pub fn new(
        env: &'a Env,
        key: &'a str,
        fingerprint: &'a [u8; 32],
        now: Timestamp,
        lease_ms: i64,
        keep_until: Timestamp,
    ) -> LeaseAsk<'a> {
        LeaseAsk {
            env,
            key,
            fingerprint,
            now,
            lease_ms,
            keep_until,
        }
    }
}

/// Queues a lease on `queues` under `key`, starting a drainer with `start` when the
/// queue was idle, and waits for its answer. Both stores take the leases that arrive
/// together in one transaction this way.
///
/// # Errors
/// The batch's failure, or a drainer that ended without answering.
pub(crate) async fn queue_lease<K: Eq + std::hash::Hash + Clone>(
    queues: &std::sync::Arc<crate::queues::Queues<K, Lease>>,
    key: K,
    ask: LeaseAsk<'_>,
    start: impl FnOnce(crate::queues::DrainGuard<K, Lease>),
) -> StoreResult<IdempotencyBegin> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let lease = Lease {
        env: ask.env.clone(),
        key: ask.key.to_owned(),
        fingerprint: *ask.fingerprint,
        now: ask.now,
        lease_ms: ask.lease_ms,
        keep_until: ask.keep_until,
        reply,
    };
    if queues.push(&key, lease) {
        start(crate::queues::DrainGuard {
            queues: std::sync::Arc::clone(queues),
            key,
            fail: fail_lease,
            finished: false,
        });
    }
    answer.await.map_err(|_| {
        StoreError::Transient("the idempotency lease task ended without an answer".into())
    })?
}

/// One idempotency key to take, waiting for its batch (both stores take the leases that
/// arrive together in one transaction).
#[derive(Debug)]
pub(crate) struct Lease {
    pub env: Env,
    pub key: String,
    pub fingerprint: [u8; 32],
    pub now: Timestamp,
    pub lease_ms: i64,
    pub keep_until: Timestamp,
    pub(crate) reply: tokio::sync::oneshot::Sender<StoreResult<IdempotencyBegin>>,
}

/// How many leases one transaction takes at most.
pub(crate) const LEASES_PER_TRANSACTION: usize = 256;

/// Answers a lease its drainer abandoned.
pub(crate) fn fail_lease(lease: Lease) {
    let _ = lease.reply.send(Err(StoreError::Transient(
        "the idempotency lease task stopped unexpectedly".into(),
    )));
}

/// Sends each lease of a batch its answer, or the batch's failure.
pub(crate) fn answer_leases(batch: Vec<Lease>, outcome: StoreResult<Vec<IdempotencyBegin>>) {
    match outcome {
        Ok(answers) => {
            for (lease, answer) in batch.into_iter().zip(answers) {
                let _ = lease.reply.send(Ok(answer));
            }
        }
        Err(error) => {
            let transient = error.is_transient();
            let message = match error {
                StoreError::Transient(message) | StoreError::Fatal(message) => message,
                other => other.to_string(),
            };
            for lease in batch {
                let _ = lease
                    .reply
                    .send(Err(StoreError::database(message.clone(), transient)));
            }
        }
    }
}

/// The error for an operation whose idempotency key another request answered (or took
/// over, its lease having expired) while it waited: retryable, and nothing of the
/// transaction is written.
pub fn answered_elsewhere(key: &str) -> StoreError {
    StoreError::Transient(format!(
        "idempotency key `{key}` (or another of this transaction's) was answered by another request, or taken over by one, while this one waited; nothing was written, and a retry replays that request's answer or waits for it"
    ))
}
