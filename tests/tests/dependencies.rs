//! The workspace's dependency rule (DESIGN 2): `ledger` <- `protocol` <- `client` <-
//! `proxy`, and `protocol` <- `control-plane`; the two programs never depend on each
//! other. One addition (docs/decisions.md): `client` <- `control-plane`, for its `apply`
//! command, which talks to a control plane through the API like any client. Read from the
//! manifests, so a forbidden edge fails here before it spreads.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

const OURS: [&str; 5] = ["ledger", "protocol", "client", "control-plane", "proxy"];

/// The workspace crates `crate_dir` depends on (normal dependencies only).
fn our_dependencies(crate_dir: &str) -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crate_dir)
        .join("Cargo.toml");
    let text = std::fs::read_to_string(&path).expect("manifest");
    let manifest: toml::Table = toml::from_str(&text).expect("manifest parses");
    manifest
        .get("dependencies")
        .and_then(toml::Value::as_table)
        .map(|table| {
            table
                .keys()
                .filter(|name| OURS.contains(&name.as_str()))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

#[test]
fn each_crate_depends_only_on_the_layers_below_it() {
    assert_eq!(our_dependencies("ledger"), set(&[]));
    assert_eq!(our_dependencies("protocol"), set(&["ledger"]));
    assert_eq!(our_dependencies("client"), set(&["protocol"]));
    assert_eq!(
        our_dependencies("proxy"),
        set(&["client", "ledger", "protocol"])
    );
    assert_eq!(
        our_dependencies("control-plane"),
        set(&["client", "ledger", "protocol"])
    );
}
