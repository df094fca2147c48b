//! The console through the router, in process: sign-in, sessions, CSRF, environments,
//! and every page answering for an end user with history. The real-browser tests are in
//! `tests/tests/console.rs`.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

use crate::support::{Harness, store_test};

/// A console answer: status, `Location`, `Set-Cookie` and the page.
#[derive(Debug)]
struct Seen {
    status: StatusCode,
    location: Option<String>,
    cookie: Option<String>,
    html: String,
}

async fn console(
    harness: &Harness,
    method: Method,
    path: &str,
    cookie: Option<&str>,
    form: Option<&str>,
) -> Seen {
    console_with(harness, method, path, cookie, form, &[]).await
}

async fn console_with(
    harness: &Harness,
    method: Method,
    path: &str,
    cookie: Option<&str>,
    form: Option<&str>,
    headers: &[(&str, &str)],
) -> Seen {
    let mut request = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    let body = match form {
        Some(form) => {
            request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
            Body::from(form.to_owned())
        }
        None => Body::empty(),
    };
    let response = harness
        .app
        .clone()
        .oneshot(request.body(body).expect("request"))
        .await
        .expect("response");
    let header_text = |name| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let (status, location, cookie) = (
        response.status(),
        header_text(header::LOCATION),
        header_text(header::SET_COOKIE),
    );
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Seen {
        status,
        location,
        cookie,
        html: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Signs in with `key`; answers the session's `Cookie` header value.
async fn sign_in(harness: &Harness, key: &str) -> String {
    let seen = console(
        harness,
        Method::POST,
        "/console/login",
        None,
        Some(&format!("key={}", encode(key))),
    )
    .await;
    assert_eq!(seen.status, StatusCode::SEE_OTHER, "{}", seen.html);
    let cookie = seen.cookie.expect("a session cookie");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    cookie.split(';').next().expect("name=value").to_owned()
}

/// The CSRF token in a page's forms.
fn csrf(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + "name=\"csrf\" value=\"".len();
    html[at..].split('"').next().expect("token").to_owned()
}

// Signed out, every page sends to the sign-in page; a wrong key is refused there; a
// key signs in and sees its environment, marked.
store_test! {
    async fn sessions_sign_in_and_out(backend) {
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    let seen = console(&harness, Method::GET, "/console/end-users", None, None).await;
    assert_eq!((seen.status, seen.location.as_deref()), (StatusCode::SEE_OTHER, Some("/console/login")));
    let seen = console(&harness, Method::POST, "/console/login", None, Some("key=qs_test_not-a-key")).await;
    assert_eq!((seen.status, seen.cookie), (StatusCode::OK, None), "the form again, no session");
    assert!(seen.html.contains("not known"), "{}", seen.html);
    let forged = console(&harness, Method::GET, "/console/end-users", Some("qs_console=e30.AAAA"), None).await;
    assert_eq!(forged.location.as_deref(), Some("/console/login"));

    let cookie = sign_in(&harness, &tenant.test).await;
    let page = console(&harness, Method::GET, "/console/end-users", Some(&cookie), None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.html.contains("class=\"env test\""), "the environment is shown");
    let token = csrf(&page.html);
    // Sign-out needs the session's token; then the same cookie no longer works.
    let refused = console(&harness, Method::POST, "/console/logout", Some(&cookie), Some("csrf=wrong")).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let out = console(&harness, Method::POST, "/console/logout", Some(&cookie), Some(&format!("csrf={token}"))).await;
    assert_eq!(out.location.as_deref(), Some("/console/login"));
    assert!(out.cookie.expect("cleared").contains("Max-Age=0"));
    let after = console(&harness, Method::GET, "/console/end-users", Some(&cookie), None).await;
    assert_eq!(after.location.as_deref(), Some("/console/login"), "a signed-out session is refused");

    // A revoked key ends its sessions.
    let cookie = sign_in(&harness, &tenant.live).await;
    let keys = harness.get("/v1/api-keys", &tenant.live).await;
    let own = keys.body["data"].as_array().expect("keys").iter()
        .find(|key| key["environment"] == "live").expect("the live key")["id"].as_str().expect("id").to_owned();
    let second = harness.ok("/v1/api-keys", &tenant.live, json!({"name": "spare", "scopes": ["*"]}), 201).await;
    let revoked = harness.send(Method::POST, &format!("/v1/api-keys/{own}/revoke"), second["secret"].as_str(), None, &[]).await;
    assert!(revoked.status.is_success(), "{}", revoked.body);
    let after = console(&harness, Method::GET, "/console/end-users", Some(&cookie), None).await;
    assert_eq!(after.location.as_deref(), Some("/console/login"));
    }
}

// Every page answers for an end user with history; a form without the session's CSRF
// token is refused and changes nothing; with it, a grant lands once even when the same
// form is sent twice.
store_test! {
    async fn pages_and_forms(backend) {
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    let key = &tenant.test;
    harness.catalog(key).await;
    harness.ok("/v1/credits/grants", key, json!({"end_user_id": "user-1", "amount": 100}), 201).await;
    let used = harness.send(Method::POST, "/v1/usage", Some(key), Some(json!({"end_user_id": "user-1", "feature_key": "api_calls", "units": 30})), &[("idempotency-key", "u1")]).await;
    assert!(used.status.is_success(), "{}", used.body);
    let cookie = sign_in(&harness, key).await;
    let page = console(&harness, Method::GET, "/console/end-users/user-1", Some(&cookie), None).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.html);
    assert!(page.html.contains("<meter min=\"0\" max=\"100\" value=\"70\""), "the block's bar: {}", page.html);
    assert!(page.html.contains("id=\"balance-chart\""));
    for path in ["/console/end-users", "/console/end-users?q=user", "/console/explain?end_user=user-1&feature=api_calls&units=500",
                 "/console/catalog", "/console/webhooks", "/console/proxies", "/console/end-users/user-1?type=debit",
                 "/console/subscriptions/sub_x/pause"] {
        let seen = console(&harness, Method::GET, path, Some(&cookie), None).await;
        let expected = if path.contains("sub_x") { StatusCode::NOT_FOUND } else { StatusCode::OK };
        assert_eq!(seen.status, expected, "{path}: {}", seen.html);
    }
    let explain = console(&harness, Method::GET, "/console/explain?end_user=user-1&feature=api_calls&units=500", Some(&cookie), None).await;
    assert!(explain.html.contains("insufficient_balance"), "{}", explain.html);
    let listed = console(&harness, Method::GET, "/console/end-users?q=user-", Some(&cookie), None).await;
    assert!(listed.html.contains("/console/end-users/user-1"));
    let none = console(&harness, Method::GET, "/console/end-users?q=nobody", Some(&cookie), None).await;
    assert!(!none.html.contains("/console/end-users/user-1"));

    let token = csrf(&page.html);
    let grant = "amount=5&source=manual&idempotency_key=console-form-1";
    let refused = console(&harness, Method::POST, "/console/end-users/user-1/grant", Some(&cookie), Some(grant)).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(refused.html.contains("CSRF"));
    let form = format!("{grant}&csrf={token}");
    for _ in 0..2 {
        let done = console(&harness, Method::POST, "/console/end-users/user-1/grant", Some(&cookie), Some(&form)).await;
        assert_eq!(done.location.as_deref(), Some("/console/end-users/user-1?notice=granted"), "{}", done.html);
    }
    let balance = harness.get("/v1/credits/balance?end_user_id=user-1", key).await;
    assert_eq!(balance.body["available"], 75, "one grant of 5 for the two sends: {}", balance.body);
    let bad = console(&harness, Method::POST, "/console/end-users/user-1/grant", Some(&cookie), Some(&format!("amount=-3&csrf={token}"))).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "the API's own validation: {}", bad.html);
    assert!(bad.html.contains("amount"), "{}", bad.html);
    }
}

