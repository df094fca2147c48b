//! `client`: a typed Rust client for QuotaStack's REST API.
//!
//! Every endpoint of the control plane has a method here, taking and returning the wire
//! types of [`protocol`]. Two things make it safe to use from a billing path:
//!
//! - **Idempotency keys are automatic.** Every mutating request carries an
//!   `Idempotency-Key`: the one you pass with [`Client::with_key`], or a fresh one the
//!   client makes. The same key is sent on every retry of that call, so a retry never
//!   applies twice.
//! - **Retries with backoff.** Connection failures, timeouts, `429` and `5xx` answers are
//!   retried with exponential backoff and jitter up to [`Retry::attempts`] times; any
//!   other answer is returned at once. A refusal is an [`Error::Api`] carrying the
//!   server's [`Problem`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), client::Error> {
//! let qs = client::Client::new("http://127.0.0.1:8080", "qs_test_...")?;
//! let check = qs.check("user_42", "chat_messages", 1).await?;
//! if check.allowed {
//!     let usage = protocol::RecordUsage {
//!         end_user_id: "user_42".into(),
//!         feature_key: "chat_messages".into(),
//!         units: 1,
//!         timestamp: None,
//!         metadata: None,
//!         strict: false,
//!         idempotency_key: None,
//!     };
//!     // Retried safely: the message id is the idempotency key.
//!     qs.with_key("msg_01HV...").record_usage(&usage).await?;
//! }
//! # Ok(()) }
//! ```

#[cfg(feature = "nats")]
pub mod nats;

use std::time::Duration;

use protocol::frames::{Frame, FrameReader};
use protocol::{
    AdvanceTestClock, AdvancedTestClock, ApiKey, Balance, Block, CancelSubscription,
    ChangeSubscription, CommitReservation, CreateAdjustment, CreateApiKey, CreateFeature,
    CreateGrant, CreateLease, CreatePlan, CreateReservation, CreateSubscription, CreateTenant,
    CreateVariant, CreateWebhookEndpoint, EntitlementCheck, Event, ExtendReservation, Feature,
    Lease, LeaseBatch, LeaseBatchAnswer, LedgerEntry, Page, Plan, Problem, RecordUsage,
    RenewSubscription, ReportLease, Reservation, Settings, Subscription, SyncRecord, TenantCreated,
    TestClock, UpdateSettings, UpdateWebhookEndpoint, UsageBatch, UsageBatchRecorded,
    UsageRecorded, Variant, VoidBlock, WebhookEndpoint,
};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use url::Url;

/// What went wrong with a call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The control plane answered with a problem (a refusal or a validation error).
    #[error("{status}: {} ({})", problem.detail, problem.code)]
    Api {
        status: StatusCode,
        problem: Box<Problem>,
    },
    /// The control plane could not be reached, or did not answer in time (after retries).
    #[error("control plane unreachable: {0}")]
    Transport(#[source] reqwest::Error),
    /// An answer that is not what the API promises.
    #[error("unexpected answer: {0}")]
    Decode(String),
    /// A base URL or argument the client cannot use.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl Error {
    /// The problem's stable code, when the control plane answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { problem, .. } => Some(&problem.code),
            _ => None,
        }
    }

    /// The HTTP status, when the control plane answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the control plane could not be reached or failed on its side (the call may
    /// be retried later with the same idempotency key).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Transport(_) => true,
            Error::Api { status, .. } => status.is_server_error(),
            Error::Decode(_) | Error::Invalid(_) => false,
        }
    }
}

/// How calls are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Tries in all, the first included (1 = no retry).
    pub attempts: u32,
    /// The first backoff; doubled after each try, with up to 50 % jitter.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl Retry {
    /// The backoff before try `attempt` (1-based; the first retry is attempt 2).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(2).min(20);
        let base = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.max_backoff);
        let jitter_ms = u64::try_from(base.as_millis() / 2).unwrap_or(u64::MAX);
        let jitter = if jitter_ms == 0 {
            0
        } else {
            rand::random_range(0..=jitter_ms)
        };
        base.saturating_add(Duration::from_millis(jitter))
    }
}

