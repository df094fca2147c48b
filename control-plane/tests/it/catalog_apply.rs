//! Catalog as code: `apply` creates a catalog from a file, changes nothing the second
//! time, replaces what may change, and refuses what may not before writing anything.

use axum::http::StatusCode;
use control_plane::apply::{self, CatalogFile, Step};
use serde_json::json;

use crate::support::Harness;
use crate::support::store_test;

/// The harness's API on a loopback port (port 0), for the HTTP client.
async fn serve(harness: &Harness) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let app = harness.app.clone();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

fn example() -> CatalogFile {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/catalog.example.toml"
    );
    let text = std::fs::read_to_string(path).expect("config/catalog.example.toml");
    CatalogFile::parse(&text, path).expect("the example catalog is valid")
}

store_test! {
    async fn apply_creates_then_changes_nothing(backend) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    let api = client::Client::new(&serve(&harness).await, &key).expect("client");
    let file = example();

    let plan = apply::plan(&file, &apply::current(&api).await.expect("read"));
    assert!(plan.refused.is_empty(), "{plan}");
    assert_eq!(plan.unchanged, 0);
    apply::execute(&api, &plan, |_| {}).await.expect("apply");

    let features = harness.get("/v1/features", &key).await;
    assert_eq!(features.body["data"].as_array().map(Vec::len), Some(file.features.len()));
    let pro = harness.get("/v1/plans/pro", &key).await;
    assert_eq!(pro.body["variants"].as_array().map(Vec::len), Some(2));
    assert_eq!(pro.body["variants"][0]["grants"][1]["every"], "5h");
    let settings = harness.get("/v1/settings", &key).await;
    let free = harness.get("/v1/plans/free", &key).await;
    assert_eq!(settings.body["free_plan_variant_id"], free.body["variants"][0]["id"]);
    assert_eq!(settings.body["low_balance_threshold"], 100);

    let again = apply::plan(&file, &apply::current(&api).await.expect("read"));
    assert!(again.steps.is_empty() && again.refused.is_empty(), "{again}");
    }
}

store_test! {
    async fn apply_replaces_what_may_change_and_refuses_the_rest(backend) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    let api = client::Client::new(&serve(&harness).await, &key).expect("client");
    let mut file = example();
    let first = apply::plan(&file, &apply::current(&api).await.expect("read"));
    apply::execute(&api, &first, |_| {}).await.expect("apply");

    // A new name and price for a feature, a feature off in a plan: replaced in place.
    file.features[1].name = "Tokens".into();
    file.features[1].pricing = Some(protocol::PricingWire::PerUnit { unit_cost: 2, per: 1000 });
    file.plans[1].features.remove("sso");
    let plan = apply::plan(&file, &apply::current(&api).await.expect("read"));
    let lines: Vec<String> = plan.steps.iter().map(ToString::to_string).collect();
    assert_eq!(lines, ["~ feature tokens (name, pricing)", "~ plan pro (features)"]);
    apply::execute(&api, &plan, |_| {}).await.expect("apply");
    let tokens = harness.get("/v1/features/tokens", &key).await;
    assert_eq!((tokens.body["name"].as_str(), tokens.body["pricing"]["unit_cost"].as_i64()), (Some("Tokens"), Some(2)));
    // The new price is what the next usage pays.
    harness.grant(&key, "u1", 100).await;
    let used = harness.ok("/v1/usage", &key, json!({"end_user_id": "u1", "feature_key": "tokens", "units": 1000}), 201).await;
    assert_eq!(used["cost"], 2);

    // A changed variant and a feature's new type are refused, and nothing else is written.
    let mut refused = file.clone();
    refused.plans[1].variants[0].price = Some(protocol::PriceWire { amount: 2500, currency: "usd".into() });
    refused.features[3].feature_type = protocol::FeatureTypeWire::Metered;
    refused.features[0].name = "Would change".into();
    let plan = apply::plan(&refused, &apply::current(&api).await.expect("read"));
    assert_eq!(plan.refused.len(), 2, "{plan}");
    assert!(plan.refused.iter().any(|line| line.contains("variant pro/monthly") && line.contains("price")), "{plan}");
    assert!(matches!(plan.steps.as_slice(), [Step::ReplaceFeature { .. }]));
    let error = apply::execute(&api, &plan, |_| {}).await.expect_err("refused");
    assert!(error.to_string().contains("can't be applied"), "{error}");
    let messages = harness.get("/v1/features/messages", &key).await;
    assert_eq!(messages.body["name"], "Chat messages", "nothing was written");
    }
}

// The replace endpoints keep keys, types and kinds, and name what is wrong.
store_test! {
    async fn replacing_keeps_keys_types_and_kinds(backend) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    harness.catalog(&key).await;
    let put = |path: &'static str, body: serde_json::Value| {
        let (harness, key) = (harness.clone(), key.clone());
        async move { harness.send(axum::http::Method::PUT, path, Some(&key), Some(body), &[]).await }
    };
    let renamed = put("/v1/features/api_calls", json!({"key": "calls", "name": "Calls", "type": "metered"})).await;
    assert_eq!((renamed.status, renamed.body["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("key")));
    let retyped = put("/v1/features/api_calls", json!({"key": "api_calls", "name": "Calls", "type": "boolean"})).await;
    assert_eq!((retyped.status, retyped.body["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("type")));
    let missing = put("/v1/features/nope", json!({"key": "nope", "name": "No", "type": "metered"})).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let ok = put("/v1/features/api_calls", json!({"key": "api_calls", "name": "Calls", "type": "metered"})).await;
    assert_eq!((ok.status, ok.body["name"].as_str()), (StatusCode::OK, Some("Calls")));

    let rekinded = put("/v1/plans/pro", json!({"key": "pro", "name": "Pro", "kind": "addon"})).await;
    assert_eq!((rekinded.status, rekinded.body["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("kind")));
    let unknown = put("/v1/plans/pro", json!({"key": "pro", "name": "Pro", "kind": "base", "features": {"ghost": {"enabled": true}}})).await;
    assert_eq!((unknown.status, unknown.body["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("features.ghost")));
    let replaced = put("/v1/plans/pro", json!({"key": "pro", "name": "Pro+", "kind": "base", "features": {"api_calls": {"enabled": true}}})).await;
    assert_eq!(replaced.status, StatusCode::OK, "{}", replaced.body);
    assert_eq!(replaced.body["variants"].as_array().map(Vec::len), Some(1), "variants stay");
    let plan = harness.get("/v1/plans/pro", &key).await;
    assert_eq!(plan.body["name"], "Pro+");
    }
}
