//! Turning units into a credit cost (SPEC 4). Pure arithmetic in i128, checked back into
//! credits.

use crate::amount::{Credits, Overflow, Units};
use crate::catalog::{Pricing, Tier, TierMode};

/// The cost of `units` of a feature priced by `pricing`, for an end user who has already
/// used `units_before` units of it in the current usage period (only tiers look at it).
/// Without a rule, a unit costs one credit.
///
/// # Errors
/// [`Overflow`] when the cost does not fit in credits.
pub fn cost(
    pricing: Option<&Pricing>,
    units: Units,
    units_before: u64,
) -> Result<Credits, Overflow> {
    let units_wide = i128::from(units.get());
    match pricing {
        None => Credits::try_from_i128(units_wide),
        Some(Pricing::PerUnit { unit_cost, per }) => {
            let numerator = units_wide
                .checked_mul(i128::from(unit_cost.get()))
                .ok_or(Overflow)?;
            let per = i128::from(*per);
            if per == 0 {
                return Err(Overflow);
            }
            Credits::try_from_i128(ceil_div(numerator, per).ok_or(Overflow)?)
        }
        Some(Pricing::Flat { amount }) => Ok(*amount),
        Some(Pricing::Tiered { mode, tiers }) => match mode {
            TierMode::Graduated => graduated(tiers, units.get(), units_before),
            TierMode::Volume => volume(tiers, units.get(), units_before),
        },
    }
}

/// `ceil(numerator / denominator)` for a non-negative numerator and positive denominator.
fn ceil_div(numerator: i128, denominator: i128) -> Option<i128> {
    let quotient = numerator.checked_div(denominator)?;
    let remainder = numerator.checked_rem(denominator)?;
    if remainder > 0 {
        quotient.checked_add(1)
    } else {
        Some(quotient)
    }
}

/// Prices each unit of positions `units_before + 1 ..= units_before + units` by the tier
/// that position falls in.
fn graduated(tiers: &[Tier], units: u64, units_before: u64) -> Result<Credits, Overflow> {
    let first = u128::from(units_before);
    let last = first.checked_add(u128::from(units)).ok_or(Overflow)?;
    let mut total: i128 = 0;
    let mut tier_start: u128 = 0;
    for tier in tiers {
        let tier_end = tier.up_to.map_or(u128::MAX, u128::from);
        let overlap_start = first.max(tier_start);
        let overlap_end = last.min(tier_end);
        if overlap_end > overlap_start {
            let count = overlap_end.checked_sub(overlap_start).ok_or(Overflow)?;
            let count = i128::try_from(count).map_err(|_| Overflow)?;
            let part = count
                .checked_mul(i128::from(tier.unit_cost.get()))
                .ok_or(Overflow)?;
            total = total.checked_add(part).ok_or(Overflow)?;
        }
        if tier_end >= last {
            break;
        }
        tier_start = tier_end;
    }
    Credits::try_from_i128(total)
}

/// Prices all `units` by the tier the cumulative total `units_before + units` reaches.
fn volume(tiers: &[Tier], units: u64, units_before: u64) -> Result<Credits, Overflow> {
    let reached = units_before.checked_add(units).ok_or(Overflow)?;
    let tier = tiers
        .iter()
        .find(|tier| tier.up_to.is_none_or(|up_to| reached <= up_to))
        .or_else(|| tiers.last())
        .ok_or(Overflow)?;
    let total = i128::from(units)
        .checked_mul(i128::from(tier.unit_cost.get()))
        .ok_or(Overflow)?;
    Credits::try_from_i128(total)
}
