//! Webhook endpoints and redelivery (SPEC 11).

use axum::Json;
use axum::http::StatusCode;
use axum::response::Response;
use protocol::{CreateWebhookEndpoint, Page, Problem, UpdateWebhookEndpoint, WebhookEndpoint};

use super::extract::{Act, ApiPath, Call, parse_json};
use super::idempotency::{self, Done, Incoming};
use crate::auth::Scope;
use crate::clock::UlidSource;
use crate::error::ApiError;
use crate::limits;
use crate::service::AppState;
use crate::store::{EndpointRecord, Env};
use crate::webhooks;

fn wire(record: &EndpointRecord, secret: Option<String>) -> WebhookEndpoint {
    WebhookEndpoint {
        id: record.id.clone(),
        url: record.url.clone(),
        event_types: record.event_types.clone(),
        created_at: record.created_at.into(),
        updated_at: record.updated_at.into(),
        secret,
    }
}

fn check_event_types(types: Option<&[String]>) -> Result<(), ApiError> {
    let Some(types) = types else { return Ok(()) };
    if types.is_empty() {
        return Err(ApiError::bad_request(
            "event_types",
            "must list at least one type when present (omit it for all)",
        ));
    }
    if let Some(unknown) = types
        .iter()
        .find(|event_type| !protocol::EVENT_TYPES.contains(&event_type.as_str()))
    {
        return Err(ApiError::bad_request(
            "event_types",
            format!("`{unknown}` is not an event type"),
        ));
    }
    Ok(())
}

async fn find(state: &AppState, env: &Env, id: &str) -> Result<EndpointRecord, ApiError> {
    let endpoints = state.store().endpoints(env).await?;
    endpoints
        .into_iter()
        .find(|endpoint| endpoint.id == id)
        .ok_or_else(|| ApiError::NotFound(format!("webhook endpoint `{id}`")))
}

/// `POST /v1/webhook-endpoints`: the secret is shown once.
#[utoipa::path(post, path = "/v1/webhook-endpoints", tag = "webhooks", request_body = CreateWebhookEndpoint,
    responses((status = 201, body = WebhookEndpoint), (status = 400, body = Problem)))]
pub async fn create(call: Call, incoming: Incoming) -> Result<Response, ApiError> {
    let (state, caller) = call.scoped(Scope::Admin)?;
    let request: CreateWebhookEndpoint = parse_json(&incoming.headers, &incoming.body, false)?;
    webhooks::validate_url(&request.url, state.config().webhooks_allow_private)
        .map_err(|message| ApiError::bad_request("url", message))?;
    check_event_types(request.event_types.as_deref())?;
    let (state, env) = (&state, &caller.env);
    Ok(idempotency::run(state, env, &incoming, |_key| async move {
        let existing = state.store().endpoints(env).await?.len();
        limits::room_for(
            "webhook endpoints per environment",
            existing,
            limits::ENDPOINTS_PER_ENVIRONMENT_MAX,
        )?;
        let now = state.real_now();
        let record = EndpointRecord {
            id: format!("we_{}", ledger::IdSource::next_id(&mut UlidSource::at(now))),
            url: request.url.clone(),
            event_types: request.event_types.clone(),
            secret: webhooks::generate_secret(),
            created_at: now,
            updated_at: now,
        };
        state.store().insert_endpoint(env, &record).await?;
        Done::json(
            StatusCode::CREATED,
            &wire(&record, Some(record.secret.clone())),
        )
    })
    .await)
}

/// `GET /v1/webhook-endpoints`.
#[utoipa::path(get, path = "/v1/webhook-endpoints", tag = "webhooks", responses((status = 200, body = Page<WebhookEndpoint>)))]
pub async fn list(call: Call) -> Result<Json<Page<WebhookEndpoint>>, ApiError> {
    let (state, caller) = call.scoped(Scope::Admin)?;
    let endpoints = state.store().endpoints(&caller.env).await?;
    let page = Page::whole(endpoints.iter().map(|record| wire(record, None)));
    Ok(Json(page))
}

/// `GET /v1/webhook-endpoints/{id}`.
#[utoipa::path(get, path = "/v1/webhook-endpoints/{id}", tag = "webhooks", params(("id" = String, Path)),
    responses((status = 200, body = WebhookEndpoint), (status = 404, body = Problem)))]
pub async fn get(
    call: Call,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<WebhookEndpoint>, ApiError> {
    let (state, caller) = call.scoped(Scope::Admin)?;
    Ok(Json(wire(&find(&state, &caller.env, &id).await?, None)))
}

/// `PATCH /v1/webhook-endpoints/{id}`.
#[utoipa::path(patch, path = "/v1/webhook-endpoints/{id}", tag = "webhooks", params(("id" = String, Path)), request_body = UpdateWebhookEndpoint,
    responses((status = 200, body = WebhookEndpoint), (status = 400, body = Problem), (status = 404, body = Problem)))]
