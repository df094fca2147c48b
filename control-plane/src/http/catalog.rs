//! The catalog (SPEC 10.1): features, plans, variants and settings.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ledger::{PlanId, VariantId};
use protocol::{
    CreateFeature, CreatePlan, CreateVariant, Feature, Page, Plan, PlanFeature, Problem, Settings,
    UpdateSettings, Variant,
};

use super::extract::{Act, ApiPath, Call, parse_json};
use super::idempotency::{self, Done, Incoming};
use crate::auth::Scope;
use crate::catalog::CatalogView;
use crate::clock::UlidSource;
use crate::error::ApiError;
use crate::limits;
use crate::service::{AppState, Caller};
use crate::store::CatalogRecord;

fn feature_wire(record: &CatalogRecord<CreateFeature>) -> Feature {
    Feature {
        id: record.id.clone(),
        key: record.key.clone(),
        name: record.body.name.clone(),
        feature_type: record.body.feature_type,
        pricing: record.body.pricing.clone(),
        requires_plan: record.body.requires_plan,
        created_at: record.created_at.into(),
    }
}

fn plan_wire(view: &CatalogView, record: &CatalogRecord<CreatePlan>) -> Plan {
    let variants = view
        .variants
        .iter()
        .filter(|variant| variant.parent_id.as_deref() == Some(record.id.as_str()))
        .map(|variant| {
            Variant::from_request(&variant.id, &record.id, &variant.body, variant.archived)
        })
        .collect();
    Plan {
        id: record.id.clone(),
        key: record.key.clone(),
        name: record.body.name.clone(),
        kind: record.body.kind,
        features: record
            .body
            .features
            .iter()
            .map(|(key, feature)| {
                (
                    key.clone(),
                    PlanFeature {
                        enabled: feature.enabled,
                    },
                )
            })
            .collect(),
        overage_policy: record.body.overage_policy,
        variants,
        created_at: record.created_at.into(),
    }
}

/// A plan may only name features that exist.
fn known_features(view: &CatalogView, request: &CreatePlan) -> Result<(), ApiError> {
    match request
        .features
        .keys()
        .find(|key| view.features.iter().all(|feature| &feature.key != *key))
    {
        Some(unknown) => Err(ApiError::bad_request(
            format!("features.{unknown}"),
            format!("feature `{unknown}` does not exist"),
        )),
        None => Ok(()),
    }
}

/// Runs a catalog write under the request's idempotency key and drops the cached catalog.
async fn catalog_write<T, F, Fut>(
    state: &AppState,
    caller: &Caller,
    incoming: &Incoming,
    status: StatusCode,
    write: F,
) -> Response
where
    T: serde::Serialize,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    if let Err(error) = caller.require(Scope::Admin) {
        return error.into_response();
    }
    let env = &caller.env;
    idempotency::run(state, env, incoming, |_key| async move {
        let answer = write().await;
        state.invalidate(env);
        let answer = answer?;
        state.catalog_changed(env).await?;
        Done::json(status, &answer)
    })
    .await
}

/// `POST /v1/features`.
#[utoipa::path(post, path = "/v1/features", tag = "catalog", request_body = CreateFeature,
    responses((status = 201, body = Feature), (status = 400, body = Problem), (status = 409, body = Problem)))]
pub async fn create_feature(call: Call, incoming: Incoming) -> Result<Response, ApiError> {
    let Call { state, caller } = call;
    let request = parse_json::<CreateFeature>(&incoming.headers, &incoming.body, false)?;
    request.to_ledger()?;
    let (state_ref, env) = (&state, &caller.env);
    Ok(catalog_write(
        &state,
        &caller,
        &incoming,
        StatusCode::CREATED,
        || async move {
            let view = state_ref.view(env).await?;
            limits::room_for(
                "features per environment",
                view.features.len(),
                limits::FEATURES_PER_ENVIRONMENT_MAX,
            )?;
            let now = state_ref.real_now();
            let record = CatalogRecord {
                id: format!(
                    "feat_{}",
                    ledger::IdSource::next_id(&mut UlidSource::at(now))
                ),
                key: request.key.clone(),
                parent_id: None,
                body: request,
                archived: false,
                created_at: now,
            };
            state_ref.store().insert_feature(env, &record).await?;
            Ok(feature_wire(&record))
        },
    )
    .await)
}

