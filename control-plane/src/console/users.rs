//! End users: the list, one end user's page, and the actions on it (grant, adjust,
//! subscription changes), each through the API in process.

use std::collections::HashMap;

use axum::Form;
use axum::extract::{Path, Query};
use axum::http::Method;
use ledger::{EndUserId, EndUserState, FeatureKey, Span, Timestamp};
use maud::{Markup, html};
use serde::Deserialize;

use super::layout::{notice, time, time_opt};
use super::{Failure, Page, Session, chart, encode, render, see_other, segment};
use crate::catalog::CatalogView;
use crate::store::{EndUserCursor, EndUserPage, EntryFilter, EntryPoint};

/// End users per page of the list.
const LIST_PAGE: u32 = 50;
/// Ledger entries per page of an end user's ledger.
const LEDGER_PAGE: u32 = 50;
/// Events shown on an end user's page.
const EVENTS_SHOWN: u32 = 20;
/// The most entries the charts read (30 days of a busy end user beyond this are drawn
/// from the newest this many).
const CHART_ENTRIES_MAX: u32 = 20_000;
/// Days the charts cover.
const CHART_DAYS: usize = 30;
const DAY_MS: i64 = 86_400_000;
/// The longest search prefix (an end user id's own limit).
const PREFIX_MAX: usize = 256;

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    q: Option<String>,
    /// `<active minute>:<end user id>` of the previous page's last row.
    #[serde(default)]
    after: Option<String>,
}

/// `GET /console/end-users`: newest activity first, searchable by id prefix.
pub async fn list(session: Session, Query(query): Query<ListQuery>) -> Page {
    session.require(crate::auth::Scope::Read)?;
    let prefix = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    if let Some(prefix) = prefix
        && (prefix.len() > PREFIX_MAX || prefix.chars().any(char::is_control))
    {
        return Err(Failure::bad_request(format!(
            "q: a search is an end user id's first characters, at most {PREFIX_MAX} bytes and no control characters"
        )));
    }
    let after = query.after.as_deref().map(parse_cursor).transpose()?;
    let view = session.state.view(session.env()).await?;
    let now = session.state.env_now(&view);
    let rows = session
        .state
        .store()
        .recent_end_users(
            session.env(),
            EndUserPage {
                prefix,
                after: after.as_ref(),
                limit: LIST_PAGE,
            },
        )
        .await?;
    let next = (rows.len() == usize::try_from(LIST_PAGE).unwrap_or(usize::MAX))
        .then(|| rows.last())
        .flatten()
        .map(|row| format!("{}:{}", row.active_minute, row.state.end_user_id()));
    let body = html! {
        form method="get" action="/console/end-users" {
            input type="search" name="q" id="search" placeholder="End user id starts with…" value=(prefix.unwrap_or(""));
            " " button type="submit" { "Search" }
        }
        table id="end-users" {
            thead { tr {
                th { "End user" } th.num { "Available" } th.num { "Held" } th.num { "Debt" }
                th { "Plan" } th { "Status" } th { "Last change" }
            } }
            tbody {
                @for row in &rows {
                    @let user = &row.state;
                    @let (plan, status) = plan_and_status(user, &view);
                    tr {
                        td { a.mono href={"/console/end-users/" (segment(user.end_user_id().as_str()))} { (user.end_user_id()) } }
                        td.num { (figure(user.available(None, now).map(ledger::Credits::get))) }
                        td.num { (figure(user.held(None).map(ledger::Credits::get))) }
                        td.num { (figure(user.total_debt(None).map(ledger::Credits::get))) }
                        td { (plan) } td { (status) }
                        td.muted { (time(Timestamp::from_millis(row.updated_at))) }
                    }
                }
                @if rows.is_empty() { tr { td colspan="7" .muted { "No end users match." } } }
            }
        }
        p.pager {
            @if let Some(next) = &next {
                a id="next-page" href={"/console/end-users?after=" (encode(next)) @if let Some(prefix) = prefix { "&q=" (encode(prefix)) }} { "Next page →" }
            }
        }
    };
    Ok(render(&session, "End users", now, body))
}