/// A QuotaStack API client: cheap to clone (one connection pool). Its `Debug` shows the
/// key's recognisable prefix only (see [`redacted_key`]).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    key: String,
    retry: Retry,
    idempotency_key: Option<String>,
    /// Whether sync snapshots and streams are asked for in binary frames.
    sync_frames: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("key", &redacted_key(&self.key))
            .field("retry", &self.retry)
            .field("idempotency_key", &self.idempotency_key)
            .finish_non_exhaustive()
    }
}

/// How many leading characters of a key identify it without revealing it: the same
/// `prefix` the control plane shows in its key listings (`qs_test_` and four more).
const KEY_PREFIX_LEN: usize = 12;

/// An API key as logs and `Debug` may show it: its first [`KEY_PREFIX_LEN`] characters
/// and an ellipsis (`qs_test_abcd…`) for a key long enough that they reveal little (a real
/// key carries 32 random bytes), `<redacted>` for anything shorter (an operator token, a
/// test key).
pub fn redacted_key(key: &str) -> String {
    if key.chars().count() >= 32 {
        let prefix: String = key.chars().take(KEY_PREFIX_LEN).collect();
        format!("{prefix}…")
    } else {
        "<redacted>".to_owned()
    }
}

/// Query parameters of the list endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListOptions {
    pub end_user_id: Option<String>,
    pub cursor: Option<String>,
    pub limit: Option<u32>,
}

/// Query parameters of `GET /v1/ledger`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerOptions {
    pub end_user_id: Option<String>,
    /// `grant`, `debit`, `hold`, `commit`, `release`, `expire`, `void`, `adjust`, `settle`.
    pub entry_type: Option<String>,
    /// RFC 3339.
    pub from: Option<String>,
    pub to: Option<String>,
    pub cursor: Option<String>,
    pub limit: Option<u32>,
}

