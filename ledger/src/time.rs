//! Instants, spans and calendar intervals. This module never reads a clock: every instant
//! arrives as an argument.

use std::fmt;
use std::str::FromStr;

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::amount::Overflow;

/// An instant in UTC, as milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Timestamp(i64);

/// A signed length of time in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Span(i64);

const MILLIS_PER_SEC: i64 = 1_000;
const MILLIS_PER_MINUTE: i64 = 60 * MILLIS_PER_SEC;
const MILLIS_PER_HOUR: i64 = 60 * MILLIS_PER_MINUTE;
const MILLIS_PER_DAY: i64 = 24 * MILLIS_PER_HOUR;
const MILLIS_PER_WEEK: i64 = 7 * MILLIS_PER_DAY;

// === impl Timestamp ===

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    pub const fn from_millis(millis: i64) -> Timestamp {
        Timestamp(millis)
    }

    pub const fn as_millis(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, span: Span) -> Result<Timestamp, Overflow> {
        self.0.checked_add(span.0).map(Timestamp).ok_or(Overflow)
    }

    pub fn checked_sub(self, span: Span) -> Result<Timestamp, Overflow> {
        self.0.checked_sub(span.0).map(Timestamp).ok_or(Overflow)
    }

    /// The span from `earlier` to `self` (negative when `earlier` is later).
    pub fn since(self, earlier: Timestamp) -> Result<Span, Overflow> {
        self.0.checked_sub(earlier.0).map(Span).ok_or(Overflow)
    }

    /// Parses an RFC 3339 instant (any offset; stored as UTC).
    pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
        let parsed = OffsetDateTime::parse(text, &Rfc3339).ok()?;
        let nanos = parsed.unix_timestamp_nanos();
        let millis = nanos.checked_div(1_000_000)?;
        i64::try_from(millis).ok().map(Timestamp)
    }

    fn to_datetime(self) -> Option<OffsetDateTime> {
        let nanos = i128::from(self.0).checked_mul(1_000_000)?;
        OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
    }

    fn from_datetime(value: OffsetDateTime) -> Result<Timestamp, Overflow> {
        let millis = value
            .unix_timestamp_nanos()
            .checked_div(1_000_000)
            .ok_or(Overflow)?;
        i64::try_from(millis).map(Timestamp).map_err(|_| Overflow)
    }

    /// The first instant of the calendar month (UTC) containing `self`.
    pub fn start_of_month(self) -> Result<Timestamp, Overflow> {
        let datetime = self.to_datetime().ok_or(Overflow)?;
        let first = datetime
            .replace_day(1)
            .map_err(|_| Overflow)?
            .replace_time(time::Time::MIDNIGHT);
        Timestamp::from_datetime(first)
    }

    /// `self` moved by a whole number of calendar months. The day of month is clamped to
    /// the target month's length (Jan 31 + 1 month = Feb 28 or 29), so callers that need a
    /// stable anchor always add `k` months to the original anchor rather than chaining.
    pub fn add_months(self, months: i64) -> Result<Timestamp, Overflow> {
        let datetime = self.to_datetime().ok_or(Overflow)?;
        let month_index = i64::from(datetime.year())
            .checked_mul(12)
            .and_then(|m| m.checked_add(i64::from(u8::from(datetime.month()))))
            .and_then(|m| m.checked_sub(1))
            .and_then(|m| m.checked_add(months))
            .ok_or(Overflow)?;
        let year = i32::try_from(month_index.div_euclid(12)).map_err(|_| Overflow)?;
        let month_number = u8::try_from(month_index.rem_euclid(12).checked_add(1).ok_or(Overflow)?)
            .map_err(|_| Overflow)?;
        let month = time::Month::try_from(month_number).map_err(|_| Overflow)?;
        let day = datetime.day().min(time::util::days_in_month(month, year));
        let date = time::Date::from_calendar_date(year, month, day).map_err(|_| Overflow)?;
        Timestamp::from_datetime(datetime.replace_date(date))
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC, e.g. `2026-11-24T10:00:00Z` (fractional seconds only when present).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self
            .to_datetime()
            .and_then(|datetime| datetime.format(&Rfc3339).ok())
        {
            Some(text) => f.write_str(&text),
            None => write!(f, "@{}ms", self.0),
        }
    }
}

// === impl Span ===

impl Span {
    pub const ZERO: Span = Span(0);

    pub const fn from_millis(millis: i64) -> Span {
        Span(millis)
    }

    pub const fn as_millis(self) -> i64 {
        self.0
    }

    pub fn from_secs(secs: i64) -> Result<Span, Overflow> {
        secs.checked_mul(MILLIS_PER_SEC).map(Span).ok_or(Overflow)
    }

