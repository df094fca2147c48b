//! Tenants (operator), API keys and the event log (SPEC 2, 11).

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use protocol::{
    ApiKey, CreateApiKey, CreateTenant, Event, Page, Problem, TenantCreated, TenantKeys,
};
use serde::Deserialize;

use super::credits::{page_limit, seq_cursor};
use super::extract::{Act, ApiPath, Call, parse_json, parse_query, presented_key};
use super::idempotency::{self, Done, Incoming};
use crate::auth::{self, Scope};
use crate::clock::UlidSource;
use crate::error::ApiError;
use crate::limits;
use crate::service::AppState;
use crate::store::{ApiKeyRecord, Environment, TenantRecord};

/// Creates a tenant with one all-scope key per environment: the operator endpoint and
/// the CLI share this.
///
/// # Errors
/// 400 for an empty or overlong name; store failures.
pub async fn create_tenant(state: &AppState, name: &str) -> Result<TenantCreated, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(ApiError::bad_request("name", "must be 1 to 200 characters"));
    }
    let now = state.real_now();
    let mut ids = UlidSource::at(now);
    let tenant = TenantRecord {
        id: format!("ten_{}", ledger::IdSource::next_id(&mut ids)),
        name: name.to_owned(),
        created_at: now,
    };
    let live = auth::generate_key(Environment::Live);
    let test = auth::generate_key(Environment::Test);
    let records: Vec<ApiKeyRecord> = [(Environment::Live, &live), (Environment::Test, &test)]
        .into_iter()
        .map(|(environment, key)| ApiKeyRecord {
            id: format!("key_{}", ledger::IdSource::next_id(&mut ids)),
            tenant_id: tenant.id.clone(),
            environment,
            name: Some("default".into()),
            scopes: vec!["*".into()],
            prefix: key.prefix.clone(),
            key_hash: key.hash,
            created_at: now,
            revoked_at: None,
        })
        .collect();
    state.store().create_tenant(&tenant, &records).await?;
    tracing::info!(tenant = %tenant.id, "tenant created");
    Ok(TenantCreated {
        id: tenant.id,
        name: tenant.name,
        api_keys: TenantKeys {
            live: live.secret,
            test: test.secret,
        },
    })
}

/// `POST /v1/operator/tenants`: authorised by the operator token from the configuration.
#[utoipa::path(post, path = "/v1/operator/tenants", tag = "operator", request_body = CreateTenant,
    responses((status = 201, body = TenantCreated), (status = 401, body = Problem)))]
pub async fn operator_create_tenant(
    State(state): State<AppState>,
    connect: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let client = connect.map(|axum::Extension(axum::extract::ConnectInfo(address))| address.ip());
    let presented = presented_key(&headers).ok_or(ApiError::Unauthorized)?;
    state.check_operator_token(&presented, client)?;
    let request: CreateTenant = parse_json(&headers, &body, false)?;
    let created = create_tenant(&state, &request.name).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

fn key_wire(record: &ApiKeyRecord, secret: Option<String>) -> ApiKey {
    ApiKey {
        id: record.id.clone(),
        name: record.name.clone(),
        environment: record.environment.as_str().to_owned(),
        scopes: record.scopes.clone(),
        prefix: record.prefix.clone(),
        created_at: record.created_at.into(),
        revoked_at: record.revoked_at.map(protocol::WireTime),
        secret,
        secret_shown_once: None,
    }
}

/// `POST /v1/api-keys`: a new key for the caller's tenant and environment.
#[utoipa::path(post, path = "/v1/api-keys", tag = "keys", request_body = CreateApiKey,
    responses((status = 201, body = ApiKey), (status = 400, body = Problem), (status = 403, body = Problem)))]
