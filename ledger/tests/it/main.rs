//! The ledger's one integration-test binary: example tests through one `World` fixture
//! per area, the property suite against a naive model, and the seeded simulation.

// This whole crate is tests: a panic is the failure report, and a scenario reads top to
// bottom as one story however long it is.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

mod credits;
mod dependencies;
mod entitlements;
mod leases;
mod limits;
mod month;
mod naive;
mod pricing;
mod recurring;
mod reservations;
mod subscriptions;
mod support;