    pub fn from_hours(hours: i64) -> Result<Span, Overflow> {
        hours.checked_mul(MILLIS_PER_HOUR).map(Span).ok_or(Overflow)
    }

    pub fn from_days(days: i64) -> Result<Span, Overflow> {
        days.checked_mul(MILLIS_PER_DAY).map(Span).ok_or(Overflow)
    }

    pub fn checked_mul(self, factor: i64) -> Result<Span, Overflow> {
        self.0.checked_mul(factor).map(Span).ok_or(Overflow)
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }
}

/// A duration written as a whole number and a unit: `45s`, `30m`, `5h`, `7d`, `2w`.
/// It must be positive.
impl FromStr for Span {
    type Err = String;

    fn from_str(text: &str) -> Result<Span, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("duration `{text}` has no unit (use s, m, h, d or w)"))?;
        let (number, unit) = text.split_at(split);
        let count: i64 = number
            .parse()
            .map_err(|_| format!("duration `{text}` must start with a whole number"))?;
        let per_unit = match unit {
            "s" => MILLIS_PER_SEC,
            "m" => MILLIS_PER_MINUTE,
            "h" => MILLIS_PER_HOUR,
            "d" => MILLIS_PER_DAY,
            "w" => MILLIS_PER_WEEK,
            other => {
                return Err(format!(
                    "duration unit `{other}` is not one of s, m, h, d, w"
                ));
            }
        };
        let span = count
            .checked_mul(per_unit)
            .map(Span)
            .ok_or_else(|| format!("duration `{text}` is too long"))?;
        if span.is_positive() {
            Ok(span)
        } else {
            Err(format!("duration `{text}` must be positive"))
        }
    }
}

impl fmt::Display for Span {
    /// The largest whole unit that divides the span exactly: `5h`, `90m`, `1500ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [
            (MILLIS_PER_WEEK, "w"),
            (MILLIS_PER_DAY, "d"),
            (MILLIS_PER_HOUR, "h"),
            (MILLIS_PER_MINUTE, "m"),
            (MILLIS_PER_SEC, "s"),
        ];
        for (per_unit, suffix) in units {
            if self.0 != 0 && self.0.checked_rem(per_unit) == Some(0) {
                let count = self.0.checked_div(per_unit).unwrap_or_default();
                return write!(f, "{count}{suffix}");
            }
        }
        write!(f, "{}ms", self.0)
    }
}

/// The unit of a billing interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum IntervalUnit {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

/// A billing interval: `every` units (`1 month`, `3 months`, `12 hours`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Interval {
    pub every: u32,
    pub unit: IntervalUnit,
}

// === impl Interval ===

impl Interval {
    pub const MONTHLY: Interval = Interval {
        every: 1,
        unit: IntervalUnit::Month,
    };

    /// The instant `count` intervals after `anchor`, computed from the anchor (never by
    /// chaining), so month ends do not drift.
    pub fn nth_after(self, anchor: Timestamp, count: i64) -> Result<Timestamp, Overflow> {
        let steps = i64::from(self.every).checked_mul(count).ok_or(Overflow)?;
        match self.unit {
            IntervalUnit::Hour => anchor.checked_add(Span::from_hours(steps)?),
            IntervalUnit::Day => anchor.checked_add(Span::from_days(steps)?),
            IntervalUnit::Week => {
                anchor.checked_add(Span::from_days(steps.checked_mul(7).ok_or(Overflow)?)?)
            }
            IntervalUnit::Month => anchor.add_months(steps),
            IntervalUnit::Year => anchor.add_months(steps.checked_mul(12).ok_or(Overflow)?),
        }
    }

    /// One interval after `anchor`.
    pub fn after(self, anchor: Timestamp) -> Result<Timestamp, Overflow> {
        self.nth_after(anchor, 1)
    }

    /// How many of this interval fit in a year, as a fraction `(numerator, denominator)`:
    /// 8760 hours, 365 days, 365/7 weeks, 12 months, 1 year, divided by `every`. Used to
    /// compare prices of different intervals exactly (upgrade versus downgrade).
    pub fn per_year(self) -> (i128, i128) {
        let every = i128::from(self.every.max(1));
        let (numerator, denominator): (i128, i128) = match self.unit {
            IntervalUnit::Hour => (8760, 1),
            IntervalUnit::Day => (365, 1),
            IntervalUnit::Week => (365, 7),
            IntervalUnit::Month => (12, 1),
            IntervalUnit::Year => (1, 1),
        };
        (numerator, denominator.saturating_mul(every))
    }
}
