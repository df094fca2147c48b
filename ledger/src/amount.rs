//! Credit amounts and unit counts: integers with checked arithmetic only.
//!
//! Money never wraps and never rounds silently: every operation that could overflow returns
//! [`Overflow`], which the engine turns into a refusal.

use std::fmt;

/// An arithmetic result did not fit in 64 bits. The operation that hit it changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("arithmetic overflow")]
pub struct Overflow;

/// An amount of credits in the tenant's smallest unit. Signed, so that adjustments and
/// differences can be expressed; balances themselves are never negative (debt records
/// shortfall instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Credits(i64);

// === impl Credits ===

impl Credits {
    pub const ZERO: Credits = Credits(0);
    pub const MAX: Credits = Credits(i64::MAX);

    pub const fn new(value: i64) -> Credits {
        Credits(value)
    }

    pub const fn get(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Credits) -> Result<Credits, Overflow> {
        self.0.checked_add(other.0).map(Credits).ok_or(Overflow)
    }

    pub fn checked_sub(self, other: Credits) -> Result<Credits, Overflow> {
        self.0.checked_sub(other.0).map(Credits).ok_or(Overflow)
    }

    pub fn checked_neg(self) -> Result<Credits, Overflow> {
        self.0.checked_neg().map(Credits).ok_or(Overflow)
    }

    /// `self - other`, floored at zero (never negative, never overflowing for
    /// non-negative inputs).
    pub fn saturating_sub_floor(self, other: Credits) -> Credits {
        Credits(self.0.saturating_sub(other.0).max(0))
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Sums an iterator of amounts, refusing on overflow.
    pub fn sum<I: IntoIterator<Item = Credits>>(items: I) -> Result<Credits, Overflow> {
        items
            .into_iter()
            .try_fold(Credits::ZERO, |acc, item| acc.checked_add(item))
    }

    /// Converts a wide intermediate result (pricing works in i128) back to credits.
    pub fn try_from_i128(value: i128) -> Result<Credits, Overflow> {
        i64::try_from(value).map(Credits).map_err(|_| Overflow)
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<i64> for Credits {
    fn from(value: i64) -> Credits {
        Credits(value)
    }
}

/// The most units one usage event may carry (SPEC 6: up to 10^12).
pub const UNITS_MAX: u64 = 1_000_000_000_000;

/// A positive count of feature units (API calls, tokens, messages), at most [`UNITS_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(try_from = "u64", into = "u64"))]
pub struct Units(u64);

impl TryFrom<u64> for Units {
    type Error = String;

    fn try_from(value: u64) -> Result<Units, String> {
        Units::new(value).ok_or_else(|| format!("units must be 1 to {UNITS_MAX}, not {value}"))
    }
}

impl From<Units> for u64 {
    fn from(units: Units) -> u64 {
        units.0
    }
}

// === impl Units ===

impl Units {
    pub const ONE: Units = Units(1);

    /// Accepts `1..=UNITS_MAX`; anything else is `None`.
    pub fn new(value: u64) -> Option<Units> {
        (1..=UNITS_MAX).contains(&value).then_some(Units(value))
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Units {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