impl Client {
    /// A client for the control plane at `base_url` (e.g. `http://127.0.0.1:8080`) with an
    /// API key (`qs_live_…` or `qs_test_…`; the key picks the environment).
    ///
    /// # Errors
    /// `Invalid` for a base URL that is not http(s).
    pub fn new(base_url: &str, api_key: &str) -> Result<Client, Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(Error::Transport)?;
        Client::with_http(http, base_url, api_key)
    }

    /// A client on your own `reqwest::Client` (timeouts, proxies, TLS roots).
    ///
    /// # Errors
    /// `Invalid` for a base URL that is not http(s).
    pub fn with_http(
        http: reqwest::Client,
        base_url: &str,
        api_key: &str,
    ) -> Result<Client, Error> {
        let mut base = Url::parse(base_url)
            .map_err(|error| Error::Invalid(format!("base URL {base_url:?}: {error}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(Error::Invalid(format!(
                "base URL {base_url:?}: must be http or https"
            )));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        Ok(Client {
            http,
            base,
            key: api_key.to_owned(),
            retry: Retry::default(),
            idempotency_key: None,
            sync_frames: false,
        })
    }

    /// The same client with another retry policy.
    #[must_use]
    pub fn retry(mut self, retry: Retry) -> Client {
        self.retry = retry;
        self
    }

    /// The same client, asking for sync snapshots and streams in binary frames
    /// (`protocol::frames`) rather than NDJSON (still accepted, and read as the answer's
    /// Content-Type says). Off by default, as NDJSON is what a person can read; the proxy
    /// turns it on (in P2/P3 frames measured the same as NDJSON over HTTP, at about a
    /// seventh of the bytes: docs/BENCHMARKS.md).
    #[must_use]
    pub fn sync_frames(mut self, on: bool) -> Client {
        self.sync_frames = on;
        self
    }

    /// The same client, sending `key` as the `Idempotency-Key` of the next mutating calls
    /// made through the returned value (use your own event or request id).
    #[must_use]
    pub fn with_key(&self, key: &str) -> Client {
        let mut client = self.clone();
        client.idempotency_key = Some(key.to_owned());
        client
    }

    /// The base URL.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    fn url(&self, path: &str, query: &[(&str, Option<String>)]) -> Result<Url, Error> {
        let mut url = self
            .base
            .join(path.trim_start_matches('/'))
            .map_err(|error| Error::Invalid(format!("path {path:?}: {error}")))?;
        if query.iter().any(|(_, value)| value.is_some()) {
            let mut pairs = url.query_pairs_mut();
            for (name, value) in query {
                if let Some(value) = value {
                    pairs.append_pair(name, value);
                }
            }
        }
        Ok(url)
    }

    /// Sends a request with retries and returns the raw response of the last try.
    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response, Error> {
        let mutating = method != Method::GET;
        let key = mutating.then(|| {
            self.idempotency_key
                .clone()
                .unwrap_or_else(|| format!("qsc_{}", ulid::Ulid::new()))
        });
        let mut attempt = 1u32;
        loop {
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .bearer_auth(&self.key);
            if let Some(key) = &key {
                request = request.header("idempotency-key", key);
            }
            if let Some(body) = &body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            let outcome = request.send().await;
            let retryable = match &outcome {
                Ok(response) => {
                    let status = response.status();
                    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
                }
                Err(error) => error.is_connect() || error.is_timeout() || error.is_request(),
            };
            if !retryable || attempt >= self.retry.attempts {
                return outcome.map_err(Error::Transport);
            }
            attempt = attempt.saturating_add(1);
            let wait = match &outcome {
                Ok(response) => {
                    retry_after(response).unwrap_or_else(|| self.retry.backoff(attempt))
                }
                Err(_) => self.retry.backoff(attempt),
            };
            tracing::debug!(%url, attempt, ?wait, "retrying a control-plane call");
            tokio::time::sleep(wait).await;
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, Option<String>)],
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, Error> {
        let url = self.url(path, query)?;
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|error| Error::Invalid(error.to_string()))?;
        let response = self.send(method, url, body).await?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(Error::Transport)?;
        if !status.is_success() {
            return Err(problem(status, &bytes));
        }
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes)
            .map_err(|error| Error::Decode(format!("{status} body: {error}")))
    }

    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, Option<String>)],
    ) -> Result<T, Error> {
        self.call(Method::GET, path, query, None::<&()>).await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<T, Error> {
        self.call(Method::POST, path, &[], Some(body)).await
    }

    /// A POST without a body (actions such as release, pause, revoke).
    async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.call(Method::POST, path, &[], None::<&()>).await
    }

    // --- tenancy and keys ---

    /// `POST /v1/operator/tenants` (the client's key is the operator token).
    pub async fn create_tenant(&self, body: &CreateTenant) -> Result<TenantCreated, Error> {
        self.post("/v1/operator/tenants", body).await
    }

    pub async fn create_api_key(&self, body: &CreateApiKey) -> Result<ApiKey, Error> {
        self.post("/v1/api-keys", body).await
    }

    pub async fn list_api_keys(&self) -> Result<Page<ApiKey>, Error> {
        self.get("/v1/api-keys", &[]).await
    }

    pub async fn revoke_api_key(&self, id: &str) -> Result<ApiKey, Error> {
        self.post_empty(&format!("/v1/api-keys/{}/revoke", segment(id)?))
            .await
    }

    // --- catalog ---

    pub async fn create_feature(&self, body: &CreateFeature) -> Result<Feature, Error> {
        self.post("/v1/features", body).await
    }

    pub async fn list_features(&self, options: &ListOptions) -> Result<Page<Feature>, Error> {
        self.get("/v1/features", &page_query(options)).await
    }

    pub async fn get_feature(&self, id_or_key: &str) -> Result<Feature, Error> {
        self.get(&format!("/v1/features/{}", segment(id_or_key)?), &[])
            .await
    }

    /// Replaces a feature's name, pricing and plan gating (its key and type stay).
    pub async fn replace_feature(
        &self,
        id_or_key: &str,
        body: &CreateFeature,
    ) -> Result<Feature, Error> {
        let path = format!("/v1/features/{}", segment(id_or_key)?);
        self.call(Method::PUT, &path, &[], Some(body)).await
    }

    pub async fn create_plan(&self, body: &CreatePlan) -> Result<Plan, Error> {
        self.post("/v1/plans", body).await
    }

    pub async fn list_plans(&self, options: &ListOptions) -> Result<Page<Plan>, Error> {
        self.get("/v1/plans", &page_query(options)).await
    }

    pub async fn get_plan(&self, id_or_key: &str) -> Result<Plan, Error> {
        self.get(&format!("/v1/plans/{}", segment(id_or_key)?), &[])
            .await
    }

    /// Replaces a plan's name, features and overage policy (its key and kind stay).
    pub async fn replace_plan(&self, id_or_key: &str, body: &CreatePlan) -> Result<Plan, Error> {
        let path = format!("/v1/plans/{}", segment(id_or_key)?);
        self.call(Method::PUT, &path, &[], Some(body)).await
    }

    pub async fn create_variant(
        &self,
        plan_id_or_key: &str,
        body: &CreateVariant,
    ) -> Result<Variant, Error> {
        self.post(
            &format!("/v1/plans/{}/variants", segment(plan_id_or_key)?),
            body,
        )
        .await
    }

    pub async fn archive_variant(&self, plan: &str, variant: &str) -> Result<Variant, Error> {
        self.post_empty(&format!(
            "/v1/plans/{}/variants/{}/archive",
            segment(plan)?,
            segment(variant)?
        ))
        .await
    }

    pub async fn get_settings(&self) -> Result<Settings, Error> {
        self.get("/v1/settings", &[]).await
    }

    pub async fn update_settings(&self, body: &UpdateSettings) -> Result<Settings, Error> {
        self.call(Method::PATCH, "/v1/settings", &[], Some(body))
            .await
    }

    // --- credits ---

    pub async fn grant(&self, body: &CreateGrant) -> Result<Block, Error> {
        self.post("/v1/credits/grants", body).await
    }

    pub async fn void_block(&self, block_id: &str, body: &VoidBlock) -> Result<Block, Error> {
        self.post(
            &format!("/v1/credits/blocks/{}/void", segment(block_id)?),
            body,
        )
        .await
    }

    pub async fn adjust(&self, body: &CreateAdjustment) -> Result<protocol::Adjustment, Error> {
        self.post("/v1/credits/adjustments", body).await
    }

    pub async fn balance(
        &self,
        end_user_id: &str,
        feature_key: Option<&str>,
    ) -> Result<Balance, Error> {
        self.get(
            "/v1/credits/balance",
            &[
                ("end_user_id", Some(end_user_id.to_owned())),
                ("feature_key", feature_key.map(str::to_owned)),
            ],
        )
        .await
    }

    pub async fn ledger(&self, options: &LedgerOptions) -> Result<Page<LedgerEntry>, Error> {
        self.get(
            "/v1/ledger",
            &[
                ("end_user_id", options.end_user_id.clone()),
                ("type", options.entry_type.clone()),
                ("from", options.from.clone()),
                ("to", options.to.clone()),
                ("cursor", options.cursor.clone()),
                ("limit", options.limit.map(|limit| limit.to_string())),
            ],
        )
        .await
    }

    // --- usage and entitlements ---

    pub async fn record_usage(&self, body: &RecordUsage) -> Result<UsageRecorded, Error> {
        self.post("/v1/usage", body).await
    }

    /// `POST /v1/usage/batch`: give each event its own `idempotency_key`.
    pub async fn record_usage_batch(&self, body: &UsageBatch) -> Result<UsageBatchRecorded, Error> {
        self.post("/v1/usage/batch", body).await
    }

    pub async fn check(
        &self,
        end_user_id: &str,
        feature_key: &str,
        units: u64,
    ) -> Result<EntitlementCheck, Error> {
        self.get(
            "/v1/entitlements/check",
            &[
                ("end_user_id", Some(end_user_id.to_owned())),
                ("feature_key", Some(feature_key.to_owned())),
                ("units", Some(units.to_string())),
            ],
        )
        .await
    }

    pub async fn entitlements(&self, end_user_id: &str) -> Result<Page<EntitlementCheck>, Error> {
        self.get(
            "/v1/entitlements",
            &[("end_user_id", Some(end_user_id.to_owned()))],
        )
        .await
    }

    // --- reservations ---

    pub async fn reserve(&self, body: &CreateReservation) -> Result<Reservation, Error> {
        self.post("/v1/reservations", body).await
    }

    pub async fn get_reservation(&self, id: &str) -> Result<Reservation, Error> {
        self.get(&format!("/v1/reservations/{}", segment(id)?), &[])
            .await
    }

    pub async fn commit_reservation(
        &self,
        id: &str,
        body: &CommitReservation,
    ) -> Result<Reservation, Error> {
        self.post(&format!("/v1/reservations/{}/commit", segment(id)?), body)
            .await
    }

    pub async fn release_reservation(&self, id: &str) -> Result<Reservation, Error> {
        self.post_empty(&format!("/v1/reservations/{}/release", segment(id)?))
            .await
    }

    // --- leases (SPEC 12.1) ---

    /// Holds as much of `amount` as is available for a holder (a proxy).
    pub async fn create_lease(&self, body: &CreateLease) -> Result<Lease, Error> {
        self.post("/v1/leases", body).await
    }

    pub async fn get_lease(&self, id: &str) -> Result<Lease, Error> {
        self.get(&format!("/v1/leases/{}", segment(id)?), &[]).await
    }

    /// Leases of an end user and/or a holder (`status: Some("active")` for active ones).
    pub async fn list_leases(
        &self,
        end_user_id: Option<&str>,
        holder: Option<&str>,
        status: Option<&str>,
    ) -> Result<Page<Lease>, Error> {
        self.get(
            "/v1/leases",
            &[
                ("end_user_id", end_user_id.map(str::to_owned)),
                ("holder", holder.map(str::to_owned)),
                ("status", status.map(str::to_owned)),
                ("limit", Some("500".to_owned())),
            ],
        )
        .await
    }

    /// What the holder spent since its last report (exactly once by `sequence`).
    pub async fn report_lease(&self, id: &str, body: &ReportLease) -> Result<Lease, Error> {
        self.post(&format!("/v1/leases/{}/report", segment(id)?), body)
            .await
    }

    /// A final report, then the rest of the hold goes back.
    pub async fn release_lease(&self, id: &str, body: &ReportLease) -> Result<Lease, Error> {
        self.post(&format!("/v1/leases/{}/release", segment(id)?), body)
            .await
    }

    /// Creations, reports and releases together, each answered on its own (a refused
    /// one stops nothing): one round trip and one transaction for all of them.
    pub async fn lease_batch(&self, body: &LeaseBatch) -> Result<LeaseBatchAnswer, Error> {
        self.post("/v1/leases/batch", body).await
    }

    pub async fn extend_reservation(
        &self,
        id: &str,
        body: &ExtendReservation,
    ) -> Result<Reservation, Error> {
        self.post(&format!("/v1/reservations/{}/extend", segment(id)?), body)
            .await
    }

    // --- subscriptions and the test clock ---

    pub async fn subscribe(&self, body: &CreateSubscription) -> Result<Subscription, Error> {
        self.post("/v1/subscriptions", body).await
    }

    pub async fn get_subscription(&self, id: &str) -> Result<Subscription, Error> {
        self.get(&format!("/v1/subscriptions/{}", segment(id)?), &[])
            .await
    }

    pub async fn list_subscriptions(
        &self,
        options: &ListOptions,
    ) -> Result<Page<Subscription>, Error> {
        self.get("/v1/subscriptions", &page_query(options)).await
    }

    pub async fn renew_subscription(
        &self,
        id: &str,
        body: &RenewSubscription,
    ) -> Result<Subscription, Error> {
        self.post(&format!("/v1/subscriptions/{}/renew", segment(id)?), body)
            .await
    }

    pub async fn pause_subscription(&self, id: &str) -> Result<Subscription, Error> {
        self.post_empty(&format!("/v1/subscriptions/{}/pause", segment(id)?))
            .await
    }

    pub async fn resume_subscription(&self, id: &str) -> Result<Subscription, Error> {
        self.post_empty(&format!("/v1/subscriptions/{}/resume", segment(id)?))
            .await
    }

    pub async fn cancel_subscription(
        &self,
        id: &str,
        body: &CancelSubscription,
    ) -> Result<Subscription, Error> {
        self.post(&format!("/v1/subscriptions/{}/cancel", segment(id)?), body)
            .await
    }

    pub async fn change_subscription(
        &self,
        id: &str,
        body: &ChangeSubscription,
    ) -> Result<Subscription, Error> {
        self.post(&format!("/v1/subscriptions/{}/change", segment(id)?), body)
            .await
    }

    pub async fn test_clock(&self) -> Result<TestClock, Error> {
        self.get("/v1/test-clock", &[]).await
    }

    /// Moves the test clock; the answer says whether every job due by then ran.
    pub async fn advance_test_clock(
        &self,
        body: &AdvanceTestClock,
    ) -> Result<AdvancedTestClock, Error> {
        self.post("/v1/test-clock/advance", body).await
    }

    // --- events and webhooks ---

    pub async fn list_events(&self, options: &ListOptions) -> Result<Page<Event>, Error> {
        self.get(
            "/v1/events",
            &[
                ("cursor", options.cursor.clone()),
                ("limit", options.limit.map(|limit| limit.to_string())),
            ],
        )
        .await
    }

    pub async fn get_event(&self, id: &str) -> Result<Event, Error> {
        self.get(&format!("/v1/events/{}", segment(id)?), &[]).await
    }

    pub async fn redeliver_event(&self, id: &str) -> Result<Event, Error> {
        self.post_empty(&format!("/v1/events/{}/redeliver", segment(id)?))
            .await
    }

    pub async fn create_webhook_endpoint(
        &self,
        body: &CreateWebhookEndpoint,
    ) -> Result<WebhookEndpoint, Error> {
        self.post("/v1/webhook-endpoints", body).await
    }

    pub async fn list_webhook_endpoints(&self) -> Result<Page<WebhookEndpoint>, Error> {
        self.get("/v1/webhook-endpoints", &[]).await
    }

    pub async fn get_webhook_endpoint(&self, id: &str) -> Result<WebhookEndpoint, Error> {
        self.get(&format!("/v1/webhook-endpoints/{}", segment(id)?), &[])
            .await
    }

    pub async fn update_webhook_endpoint(
        &self,
        id: &str,
        body: &UpdateWebhookEndpoint,
    ) -> Result<WebhookEndpoint, Error> {
        self.call(
            Method::PATCH,
            &format!("/v1/webhook-endpoints/{}", segment(id)?),
            &[],
            Some(body),
        )
        .await
    }

    pub async fn delete_webhook_endpoint(&self, id: &str) -> Result<(), Error> {
        let _: Option<serde_json::Value> = self
            .call(
                Method::DELETE,
                &format!("/v1/webhook-endpoints/{}", segment(id)?),
                &[],
                None::<&()>,
            )
            .await?;
        Ok(())
    }

    pub async fn test_webhook_endpoint(&self, id: &str) -> Result<Event, Error> {
        self.post_empty(&format!("/v1/webhook-endpoints/{}/test", segment(id)?))
            .await
    }

    // --- replication ---

    /// `GET /v1/sync/snapshot`: the environment's state, record by record.
    pub async fn sync_snapshot(&self) -> Result<SyncLines, Error> {
        self.lines(self.url("/v1/sync/snapshot", &[])?).await
    }

    /// `GET /v1/sync/stream?cursor=`: every change after `cursor`, as long as the
    /// connection stays open. A `410` (`cursor_expired`) means: take a new snapshot.
    pub async fn sync_stream(&self, cursor: i64) -> Result<SyncLines, Error> {
        self.lines(self.url("/v1/sync/stream", &[("cursor", Some(cursor.to_string()))])?)
            .await
    }

    /// `GET /v1/sync/nats`: where the environment's change feed is published on NATS
    /// JetStream; a `404` (`nats_not_configured`) where it is not (see [`nats`] with the
    /// `nats` feature).
    pub async fn sync_nats(&self) -> Result<protocol::NatsFeed, Error> {
        self.get("/v1/sync/nats", &[]).await
    }

    async fn lines(&self, url: Url) -> Result<SyncLines, Error> {
        // No overall timeout: a stream stays open; heartbeats show it is alive. Frames where
        // asked for; whatever the control plane answers is read as its Content-Type says.
        let accept = if self.sync_frames {
            format!("{}, {}", protocol::frames::FEED_FRAMES, protocol::NDJSON)
        } else {
            protocol::NDJSON.to_owned()
        };
        let response = self
            .http
            .get(url)
            .bearer_auth(&self.key)
            .header(reqwest::header::ACCEPT, accept)
            .timeout(Duration::from_secs(365 * 24 * 3600))
            .send()
            .await
            .map_err(Error::Transport)?;
        let status = response.status();
        if !status.is_success() {
            let bytes = response.bytes().await.map_err(Error::Transport)?;
            return Err(problem(status, &bytes));
        }
        let framed = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with(protocol::frames::FEED_FRAMES));
        Ok(SyncLines {
            response,
            buffer: Vec::new(),
            frames: framed.then(FrameReader::new),
        })
    }
}