/// Reads a list cursor (`<active minute>:<id>`).
fn parse_cursor(text: &str) -> Result<EndUserCursor, Failure> {
    let (at, id) = text
        .split_once(':')
        .ok_or_else(|| Failure::bad_request("after: is not a cursor from this list"))?;
    let active_minute = at
        .parse()
        .map_err(|_| Failure::bad_request("after: is not a cursor from this list"))?;
    Ok(EndUserCursor {
        active_minute,
        end_user_id: id.to_owned(),
    })
}

/// A figure, or a mark where it overflowed.
fn figure(value: Result<i64, ledger::Overflow>) -> String {
    value.map_or_else(|_| "overflow".to_owned(), |value| value.to_string())
}

/// The end user's base plan's key and status (or the free plan's).
fn plan_and_status(user: &EndUserState, view: &CatalogView) -> (String, String) {
    if let Some(subscription) = user.base_subscription() {
        return (
            view.plan_key(subscription.plan_id)
                .unwrap_or_else(|| subscription.plan_id.to_string()),
            subscription.status.as_str().to_owned(),
        );
    }
    match view.catalog.free_plan() {
        Some((_, plan)) => (
            view.plan_key(plan.id).unwrap_or_default(),
            "free plan".into(),
        ),
        None => ("—".into(), "no plan".into()),
    }
}

#[derive(Debug, Deserialize)]
pub struct PageQuery {
    #[serde(default, rename = "type")]
    entry_type: Option<String>,
    #[serde(default)]
    before: Option<i64>,
    #[serde(default)]
    notice: Option<String>,
}

const ENTRY_TYPES: [&str; 9] = [
    "grant", "debit", "hold", "commit", "release", "expire", "void", "adjust", "settle",
];

/// `GET /console/end-users/{id}`: everything about one end user.
pub async fn page(
    session: Session,
    Path(id): Path<String>,
    Query(query): Query<PageQuery>,
) -> Page {
    session.require(crate::auth::Scope::Read)?;
    let end_user = protocol::end_user_id("end_user_id", &id)
        .map_err(|error| Failure::bad_request(error.to_string()))?;
    let entry_type = query.entry_type.filter(|value| !value.is_empty());
    if let Some(entry_type) = &entry_type
        && !ENTRY_TYPES.contains(&entry_type.as_str())
    {
        return Err(Failure::bad_request(format!(
            "type: `{entry_type}` is not one of {}",
            ENTRY_TYPES.join(", ")
        )));
    }
    let (state, env) = (&session.state, session.env());
    let view = state.view(env).await?;
    let now = state.env_now(&view);
    let user = state.state(env, &end_user, now).await?;
    // The ledger's page, the charts' figures and the events are read side by side (each
    // on a reader of its own).
    let filter = EntryFilter {
        end_user_id: Some(end_user.to_string()),
        entry_type: entry_type.clone(),
        from: None,
        to: None,
        before_seq: query.before,
        limit: LEDGER_PAGE,
    };
    let (ledger, days, events) = tokio::try_join!(
        async {
            state
                .store()
                .entries(env, &filter)
                .await
                .map_err(Failure::from)
        },
        chart_days(&session, &end_user, now),
        async {
            state
                .store()
                .end_user_events(env, end_user.as_str(), EVENTS_SHOWN)
                .await
                .map_err(Failure::from)
        },
    )?;
    let body = html! {
        (notice(query.notice.as_deref()))
        @if user.version() == 0 { p.muted id="unknown" { "Nothing has happened to this end user yet." } }
        (summary(&user, &view, now))
        (blocks(&user, now))
        section.card {
            h2 { "Balance, last 30 days" }
            (chart::balance(&days.days, &days.first, &days.last))
            h2 { "Credits used per day" }
            (chart::usage(&days.days, &days.first, &days.last))
            @if days.cut { p.muted { "Drawn from the newest " (CHART_ENTRIES_MAX) " entries." } }
        }
        (subscriptions(&user, &view))
        (holds(&user))
        (ledger_table(&end_user, &ledger, entry_type.as_deref()))
        (events_table(&events))
        (forms(&session, &end_user))
    };
    Ok(render(&session, &format!("End user {end_user}"), now, body))
}