// Pages need the scopes their endpoints need: a read key reads end users but not
// webhooks or proxies, and is not offered them. An end user id with a space and a plus
// links to itself, not to another end user.
store_test! {
    async fn scopes_and_odd_ids(backend) {
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    let reader = harness.ok("/v1/api-keys", &tenant.test, json!({"name": "support", "scopes": ["read"]}), 201).await;
    let cookie = sign_in(&harness, reader["secret"].as_str().expect("secret")).await;
    let list = console(&harness, Method::GET, "/console/end-users", Some(&cookie), None).await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(!list.html.contains("/console/webhooks"), "no link to what it may not see");
    for path in ["/console/webhooks", "/console/proxies"] {
        let seen = console(&harness, Method::GET, path, Some(&cookie), None).await;
        assert_eq!(seen.status, StatusCode::FORBIDDEN, "{path}: {}", seen.html);
    }
    let odd = "john doe+1";
    harness.ok("/v1/credits/grants", &tenant.test, json!({"end_user_id": odd, "amount": 12}), 201).await;
    let list = console(&harness, Method::GET, "/console/end-users", Some(&cookie), None).await;
    assert!(list.html.contains("/console/end-users/john%20doe%2B1"), "{}", list.html);
    let page = console(&harness, Method::GET, "/console/end-users/john%20doe%2B1", Some(&cookie), None).await;
    assert!(page.html.contains("id=\"available\">12<"), "{}", page.html);
    }
}