/// `GET /v1/features`.
#[utoipa::path(get, path = "/v1/features", tag = "catalog", responses((status = 200, body = Page<Feature>)))]
pub async fn list_features(call: Call) -> Result<Json<Page<Feature>>, ApiError> {
    let (state, caller) = call.scoped(Scope::Read)?;
    let view = state.view(&caller.env).await?;
    Ok(Json(Page::whole(view.features.iter().map(feature_wire))))
}

/// `GET /v1/features/{id_or_key}`.
#[utoipa::path(get, path = "/v1/features/{id_or_key}", tag = "catalog", params(("id_or_key" = String, Path)),
    responses((status = 200, body = Feature), (status = 404, body = Problem)))]
pub async fn get_feature(
    call: Call,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Feature>, ApiError> {
    let (state, caller) = call.scoped(Scope::Read)?;
    let view = state.view(&caller.env).await?;
    let record = view
        .features
        .iter()
        .find(|record| record.id == id || record.key == id)
        .ok_or_else(|| ApiError::NotFound(format!("feature `{id}`")))?;
    Ok(Json(feature_wire(record)))
}

/// A catalog object replaced in place keeps its key (`key` asked, `current` stored) and
/// its kind (`fixed`: the field's name, and whether the request changes it).
fn same_identity(
    what: &str,
    key: &str,
    current: &str,
    fixed: (&'static str, bool),
) -> Result<(), ApiError> {
    if key != current {
        let detail = format!("must be the {what}'s key `{current}`: keys can't change");
        return Err(ApiError::bad_request("key", detail));
    }
    let (field, changed) = fixed;
    if changed {
        let detail =
            format!("a {what}'s {field} can't change; create a {what} with a new key instead");
        return Err(ApiError::bad_request(field, detail));
    }
    Ok(())
}

/// `PUT /v1/features/{id_or_key}`: replaces a feature's name, pricing and plan gating
/// (what catalog-as-code updates). The key and type can't change: usage already recorded
/// and plans refer to them. A new price applies from the next usage on; recorded entries
/// keep the cost they were charged.
#[utoipa::path(put, path = "/v1/features/{id_or_key}", tag = "catalog", params(("id_or_key" = String, Path)),
    request_body = CreateFeature,
    responses((status = 200, body = Feature), (status = 400, body = Problem), (status = 404, body = Problem)))]
pub async fn replace_feature(act: Act) -> Result<Response, ApiError> {
    let (state, caller, id, incoming) = act.into_parts();
    let request = parse_json::<CreateFeature>(&incoming.headers, &incoming.body, false)?;
    request.to_ledger()?;
    let (state_ref, env) = (&state, &caller.env);
    Ok(
        catalog_write(&state, &caller, &incoming, StatusCode::OK, || async move {
            let view = state_ref.view(env).await?;
            let current = view
                .features
                .iter()
                .find(|record| record.id == id || record.key == id)
                .ok_or_else(|| ApiError::NotFound(format!("feature `{id}`")))?;
            let kind_changed = request.feature_type != current.body.feature_type;
            same_identity(
                "feature",
                &request.key,
                &current.key,
                ("type", kind_changed),
            )?;
            let record = CatalogRecord {
                body: request,
                ..current.clone()
            };
            if !state_ref.store().update_feature(env, &record).await? {
                return Err(ApiError::NotFound(format!("feature `{id}`")));
            }
            Ok(feature_wire(&record))
        })
        .await,
    )
}

/// `POST /v1/plans`.
#[utoipa::path(post, path = "/v1/plans", tag = "catalog", request_body = CreatePlan,
    responses((status = 201, body = Plan), (status = 400, body = Problem), (status = 409, body = Problem)))]
pub async fn create_plan(call: Call, incoming: Incoming) -> Result<Response, ApiError> {
    let Call { state, caller } = call;
    let request = parse_json::<CreatePlan>(&incoming.headers, &incoming.body, false)?;
    let (state_ref, env) = (&state, &caller.env);
    Ok(catalog_write(
        &state,
        &caller,
        &incoming,
        StatusCode::CREATED,
        || async move {
            let now = state_ref.real_now();
            let id = PlanId::new(&mut UlidSource::at(now));
            request.to_ledger(id)?;
            let view = state_ref.view(env).await?;
            limits::room_for(
                "plans per environment",
                view.plans.len(),
                limits::PLANS_PER_ENVIRONMENT_MAX,
            )?;
            known_features(&view, &request)?;
            let record = CatalogRecord {
                id: id.to_string(),
                key: request.key.clone(),
                parent_id: None,
                body: request,
                archived: false,
                created_at: now,
            };
            state_ref.store().insert_plan(env, &record).await?;
            state_ref.invalidate(env);
            let view = state_ref.view(env).await?;
            Ok(plan_wire(&view, &record))
        },
    )
    .await)
}