/// Totals and each feature's figures with what the plan allows.
fn summary(user: &EndUserState, view: &CatalogView, now: Timestamp) -> Markup {
    let (plan, status) = plan_and_status(user, view);
    html! {
        section.card {
            div.totals {
                div { span.muted { "Available" } b id="available" { (figure(user.available(None, now).map(ledger::Credits::get))) } }
                div { span.muted { "Held" } b id="held" { (figure(user.held(None).map(ledger::Credits::get))) } }
                div { span.muted { "Debt" } b id="debt" { (figure(user.total_debt(None).map(ledger::Credits::get))) } }
                div { span.muted { "Plan" } b { (plan) } span.muted { (status) } }
            }
            h2 { "Features" }
            table id="features" {
                thead { tr { th { "Feature" } th.num { "Available" } th.num { "Held" } th.num { "Debt" } th { "Access" } } }
                tbody {
                    @for key in view.catalog.features.keys() {
                        tr {
                            td.mono { (key) }
                            td.num { (figure(user.available(Some(key), now).map(ledger::Credits::get))) }
                            td.num { (figure(user.held(Some(key)).map(ledger::Credits::get))) }
                            td.num { (user.debt(key).get()) }
                            td { (access(user, view, key, now)) }
                        }
                    }
                }
            }
        }
    }
}

/// What the plan allows for one feature, in words.
pub fn access(user: &EndUserState, view: &CatalogView, key: &FeatureKey, now: Timestamp) -> String {
    match user.decide(
        &view.catalog,
        key,
        ledger::Units::ONE,
        ledger::Credits::ZERO,
        now,
    ) {
        Ok(decision) => match (decision.reason, decision.overage) {
            (Some(ledger::DenyReason::InsufficientBalance), _) | (None, _) => {
                match decision.overage {
                    Some(ledger::OveragePolicy::Allow) => {
                        "open; usage past the balance goes into debt".into()
                    }
                    Some(ledger::OveragePolicy::Block) => "open while credits last".into(),
                    None => "open".into(),
                }
            }
            (Some(reason), _) => format!("refused: {}", reason.as_str()),
        },
        Err(refusal) => format!("unknown: {refusal}"),
    }
}

/// The blocks in burn order, each with its remaining/amount bar.
fn blocks(user: &EndUserState, now: Timestamp) -> Markup {
    html! {
        section.card {
            h2 { "Blocks, in burn order" }
            table id="blocks" {
                thead { tr {
                    th { "Block" } th { "Remaining of amount" } th.num { "Remaining" } th.num { "Held" }
                    th { "Source" } th.num { "Priority" } th { "Features" } th { "Expires" }
                } }
                tbody {
                    @for block in user.blocks_in_burn_order(None) {
                        tr data-block=(block.id) {
                            td.mono { (block.id) @if !user.is_usable(block, now) { " " span.muted { "(not usable now)" } } }
                            td { meter min="0" max=(block.amount.get()) value=(block.remaining.get()) title={(block.remaining.get()) " of " (block.amount.get())} {} }
                            td.num { (block.remaining.get()) " / " (block.amount.get()) }
                            td.num { (block.held.get()) }
                            td { (source(block.source)) }
                            td.num { (block.priority) }
                            td.mono { (features(block.feature_keys.as_deref())) }
                            td { (time_opt(block.expires_at)) }
                        }
                    }
                }
            }
        }
    }
}

pub fn source(source: ledger::BlockSource) -> &'static str {
    match source {
        ledger::BlockSource::Purchase => "purchase",
        ledger::BlockSource::Promotion => "promotion",
        ledger::BlockSource::Plan => "plan",
        ledger::BlockSource::Rollover => "rollover",
        ledger::BlockSource::Manual => "manual",
    }
}

fn features(keys: Option<&[FeatureKey]>) -> String {
    keys.map_or_else(
        || "all".to_owned(),
        |keys| {
            keys.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        },
    )
}

/// The last 30 days (UTC) drawn: each day's closing balance and credits used, the
/// first and last day's labels, and whether the history was cut at
/// [`CHART_ENTRIES_MAX`] entries.
struct Days {
    days: Vec<chart::Day>,
    first: String,
    last: String,
    cut: bool,
}

async fn chart_days(
    session: &Session,
    end_user: &EndUserId,
    now: Timestamp,
) -> Result<Days, Failure> {
    let today = now.as_millis().div_euclid(DAY_MS);
    let first_day = today.saturating_sub(i64::try_from(CHART_DAYS).unwrap_or(30) - 1);
    // Newest first, the figures only (no entry is parsed whole).
    let points = session
        .state
        .store()
        .entry_points(session.env(), end_user.as_str(), CHART_ENTRIES_MAX)
        .await?;
    let cut = points.len() == usize::try_from(CHART_ENTRIES_MAX).unwrap_or(usize::MAX);
    Ok(Days {
        days: bucket(&points, first_day, cut),
        first: day_label(first_day),
        last: day_label(today),
        cut,
    })
}