// A live session never sees test data, and the other way round.
store_test! {
    async fn environments_are_apart(backend) {
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    harness.ok("/v1/credits/grants", &tenant.test, json!({"end_user_id": "only-in-test", "amount": 7}), 201).await;
    harness.ok("/v1/credits/grants", &tenant.live, json!({"end_user_id": "only-in-live", "amount": 9}), 201).await;
    let live = sign_in(&harness, &tenant.live).await;
    let test = sign_in(&harness, &tenant.test).await;
    let live_list = console(&harness, Method::GET, "/console/end-users", Some(&live), None).await.html;
    let test_list = console(&harness, Method::GET, "/console/end-users", Some(&test), None).await.html;
    assert!(live_list.contains("only-in-live") && !live_list.contains("only-in-test"));
    assert!(test_list.contains("only-in-test") && !test_list.contains("only-in-live"));
    let peek = console(&harness, Method::GET, "/console/end-users/only-in-test", Some(&live), None).await.html;
    assert!(peek.contains("Nothing has happened to this end user yet"), "{peek}");
    assert!(live_list.contains("class=\"env live\""));
    }
}

// The chart's figures read by the store (cut from the body's text on PostgreSQL, by
// SQLite's JSON functions) equal the entries read whole, whatever the ids and metadata
// hold.
store_test! {
    async fn entry_points_match_the_entries(backend) {
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    let key = &tenant.test;
    harness.catalog(key).await;
    let user = r#"odd "amount":7, "balance_after":9 user"#;
    harness.ok("/v1/credits/grants", key, json!({"end_user_id": user, "amount": 100, "metadata": {"amount": 5, "balance_after": 1}}), 201).await;
    for units in [3, 5, 20] {
        let used = harness.send(Method::POST, "/v1/usage", Some(key),
            Some(json!({"end_user_id": user, "feature_key": "api_calls", "units": units, "metadata": {"\"amount\":": 1}})),
            &[("idempotency-key", &format!("p{units}"))]).await;
        assert!(used.status.is_success(), "{}", used.body);
    }
    harness.ok("/v1/credits/adjustments", key, json!({"end_user_id": user, "amount": -4, "reason": "\"balance_after\":3"}), 201).await;
    let env = control_plane::store::Env { tenant_id: tenant.id.clone(), environment: control_plane::store::Environment::Test };
    let points = harness.state.store().entry_points(&env, user, 100).await.expect("points");
    let filter = control_plane::store::EntryFilter { end_user_id: Some(user.to_owned()), entry_type: None, from: None, to: None, before_seq: None, limit: 100 };
    let entries = harness.state.store().entries(&env, &filter).await.expect("entries");
    assert!(entries.len() >= 5, "{entries:?}");
    let whole: Vec<_> = entries.iter().map(|(seq, entry)| (*seq, entry.entry_type.clone(), entry.created_at.0, entry.amount, entry.balance_after)).collect();
    let cut: Vec<_> = points.iter().map(|point| (point.seq, point.entry_type.clone(), point.created_at, point.amount, point.balance_after)).collect();
    assert_eq!(cut, whole);
    let two = harness.state.store().entry_points(&env, user, 2).await.expect("points");
    assert_eq!(two.len(), 2, "at most the limit, newest first");
    assert_eq!(two[0].seq, whole[0].0);
    }
}

