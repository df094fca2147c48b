//! The control plane's one integration-test binary: the API through its router, in
//! process, on SQLite.

// This whole crate is tests: a panic is the failure report, and a scenario reads top to
// bottom as one story however long it is.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

mod api;
mod catalog_apply;
mod clock_walk;
mod concurrency;
mod console;
mod errors;
mod hardening;
mod isolation;
mod jobs;
mod layers;
mod leases;
mod openapi;
mod refusals;
mod replicas;
mod restart;
mod support;
mod sync;
mod webhooks;
