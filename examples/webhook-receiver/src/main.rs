//! An example webhook receiver for QuotaStack.
//!
//! Run: `QS_WEBHOOK_SECRET=whsec_... cargo run -p webhook-receiver -- 127.0.0.1:9000`
//! then register `http://127.0.0.1:9000/webhooks` with `POST /v1/webhook-endpoints`
//! (a control plane with `webhooks.allow_private_addresses = true`, for local testing).
//!
//! It verifies each delivery (see the library, `verify`), answers 2xx quickly, and prints
//! the event. Deliveries are at least once: deduplicate on `webhook-id` if processing
//! twice would matter.

// An example program: it prints what it receives.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use webhook_receiver::{now_secs, verify};

async fn receive(
    State(secret): State<Arc<String>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    match verify(&secret, &headers, &body, now_secs()) {
        Ok(()) => {
            let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            println!(
                "{} {}",
                event["type"].as_str().unwrap_or("?"),
                event["data"]
            );
            StatusCode::NO_CONTENT
        }
        Err(rejection) => {
            eprintln!("refused a delivery: {rejection:?}");
            StatusCode::UNAUTHORIZED
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secret = std::env::var("QS_WEBHOOK_SECRET")
        .map_err(|_| "set QS_WEBHOOK_SECRET to the endpoint's whsec_ secret")?;
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".into());
    let app = axum::Router::new()
        .route("/webhooks", post(receive))
        .with_state(Arc::new(secret));
    let listener = tokio::net::TcpListener::bind(&address).await?;
    println!("listening on http://{}/webhooks", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
