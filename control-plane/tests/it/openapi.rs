//! `/openapi.json` describes every endpoint the API serves.

use crate::support::Harness;
use crate::support::store_test;

store_test! {
    async fn openapi_covers_every_endpoint(backend) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    let document = harness.get("/openapi.json", &key).await.body;
    assert!(
        document["openapi"]
            .as_str()
            .is_some_and(|version| version.starts_with("3.1")),
        "OpenAPI 3.1"
    );
    let expected = [
        ("post", "/v1/operator/tenants"),
        ("post", "/v1/api-keys"),
        ("get", "/v1/api-keys"),
        ("post", "/v1/api-keys/{id}/revoke"),
        ("post", "/v1/features"),
        ("get", "/v1/features"),
        ("get", "/v1/features/{id_or_key}"),
        ("put", "/v1/features/{id_or_key}"),
        ("post", "/v1/plans"),
        ("get", "/v1/plans"),
        ("get", "/v1/plans/{id_or_key}"),
        ("put", "/v1/plans/{id_or_key}"),
        ("post", "/v1/plans/{id_or_key}/variants"),
        ("post", "/v1/plans/{plan}/variants/{variant}/archive"),
        ("get", "/v1/settings"),
        ("patch", "/v1/settings"),
        ("post", "/v1/credits/grants"),
        ("post", "/v1/credits/blocks/{id}/void"),
        ("post", "/v1/credits/adjustments"),
        ("get", "/v1/credits/balance"),
        ("get", "/v1/ledger"),
        ("post", "/v1/usage"),
        ("post", "/v1/usage/batch"),
        ("get", "/v1/entitlements/check"),
        ("get", "/v1/entitlements"),
        ("post", "/v1/reservations"),
        ("get", "/v1/reservations/{id}"),
        ("post", "/v1/reservations/{id}/commit"),
        ("post", "/v1/reservations/{id}/release"),
        ("post", "/v1/reservations/{id}/extend"),
        ("post", "/v1/leases"),
        ("post", "/v1/leases/batch"),
        ("get", "/v1/leases"),
        ("get", "/v1/leases/{id}"),
        ("post", "/v1/leases/{id}/report"),
        ("post", "/v1/leases/{id}/release"),
        ("post", "/v1/subscriptions"),
        ("get", "/v1/subscriptions"),
        ("get", "/v1/subscriptions/{id}"),
        ("post", "/v1/subscriptions/{id}/renew"),
        ("post", "/v1/subscriptions/{id}/pause"),
        ("post", "/v1/subscriptions/{id}/resume"),
        ("post", "/v1/subscriptions/{id}/cancel"),
        ("post", "/v1/subscriptions/{id}/change"),
        ("get", "/v1/test-clock"),
        ("post", "/v1/test-clock/advance"),
        ("get", "/v1/events"),
        ("get", "/v1/events/{id}"),
        ("post", "/v1/events/{id}/redeliver"),
        ("post", "/v1/webhook-endpoints"),
        ("get", "/v1/webhook-endpoints"),
        ("get", "/v1/webhook-endpoints/{id}"),
        ("patch", "/v1/webhook-endpoints/{id}"),
        ("delete", "/v1/webhook-endpoints/{id}"),
        ("post", "/v1/webhook-endpoints/{id}/test"),
        ("get", "/v1/sync/snapshot"),
        ("get", "/v1/sync/stream"),
        ("get", "/v1/sync/nats"),
    ];
    for (method, path) in expected {
        assert!(
            document["paths"][path][method].is_object(),
            "{method} {path} is not documented"
        );
    }
    let documented: usize = document["paths"]
        .as_object()
        .expect("paths")
        .values()
        .map(|item| item.as_object().map_or(0, |ops| ops.len()))
        .sum();
    assert_eq!(
        documented,
        expected.len(),
        "every documented operation is listed here too"
    );
    assert!(document["components"]["schemas"]["Problem"].is_object());
    }
}

// docs/api.md lists exactly the endpoints `/openapi.json` documents: a new endpoint
// without a line in the guide (or a line for one that is gone) fails here.
store_test! {
    async fn the_api_guide_matches_the_openapi_document(backend) {
    let harness = Harness::start(backend).await;
    let key = harness.tenant("acme").await.test;
    let document = harness.get("/openapi.json", &key).await.body;
    let mut served = std::collections::BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("operations").keys() {
            served.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    let guide_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md");
    let guide = std::fs::read_to_string(guide_path).expect("docs/api.md");
    let documented: std::collections::BTreeSet<String> = guide
        .lines()
        .filter_map(|line| line.strip_prefix("#### `"))
        .filter_map(|rest| rest.strip_suffix('`'))
        .map(str::to_owned)
        .collect();
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/api.md is out of date: undocumented {missing:?}; not served {extra:?}"
    );
    }
}
