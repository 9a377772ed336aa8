//! Tidy checks that keep the core's architecture invariant honest (the rust-analyzer way):
//! no IO, no clock and no global randomness in `mutual-core`, and no async runtime,
//! network stack or container client anywhere in its dependency tree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const FORBIDDEN_CRATES: &[&str] = &[
    "tokio",
    "iroh",
    "iroh-blobs",
    "iroh-gossip",
    "bollard",
    "hyper",
    "mio",
    "socket2",
    "axum",
    "quinn",
    "noq",
];

const FORBIDDEN_SOURCE: &[&str] = &[
    "SystemTime",
    "Instant::now",
    "thread_rng",
    "rand::rng",
    "OsRng",
    "std::fs",
    "std::net",
    "std::process",
    "std::thread",
    "std::env",
];

fn workspace_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Package name -> names of its dependencies, from Cargo.lock (all versions merged: an
/// over-approximation, which is what a "never in the tree" check wants).
fn lock_graph() -> BTreeMap<String, BTreeSet<String>> {
    let lock = std::fs::read_to_string(workspace_root().join("Cargo.lock")).expect("Cargo.lock");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let mut name = None;
        let mut deps = BTreeSet::new();
        let mut in_deps = false;
        for line in block.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("name = ") {
                name = Some(rest.trim_matches('"').to_string());
            } else if line.starts_with("dependencies = [") {
                in_deps = true;
            } else if in_deps && line.starts_with(']') {
                in_deps = false;
            } else if in_deps {
                let dep = line.trim_matches(|c| c == '"' || c == ',');
                if let Some(n) = dep.split_whitespace().next() {
                    deps.insert(n.to_string());
                }
            }
        }
        if let Some(n) = name {
            graph.entry(n).or_default().extend(deps);
        }
    }
    graph
}

#[test]
fn core_dependency_tree_has_no_runtime_network_or_container_crates() {
    let graph = lock_graph();
    let mut seen = BTreeSet::new();
    let mut stack = vec!["mutual-core".to_string()];
    while let Some(p) = stack.pop() {
        if !seen.insert(p.clone()) {
            continue;
        }
        // Dev-dependencies (proptest) are in the lock graph too; they are not part of the
        // library, so do not follow them.
        if p == "proptest" {
            continue;
        }
        if let Some(deps) = graph.get(&p) {
            stack.extend(deps.iter().cloned());
        }
    }
    assert!(
        seen.contains("automerge"),
        "the walk must reach the core's dependencies: {seen:?}"
    );
    for f in FORBIDDEN_CRATES {
        assert!(
            !seen.contains(*f),
            "{f} is in mutual-core's dependency tree"
        );
    }
}

#[test]
fn core_sources_do_no_io_read_no_clock_and_draw_no_randomness() {
    let src = workspace_root().join("crates/mutual-core/src");
    let mut checked = 0;
    for entry in std::fs::read_dir(&src).expect("src") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("read");
            for (i, line) in text.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                for f in FORBIDDEN_SOURCE {
                    assert!(
                        !line.contains(f),
                        "{}:{}: uses {f}: {line}",
                        path.display(),
                        i + 1
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "expected the core's modules, found {checked}"
    );
}