/// Buckets entries (newest first) into the days from `first_day`: each day's closing
/// balance is the last entry's `balance_after` at or before its end, and its use the
/// credits debited and committed in it. The balance before the first day is the newest
/// older entry's; with none, zero when the history is whole (`cut` false), else the
/// oldest entry read's.
fn bucket(points: &[EntryPoint], first_day: i64, cut: bool) -> Vec<chart::Day> {
    let start = first_day.saturating_mul(DAY_MS);
    let opening = points
        .iter()
        .find(|point| point.created_at.as_millis() < start)
        .or_else(|| points.last().filter(|_| cut))
        .map_or(0, |point| point.balance_after);
    // Entries may be stamped out of seq order (usage carries its own time), so the
    // window's are sorted by time, then seq.
    let mut window: Vec<_> = points
        .iter()
        .filter(|point| point.created_at.as_millis() >= start)
        .collect();
    window.sort_by_key(|point| (point.created_at, point.seq));
    let mut entries = window.into_iter().peekable();
    let mut balance = opening;
    let mut days = vec![chart::Day::default(); CHART_DAYS];
    for (index, day) in days.iter_mut().enumerate() {
        let end = first_day
            .saturating_add(i64::try_from(index).unwrap_or(0))
            .saturating_add(1)
            .saturating_mul(DAY_MS);
        while let Some(point) = entries.next_if(|point| point.created_at.as_millis() < end) {
            balance = point.balance_after;
            if matches!(point.entry_type.as_str(), "debit" | "commit") {
                day.used = day.used.saturating_add(point.amount.saturating_abs());
            }
        }
        day.balance = balance;
    }
    days
}

fn day_label(day: i64) -> String {
    time(Timestamp::from_millis(day.saturating_mul(DAY_MS)))
        .chars()
        .take(10)
        .collect()
}

/// The end user's subscriptions with the actions their state allows.
fn subscriptions(user: &EndUserState, view: &CatalogView) -> Markup {
    html! {
        section.card {
            h2 { "Subscriptions" }
            table id="subscriptions" {
                thead { tr { th { "Subscription" } th { "Plan" } th { "Status" } th { "Period" } th { "Actions" } } }
                tbody {
                    @for subscription in user.subscriptions() {
                        tr data-subscription=(subscription.id) {
                            td.mono { (subscription.id) }
                            td { (view.plan_key(subscription.plan_id).unwrap_or_default()) }
                            td.status { (subscription.status.as_str())
                                @if subscription.cancel_at_period_end { " (cancels at period end)" } }
                            td { (time(subscription.current_period_start)) " – " (time(subscription.current_period_end)) }
                            td {
                                @for action in actions(subscription.status) {
                                    a id={(action) "-" (subscription.id)} href={"/console/subscriptions/" (subscription.id) "/" (action)} { (action) } " "
                                }
                            }
                        }
                    }
                    @if user.subscriptions().is_empty() { tr { td colspan="5" .muted { "None." } } }
                }
            }
        }
    }
}

/// The changes the subscription state machine allows from `status` (SPEC 10).
fn actions(status: ledger::SubscriptionStatus) -> &'static [&'static str] {
    use ledger::SubscriptionStatus as S;
    match status {
        S::Trialing | S::Active | S::PastDue => &["renew", "pause", "cancel", "change"],
        S::Paused => &["resume", "cancel"],
        S::Canceled | S::Expired => &[],
    }
}

