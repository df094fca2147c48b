//! Leases through the API on both stores (SPEC 12.1): holds for a proxy, reports exactly
//! once by sequence (replayed, reordered and duplicated by a hostile client), top-ups,
//! releases, expiry with late reports, listings by end user and holder, scopes.

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::support::{Harness, store_test};

async fn proxy_key(harness: &Harness, admin: &str) -> String {
    harness
        .ok(
            "/v1/api-keys",
            admin,
            json!({"name": "proxy", "scopes": ["sync", "write"]}),
            201,
        )
        .await["secret"]
        .as_str()
        .expect("secret")
        .to_owned()
}

async fn lease(harness: &Harness, key: &str, amount: i64, ttl: i64) -> Value {
    harness
        .ok(
            "/v1/leases",
            key,
            json!({"end_user_id": "u1", "feature_key": "api_calls", "holder": "proxy-a", "amount": amount, "ttl_seconds": ttl}),
            201,
        )
        .await
}

fn report(sequence: u64, cost: i64) -> Value {
    json!({"sequence": sequence, "units": cost, "cost": cost, "requests": cost})
}

async fn balance(harness: &Harness, key: &str) -> Value {
    harness
        .get("/v1/credits/balance?end_user_id=u1", key)
        .await
        .body
}

// A lease holds what is available (partly, never nothing), shows as `held`, is listed by
// end user and by holder, and reports spend it exactly once by sequence.
store_test! {
    async fn leases_hold_and_reports_spend_exactly_once(backend) {
    let harness = Harness::start(backend).await;
    let admin = harness.tenant("acme").await.test;
    harness.catalog(&admin).await;
    let key = proxy_key(&harness, &admin).await;
    harness.grant(&admin, "u1", 100).await;

    let created = lease(&harness, &key, 60, 300).await;
    let id = created["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("lse_"));
    assert_eq!(created["amount"], 60);
    assert!(created["version"].as_u64().is_some());
    assert_eq!(created["available"], 40, "free beside the holds, as of the answer");
    let partial = lease(&harness, &key, 500, 300).await;
    assert_eq!(partial["amount"], 40, "only what was left");
    assert_eq!(partial["available"], 0);
    let nothing = harness
        .post("/v1/leases", &key, json!({"end_user_id": "u1", "feature_key": "api_calls", "holder": "proxy-b", "amount": 5, "ttl_seconds": 60}))
        .await;
    assert_eq!((nothing.status, nothing.code()), (StatusCode::PAYMENT_REQUIRED, "insufficient_balance"));
    let shown = balance(&harness, &admin).await;
    assert_eq!((shown["available"].as_i64(), shown["held"].as_i64()), (Some(0), Some(100)));

    // A hostile client: duplicates, a gap, the right order after it.
    let path = format!("/v1/leases/{id}/report");
    let first = harness.ok(&path, &key, report(1, 10), 200).await;
    assert_eq!((first["amount"].as_i64(), first["replayed"].as_bool()), (Some(50), None));
    let again = harness.ok(&path, &key, report(1, 10), 200).await;
    assert_eq!(again["replayed"], true);
    let gap = harness.post(&path, &key, report(3, 7)).await;
    assert_eq!((gap.status, gap.code()), (StatusCode::CONFLICT, "sequence_gap"));
    assert_eq!(gap.body["expected"], 2);
    harness.ok(&path, &key, report(2, 5), 200).await;
    harness.ok(&path, &key, report(3, 7), 200).await;
    assert_eq!(harness.ok(&path, &key, report(2, 5), 200).await["replayed"], true);
    let topped = harness
        .ok(&path, &key, json!({"sequence": 4, "units": 0, "cost": 0, "requests": 0, "top_up": 5, "ttl_seconds": 600}), 200)
        .await;
    assert_eq!(topped["topped_up"], 0, "nothing was left to top up with");
    let read = harness.get(&format!("/v1/leases/{id}"), &key).await.body;
    assert_eq!((read["spent"].as_i64(), read["amount"].as_i64(), read["sequence"].as_u64()), (Some(22), Some(38), Some(4)));
    let commits = harness.get("/v1/ledger?end_user_id=u1&type=commit", &admin).await.body;
    assert_eq!(commits["data"].as_array().map(Vec::len), Some(3), "one entry per report");
    assert_eq!(commits["data"][0]["lease_id"], id.as_str());

    let by_user = harness.get("/v1/leases?end_user_id=u1", &admin).await.body;
    assert_eq!(by_user["data"].as_array().map(Vec::len), Some(2));
    let by_holder = harness.get("/v1/leases?holder=proxy-a&status=active", &key).await.body;
    assert_eq!(by_holder["data"].as_array().map(Vec::len), Some(2));
    let none = harness.get("/v1/leases?holder=proxy-z", &key).await.body;
    assert_eq!(none["data"].as_array().map(Vec::len), Some(0));

    // Release: a final report, then the rest goes back.
    let released = harness.ok(&format!("/v1/leases/{id}/release"), &key, report(5, 8), 200).await;
    assert_eq!((released["status"].as_str(), released["amount"].as_i64()), (Some("released"), Some(0)));
    assert_eq!(released["available"], 30, "what the release gave back");
    let shown = balance(&harness, &admin).await;
    assert_eq!((shown["available"].as_i64(), shown["held"].as_i64()), (Some(30), Some(40)), "100 - 30 spent, 40 still in the other lease");
    }
}

// At its TTL a lease's unspent hold goes back (event `lease.expired`); a late report from
// a cut-off proxy is charged like usage, once.
store_test! {
    async fn an_expired_lease_charges_late_reports_once(backend) {
    let harness = Harness::start(backend).await;
    let admin = harness.tenant("acme").await.test;
    harness.catalog(&admin).await;
    let key = proxy_key(&harness, &admin).await;
    harness.grant(&admin, "u1", 100).await;
    let id = lease(&harness, &key, 50, 30).await["id"].as_str().expect("id").to_owned();
    harness.advance(&admin, 31).await;
    let read = harness.get(&format!("/v1/leases/{id}"), &key).await.body;
    assert_eq!(read["status"], "expired");
    assert_eq!(balance(&harness, &admin).await["available"], 100);
    let events = harness.get("/v1/events?limit=500", &admin).await.body;
    assert!(events["data"].as_array().expect("events").iter().any(|event| event["type"] == "lease.expired"));
    let late = harness.ok(&format!("/v1/leases/{id}/report"), &key, report(1, 12), 200).await;
    assert_eq!(late["beyond_hold"], 12);
    harness.ok(&format!("/v1/leases/{id}/report"), &key, report(1, 12), 200).await;
    assert_eq!(balance(&harness, &admin).await["available"], 88, "charged once");
    let top_up = harness
        .post(&format!("/v1/leases/{id}/report"), &key, json!({"sequence": 2, "top_up": 5}))
        .await;
    assert_eq!((top_up.status, top_up.code()), (StatusCode::CONFLICT, "lease_not_active"));
    }
}

// A report taken is remembered under the usage key a proxy gives its spend when it
// finds the lease gone (`{lease}-{sequence}`, proxy/src/leases.rs `to_usage`): a proxy
// whose record of the answer never reached its disk, back after the ended lease was
// forgotten, sends that report's spend as usage, which answers as a duplicate rather
// than charging it twice. Reports through a batch are remembered alike; a report with
// no requests in it is not (the proxy sends no usage for it). A key of that form the
// tenant's own events took first stays theirs, and the report is taken all the same.
store_test! {
    async fn a_taken_report_is_not_charged_again_as_usage(backend) {
    let harness = Harness::start(backend).await;
    let admin = harness.tenant("acme").await.test;
    harness.catalog(&admin).await;
    let key = proxy_key(&harness, &admin).await;
    harness.grant(&admin, "u1", 100).await;
    let single = lease(&harness, &key, 30, 60).await["id"].as_str().expect("id").to_owned();
    let batched = lease(&harness, &key, 30, 60).await["id"].as_str().expect("id").to_owned();
    let path = format!("/v1/leases/{single}/report");
    harness.ok(&path, &key, report(1, 10), 200).await;
    assert_eq!(
        harness.ok(&path, &key, report(1, 10), 200).await["replayed"],
        true,
        "a repeat remembers nothing twice"
    );
    harness
        .ok(&path, &key, json!({"sequence": 2, "units": 0, "cost": 0, "requests": 0}), 200)
        .await;
    let answer = harness
        .ok("/v1/leases/batch", &key, json!({"operations": [
            {"op": "report", "lease_id": batched, "sequence": 1, "units": 4, "cost": 4, "requests": 4},
        ]}), 200)
        .await;
    assert_eq!(answer["results"][0]["status"], 200, "{answer}");
    let event = |lease: &str, sequence: u64, units: u64| json!({
        "end_user_id": "u1", "feature_key": "api_calls", "units": units,
        "idempotency_key": format!("{lease}-{sequence}"),
    });
    let own = harness
        .ok("/v1/usage/batch", &key, json!({"events": [event(&batched, 2, 1)]}), 200)
        .await;
    assert_eq!(own["results"][0]["status"], "created");
    harness.ok(&format!("/v1/leases/{batched}/report"), &key, report(2, 2), 200).await;
    harness.ok(&format!("/v1/leases/{single}/release"), &key, report(3, 0), 200).await;
    harness.ok(&format!("/v1/leases/{batched}/release"), &key, report(3, 0), 200).await;
    assert_eq!(harness.available(&admin, "u1").await, 83, "100 - 10 - 4 - 1 - 2");

    // Past the hour an ended lease is kept: gone.
    harness.advance(&admin, 3_700).await;
    let gone = harness.post(&path, &key, report(3, 0)).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);

    // What the proxy sends then, one event per sequence its log holds spend for.
    let charged = harness
        .ok("/v1/usage/batch", &key, json!({"events": [
            event(&single, 1, 10), event(&batched, 1, 4), event(&single, 2, 1), event(&batched, 2, 2),
        ]}), 200)
        .await;
    let statuses: Vec<&str> = charged["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|result| result["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(statuses, ["duplicate", "duplicate", "created", "error"], "{charged}");
    assert_eq!(
        charged["results"][3]["error"]["code"], "idempotency_key_reused",
        "the tenant's own event holds that key"
    );
    assert_eq!(
        harness.available(&admin, "u1").await,
        82,
        "the taken reports are not charged again; the event with no report is"
    );
    }
}

// Taking, reporting and releasing need `sync` and `write`; reading `read` or `sync`.
store_test! {
    async fn leases_need_a_proxys_scopes(backend) {
    let harness = Harness::start(backend).await;
    let admin = harness.tenant("acme").await.test;
    harness.catalog(&admin).await;
    harness.grant(&admin, "u1", 100).await;
    let body = json!({"end_user_id": "u1", "feature_key": "api_calls", "holder": "p", "amount": 5, "ttl_seconds": 60});
    for scopes in [json!(["write"]), json!(["sync"]), json!(["read"])] {
        let key = harness.ok("/v1/api-keys", &admin, json!({"scopes": scopes}), 201).await["secret"].as_str().expect("secret").to_owned();
        let refused = harness.post("/v1/leases", &key, body.clone()).await;
        assert_eq!((refused.status, refused.code()), (StatusCode::FORBIDDEN, "missing_scope"), "{scopes}");
    }
    let write_only = harness.ok("/v1/api-keys", &admin, json!({"scopes": ["write"]}), 201).await["secret"].as_str().expect("secret").to_owned();
    assert_eq!(harness.get("/v1/leases?end_user_id=u1", &write_only).await.status, StatusCode::FORBIDDEN);
    let refused = harness.post("/v1/leases", &admin, json!({"end_user_id": "u1", "feature_key": "api_calls", "holder": "bad holder", "amount": 5, "ttl_seconds": 60})).await;
    assert_eq!((refused.status, refused.body["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("holder")));
    }
}

// A batch creates, reports and releases for several end users in one call; each
// operation is answered as its own endpoint would (201, 200, or its problem with the
// field named within the batch), a refused one stops nothing; a creation repeating its
// `request_id` answers the same lease, holding nothing more.
store_test! {
    async fn a_batch_answers_each_operation_on_its_own(backend) {
    let harness = Harness::start(backend).await;
    let admin = harness.tenant("acme").await.test;
    harness.catalog(&admin).await;
    let key = proxy_key(&harness, &admin).await;
    harness.grant(&admin, "u1", 100).await;
    harness.grant(&admin, "u2", 10).await;
    let create = |end_user: &str, amount: i64, request_id: &str| {
        json!({"op": "create", "end_user_id": end_user, "feature_key": "api_calls", "holder": "proxy-a",
               "amount": amount, "ttl_seconds": 60, "request_id": request_id})
    };
    let answer = harness
        .ok("/v1/leases/batch", &key, json!({"operations": [
            create("u1", 30, "r1"),
            create("u2", 50, "r2"),
            create("u3", 5, "r3"),
            create("u1", 0, "r4"),
        ]}), 200)
        .await;
    let results = answer["results"].as_array().expect("results");
    assert_eq!(results.len(), 4);
    assert_eq!((results[0]["status"].as_u64(), results[0]["lease"]["amount"].as_i64()), (Some(201), Some(30)));
    assert_eq!(results[1]["lease"]["amount"], 10, "as much as u2 has");
    assert_eq!((results[2]["status"].as_u64(), results[2]["error"]["code"].as_str()), (Some(402), Some("insufficient_balance")));
    assert_eq!(results[3]["status"], 422);
    assert_eq!(results[3]["error"]["field"], "operations[3].amount");
    let first = results[0]["lease"]["id"].as_str().expect("id").to_owned();
    let second = results[1]["lease"]["id"].as_str().expect("id").to_owned();

    // The answer was lost: the same creations again answer the same leases.
    let again = harness
        .ok("/v1/leases/batch", &key, json!({"operations": [create("u1", 30, "r1")]}), 200)
        .await;
    assert_eq!(again["results"][0]["lease"]["id"], first.as_str());
    assert_eq!(again["results"][0]["lease"]["replayed"], true);
    assert_eq!(balance(&harness, &admin).await["held"], 30, "nothing more held");

    // Reports and releases of several end users; a duplicate, a gap and an unknown lease
    // answered on their own.
    let step = |op: &str, lease: &str, sequence: u64, cost: i64| {
        json!({"op": op, "lease_id": lease, "sequence": sequence, "units": cost, "cost": cost, "requests": cost})
    };
    let answer = harness
        .ok("/v1/leases/batch", &key, json!({"operations": [
            step("report", &first, 1, 10),
            step("report", &first, 1, 10),
            step("report", &first, 3, 1),
            step("release", &second, 1, 4),
            step("report", "lse_00000000000000000000000000", 1, 1),
            step("report", "nonsense", 1, 1),
        ]}), 200)
        .await;
    let results = answer["results"].as_array().expect("results");
    assert_eq!((results[0]["status"].as_u64(), results[0]["lease"]["amount"].as_i64()), (Some(200), Some(20)));
    assert_eq!(results[1]["lease"]["replayed"], true);
    assert_eq!((results[2]["status"].as_u64(), results[2]["error"]["expected"].as_u64()), (Some(409), Some(2)));
    assert_eq!(results[3]["lease"]["status"], "released");
    assert_eq!(results[4]["status"], 404);
    assert_eq!(results[5]["status"], 404);
    let u1 = balance(&harness, &admin).await;
    assert_eq!((u1["available"].as_i64(), u1["held"].as_i64()), (Some(70), Some(20)));
    let u2 = harness.get("/v1/credits/balance?end_user_id=u2", &admin).await.body;
    assert_eq!((u2["available"].as_i64(), u2["held"].as_i64()), (Some(6), Some(0)), "4 spent, the rest back");

    // Bounds and scopes.
    let empty = harness.post("/v1/leases/batch", &key, json!({"operations": []})).await;
    assert_eq!((empty.status, empty.body["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("operations")));
    let many: Vec<Value> = (0..501).map(|index| create("u1", 1, &format!("m{index}"))).collect();
    let too_many = harness.post("/v1/leases/batch", &key, json!({"operations": many})).await;
    assert_eq!(too_many.status, StatusCode::UNPROCESSABLE_ENTITY);
    let unknown = harness.post("/v1/leases/batch", &key, json!({"operations": [{"op": "steal", "lease_id": first}]})).await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
    // Values out of the documented range refuse the whole batch, naming the operation's
    // field, before any lease is looked for (one unknown lease here).
    let mut out_of_range = step("release", "lse_00000000000000000000000000", 1, 1);
    out_of_range["ttl_seconds"] = json!(-1);
    let refused = harness
        .post("/v1/leases/batch", &key, json!({"operations": [step("report", &first, 9, 1), out_of_range]}))
        .await;
    assert_eq!(
        (refused.status, refused.body["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("operations[1].ttl_seconds")),
        "{}", refused.body
    );
    let single = harness
        .post(
            "/v1/leases/lse_00000000000000000000000000/report",
            &key,
            json!({"sequence": 1, "units": 2_000_000_000_000_u64}),
        )
        .await;
    assert_eq!(
        (single.status, single.body["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("units")),
        "checked before the (unknown) lease is looked for: {}", single.body
    );
    let reader = harness
        .ok("/v1/api-keys", &admin, json!({"name": "reader", "scopes": ["read"]}), 201)
        .await["secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    let refused = harness.post("/v1/leases/batch", &reader, json!({"operations": [create("u1", 1, "x")]})).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    }
}
