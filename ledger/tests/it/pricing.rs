//! Pricing (SPEC 4): per unit with `per` and ceiling rounding, flat, and graduated and
//! volume tiers over the end user's cumulative units in the usage period.

use ledger::{Pricing, Tier, TierMode};

use crate::support::{World, at, credits, days, metered, units};

fn tiers(mode: TierMode) -> Pricing {
    Pricing::Tiered {
        mode,
        tiers: vec![
            Tier {
                up_to: Some(10),
                unit_cost: credits(2),
            },
            Tier {
                up_to: None,
                unit_cost: credits(1),
            },
        ],
    }
}

/// The cost of `units` after `before` units this period.
fn check(pricing: &Pricing, count: u64, before: u64) -> i64 {
    ledger::cost(Some(pricing), units(count), before)
        .expect("cost")
        .get()
}

// per_unit is ceil(units * unit_cost / per).
#[test]
fn per_unit_rounds_up() {
    let three_per_thousand = Pricing::PerUnit {
        unit_cost: credits(3),
        per: 1000,
    };
    assert_eq!(check(&three_per_thousand, 1000, 0), 3);
    assert_eq!(check(&three_per_thousand, 1001, 0), 4);
    assert_eq!(check(&three_per_thousand, 1, 0), 1);
    assert_eq!(
        check(
            &Pricing::PerUnit {
                unit_cost: credits(5),
                per: 1
            },
            7,
            0
        ),
        35
    );
    assert_eq!(
        ledger::cost(None, units(7), 0).expect("cost").get(),
        7,
        "no rule: a credit a unit"
    );
}

// flat charges the same per event.
#[test]
fn flat_ignores_units() {
    let flat = Pricing::Flat {
        amount: credits(25),
    };
    assert_eq!(check(&flat, 1, 0), 25);
    assert_eq!(check(&flat, 1_000_000, 99), 25);
}

// SPEC's example: 10 units at 2, then 1. Graduated: 8 cost 16, then 5 cost 2·2 + 3·1.
#[test]
fn graduated_prices_each_unit_by_its_position() {
    let graduated = tiers(TierMode::Graduated);
    assert_eq!(check(&graduated, 8, 0), 16);
    assert_eq!(check(&graduated, 5, 8), 7);
    assert_eq!(check(&graduated, 100, 0), 110);
    assert_eq!(check(&graduated, 3, 50), 3);
}

// Volume: all units of the event at the tier the total reaches; earlier events keep
// their price.
#[test]
fn volume_prices_the_event_by_the_reached_tier() {
    let volume = tiers(TierMode::Volume);
    assert_eq!(check(&volume, 8, 0), 16);
    assert_eq!(check(&volume, 5, 8), 5);
    assert_eq!(check(&volume, 10, 0), 20, "up_to is inclusive");
    assert_eq!(check(&volume, 11, 0), 11);
}

// Costs that do not fit in credits are overflow, not wraps.
#[test]
fn huge_costs_overflow() {
    let pricey = Pricing::PerUnit {
        unit_cost: credits(i64::MAX),
        per: 1,
    };
    assert!(ledger::cost(Some(&pricey), units(2), 0).is_err());
    let graduated = Pricing::Tiered {
        mode: TierMode::Graduated,
        tiers: vec![Tier {
            up_to: None,
            unit_cost: credits(i64::MAX),
        }],
    };
    assert!(ledger::cost(Some(&graduated), units(3), 0).is_err());
}

// Rules are validated with the field named.
#[test]
fn pricing_rules_are_validated() {
    let bad = [
        (
            Pricing::PerUnit {
                unit_cost: credits(1),
                per: 0,
            },
            "pricing.per",
        ),
        (
            Pricing::PerUnit {
                unit_cost: credits(-1),
                per: 1,
            },
            "pricing.unit_cost",
        ),
        (
            Pricing::Flat {
                amount: credits(-5),
            },
            "pricing.amount",
        ),
        (
            Pricing::Tiered {
                mode: TierMode::Volume,
                tiers: vec![],
            },
            "pricing.tiers",
        ),
        (
            Pricing::Tiered {
                mode: TierMode::Volume,
                tiers: vec![Tier {
                    up_to: Some(5),
                    unit_cost: credits(1),
                }],
            },
            "pricing.tiers",
        ),
        (
            Pricing::Tiered {
                mode: TierMode::Graduated,
                tiers: vec![
                    Tier {
                        up_to: Some(10),
                        unit_cost: credits(1),
                    },
                    Tier {
                        up_to: Some(10),
                        unit_cost: credits(1),
                    },
                    Tier {
                        up_to: None,
                        unit_cost: credits(1),
                    },
                ],
            },
            "pricing.tiers[1].up_to",
        ),
    ];
    for (pricing, field) in bad {
        assert_eq!(
            pricing.validate().map_err(|error| error.field),
            Err(field.to_string()),
            "{pricing:?}"
        );
    }
    assert!(tiers(TierMode::Graduated).validate().is_ok());
}

// Through the engine, tiers count cumulative units in the calendar month when there is
// no subscription, and start again next month.
#[test]
fn tiers_count_the_usage_period() {
    let mut world = World::new();
    world.add_feature(metered("calls", Some(tiers(TierMode::Graduated))));
    world.grant_amount(1000);
    assert_eq!(world.usage("calls", 8).cost.get(), 16);
    assert_eq!(world.usage("calls", 5).cost.get(), 7);
    world.advance_to(at(days(31)));
    assert_eq!(
        world.usage("calls", 8).cost.get(),
        16,
        "February starts a new period"
    );
}
