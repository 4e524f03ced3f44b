//! Mesh figures with the real `shoal` binary on loopback, links through
//! `simulations::udp_link` (delay, jitter, loss, cuts).
//!
//! ```text
//! cargo build --release
//! cargo run --release --example mesh_bench -- resync  [reps] [cut_s]
//! cargo run --release --example mesh_bench -- idle    [minutes]
//! cargo run --release --example mesh_bench -- restart [nodes]
//! cargo run --release --example mesh_bench -- offline [runs]   # node start → 10 apps running, no anchor
//! cargo run --release --example mesh_bench -- change  [reps]   # desired change at the anchor → app restarted with it
//! cargo run --release --example mesh_bench -- memory           # node RSS with the mesh up and 10 apps
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use simulations::udp_link::{LinkConfig, UdpLink};
use support::{
    Daemon, alive, app_pid, app_version, bin, bundle_node, enroll, free_udp_port, get, ok,
    percentile, s,
};

fn start(kind: &str, dir: &Path, args: &[String]) -> Daemon {
    Daemon::start(kind, dir, args, None)
}

fn wait(within: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < within {
        if f() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn app(root: &Path, name: &str, version: &str) -> PathBuf {
    let p = root.join(format!("{name}-{version}.yaml"));
    std::fs::write(
        &p,
        // A process that stays up: an app that exits at once would be
        // restarted (backoff up to 30 s) and each restart is a report that
        // syncs, which is not the idle cost of a link.
        format!("apiVersion: shoal.dev/v1\nkind: App\nmetadata: {{name: {name}}}\nspec:\n  version: \"{version}\"\n  native: {{command: [/bin/sh, -c, \"exec sleep 3600\"]}}\n"),
    )
    .unwrap();
    p
}

fn site(root: &Path, version: &str) -> PathBuf {
    let p = root.join(format!("site-{version}.yaml"));
    std::fs::write(
        &p,
        format!("apiVersion: shoal.dev/v1\nkind: SiteOverride\nmetadata: {{name: s1}}\nspec:\n  apps:\n    web: {{version: \"{version}\"}}\n"),
    )
    .unwrap();
    p
}

/// An anchor, a site engineer and node n1 (site s1) behind a UDP link.
struct Pair {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    anchor_dir: PathBuf,
    node_dir: PathBuf,
    eng: PathBuf,
    link: UdpLink,
    _anchor: Daemon,
    _node: Daemon,
}

fn pair(config: LinkConfig) -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir)]);
    let eng = root.join("eng.json");
    ok(&[
        "identity",
        "create",
        "--data-dir",
        s(&anchor_dir),
        "--role",
        "site-engineer",
        "--site",
        "s1",
        "--name",
        "eng",
        "--out",
        s(&eng),
    ]);
    let node_dir = bundle_node(&anchor_dir, &root, "n1", "s1");
    let port = free_udp_port();
    let anchor = start(
        "anchor",
        &anchor_dir,
        &[
            "--listen".into(),
            format!("/ip4/127.0.0.1/udp/{port}/quic-v1"),
        ],
    );
    let upstream: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let link = UdpLink::start("127.0.0.1:0".parse().unwrap(), upstream, config).unwrap();
    let node = start(
        "node",
        &node_dir,
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--peer".into(),
            format!(
                "/ip4/127.0.0.1/udp/{}/quic-v1/p2p/{}",
                link.addr().port(),
                anchor.peer_id()
            ),
        ],
    );
    Pair {
        _tmp: tmp,
        root,
        anchor_dir,
        node_dir,
        eng,
        link,
        _anchor: anchor,
        _node: node,
    }
}

fn resync(reps: usize, cut_s: u64) {
    let p = pair(LinkConfig {
        delay: Duration::from_millis(50),
        jitter: Duration::from_millis(5),
        loss: 0.01,
    });
    let a = app(&p.root, "web", "0");
    ok(&["apply", "--data-dir", s(&p.anchor_dir), "-f", s(&a)]);
    wait(Duration::from_secs(30), || {
        app_version(&p.node_dir, "web").as_deref() == Some("0")
    })
    .expect("initial sync");
    let mut times = Vec::new();
    for rep in 1..=reps {
        p.link.set_cut(true);
        let v = rep.to_string();
        ok(&[
            "apply",
            "--data-dir",
            s(&p.anchor_dir),
            "-f",
            s(&app(&p.root, "web", &v)),
        ]);
        ok(&[
            "apply",
            "--data-dir",
            s(&p.node_dir),
            "--identity",
            s(&p.eng),
            "-f",
            s(&site(&p.root, &v)),
        ]);
        std::thread::sleep(Duration::from_secs(cut_s));
        p.link.set_cut(false);
        let t = wait(Duration::from_secs(120), || {
            app_version(&p.node_dir, "web").as_deref() == Some(v.as_str())
                && get(&p.anchor_dir, "sites")["s1"]["apps"]["web"]["version"] == v.as_str()
        })
        .expect("resync");
        println!(
            "rep {rep}: resynced {:.0} ms after the link returned",
            t.as_secs_f64() * 1e3
        );
        times.push(t.as_secs_f64() * 1e3);
    }
    let mut t = times.clone();
    println!(
        "cut {cut_s} s, 100 ms RTT, 1% loss, {reps} reps: median {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        percentile(&mut t, 0.5),
        percentile(&mut t, 0.95),
        percentile(&mut t, 1.0)
    );
}

