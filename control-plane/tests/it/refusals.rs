//! A property: any request the API refuses with a 4xx leaves the end user's state, the
//! ledger and the event log exactly as they were, byte for byte. Random sequences of
//! valid and invalid requests (bad amounts, unknown features, strict usage beyond the
//! balance, bad ids, lapsed reservations, illegal transitions, reused idempotency keys,
//! malformed bodies) run against one end user; before and after every refused request
//! the stored state, every entry and every event are read and compared.

use axum::http::Method;
use control_plane::store::{EntryFilter, Env};
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::support::{Backend, Harness};

/// What the store holds for the end user and the environment, as bytes.
async fn snapshot(harness: &Harness, env: &Env) -> (String, String, String) {
    let store = harness.state.store();
    let user = ledger::EndUserId::new("u1").expect("id");
    let state = store
        .load_state(env, &user)
        .await
        .expect("state")
        .map(|state| serde_json::to_string(&state.into_parts()).expect("json"))
        .unwrap_or_default();
    let entries = store
        .entries(
            env,
            &EntryFilter {
                end_user_id: None,
                entry_type: None,
                from: None,
                to: None,
                before_seq: None,
                limit: 10_000,
            },
        )
        .await
        .expect("entries");
    let entries =
        serde_json::to_string(&entries.iter().map(|(_, entry)| entry).collect::<Vec<_>>())
            .expect("json");
    let events = store.events(env, None, 10_000).await.expect("events");
    let events = serde_json::to_string(
        &events
            .iter()
            .map(|record| (record.seq, &record.event.id, &record.event.data))
            .collect::<Vec<_>>(),
    )
    .expect("json");
    (state, entries, events)
}

/// One request the property sends.
#[derive(Debug, Clone)]
enum Step {
    Usage {
        feature: usize,
        units: u64,
        strict: bool,
    },
    Grant {
        amount: i64,
        expiry: usize,
        currency: usize,
    },
    Adjust {
        amount: i64,
        reason: bool,
    },
    Reserve {
        units: u64,
        ttl: i64,
    },
    Commit {
        which: usize,
        amount: i64,
    },
    Release {
        which: usize,
    },
    Void {
        which: usize,
    },
    Subscribe {
        variant: usize,
        start: usize,
    },
    Transition {
        which: usize,
        action: usize,
    },
    Batch {
        empty: bool,
        feature: usize,
    },
    Malformed {
        path: usize,
    },
    Keyed {
        key: usize,
        amount: i64,
    },
}

const FEATURES: [&str; 4] = ["api_calls", "gpu", "nope", "Bad Key"];
const VARIANTS: [&str; 3] = ["pro/monthly", "free/monthly", "ghost/monthly"];
const ACTIONS: [&str; 5] = ["pause", "resume", "cancel", "renew", "change"];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..4usize, 0..4u64, any::<bool>()).prop_map(|(feature, units, strict)| Step::Usage {
            feature,
            units,
            strict
        }),
        (-2..6i64, 0..3usize, 0..2usize).prop_map(|(amount, expiry, currency)| Step::Grant {
            amount,
            expiry,
            currency
        }),
        (-8..4i64, any::<bool>()).prop_map(|(amount, reason)| Step::Adjust { amount, reason }),
        (0..6u64, -1..3i64).prop_map(|(units, ttl)| Step::Reserve { units, ttl }),
        (0..3usize, -1..5i64).prop_map(|(which, amount)| Step::Commit { which, amount }),
        (0..3usize).prop_map(|which| Step::Release { which }),
        (0..3usize).prop_map(|which| Step::Void { which }),
        (0..3usize, 0..3usize).prop_map(|(variant, start)| Step::Subscribe { variant, start }),
        (0..3usize, 0..5usize).prop_map(|(which, action)| Step::Transition { which, action }),
        (any::<bool>(), 0..4usize).prop_map(|(empty, feature)| Step::Batch { empty, feature }),
        (0..4usize).prop_map(|path| Step::Malformed { path }),
        (0..2usize, 1..4i64).prop_map(|(key, amount)| Step::Keyed { key, amount }),
    ]
}

/// Ids made so far, to refer to (or miss with a made-up one).
#[derive(Debug, Default)]
struct Made {
    reservations: Vec<String>,
    blocks: Vec<String>,
    subscriptions: Vec<String>,
}

fn pick(ids: &[String], which: usize, prefix: &str) -> String {
    ids.get(which)
        .cloned()
        .unwrap_or_else(|| format!("{prefix}_01JXXXXXXXXXXXXXXXXXXXXXXX"))
}

