//! Sign-in and sign-out, "explain a decision", the catalog, webhooks, proxies and the
//! test clock.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Form};
use maud::{Markup, html};
use serde::Deserialize;

use super::layout::{bare, notice, time, time_opt};
use super::session::{Claims, Principal, hex, nonce};
use super::users::{Fields, access, source};
use super::{Console, Failure, Page, Session, render, secure, see_other, set_cookie};
use crate::auth::{self, Scope};
use crate::error::ApiError;
use crate::service::AppState;
use crate::store::{Env, Environment, LeaseFilter};

fn login_page(error: Option<&str>) -> Markup {
    bare(
        "Sign in",
        &html! {
            section.card.login {
                h1 { "QuotaStack console" }
                @if let Some(error) = error { div.problem role="alert" id="problem" { (error) } }
                form method="post" action="/console/login" id="login-form" {
                    label for="key" { "API key (admin or read scope)" }
                    input type="password" name="key" id="key" autocomplete="off" placeholder="qs_test_… or qs_live_…";
                    details {
                        summary { "Sign in as the operator instead" }
                        label for="operator_token" { "Operator token" }
                        input type="password" name="operator_token" id="operator_token" autocomplete="off";
                        label for="tenant" { "Tenant id" }
                        input type="text" name="tenant" id="tenant";
                        label for="environment" { "Environment" }
                        select name="environment" id="environment" { option value="test" { "test" } option value="live" { "live" } }
                    }
                    p { button type="submit" id="sign-in" { "Sign in" } }
                }
            }
        },
    )
}

/// `GET /console/login`.
pub async fn login_form() -> Markup {
    login_page(None)
}

