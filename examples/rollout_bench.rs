//! Rollout figures (issue 16) with the real `shoal` binary on loopback.
//!
//! ```text
//! cargo build --release --bins --examples
//! ./target/release/examples/rollout_bench gate [nodes] [rounds]
//! ./target/release/examples/rollout_bench rollback [rounds]
//! ```
//!
//! `gate`: an anchor and `nodes` native nodes (default 50): one canary in
//! its own site, the rest in another; waves `[canary site, 100 %]`, a 2 s
//! gate. Each round applies a new version and times, from the moment the
//! gate's condition holds — the canary's report of the new version running
//! reached the anchor (seen on its API, polled every 20 ms), plus the 2 s —
//! to every node of wave 1 running the new version (their processes'
//! command lines, polled every 20 ms).
//!
//! `rollback`: one node with no peer at all, enrolled from a bundle whose
//! fleet document already holds a rollout that opened its wave. The new
//! version either fails its health check (`exec: [/bin/false]`, one failure
//! allowed) or exits at once (restarted after 1 s, then 2 s: the third exit
//! rolls it back). Times from the failed check (the new process killed) or
//! the third exit to the previous version's process running.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

/// The version a node's `meter` process runs, if one runs.
fn running(node_dir: &Path) -> Option<String> {
    running_version(node_dir, "meter")
}

fn app(version: &str, script: &str, health: &str) -> String {
    format!(
        "apiVersion: shoal.dev/v1\nkind: App\nmetadata: {{name: meter}}\nspec:\n  version: {version}\n  native:\n    command: [/bin/sh, -c, '{script}', meter-{version}]\n{health}  rollout:\n    waves: [{{sites: [canary]}}, {{percent: 100}}]\n    healthy_for_s: 2\n"
    )
}

fn median(v: &mut [f64]) -> f64 {
    percentile(v, 0.5)
}

