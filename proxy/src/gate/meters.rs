//! The gate's per-request metrics as handles registered once: a labelled macro call looks
//! its series up in the registry on every request. And `x-quota-as-of`, formatted once
//! per instant rather than per request (a few instants at once: an answer's instant is
//! the newer of the replica's and its lease's, so requests of different end users
//! alternate between several).

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use ledger::Timestamp;

/// Every (outcome, source) the gate counts decisions under.
const DECISIONS: [(&str, &str); 13] = [
    ("allowed", "replica"),
    ("denied", "replica"),
    ("error", "replica"),
    ("allowed", "lease"),
    ("denied", "lease"),
    ("lease_late", "lease"),
    ("spend_log_full", "lease"),
    ("usage_log_full", "replica"),
    ("allowed", "fallback"),
    ("unavailable", "fallback"),
    ("outage_budget_spent", "fallback"),
    ("invalid_path", "none"),
    ("no_identity", "none"),
];

#[derive(Debug)]
pub struct Meters {
    decisions: Vec<(&'static str, &'static str, metrics::Counter)>,
    pub decision_seconds: metrics::Histogram,
    pub request_seconds: metrics::Histogram,
    /// `x-quota-as-of` values formatted lately, each with the instant it is for, in the
    /// place its instant's milliseconds pick.
    as_of: [ArcSwapOption<(Timestamp, http::HeaderValue)>; AS_OF_PLACES],
}

/// How many `x-quota-as-of` values are kept formatted.
const AS_OF_PLACES: usize = 16;

impl Default for Meters {
    fn default() -> Meters {
        Meters::new()
    }
}

impl Meters {
    /// Registers the handles (call after the metrics recorder is installed).
    pub fn new() -> Meters {
        Meters {
            decisions: DECISIONS
                .iter()
                .map(|&(outcome, source)| {
                    (
                        outcome,
                        source,
                        metrics::counter!("qs_proxy_decisions_total", "outcome" => outcome, "source" => source),
                    )
                })
                .collect(),
            decision_seconds: metrics::histogram!("qs_proxy_decision_seconds"),
            request_seconds: metrics::histogram!("qs_proxy_request_seconds"),
            as_of: std::array::from_fn(|_| ArcSwapOption::empty()),
        }
    }

    /// Counts a decision.
    pub fn decision(&self, outcome: &'static str, source: &'static str) {
        match self
            .decisions
            .iter()
            .find(|(known, from, _)| *known == outcome && *from == source)
        {
            Some((_, _, counter)) => counter.increment(1),
            None => {
                metrics::counter!("qs_proxy_decisions_total", "outcome" => outcome, "source" => source)
                    .increment(1);
            }
        }
    }

    /// `x-quota-as-of` for `at` (RFC 3339), formatted only when `at` differs from the
    /// instant kept in its place.
    pub fn as_of(&self, at: Timestamp) -> http::HeaderValue {
        let places = i64::try_from(AS_OF_PLACES).unwrap_or(1);
        let place = usize::try_from(at.as_millis().rem_euclid(places)).unwrap_or(0);
        let place = &self.as_of[place];
        if let Some(cached) = place.load().as_ref()
            && cached.0 == at
        {
            return cached.1.clone();
        }
        let value = http::HeaderValue::from_str(&at.to_string())
            .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"));
        place.store(Some(Arc::new((at, value.clone()))));
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_of_is_formatted_per_instant() {
        let meters = Meters::new();
        let first = Timestamp::from_millis(1_780_000_000_000);
        assert_eq!(meters.as_of(first), "2026-05-28T20:26:40Z");
        assert_eq!(meters.as_of(first), "2026-05-28T20:26:40Z");
        let later = Timestamp::from_millis(1_780_000_000_500);
        assert_eq!(meters.as_of(later), "2026-05-28T20:26:40.5Z");
        assert_eq!(meters.as_of(first), "2026-05-28T20:26:40Z", "both kept");
        // Two instants in one place: the newer asked replaces the other.
        let same_place = Timestamp::from_millis(1_780_000_000_016);
        assert_eq!(meters.as_of(same_place), "2026-05-28T20:26:40.016Z");
        assert_eq!(meters.as_of(first), "2026-05-28T20:26:40Z");
        meters.decision("allowed", "replica");
        meters.decision("not_listed", "none");
    }
}