// The operator signs in to one tenant's environment with the token (a wrong token is
// refused and counted against the address); forms from another site are refused; the
// cookie is `Secure` behind TLS; no page carries a script; the test clock moves from the
// console on a test key and is not offered on a live one.
store_test! {
    async fn operator_origin_tls_and_clock(backend) {
    let mut config = control_plane::config::Config::for_tests();
    config.operator_token = Some(control_plane::config::Secret::new("an-operator-token-for-tests"));
    let harness = Harness::start_with(backend, config).await;
    let tenant = harness.tenant("acme").await;
    let wrong = console(&harness, Method::POST, "/console/login", None,
        Some(&format!("operator_token=wrong-token-entirely&tenant={}&environment=live", tenant.id))).await;
    assert!(wrong.cookie.is_none() && wrong.html.contains("operator token is wrong"), "{}", wrong.html);
    let unknown = console(&harness, Method::POST, "/console/login", None,
        Some("operator_token=an-operator-token-for-tests&tenant=ten_nobody&environment=live")).await;
    assert!(unknown.cookie.is_none() && unknown.html.contains("no tenant"), "{}", unknown.html);
    let operator = console(&harness, Method::POST, "/console/login", None,
        Some(&format!("operator_token=an-operator-token-for-tests&tenant={}&environment=live", tenant.id))).await;
    let cookie = operator.cookie.expect("an operator session");
    let cookie = cookie.split(';').next().expect("cookie");
    let page = console(&harness, Method::GET, "/console/end-users", Some(cookie), None).await;
    assert!(page.html.contains("class=\"env live\"") && page.html.contains("operator"), "{}", page.html);
    assert!(!page.html.contains("/console/clock/advance"), "no test clock on live");

    let cross = console_with(&harness, Method::POST, "/console/login", None, Some(&format!("key={}", encode(&tenant.test))),
        &[("sec-fetch-site", "cross-site")]).await;
    assert_eq!((cross.status, cross.cookie.is_none()), (StatusCode::FORBIDDEN, true));
    let elsewhere = console_with(&harness, Method::POST, "/console/login", None, Some(&format!("key={}", encode(&tenant.test))),
        &[("origin", "https://evil.example"), ("host", "console.example")]).await;
    assert_eq!(elsewhere.status, StatusCode::FORBIDDEN, "an Origin of another host");
    let here = console_with(&harness, Method::POST, "/console/login", None, Some(&format!("key={}", encode(&tenant.test))),
        &[("origin", "https://console.example"), ("host", "console.example")]).await;
    assert!(here.cookie.is_some(), "an Origin of this host signs in");
    let tls = console_with(&harness, Method::POST, "/console/login", None, Some(&format!("key={}", encode(&tenant.test))),
        &[("x-forwarded-proto", "https"), ("sec-fetch-site", "same-origin")]).await;
    assert!(tls.cookie.as_deref().is_some_and(|cookie| cookie.contains("; Secure")), "{tls:?}");

    let test = sign_in(&harness, &tenant.test).await;
    for path in ["/console/end-users", "/console/end-users/someone", "/console/explain", "/console/catalog", "/console/webhooks", "/console/proxies", "/console/login"] {
        let seen = console(&harness, Method::GET, path, Some(&test), None).await;
        assert!(!seen.html.to_lowercase().contains("<script"), "{path} reads without script");
    }
    let page = console(&harness, Method::GET, "/console/end-users", Some(&test), None).await;
    let before = harness.get("/v1/test-clock", &tenant.test).await.body["offset_seconds"].as_i64().expect("offset");
    let moved = console_with(&harness, Method::POST, "/console/clock/advance", Some(&test),
        Some(&format!("seconds=86400&csrf={}", csrf(&page.html))), &[("referer", "http://x/console/webhooks")]).await;
    assert_eq!(moved.location.as_deref(), Some("/console/webhooks"), "{}", moved.html);
    let after = harness.get("/v1/test-clock", &tenant.test).await.body["offset_seconds"].as_i64().expect("offset");
    assert_eq!(after - before, 86_400);
    }
}

