use std::collections::BTreeMap;
use std::sync::Arc;

use ledger::{
    BillingMode, Catalog, Credits, EndUserId, EndUserState, Feature, FeatureKey, FeatureType,
    GrantRequest, Interval, OveragePolicy, Plan, PlanId, PlanKind, SequentialIds, Timestamp, Ulid,
    Units, Variant, VariantId,
};

use super::{Inputs, Outcome, verdict};
use crate::config::Config;
use crate::replica::Freshness;
use crate::routes::{Route, Routes};

const NOW: Timestamp = Timestamp::from_millis(1_780_000_000_000);

fn key(text: &str) -> FeatureKey {
    FeatureKey::new(text).expect("a feature key")
}

fn metered(name: &str, requires_plan: bool) -> (FeatureKey, Feature) {
    (
        key(name),
        Feature {
            key: key(name),
            feature_type: FeatureType::Metered,
            pricing: None,
            requires_plan,
        },
    )
}

/// `api_calls` open to anyone, `premium` only through a plan nobody has, `chats`
/// through the free plan; past the balance, the free plan's `overage` policy.
fn catalog_with(overage: OveragePolicy) -> Catalog {
    let plan_id = PlanId(Ulid(1));
    let variant_id = VariantId(Ulid(2));
    let mut catalog = Catalog {
        features: [
            metered("api_calls", false),
            metered("premium", true),
            metered("chats", true),
        ]
        .into_iter()
        .collect(),
        ..Catalog::default()
    };
    catalog.plans.insert(
        plan_id,
        Plan {
            id: plan_id,
            key: Arc::from("free"),
            kind: PlanKind::Base,
            features: BTreeMap::from([(key("chats"), true)]),
            overage_policy: overage,
        },
    );
    catalog.variants.insert(
        variant_id,
        Variant {
            id: variant_id,
            plan_id,
            key: Arc::from("free-monthly"),
            interval: Interval::MONTHLY,
            billing_mode: BillingMode::Prepaid,
            price: None,
            trial_days: 0,
            grace_days: 0,
            renewal_due_days: 0,
            allow_usage_while_past_due: false,
            grants: Vec::new(),
        },
    );
    catalog.settings.free_plan_variant_id = Some(variant_id);
    catalog
}

/// The catalog whose free plan blocks at zero.
fn catalog() -> Catalog {
    catalog_with(OveragePolicy::Block)
}

fn user(credits: i64, catalog: &Catalog) -> EndUserState {
    let mut state = EndUserState::new(EndUserId::new("u1").expect("id"), NOW);
    if credits > 0 {
        let mut ids = SequentialIds::default();
        let mut cx = ledger::Cx {
            now: NOW,
            catalog,
            ids: &mut ids,
        };
        state
            .grant(&mut cx, GrantRequest::new(Credits::new(credits)))
            .expect("grant");
    }
    state
}

/// Routes: 0 `/work` (api_calls), 1 `/premium`, 2 `/chat` (chats), 3 `/generate`
/// (api_calls, reserve-then-commit), 4 `/open` (no feature: not a gated route).
fn routes() -> Routes {
    let config = Config::parse(
        r#"
upstream = "127.0.0.1:3000"
[control_plane]
url = "http://127.0.0.1:8080"
api_key = "k"
[[routes]]
path = "/work"
feature = "api_calls"
[[routes]]
path = "/premium"
feature = "premium"
[[routes]]
path = "/chat"
feature = "chats"
[[routes]]
path = "/generate"
feature = "api_calls"
reserve = { estimate = 100, actual_header = "x-usage-units" }
"#,
    )
    .expect("parses");
    Routes::from_config(&config).expect("valid")
}

fn route<'r>(routes: &'r Routes, path: &str) -> &'r Route {
    routes
        .find(&http::Method::POST, path)
        .expect("a route matches")
}

fn inputs<'a>(catalog: &'a Catalog, state: &'a EndUserState) -> Inputs<'a> {
    Inputs {
        freshness: Freshness::Fresh,
        catalog: Some(catalog),
        state,
        pending: Credits::ZERO,
        now: NOW,
        leases: false,
    }
}

fn units(n: u64) -> Units {
    Units::new(n).expect("units")
}

