//! P8 (DESIGN.md): proxy memory per replicated end user, goal <= 256 bytes at 1M end
//! users (and an idle proxy RSS <= 30 MB, measured by `p2_p3_proxy`).
//!
//! Run: `cargo bench -p e2e --bench p8_memory` (knob `QS_P8_SIZES`, default
//! `100000,1000000`). Each size runs in a fresh child process: its RSS is read after an
//! empty replica is opened, then after `N` end users (one credit block each, the common
//! shape) were applied through `Replica::apply` as a snapshot and persisted (sled with an
//! 8 MiB cache, and the in-memory index, which holds states compactly until they are
//! used). Per end user = (after − before) / N. A second figure loads the same states,
//! decoded, into a bare `HashMap<EndUserId, Arc<EndUserState>>` without sled: what every
//! end user cost when the index held them all decoded, and what an end user in use costs
//! now.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;

use e2e::bench::{catalog, loaded_replica, rss_bytes, user_state};

/// The proxy binary's allocator: memory per end user is the allocator's as much as ours.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn child(users: usize, bare: bool) {
    let before = rss_bytes(None);
    if bare {
        let snapshot = catalog();
        let ledger_catalog = snapshot.to_ledger().expect("catalog");
        let now = ledger::Timestamp::from_millis(1_780_000_000_000);
        let map: HashMap<ledger::EndUserId, Arc<ledger::EndUserState>> = (0..users)
            .map(|index| {
                let state = user_state(&format!("u{index}"), 1_000_000, &ledger_catalog, now);
                (state.end_user_id().clone(), Arc::new(state))
            })
            .collect();
        let after = rss_bytes(None);
        println!("{} {}", map.len(), after.saturating_sub(before));
    } else {
        let dir = tempfile::tempdir().expect("dir");
        let replica = loaded_replica(dir.path(), 0, 8);
        let before = rss_bytes(None);
        drop(replica);
        let replica = loaded_replica(dir.path(), users, 8);
        let after = rss_bytes(None);
        println!("{} {}", replica.user_count(), after.saturating_sub(before));
    }
}

fn main() {
    // As the proxy binary starts.
    proxy::cli::no_huge_pages();
    let args: Vec<String> = std::env::args().collect();
    if let (Some(mode), Some(users)) = (args.get(1), args.get(2))
        && (mode == "replica-child" || mode == "bare-child")
    {
        child(users.parse().expect("size"), mode == "bare-child");
        return;
    }
    let sizes: Vec<usize> = std::env::var("QS_P8_SIZES")
        .unwrap_or_else(|_| "100000,1000000".into())
        .split(',')
        .map(|size| size.trim().parse().expect("a size"))
        .collect();
    println!("P8: memory per replicated end user (one credit block each)");
    println!("| end users | replica (sled + index) | states decoded (HashMap, no sled) |");
    println!("|---|---|---|");
    let exe = std::env::current_exe().expect("exe");
    for users in sizes {
        let mut cells = Vec::new();
        for mode in ["replica-child", "bare-child"] {
            let output = std::process::Command::new(&exe)
                .args([mode, &users.to_string()])
                .output()
                .expect("child runs");
            let text = String::from_utf8_lossy(&output.stdout);
            let mut parts = text.split_whitespace();
            let count: u64 = parts.next().and_then(|v| v.parse().ok()).expect("count");
            let bytes: u64 = parts.next().and_then(|v| v.parse().ok()).expect("bytes");
            cells.push(format!(
                "{} B/user ({} MiB)",
                bytes / count.max(1),
                bytes / (1024 * 1024)
            ));
        }
        println!("| {users} | {} | {} |", cells[0], cells[1]);
    }
}