pub async fn update(act: Act) -> Result<Json<WebhookEndpoint>, ApiError> {
    let (state, caller, id, incoming) = act.into_parts();
    caller.require(Scope::Admin)?;
    let request: UpdateWebhookEndpoint = parse_json(&incoming.headers, &incoming.body, false)?;
    let mut record = find(&state, &caller.env, &id).await?;
    if let Some(url) = request.url {
        webhooks::validate_url(&url, state.config().webhooks_allow_private)
            .map_err(|message| ApiError::bad_request("url", message))?;
        record.url = url;
    }
    if let Some(types) = request.event_types {
        check_event_types(types.as_deref())?;
        record.event_types = types;
    }
    record.updated_at = state.real_now();
    if !state.store().update_endpoint(&caller.env, &record).await? {
        return Err(ApiError::NotFound(format!("webhook endpoint `{id}`")));
    }
    Ok(Json(wire(&record, None)))
}

/// `DELETE /v1/webhook-endpoints/{id}`: pending deliveries to it are dropped.
#[utoipa::path(delete, path = "/v1/webhook-endpoints/{id}", tag = "webhooks", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = Problem)))]
pub async fn delete(act: Act) -> Result<Response, ApiError> {
    let (state, caller, id, incoming) = act.into_parts();
    caller.require(Scope::Admin)?;
    let (state, env, id) = (&state, &caller.env, &id);
    Ok(idempotency::run(state, env, &incoming, |_key| async move {
        if state
            .store()
            .delete_endpoint(env, id, state.real_now())
            .await?
        {
            Ok(Done::empty(StatusCode::NO_CONTENT))
        } else {
            Err(ApiError::NotFound(format!("webhook endpoint `{id}`")))
        }
    })
    .await)
}

/// `POST /v1/webhook-endpoints/{id}/test`: sends a `webhook.test` event to this endpoint
/// now and answers the event (its delivery attempt included).
#[utoipa::path(post, path = "/v1/webhook-endpoints/{id}/test", tag = "webhooks", params(("id" = String, Path)),
    responses((status = 200, body = protocol::Event), (status = 404, body = Problem)))]
pub async fn test(act: Act) -> Result<Response, ApiError> {
    let (state, caller, id, incoming) = act.into_parts();
    caller.require(Scope::Admin)?;
    let (state, env, id) = (&state, &caller.env, &id);
    Ok(idempotency::run(state, env, &incoming, |_key| async move {
        let endpoint = find(state, env, id).await?;
        let view = state.view(env).await?;
        let now = state.env_now(&view);
        let event = protocol::Event {
            id: ledger::EventId::new(&mut UlidSource::at(now)).to_string(),
            event_type: "webhook.test".into(),
            end_user_id: None,
            created_at: now.into(),
            data: serde_json::json!({ "endpoint_id": endpoint.id }),
            deliveries: Vec::new(),
        };
        state.store().insert_ping(env, &event, &endpoint.id).await?;
        deliver_now(state, env).await?;
        let stored = state
            .store()
            .event(env, &event.id)
            .await?
            .ok_or_else(|| ApiError::Internal("the test event vanished".into()))?;
        Done::json(StatusCode::OK, &stored.event)
    })
    .await)
}

/// `POST /v1/events/{id}/redeliver`: queues the event again for every endpoint that
/// wants it, and tries at once.
#[utoipa::path(post, path = "/v1/events/{id}/redeliver", tag = "events", params(("id" = String, Path)),
    responses((status = 202, body = protocol::Event), (status = 404, body = Problem)))]
pub async fn redeliver(act: Act) -> Result<Response, ApiError> {
    let (state, caller, id, incoming) = act.into_parts();
    caller.require(Scope::Admin)?;
    let (state, env, id) = (&state, &caller.env, &id);
    Ok(idempotency::run(state, env, &incoming, |_key| async move {
        let view = state.view(env).await?;
        state
            .store()
            .event(env, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("event `{id}`")))?;
        state
            .store()
            .redeliver(env, id, state.env_now(&view))
            .await?;
        deliver_now(state, env).await?;
        let stored = state.store().event(env, id).await?;
        let stored = ApiError::found(stored, format_args!("event `{id}`"))?;
        Done::json(StatusCode::ACCEPTED, &stored.event)
    })
    .await)
}

/// Attempts `env`'s deliveries due now, once each, within one attempt's timeout (what the
/// worker holds is left to it).
async fn deliver_now(state: &AppState, env: &Env) -> Result<(), ApiError> {
    let now = state.env_now(&*state.view(env).await?);
    let deadline = tokio::time::Instant::now() + state.config().webhook_timeout;
    webhooks::settle(state.deliveries(), env, now, deadline, false).await?;
    Ok(())
}