/// `GET /v1/plans`.
#[utoipa::path(get, path = "/v1/plans", tag = "catalog", responses((status = 200, body = Page<Plan>)))]
pub async fn list_plans(call: Call) -> Result<Json<Page<Plan>>, ApiError> {
    let (state, caller) = call.scoped(Scope::Read)?;
    let view = state.view(&caller.env).await?;
    Ok(Json(Page {
        data: view
            .plans
            .iter()
            .map(|record| plan_wire(&view, record))
            .collect(),
        next_cursor: None,
    }))
}

/// `GET /v1/plans/{id_or_key}`.
#[utoipa::path(get, path = "/v1/plans/{id_or_key}", tag = "catalog", params(("id_or_key" = String, Path)),
    responses((status = 200, body = Plan), (status = 404, body = Problem)))]
pub async fn get_plan(call: Call, ApiPath(id): ApiPath<String>) -> Result<Json<Plan>, ApiError> {
    let (state, caller) = call.scoped(Scope::Read)?;
    let view = state.view(&caller.env).await?;
    let record = view
        .find_plan(&id)
        .ok_or_else(|| ApiError::NotFound(format!("plan `{id}`")))?;
    Ok(Json(plan_wire(&view, record)))
}

/// `PUT /v1/plans/{id_or_key}`: replaces a plan's name, features and overage policy. The
/// key and kind can't change. Variants (price points) are immutable: add a variant with a
/// new key and archive the old one.
#[utoipa::path(put, path = "/v1/plans/{id_or_key}", tag = "catalog", params(("id_or_key" = String, Path)),
    request_body = CreatePlan,
    responses((status = 200, body = Plan), (status = 400, body = Problem), (status = 404, body = Problem)))]
pub async fn replace_plan(act: Act) -> Result<Response, ApiError> {
    let (state, caller, id, incoming) = act.into_parts();
    let request = parse_json::<CreatePlan>(&incoming.headers, &incoming.body, false)?;
    let (state_ref, env) = (&state, &caller.env);
    Ok(
        catalog_write(&state, &caller, &incoming, StatusCode::OK, || async move {
            let view = state_ref.view(env).await?;
            let current = view
                .find_plan(&id)
                .ok_or_else(|| ApiError::NotFound(format!("plan `{id}`")))?;
            let plan_id: PlanId = current.id.parse().map_err(ApiError::Internal)?;
            request.to_ledger(plan_id)?;
            let kind_changed = request.kind != current.body.kind;
            same_identity("plan", &request.key, &current.key, ("kind", kind_changed))?;
            known_features(&view, &request)?;
            let record = CatalogRecord {
                body: request,
                ..current.clone()
            };
            if !state_ref.store().update_plan(env, &record).await? {
                return Err(ApiError::NotFound(format!("plan `{id}`")));
            }
            state_ref.invalidate(env);
            let view = state_ref.view(env).await?;
            Ok(plan_wire(&view, &record))
        })
        .await,
    )
}

/// `POST /v1/plans/{id_or_key}/variants`.
#[utoipa::path(post, path = "/v1/plans/{id_or_key}/variants", tag = "catalog", params(("id_or_key" = String, Path)), request_body = CreateVariant,
    responses((status = 201, body = Variant), (status = 400, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn create_variant(act: Act) -> Result<Response, ApiError> {
    let (state, caller, plan, incoming) = act.into_parts();
    let request = parse_json::<CreateVariant>(&incoming.headers, &incoming.body, false)?;
    let (state_ref, env) = (&state, &caller.env);
    Ok(catalog_write(
        &state,
        &caller,
        &incoming,
        StatusCode::CREATED,
        || async move {
            let view = state_ref.view(env).await?;
            let plan = view
                .find_plan(&plan)
                .ok_or_else(|| ApiError::NotFound(format!("plan `{plan}`")))?;
            let plan_id: PlanId = plan.id.parse().map_err(ApiError::Internal)?;
            limits::room_for(
                "plan variants per environment",
                view.variants.len(),
                limits::VARIANTS_PER_ENVIRONMENT_MAX,
            )?;
            let now = state_ref.real_now();
            let id = VariantId::new(&mut UlidSource::at(now));
            let variant = request.to_ledger(id, plan_id)?;
            for (index, template) in variant.grants.iter().enumerate() {
                if let Some(keys) = &template.feature_keys
                    && let Some(unknown) =
                        keys.iter().find(|key| view.catalog.feature(key).is_none())
                {
                    return Err(ApiError::bad_request(
                        format!("grants[{index}].feature_keys"),
                        format!("feature `{unknown}` does not exist"),
                    ));
                }
            }
            let record = CatalogRecord {
                id: id.to_string(),
                key: request.key.clone(),
                parent_id: Some(plan.id.clone()),
                body: request,
                archived: false,
                created_at: now,
            };
            state_ref.store().insert_variant(env, &record).await?;
            Ok(Variant::from_request(
                &record.id,
                &plan.id,
                &record.body,
                false,
            ))
        },
    )
    .await)
}

/// `POST /v1/plans/{plan}/variants/{variant}/archive`: a variant with subscriptions is
/// never deleted; archived, it takes no new subscriptions.
#[utoipa::path(post, path = "/v1/plans/{plan}/variants/{variant}/archive", tag = "catalog",
    params(("plan" = String, Path), ("variant" = String, Path)),
    responses((status = 200, body = Variant), (status = 404, body = Problem)))]