pub async fn create_key(call: Call, incoming: Incoming) -> Result<Response, ApiError> {
    let (state, caller) = call.scoped(Scope::Admin)?;
    let request: CreateApiKey = parse_json(&incoming.headers, &incoming.body, false)?;
    let scopes = auth::validate_scopes(&request.scopes)
        .map_err(|message| ApiError::bad_request("scopes", message))?;
    if let Some(scope) = auth::beyond(&scopes, &caller.scopes) {
        return Err(ApiError::MissingScope(scope));
    }
    if request.name.as_ref().is_some_and(|name| name.len() > 200) {
        return Err(ApiError::bad_request(
            "name",
            "must be at most 200 characters",
        ));
    }
    let (state, env) = (&state, &caller.env);
    Ok(idempotency::run(state, env, &incoming, |_key| async move {
        let live = state
            .store()
            .list_api_keys(env)
            .await?
            .iter()
            .filter(|key| key.revoked_at.is_none())
            .count();
        limits::room_for(
            "API keys per environment",
            live,
            limits::KEYS_PER_ENVIRONMENT_MAX,
        )?;
        let now = state.real_now();
        let key = auth::generate_key(env.environment);
        let record = ApiKeyRecord {
            id: format!(
                "key_{}",
                ledger::IdSource::next_id(&mut UlidSource::at(now))
            ),
            tenant_id: env.tenant_id.clone(),
            environment: env.environment,
            name: request.name.clone(),
            scopes: scopes.clone(),
            prefix: key.prefix.clone(),
            key_hash: key.hash,
            created_at: now,
            revoked_at: None,
        };
        state.store().insert_api_key(&record).await?;
        // The secret is shown once: a replay of this request answers the key without it.
        let replay = ApiKey {
            secret_shown_once: Some(true),
            ..key_wire(&record, None)
        };
        Done::json_once(
            StatusCode::CREATED,
            &key_wire(&record, Some(key.secret)),
            &replay,
        )
    })
    .await)
}

/// `GET /v1/api-keys`: keys of the caller's environment, without secrets.
#[utoipa::path(get, path = "/v1/api-keys", tag = "keys", responses((status = 200, body = Page<ApiKey>)))]
pub async fn list_keys(call: Call) -> Result<Json<Page<ApiKey>>, ApiError> {
    let (state, caller) = call.scoped(Scope::Admin)?;
    let keys = state.store().list_api_keys(&caller.env).await?;
    let page = Page::whole(keys.iter().map(|record| key_wire(record, None)));
    Ok(Json(page))
}

/// `POST /v1/api-keys/{id}/revoke`: the key stops working at once (in this process; other
/// replicas within seconds).
#[utoipa::path(post, path = "/v1/api-keys/{id}/revoke", tag = "keys", params(("id" = String, Path)),
    responses((status = 200, body = ApiKey), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn revoke_key(act: Act) -> Result<Response, ApiError> {
    let (state, caller, id, incoming) = act.into_parts();
    caller.require(Scope::Admin)?;
    // A key never revokes itself: the environment always keeps a key that can manage
    // keys, so a tenant cannot lock itself out by accident.
    if id == caller.key_id {
        return Err(ApiError::Conflict(
            "a key cannot revoke itself: revoke it with another key that has the admin scope"
                .into(),
        ));
    }
    let (state, env, id) = (&state, &caller.env, &id);
    Ok(idempotency::run(state, env, &incoming, |_key| async move {
        let record = state
            .store()
            .revoke_api_key(env, id, state.real_now())
            .await?;
        let record = ApiError::found(record, format_args!("API key `{id}`"))?;
        state.forget_key(&record.key_hash);
        Done::json(StatusCode::OK, &key_wire(&record, None))
    })
    .await)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    #[serde(default)]
    #[param(pattern = r"^[0-9]{1,18}$")]
    pub cursor: Option<String>,
    #[serde(default)]
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// `GET /v1/events`: the environment's log, oldest first, resumable by cursor.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventsQuery),
    responses((status = 200, body = Page<Event>), (status = 400, body = Problem)))]
pub async fn list_events(call: Call, uri: Uri) -> Result<Json<Page<Event>>, ApiError> {
    let (state, caller) = call.scoped(Scope::Read)?;
    let query: EventsQuery = parse_query(&uri)?;
    let limit = page_limit(query.limit)?;
    let records = state
        .store()
        .events(&caller.env, seq_cursor(query.cursor.as_deref())?, limit)
        .await?;
    // A log is read by following it: the cursor always points after what was returned, so
    // a consumer polls with it even when the page was not full.
    let next_cursor = records
        .last()
        .map(|record| record.seq.to_string())
        .or(query.cursor);
    Ok(Json(Page {
        data: records.into_iter().map(|record| record.event).collect(),
        next_cursor,
    }))
}

/// `GET /v1/events/{id}`.
#[utoipa::path(get, path = "/v1/events/{id}", tag = "events", params(("id" = String, Path)),
    responses((status = 200, body = Event), (status = 404, body = Problem)))]
pub async fn get_event(call: Call, ApiPath(id): ApiPath<String>) -> Result<Json<Event>, ApiError> {
    let (state, caller) = call.scoped(Scope::Read)?;
    let record = state.store().event(&caller.env, &id).await?;
    let record = ApiError::found(record, format_args!("event `{id}`"))?;
    Ok(Json(record.event))
}