/// `POST /console/login`: an API key with the admin or read scope, or the operator
/// token with a tenant and environment. Failed attempts count against the client's
/// address as for the API.
pub async fn login(
    axum::extract::State(state): axum::extract::State<AppState>,
    Extension(console): Extension<Arc<Console>>,
    connect: Option<Extension<ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
    Form(form): Form<Fields>,
) -> Response {
    let client = connect.map(|Extension(ConnectInfo(address))| address.ip());
    let (principal, landing) = match signed_in(&state, &console.signer, client, &form).await {
        Ok(signed) => signed,
        // The form again with the reason, as a page (200): a browser logs a 4xx page
        // load as an error, and the refusal is the page's content, not a fault.
        Err(message) => return login_page(Some(&message)).into_response(),
    };
    let length = state.config().console.session_length;
    let claims = Claims {
        principal,
        expires_ms: state
            .real_now()
            .as_millis()
            .saturating_add(i64::try_from(length.as_millis()).unwrap_or(i64::MAX)),
        nonce: nonce(),
    };
    let cookie = set_cookie(
        Some((&console.signer.seal(&claims), length.as_secs())),
        secure(&state, &headers),
    );
    let mut response = see_other(landing);
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// Who the sign-in form names, or why not (a message for the form).
async fn signed_in(
    state: &AppState,
    signer: &super::session::Signer,
    client: Option<std::net::IpAddr>,
    form: &Fields,
) -> Result<(Principal, &'static str), String> {
    let text = |name: &str| {
        form.get(name)
            .map(|value| value.trim())
            .filter(|value| !value.is_empty())
    };
    if let Some(key) = text("key") {
        let caller = state
            .authenticate(key, client)
            .await
            .map_err(|error| refusal(error, "That key is not known, or was revoked."))?;
        let landing = if auth::allows(&caller.scopes, Scope::Read) {
            "/console/end-users"
        } else if auth::allows(&caller.scopes, Scope::Admin) {
            "/console/webhooks"
        } else {
            return Err("That key has neither the admin nor the read scope.".into());
        };
        let principal = Principal::Key {
            hash: hex(&caller.key_hash),
        };
        return Ok((principal, landing));
    }
    let token =
        text("operator_token").ok_or("Enter an API key, or the operator token with a tenant.")?;
    state.check_operator_token(token, client).map_err(|error| {
        refusal(
            error,
            "That operator token is wrong, or none is configured.",
        )
    })?;
    let tenant = text("tenant").ok_or("Enter the tenant id to act in.")?;
    let environment = Environment::parse(text("environment").unwrap_or("test"))
        .ok_or("The environment is test or live.")?;
    let env = Env {
        tenant_id: tenant.to_owned(),
        environment,
    };
    let keys = state
        .store()
        .list_api_keys(&env)
        .await
        .map_err(|error| refusal(error.into(), ""))?;
    if keys.is_empty() {
        return Err(format!("There is no tenant `{tenant}`."));
    }
    let principal = Principal::Operator {
        tag: signer.operator_tag(token),
        tenant: tenant.to_owned(),
        environment: environment.as_str().to_owned(),
    };
    Ok((principal, "/console/end-users"))
}

/// What the sign-in form says for a refusal: `unauthorized` for a wrong credential, the
/// wait for too many failures, and nothing of the server's own faults (they are logged).
fn refusal(error: ApiError, unauthorized: &str) -> String {
    match error {
        ApiError::Unauthorized => unauthorized.to_owned(),
        ApiError::RateLimited { retry_after_secs } => format!(
            "Too many failed attempts from this address; try again in {retry_after_secs} s."
        ),
        other => {
            tracing::warn!(error = %other, "console sign-in failed");
            "Signing in failed on the server; try again shortly.".to_owned()
        }
    }
}

/// `POST /console/logout`: the cookie is cleared, and this process refuses it from now
/// on even if it was copied.
pub async fn logout(session: Session, headers: HeaderMap, Form(form): Form<Fields>) -> Page {
    session.check_csrf(form.get("csrf").map(String::as_str))?;
    session.console.signed_out.insert(
        &session.claims.nonce,
        session.claims.expires_ms,
        session.state.real_now().as_millis(),
    );
    let mut response = see_other("/console/login");
    if let Ok(value) = HeaderValue::from_str(&set_cookie(None, secure(&session.state, &headers))) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

#[derive(Debug, Deserialize)]
pub struct ExplainQuery {
    #[serde(default)]
    end_user: Option<String>,
    #[serde(default)]
    feature: Option<String>,
    #[serde(default)]
    units: Option<String>,
}

/// `GET /console/explain`: the check's answer for an end user, feature and units, with
/// its reason, the blocks that would burn in order, and what the plan allows.
pub async fn explain(session: Session, Query(query): Query<ExplainQuery>) -> Page {
    session.require(Scope::Read)?;
    let view = session.state.view(session.env()).await?;
    let now = session.state.env_now(&view);
    let end_user = query
        .end_user
        .as_deref()
        .map(str::trim)
        .filter(|text| !text.is_empty());
    let feature = query.feature.as_deref().filter(|text| !text.is_empty());
    let units = query
        .units
        .as_deref()
        .map(str::trim)
        .filter(|text| !text.is_empty())
        .unwrap_or("1");
    let answer = match (end_user, feature) {
        (Some(end_user), Some(feature)) => {
            Some(decision(&session, &view, end_user, feature, units, now).await?)
        }
        _ => None,
    };
    let body = html! {
        form method="get" action="/console/explain" id="explain-form" {
            label { "End user " input type="text" name="end_user" id="explain-end-user" required value=(end_user.unwrap_or("")); } " "
            label { "Feature " select name="feature" id="explain-feature" {
                @for key in view.catalog.features.keys() { option value=(key) selected[feature == Some(key.as_str())] { (key) } }
            } } " "
            label { "Units " input type="number" name="units" min="1" value=(units); } " "
            button type="submit" id="explain-submit" { "Explain" }
        }
        @if let Some(answer) = answer { (answer) }
    };
    Ok(render(&session, "Explain a decision", now, body))
}

async fn decision(
    session: &Session,
    view: &crate::catalog::CatalogView,
    end_user: &str,
    feature: &str,
    units: &str,
    now: ledger::Timestamp,
) -> Result<Markup, Failure> {
    let bad = |error: protocol::FieldError| Failure::bad_request(error.to_string());
    let end_user = protocol::end_user_id("end_user", end_user).map_err(bad)?;
    let feature = protocol::feature_key("feature", feature).map_err(bad)?;
    let units: u64 = units
        .parse()
        .map_err(|_| Failure::bad_request("units: must be a whole number from 1"))?;
    let units = protocol::units("units", units).map_err(bad)?;
    let user = session.state.state(session.env(), &end_user, now).await?;
    let decision = user
        .decide(&view.catalog, &feature, units, ledger::Credits::ZERO, now)
        .map_err(|refusal| Failure::from(ApiError::from(refusal)))?;
    let plan = decision.plan_id.and_then(|id| view.plan_key(id));
    let burns = burn_order(&user, &feature, decision.cost, now);
    let reason = decision.reason.map(|reason| match reason {
        ledger::DenyReason::InsufficientBalance => {
            "the balance usable for this feature is less than what the units cost"
        }
        ledger::DenyReason::NotInPlan => "the end user's plan does not include this feature",
        ledger::DenyReason::SubscriptionPaused => {
            "the subscription that grants this feature is paused"
        }
        ledger::DenyReason::SubscriptionPastDue => {
            "the subscription is past due and its variant stops usage meanwhile"
        }
    });
    Ok(html! {
        section.card id="decision" {
            h2 {
                @if decision.allowed { span.ok id="verdict" { "Allowed" } } @else { span.refused id="verdict" { "Refused" } }
                @if let Some(reason) = decision.reason { " — " code id="reason" { (reason.as_str()) } }
            }
            @if let Some(text) = reason { p { "Why: " (text) "." } }
            table {
                tr { th { "Cost of " (units.get()) " unit(s)" } td.num { (decision.cost.map_or_else(|| "— (boolean feature)".into(), |cost| cost.get().to_string())) } }
                tr { th { "Usable balance" } td.num { (decision.balance.map_or_else(|| "—".into(), |balance| balance.get().to_string())) } }
                tr { th { "Debt" } td.num { (decision.debt.get()) } }
                tr { th { "Plan" } td { (plan.unwrap_or_else(|| "none".into())) } }
                tr { th { "Subscription" } td { (decision.subscription_status.map_or("none", |status| status.as_str())) } }
                tr { th { "What the plan allows" } td { (access(&user, view, &feature, now)) } }
                tr { th { "Next reset" } td { (time_opt(decision.resets_at)) } }
            }
            h2 { "Blocks that would burn, in order" }
            table id="burn" {
                thead { tr { th { "Block" } th { "Source" } th.num { "Priority" } th.num { "Usable" } th.num { "Would burn" } th { "Expires" } } }
                tbody {
                    @for (block, usable, burn) in &burns {
                        tr { td.mono { (block.id) } td { (source(block.source)) } td.num { (block.priority) }
                             td.num { (usable) } td.num { (burn) } td { (time_opt(block.expires_at)) } }
                    }
                    @if burns.is_empty() { tr { td colspan="6" .muted { "No block can pay for this feature." } } }
                }
            }
        }
    })
}

/// The usable blocks for `feature` in burn order, with what each could give and what
/// `cost` would take from it.
fn burn_order<'a>(
    user: &'a ledger::EndUserState,
    feature: &ledger::FeatureKey,
    cost: Option<ledger::Credits>,
    now: ledger::Timestamp,
) -> Vec<(&'a ledger::Block, i64, i64)> {
    let mut left = cost.map_or(0, ledger::Credits::get);
    user.blocks_in_burn_order(Some(feature))
        .into_iter()
        .filter(|block| user.is_usable(block, now))
        .map(|block| {
            let usable = block
                .remaining
                .get()
                .saturating_sub(block.held.get())
                .max(0);
            let burn = usable.min(left);
            left = left.saturating_sub(burn);
            (block, usable, burn)
        })
        .collect()
}

/// `GET /console/catalog`: features with pricing, plans and their variants with grant
/// templates (read only: the catalog is code, `quotastack apply`).
pub async fn catalog(session: Session) -> Page {
    session.require(Scope::Read)?;
    let view = session.state.view(session.env()).await?;
    let now = session.state.env_now(&view);
    let json = |value: &dyn erased::Json| value.json();
    let body = html! {
        section.card {
            h2 { "Features" }
            table id="catalog-features" {
                thead { tr { th { "Key" } th { "Name" } th { "Type" } th { "Pricing" } th { "Requires a plan" } } }
                tbody { @for feature in &view.features {
                    tr { td.mono { (feature.key) } td { (feature.body.name) } td { (json(&feature.body.feature_type)) }
                         td.mono { (json(&feature.body.pricing)) } td { (feature.body.requires_plan) } }
                } }
            }
        }
        @for plan in &view.plans {
            section.card {
                h2 { "Plan " span.mono { (plan.key) } " — " (plan.body.name) @if plan.archived { " (archived)" } }
                p { "Kind " (json(&plan.body.kind)) ", overage " (json(&plan.body.overage_policy)) }
                p.mono { "Features: " (json(&plan.body.features)) }
                table {
                    thead { tr { th { "Variant" } th { "Interval" } th { "Billing" } th { "Price" } th { "Trial days" } th { "Grant templates" } } }
                    tbody { @for variant in view.variants.iter().filter(|variant| variant.parent_id.as_deref() == Some(plan.id.as_str())) {
                        tr { td.mono { (variant.key) @if variant.archived { " (archived)" } } td { (json(&variant.body.interval)) }
                             td { (json(&variant.body.billing_mode)) } td.mono { (json(&variant.body.price)) }
                             td.num { (variant.body.trial_days) } td.mono { (json(&variant.body.grants)) } }
                    } }
                }
            }
        }
    };
    Ok(render(&session, "Catalog", now, body))
}

/// JSON text of any wire value, for read-only display.
mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }

    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}

