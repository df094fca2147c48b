//! Tenants and API keys (SPEC 2).

use serde::{Deserialize, Serialize};

use crate::WireTime;

/// `POST /v1/operator/tenants`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub name: String,
}

/// One all-scope key per environment, shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TenantKeys {
    pub live: String,
    pub test: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TenantCreated {
    pub id: String,
    pub name: String,
    pub api_keys: TenantKeys,
}

/// `POST /v1/api-keys`: a key for the calling key's tenant and environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    #[serde(default)]
    pub name: Option<String>,
    /// Any of `admin`, `write`, `read`, `sync`, or `["*"]` for all. Not empty.
    pub scopes: Vec<String>,
}

/// An API key (the secret only in the creation answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub name: Option<String>,
    /// `live` or `test`.
    pub environment: String,
    pub scopes: Vec<String>,
    /// The first characters, to recognise the key.
    pub prefix: String,
    pub created_at: WireTime,
    pub revoked_at: Option<WireTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// In a replayed creation answer (same `Idempotency-Key`): the key exists, and its
    /// secret was shown once, in the first answer; it is never stored, so it cannot be
    /// shown again (revoke the key and create another if it was lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_shown_once: Option<bool>,
}
