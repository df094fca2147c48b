//! # Developer tool
//!
//! A Claude-Pro style 5-hour window plus a weekly cap, and the free-plan fallback.
//!
//! - Pro grants 45 `prompts` every five hours (unused ones vanish at the reset) and 200
//!   `prompts_weekly` every week. A prompt needs both: the tool checks both features and
//!   records one unit of each.
//! - A denial says when the limit resets (`resets_at`), so the tool can tell the user.
//! - When Pro ends, the user falls back to the free plan automatically.

use anyhow::{Context, ensure};
use serde_json::json;

use crate::{Sandbox, body, note, step, when};

pub const CATALOG: &str = include_str!("../catalogs/dev-tool.toml");

/// Why a prompt may not run now (the limit and when it resets), or `None`.
async fn blocked(api: &client::Client, user: &str) -> anyhow::Result<Option<String>> {
    for feature in ["prompts", "prompts_weekly"] {
        let check = api.check(user, feature, 1).await?;
        if !check.allowed {
            return Ok(Some(format!(
                "{feature}: {} (resets at {})",
                check.reason.as_deref().unwrap_or("?"),
                check.resets_at.as_ref().map(when).unwrap_or_default()
            )));
        }
    }
    Ok(None)
}

/// Runs `count` prompts for `user`, each checked and recorded against both limits;
/// returns how many ran before one was blocked, and why.
async fn prompts(
    api: &client::Client,
    user: &str,
    first: u32,
    count: u32,
) -> anyhow::Result<(u32, Option<String>)> {
    for index in 0..count {
        if let Some(reason) = blocked(api, user).await? {
            return Ok((index, Some(reason)));
        }
        let id = first.saturating_add(index);
        for feature in ["prompts", "prompts_weekly"] {
            api.with_key(&format!("prompt-{id}-{feature}"))
                .record_usage(&body(
                    json!({"end_user_id": user, "feature_key": feature, "units": 1}),
                )?)
                .await?;
        }
    }
    Ok((count, None))
}

/// Runs the guide in a fresh sandbox.
///
/// # Errors
/// Any step that does not behave as the guide says.
pub async fn run() -> anyhow::Result<()> {
    let sandbox = Sandbox::start(None).await?;
    let api = &sandbox.api;

    step("Apply the catalog (examples/guides/catalogs/dev-tool.toml)");
    sandbox.apply(CATALOG, "dev-tool.toml").await?;

    step("Dana subscribes to Pro");
    let pro = api
        .subscribe(&body(
            json!({"end_user_id": "dana", "plan_variant_id": "pro/monthly"}),
        )?)
        .await?;
    note(format!("{} is {}", pro.id, pro.status));

    step("45 prompts fill the 5-hour window; the 46th is refused with the reset time");
    let (ran, why) = prompts(api, "dana", 0, 46).await?;
    note(format!(
        "{ran} ran; then {}",
        why.as_deref().unwrap_or("nothing stopped it")
    ));
    ensure!(
        ran == 45
            && why
                .as_deref()
                .is_some_and(|why| why.starts_with("prompts:")),
        "the window stops the 46th"
    );

    step("Five hours later the window resets (unused prompts would have vanished)");
    sandbox.advance_hours(5).await?;
    let (ran, _) = prompts(api, "dana", 100, 45).await?;
    ensure!(ran == 45, "a fresh window of 45, not {ran}");

    step("Two more windows, then the weekly cap (200) stops Dana mid-window");
    let mut used = 90;
    for window in 0..2 {
        sandbox.advance_hours(5).await?;
        let (ran, _) = prompts(api, "dana", 200 + window * 100, 45).await?;
        used += ran;
    }
    sandbox.advance_hours(5).await?;
    let (ran, why) = prompts(api, "dana", 500, 45).await?;
    used += ran;
    note(format!(
        "{used} prompts this week; then {}",
        why.as_deref().unwrap_or("nothing stopped it")
    ));
    ensure!(used == 200, "the weekly cap is 200, not {used}");
    ensure!(
        why.as_deref()
            .is_some_and(|why| why.starts_with("prompts_weekly:")),
        "the weekly cap, not the window, stopped it"
    );
    let window = api.check("dana", "prompts", 1).await?;
    ensure!(
        window.balance == Some(25),
        "the window still had 25: {:?}",
        window.balance
    );

    step("Dana cancels Pro at once: the free plan takes over");
    api.cancel_subscription(&pro.id, &body(json!({"at": "immediate"}))?)
        .await?;
    let subscriptions = api
        .list_subscriptions(&client::ListOptions {
            end_user_id: Some("dana".into()),
            ..client::ListOptions::default()
        })
        .await?;
    for subscription in &subscriptions.data {
        note(format!(
            "{} {} ({})",
            subscription.id, subscription.plan_variant_id, subscription.status
        ));
    }
    let free = subscriptions
        .data
        .iter()
        .find(|subscription| subscription.status == "active")
        .context("an active subscription after the fallback")?;
    ensure!(
        free.plan_id != pro.plan_id,
        "the active subscription is the free plan"
    );
    let window = api.check("dana", "prompts", 1).await?;
    note(format!(
        "prompts now: balance {:?}, plan {:?}",
        window.balance, window.plan
    ));
    ensure!(window.plan.as_deref() == Some("free"), "on the free plan");
    ensure!(
        window.balance == Some(5),
        "the free window of 5: {:?}",
        window.balance
    );
    Ok(())
}