/// Reservations and leases holding credits now.
fn holds(user: &EndUserState) -> Markup {
    html! {
        section.card {
            h2 { "Held: reservations and leases" }
            table id="holds" {
                thead { tr { th { "Hold" } th { "Feature" } th.num { "Held" } th { "Holder" } th { "Status" } th { "Expires" } } }
                tbody {
                    @for reservation in user.reservations() {
                        tr { td.mono { (reservation.id) } td.mono { (reservation.feature_key) } td.num { (reservation.amount.get()) }
                             td.muted { "reservation" } td { (reservation.status.as_str()) } td { (time(reservation.expires_at)) } }
                    }
                    @for lease in user.leases() {
                        tr { td.mono { (lease.id) } td.mono { (lease.feature_key) } td.num { (lease.held.get()) }
                             td.mono { (lease.holder) } td { (lease.status.as_str()) } td { (time(lease.expires_at)) } }
                    }
                    @if user.reservations().is_empty() && user.leases().is_empty() { tr { td colspan="6" .muted { "Nothing held." } } }
                }
            }
        }
    }
}

fn ledger_table(
    end_user: &EndUserId,
    rows: &[(i64, protocol::LedgerEntry)],
    entry_type: Option<&str>,
) -> Markup {
    let base = format!("/console/end-users/{}", segment(end_user.as_str()));
    let older = (rows.len() == usize::try_from(LEDGER_PAGE).unwrap_or(usize::MAX))
        .then(|| rows.last().map(|(seq, _)| *seq))
        .flatten();
    html! {
        section.card {
            h2 { "Ledger" }
            form method="get" action=(base) {
                select name="type" aria-label="Entry type" id="entry-type" {
                    option value="" { "All types" }
                    @for kind in ENTRY_TYPES { option value=(kind) selected[entry_type == Some(kind)] { (kind) } }
                }
                " " button type="submit" { "Filter" }
            }
            table id="ledger" {
                thead { tr { th { "When" } th { "Type" } th { "Feature" } th.num { "Amount" } th.num { "Debt" } th.num { "Balance after" } th { "Entry" } } }
                tbody {
                    @for (_, entry) in rows {
                        tr { td { (time(entry.created_at.0)) } td { (entry.entry_type) } td.mono { (entry.feature_key.as_deref().unwrap_or("")) }
                             td.num { (entry.amount) } td.num { (entry.debt) } td.num { (entry.balance_after) } td.mono.muted { (entry.id) } }
                    }
                    @if rows.is_empty() { tr { td colspan="7" .muted { "No entries." } } }
                }
            }
            p.pager {
                @if let Some(seq) = older {
                    a id="older-entries" href={(base) "?before=" (seq) @if let Some(kind) = entry_type { "&type=" (kind) }} { "Older entries →" }
                }
            }
        }
    }
}

fn events_table(events: &[crate::store::EventRecord]) -> Markup {
    html! {
        section.card {
            h2 { "Recent events" }
            table id="events" {
                thead { tr { th { "When" } th { "Type" } th { "Event" } } }
                tbody {
                    @for record in events {
                        tr { td { (time(record.event.created_at.0)) } td { (record.event.event_type) } td.mono.muted { (record.event.id) } }
                    }
                    @if events.is_empty() { tr { td colspan="3" .muted { "No events." } } }
                }
            }
        }
    }
}

/// The grant and adjustment forms, each with a fresh idempotency key: a form sent twice
/// (a double click, a resubmission) grants once.
fn forms(session: &Session, end_user: &EndUserId) -> Markup {
    let base = format!("/console/end-users/{}", segment(end_user.as_str()));
    html! {
        section.card {
            h2 { "Grant credits" }
            form.stack method="post" action={(base) "/grant"} id="grant-form" {
                input type="hidden" name="csrf" value=(session.csrf);
                input type="hidden" name="idempotency_key" value=(fresh_key());
                label { "Amount " input type="number" name="amount" min="1" required id="grant-amount"; }
                label { "Source " select name="source" {
                    option value="manual" { "manual" } option value="promotion" { "promotion" } option value="purchase" { "purchase" } } }
                label { "Priority " input type="number" name="priority" min="0" max="1000" value=(ledger::PRIORITY_DEFAULT); }
                label { "Features " input type="text" name="feature_keys" placeholder="all (or a, b)"; }
                label { "Expires in days " input type="number" name="expires_in_days" min="1"; }
                button type="submit" id="grant-submit" { "Grant" }
            }
            h2 { "Adjust the balance" }
            form.stack method="post" action={(base) "/adjust"} id="adjust-form" {
                input type="hidden" name="csrf" value=(session.csrf);
                input type="hidden" name="idempotency_key" value=(fresh_key());
                label { "Amount (±) " input type="number" name="amount" required; }
                label { "Reason " input type="text" name="reason" required maxlength="1000"; }
                button type="submit" { "Adjust" }
            }
        }
    }
}