fn refused(outcome: &Outcome) -> (u16, &str) {
    match outcome {
        Outcome::Refuse { problem, .. } => (problem.status, problem.code.as_str()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_fresh_replica_admits_what_the_balance_covers_less_pending_spend() {
    let (catalog, routes) = (catalog(), routes());
    let state = user(10, &catalog);
    let work = route(&routes, "/work");
    assert_eq!(
        verdict(&inputs(&catalog, &state), work, units(4)),
        Outcome::Admit {
            cost: Credits::new(4),
            balance: Some(Credits::new(10)),
            resets_at: None,
        }
    );
    // Pending spend counts against the balance: 7 pending leave 3, short of 4.
    let busy = Inputs {
        pending: Credits::new(7),
        ..inputs(&catalog, &state)
    };
    let outcome = verdict(&busy, work, units(4));
    assert_eq!(refused(&outcome), (402, "insufficient_balance"));
    let Outcome::Refuse { problem, outcome } = outcome else {
        unreachable!()
    };
    assert_eq!((problem.needed, problem.available), (Some(4), Some(3)));
    assert_eq!(outcome, "denied");
    assert_eq!(
        verdict(&busy, work, units(3)).pending_cost(),
        Some(Credits::new(3))
    );
}

#[test]
fn with_leases_the_balance_is_the_leases_to_judge_but_access_is_not() {
    let (catalog, routes) = (catalog(), routes());
    let empty = user(0, &catalog);
    let leased = Inputs {
        leases: true,
        ..inputs(&catalog, &empty)
    };
    // Short of credits: the lease decides (the replica may not show a grant yet).
    assert_eq!(
        verdict(&leased, route(&routes, "/work"), units(2)),
        Outcome::Lease {
            cost: Credits::new(2),
            available: Credits::ZERO,
            resets_at: None,
            stale: None,
        }
    );
    // Not in the plan: refused on the replica, lease or not.
    assert_eq!(
        refused(&verdict(&leased, route(&routes, "/premium"), units(1))),
        (403, "not_in_plan")
    );
    // Overage allowed: never refused for the balance, so no lease; admitted into debt.
    let allowing = catalog_with(OveragePolicy::Allow);
    let allowed = Inputs {
        catalog: Some(&allowing),
        ..leased
    };
    assert_eq!(
        verdict(&allowed, route(&routes, "/chat"), units(5)).pending_cost(),
        Some(Credits::new(5))
    );
    // Reserve-then-commit holds at the control plane per request: no lease.
    assert_eq!(
        refused(&verdict(&leased, route(&routes, "/generate"), units(1))),
        (402, "insufficient_balance")
    );
    // Nothing is pending for a lease decision.
    assert_eq!(
        verdict(&leased, route(&routes, "/work"), units(2)).pending_cost(),
        None
    );
}

#[test]
fn a_stale_or_loading_replica_leaves_it_to_a_lease_or_the_failure_policy() {
    let (catalog, routes) = (catalog(), routes());
    let state = user(10, &catalog);
    let stale = Inputs {
        freshness: Freshness::Stale,
        ..inputs(&catalog, &state)
    };
    let work = route(&routes, "/work");
    match verdict(&stale, work, units(3)) {
        Outcome::Fallback { why, cost } => {
            assert!(why.contains("max_staleness"), "{why}");
            assert_eq!(cost, Credits::new(3), "priced by the last known catalog");
        }
        other => panic!("expected the failure policy, got {other:?}"),
    }
    let leased = Inputs {
        leases: true,
        ..stale
    };
    assert!(matches!(
        verdict(&leased, work, units(3)),
        Outcome::Lease { stale: Some(why), .. } if why.contains("max_staleness")
    ));
    let loading = Inputs {
        freshness: Freshness::Loading,
        catalog: None,
        ..inputs(&catalog, &state)
    };
    assert_eq!(
        verdict(&loading, work, units(3)),
        Outcome::Fallback {
            why: super::NOT_LOADED,
            cost: Credits::ZERO,
        }
    );
}

#[test]
fn an_unknown_feature_and_a_route_without_one_are_errors_not_admissions() {
    let routes = routes();
    let state = user(0, &Catalog::default());
    let bare = Catalog::default();
    let outcome = verdict(&inputs(&bare, &state), route(&routes, "/work"), units(1));
    assert_eq!(refused(&outcome), (404, "feature_not_found"));
    assert!(matches!(
        outcome,
        Outcome::Refuse {
            outcome: "error",
            ..
        }
    ));
    let mut featureless = route(&routes, "/work").clone();
    featureless.feature = None;
    assert_eq!(
        refused(&verdict(&inputs(&bare, &state), &featureless, units(1))),
        (500, "internal")
    );
}
