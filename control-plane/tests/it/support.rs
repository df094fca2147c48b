//! A control plane in process: the router over an in-memory (or file) SQLite store with a
//! manual clock, driven through `tower::ServiceExt::oneshot` like a client would.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use control_plane::clock::ManualClock;
use control_plane::config::{Config, DatabaseUrl};
use control_plane::service::AppState;
use control_plane::store::sqlite::SqliteStore;
use http_body_util::BodyExt;
use ledger::Timestamp;
use serde_json::{Value, json};
use tower::ServiceExt;

/// 2026-01-01T00:00:00Z.
pub const T0: Timestamp = Timestamp::from_millis(1_767_225_600_000);

#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The problem `code` of an error answer.
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    pub fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
    }
}

#[derive(Debug, Clone)]
pub struct Harness {
    pub state: AppState,
    pub app: Router,
    pub clock: ManualClock,
}

/// One tenant's keys.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub live: String,
    pub test: String,
}

impl Harness {
    /// A control plane on a private in-memory database.
    pub async fn new() -> Harness {
        Harness::with_config(Config::for_tests()).await
    }

    /// A control plane on a SQLite file (writer and readers, as in production).
    pub async fn on_file(path: &std::path::Path) -> Harness {
        let mut config = Config::for_tests();
        config.database = DatabaseUrl::SqliteFile(path.display().to_string());
        Harness::with_config(config).await
    }

    pub async fn with_config(config: Config) -> Harness {
        let clock = ManualClock::new(T0);
        let store = SqliteStore::open(
            &config.database,
            config.synchronous,
            config.read_connections,
        )
        .await
        .expect("store opens");
        let state = AppState::new(config, Arc::new(store), Arc::new(clock.clone()), None);
        Harness {
            app: control_plane::http::app(state.clone()),
            state,
            clock,
        }
    }

    pub async fn tenant(&self, name: &str) -> Tenant {
        let created = control_plane::http::tenancy::create_tenant(&self.state, name)
            .await
            .expect("tenant");
        Tenant {
            id: created.id,
            live: created.api_keys.live,
            test: created.api_keys.test,
        }
    }

    /// Sends one request; `body` `None` sends nothing.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = match body {
            Some(value) => {
                request = request.header("content-type", "application/json");
                Body::from(value.to_string())
            }
            None => Body::empty(),
        };
        let response = self
            .app
            .clone()
            .oneshot(request.body(body).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, key: &str) -> Answer {
        self.send(Method::GET, path, Some(key), None, &[]).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> Answer {
        self.send(Method::POST, path, Some(key), Some(body), &[])
            .await
    }

    /// Posts and asserts the status.
    pub async fn ok(&self, path: &str, key: &str, body: Value, status: u16) -> Value {
        let answer = self.post(path, key, body).await;
        assert_eq!(
            answer.status.as_u16(),
            status,
            "POST {path}: {}",
            answer.body
        );
        answer.body
    }

    /// The standard catalog: metered `api_calls` (1 credit a unit), `tokens` (3 per
    /// 1000), gated `gpu`, boolean `sso`; a free plan; `pro` (monthly prepaid, 2000 usd,
    /// 1000 credits a month and 45 every 5 hours) with the free plan as fallback.
    pub async fn catalog(&self, key: &str) {
        for feature in [
            json!({"key": "api_calls", "name": "API calls", "type": "metered"}),
            json!({"key": "tokens", "name": "Tokens", "type": "metered", "pricing": {"model": "per_unit", "unit_cost": 3, "per": 1000}}),
            json!({"key": "gpu", "name": "GPU", "type": "metered", "requires_plan": true}),
            json!({"key": "sso", "name": "SSO", "type": "boolean"}),
        ] {
            self.ok("/v1/features", key, feature, 201).await;
        }
        self.ok("/v1/plans", key, json!({"key": "free", "name": "Free", "kind": "base", "features": {"api_calls": {"enabled": true}}}), 201).await;
        self.ok(
            "/v1/plans/free/variants",
            key,
            json!({"key": "monthly", "interval": {"every": 1, "unit": "month"}, "billing_mode": "prepaid", "grants": [{"amount": 10}]}),
            201,
        )
        .await;
        self.ok(
            "/v1/plans",
            key,
            json!({"key": "pro", "name": "Pro", "kind": "base", "features": {"api_calls": {"enabled": true}, "gpu": {"enabled": true}, "sso": {"enabled": true}}}),
            201,
        )
        .await;
        self.ok(
            "/v1/plans/pro/variants",
            key,
            json!({"key": "monthly", "interval": {"every": 1, "unit": "month"}, "billing_mode": "prepaid",
                   "price": {"amount": 2000, "currency": "usd"},
                   "grants": [{"amount": 1000}, {"amount": 45, "every": "5h", "feature_keys": ["gpu"]}]}),
            201,
        )
        .await;
        let answer = self
            .send(
                Method::PATCH,
                "/v1/settings",
                Some(key),
                Some(json!({"free_plan_variant_id": "free/monthly"})),
                &[],
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }

    /// Grants `amount` to `end_user`.
    pub async fn grant(&self, key: &str, end_user: &str, amount: i64) -> Value {
        self.ok(
            "/v1/credits/grants",
            key,
            json!({"end_user_id": end_user, "amount": amount}),
            201,
        )
        .await
    }

    pub async fn available(&self, key: &str, end_user: &str) -> i64 {
        let answer = self
            .get(&format!("/v1/credits/balance?end_user_id={end_user}"), key)
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        answer.body["available"].as_i64().expect("available")
    }

    /// Moves the test clock forward through the API (due work runs before it answers).
    pub async fn advance(&self, key: &str, seconds: i64) -> Value {
        self.ok(
            "/v1/test-clock/advance",
            key,
            json!({"seconds": seconds}),
            200,
        )
        .await
    }
}