/// A new idempotency key for a form.
fn fresh_key() -> String {
    format!("console-{}", super::session::nonce())
}

/// A form's fields by name.
pub type Fields = HashMap<String, String>;

fn field<'a>(form: &'a Fields, name: &str) -> Option<&'a str> {
    form.get(name)
        .map(|value| value.trim())
        .filter(|value| !value.is_empty())
}

fn whole(form: &Fields, name: &str) -> Result<Option<i64>, Failure> {
    field(form, name)
        .map(|text| {
            text.parse::<i64>()
                .map_err(|_| Failure::bad_request(format!("{name}: must be a whole number")))
        })
        .transpose()
}

/// `POST /console/end-users/{id}/grant`: `POST /v1/credits/grants`.
pub async fn grant(session: Session, Path(id): Path<String>, Form(form): Form<Fields>) -> Page {
    session.check_csrf(form.get("csrf").map(String::as_str))?;
    let amount =
        whole(&form, "amount")?.ok_or_else(|| Failure::bad_request("amount: is required"))?;
    let mut body = serde_json::json!({
        "end_user_id": id,
        "amount": amount,
        "source": field(&form, "source").unwrap_or("manual"),
        "metadata": { "via": "console" },
    });
    if let Some(priority) = whole(&form, "priority")? {
        body["priority"] = priority.into();
    }
    if let Some(keys) = field(&form, "feature_keys") {
        body["feature_keys"] = keys
            .split(',')
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .collect::<Vec<_>>()
            .into();
    }
    if let Some(days) = whole(&form, "expires_in_days")? {
        let now = session.now().await?;
        let expires = Span::from_days(days)
            .and_then(|span| now.checked_add(span))
            .map_err(|_| Failure::bad_request("expires_in_days: is out of range"))?;
        body["expires_at"] = expires.to_string().into();
    }
    session
        .api(
            Method::POST,
            "/v1/credits/grants",
            Some(&body),
            field(&form, "idempotency_key"),
        )
        .await?;
    Ok(see_other(&format!(
        "/console/end-users/{}?notice=granted",
        segment(&id)
    )))
}

/// `POST /console/end-users/{id}/adjust`: `POST /v1/credits/adjustments`.
pub async fn adjust(session: Session, Path(id): Path<String>, Form(form): Form<Fields>) -> Page {
    session.check_csrf(form.get("csrf").map(String::as_str))?;
    let amount =
        whole(&form, "amount")?.ok_or_else(|| Failure::bad_request("amount: is required"))?;
    let body = serde_json::json!({
        "end_user_id": id,
        "amount": amount,
        "reason": field(&form, "reason").unwrap_or_default(),
    });
    session
        .api(
            Method::POST,
            "/v1/credits/adjustments",
            Some(&body),
            field(&form, "idempotency_key"),
        )
        .await?;
    Ok(see_other(&format!(
        "/console/end-users/{}?notice=adjusted",
        segment(&id)
    )))
}

const SUBSCRIPTION_ACTIONS: [&str; 5] = ["renew", "pause", "resume", "cancel", "change"];

fn known_action(action: &str) -> Result<(), Failure> {
    if SUBSCRIPTION_ACTIONS.contains(&action) {
        Ok(())
    } else {
        Err(Failure::bad_request(format!(
            "`{action}` is not one of {}",
            SUBSCRIPTION_ACTIONS.join(", ")
        )))
    }
}

