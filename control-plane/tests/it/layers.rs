//! The control plane's modules depend on each other in one direction: `http` → `service`
//! → `store` → `ledger`/`protocol` (ARCHITECTURE.md, "Layers"). Read from the source:
//! every `crate::<module>` a top-level module's files name is an edge. A cycle, or a
//! layer reaching up, fails here with the path that does it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module's rank: a module may name only modules of a lower rank.
const LAYERS: &[(&str, u8)] = &[
    // Leaves: know nothing of the rest of the crate.
    ("apply", 0),
    ("clock", 0),
    ("limits", 0),
    ("queues", 0),
    // Storage: the ledger's data, no HTTP, no service.
    ("store", 1),
    // What the service is built from.
    ("auth", 2),
    ("backoff", 2),
    ("catalog", 2),
    ("error", 2),
    ("config", 3),
    ("group", 3),
    ("webhooks", 4),
    ("service", 5),
    ("jobs", 6),
    ("nats", 6),
    ("http", 7),
    ("console", 8),
    ("serve", 9),
    ("cli", 10),
    ("lib", 10),
    ("main", 10),
];

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            found.push(path);
        }
    }
}

/// Which top-level module each `crate::` path in `text` names (comments skipped).
fn named_modules(text: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let module: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                !module.is_empty(),
                "`crate::{{…}}` groups hide edges from this test; name each module: {line}"
            );
            named.insert(module);
        }
    }
    named
}

/// The module graph: each top-level module and the others its files name.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let first = relative
            .components()
            .next()
            .expect("a component")
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        let text = std::fs::read_to_string(&file).expect("read file");
        let named = named_modules(&text);
        let entry = edges.entry(first.clone()).or_default();
        entry.extend(named.into_iter().filter(|module| *module != first));
    }
    edges
}

#[test]
fn every_module_has_a_layer_and_names_only_lower_ones() {
    let ranks: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let mut wrong = Vec::new();
    for (module, named) in graph() {
        let Some(rank) = ranks.get(module.as_str()) else {
            wrong.push(format!("`{module}` has no layer: add it to LAYERS"));
            continue;
        };
        for other in named {
            match ranks.get(other.as_str()) {
                Some(other_rank) if other_rank < rank => {}
                Some(_) => wrong.push(format!(
                    "`{module}` (layer {rank}) names `{other}`, which is not below it"
                )),
                None => wrong.push(format!("`{module}` names `{other}`, which has no layer")),
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn no_import_cycle_among_modules() {
    let graph = graph();
    // Depth-first search; a node seen again on the current path closes a cycle.
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|seen| *seen == node) {
            let mut cycle: Vec<String> = path[at..].iter().map(|s| (*s).to_owned()).collect();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        let mut path = Vec::new();
        if let Some(cycle) = visit(node, &graph, &mut path, &mut done) {
            panic!("import cycle: {}", cycle.join(" → "));
        }
    }
}

#[test]
fn the_reader_sees_through_paths_and_skips_comments() {
    let text = "use crate::store::Env;\n// crate::http is only mentioned\nlet x = crate::clock::now(); crate::queues::Queues";
    let named: Vec<String> = named_modules(text).into_iter().collect();
    assert_eq!(named, ["clock", "queues", "store"]);
}
