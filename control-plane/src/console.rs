//! The console: server-rendered pages at `/console` for the people who run billing
//! (docs/console.md). Reads come from the service and the store under the signed-in
//! key's environment; every change goes through the API's own handlers, in process
//! (`api`), so a console action is validated, authorised, idempotent and audited exactly
//! as the same API call.
//!
//! No script runs: every page reads without JavaScript, actions are plain forms (each
//! with the session's CSRF token), charts are SVG drawn here.

mod chart;
mod layout;
mod pages;
pub mod session;
mod users;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use ledger::Timestamp;
use maud::Markup;
use tower::ServiceExt;

use crate::error::ApiError;
use crate::http::extract::Delegated;
use crate::service::{AppState, Caller};
use crate::store::Env;
use session::{Claims, Principal, Signer};

/// Signed-out sessions remembered per process (their cookies are refused here until
/// they would have ended anyway).
const SIGNED_OUT_KEPT: usize = 100_000;

/// The largest answer read back from an in-process API call.
const API_ANSWER_MAX: usize = 4 << 20;

/// What every console handler shares.
#[derive(Debug)]
pub struct Console {
    /// The API's routes, called in process for every change.
    api: Router,
    signer: Signer,
    signed_out: SignedOut,
}

/// Sessions signed out on this process, each kept until it would have ended: their
/// cookies are refused here even if copied. Bounded: past [`SIGNED_OUT_KEPT`], ended
/// ones are dropped, then the tenth that ends soonest (they end soon anyway).
#[derive(Debug, Default)]
pub struct SignedOut {
    /// Nonce → when the session ends (ms, real clock).
    ends: Mutex<std::collections::HashMap<String, i64>>,
}

impl SignedOut {
    fn insert(&self, nonce: &str, ends_ms: i64, now_ms: i64) {
        let mut ends = self
            .ends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ends.len() >= SIGNED_OUT_KEPT {
            ends.retain(|_, end| *end > now_ms);
        }
        if ends.len() >= SIGNED_OUT_KEPT {
            // A tenth at once, so that a full map costs one pass per many sign-outs.
            let mut times: Vec<i64> = ends.values().copied().collect();
            let tenth = times.len() / 10;
            let (_, threshold, _) = times.select_nth_unstable(tenth);
            let threshold = *threshold;
            ends.retain(|_, end| *end > threshold);
        }
        ends.insert(nonce.to_owned(), ends_ms);
    }

    fn contains(&self, nonce: &str) -> bool {
        self.ends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(nonce)
    }
}

/// The console's routes, to merge beside the API's (`http::app_with`).
pub fn router(state: &AppState) -> Router<AppState> {
    let config = &state.config().console;
    if config.session_secret.is_none() {
        tracing::info!(
            "console.session_secret is not set: console sessions hold on this process only and end when it stops"
        );
    }
    let console = Arc::new(Console {
        api: crate::http::api_router()
            .split_for_parts()
            .0
            .with_state(state.clone()),
        signer: Signer::new(
            config
                .session_secret
                .as_ref()
                .map(crate::config::Secret::expose),
        ),
        signed_out: SignedOut::default(),
    });
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::to("/console/end-users") }),
        )
        .route(
            "/console/",
            get(|| async { Redirect::to("/console/end-users") }),
        )
        .route("/console/style.css", get(layout::stylesheet))
        .route("/console/login", get(pages::login_form).post(pages::login))
        .route("/console/logout", post(pages::logout))
        .route("/console/end-users", get(users::list))
        .route("/console/end-users/{id}", get(users::page))
        .route("/console/end-users/{id}/grant", post(users::grant))
        .route("/console/end-users/{id}/adjust", post(users::adjust))
        .route(
            "/console/subscriptions/{id}/{action}",
            get(users::confirm_action).post(users::subscription_action),
        )
        .route("/console/explain", get(pages::explain))
        .route("/console/catalog", get(pages::catalog))
        .route("/console/webhooks", get(pages::webhooks))
        .route("/console/events/{id}/redeliver", post(pages::redeliver))
        .route("/console/proxies", get(pages::proxies))
        .route("/console/clock/advance", post(pages::advance_clock))
        .layer(axum::middleware::from_fn(same_origin_forms))
        .layer(axum::middleware::map_response(secure_headers))
        .layer(axum::Extension(console))
}