/// Deliveries shown on the webhooks page.
const DELIVERIES_SHOWN: u32 = 100;

#[derive(Debug, Deserialize)]
pub struct NoticeQuery {
    #[serde(default)]
    notice: Option<String>,
}

/// `GET /console/webhooks`: endpoints and the newest deliveries, each redeliverable.
pub async fn webhooks(session: Session, Query(query): Query<NoticeQuery>) -> Page {
    session.require(Scope::Admin)?;
    let view = session.state.view(session.env()).await?;
    let now = session.state.env_now(&view);
    let store = session.state.store();
    let endpoints = store.endpoints(session.env()).await?;
    let deliveries = store
        .recent_deliveries(session.env(), DELIVERIES_SHOWN)
        .await?;
    let body = html! {
        (notice(query.notice.as_deref()))
        section.card {
            h2 { "Endpoints" }
            table id="endpoints" {
                thead { tr { th { "Endpoint" } th { "URL" } th { "Events" } th { "Created" } } }
                tbody {
                    @for endpoint in &endpoints {
                        tr { td.mono { (endpoint.id) } td.mono { (endpoint.url) }
                             td { (endpoint.event_types.as_ref().map_or_else(|| "all".to_owned(), |types| types.join(", "))) }
                             td { (time(endpoint.created_at)) } }
                    }
                    @if endpoints.is_empty() { tr { td colspan="4" .muted { "No endpoints." } } }
                }
            }
        }
        section.card {
            h2 { "Recent deliveries" }
            table id="deliveries" {
                thead { tr { th { "Event" } th { "Type" } th { "Endpoint" } th { "Status" } th.num { "Attempts" } th { "Last response" } th { "Next attempt" } th {} } }
                tbody {
                    @for delivery in &deliveries {
                        tr data-event=(delivery.event_id) {
                            td.mono { (delivery.event_id) } td { (delivery.event_type.as_deref().unwrap_or("")) } td.mono { (delivery.endpoint_id) }
                            td.status { (delivery.status) } td.num { (delivery.attempts) }
                            td { (delivery.last_response_status.map_or_else(String::new, |status| status.to_string()))
                                 @if let Some(error) = &delivery.last_error { " " span.muted { (error) } } }
                            td { @if delivery.status == "pending" { (time(delivery.next_attempt_at)) } }
                            td { form.inline method="post" action={"/console/events/" (super::segment(&delivery.event_id)) "/redeliver"} {
                                input type="hidden" name="csrf" value=(session.csrf);
                                button.secondary type="submit" { "Redeliver" }
                            } }
                        }
                    }
                    @if deliveries.is_empty() { tr { td colspan="8" .muted { "No deliveries yet." } } }
                }
            }
        }
    };
    Ok(render(&session, "Webhooks", now, body))
}

