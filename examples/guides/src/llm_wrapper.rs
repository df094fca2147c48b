//! # LLM wrapper
//!
//! Token pricing per 1,000 tokens, and reserve-then-commit through the proxy.
//!
//! An LLM call's cost is known only when it ends. The proxy route for `/v1/generate`
//! reserves an estimate before forwarding (from the request's `x-max-tokens`), so
//! concurrent calls can't spend the same credits; when the model answers, it commits the
//! actual tokens the upstream reports in `x-usage-units` and releases the rest. A failed
//! model call releases the whole hold. A backend not behind the proxy does the same with
//! `POST /v1/reservations` and `/commit`, shown at the end.

use anyhow::ensure;
use serde_json::json;

use crate::{Sandbox, body, note, step, when};

pub const CATALOG: &str = include_str!("../catalogs/llm-wrapper.toml");

/// The proxy's routes: hold `x-max-tokens` (default 4,000) tokens' cost, commit what the
/// model reports; refuse rather than guess while the control plane is unreachable.
pub const ROUTES: &str = r#"
[[routes]]
method = "POST"
path = "/v1/generate"
feature = "tokens"
reserve = { estimate = 4000, estimate_header = "x-max-tokens", actual_header = "x-usage-units", ttl_secs = 300 }
on_unavailable = "closed"
"#;

/// Runs the guide in a fresh sandbox.
///
/// # Errors
/// Any step that does not behave as the guide says.
pub async fn run() -> anyhow::Result<()> {
    let sandbox = Sandbox::start(Some(ROUTES)).await?;
    let api = &sandbox.api;

    step("Apply the catalog (examples/guides/catalogs/llm-wrapper.toml)");
    sandbox.apply(CATALOG, "llm-wrapper.toml").await?;

    step("Dev-1 buys a 30-credit pack (10,000 tokens' worth)");
    api.grant(&body(
        json!({"end_user_id": "dev-1", "amount": 30, "source": "purchase",
                             "price_paid": 1000, "currency": "usd"}),
    )?)
    .await?;
    sandbox.proxy_sees("dev-1").await?;

    step("A completion through the proxy: hold 4,000 tokens (12 credits), the model uses 2,500");
    let answer = sandbox
        .call(
            reqwest::Method::POST,
            "/v1/generate",
            "dev-1",
            &[("x-max-tokens", "4000"), ("x-tokens", "2500")],
        )
        .await?;
    ensure!(
        answer.status == 200,
        "answered {}: {}",
        answer.status,
        answer.body
    );
    note(format!("model answer: {}", answer.body));
    sandbox.usage_shipped().await?;
    let balance = api.balance("dev-1", Some("tokens")).await?;
    note(format!(
        "available {} (2,500 tokens = 7.5 credits, rounded up to 8), held {}",
        balance.available, balance.held
    ));
    ensure!(
        balance.available == 22 && balance.held == 0,
        "charged 8, nothing left held"
    );

    step("The ledger shows the hold, the commit of the actual, and the release of the rest");
    let entries = api
        .ledger(&client::LedgerOptions {
            end_user_id: Some("dev-1".into()),
            ..client::LedgerOptions::default()
        })
        .await?;
    for entry in entries.data.iter().rev() {
        note(format!(
            "{:>8} {:>4} credits{}",
            entry.entry_type,
            entry.amount,
            entry
                .reservation_id
                .as_deref()
                .map(|id| format!(" ({id})"))
                .unwrap_or_default()
        ));
    }

    step("A request that could cost more than is left is refused before the model runs");
    let refused = sandbox
        .call(
            reqwest::Method::POST,
            "/v1/generate",
            "dev-1",
            &[("x-max-tokens", "10000")],
        )
        .await?;
    note(format!("{}: {}", refused.status, refused.body));
    ensure!(
        refused.status == 402,
        "10,000 tokens would need 30 credits, 22 are left"
    );

    step("The model fails: the hold is released, nothing is charged");
    let failed = sandbox
        .call(
            reqwest::Method::POST,
            "/v1/generate",
            "dev-1",
            &[("x-max-tokens", "1000"), ("x-fail", "true")],
        )
        .await?;
    note(format!("upstream answered {}", failed.status));
    ensure!(
        failed.status == 502,
        "the model's failure reaches the client"
    );
    sandbox.usage_shipped().await?;
    let balance = api.balance("dev-1", Some("tokens")).await?;
    ensure!(
        balance.available == 22 && balance.held == 0,
        "still 22, nothing held: {balance:?}"
    );

    step("Without the proxy: a batch job reserves, then commits what it used");
    let hold = api
        .reserve(&body(
            json!({"end_user_id": "dev-1", "feature_key": "tokens",
                               "units": 5000, "ttl_seconds": 600}),
        )?)
        .await?;
    note(format!(
        "reservation {} holds {} credits until {}",
        hold.id,
        hold.amount,
        when(&hold.expires_at)
    ));
    // ... the job runs; a long one would call extend_reservation as a heartbeat ...
    let committed = api
        .commit_reservation(&hold.id, &body(json!({"units": 3000}))?)
        .await?;
    note(format!(
        "committed {}, released {}",
        committed.committed_amount, committed.released_amount
    ));
    let balance = api.balance("dev-1", Some("tokens")).await?;
    ensure!(
        balance.available == 13,
        "22 - 9 (3,000 tokens) = 13, not {}",
        balance.available
    );
    Ok(())
}
