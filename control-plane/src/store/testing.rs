//! What the stores' own tests share.

use ledger::{Catalog, Credits, Cx, EndUserId, EndUserState, GrantRequest, Timestamp};

use crate::store::Mutation;
use crate::store::{Changes, Env, IdempotencyBegin, Lease, Store, StoreError, StoreResult};

/// A queued idempotency lease of `key` at `now` (30 s, kept until `now`), whose answer
/// nobody waits for.
pub(crate) fn lease(env: &Env, key: &str, fingerprint: u8, now: Timestamp) -> Lease {
    Lease {
        env: env.clone(),
        key: key.into(),
        fingerprint: [fingerprint; 32],
        now,
        lease_ms: 30_000,
        keep_until: now,
        reply: tokio::sync::oneshot::channel().0,
    }
}

/// The end user's stored state (the test fails when there is none).
pub(crate) async fn stored(store: &dyn Store, env: &Env, end_user: &EndUserId) -> EndUserState {
    store
        .load_state(env, end_user)
        .await
        .expect("load")
        .expect("stored")
}

/// Each answer's kind, for comparing a batch of lease answers at a glance.
pub(crate) fn kinds(answers: &[IdempotencyBegin]) -> Vec<&'static str> {
    answers
        .iter()
        .map(|answer| match answer {
            IdempotencyBegin::Started => "started",
            IdempotencyBegin::InFlight => "in flight",
            IdempotencyBegin::Mismatch => "mismatch",
            IdempotencyBegin::Replay { .. } => "replay",
        })
        .collect()
}

/// Grants `amount` to `state` at `at`, returning what to write.
pub(crate) fn grant_to(
    state: &mut EndUserState,
    amount: i64,
    at: Timestamp,
) -> StoreResult<Vec<Changes>> {
    let catalog = Catalog::default();
    let mut ids = crate::clock::UlidSource::at(at);
    let mut cx = Cx {
        now: at,
        catalog: &catalog,
        ids: &mut ids,
    };
    let applied = state
        .grant(&mut cx, GrantRequest::new(Credits::new(amount)))
        .map_err(|_| StoreError::Declined)?;
    Ok(vec![Changes::from_applied(applied).1])
}

/// Grants `amount` to `end_user` at `at` through `Store::mutate`: a state change, an
/// entry, a block and an event.
pub(crate) async fn grant(
    store: &dyn Store,
    env: &Env,
    end_user: &EndUserId,
    amount: i64,
    at: Timestamp,
) {
    let mut run = |state: &mut EndUserState, _: &[bool]| grant_to(state, amount, at);
    store
        .mutate(
            Mutation {
                env,
                end_user,
                now: at,
                claims: &[],
            },
            &mut run,
        )
        .await
        .expect("grant");
}

/// Grants `amount` to each of `end_users` at `at` in one `Store::mutate_many`.
pub(crate) async fn grant_many(
    store: &dyn Store,
    env: &Env,
    end_users: &[&str],
    amount: i64,
    at: Timestamp,
) {
    let mut runs: Vec<_> = end_users
        .iter()
        .map(|_| |state: &mut EndUserState| grant_to(state, amount, at))
        .collect();
    let mut items: Vec<(EndUserId, &mut super::MutateFn<'_>)> = end_users
        .iter()
        .zip(runs.iter_mut())
        .map(|(end_user, run)| {
            (
                EndUserId::new(end_user).expect("end user id"),
                run as &mut super::MutateFn<'_>,
            )
        })
        .collect();
    store
        .mutate_many(env, at, &mut items)
        .await
        .expect("grants");
}
