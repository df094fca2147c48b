//! The ledger's one integration-test binary: example tests through one `World` fixture
//! per area, the property suite against a naive model, and the seeded simulation.

mod credits;
mod dependencies;
mod entitlements;
mod model;
mod pricing;
mod properties;
mod recurring;
mod reservations;
mod simulation;
mod subscriptions;
mod support;
