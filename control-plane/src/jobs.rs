//! The scheduler: one owned task that, every `jobs.interval_ms`, runs the due work
//! (`ledger` advance) of every end user whose next due instant has passed by their
//! environment's clock, and purges expired idempotency records.

use tokio::sync::watch;

use crate::error::ApiError;
use crate::service::AppState;
use crate::store::{Annotations, Changes, Env};

/// Runs until `stop` turns true.
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(state.config().jobs_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
        if let Err(error) = tick(&state).await {
            tracing::warn!(%error, "scheduler pass failed; retrying next tick");
        }
    }
    tracing::info!("scheduler stopped");
}

/// One pass over every environment.
///
/// # Errors
/// Store failures.
pub async fn tick(state: &AppState) -> Result<(), ApiError> {
    for (env, _) in state.store().environments().await? {
        run_due(state, &env).await?;
        crate::webhooks::deliver_due(state, &env).await?;
    }
    let now = state.real_now();
    state.store().purge_expired(now).await?;
    let feed_retention = ledger::Span::from_millis(
        i64::try_from(state.config().feed_retention.as_millis()).unwrap_or(i64::MAX),
    );
    if let Ok(before) = now.checked_sub(feed_retention) {
        state.store().purge_changes(before).await?;
    }
    Ok(())
}

/// Advances every end user of `env` with work due by the environment's clock, in
/// batches, until none is left. Returns how many were advanced.
///
/// # Errors
/// Store failures (one end user's refusal is logged and skipped).
pub async fn run_due(state: &AppState, env: &Env) -> Result<usize, ApiError> {
    let mut advanced = 0usize;
    loop {
        let view = state.view(env).await?;
        let now = state.env_now(&view);
        let due = state
            .store()
            .due_end_users(env, now, state.config().jobs_batch_len_max)
            .await?;
        // How far behind the scheduler runs: the oldest due work still waiting.
        let lag_millis = due
            .first()
            .and_then(|(_, oldest)| now.since(*oldest).ok())
            .map_or(0, |span| span.as_millis());
        metrics::gauge!("quotastack_jobs_lag_seconds", "environment" => env.environment.as_str())
            .set(
                std::time::Duration::from_millis(u64::try_from(lag_millis).unwrap_or(0))
                    .as_secs_f64(),
            );
        if due.is_empty() {
            return Ok(advanced);
        }
        let batch_len = due.len();
        for (end_user, _) in due {
            let result = state
                .mutate(
                    env,
                    &end_user,
                    None,
                    Annotations::default(),
                    200,
                    |user, cx, _| {
                        let (_, changes) = Changes::from_applied(user.advance(cx)?);
                        Ok(((), changes))
                    },
                )
                .await;
            match result {
                Ok(()) => advanced = advanced.saturating_add(1),
                Err(error) => {
                    tracing::error!(tenant = %env.tenant_id, environment = %env.environment, end_user = %end_user, %error, "due work failed");
                    return Err(error);
                }
            }
        }
        metrics::counter!("quotastack_jobs_advanced_total")
            .increment(u64::try_from(batch_len).unwrap_or(u64::MAX));
    }
}
