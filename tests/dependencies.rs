//! The crates depend on each other only in the allowed directions
//! (ADR 0008): node and anchor are siblings over the shared `daemon`, the
//! edge node does not pull in the simulator, and the libraries below them
//! depend on none above. Read from `cargo metadata`, so a new dependency in
//! a wrong direction fails here instead of eroding the structure silently.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};

/// Workspace crates each crate may depend on (normal, build and dev).
const ALLOWED: &[(&str, &[&str])] = &[
    ("crdt-state", &[]),
    ("mesh", &[]),
    ("blobs", &[]),
    ("uplink", &[]),
    ("adapters", &["crdt-state"]),
    ("daemon", &["crdt-state", "mesh", "blobs", "uplink"]),
    ("simulations", &["crdt-state", "daemon", "blobs"]),
    (
        "node",
        &["crdt-state", "mesh", "daemon", "adapters", "blobs"],
    ),
    (
        "cloud-anchor",
        &["crdt-state", "mesh", "daemon", "blobs", "uplink"],
    ),
    (
        "shoal",
        &[
            "crdt-state",
            "mesh",
            "blobs",
            "uplink",
            "daemon",
            "adapters",
            "simulations",
            "node",
            "cloud-anchor",
        ],
    ),
];

fn workspace_deps() -> BTreeMap<String, BTreeSet<String>> {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let members: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["name"].as_str().unwrap().to_string())
                .filter(|d| members.contains(d))
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

fn violations(deps: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut out = Vec::new();
    for (krate, uses) in deps {
        let Some(ok) = allowed.get(krate.as_str()) else {
            out.push(format!(
                "{krate} is not in the table of allowed directions (tests/dependencies.rs, ADR 0008)"
            ));
            continue;
        };
        for d in uses {
            if !ok.contains(&d.as_str()) {
                out.push(format!("{krate} must not depend on {d}"));
            }
        }
    }
    out
}

#[test]
fn crates_depend_only_in_the_allowed_directions() {
    let deps = workspace_deps();
    // Every crate of the table is in the workspace (a rename would
    // otherwise leave its rule checking nothing).
    for (krate, _) in ALLOWED {
        assert!(
            deps.contains_key(*krate),
            "no crate {krate} in the workspace"
        );
    }
    let bad = violations(&deps);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn a_wrong_direction_is_caught() {
    let mut deps = workspace_deps();
    deps.get_mut("node").unwrap().insert("cloud-anchor".into());
    deps.get_mut("cloud-anchor").unwrap().insert("node".into());
    deps.get_mut("node").unwrap().insert("simulations".into());
    let bad = violations(&deps);
    assert_eq!(
        bad,
        vec![
            "cloud-anchor must not depend on node".to_string(),
            "node must not depend on cloud-anchor".to_string(),
            "node must not depend on simulations".to_string(),
        ]
    );
}
