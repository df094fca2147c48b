//! # AI chatbot
//!
//! Per-message metering, plan credits plus a wallet of purchased credits, and a webhook
//! when credits run low.
//!
//! - Before answering a message, the backend asks `GET /v1/entitlements/check`; after
//!   answering, it records one `chat_messages` unit with `POST /v1/usage`, keyed by the
//!   message id so a retried request is never charged twice.
//! - The plan grants 100 credits a month at priority 10; a top-up the user paid for is a
//!   grant at the default priority 100 that never expires. Plan credits burn first.
//! - A webhook endpoint receives `credits.low` when the balance falls below 20, signed the
//!   Standard Webhooks way; the receiver verifies the signature before trusting it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::json;

use crate::{Sandbox, body, note, step};

pub const CATALOG: &str = include_str!("../catalogs/ai-chatbot.toml");

/// The chatbot backend's side of one message: check, answer, record.
async fn send_message(api: &client::Client, user: &str, message_id: &str) -> anyhow::Result<bool> {
    let check = api.check(user, "chat_messages", 1).await?;
    if !check.allowed {
        note(format!(
            "message {message_id}: refused ({})",
            check.reason.as_deref().unwrap_or("?")
        ));
        return Ok(false);
    }
    // ... call the model, stream the answer ...
    api.with_key(&format!("msg-{message_id}"))
        .record_usage(&body(json!({
            "end_user_id": user, "feature_key": "chat_messages", "units": 1,
            "metadata": { "message_id": message_id }
        }))?)
        .await?;
    Ok(true)
}

/// Runs the guide in a fresh sandbox.
///
/// # Errors
/// Any step that does not behave as the guide says.
pub async fn run() -> anyhow::Result<()> {
    let sandbox = Sandbox::start(None).await?;
    let api = &sandbox.api;

    step("Apply the catalog (examples/guides/catalogs/ai-chatbot.toml)");
    sandbox.apply(CATALOG, "ai-chatbot.toml").await?;

    step("Listen for webhooks: a receiver that verifies signatures");
    let received = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/webhooks", listener.local_addr()?);
    let endpoint = api
        .create_webhook_endpoint(&body(json!({"url": url, "event_types": ["credits.low"]}))?)
        .await?;
    let secret = endpoint.secret.context("the secret is shown at creation")?;
    note(format!("endpoint {} -> {url}", endpoint.id));
    let receiver = {
        let (received, secret) = (Arc::clone(&received), secret.clone());
        axum::Router::new().route(
            "/webhooks",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, payload: axum::body::Bytes| async move {
                    let now = webhook_receiver::now_secs();
                    if webhook_receiver::verify(&secret, &headers, &payload, now).is_err() {
                        return axum::http::StatusCode::UNAUTHORIZED;
                    }
                    if let Ok(event) = serde_json::from_slice(&payload) {
                        received
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(event);
                    }
                    axum::http::StatusCode::NO_CONTENT
                },
            ),
        )
    };
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, receiver).await;
    });

    step("Alice subscribes to Chat Plus: 100 plan credits");
    let subscription = api
        .subscribe(&body(
            json!({"end_user_id": "alice", "plan_variant_id": "chat-plus/monthly"}),
        )?)
        .await?;
    note(format!("{} is {}", subscription.id, subscription.status));

    step("Alice buys 50 credits (your payment provider confirmed it): a wallet grant");
    let wallet = api
        .grant(&body(json!({
            "end_user_id": "alice", "amount": 50, "source": "purchase",
            "price_paid": 500, "currency": "usd", "external_payment_id": "pi_123"
        }))?)
        .await?;
    note(format!(
        "wallet block {} with {} credits, never expires",
        wallet.id, wallet.amount
    ));
    let balance = api.balance("alice", Some("chat_messages")).await?;
    ensure!(
        balance.available == 150,
        "100 plan + 50 wallet credits, not {}",
        balance.available
    );

    step("Alice sends 90 messages: each checked, answered, recorded with its message id");
    for index in 0..90 {
        ensure!(
            send_message(api, "alice", &format!("m{index}")).await?,
            "message {index} is allowed"
        );
    }
    let balance = api.balance("alice", Some("chat_messages")).await?;
    let remaining: Vec<(i64, u16, i64)> = balance
        .blocks
        .iter()
        .map(|block| (block.amount, block.priority, block.remaining))
        .collect();
    note(format!(
        "blocks in burn order (amount, priority, remaining): {remaining:?}"
    ));
    ensure!(
        balance.available == 60,
        "60 left, not {}",
        balance.available
    );
    ensure!(
        balance
            .blocks
            .iter()
            .any(|block| block.id == wallet.id && block.remaining == 50),
        "the plan credits burned first; the wallet is untouched"
    );

    step("A network retry of message m89 sends the same key: no second charge");
    ensure!(
        send_message(api, "alice", "m89").await?,
        "the retry is answered"
    );
    let balance = api.balance("alice", Some("chat_messages")).await?;
    ensure!(
        balance.available == 60,
        "still 60, not {}",
        balance.available
    );

    step("45 more messages: the plan runs out, the wallet takes over, credits.low fires");
    for index in 90..135 {
        ensure!(
            send_message(api, "alice", &format!("m{index}")).await?,
            "message {index} is allowed"
        );
    }
    let balance = api.balance("alice", Some("chat_messages")).await?;
    ensure!(
        balance.available == 15,
        "15 left, not {}",
        balance.available
    );
    let low = e2e::eventually("the credits.low webhook", Duration::from_secs(20), || {
        let received = Arc::clone(&received);
        async move {
            let events = received
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            events
                .into_iter()
                .find(|event| event["type"] == "credits.low")
        }
    })
    .await;
    note(format!("verified webhook: {} {}", low["type"], low["data"]));
    ensure!(
        low["data"]["end_user_id"] == "alice",
        "the event names the end user"
    );

    step("Alice uses the rest; then a strict request is refused with 402");
    for index in 135..150 {
        ensure!(
            send_message(api, "alice", &format!("m{index}")).await?,
            "message {index} is allowed"
        );
    }
    ensure!(
        !send_message(api, "alice", "m150").await?,
        "the check says no"
    );
    let strict = api
        .record_usage(&body(json!({
            "end_user_id": "alice", "feature_key": "chat_messages", "units": 1, "strict": true
        }))?)
        .await;
    match strict {
        Err(error) => {
            note(format!(
                "strict usage: {} {}",
                error.status().map_or(0, |s| s.as_u16()),
                error.code().unwrap_or("?")
            ));
            ensure!(
                error.code() == Some("insufficient_balance"),
                "refused for the balance"
            );
        }
        Ok(recorded) => anyhow::bail!("strict usage past zero was recorded: {recorded:?}"),
    }
    server.abort();
    Ok(())
}