/// `POST /console/events/{id}/redeliver`: `POST /v1/events/{id}/redeliver`.
pub async fn redeliver(session: Session, Path(id): Path<String>, Form(form): Form<Fields>) -> Page {
    session.check_csrf(form.get("csrf").map(String::as_str))?;
    session
        .api(
            Method::POST,
            &format!("/v1/events/{}/redeliver", super::segment(&id)),
            None,
            None,
        )
        .await?;
    Ok(see_other("/console/webhooks?notice=redelivered"))
}

/// Leases listed on the proxies page.
const LEASES_SHOWN: u32 = 500;

/// `GET /console/proxies`: the sync streams open on this server with how far behind
/// the feed each is, and the credits leased per holder.
pub async fn proxies(session: Session) -> Page {
    session.require(Scope::Admin)?;
    let (state, env) = (&session.state, session.env());
    let view = state.view(env).await?;
    let now = state.env_now(&view);
    let head = state.store().last_change(env).await?;
    let streams = state.open_streams(env);
    let leases = state
        .store()
        .leases(
            env,
            &LeaseFilter {
                end_user_id: None,
                holder: None,
                active_only: true,
                after: None,
                limit: LEASES_SHOWN,
            },
        )
        .await?;
    let mut holders: BTreeMap<String, (usize, i64, i64)> = BTreeMap::new();
    for lease in &leases {
        let entry = holders.entry(lease.holder.to_string()).or_default();
        entry.0 = entry.0.saturating_add(1);
        entry.1 = entry.1.saturating_add(lease.held.get());
        entry.2 = entry.2.saturating_add(lease.spent.get());
    }
    let body = html! {
        section.card {
            h2 { "Sync streams open on this server" }
            p.muted { "The feed's head is at " strong id="feed-head" { (head) } ". Streams on other replicas, and proxies following over NATS, are not listed here." }
            table id="streams" {
                thead { tr { th { "Key" } th { "Opened" } th.num { "Cursor" } th.num { "Behind" } } }
                tbody {
                    @for stream in &streams {
                        @let cursor = stream.cursor.load(std::sync::atomic::Ordering::Relaxed);
                        tr { td.mono { (stream.key_id) } td { (time(stream.opened_at)) }
                             td.num { @if cursor < 0 { "snapshot" } @else { (cursor) } }
                             td.num { @if cursor >= 0 { (head.saturating_sub(cursor).max(0)) } } }
                    }
                    @if streams.is_empty() { tr { td colspan="4" .muted { "No stream open." } } }
                }
            }
        }
        section.card {
            h2 { "Leases held, per holder" }
            table id="lease-holders" {
                thead { tr { th { "Holder" } th.num { "Active leases" } th.num { "Credits held" } th.num { "Spent through them" } } }
                tbody {
                    @for (holder, (count, held, spent)) in &holders {
                        tr { td.mono { (holder) } td.num { (count) } td.num { (held) } td.num { (spent) } }
                    }
                    @if holders.is_empty() { tr { td colspan="4" .muted { "No active lease." } } }
                }
            }
            @if leases.len() == usize::try_from(LEASES_SHOWN).unwrap_or(usize::MAX) {
                p.muted { "Counted from the first " (LEASES_SHOWN) " active leases." }
            }
        }
    };
    Ok(render(&session, "Proxies", now, body))
}

/// `POST /console/clock/advance`: `POST /v1/test-clock/advance` (test keys only; the API
/// refuses a live one).
pub async fn advance_clock(session: Session, headers: HeaderMap, Form(form): Form<Fields>) -> Page {
    session.check_csrf(form.get("csrf").map(String::as_str))?;
    let seconds: i64 = form
        .get("seconds")
        .and_then(|text| text.trim().parse().ok())
        .ok_or_else(|| Failure::bad_request("seconds: must be a whole number"))?;
    session
        .api(
            Method::POST,
            "/v1/test-clock/advance",
            Some(&serde_json::json!({ "seconds": seconds })),
            None,
        )
        .await?;
    // Back to the page the form was on, when it was a console page.
    let back = headers
        .get(header::REFERER)
        .and_then(|value| value.to_str().ok())
        .and_then(|referer| referer.find("/console/").map(|at| &referer[at..]))
        .filter(|path| !path.contains("//") && !path.contains('\\'))
        .unwrap_or("/console/end-users");
    Ok(see_other(back))
}