/// `GET /console/subscriptions/{id}/{action}`: the confirmation before a change.
pub async fn confirm_action(session: Session, Path((id, action)): Path<(String, String)>) -> Page {
    known_action(&action)?;
    let subscription = session
        .api(
            Method::GET,
            &format!("/v1/subscriptions/{}", segment(&id)),
            None,
            None,
        )
        .await?;
    let end_user = subscription["end_user_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let view = session.state.view(session.env()).await?;
    let now = session.state.env_now(&view);
    let body = html! {
        section.card {
            p { "Really " strong { (action) } " subscription " span.mono { (id) } " of end user " span.mono { (end_user) } "?" }
            form method="post" action={"/console/subscriptions/" (segment(&id)) "/" (action)} id="confirm-form" {
                input type="hidden" name="csrf" value=(session.csrf);
                input type="hidden" name="idempotency_key" value=(fresh_key());
                @if action == "cancel" || action == "change" {
                    label { "When " select name="at" {
                        option value="period_end" { "at the period's end" } option value="immediate" { "now" } } } " "
                }
                @if action == "change" {
                    label { "To variant " select name="plan_variant_id" {
                        @for variant in view.variants.iter().filter(|variant| !variant.archived) {
                            option value=(variant.id) { (plan_of(&view, variant)) " / " (variant.key) }
                        }
                    } } " "
                }
                button type="submit" id="confirm" { "Confirm " (action) }
                " " a href={"/console/end-users/" (segment(&end_user))} { "Back" }
            }
        }
    };
    Ok(render(&session, &format!("Confirm: {action}"), now, body))
}

fn plan_of(
    view: &CatalogView,
    variant: &crate::store::CatalogRecord<protocol::CreateVariant>,
) -> String {
    variant
        .parent_id
        .as_deref()
        .and_then(|plan| view.plans.iter().find(|record| record.id == plan))
        .map_or_else(String::new, |plan| plan.key.clone())
}

/// `POST /console/subscriptions/{id}/{action}`: `POST /v1/subscriptions/{id}/{action}`.
pub async fn subscription_action(
    session: Session,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<Fields>,
) -> Page {
    session.check_csrf(form.get("csrf").map(String::as_str))?;
    known_action(&action)?;
    let at = field(&form, "at").unwrap_or("period_end");
    let body = match action.as_str() {
        "cancel" => Some(serde_json::json!({ "at": at })),
        "change" => Some(serde_json::json!({
            "plan_variant_id": field(&form, "plan_variant_id").unwrap_or_default(),
            "at": at,
        })),
        "renew" => Some(serde_json::json!({})),
        _ => None,
    };
    let answer = session
        .api(
            Method::POST,
            &format!("/v1/subscriptions/{}/{action}", segment(&id)),
            body.as_ref(),
            field(&form, "idempotency_key"),
        )
        .await?;
    let end_user = answer["end_user_id"].as_str().unwrap_or_default();
    let done = match action.as_str() {
        "renew" => "renewed",
        "pause" => "paused",
        "resume" => "resumed",
        "cancel" => "canceled",
        _ => "changed",
    };
    Ok(see_other(&format!(
        "/console/end-users/{}?notice={done}",
        segment(end_user)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(
        seq: i64,
        day: i64,
        hour: i64,
        entry_type: &str,
        amount: i64,
        balance_after: i64,
    ) -> EntryPoint {
        EntryPoint {
            seq,
            entry_type: entry_type.into(),
            created_at: Timestamp::from_millis(day * DAY_MS + hour * 3_600_000),
            amount,
            balance_after,
        }
    }

    // Days close on their last entry's balance, carry it over quiet days, count debits
    // and commits as use, and open on the newest entry before the window.
    #[test]
    fn days_close_on_their_last_entry() {
        let first = 100;
        let points = vec![
            point(5, first + 2, 9, "debit", 4, 86),
            point(4, first + 2, 8, "commit", -10, 90),
            point(3, first, 1, "grant", 50, 100),
            point(2, first - 3, 0, "debit", 5, 50),
            point(1, first - 4, 0, "grant", 55, 55),
        ];
        let days = bucket(&points, first, false);
        assert_eq!(days.len(), CHART_DAYS);
        assert_eq!(
            days[0],
            chart::Day {
                balance: 100,
                used: 0
            }
        );
        assert_eq!(
            days[1],
            chart::Day {
                balance: 100,
                used: 0
            }
        );
        assert_eq!(
            days[2],
            chart::Day {
                balance: 86,
                used: 14
            }
        );
        assert_eq!(days[29].balance, 86);
        // Nothing before the window: zero when the history is whole, else the oldest read.
        let recent = &points[..2];
        assert_eq!(bucket(recent, first, false)[0].balance, 0);
        assert_eq!(bucket(recent, first, true)[0].balance, 90);
        // Out of seq order in time: the later stamp closes the day.
        let skewed = vec![
            point(9, first, 5, "debit", 1, 7),
            point(8, first, 6, "debit", 1, 8),
        ];
        assert_eq!(bucket(&skewed, first, false)[0].balance, 8);
    }
}
