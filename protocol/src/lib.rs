//! `protocol`: the shapes QuotaStack speaks on the wire (SPEC 13 and 14), shared by the
//! control plane, the client and the proxy.
//!
//! Every type here is a serde struct with an OpenAPI schema. Requests are parsed and then
//! turned into `ledger` requests with `into_ledger`-style functions that name the field
//! at fault; answers are built from `ledger` values with `From` conversions. Times are
//! RFC 3339 strings in UTC; amounts are integers; ids are prefixed strings.

mod catalog;
pub mod clock;
mod credits;
mod events;
pub mod frames;
mod leases;
mod problem;
mod subscriptions;
mod sync;
mod tenancy;
mod time;
mod usage;
mod webhooks;

pub use catalog::*;
pub use credits::*;
pub use events::*;
pub use leases::*;
pub use problem::*;
pub use subscriptions::*;
pub use sync::*;
pub use tenancy::*;
pub use time::WireTime;
pub use usage::*;
pub use webhooks::*;

use serde::{Deserialize, Serialize};

/// A request field that could not be accepted, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// One page of a list (SPEC 13): `?limit=` (default 50, max 500) and `?cursor=`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    /// Pass as `?cursor=` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// The only page: a list that is not paged.
    pub fn whole(data: impl IntoIterator<Item = T>) -> Page<T> {
        Page {
            data: data.into_iter().collect(),
            next_cursor: None,
        }
    }
}

/// The default and largest page sizes.
pub const PAGE_LIMIT_DEFAULT: u32 = 50;
pub const PAGE_LIMIT_MAX: u32 = 500;

/// Parses an end user id, naming `field` when it is refused.
pub fn end_user_id(field: &str, text: &str) -> Result<ledger::EndUserId, FieldError> {
    ledger::EndUserId::new(text).map_err(|error| FieldError::new(field, error.to_string()))
}

/// Parses a feature key, naming `field` when it is refused.
pub fn feature_key(field: &str, text: &str) -> Result<ledger::FeatureKey, FieldError> {
    ledger::FeatureKey::new(text).map_err(|error| {
        FieldError::new(
            field,
            format!("{error} (feature keys are [a-z0-9_.-]{{1,64}})"),
        )
    })
}

/// Parses an optional list of feature keys.
pub fn feature_keys(
    field: &str,
    keys: Option<&[String]>,
) -> Result<Option<std::sync::Arc<[ledger::FeatureKey]>>, FieldError> {
    let Some(keys) = keys else { return Ok(None) };
    let parsed: Result<Vec<ledger::FeatureKey>, FieldError> = keys
        .iter()
        .enumerate()
        .map(|(index, key)| feature_key(&format!("{field}[{index}]"), key))
        .collect();
    Ok(Some(std::sync::Arc::from(parsed?)))
}

/// Parses units: a positive integer up to 10^12.
pub fn units(field: &str, value: u64) -> Result<ledger::Units, FieldError> {
    ledger::Units::new(value)
        .ok_or_else(|| FieldError::new(field, format!("must be 1 to {}", ledger::UNITS_MAX)))
}