// The end user list pages through everyone newest first, without a gap or a repeat, with
// and without a search; a search finds only ids that start with it.
store_test! {
    async fn end_user_pages(backend) {
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    for index in 0..7 {
        harness.ok("/v1/credits/grants", &tenant.test, json!({"end_user_id": format!("ab-{index}"), "amount": 1}), 201).await;
        harness.ok("/v1/credits/grants", &tenant.test, json!({"end_user_id": format!("zz-{index}"), "amount": 1}), 201).await;
    }
    let env = control_plane::store::Env { tenant_id: tenant.id.clone(), environment: control_plane::store::Environment::Test };
    let store = harness.state.store();
    for (prefix, expected) in [(None, 14), (Some("ab-"), 7), (Some("zz-6"), 1), (Some("q"), 0)] {
        let mut seen: Vec<String> = Vec::new();
        let mut after = None;
        loop {
            let page = store.recent_end_users(&env, control_plane::store::EndUserPage { prefix, after: after.as_ref(), limit: 3 }).await.expect("page");
            for row in &page {
                assert!(prefix.is_none_or(|prefix| row.state.end_user_id().as_str().starts_with(prefix)));
                seen.push(row.state.end_user_id().to_string());
            }
            let Some(last) = page.last().filter(|_| page.len() == 3) else { break };
            after = Some(control_plane::store::EndUserCursor { active_minute: last.active_minute, end_user_id: last.state.end_user_id().to_string() });
        }
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!((seen.len(), unique.len()), (expected, expected), "{prefix:?}: {seen:?}");
    }
    }
}

// The list follows activity across minutes: an end user written again in a later minute
// moves to the top (the activity table is kept by triggers on every backend).
store_test! {
    async fn activity_moves_end_users_up(backend) {
    let harness = Harness::start(backend).await;
    let tenant = harness.tenant("acme").await;
    let env = control_plane::store::Env { tenant_id: tenant.id.clone(), environment: control_plane::store::Environment::Test };
    for end_user in ["first", "second", "first"] {
        harness.ok("/v1/credits/grants", &tenant.test, json!({"end_user_id": end_user, "amount": 1}), 201).await;
        harness.clock.advance_ms(120_000);
    }
    let page = harness.state.store().recent_end_users(&env, control_plane::store::EndUserPage { prefix: None, after: None, limit: 10 }).await.expect("page");
    let order: Vec<String> = page.iter().map(|row| row.state.end_user_id().to_string()).collect();
    assert_eq!(order, ["first", "second"]);
    assert!(page[0].active_minute > page[1].active_minute);
    }
}
