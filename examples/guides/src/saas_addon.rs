//! # SaaS add-on
//!
//! A base plan plus an add-on, boolean features gated by plan, an upgrade and a
//! downgrade.
//!
//! - The product asks `GET /v1/entitlements` for the whole picture when it renders the
//!   account (which features are on, what is left), and `check` before an action.
//! - `sso` and `audit_log` are boolean features only Business enables; `ai_assist` comes
//!   with the AI pack add-on, which a team can hold beside any base plan.
//! - An upgrade applies at once (a new period; the old plan's credits are voided and the
//!   new plan's granted); a downgrade waits for the period end. Prepaid periods are
//!   renewed when your payment provider collects (`/renew`).

use anyhow::ensure;
use serde_json::json;

use crate::{Sandbox, body, note, step};

pub const CATALOG: &str = include_str!("../catalogs/saas-addon.toml");

/// Which of `features` the team may use now.
async fn enabled(api: &client::Client, team: &str) -> anyhow::Result<Vec<String>> {
    let answers = api.entitlements(team).await?;
    Ok(answers
        .data
        .into_iter()
        .filter(|answer| answer.allowed)
        .map(|answer| answer.feature_key)
        .collect())
}

/// Runs the guide in a fresh sandbox.
///
/// # Errors
/// Any step that does not behave as the guide says.
pub async fn run() -> anyhow::Result<()> {
    let sandbox = Sandbox::start(None).await?;
    let api = &sandbox.api;

    step("Apply the catalog (examples/guides/catalogs/saas-addon.toml)");
    sandbox.apply(CATALOG, "saas-addon.toml").await?;

    step("Team 42 starts on Starter");
    let base = api
        .subscribe(&body(
            json!({"end_user_id": "team-42", "plan_variant_id": "starter/monthly"}),
        )?)
        .await?;
    let on = enabled(api, "team-42").await?;
    note(format!("enabled: {on:?}"));
    let sso = api.check("team-42", "sso", 1).await?;
    note(format!(
        "sso: allowed {}, reason {:?}",
        sso.allowed, sso.reason
    ));
    ensure!(
        !sso.allowed && sso.reason.as_deref() == Some("not_in_plan"),
        "SSO is a Business feature"
    );

    step("They add the AI pack: 1,000 AI requests a month, beside the base plan");
    let addon = api
        .subscribe(&body(
            json!({"end_user_id": "team-42", "plan_variant_id": "ai-pack/monthly"}),
        )?)
        .await?;
    let ai = api.check("team-42", "ai_assist", 1).await?;
    note(format!(
        "ai_assist: allowed {}, balance {:?}",
        ai.allowed, ai.balance
    ));
    ensure!(
        ai.allowed && ai.balance == Some(1000),
        "the add-on's credits are for AI requests only"
    );
    let projects = api.check("team-42", "projects", 1).await?;
    ensure!(
        projects.balance == Some(5),
        "Starter's 5 projects, not the add-on's credits: {:?}",
        projects.balance
    );

    step("They upgrade to Business: at once");
    let upgraded = api
        .change_subscription(
            &base.id,
            &body(json!({"plan_variant_id": "business/monthly"}))?,
        )
        .await?;
    note(format!(
        "{} is now on {} ({})",
        upgraded.id, upgraded.plan_variant_id, upgraded.status
    ));
    let on = enabled(api, "team-42").await?;
    note(format!("enabled: {on:?}"));
    ensure!(
        on.contains(&"sso".to_owned()) && on.contains(&"audit_log".to_owned()),
        "Business features are on"
    );
    let projects = api.check("team-42", "projects", 1).await?;
    ensure!(
        projects.balance == Some(50),
        "Starter's credits voided, Business's 50 granted: {:?}",
        projects.balance
    );

    step("Later they downgrade to Starter: it waits for the period end");
    let pending = api
        .change_subscription(
            &base.id,
            &body(json!({"plan_variant_id": "starter/monthly"}))?,
        )
        .await?;
    note(format!("pending change: {:?}", pending.pending_change));
    ensure!(pending.pending_change.is_some(), "the downgrade is pending");
    ensure!(
        api.check("team-42", "sso", 1).await?.allowed,
        "SSO stays until the period ends"
    );

    step("Your payment provider collects the next month for both subscriptions");
    api.renew_subscription(&base.id, &body(json!({"periods": 1}))?)
        .await?;
    api.renew_subscription(&addon.id, &body(json!({"periods": 1}))?)
        .await?;

    step("A month passes: the downgrade applies, the add-on goes on");
    sandbox.advance_hours(31 * 24).await?;
    let base_now = api.get_subscription(&base.id).await?;
    note(format!(
        "base: {} on {}",
        base_now.status, base_now.plan_variant_id
    ));
    let on = enabled(api, "team-42").await?;
    note(format!("enabled: {on:?}"));
    ensure!(!on.contains(&"sso".to_owned()), "SSO is off on Starter");
    ensure!(
        on.contains(&"ai_assist".to_owned()),
        "the AI pack is still on"
    );
    let addon_now = api.get_subscription(&addon.id).await?;
    ensure!(
        addon_now.status == "active",
        "the add-on renewed: {}",
        addon_now.status
    );
    Ok(())
}
