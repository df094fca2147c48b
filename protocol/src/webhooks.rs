//! Webhook endpoints (SPEC 11).

use serde::{Deserialize, Serialize};

use crate::WireTime;

/// `POST /v1/webhook-endpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookEndpoint {
    /// `http` or `https`.
    pub url: String,
    /// Event types to deliver (`credits.low`, `subscription.renewed`, …); absent: all.
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
}

/// `PATCH /v1/webhook-endpoints/{id}`: only the fields present change.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWebhookEndpoint {
    #[serde(default)]
    pub url: Option<String>,
    /// `null` delivers every type again.
    #[serde(default, with = "crate::double_option")]
    #[schema(value_type = Option<Vec<String>>)]
    pub event_types: Option<Option<Vec<String>>>,
}

/// A webhook endpoint (the secret only in the creation answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookEndpoint {
    pub id: String,
    pub url: String,
    pub event_types: Option<Vec<String>>,
    pub created_at: WireTime,
    pub updated_at: WireTime,
    /// `whsec_<base64>`: verify signatures with it. Shown once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// Every event type a webhook can carry (`webhook.test` is the test ping).
pub const EVENT_TYPES: [&str; 20] = [
    "credits.granted",
    "credits.expired",
    "credits.voided",
    "credits.low",
    "credits.depleted",
    "reservation.created",
    "reservation.committed",
    "reservation.released",
    "reservation.expired",
    "subscription.created",
    "subscription.trial_ending",
    "subscription.renewal_due",
    "subscription.renewed",
    "subscription.past_due",
    "subscription.paused",
    "subscription.resumed",
    "subscription.changed",
    "subscription.canceled",
    "subscription.expired",
    "webhook.test",
];
