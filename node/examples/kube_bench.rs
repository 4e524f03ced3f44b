//! The kube runtime's figures, against the stand-in API server of the wire
//! tests (no real API server can run on these machines; see
//! `node/tests/support/apiserver.rs`): how many writes an apply of a
//! 20-object app costs when nothing, or a few objects, changed; and how
//! long an object deleted or edited by hand takes to be put back.
//!
//! ```sh
//! cargo run --release -p node --example kube_bench
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/apiserver.rs"]
mod apiserver;

use std::time::{Duration, Instant};

use apiserver::ApiServer;
use crdt_state::fleet::model::{AppSpec, KubeSpec, RuntimeKind, WorkloadState};
use crdt_state::fleet::placement::Workload;
use node::runtime::Runtime;
use node::runtime::kube::Kube;
use serde_json::json;

fn app(version: &str, changed: usize) -> Workload {
    let mut objs = Vec::new();
    for i in 0..20 {
        let value = if i < changed { "changed" } else { "v" };
        objs.push(format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i:02}}}\ndata: {{k: {value}}}\n"
        ));
    }
    Workload {
        app: "web".into(),
        spec: AppSpec {
            runtime: RuntimeKind::Kube,
            version: Some(version.into()),
            kube: Some(KubeSpec {
                namespace: None,
                manifests: objs.join("---\n"),
                allow_cluster_scoped: false,
            }),
            ..AppSpec::default()
        },
        files: Default::default(),
        artifacts: Default::default(),
        site_api: None,
        revision: String::new(),
    }
}

async fn wait(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// PATCH requests, GET requests (watches left out), and any other.
fn counts(server: &ApiServer) -> (usize, usize, usize) {
    let seen = server.requests();
    let patches = seen.iter().filter(|s| s.method == "PATCH").count();
    let reads = seen
        .iter()
        .filter(|s| s.method == "GET" && !s.query.contains("watch=true"))
        .count();
    let other = seen
        .iter()
        .filter(|s| s.method != "PATCH" && s.method != "GET")
        .count();
    (patches, reads, other)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    node::runtime::kube::install_crypto();
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = kube::Config::new(server.url().parse().unwrap());
    node::runtime::kube::prepare(&mut config);
    let client = kube::Client::try_from(config).unwrap();
    let mut rt = Kube::new(client, dir.path()).unwrap();
    let running = |rt: &Kube, v: &str| {
        rt.status()
            .get("web")
            .is_some_and(|r| r.state == WorkloadState::Running && r.version.as_deref() == Some(v))
    };

    rt.reconcile(&[app("v1", 0)]);
    wait("first apply", || running(&rt, "v1")).await;
    let (p, r, o) = counts(&server);
    println!("first apply of 20 objects: {p} PATCH, {r} GET, {o} other");
    // The watch starts after the first round.
    wait("the watch", || {
        server
            .requests()
            .iter()
            .any(|s| s.method == "GET" && s.query.contains("watch=true"))
    })
    .await;

    // Unchanged: the same spec under a new version label, so a round is
    // certain to have run when the report shows it.
    server.clear_requests();
    rt.reconcile(&[app("v2", 0)]);
    wait("unchanged apply", || running(&rt, "v2")).await;
    let (p, r, o) = counts(&server);
    println!("apply of 20 unchanged objects: {p} PATCH, {r} GET, {o} other");

    server.clear_requests();
    rt.reconcile(&[app("v3", 3)]);
    wait("changed apply", || running(&rt, "v3")).await;
    let (p, r, o) = counts(&server);
    println!("apply with 3 of 20 objects changed: {p} PATCH, {r} GET, {o} other");

    // Drift: delete or edit one object by hand and time until it is back.
    let mut deleted = Vec::new();
    let mut edited = Vec::new();
    for i in 0..20 {
        let name = format!("cm-{:02}", i % 20);
        let t = Instant::now();
        server.delete_by_hand("v1", "ConfigMap", Some("shoal-web"), &name);
        wait("repair of a deletion", || {
            server
                .get("v1", "ConfigMap", Some("shoal-web"), &name)
                .is_some()
        })
        .await;
        deleted.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        server.edit_by_hand("v1", "ConfigMap", Some("shoal-web"), &name, |o| {
            o["data"]["k"] = json!("tampered");
        });
        wait("repair of an edit", || {
            server
                .get("v1", "ConfigMap", Some("shoal-web"), &name)
                .is_some_and(|o| o["data"]["k"] != "tampered")
        })
        .await;
        edited.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    println!(
        "drift repaired: deleted by hand median {:.1} ms (max {:.1} ms), edited by hand median {:.1} ms (max {:.1} ms), 20 each",
        median(&mut deleted.clone()),
        max(&deleted),
        median(&mut edited.clone()),
        max(&edited)
    );
    rt.shutdown().await;
}
