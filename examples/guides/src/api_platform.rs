//! # API platform
//!
//! Postpaid tiered pricing, the proxy in front of the API, and the usage summary at
//! renewal.
//!
//! - The API sits behind the QuotaStack proxy: every call to `/v1/*` is identified by
//!   the `x-end-user-id` header (your gateway sets it; the proxy can verify a JWT
//!   instead), decided locally, forwarded, and its usage recorded and shipped in batches.
//!   The application code does nothing per call.
//! - `api_calls` is priced in graduated tiers over the period: 100 free, then 2 credits a
//!   call, then 1. The plan is postpaid with overage allowed: the calls become debt.
//! - At the period end the subscription renews itself and the `subscription.renewed`
//!   event carries the period's usage (units and credits per feature): what you invoice.

use anyhow::{Context, ensure};
use serde_json::json;

use crate::{Sandbox, body, note, step, when};

pub const CATALOG: &str = include_str!("../catalogs/api-platform.toml");

/// The proxy's routes (in a real deployment, the `[[routes]]` of its proxy.toml).
pub const ROUTES: &str = r#"
[[routes]]
path = "/healthz"
public = true

[[routes]]
path = "/v1"
feature = "api_calls"
units = 1
"#;

/// Runs the guide in a fresh sandbox.
///
/// # Errors
/// Any step that does not behave as the guide says.
pub async fn run() -> anyhow::Result<()> {
    let sandbox = Sandbox::start(Some(ROUTES)).await?;
    let api = &sandbox.api;

    step("Apply the catalog (examples/guides/catalogs/api-platform.toml)");
    sandbox.apply(CATALOG, "api-platform.toml").await?;

    step("Acme Corp signs up for Growth (postpaid, monthly)");
    let subscription = api
        .subscribe(&body(
            json!({"end_user_id": "acme-corp", "plan_variant_id": "growth/monthly"}),
        )?)
        .await?;
    note(format!(
        "{} is {}, period ends {}",
        subscription.id,
        subscription.status,
        when(&subscription.current_period_end)
    ));
    sandbox.proxy_sees("acme-corp").await?;

    step("150 calls through the proxy: each admitted locally and metered");
    for index in 0..150 {
        let answer = sandbox
            .call(
                reqwest::Method::GET,
                &format!("/v1/orders/{index}"),
                "acme-corp",
                &[],
            )
            .await?;
        ensure!(
            answer.status == 200,
            "call {index} answered {}: {}",
            answer.status,
            answer.body
        );
        if index == 0 {
            note(format!(
                "first answer: {} (x-quota-source: {}, x-quota-balance: {})",
                answer.body,
                answer.header("x-quota-source"),
                answer.header("x-quota-balance")
            ));
        }
    }
    let anonymous = sandbox
        .call(reqwest::Method::GET, "/v1/orders", "", &[])
        .await?;
    note(format!(
        "a call without an end user id: {}",
        anonymous.status
    ));
    sandbox.usage_shipped().await?;

    step("The ledger: 100 free calls, then 2 credits a call, owed as debt (postpaid)");
    let balance = api.balance("acme-corp", Some("api_calls")).await?;
    note(format!(
        "available {}, debt {}",
        balance.available, balance.debt
    ));
    ensure!(
        balance.debt == 100,
        "50 calls at 2 credits = 100 credits owed, not {}",
        balance.debt
    );

    step("A month later the subscription renews itself; the event carries the usage");
    sandbox.advance_hours(31 * 24).await?;
    let renewed = sandbox.events("subscription.renewed").await?;
    let event = renewed.last().context("a subscription.renewed event")?;
    note(format!("subscription.renewed: {}", event.data));
    let usage = event.data["usage"]
        .as_array()
        .and_then(|items| items.iter().find(|item| item["feature_key"] == "api_calls"))
        .context("api_calls in the usage summary")?;
    ensure!(
        usage["units"] == 150 && usage["cost"] == 100,
        "150 calls costing 100 credits: {usage}"
    );
    note("invoice acme-corp for 100 credits' worth (your billing system, your prices)");

    step("In the new period the tiers start over: the next call is free again");
    let answer = sandbox
        .call(reqwest::Method::GET, "/v1/orders/next", "acme-corp", &[])
        .await?;
    ensure!(answer.status == 200, "the call is admitted");
    sandbox.usage_shipped().await?;
    let last = api
        .ledger(&client::LedgerOptions {
            end_user_id: Some("acme-corp".into()),
            entry_type: Some("debit".into()),
            limit: Some(1),
            ..client::LedgerOptions::default()
        })
        .await?;
    // A debit's cost is what blocks covered (`amount`) plus what became debt.
    let cost = last
        .data
        .first()
        .map(|entry| entry.amount.saturating_add(entry.debt));
    note(format!("the newest debit: {cost:?} credits"));
    ensure!(
        cost == Some(0),
        "the first call of a period is in the free tier"
    );
    Ok(())
}
