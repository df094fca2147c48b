//! Events in the environment's log (SPEC 11).

use serde::{Deserialize, Serialize};

use crate::WireTime;

/// One delivery attempt of an event to a webhook endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Delivery {
    pub endpoint_id: String,
    pub attempt: u32,
    pub status: String,
    pub response_status: Option<u16>,
    pub at: WireTime,
}

/// An event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub end_user_id: Option<String>,
    pub created_at: WireTime,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub deliveries: Vec<Delivery>,
}

/// The `data` of an engine event.
pub fn event_data(kind: &ledger::EventKind) -> serde_json::Value {
    use ledger::{EventKind, SubscriptionChange};
    use serde_json::json;
    match kind {
        EventKind::CreditsGranted {
            block_id,
            amount,
            source,
        } => {
            json!({ "block_id": block_id.to_string(), "amount": amount.get(), "source": crate::BlockSourceWire::from(*source) })
        }
        EventKind::CreditsExpired { block_id, amount }
        | EventKind::CreditsVoided { block_id, amount } => {
            json!({ "block_id": block_id.to_string(), "amount": amount.get() })
        }
        EventKind::CreditsLow {
            available,
            threshold,
        } => json!({ "available": available.get(), "threshold": threshold.get() }),
        EventKind::CreditsDepleted => json!({ "available": 0 }),
        EventKind::ReservationCreated {
            reservation_id,
            feature_key,
            amount,
        } => {
            json!({ "reservation_id": reservation_id.to_string(), "feature_key": feature_key.to_string(), "amount": amount.get() })
        }
        EventKind::ReservationCommitted {
            reservation_id,
            amount,
            units,
        } => {
            json!({ "reservation_id": reservation_id.to_string(), "amount": amount.get(), "units": units.map(ledger::Units::get) })
        }
        EventKind::ReservationReleased {
            reservation_id,
            amount,
        }
        | EventKind::ReservationExpired {
            reservation_id,
            amount,
        } => {
            json!({ "reservation_id": reservation_id.to_string(), "amount": amount.get() })
        }
        EventKind::LeaseExpired {
            lease_id,
            feature_key,
            holder,
            released,
        } => {
            json!({ "lease_id": lease_id.to_string(), "feature_key": feature_key.to_string(), "holder": holder.to_string(), "released": released.get() })
        }
        EventKind::Subscription {
            subscription_id,
            status,
            change,
        } => {
            let mut data = json!({ "subscription_id": subscription_id.to_string(), "status": status.as_str() });
            let extra = match change {
                SubscriptionChange::TrialEnding { trial_end } => {
                    json!({ "trial_end": WireTime(*trial_end) })
                }
                SubscriptionChange::RenewalDue { period_end } => {
                    json!({ "period_end": WireTime(*period_end) })
                }
                SubscriptionChange::Renewed {
                    period_start,
                    period_end,
                    usage,
                } => json!({
                    "period_start": WireTime(*period_start),
                    "period_end": WireTime(*period_end),
                    "usage": usage.iter().map(|item| json!({
                        "feature_key": item.feature_key.to_string(), "units": item.units, "cost": item.cost.get()
                    })).collect::<Vec<_>>(),
                }),
                SubscriptionChange::Changed {
                    from_variant_id,
                    to_variant_id,
                } => {
                    json!({ "from_variant_id": from_variant_id.to_string(), "to_variant_id": to_variant_id.to_string() })
                }
                _ => json!({}),
            };
            if let (Some(data), Some(extra)) = (data.as_object_mut(), extra.as_object()) {
                data.extend(extra.clone());
            }
            data
        }
    }
}