/// The records of a snapshot or stream, read as they arrive (binary frames, or NDJSON
/// from a control plane that sends no frames).
#[derive(Debug)]
pub struct SyncLines {
    response: reqwest::Response,
    buffer: Vec<u8>,
    frames: Option<FrameReader>,
}

impl SyncLines {
    /// The next record, or `None` when the server closed the body.
    ///
    /// # Errors
    /// `Transport` when the connection broke; `Decode` for bytes that are not a record.
    pub async fn next(&mut self) -> Result<Option<SyncRecord>, Error> {
        match self.next_frame().await? {
            Some(frame) => frame
                .into_record()
                .map(Some)
                .map_err(|error| Error::Decode(error.to_string())),
            None => Ok(None),
        }
    }

    /// The next record with an end user's state still encoded (decode it with
    /// `EndUserFrame::parts` only if it is newer than the one held), or `None` when the
    /// server closed the body.
    ///
    /// # Errors
    /// As [`SyncLines::next`].
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, Error> {
        loop {
            if let Some(reader) = &mut self.frames {
                if let Some(frame) = reader
                    .next_frame()
                    .map_err(|error| Error::Decode(error.to_string()))?
                {
                    return Ok(Some(frame));
                }
            } else if let Some(position) = self.buffer.iter().position(|byte| *byte == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=position).collect();
                let text = line.strip_suffix(b"\n").unwrap_or(&line);
                if text.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(text)
                    .map(|record: SyncRecord| Some(Frame::from(record)))
                    .map_err(|error| Error::Decode(format!("sync record: {error}")));
            }
            match self.response.chunk().await.map_err(Error::Transport)? {
                Some(chunk) => match &mut self.frames {
                    Some(reader) => reader.push(&chunk),
                    None => self.buffer.extend_from_slice(&chunk),
                },
                None => {
                    if self
                        .frames
                        .as_ref()
                        .is_some_and(|reader| !reader.is_empty())
                    {
                        return Err(Error::Decode("the body ended inside a frame".into()));
                    }
                    return Ok(None);
                }
            }
        }
    }
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let seconds: u64 = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds.min(60)))
}

