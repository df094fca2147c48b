//! Bounds on how much one environment may create, so that no tenant can grow what every
//! request of its own (or every delivery, or every decision) walks without bound. Each
//! is checked before the creation and answered 422 `limit_reached` naming it; the
//! table of every bound the server keeps is in docs/operations.md ("Limits").

use ledger::Refusal;

/// Webhook endpoints per environment: every event makes one delivery per endpoint.
pub const ENDPOINTS_PER_ENVIRONMENT_MAX: usize = 16;
/// Features per environment: every decision's catalog holds them all.
pub const FEATURES_PER_ENVIRONMENT_MAX: usize = 1_000;
/// Plans per environment.
pub const PLANS_PER_ENVIRONMENT_MAX: usize = 1_000;
/// Plan variants per environment, archived ones included.
pub const VARIANTS_PER_ENVIRONMENT_MAX: usize = 1_000;
/// API keys per environment that are not revoked.
pub const KEYS_PER_ENVIRONMENT_MAX: usize = 100;
/// The longest webhook URL, in bytes.
pub const WEBHOOK_URL_BYTES_MAX: usize = 2_048;

/// `LimitReached` when `count` already reached `max` of `what`.
///
/// # Errors
/// 422 `limit_reached` naming the bound.
pub fn room_for(what: &'static str, count: usize, max: usize) -> Result<(), Refusal> {
    if count >= max {
        return Err(Refusal::LimitReached { what, limit: max });
    }
    Ok(())
}