fn idle(minutes: u64) {
    let p = pair(LinkConfig::default());
    let a = app(&p.root, "web", "0");
    ok(&["apply", "--data-dir", s(&p.anchor_dir), "-f", s(&a)]);
    wait(Duration::from_secs(30), || {
        app_version(&p.node_dir, "web").as_deref() == Some("0")
    })
    .expect("initial sync");
    std::thread::sleep(Duration::from_secs(70));
    let c0 = p.link.counters();
    std::thread::sleep(Duration::from_secs(60 * minutes));
    let c1 = p.link.counters();
    let packets = (c1.up_packets - c0.up_packets) + (c1.down_packets - c0.down_packets);
    let bytes = (c1.up_bytes - c0.up_bytes) + (c1.down_bytes - c0.down_bytes);
    let m = minutes as f64;
    println!(
        "idle over {minutes} min: {:.1} datagrams/min, {:.0} B/min UDP payload, {:.0} B/min with IPv4+UDP headers (both directions)",
        packets as f64 / m,
        bytes as f64 / m,
        (bytes + 28 * packets) as f64 / m
    );
}

fn restart(nodes: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir)]);
    let port = free_udp_port();
    let listen = vec![
        "--listen".to_string(),
        format!("/ip4/127.0.0.1/udp/{port}/quic-v1"),
    ];
    let mut anchor = start("anchor", &anchor_dir, &listen);
    let mut procs = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..nodes {
        let name = format!("n{i}");
        let d = root.join(&name);
        enroll(&anchor_dir, &d, &name, &format!("s{}", i % 5));
        procs.push(start(
            "node",
            &d,
            &["--listen".into(), "/ip4/127.0.0.1/udp/0/quic-v1".into()],
        ));
        dirs.push(d);
    }
    let all_connected = |anchor_dir: &Path| {
        let v = get(anchor_dir, "nodes");
        (0..nodes).all(|i| v[format!("n{i}")]["connected"] == true)
    };
    wait(Duration::from_secs(120), || all_connected(&anchor_dir)).expect("all connected");
    ok(&[
        "apply",
        "--data-dir",
        s(&anchor_dir),
        "-f",
        s(&app(root, "web", "1")),
    ]);
    wait(Duration::from_secs(120), || {
        dirs.iter()
            .all(|d| app_version(d, "web").as_deref() == Some("1"))
    })
    .expect("first sync");
    // Killed, not stopped: SIGKILL.
    anchor.kill();
    drop(anchor);
    anchor = start("anchor", &anchor_dir, &listen);
    let t0 = Instant::now();
    ok(&[
        "apply",
        "--data-dir",
        s(&anchor_dir),
        "-f",
        s(&app(root, "web", "2")),
    ]);
    let connected =
        wait(Duration::from_secs(120), || all_connected(&anchor_dir)).map(|_| t0.elapsed());
    let synced = wait(Duration::from_secs(120), || {
        dirs.iter()
            .all(|d| app_version(d, "web").as_deref() == Some("2"))
    })
    .map(|_| t0.elapsed());
    println!(
        "anchor killed and restarted with {nodes} nodes: all reconnected after {:?}, all resynced after {:?}",
        connected, synced
    );
    drop(anchor);
}

/// An anchor and node n1 on loopback with `apps` native apps running.
struct Node {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    anchor_dir: PathBuf,
    node_dir: PathBuf,
    anchor: Option<Daemon>,
    node: Option<Daemon>,
}

