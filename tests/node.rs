//! The node daemon doing its job: an app applied at the anchor runs on the
//! node as a real process and is reported back; a node restarted with no
//! network at all (an empty network namespace) starts its last desired
//! state from its store; SIGTERM leaves no process behind.
//!
//! Needs root and iproute2 for the namespace; fails (never skips) without.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

fn pid(dir: &Path, app: &str) -> Option<i32> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("apps").join(app).join("pid")).ok()?)
            .ok()?;
    v["pid"].as_i64().map(|p| p as i32)
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X")
    })
}

fn workload_state(anchor_dir: &Path, node: &str, app: &str) -> Option<String> {
    get(anchor_dir, "nodes")[node]["report"]["workloads"][app]["state"]
        .as_str()
        .map(String::from)
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn node_runs_its_share_reports_it_and_restarts_it_offline() {
    let out = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "this test needs root (ip netns)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir), "--name", "f"]);
    let anchor = Daemon::start(
        "anchor",
        &anchor_dir,
        &["--listen".into(), "/ip4/127.0.0.1/udp/0/quic-v1".into()],
        None,
    );
    let nd = root.join("n1");
    let token = ok(&[
        "fleet",
        "token",
        "create",
        "--data-dir",
        s(&anchor_dir),
        "--node",
        "n1",
        "--site",
        "s1",
    ]);
    ok(&[
        "node",
        "enroll",
        "--data-dir",
        s(&nd),
        "--token",
        token.trim(),
    ]);
    let listen = vec![
        "--listen".to_string(),
        "/ip4/127.0.0.1/udp/0/quic-v1".to_string(),
    ];
    let mut node = Daemon::start("node", &nd, &listen, None);

    let app = write(
        root,
        "svc.yaml",
        "apiVersion: shoal.dev/v1\nkind: App\nmetadata: {name: svc}\nspec:\n  native:\n    command: [/bin/sh, -c, 'echo started $GREETING; exec sleep 3600']\n    env: {GREETING: hello}\n",
    );
    ok(&["apply", "--data-dir", s(&anchor_dir), "-f", s(&app)]);
    assert!(
        wait_for(Duration::from_secs(30), || pid(&nd, "svc")
            .is_some_and(alive)),
        "svc never started: {}",
        node.log_text()
    );
    let log = nd.join("apps/svc/stdout.log");
    assert!(wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("started hello"))
    }));
    // The node reports it; the anchor shows it.
    assert!(
        wait_for(Duration::from_secs(30), || workload_state(
            &anchor_dir,
            "n1",
            "svc"
        )
        .as_deref()
            == Some("running")),
        "{}",
        get(&anchor_dir, "nodes")
    );

    // SIGTERM: the node stops its processes before it exits.
    let first = pid(&nd, "svc").unwrap();
    assert!(node.stop().success());
    assert!(!alive(first), "svc outlived its node");
    drop(anchor);

    // Restart with no network at all: an empty namespace.
    let ns = Netns(format!("sh{}o", std::process::id() % 100_000));
    let _ = Command::new("ip").args(["netns", "del", &ns.0]).output();
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap()
            .success()
    );
    // Loopback only: nothing outside the namespace is reachable.
    assert!(
        Command::new("ip")
            .args(["-n", &ns.0, "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success()
    );
    let started = std::time::Instant::now();
    let offline = Daemon::start("node", &nd, &[], Some(&ns.0));
    assert!(
        wait_for(Duration::from_secs(10), || pid(&nd, "svc")
            .is_some_and(|p| p != first && alive(p))),
        "svc did not come back offline: {}",
        offline.log_text()
    );
    eprintln!(
        "offline restart: svc running {:?} after spawning the node",
        started.elapsed()
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("started hello")
            .count()
            >= 2
    );
    drop(offline);
}
