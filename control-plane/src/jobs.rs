//! The scheduler: one owned task that, every `jobs.interval_ms`, runs the due work
//! (`ledger` advance) of every end user whose next due instant has passed by their
//! environment's clock, and purges expired idempotency records and old feed entries.
//! Webhook delivery runs beside it, in its own worker (`webhooks::Worker`).
//!
//! No tenant can hold the scheduler for another:
//! - an end user whose due work fails is logged, counted, given a retry time with
//!   backoff and skipped; a failing environment is logged and the pass goes on;
//! - one environment gets at most `jobs.environment_budget_ms` of a pass; the rest of its
//!   due work waits for the next pass;
//! - an end user far behind is caught up in chunks of [`CHUNK_STEPS_MAX`] pieces of due
//!   work, one transaction each, so the writer is released between them.

use std::time::Duration;

use ledger::{EndUserId, Timestamp};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::ApiError;
use crate::service::AppState;
use crate::service::Change;
use crate::store::{Changes, Env};

/// Pieces of due work (windows, expiries, renewals) one scheduler transaction runs for one
/// end user; an end user further behind is caught up over several transactions.
pub const CHUNK_STEPS_MAX: usize = 1_000;

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

/// One pass over every environment: due work (each environment within its budget), then
/// the purges. A failure in one environment is logged and the pass goes on.
///
/// # Errors
/// Only when the environments cannot be listed.
pub async fn tick(state: &AppState) -> Result<(), ApiError> {
    let budget = state.config().jobs_environment_budget;
    for (env, _) in state.store().environments().await? {
        if let Err(error) = run_due(state, &env, Instant::now() + budget).await {
            metrics::counter!("quotastack_jobs_environment_failures_total").increment(1);
            tracing::error!(tenant = %env.tenant_id, environment = %env.environment, %error, "due work of an environment failed; it is retried next pass");
        }
    }
    state.housekeep_auth();
    let now = state.real_now();
    if let Err(error) = state.store().purge_expired(now).await {
        tracing::error!(%error, "purging expired idempotency keys failed");
    }
    let feed_retention = ledger::Span::from_millis(
        i64::try_from(state.config().feed_retention.as_millis()).unwrap_or(i64::MAX),
    );
    if let Ok(before) = now.checked_sub(feed_retention)
        && let Err(error) = state.store().purge_changes(before).await
    {
        tracing::error!(%error, "purging old change feed entries failed");
    }
    Ok(())
}

/// What one [`run_due`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DueRun {
    /// Scheduler transactions that went through (an end user far behind takes several).
    pub advanced: usize,
    /// End users whose due work failed (each was given a retry time and skipped).
    pub failed: usize,
    /// Whether no due work was left when it returned (false: the deadline came first).
    pub finished: bool,
}

/// Advances the end users of `env` with work due by the environment's clock, a batch at a
/// time, until none is left or `deadline` passes. A failing end user is logged, counted,
/// given a retry time with backoff and skipped.
///
/// # Errors
/// Store failures that concern the whole environment (reading its catalog or its due
/// end users, or postponing a failing end user).
pub async fn run_due(state: &AppState, env: &Env, deadline: Instant) -> Result<DueRun, ApiError> {
    let mut run = DueRun::default();
    loop {
        let view = state.view(env).await?;
        let now = state.env_now(&view);
        let due = state
            .store()
            .due_end_users(env, now, state.config().jobs_batch_len_max)
            .await?;
        lag_metric(env, now, due.first().map(|(_, oldest)| *oldest));
        if due.is_empty() {
            run.finished = true;
            return Ok(run);
        }
        for (end_user, _) in due {
            if Instant::now() >= deadline {
                return Ok(run);
            }
            match advance_one(state, env, &end_user).await {
                Ok(()) => {
                    state.due_failures().succeeded(env, &end_user);
                    run.advanced = run.advanced.saturating_add(1);
                    metrics::counter!("quotastack_jobs_advanced_total").increment(1);
                }
                Err(error) => {
                    let wait = state.due_failures().failed(env, &end_user);
                    let retry_at = now.checked_add(wait).unwrap_or(now);
                    metrics::counter!("quotastack_jobs_failures_total", "environment" => env.environment.as_str()).increment(1);
                    tracing::error!(tenant = %env.tenant_id, environment = %env.environment, end_user = %end_user, %error, %retry_at, "due work failed; retrying later");
                    // Without the new due instant the next batch would pick this end
                    // user again at once: a failure here stops this environment's pass.
                    state.store().postpone_due(env, &end_user, retry_at).await?;
                    run.failed = run.failed.saturating_add(1);
                }
            }
        }
        if Instant::now() >= deadline {
            return Ok(run);
        }
    }
}

/// One scheduler transaction for one end user: at most [`CHUNK_STEPS_MAX`] pieces of due
/// work (the end user stays due when more is left, and the next batch goes on).
async fn advance_one(state: &AppState, env: &Env, end_user: &EndUserId) -> Result<(), ApiError> {
    state
        .mutate(Change::new(env, end_user, None), |user, cx, _| {
            let (_, changes) = Changes::from_applied(user.advance_bounded(cx, CHUNK_STEPS_MAX)?);
            Ok(((), changes))
        })
        .await
}

/// How far behind the scheduler runs: the oldest due work still waiting.
fn lag_metric(env: &Env, now: Timestamp, oldest: Option<Timestamp>) {
    let lag_ms = oldest
        .and_then(|oldest| now.since(oldest).ok())
        .map_or(0, |span| span.as_millis());
    metrics::gauge!("quotastack_jobs_lag_seconds", "environment" => env.environment.as_str())
        .set(Duration::from_millis(u64::try_from(lag_ms).unwrap_or(0)).as_secs_f64());
}