fn problem(status: StatusCode, bytes: &[u8]) -> Error {
    match serde_json::from_slice::<Problem>(bytes) {
        Ok(problem) => Error::Api {
            status,
            problem: Box::new(problem),
        },
        Err(_) => Error::Api {
            status,
            problem: Box::new(Problem::new(
                status.as_u16(),
                "unexpected_response",
                status.canonical_reason().unwrap_or("Error"),
                String::from_utf8_lossy(bytes)
                    .chars()
                    .take(500)
                    .collect::<String>(),
            )),
        },
    }
}

fn page_query(options: &ListOptions) -> Vec<(&'static str, Option<String>)> {
    vec![
        ("end_user_id", options.end_user_id.clone()),
        ("cursor", options.cursor.clone()),
        ("limit", options.limit.map(|limit| limit.to_string())),
    ]
}

/// A path segment: ids and keys never contain `/`, `?` or `#`; refuse rather than
/// address another endpoint.
fn segment(text: &str) -> Result<&str, Error> {
    if text.is_empty() || text.contains(['/', '?', '#', '%']) || text.contains("..") {
        return Err(Error::Invalid(format!(
            "{text:?} is not an id or key (no '/', '?', '#', '%' or '..')"
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_bounded() {
        let retry = Retry {
            attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        let second = retry.backoff(2);
        assert!(second >= Duration::from_millis(100) && second <= Duration::from_millis(150));
        let fourth = retry.backoff(4);
        assert!(fourth >= Duration::from_millis(400) && fourth <= Duration::from_millis(600));
        let late = retry.backoff(30);
        assert!(late >= Duration::from_secs(1) && late <= Duration::from_millis(1500));
    }

    #[test]
    fn paths_refuse_segments_that_would_change_the_endpoint() {
        assert!(segment("res_01H").is_ok());
        for bad in ["", "a/b", "x?y", "a#", "..", "%2F"] {
            assert!(segment(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_never_prints_the_key() {
        let key = "qs_test_0123456789abcdefghijklmnopqrstuvwxyzABCDEF";
        let client = Client::new("http://host:1", key).expect("client");
        let printed = format!("{client:?}");
        assert!(!printed.contains(key), "{printed}");
        assert!(printed.contains("qs_test_0123…"), "{printed}");
        let keyed = client.with_key("evt_1");
        assert!(!format!("{keyed:?}").contains(key));
        // A short key (an operator token, a test key) shows nothing of itself.
        let short = Client::new("http://host:1", "operator-token-1").expect("client");
        let printed = format!("{short:?}");
        assert!(
            !printed.contains("operator-token-1") && printed.contains("<redacted>"),
            "{printed}"
        );
    }

    #[test]
    fn base_url_keeps_its_path_prefix() {
        let client = Client::new("http://host:1/prefix", "k").expect("client");
        let url = client
            .url(
                "/v1/features",
                &[("limit", Some("5".into())), ("cursor", None)],
            )
            .expect("url");
        assert_eq!(url.as_str(), "http://host:1/prefix/v1/features?limit=5");
        assert!(Client::new("ftp://host", "k").is_err());
    }
}
