//! A control plane in process: the router over a fresh SQLite file or PostgreSQL schema
//! with a manual clock, driven through `tower::ServiceExt::oneshot` like a client would.
//! `store_test!` stamps each test out once per store backend.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use control_plane::clock::ManualClock;
use control_plane::config::{Config, DatabaseUrl};
use control_plane::service::AppState;
use http_body_util::BodyExt;
use ledger::Timestamp;
use serde_json::{Value, json};
use tower::ServiceExt;

/// Stamps each `async fn name(backend) { … }` out as a module with one test per store:
/// `name::sqlite` always, `name::postgres` when `QS_TEST_POSTGRES_URL` is set.
macro_rules! store_test {
    ($(async fn $name:ident($backend:ident) $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn case($backend: &$crate::support::Backend) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                case(&$crate::support::Backend::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(backend) = $crate::support::Backend::postgres() {
                    case(&backend).await;
                }
            }
        }
    )*};
}

pub(crate) use store_test;

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

/// Which store a test runs on. Every store test runs once per backend (see
/// `store_test!`): SQLite always, PostgreSQL when `QS_TEST_POSTGRES_URL` is set.
#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    Postgres { url: String },
}

impl Backend {
    /// PostgreSQL from `QS_TEST_POSTGRES_URL`, or `None` to skip. Under CI the variable
    /// must be set: a CI run that silently skipped PostgreSQL would prove nothing.
    pub fn postgres() -> Option<Backend> {
        match std::env::var("QS_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => Some(Backend::Postgres { url }),
            _ => {
                assert!(
                    std::env::var("CI").is_err(),
                    "CI must set QS_TEST_POSTGRES_URL so the PostgreSQL half of the suite runs"
                );
                None
            }
        }
    }
}

/// Where a test's data lives: a temporary SQLite file, or a fresh PostgreSQL schema.
/// Several harnesses on one `Storage` are several processes on one database.
#[derive(Debug)]
pub struct Storage {
    pub database: DatabaseUrl,
    _directory: Option<tempfile::TempDir>,
    /// The server and schema to drop when the test is done.
    schema: Option<(String, String)>,
}

impl Drop for Storage {
    fn drop(&mut self) {
        let Some((url, schema)) = self.schema.take() else {
            return;
        };
        // Drop runs inside the test's runtime, which cannot block on itself: clean up on a
        // thread of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                if let Ok(admin) = sqlx::PgPool::connect(&url).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS {schema} CASCADE"
                    )))
                    .execute(&admin)
                    .await;
                    admin.close().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

impl Storage {
    pub async fn new(backend: &Backend) -> Storage {
        match backend {
            Backend::Sqlite => {
                let directory = tempfile::tempdir().expect("temp dir");
                let path = directory.path().join("quotastack.db").display().to_string();
                Storage {
                    database: DatabaseUrl::SqliteFile(path),
                    _directory: Some(directory),
                    schema: None,
                }
            }
            Backend::Postgres { url } => {
                let schema = format!("qs_t_{:016x}", rand::random::<u64>());
                let admin = sqlx::PgPool::connect(url)
                    .await
                    .expect("QS_TEST_POSTGRES_URL answers");
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .execute(&admin)
                    .await
                    .expect("create schema");
                admin.close().await;
                let separator = if url.contains('?') { '&' } else { '?' };
                let scoped = format!("{url}{separator}options=-c%20search_path%3D{schema}");
                Storage {
                    database: DatabaseUrl::Postgres(scoped),
                    _directory: None,
                    schema: Some((url.clone(), schema)),
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Harness {
    pub state: AppState,
    pub app: Router,
    pub clock: ManualClock,
    /// Keeps the temporary database alive as long as any clone of the harness.
    _storage: Option<Arc<Storage>>,
}

/// One tenant's keys.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub live: String,
    pub test: String,
}

impl Harness {
    /// A control plane on its own fresh database.
    pub async fn start(backend: &Backend) -> Harness {
        Harness::start_with(backend, Config::for_tests()).await
    }

    /// The same, with a configuration of the test's own.
    pub async fn start_with(backend: &Backend, config: Config) -> Harness {
        let storage = Arc::new(Storage::new(backend).await);
        let mut harness = Harness::on_with(&storage, config).await;
        harness._storage = Some(storage);
        harness
    }

    /// A control plane on `storage` (call twice for two processes on one database).
    pub async fn on(storage: &Storage) -> Harness {
        Harness::on_with(storage, Config::for_tests()).await
    }

    /// The same, with a configuration of the test's own.
    pub async fn on_with(storage: &Storage, mut config: Config) -> Harness {
        config.database = storage.database.clone();
        // Tests need no power-cut durability; fsync on every commit only slows them.
        config.synchronous = control_plane::config::Synchronous::Normal;
        let clock = ManualClock::new(T0);
        let store = control_plane::open_store(&config)
            .await
            .expect("store opens");
        let state = AppState::new(config, store, Arc::new(clock.clone()), None);
        Harness {
            app: control_plane::http::app_with(
                state.clone(),
                control_plane::console::router(&state),
            ),
            state,
            clock,
            _storage: None,
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

/// Polls `condition` until it holds, failing after a generous deadline.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Polls `attempt` until it gives a value, failing after a generous deadline.
pub async fn eventually_value<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The NATS server the feed tests publish to, from `QS_TEST_NATS_URL`, or `None` to skip
/// them. Under CI the variable must be set, like PostgreSQL's.
pub fn nats_url() -> Option<String> {
    match std::env::var("QS_TEST_NATS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("CI").is_err(),
                "CI must set QS_TEST_NATS_URL so the NATS half of the feed tests runs"
            );
            None
        }
    }
}

/// A control plane's NATS publisher, running until dropped.
#[derive(Debug)]
pub struct Publishing {
    _stop: tokio::sync::watch::Sender<bool>,
    pub client: async_nats::Client,
}

impl Harness {
    /// Publishes this control plane's change feed to NATS, as `sync.nats_url` makes the
    /// server do.
    pub async fn publish_to_nats(&self, url: &str) -> Publishing {
        let client = async_nats::connect(url).await.expect("NATS answers");
        self.state.attach_nats(client.clone());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(control_plane::nats::run(self.state.clone(), stopped));
        Publishing {
            _stop: stop,
            client,
        }
    }
}

/// Deletes a tenant's feed streams from NATS (tests leave nothing behind).
pub async fn delete_streams(client: &async_nats::Client, tenant: &Tenant) {
    let context = async_nats::jetstream::new(client.clone());
    for environment in [
        control_plane::store::Environment::Live,
        control_plane::store::Environment::Test,
    ] {
        let env = control_plane::store::Env {
            tenant_id: tenant.id.clone(),
            environment,
        };
        let _ = context
            .delete_stream(control_plane::nats::feed_names(&env).stream)
            .await;
    }
}