fn gate(nodes: usize, rounds: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    fleet_init(&anchor_dir, "bench");
    let token = operator_token(&anchor_dir, "bench");
    let mut dirs = vec![bundle_node(&anchor_dir, root, "c1", "canary")];
    for i in 1..nodes {
        dirs.push(bundle_node(&anchor_dir, root, &format!("p{i}"), "plant"));
    }
    let port = free_udp_port();
    let anchor = anchor_with_http(&anchor_dir, port);
    let url = http_url(&anchor_dir);
    let mut daemons = Vec::new();
    for d in &dirs {
        daemons.push(Daemon::start(
            "node",
            d,
            &[
                "--listen".into(),
                "/ip4/127.0.0.1/udp/0/quic-v1".into(),
                "--peer".into(),
                anchor.addr_on("127.0.0.1"),
            ],
            None,
        ));
    }
    let names: Vec<String> = dirs
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    assert!(all_connected(&anchor_dir, &refs, Duration::from_secs(120)));
    let apply = |text: &str| {
        let f = write(root, "meter.yaml", text);
        ok(&["apply", "--data-dir", s(&anchor_dir), "-f", s(&f)]);
    };
    let wait_all = |v: &str| {
        assert!(
            wait_for(Duration::from_secs(120), || dirs
                .iter()
                .all(|d| running(d).as_deref() == Some(v))),
            "not every node runs {v}"
        );
    };
    apply(&app("v0", "sleep 3600", ""));
    wait_all("v0");
    let mut overheads = Vec::new();
    for round in 1..=rounds {
        let v = format!("v{round}");
        apply(&app(&v, "sleep 3600", ""));
        // The canary's report of v running reaches the anchor.
        let deadline = Instant::now() + Duration::from_secs(60);
        let seen = loop {
            let n = api_get(&format!("{url}/api/nodes/c1"), &token);
            let w = &n["node"]["workloads"]["meter"];
            if w["version"] == v.as_str() && w["state"] == "running" {
                break Instant::now();
            }
            assert!(Instant::now() < deadline, "the canary never ran {v}");
            std::thread::sleep(Duration::from_millis(20));
        };
        let holds = seen + Duration::from_secs(2);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !dirs[1..]
            .iter()
            .all(|d| running(d).as_deref() == Some(v.as_str()))
        {
            assert!(Instant::now() < deadline, "wave 1 never ran {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = Instant::now()
            .saturating_duration_since(holds)
            .as_secs_f64();
        println!(
            "round {round}: wave 1 ({} nodes) ran {v} {o:.2} s after the gate held",
            nodes - 1
        );
        overheads.push(o);
        // Let the rollout finish before the next one starts.
        assert!(wait_for(Duration::from_secs(60), || {
            api_get(&format!("{url}/api/rollouts/meter"), &token)["phase"] == "done"
        }));
    }
    let mut sorted = overheads.clone();
    println!(
        "gate overhead, {nodes} nodes, {rounds} rounds: median {:.2} s, max {:.2} s",
        median(&mut sorted),
        overheads.iter().cloned().fold(0.0, f64::max)
    );
}

fn rollback(rounds: usize) {
    let mut health_times = Vec::new();
    let mut crash_times = Vec::new();
    for round in 0..rounds {
        for health in [true, false] {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            let anchor_dir = root.join("anchor");
            fleet_init(&anchor_dir, "bench");
            let apply = |text: &str| {
                let f = write(root, "meter.yaml", text);
                ok(&["apply", "--data-dir", s(&anchor_dir), "-f", s(&f)]);
            };
            apply(&app("v1", "sleep 3600", ""));
            let bad = if health {
                app(
                    "v2",
                    "sleep 3600",
                    "    health: {exec: [/bin/false], period_s: 1, failures: 1}\n",
                )
            } else {
                app("v2", "exit 3", "")
            };
            apply(&bad);
            // The node's bundle carries the rollout; its site is the canary.
            let dir = bundle_node(&anchor_dir, root, "c1", "canary");
            let _node = Daemon::start(
                "node",
                &dir,
                &["--listen".into(), "/ip4/127.0.0.1/udp/0/quic-v1".into()],
                None,
            );
            // Every v2 process the node starts dies; the one that counts is
            // the first (health) or the third (exits). Each start rewrites
            // the pid file, so no start is missed however short it lives.
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut pids: Vec<i32> = Vec::new();
            let mut failed_at = None;
            let back = loop {
                assert!(Instant::now() < deadline, "v2 was not rolled back");
                if running(&dir).as_deref() == Some("v1") {
                    break Instant::now();
                }
                if let Some(p) = app_pid(&dir, "meter")
                    && !pids.contains(&p)
                {
                    pids.push(p);
                }
                let counted = if health { 1 } else { 3 };
                if failed_at.is_none()
                    && let Some(&p) = pids.get(counted - 1)
                    && !alive(p)
                {
                    failed_at = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            let from = failed_at.unwrap_or(back);
            let t = back.saturating_duration_since(from).as_secs_f64();
            let what = if health {
                "failed health check"
            } else {
                "third exit"
            };
            println!("round {round}: {what} → v1 running in {t:.2} s");
            if health {
                health_times.push(t);
            } else {
                crash_times.push(t);
            }
        }
    }
    println!(
        "local rollback, no network: after a failed health check median {:.2} s (max {:.2}); after the third exit median {:.2} s (max {:.2})",
        median(&mut health_times.clone()),
        health_times.iter().cloned().fold(0.0, f64::max),
        median(&mut crash_times.clone()),
        crash_times.iter().cloned().fold(0.0, f64::max)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    match args.first().map(String::as_str) {
        Some("gate") => gate(n(1, 50), n(2, 5)),
        Some("rollback") => rollback(n(1, 5)),
        _ => {
            eprintln!("usage: rollout_bench gate [nodes] [rounds] | rollback [rounds]");
            std::process::exit(2);
        }
    }
}
