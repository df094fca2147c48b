//! What the stores' own tests share.

use ledger::{Catalog, Credits, Cx, EndUserId, EndUserState, GrantRequest, Timestamp};

use crate::store::{
    Changes, Claim, ClaimingFn, Env, IdempotencyAnswer, IdempotencyBegin, Lease, Mutation, Store,
    StoreError, StoreResult,
};

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
        .mutate(mutation(env, end_user, &[], at), &mut run)
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

/// A mutation of `end_user` at `at`, claiming `claims`.
fn mutation<'a>(
    env: &'a Env,
    end_user: &'a EndUserId,
    claims: &'a [Claim],
    at: Timestamp,
) -> Mutation<'a> {
    Mutation {
        env,
        end_user,
        now: at,
        claims,
    }
}

/// The end users the environment's change feed names, from its start (up to 100).
async fn fed_end_users(store: &dyn Store, env: &Env) -> Vec<Option<EndUserId>> {
    store
        .changes_after(env, 0, 100)
        .await
        .expect("feed")
        .into_iter()
        .map(|change| change.end_user_id)
        .collect()
}

/// Three end users' mutations in one `Store::mutate_each`, each claiming a key: the
/// middle one changes its state and claims its key, then refuses. The store answers
/// each on its own: the refused one leaves nothing (no state, no claim, no feed
/// record), and the others commit around it, whether the store shares one transaction
/// among them (SQLite, a savepoint each) or not.
#[allow(clippy::too_many_lines)] // a scenario reads top to bottom as one story
pub(crate) async fn each_mutation_commits_or_fails_alone(
    store: &dyn Store,
    env: &Env,
    at: Timestamp,
) {
    let id = |name: &str| EndUserId::new(name).expect("end user id");
    let users = [id("first"), id("refused"), id("last")];
    let claim = |key: &str| Claim {
        key: key.into(),
        fingerprint: [1; 32],
        now: at,
        keep_until: at
            .checked_add(ledger::Span::from_millis(3_600_000))
            .expect("an hour later"),
    };
    let claims = [
        vec![claim("k_first")],
        vec![claim("k_refused")],
        vec![claim("k_last")],
    ];
    let flags = std::sync::Mutex::new(Vec::new());
    let note = |claimed: &[bool]| {
        flags.lock().expect("flags").push(claimed.to_vec());
    };
    let answer = |key: &str| IdempotencyAnswer {
        key: key.into(),
        status: 201,
        body: b"{}".to_vec(),
    };
    // Answered, so that a later answer to the same key finds it taken.
    let mut first = |state: &mut EndUserState, claimed: &[bool]| {
        note(claimed);
        let mut changes = grant_to(state, 5, at)?;
        if let Some(last) = changes.last_mut() {
            last.idempotency = Some(answer("k_first"));
        }
        Ok(changes)
    };
    let mut refused = |state: &mut EndUserState, claimed: &[bool]| {
        note(claimed);
        grant_to(state, 1, at)?;
        Err(StoreError::Declined)
    };
    let mut last = |state: &mut EndUserState, claimed: &[bool]| {
        note(claimed);
        grant_to(state, 7, at)
    };
    let mut each: Vec<(Mutation<'_>, &mut ClaimingFn<'_>)> = vec![
        (mutation(env, &users[0], &claims[0], at), &mut first),
        (mutation(env, &users[1], &claims[1], at), &mut refused),
        (mutation(env, &users[2], &claims[2], at), &mut last),
    ];
    let outcomes = store.mutate_each(&mut each).await.expect("the transaction");
    drop(each);
    assert!(
        matches!(
            outcomes.as_slice(),
            [Ok(()), Err(StoreError::Declined), Ok(())]
        ),
        "{outcomes:?}"
    );
    assert_eq!(
        *flags.lock().expect("flags"),
        [[true], [true], [true]],
        "each claimed its key"
    );
    let balance = |state: &EndUserState| state.available(None, at).expect("available");
    assert_eq!(
        balance(&stored(store, env, &users[0]).await),
        Credits::new(5)
    );
    assert_eq!(
        balance(&stored(store, env, &users[2]).await),
        Credits::new(7)
    );
    assert!(
        store
            .load_state(env, &users[1])
            .await
            .expect("load")
            .is_none(),
        "the refused end user's state was rolled back"
    );
    let fed = fed_end_users(store, env).await;
    assert_eq!(fed, [Some(users[0].clone()), Some(users[2].clone())]);

    // The refused one's claim went with it; the committed ones' hold.
    flags.lock().expect("flags").clear();
    let mut unchanged = |_: &mut EndUserState, claimed: &[bool]| {
        note(claimed);
        Ok(Vec::new())
    };
    let again = [vec![claim("k_first")], vec![claim("k_refused")]];
    let mut other = |_: &mut EndUserState, claimed: &[bool]| {
        note(claimed);
        Ok(Vec::new())
    };
    let mut each: Vec<(Mutation<'_>, &mut ClaimingFn<'_>)> = vec![
        (mutation(env, &users[0], &again[0], at), &mut unchanged),
        (mutation(env, &users[1], &again[1], at), &mut other),
    ];
    let outcomes = store.mutate_each(&mut each).await.expect("the transaction");
    drop(each);
    assert!(
        matches!(outcomes.as_slice(), [Ok(()), Ok(())]),
        "{outcomes:?}"
    );
    assert_eq!(*flags.lock().expect("flags"), [[false], [true]]);

    // A group that fails after its rows were staged (SQLite: written): its answer
    // finds its key answered already. It leaves nothing; the one after it commits.
    let (late, after) = (id("late"), id("after"));
    let mut answered_twice = |state: &mut EndUserState, _: &[bool]| {
        let mut changes = grant_to(state, 3, at)?;
        if let Some(last) = changes.last_mut() {
            last.idempotency = Some(answer("k_first"));
        }
        Ok(changes)
    };
    let mut grant_after = |state: &mut EndUserState, _: &[bool]| grant_to(state, 4, at);
    let mut each: Vec<(Mutation<'_>, &mut ClaimingFn<'_>)> = vec![
        (mutation(env, &late, &[], at), &mut answered_twice),
        (mutation(env, &after, &[], at), &mut grant_after),
    ];
    let outcomes = store.mutate_each(&mut each).await.expect("the transaction");
    drop(each);
    assert!(
        matches!(outcomes.as_slice(), [Err(error), Ok(())] if error.is_transient()),
        "{outcomes:?}"
    );
    assert!(
        store.load_state(env, &late).await.expect("load").is_none(),
        "the late end user's rows were rolled back"
    );
    assert_eq!(balance(&stored(store, env, &after).await), Credits::new(4));
    let fed = fed_end_users(store, env).await;
    assert_eq!(
        fed,
        [
            Some(users[0].clone()),
            Some(users[2].clone()),
            Some(after.clone())
        ]
    );
}
