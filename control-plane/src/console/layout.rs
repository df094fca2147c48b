//! The frame every console page shares, and small rendering helpers.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use ledger::Timestamp;
use maud::{DOCTYPE, Markup, html};

use super::Session;
use crate::auth::Scope;
use crate::store::Environment;

const STYLESHEET: &str = include_str!("style.css");

/// `GET /console/style.css`.
pub async fn stylesheet() -> Response {
    let headers = [
        (header::CONTENT_TYPE, "text/css; charset=utf-8"),
        (header::CACHE_CONTROL, "public, max-age=300"),
    ];
    (headers, STYLESHEET).into_response()
}

/// A page with the signed-in frame: the environment (test in its own colour), the
/// navigation, the test clock and sign-out.
pub fn page(session: &Session, title: &str, now: Timestamp, body: Markup) -> Markup {
    let environment = session.env().environment;
    let test = environment == Environment::Test;
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body class=(environment.as_str()) {
                header {
                    span.brand { "QuotaStack" }
                    span.env.(environment.as_str()) id="environment" { (environment.as_str()) }
                    span.mono.muted { (session.env().tenant_id) }
                    nav {
                        @if session.may(Scope::Read) {
                            a href="/console/end-users" { "End users" }
                            a href="/console/explain" { "Explain" }
                            a href="/console/catalog" { "Catalog" }
                        }
                        @if session.may(Scope::Admin) {
                            a href="/console/webhooks" { "Webhooks" }
                            a href="/console/proxies" { "Proxies" }
                        }
                    }
                    div.right {
                        span.muted id="clock" title="The environment's time" {
                            @if test { "Test clock " } @else { "Now " }
                            (time(now))
                        }
                        @if test {
                            form.inline method="post" action="/console/clock/advance" {
                                input type="hidden" name="csrf" value=(session.csrf);
                                select name="seconds" aria-label="Advance the test clock by" {
                                    option value="3600" { "+1 hour" }
                                    option value="86400" { "+1 day" }
                                    option value="604800" { "+7 days" }
                                    option value="2592000" { "+30 days" }
                                }
                                " "
                                button.secondary type="submit" id="advance-clock" { "Advance" }
                            }
                        }
                        @if session.operator { span.muted { "operator" } }
                        form.inline method="post" action="/console/logout" {
                            input type="hidden" name="csrf" value=(session.csrf);
                            button.secondary type="submit" id="sign-out" { "Sign out" }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

/// Every page's `<head>`: the stylesheet, and an empty icon (no request for one).
fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · QuotaStack" }
            link rel="stylesheet" href="/console/style.css";
            link rel="icon" href="data:,";
        }
    }
}

/// A page without the frame (sign-in, problems before a session).
pub fn bare(title: &str, body: &Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body { main { (body) } }
        }
    }
}

/// A problem as the API answered it, with a way back.
pub fn problem(title: &str, detail: &str) -> Markup {
    html! {
        div.problem role="alert" id="problem" {
            strong { (title) } ": " (detail)
        }
        p { a href="/console/end-users" { "Back to the console" } }
    }
}

/// An instant as RFC 3339 (UTC, to the second).
pub fn time(at: Timestamp) -> String {
    let text = at.to_string();
    match text.split_once('.') {
        Some((seconds, _)) => format!("{seconds}Z"),
        None => text,
    }
}

/// An optional instant, or a dash.
pub fn time_opt(at: Option<Timestamp>) -> String {
    at.map_or_else(|| "—".to_owned(), time)
}

/// A notice shown after an action (fixed texts, chosen by code: nothing from the query
/// string is shown as text).
pub fn notice(code: Option<&str>) -> Markup {
    let text = match code {
        Some("granted") => "Credits granted.",
        Some("adjusted") => "Balance adjusted.",
        Some("renewed") => "Subscription renewed.",
        Some("paused") => "Subscription paused.",
        Some("resumed") => "Subscription resumed.",
        Some("canceled") => "Subscription canceled.",
        Some("changed") => "Subscription changed.",
        Some("redelivered") => "Event queued for delivery again.",
        Some("advanced") => "Test clock advanced.",
        _ => return html! {},
    };
    html! { div.notice role="status" id="notice" { (text) } }
}
