//! `ledger` is pure: this fails if it gains a (normal, transitive) dependency on a
//! runtime, database, HTTP stack, proxy, storage engine, or any other I/O crate.

use std::collections::BTreeSet;
use std::process::Command;

/// Crates that do I/O, spawn, or read clocks on their own. Any of them in `ledger`'s
/// normal dependency tree breaks the "no I/O" invariant.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "async-std",
    "smol",
    "mio",
    "sqlx",
    "sqlx-core",
    "rusqlite",
    "libsqlite3-sys",
    "postgres",
    "tokio-postgres",
    "axum",
    "hyper",
    "reqwest",
    "tower",
    "pingora",
    "pingora-core",
    "pingora-proxy",
    "sled",
    "rocksdb",
    "redis",
    "tracing-subscriber",
    "chrono",
    "rand",
    "getrandom",
    "libc",
    "socket2",
    "serde_json",
    "metrics",
];

#[test]
fn ledger_depends_on_no_io_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "tree",
            "--edges",
            "normal",
            "--package",
            "ledger",
            "--offline",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listing = String::from_utf8(output.stdout).expect("cargo tree prints UTF-8");
    let tree: BTreeSet<&str> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "ledger")
        .collect();
    let forbidden: Vec<&str> = tree
        .iter()
        .copied()
        .filter(|name| FORBIDDEN.contains(name))
        .collect();
    assert!(
        forbidden.is_empty(),
        "ledger depends on I/O crates: {forbidden:?} (whole tree: {tree:?})"
    );
    assert!(
        tree.contains("time") && tree.contains("ulid"),
        "the walk found ledger's own dependencies: {tree:?}"
    );
}