fn apps_yaml(root: &Path, n: usize, value: &str) -> PathBuf {
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "---\napiVersion: shoal.dev/v1\nkind: App\nmetadata: {{name: app{i}}}\nspec:\n  native:\n    command: [/bin/sh, -c, 'echo V=$V; exec sleep 3600']\n    env: {{V: \"{value}\"}}\n"
        ));
    }
    let p = root.join(format!("apps-{value}.yaml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn node_with_apps(apps: usize) -> Node {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir)]);
    let listen = vec![
        "--listen".to_string(),
        "/ip4/127.0.0.1/udp/0/quic-v1".to_string(),
    ];
    let anchor = start("anchor", &anchor_dir, &listen);
    let node_dir = root.join("n1");
    enroll(&anchor_dir, &node_dir, "n1", "n1");
    let node = start("node", &node_dir, &listen);
    ok(&[
        "apply",
        "--data-dir",
        s(&anchor_dir),
        "-f",
        s(&apps_yaml(&root, apps, "0")),
    ]);
    wait(Duration::from_secs(60), || {
        (0..apps).all(|i| app_pid(&node_dir, &format!("app{i}")).is_some_and(alive))
    })
    .expect("apps running");
    Node {
        _tmp: tmp,
        root,
        anchor_dir,
        node_dir,
        anchor: Some(anchor),
        node: Some(node),
    }
}

fn offline(runs: usize) {
    let mut n = node_with_apps(10);
    n.node.as_mut().unwrap().stop();
    n.node = None;
    n.anchor = None;
    let mut times = Vec::new();
    for _ in 0..runs {
        let before: Vec<Option<i32>> = (0..10)
            .map(|i| app_pid(&n.node_dir, &format!("app{i}")))
            .collect();
        let t0 = Instant::now();
        let mut child = Daemon {
            child: Command::new(bin())
                .args(["node", "run", "--data-dir", s(&n.node_dir)])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
            dir: n.node_dir.clone(),
            log: PathBuf::new(),
        };
        wait(Duration::from_secs(30), || {
            (0..10).all(|i| {
                app_pid(&n.node_dir, &format!("app{i}"))
                    .is_some_and(|p| alive(p) && Some(p) != before[i])
            })
        })
        .expect("apps back");
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        child.stop();
    }
    let mut t = times.clone();
    println!(
        "offline start, 10 native apps, {runs} runs: median {:.0} ms, max {:.0} ms (all: {:?})",
        percentile(&mut t, 0.5),
        percentile(&mut t, 1.0),
        times.iter().map(|x| x.round()).collect::<Vec<_>>()
    );
}

fn change(reps: usize) {
    let n = node_with_apps(1);
    let log = n.node_dir.join("apps/app0/stdout.log");
    let mut times = Vec::new();
    for rep in 1..=reps {
        let v = rep.to_string();
        let t0 = Instant::now();
        ok(&[
            "apply",
            "--data-dir",
            s(&n.anchor_dir),
            "-f",
            s(&apps_yaml(&n.root, 1, &v)),
        ]);
        let want = format!("V={v}\n");
        wait(Duration::from_secs(30), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains(&want))
        })
        .expect("restarted with the change");
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let mut t = times.clone();
    println!(
        "desired change at the anchor → app restarted with it (loopback), {reps} reps: median {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        percentile(&mut t, 0.5),
        percentile(&mut t, 0.95),
        percentile(&mut t, 1.0)
    );
}

fn memory() {
    let n = node_with_apps(10);
    std::thread::sleep(Duration::from_secs(30));
    let pid = n.node.as_ref().unwrap().child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap_or("")
            .to_string()
    };
    println!(
        "node with the mesh up (connected to the anchor) and 10 native apps, after 30 s idle: {} / {}",
        field("VmRSS"),
        field("VmHWM")
    );
    // Where it is: the binary's pages (file-backed, shared with every other
    // shoal process) or the process's own (heap, stacks).
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let kb = |k: &str| {
        rollup
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string()
    };
    println!(
        "of which anonymous (heap, stacks) {} kB, private dirty {} kB, the rest the binary's pages; threads: {}",
        kb("Anonymous:"),
        kb("Private_Dirty:"),
        field("Threads:").trim_start_matches("Threads:").trim()
    );
    // Per mapping (path and permissions), the largest first: which part of
    // the binary (text, read-only data, relocated data) the pages are in.
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by: std::collections::BTreeMap<String, u64> = Default::default();
    let mut current = String::new();
    for line in smaps.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words
            .first()
            .is_some_and(|w| w.contains('-') && !w.ends_with(':'))
        {
            let path = words.get(5).copied().unwrap_or("[anon]");
            current = format!("{} {}", words.get(1).copied().unwrap_or(""), path);
        } else if words.first() == Some(&"Rss:") {
            *by.entry(current.clone()).or_default() += words
                .get(1)
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    let mut by: Vec<_> = by.into_iter().filter(|(_, kb)| *kb >= 64).collect();
    by.sort_by_key(|(_, kb)| std::cmp::Reverse(*kb));
    for (mapping, kb) in by {
        println!("  {kb:>6} kB  {mapping}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n = |i: usize, d: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    match args.first().map(String::as_str) {
        Some("resync") => resync(n(1, 20) as usize, n(2, 25)),
        Some("idle") => idle(n(1, 5)),
        Some("restart") => restart(n(1, 50) as usize),
        Some("offline") => offline(n(1, 11) as usize),
        Some("change") => change(n(1, 20) as usize),
        Some("memory") => memory(),
        _ => {
            eprintln!("usage: mesh_bench resync [reps] [cut_s] | idle [minutes] | restart [nodes]")
        }
    }
}