/// Refuses a form posted from another site, where the browser says so
/// (`Sec-Fetch-Site`, or else an `Origin` that is not this host): beside each form's CSRF token and the `SameSite=Strict` cookie,
/// this also covers the sign-in form, which has no session to bind a token to.
async fn same_origin_forms(request: Request, next: axum::middleware::Next) -> Response {
    let headers = request.headers();
    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let foreign = request.method() == Method::POST
        && match (text("sec-fetch-site"), text("origin")) {
            (Some(site), _) => !matches!(site, "same-origin" | "none"),
            // Browsers without Fetch Metadata still say where a form came from.
            (None, Some(origin)) => {
                let host = origin.split_once("://").map_or(origin, |(_, host)| host);
                text("host").is_none_or(|own| !own.eq_ignore_ascii_case(host))
            }
            (None, None) => false,
        };
    if foreign {
        return Failure::Problem {
            status: StatusCode::FORBIDDEN,
            title: "Forbidden".into(),
            detail: "the console takes forms only from its own pages".into(),
        }
        .into_response();
    }
    next.run(request).await
}

/// Headers every console answer carries: no script, no framing, nothing cached, no
/// referrer leaving the console.
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    for (name, value) in [
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Why a console request did not get its page.
#[derive(Debug)]
pub enum Failure {
    /// No session, or one that ended: to the sign-in page.
    SignIn,
    /// A problem to show, as the API would have answered it.
    Problem {
        status: StatusCode,
        title: String,
        detail: String,
    },
}

impl Failure {
    pub fn bad_request(detail: impl Into<String>) -> Failure {
        Failure::Problem {
            status: StatusCode::BAD_REQUEST,
            title: "Bad request".into(),
            detail: detail.into(),
        }
    }
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Failure {
        if matches!(error, ApiError::Unauthorized) {
            return Failure::SignIn;
        }
        if let ApiError::Internal(message) = &error {
            tracing::error!(error = %message, "console: internal error");
        }
        let problem = error.problem();
        Failure::Problem {
            status: StatusCode::from_u16(problem.status)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            title: problem.title,
            detail: problem.detail,
        }
    }
}

impl From<crate::store::StoreError> for Failure {
    fn from(error: crate::store::StoreError) -> Failure {
        Failure::from(ApiError::from(error))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        match self {
            Failure::SignIn => Redirect::to("/console/login").into_response(),
            Failure::Problem {
                status,
                title,
                detail,
            } => (
                status,
                layout::bare(&title, &layout::problem(&title, &detail)),
            )
                .into_response(),
        }
    }
}

/// The result of a console handler.
pub type Page = Result<Response, Failure>;

/// A signed-in console request: who, where, and the session's CSRF token.
#[derive(Debug, Clone)]
pub struct Session {
    pub caller: Caller,
    pub console: Arc<Console>,
    pub claims: Claims,
    pub csrf: String,
    pub operator: bool,
    pub state: AppState,
}

impl Session {
    pub fn env(&self) -> &Env {
        &self.caller.env
    }

    /// Whether the session's key has `scope` (the operator has every scope).
    pub fn may(&self, scope: crate::auth::Scope) -> bool {
        crate::auth::allows(&self.caller.scopes, scope)
    }

    /// Refuses a page the API would refuse this key: reads need `read`, webhooks and
    /// proxies `admin`, as their endpoints do.
    ///
    /// # Errors
    /// 403 naming the scope.
    pub fn require(&self, scope: crate::auth::Scope) -> Result<(), Failure> {
        self.caller.require(scope).map_err(Failure::from)
    }

    /// Refuses a form whose CSRF token is not this session's.
    ///
    /// # Errors
    /// 403 naming the missing or wrong token.
    pub fn check_csrf(&self, token: Option<&str>) -> Result<(), Failure> {
        match token {
            Some(token) if self.console.signer.csrf_matches(&self.claims.nonce, token) => Ok(()),
            _ => Err(Failure::Problem {
                status: StatusCode::FORBIDDEN,
                title: "Forbidden".into(),
                detail: "the form's CSRF token is missing or is not this session's; reload the page and try again".into(),
            }),
        }
    }

    /// Calls the API in process as this session's caller; answers the JSON body of a
    /// success.
    ///
    /// # Errors
    /// The API's problem (status, title, detail) for an error answer.
    pub async fn api(
        &self,
        method: Method,
        uri: &str,
        body: Option<&serde_json::Value>,
        idempotency_key: Option<&str>,
    ) -> Result<serde_json::Value, Failure> {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let body = match body {
            Some(value) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(serde_json::to_vec(value).unwrap_or_default())
            }
            None => Body::empty(),
        };
        let mut request = request
            .body(body)
            .map_err(|error| Failure::from(ApiError::Internal(error.to_string())))?;
        request
            .extensions_mut()
            .insert(Delegated(self.caller.clone()));
        let response = match self.console.api.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), API_ANSWER_MAX)
            .await
            .map_err(|error| Failure::from(ApiError::Internal(error.to_string())))?;
        let value: serde_json::Value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
        };
        if status.is_success() {
            return Ok(value);
        }
        let text = |name: &str| {
            value
                .get(name)
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Err(Failure::Problem {
            status,
            title: text("title"),
            detail: text("detail"),
        })
    }

    /// The environment's "now" (its test clock, on a test key).
    ///
    /// # Errors
    /// Store failures reading the catalog view.
    pub async fn now(&self) -> Result<Timestamp, Failure> {
        let view = self.state.view(self.env()).await?;
        Ok(self.state.env_now(&view))
    }
}

