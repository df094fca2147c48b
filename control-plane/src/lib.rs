//! `control-plane`: QuotaStack's authority. It owns the ledger (through [`store`]), serves
//! the REST API ([`http`]), runs due work ([`jobs`]) and keeps the event log.
//!
//! Invariants it keeps:
//! - every billing rule comes from `ledger`; this crate only loads, calls and persists;
//! - one end user's mutation — state, entries, blocks, events, idempotency answer — is one
//!   database transaction (concurrent mutations of one end user may share one, see
//!   `group.rs`, but never split);
//! - only [`clock`] reads the system clock; everything else takes `now` from it, moved by
//!   the test clock's offset in `test` environments.

pub mod apply;
pub mod auth;
pub mod backoff;
pub mod catalog;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod error;
mod group;
pub mod http;
pub mod jobs;
pub mod limits;
pub mod nats;
mod queues;
mod serve;
pub mod service;
pub mod store;
pub mod webhooks;

pub use serve::{connect_nats, open_store, run, state};