/// Sends one step; answers its status and body.
async fn send(harness: &Harness, key: &str, made: &Made, step: &Step) -> (u16, Value) {
    let (method, path, body, headers): (Method, String, Option<Value>, Vec<(&str, String)>) =
        match step {
            Step::Usage {
                feature,
                units,
                strict,
            } => (
                Method::POST,
                "/v1/usage".into(),
                Some(
                    json!({"end_user_id": "u1", "feature_key": FEATURES[*feature], "units": units, "strict": strict}),
                ),
                vec![],
            ),
            Step::Grant {
                amount,
                expiry,
                currency,
            } => {
                let mut body = json!({"end_user_id": "u1", "amount": amount});
                match expiry {
                    1 => body["expires_at"] = json!("2025-01-01T00:00:00Z"),
                    2 => body["expires_at"] = json!("2026-02-01T00:00:00Z"),
                    _ => {}
                }
                body["currency"] = json!(["usd", "us1"][*currency]);
                (
                    Method::POST,
                    "/v1/credits/grants".into(),
                    Some(body),
                    vec![],
                )
            }
            Step::Adjust { amount, reason } => (
                Method::POST,
                "/v1/credits/adjustments".into(),
                Some(
                    json!({"end_user_id": "u1", "amount": amount, "reason": if *reason { "fix" } else { " " }}),
                ),
                vec![],
            ),
            Step::Reserve { units, ttl } => (
                Method::POST,
                "/v1/reservations".into(),
                Some(
                    json!({"end_user_id": "u1", "feature_key": "api_calls", "units": units, "ttl_seconds": ttl * 300}),
                ),
                vec![],
            ),
            Step::Commit { which, amount } => (
                Method::POST,
                format!(
                    "/v1/reservations/{}/commit",
                    pick(&made.reservations, *which, "rsv")
                ),
                Some(json!({"amount": amount})),
                vec![],
            ),
            Step::Release { which } => (
                Method::POST,
                format!(
                    "/v1/reservations/{}/release",
                    pick(&made.reservations, *which, "rsv")
                ),
                None,
                vec![],
            ),
            Step::Void { which } => (
                Method::POST,
                format!(
                    "/v1/credits/blocks/{}/void",
                    pick(&made.blocks, *which, "blk")
                ),
                Some(json!({"reason": "refund"})),
                vec![],
            ),
            Step::Subscribe { variant, start } => {
                let mut body = json!({"end_user_id": "u1", "plan_variant_id": VARIANTS[*variant]});
                match start {
                    1 => body["start_at"] = json!("2020-01-01T00:00:00Z"),
                    2 => body["start_at"] = json!("2030-01-01T00:00:00Z"),
                    _ => {}
                }
                (Method::POST, "/v1/subscriptions".into(), Some(body), vec![])
            }
            Step::Transition { which, action } => {
                let body = match ACTIONS[*action] {
                    "renew" => json!({"periods": 1}),
                    "change" => json!({"plan_variant_id": "free/monthly"}),
                    _ => json!({}),
                };
                (
                    Method::POST,
                    format!(
                        "/v1/subscriptions/{}/{}",
                        pick(&made.subscriptions, *which, "sub"),
                        ACTIONS[*action]
                    ),
                    Some(body),
                    vec![],
                )
            }
            Step::Batch { empty, feature } => {
                let events = if *empty {
                    json!([])
                } else {
                    json!([{"end_user_id": "u1", "feature_key": FEATURES[*feature], "units": 1, "idempotency_key": "batch-k"}])
                };
                (
                    Method::POST,
                    "/v1/usage/batch".into(),
                    Some(json!({"events": events})),
                    vec![],
                )
            }
            Step::Malformed { path } => (
                Method::POST,
                [
                    "/v1/usage",
                    "/v1/credits/grants",
                    "/v1/reservations",
                    "/v1/subscriptions",
                ][*path]
                    .into(),
                Some(json!({"end_user_id": "u1", "unexpected": true})),
                vec![],
            ),
            Step::Keyed { key, amount } => (
                Method::POST,
                "/v1/credits/grants".into(),
                Some(json!({"end_user_id": "u1", "amount": amount})),
                vec![("idempotency-key", format!("grant-key-{key}"))],
            ),
        };
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let answer = harness.send(method, &path, Some(key), body, &headers).await;
    (answer.status.as_u16(), answer.body)
}

fn remember(made: &mut Made, body: &Value) {
    let Some(id) = body["id"].as_str() else {
        return;
    };
    let list = if id.starts_with("rsv_") {
        &mut made.reservations
    } else if id.starts_with("blk_") {
        &mut made.blocks
    } else if id.starts_with("sub_") {
        &mut made.subscriptions
    } else {
        return;
    };
    if !list.iter().any(|known| known == id) {
        list.push(id.to_owned());
    }
}

async fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let harness = Harness::start(&Backend::Sqlite).await;
    let key = harness.tenant("acme").await.test;
    harness.catalog(&key).await;
    let caller = harness.state.authenticate(&key, None).await.expect("key");
    let env = caller.env;
    let mut made = Made::default();
    for step in &steps {
        let before = snapshot(&harness, &env).await;
        let (status, body) = send(&harness, &key, &made, step).await;
        prop_assert!(status < 500, "{step:?} answered {status}: {body}");
        if (400..500).contains(&status) {
            let after = snapshot(&harness, &env).await;
            prop_assert_eq!(
                &before.0,
                &after.0,
                "{:?} ({}) changed the state",
                step,
                status
            );
            prop_assert_eq!(
                &before.1,
                &after.1,
                "{:?} ({}) changed the ledger",
                step,
                status
            );
            prop_assert_eq!(
                &before.2,
                &after.2,
                "{:?} ({}) changed the event log",
                step,
                status
            );
        } else {
            remember(&mut made, &body);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    // Any 4xx leaves the state, the ledger and the event log byte-for-byte unchanged.
    #[test]
    fn refused_requests_change_nothing(steps in proptest::collection::vec(step(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(run(steps))?;
    }
}