impl FromRequestParts<AppState> for Session {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Session, Failure> {
        let console = parts
            .extensions
            .get::<Arc<Console>>()
            .cloned()
            .ok_or_else(|| Failure::from(ApiError::Internal("console state missing".into())))?;
        let cookie = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .find_map(|value| session::cookie(value, session::COOKIE))
            .ok_or(Failure::SignIn)?;
        let claims = console
            .signer
            .open(cookie, state.real_now().as_millis())
            .ok_or(Failure::SignIn)?;
        if console.signed_out.contains(&claims.nonce) {
            return Err(Failure::SignIn);
        }
        let (caller, operator) = match &claims.principal {
            Principal::Key { hash } => {
                let hash = session::unhex32(hash).ok_or(Failure::SignIn)?;
                (state.resume(&hash).await?, false)
            }
            Principal::Operator {
                tag,
                tenant,
                environment,
            } => {
                // Rotating the token ends every operator session.
                let configured = state
                    .config()
                    .operator_token
                    .as_ref()
                    .ok_or(Failure::SignIn)?;
                if !console
                    .signer
                    .operator_tag_matches(tag, configured.expose())
                {
                    return Err(Failure::SignIn);
                }
                let environment =
                    crate::store::Environment::parse(environment).ok_or(Failure::SignIn)?;
                let env = Env {
                    tenant_id: tenant.clone(),
                    environment,
                };
                (state.operator_in(env)?, true)
            }
        };
        let csrf = console.signer.csrf(&claims.nonce);
        Ok(Session {
            caller,
            console,
            claims,
            csrf,
            operator,
            state: state.clone(),
        })
    }
}

/// Whether the console's cookies get `Secure`: by configuration, or because the request
/// says it came over TLS.
fn secure(state: &AppState, headers: &axum::http::HeaderMap) -> bool {
    state.config().console.secure_cookies
        || headers
            .get("x-forwarded-proto")
            .and_then(|value| value.to_str().ok())
            .is_some_and(|proto| proto.eq_ignore_ascii_case("https"))
}

/// The `Set-Cookie` value that starts a session (or, with `None`, ends it).
fn set_cookie(value: Option<(&str, u64)>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match value {
        Some((value, max_age)) => format!(
            "{}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}",
            session::COOKIE
        ),
        None => format!(
            "{}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{secure}",
            session::COOKIE
        ),
    }
}

/// A 303 to `to` (after a form).
fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// Renders a page with the session's frame.
fn render(session: &Session, title: &str, now: Timestamp, body: Markup) -> Response {
    layout::page(session, title, now, body).into_response()
}

/// Percent-encodes a query value (form encoding: a space is `+`).
fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// What a path segment keeps as it is (RFC 3986's unreserved characters); everything
/// else is percent-encoded, a space as `%20` (a `+` in a path is a plus).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes one path segment (an end user id, say).
fn segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Signed-out sessions stay refused until they end; past the bound, ended ones go
    // first, then those that end soonest, never the newest.
    #[test]
    fn signed_out_sessions_are_bounded() {
        let signed_out = SignedOut::default();
        signed_out.insert("a", 100, 0);
        assert!(signed_out.contains("a") && !signed_out.contains("b"));
        for index in 0..SIGNED_OUT_KEPT {
            let ends = i64::try_from(index)
                .unwrap_or(i64::MAX)
                .saturating_add(1_000);
            signed_out.insert(&format!("n{index}"), ends, 50);
        }
        signed_out.insert("last", 10_000_000, 200);
        let len = signed_out.ends.lock().map(|ends| ends.len()).unwrap_or(0);
        assert!(len <= SIGNED_OUT_KEPT, "{len}");
        assert!(!signed_out.contains("a"), "ended, dropped first");
        assert!(!signed_out.contains("n0"), "the soonest to end went next");
        assert!(
            signed_out.contains("last")
                && signed_out.contains(&format!("n{}", SIGNED_OUT_KEPT - 1))
        );
    }

    // Path segments keep only unreserved characters; a space is %20, never `+`.
    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(segment("john doe+1/2"), "john%20doe%2B1%2F2");
        assert_eq!(segment("user-1_a.b~c"), "user-1_a.b~c");
        assert_eq!(encode("a b"), "a+b");
    }
}
