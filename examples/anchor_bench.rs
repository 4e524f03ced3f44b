//! Anchor figures with the real `shoal` binary: the operator API and the
//! web UI with 10,000 node documents, and an operator edit through the API
//! reaching connected nodes.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example anchor_bench -- scale [nodes] [requests]   # GET /api/nodes p99, RSS, UI render in Chromium
//! cargo run --release --example anchor_bench -- edit  [nodes] [reps]       # API edit → app restarted with it on every node
//! cargo run --release --example anchor_bench -- scale-https …               # the same over HTTPS (fleet TLS CA)
//! cargo run --release --example anchor_bench -- edit-signed …               # the edit signed by the operator's key, over HTTPS
//! cargo run --release --example anchor_bench -- edit-browser …              # the edit signed in Chromium with the operator's browser key
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/cdp.rs"]
mod cdp;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use crdt_state::fleet::model::{NodeReport, WorkloadReport, WorkloadState};
use crdt_state::signed::bundle::Bundle;
use crdt_state::{DataDir, DocId, Document, Identity, PublicKey, Role, fleet::manifest};
use serde_json::json;
use support::{
    Daemon, api_get, enroll, fleet_init, free_udp_port, http, http_url, ok, operator_token,
    percentile, rss_mb, s,
};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A fleet of `n` registered nodes, each with a signed node document
/// holding a report (a tenth of them one fleet change behind), written
/// into the anchor's store as one verified bundle import.
fn populate(anchor_dir: &Path, n: usize) {
    let t = Instant::now();
    let mut dd = DataDir::open(anchor_dir, None).unwrap();
    let mut yaml = String::new();
    for i in 0..n {
        yaml.push_str(&format!(
            "---\napiVersion: shoal.dev/v1\nkind: Node\nmetadata: {{name: n{i:05}}}\nspec: {{site: s{:03}, labels: {{rack: r{}}}}}\n",
            i % 100,
            i % 10
        ));
    }
    yaml.push_str("---\napiVersion: shoal.dev/v1\nkind: App\nmetadata: {name: meter}\nspec: {version: v1, native: {command: [/bin/true]}}\n");
    dd.apply(&manifest::parse("nodes", &yaml).unwrap(), now())
        .unwrap();
    let old: Vec<String> = dd
        .doc(&DocId::Fleet)
        .unwrap()
        .heads()
        .iter()
        .map(|h| h.to_string())
        .collect();
    let cfg = "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {name: c}\nspec: {data: {k: v}}\n";
    dd.apply(&manifest::parse("c", cfg).unwrap(), now())
        .unwrap();
    let heads: Vec<String> = dd
        .doc(&DocId::Fleet)
        .unwrap()
        .heads()
        .iter()
        .map(|h| h.to_string())
        .collect();
    let root_text = std::fs::read_to_string(anchor_dir.join("root.key")).unwrap();
    let root = crdt_state::signed::identity::parse_secret(&root_text).unwrap();
    let root_pub = PublicKey(root.verifying_key().to_bytes());
    let mut certs = Vec::new();
    let mut docs = Vec::new();
    for i in 0..n {
        let name = format!("n{i:05}");
        let site = format!("s{:03}", i % 100);
        let id = Identity::issue(
            &root,
            crdt_state::signed::identity::generate_key().unwrap(),
            &name,
            Role::Node,
            Some(&site),
            now(),
        )
        .unwrap();
        let report = NodeReport {
            fleet_heads: if i % 10 == 0 {
                old.clone()
            } else {
                heads.clone()
            },
            workloads: [(
                "meter".to_string(),
                WorkloadReport {
                    state: if i % 50 == 0 {
                        WorkloadState::Failed
                    } else {
                        WorkloadState::Running
                    },
                    reason: (i % 50 == 0).then(|| "exited with status 1".to_string()),
                    restarts: 0,
                    version: Some("v1".into()),
                    revision: None,
                },
            )]
            .into(),
            reconciled_at: now(),
            ..NodeReport::default()
        };
        let mut doc = Document::new(DocId::Node {
            name: name.clone(),
            epoch: 0,
        });
        let ops = report.ops(&doc);
        let (_, change, _) = doc.edit(&id, now(), &ops).unwrap().unwrap();
        docs.push((doc.id().clone(), vec![change]));
        certs.push(id.cert);
    }
    let bundle = Bundle {
        root: Some(root_pub),
        certs,
        docs,
    }
    .encode(root_pub);
    let r = dd.import(&bundle).unwrap();
    assert_eq!(r.waiting, 0);
    println!(
        "populated {n} nodes ({} node documents, bundle {:.1} MB) in {:.1} s",
        r.new_changes.len(),
        bundle.len() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
}

/// The anchor's HTTP arguments: TLS with a certificate from the fleet's
/// TLS CA (which `http` then trusts), or plain HTTP; the URL scheme, and
/// Chromium's flag to accept that certificate.
fn http_args(anchor_dir: &Path, tls: bool) -> (Vec<String>, &'static str, Vec<String>) {
    let mut args = vec!["--http".to_string(), "127.0.0.1:0".into()];
    if !tls {
        args.push("--insecure-http".into());
        return (args, "http", Vec::new());
    }
    let out = anchor_dir.join("tls-out");
    let pin = support::fleet_tls_cert(anchor_dir, &["127.0.0.1"], &out);
    support::trust_ca(&out.join("tls-ca.pem"));
    args.extend([
        "--tls-cert".into(),
        s(&out.join("tls.pem")).into(),
        "--tls-key".into(),
        s(&out.join("tls.key")).into(),
    ]);
    (
        args,
        "https",
        vec![format!("--ignore-certificate-errors-spki-list={pin}")],
    )
}

fn scale(n: usize, requests: usize, tls: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let anchor_dir = tmp.path().join("anchor");
    fleet_init(&anchor_dir, "big");
    populate(&anchor_dir, n);
    let token = operator_token(&anchor_dir, "bench");
    let store = std::fs::metadata(anchor_dir.join("store.redb"))
        .unwrap()
        .len();
    let (http_args, scheme, browser_flags) = http_args(&anchor_dir, tls);
    let t = Instant::now();
    let mut args = vec![
        "--listen".to_string(),
        format!("/ip4/127.0.0.1/udp/{}/quic-v1", free_udp_port()),
    ];
    args.extend(http_args);
    let anchor = Daemon::start("anchor", &anchor_dir, &args, None);
    let url = http_url(&anchor_dir).replace("http://", &format!("{scheme}://"));
    println!("over {scheme} (every request a new connection)");
    while http("GET", &format!("{url}/readyz"), None, None).0 != 200 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let listed = api_get(&format!("{url}/api/nodes?per_page=1"), &token)["total"].as_u64();
    println!(
        "anchor start with {n} nodes to ready: {:.2} s; store {:.1} MB; listed {listed:?}; RSS {:.0} MB",
        t.elapsed().as_secs_f64(),
        store as f64 / 1e6,
        rss_mb(anchor.child.id())
    );
    let pages = n.div_ceil(50).max(1);
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    type Case = (&'static str, Box<dyn Fn(u64) -> String>);
    let cases: Vec<Case> = vec![
        (
            "page of 50",
            Box::new(move |r| format!("/api/nodes?page={}&per_page=50", r % pages as u64 + 1)),
        ),
        (
            "filter site",
            Box::new(|r| format!("/api/nodes?site=s{:03}&page=1", r % 100)),
        ),
        (
            "filter state+label",
            Box::new(|r| format!("/api/nodes?state=behind&label=rack=r{}&page=1", r % 10)),
        ),
        (
            "search name",
            Box::new(|r| format!("/api/nodes?q=n{:03}", r % 1000)),
        ),
        ("overview", Box::new(|_| "/api/overview".to_string())),
    ];
    for (label, path) in &cases {
        let mut times = Vec::new();
        for _ in 0..requests {
            let p = path(next());
            let t = Instant::now();
            let (st, body) = http("GET", &format!("{url}{p}"), Some(&token), None);
            times.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(st, 200, "{p}: {body}");
        }
        let mut t = times.clone();
        println!(
            "GET {label} ({requests} requests): median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(&mut t, 0.5),
            percentile(&mut t, 0.99),
            percentile(&mut t, 1.0)
        );
    }
    println!(
        "anchor RSS after the requests: {:.0} MB",
        rss_mb(anchor.child.id())
    );

    let mut b = cdp::Browser::launch_with(1280, 860, &browser_flags).expect("chromium");
    b.navigate(&format!("{url}/#token={token}")).unwrap();
    b.wait_until(
        "!!document.querySelector('#total-nodes')",
        Duration::from_secs(30),
    )
    .unwrap();
    for (label, hash, cond) in [
        (
            "overview",
            "#/overview",
            format!(
                "document.querySelector('#total-nodes')?.textContent === '{n}' && document.querySelectorAll('#sites tbody tr').length === {}",
                n.min(100)
            ),
        ),
        (
            "nodes page",
            "#/nodes",
            "document.querySelectorAll('#nodes tbody tr').length === 50".to_string(),
        ),
    ] {
        let mut times = Vec::new();
        for rep in 0..10 {
            b.navigate(&format!("{url}/?r={rep}{hash}")).unwrap();
            // The new document, not a buffered load event of the old one.
            b.wait_until(
                &format!("location.search === '?r={rep}' && document.readyState === 'complete'"),
                Duration::from_secs(20),
            )
            .unwrap();
            let js = format!(
                "new Promise((resolve) => {{ const check = () => ({cond}) ? resolve(performance.now()) : (performance.now() > 15000 ? resolve(-1) : setTimeout(check, 2)); check(); }})"
            );
            let t = b.eval(&js).unwrap().as_f64().unwrap();
            assert!(
                t >= 0.0,
                "{label} never rendered: {} {:?}",
                b.eval("document.querySelector('main').innerText").unwrap(),
                b.errors()
            );
            times.push(t);
        }
        let mut t = times.clone();
        println!(
            "{label} fully rendered in Chromium, from navigation start (10 loads): median {:.0} ms, max {:.0} ms",
            percentile(&mut t, 0.5),
            percentile(&mut t, 1.0)
        );
    }
    println!(
        "anchor RSS after the UI loads: {:.0} MB",
        rss_mb(anchor.child.id())
    );

    // An edit signed in the browser at this size (ADR 0015): the anchor
    // makes the unsigned change for a key (any key will do to time it).
    let cfg = |rep: usize| {
        format!(
            "apiVersion: shoal.dev/v1\nkind: Config\nmetadata: {{name: bench}}\nspec:\n  data: {{rep: \"{rep}\"}}\n"
        )
    };
    let body = json!({ "apply": { "files": [{ "name": "c", "text": cfg(0) }] } }).to_string();
    let (mut times, mut size) = (Vec::new(), 0);
    for _ in 0..10 {
        let t = Instant::now();
        let (st, answer) = http(
            "POST",
            &format!("{url}/api/prepare?key={}", "ab".repeat(32)),
            Some(&token),
            Some(&body),
        );
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(st, 200, "{answer}");
        size = answer.len();
    }
    let mut t = times.clone();
    println!(
        "POST /api/prepare?key= of a config edit with {n} nodes (10 requests): median {:.1} ms, answer {} bytes",
        percentile(&mut t, 0.5),
        size
    );
    let within = Duration::from_secs(60);
    enroll_browser_key(&mut b, &url, &token);
    let (mut shown, mut signed) = (Vec::new(), Vec::new());
    for rep in 0..=5 {
        let (t, t1) = sign_in_browser(&mut b, "config", rep, &cfg(rep + 1), within);
        b.wait_until(
            "document.querySelector('#applied')?.innerText.includes('Signed by')",
            within,
        )
        .unwrap();
        if rep > 0 {
            // rep 0 also loads the Automerge script.
            shown.push((t1 - t).as_secs_f64() * 1e3);
            signed.push(t1.elapsed().as_secs_f64() * 1e3);
        }
    }
    let (mut a, mut z) = (shown.clone(), signed.clone());
    println!(
        "browser-signed config edit with {n} nodes (5 reps; polled every 50 ms): Apply → fields shown (prepare, decode and check) median {:.0} ms; Sign → the anchor's answer (sign, POST /api/changes, verified and committed) median {:.0} ms",
        percentile(&mut a, 0.5),
        percentile(&mut z, 0.5)
    );
}

/// In a fresh editor of `kind` (`app` or `config`; a new hash each rep),
/// puts `yaml`, applies it and signs it in the page. Returns when Apply
/// and when Sign were clicked.
fn sign_in_browser(
    b: &mut cdp::Browser,
    kind: &str,
    rep: usize,
    yaml: &str,
    within: Duration,
) -> (Instant, Instant) {
    b.eval(&format!("location.hash = '#/{kind}/new?rep={rep}'"))
        .unwrap();
    b.wait_until(
        &format!("location.hash.endsWith('rep={rep}') && document.querySelector('#yaml')?.value.includes('my-{kind}')"),
        within,
    )
    .unwrap();
    b.fill("#yaml", yaml).unwrap();
    let apply = Instant::now();
    b.click("#save").unwrap();
    b.wait_until("!!document.querySelector('#sign-confirm')", within)
        .unwrap();
    let sign = Instant::now();
    b.click("#sign-confirm").unwrap();
    (apply, sign)
}

/// Enrolls and starts `nodes` nodes in five sites; returns once the
/// anchor sees them all connected.
fn start_nodes(
    anchor_dir: &Path,
    root: &Path,
    url: &str,
    token: &str,
    nodes: usize,
) -> (Vec<Daemon>, Vec<std::path::PathBuf>) {
    let mut procs = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..nodes {
        let name = format!("n{i}");
        let d = root.join(&name);
        enroll(anchor_dir, &d, &name, &format!("s{}", i % 5));
        procs.push(Daemon::start(
            "node",
            &d,
            &["--listen".into(), "/ip4/127.0.0.1/udp/0/quic-v1".into()],
            None,
        ));
        dirs.push(d);
    }
    let connected = || api_get(&format!("{url}/api/overview"), token)["connected"] == nodes;
    let t = Instant::now();
    while !connected() {
        assert!(t.elapsed() < Duration::from_secs(120), "not all connected");
        std::thread::sleep(Duration::from_millis(50));
    }
    (procs, dirs)
}

/// Waits until app0's log on every node shows `want` (60 s from `t0`).
fn restarted(dirs: &[std::path::PathBuf], want: &str, t0: Instant) {
    let mut pending: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
    while !pending.is_empty() {
        pending.retain(|d| {
            !std::fs::read_to_string(d.join("apps/app0/stdout.log")).is_ok_and(|l| l.contains(want))
        });
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{} nodes never restarted with {want:?}",
            pending.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `signed`: the edit is made and signed by the operator's own key and
/// posted as changes (`shoal apply --anchor --identity`'s path), over
/// HTTPS; else `POST /api/apply` over plain HTTP, signed by the anchor.
fn edit(nodes: usize, reps: usize, signed: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir)]);
    let token = operator_token(&anchor_dir, "bench");
    let alice = root.join("alice.json");
    support::operator_identity(&anchor_dir, "alice", &alice);
    let port = free_udp_port();
    let (http_args, scheme, _) = http_args(&anchor_dir, signed);
    let mut args = vec![
        "--listen".to_string(),
        format!("/ip4/127.0.0.1/udp/{port}/quic-v1"),
    ];
    args.extend(http_args);
    let _anchor = Daemon::start("anchor", &anchor_dir, &args, None);
    let url = http_url(&anchor_dir).replace("http://", &format!("{scheme}://"));
    let client = cloud_anchor::client::Client::with_ca(
        &url,
        &token,
        Some(anchor_dir.join("tls-out").join("tls-ca.pem"))
            .filter(|p| p.exists())
            .as_deref(),
    )
    .unwrap();
    let (procs, dirs) = start_nodes(&anchor_dir, root, &url, &token, nodes);
    let app = |v: &str| {
        json!({ "files": [{ "name": "app.yaml", "text": format!(
            "apiVersion: shoal.dev/v1\nkind: App\nmetadata: {{name: app0}}\nspec:\n  native:\n    command: [/bin/sh, -c, 'echo V=$V; exec sleep 3600']\n    env: {{V: \"{v}\"}}\n") }] })
        .to_string()
    };
    let mut times = Vec::new();
    for rep in 0..=reps {
        let v = format!("r{rep}");
        let want = format!("V={v}\n");
        let t0 = Instant::now();
        if signed {
            let text = app(&v);
            let body: serde_json::Value = serde_json::from_str(&text).unwrap();
            let yaml = body["files"][0]["text"].as_str().unwrap();
            let manifests = manifest::parse("app.yaml", yaml).unwrap();
            client.apply_signed(&alice, &manifests).unwrap();
        } else {
            let (st, body) = http(
                "POST",
                &format!("{url}/api/apply"),
                Some(&token),
                Some(&app(&v)),
            );
            assert_eq!(st, 200, "{body}");
        }
        restarted(&dirs, &want, t0);
        if rep > 0 {
            // rep 0 warms up (first start of the app everywhere).
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut t = times.clone();
    let how = if signed {
        "operator-signed edit (fetch, sign, POST /api/changes over HTTPS)"
    } else {
        "API edit (POST /api/apply, plain HTTP)"
    };
    println!(
        "{how} → app restarted with it on all {nodes} nodes (loopback), {reps} reps: median {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        percentile(&mut t, 0.5),
        percentile(&mut t, 0.95),
        percentile(&mut t, 1.0)
    );
    drop(procs);
}

/// Invites "alice" as an operator (an admin's `token`) and enrolls a key in
/// the logged-in page with the code; returns once it is certified (the
/// bench's anchors hold the root, so at once).
fn enroll_browser_key(b: &mut cdp::Browser, url: &str, token: &str) {
    let (st, invite) = http(
        "POST",
        &format!("{url}/api/keys/invite"),
        Some(token),
        Some(&json!({ "name": "alice", "role": "operator" }).to_string()),
    );
    assert_eq!(st, 200, "{invite}");
    let code: serde_json::Value = serde_json::from_str(&invite).unwrap();
    let within = Duration::from_secs(60);
    b.eval("location.hash = '#/keys'").unwrap();
    b.wait_until("!!document.querySelector('#enroll-code')", within)
        .unwrap();
    b.fill("#enroll-code", code["code"].as_str().unwrap())
        .unwrap();
    b.click("#enroll").unwrap();
    b.wait_until(
        "document.querySelector('#key-state')?.dataset.state === 'certified'",
        within,
    )
    .unwrap();
}

/// An edit signed in Chromium with the operator's enrolled browser key
/// (ADR 0015), over HTTPS: from the click on "Sign and apply" (the page
/// signs the change it checked with WebCrypto and posts it) to the app
/// restarted with the new value on every node. The click on "Apply" before
/// it (the anchor makes the unsigned change; the page decodes and checks
/// it with Automerge and shows the fields) is timed apart, to the dialog
/// drawn.
fn edit_browser(nodes: usize, reps: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir)]);
    let token = support::token_with_role(&anchor_dir, "bench", "admin");
    let (http_args, _, chrome_flags) = http_args(&anchor_dir, true);
    let mut args = vec![
        "--listen".to_string(),
        format!("/ip4/127.0.0.1/udp/{}/quic-v1", free_udp_port()),
    ];
    args.extend(http_args);
    let _anchor = Daemon::start("anchor", &anchor_dir, &args, None);
    let url = http_url(&anchor_dir).replace("http://", "https://");
    let (procs, dirs) = start_nodes(&anchor_dir, root, &url, &token, nodes);
    let mut b = cdp::Browser::launch_with(1280, 900, &chrome_flags).unwrap();
    let within = Duration::from_secs(60);
    b.navigate(&format!("{url}/")).unwrap();
    b.wait_until("!!document.querySelector('#token')", within)
        .unwrap();
    b.fill("#token", &token).unwrap();
    b.click("#login-form button").unwrap();
    b.wait_until("!!document.querySelector('#logout')", within)
        .unwrap();
    enroll_browser_key(&mut b, &url, &token);
    let app = |v: &str| {
        format!(
            "apiVersion: shoal.dev/v1\nkind: App\nmetadata: {{name: app0}}\nspec:\n  native:\n    command: [/bin/sh, -c, 'echo V=$V; exec sleep 3600']\n    env: {{V: \"{v}\"}}\n"
        )
    };
    let (mut prepared, mut times) = (Vec::new(), Vec::new());
    for rep in 0..=reps {
        let v = format!("r{rep}");
        let want = format!("V={v}\n");
        let (t_apply, t0) = sign_in_browser(&mut b, "app", rep, &app(&v), within);
        restarted(&dirs, &want, t0);
        if rep > 0 {
            // rep 0 warms up (first start of the app everywhere, and the
            // page's first load of Automerge).
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            prepared.push((t0 - t_apply).as_secs_f64() * 1e3);
        }
        b.wait_until(
            "document.querySelector('#applied')?.innerText.includes('Signed by')",
            within,
        )
        .unwrap();
    }
    let (mut t, mut p) = (times.clone(), prepared.clone());
    println!(
        "browser-signed edit (Chromium, HTTPS: the anchor's change checked with Automerge, signed with WebCrypto, POST /api/changes) → app restarted with it on all {nodes} nodes (loopback), {reps} reps: median {:.0} ms, p95 {:.0} ms, max {:.0} ms; before it, Apply → the fields shown to sign (POST /api/prepare; polled every 50 ms): median {:.0} ms",
        percentile(&mut t, 0.5),
        percentile(&mut t, 0.95),
        percentile(&mut t, 1.0),
        percentile(&mut p, 0.5),
    );
    drop(procs);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    match args.first().map(String::as_str) {
        Some("scale") => scale(arg(1, 10_000), arg(2, 1000), false),
        Some("scale-https") => scale(arg(1, 10_000), arg(2, 1000), true),
        Some("edit") => edit(arg(1, 50), arg(2, 10), false),
        Some("edit-signed") => edit(arg(1, 50), arg(2, 10), true),
        Some("edit-browser") => edit_browser(arg(1, 50), arg(2, 10)),
        _ => eprintln!(
            "usage: anchor_bench scale|scale-https [nodes] [requests] | edit|edit-signed|edit-browser [nodes] [reps]"
        ),
    }
}