pub async fn archive_variant(
    call: Call,
    ApiPath((plan, variant)): ApiPath<(String, String)>,
    incoming: Incoming,
) -> Response {
    let Call { state, caller } = call;
    let (state_ref, env) = (&state, &caller.env);
    catalog_write(&state, &caller, &incoming, StatusCode::OK, || async move {
        let view = state_ref.view(env).await?;
        let plan = view
            .find_plan(&plan)
            .ok_or_else(|| ApiError::NotFound(format!("plan `{plan}`")))?;
        let record = view
            .variants
            .iter()
            .find(|record| {
                record.parent_id.as_deref() == Some(plan.id.as_str())
                    && (record.id == variant || record.key == variant)
            })
            .ok_or_else(|| ApiError::NotFound(format!("variant `{variant}`")))?;
        state_ref
            .store()
            .set_variant_archived(env, &record.id, true)
            .await?;
        Ok(Variant::from_request(
            &record.id,
            &plan.id,
            &record.body,
            true,
        ))
    })
    .await
}

/// `GET /v1/settings`.
#[utoipa::path(get, path = "/v1/settings", tag = "catalog", responses((status = 200, body = Settings)))]
pub async fn get_settings(call: Call) -> Result<Json<Settings>, ApiError> {
    let (state, caller) = call.scoped(Scope::Read)?;
    Ok(Json(state.view(&caller.env).await?.env.settings.clone()))
}

/// `PATCH /v1/settings`: the free plan variant and the low-balance threshold.
#[utoipa::path(patch, path = "/v1/settings", tag = "catalog", request_body = UpdateSettings,
    responses((status = 200, body = Settings), (status = 400, body = Problem)))]
pub async fn update_settings(call: Call, incoming: Incoming) -> Result<Response, ApiError> {
    let Call { state, caller } = call;
    let request = parse_json::<UpdateSettings>(&incoming.headers, &incoming.body, false)?;
    let (state_ref, env) = (&state, &caller.env);
    Ok(
        catalog_write(&state, &caller, &incoming, StatusCode::OK, || async move {
            let view = state_ref.view(env).await?;
            let mut settings = view.env.settings.clone();
            if let Some(variant) = request.free_plan_variant_id {
                settings.free_plan_variant_id = match variant {
                    None => None,
                    Some(text) => {
                        let record = view.find_variant(&text).ok_or_else(|| {
                            ApiError::bad_request(
                                "free_plan_variant_id",
                                format!("no plan variant `{text}`"),
                            )
                        })?;
                        let plan = view
                            .plans
                            .iter()
                            .find(|plan| Some(plan.id.as_str()) == record.parent_id.as_deref());
                        if plan.is_none_or(|plan| plan.body.kind != protocol::PlanKindWire::Base) {
                            return Err(ApiError::bad_request(
                                "free_plan_variant_id",
                                "must be a variant of a base plan",
                            ));
                        }
                        Some(record.id.clone())
                    }
                };
            }
            if let Some(threshold) = request.low_balance_threshold {
                if threshold.is_some_and(|value| value < 0) {
                    return Err(ApiError::bad_request(
                        "low_balance_threshold",
                        "must not be negative",
                    ));
                }
                settings.low_balance_threshold = threshold;
            }
            state_ref.store().put_settings(env, &settings).await?;
            Ok(settings)
        })
        .await,
    )
}
