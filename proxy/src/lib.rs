//! `proxy`: QuotaStack's sidecar. It sits in front of a customer's API (pingora), keeps
//! its environment's entitlement state replicated from the control plane (sled plus an
//! in-memory index), decides every request locally with the same `ledger` engine as the
//! control plane, and records usage durably and asynchronously through an outbox.
//!
//! The request path (`gate`): identity → route → `ledger` decision against the replica
//! minus local pending spend (or a lease, for features gated by balance) → forward or
//! answer 401/402/403/503. When the upstream's response header arrives, the usage is
//! written before the response is released (flushed first in `sync` durability): a
//! lease's spend to the spend log, reported per lease; anything else to the usage log,
//! handed on to the sled outbox once per shipping round and shipped to
//! `/v1/usage/batch` with idempotency keys, one end user's usage of a feature
//! aggregated per `usage.aggregate_ms`.

pub mod cli;
pub mod config;
pub mod disk;
pub mod gate;
pub mod identity;
pub mod leases;
pub mod outbox;
pub mod path;
pub mod pending;
pub mod replica;
pub mod routes;
pub mod segments;
pub mod server;
pub mod spend_log;
pub mod sync;
pub mod usage_log;

pub use config::Config;
pub use server::{Running, install_metrics, start, start_with_clock};
