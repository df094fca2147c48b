//! The decision as a pure function of what the replica shows at one moment: no lock, no
//! metric, no clock, no I/O. [`super::Gate`] reads the inputs (under the end user's
//! pending lock), then acts on the outcome: counts the cost as pending, takes it from a
//! lease, or applies the route's failure policy.

use ledger::{Catalog, Credits, Decision, EndUserState, FeatureKey, Timestamp, Units};
use protocol::Problem;

use crate::replica::Freshness;
use crate::routes::{Route, UnitsRule};

/// What a decision is made from.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub freshness: Freshness,
    /// The catalog, once the replica has one.
    pub catalog: Option<&'a Catalog>,
    /// The end user's state (a new one when the replica has none).
    pub state: &'a EndUserState,
    /// This proxy's spend for the end user that the state does not show yet.
    pub pending: Credits,
    /// The environment's now (the test clock's, in a test environment).
    pub now: Timestamp,
    /// Whether a lease decides requests gated by balance.
    pub leases: bool,
}

/// What the decision concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted on the replica: `cost` counts as pending until the control plane has it.
    Admit {
        cost: Credits,
        /// Available before the cost (for a reservation's actual, priced later).
        balance: Option<Credits>,
        resets_at: Option<Timestamp>,
    },
    /// Refused: the answer, and the metric's outcome (`denied`, or `error` when the
    /// engine could not decide).
    Refuse {
        problem: Box<Problem>,
        outcome: &'static str,
    },
    /// Gated by balance: the lease decides, for `cost`. `available` is what the replica
    /// shows free beside any lease; `stale` says why the replica alone could not decide
    /// (without a lease, the failure policy then does).
    Lease {
        cost: Credits,
        available: Credits,
        resets_at: Option<Timestamp>,
        stale: Option<&'static str>,
    },
    /// The replica cannot decide (`why`): the route's failure policy does, counting
    /// `cost` (by the last known catalog, zero without one) when it admits.
    Fallback { why: &'static str, cost: Credits },
}

impl Outcome {
    /// The cost to count as pending now (only an admission on the replica has one).
    pub fn pending_cost(&self) -> Option<Credits> {
        match self {
            Outcome::Admit { cost, .. } => Some(*cost),
            _ => None,
        }
    }
}

const NOT_LOADED: &str = "the proxy has not loaded its replica yet";
const UNREACHABLE: &str = "the control plane has been unreachable longer than max_staleness";

/// The verdict on `units` of `route`'s feature for the end user of `inputs.state`.
pub fn verdict(inputs: &Inputs<'_>, route: &Route, units: Units) -> Outcome {
    let Some(feature) = route.feature.as_ref() else {
        return Outcome::Refuse {
            problem: Box::new(no_feature()),
            outcome: "error",
        };
    };
    if let (Freshness::Fresh, Some(catalog)) = (inputs.freshness, inputs.catalog) {
        return match inputs
            .state
            .decide(catalog, feature, units, inputs.pending, inputs.now)
        {
            Ok(decision) if inputs.leases && gated_by_lease(route, &decision) => {
                lease(&decision, None)
            }
            Ok(decision) if decision.allowed => Outcome::Admit {
                cost: decision.cost.unwrap_or(Credits::ZERO),
                balance: decision.balance,
                resets_at: decision.resets_at,
            },
            Ok(decision) => Outcome::Refuse {
                problem: Box::new(denial(&decision, feature)),
                outcome: "denied",
            },
            Err(refusal) => Outcome::Refuse {
                problem: Box::new(decision_failed(&refusal, feature)),
                outcome: "error",
            },
        };
    }
    // Stale or still loading: a lease still admits within its room; beyond it, the
    // route's failure policy, counting what the last known catalog prices the request at.
    let why = if inputs.freshness == Freshness::Loading {
        NOT_LOADED
    } else {
        UNREACHABLE
    };
    let decision = inputs.catalog.and_then(|catalog| {
        inputs
            .state
            .decide(catalog, feature, units, Credits::ZERO, inputs.now)
            .ok()
    });
    match decision {
        Some(decision) if inputs.leases && gated_by_lease(route, &decision) => {
            lease(&decision, Some(why))
        }
        decision => Outcome::Fallback {
            why,
            cost: decision
                .and_then(|decision| decision.cost)
                .unwrap_or(Credits::ZERO),
        },
    }
}

/// The answer for a gated route that names no feature (configuration validation
/// prevents one).
pub fn no_feature() -> Problem {
    Problem::new(
        500,
        "internal",
        "Route has no feature",
        "a gated route must name a feature",
    )
}

/// The answer on a route failing closed when the usage log cannot take the request's
/// usage (`usage.usage_log_max_kb`).
pub fn usage_log_full() -> Problem {
    Problem::new(
        503,
        "usage_log_full",
        "Usage log full",
        "the proxy cannot record more usage until its local store takes what the usage log holds (usage.usage_log_max_kb)",
    )
}

fn lease(decision: &Decision, stale: Option<&'static str>) -> Outcome {
    Outcome::Lease {
        cost: decision.cost.unwrap_or(Credits::ZERO),
        available: decision.balance.unwrap_or(Credits::ZERO),
        resets_at: decision.resets_at,
        stale,
    }
}

/// Whether a decision is the lease's to make: the route is not reserve-then-commit, the
/// feature blocks at zero, the request costs credits, and the replica either allows it
/// or refuses it for the balance alone.
fn gated_by_lease(route: &Route, decision: &Decision) -> bool {
    !matches!(route.units, UnitsRule::Reserve(_))
        && decision.overage == Some(ledger::OveragePolicy::Block)
        && decision.cost.is_some_and(Credits::is_positive)
        && (decision.allowed || decision.reason == Some(ledger::DenyReason::InsufficientBalance))
}

/// The answer to a refusal on the replica: 402 with what was needed and available, or 403
/// naming why the feature is not open to the end user.
pub fn denial(decision: &Decision, feature: &FeatureKey) -> Problem {
    match decision.reason {
        Some(ledger::DenyReason::InsufficientBalance) | None => {
            let mut problem = Problem::new(
                402,
                "insufficient_balance",
                "Insufficient balance",
                format!("not enough credits for {feature}"),
            );
            problem.needed = decision.cost.map(Credits::get);
            problem.available = decision.balance.map(Credits::get);
            problem
        }
        Some(reason) => Problem::new(
            403,
            reason.as_str(),
            "Not allowed",
            format!("{feature} is not available: {}", reason.as_str()),
        ),
    }
}

/// The answer when the engine could not decide: the route's feature is not in the
/// catalog (404), or the decision failed (500).
fn decision_failed(refusal: &ledger::Refusal, feature: &FeatureKey) -> Problem {
    if let ledger::Refusal::FeatureNotFound(_) = refusal {
        let mut problem = Problem::new(
            404,
            "feature_not_found",
            "Feature not found",
            format!("the route's feature {feature} is not in the catalog"),
        );
        problem.field = Some("feature_key".into());
        return problem;
    }
    Problem::new(500, "internal", "Decision failed", refusal.to_string())
}

#[cfg(test)]
mod tests;
