//! P1 (DESIGN.md): the proxy's in-process decision with 100k end users cached, warm:
//! goal p50 <= 1 µs, p99 <= 5 µs, and <= 4x a bare `HashMap::get` in the same run.
//!
//! Run: `cargo bench -p e2e --bench p1_decide` (knobs `QS_P1_USERS`, `QS_P1_ITERATIONS`).
//! The decision measured is the gate's path minus HTTP: freshness, catalog load, `now`,
//! the end user's state from the in-memory index, then `ledger` `decide` under the end
//! user's pending lock. The baseline is `HashMap<EndUserId, Arc<EndUserState>>::get` on
//! the same keys. Each call is timed on its own with `Instant` (about 20 ns of the figures
//! is the clock itself, in both).

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

/// The proxy binary's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::bench::{Picker, loaded_replica, percentile};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn report(name: &str, mut samples: Vec<u64>) -> (u64, u64) {
    samples.sort_unstable();
    let (p50, p99, p999) = (
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        percentile(&samples, 0.999),
    );
    println!("| {name} | {p50} ns | {p99} ns | {p999} ns |");
    (p50, p99)
}

fn main() {
    let users = env_or("QS_P1_USERS", 100_000);
    let iterations = env_or("QS_P1_ITERATIONS", 2_000_000);
    let dir = tempfile::tempdir().expect("dir");
    let replica = loaded_replica(dir.path(), users, 64);
    let view = replica.catalog().expect("catalog");
    let feature = ledger::FeatureKey::new("api_calls").expect("key");
    let ids: Vec<ledger::EndUserId> = (0..users)
        .map(|index| ledger::EndUserId::new(&format!("u{index}")).expect("id"))
        .collect();
    let map: HashMap<ledger::EndUserId, Arc<ledger::EndUserState>> = ids
        .iter()
        .map(|id| (id.clone(), replica.user(id).expect("loaded")))
        .collect();
    let units = ledger::Units::ONE;
    let stale_after = Duration::from_secs(30);

    let decide = |id: &ledger::EndUserId| {
        let fresh = replica.freshness(stale_after);
        let catalog = replica.catalog().expect("catalog");
        let now = replica.now();
        let state = replica.user(id).expect("state");
        let decision = replica.pending.admit(id, |pending| {
            (
                state.decide(&catalog.catalog, &feature, units, pending, now),
                None,
            )
        });
        black_box((fresh, decision.expect("decides").allowed))
    };
    // Warm up: touch every end user once.
    for id in &ids {
        decide(id);
        black_box(map.get(id));
    }
    let mut picker = Picker::new(42);
    let order: Vec<usize> = (0..iterations).map(|_| picker.below(users)).collect();
    let mut decisions = Vec::with_capacity(iterations);
    let mut lookups = Vec::with_capacity(iterations);
    let nanos = |start: Instant| u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    for &index in &order {
        let id = &ids[index];
        let start = Instant::now();
        black_box(map.get(black_box(id)));
        lookups.push(nanos(start));
        let start = Instant::now();
        decide(id);
        decisions.push(nanos(start));
    }
    drop(view);
    println!("P1: {users} end users in the index, {iterations} calls each, interleaved");
    println!("| what | p50 | p99 | p99.9 |");
    println!("|---|---|---|---|");
    let (lookup_p50, lookup_p99) = report("bare HashMap::get", lookups);
    let (p50, p99) = report("decision (gate path)", decisions);
    #[allow(clippy::as_conversions, clippy::cast_precision_loss)]
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    println!(
        "ratio to HashMap::get: p50 {:.1}x, p99 {:.1}x",
        ratio(p50, lookup_p50),
        ratio(p99, lookup_p99)
    );
}
