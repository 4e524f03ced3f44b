//! The node daemon doing its job: an app applied at the anchor runs on the
//! node as a real process and is reported back; a node restarted with no
//! network at all (an empty network namespace) starts its last desired
//! state from its store; SIGTERM leaves no process behind.
//!
//! A node on the kube runtime (against the stand-in API server of the
//! runtime's wire tests: no real one can run here) hands each app its own
//! site API token through a Secret.
//!
//! Needs root and iproute2 for the namespace; fails (never skips) without.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../node/tests/support/apiserver.rs"]
mod apiserver;
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

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
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir), "--name", "f"]);
    let eng = root.join("eng.json");
    site_engineer(&anchor_dir, "s1", &eng);
    let anchor_listen = vec![
        "--listen".to_string(),
        format!("/ip4/127.0.0.1/udp/{}/quic-v1", free_udp_port()),
    ];
    let anchor = Daemon::start("anchor", &anchor_dir, &anchor_listen, None);
    let nd = root.join("n1");
    enroll(&anchor_dir, &nd, "n1", "s1");
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
        wait_for(Duration::from_secs(30), || app_pid(&nd, "svc")
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
    let first = app_pid(&nd, "svc").unwrap();
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
    let mut offline = Daemon::start(
        "node",
        &nd,
        &["--site-api".into(), "127.0.0.1:7480".into()],
        Some(&ns.0),
    );
    assert!(
        wait_for(Duration::from_secs(10), || app_pid(&nd, "svc")
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

    // Still offline, a field engineer edits the site through the site API
    // (from inside the namespace: it is the only place that reaches it).
    let o = write(root, "o.yaml", &site_yaml("s1", "svc", "0.9"));
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(bin())
        .args(["site", "apply"])
        .args([
            "--node",
            "https://127.0.0.1:7480",
            "--identity",
            s(&eng),
            "-f",
            s(&o),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(site_version(&nd, "s1", "svc").as_deref(), Some("0.9"));
    assert!(offline.stop().success());

    // Back on the network with the anchor: the anchor gets the edit.
    let _anchor = Daemon::start("anchor", &anchor_dir, &anchor_listen, None);
    assert_eq!(site_version(&anchor_dir, "s1", "svc"), None);
    let _node = Daemon::start("node", &nd, &listen, None);
    assert!(
        wait_for(Duration::from_secs(30), || site_version(
            &anchor_dir,
            "s1",
            "svc"
        )
        .as_deref()
            == Some("0.9")),
        "the offline site edit never reached the anchor"
    );
}

fn raw_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = Vec::new();
    // A TLS port closes on a plain request, maybe with a reset.
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn site_api_authenticates_and_offline_site_edits_merge_with_the_anchor() {
    use simulations::udp_link::{LinkConfig, UdpLink};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir), "--name", "f"]);
    let (eng, eng2) = (root.join("eng.json"), root.join("eng2.json"));
    site_engineer(&anchor_dir, "s1", &eng);
    ok(&[
        "identity",
        "create",
        "--data-dir",
        s(&anchor_dir),
        "--role",
        "site-engineer",
        "--site",
        "s2",
        "--name",
        "other",
        "--out",
        s(&eng2),
    ]);
    // A self-made identity of another fleet.
    let other = root.join("other");
    ok(&["fleet", "init", "--data-dir", s(&other), "--name", "x"]);
    let stranger = root.join("stranger.json");
    site_engineer(&other, "s1", &stranger);
    // The node is enrolled offline and reaches the anchor only through a
    // link we can cut.
    let nd = bundle_node(&anchor_dir, root, "n1", "s1");
    let port = free_udp_port();
    let _anchor = Daemon::start(
        "anchor",
        &anchor_dir,
        &[
            "--listen".into(),
            format!("/ip4/127.0.0.1/udp/{port}/quic-v1"),
        ],
        None,
    );
    let link = UdpLink::start(
        "127.0.0.1:0".parse().unwrap(),
        format!("127.0.0.1:{port}").parse().unwrap(),
        LinkConfig::default(),
    )
    .unwrap();
    let api = format!("127.0.0.1:{}", free_tcp_port());
    let url = format!("https://{api}");
    let anchor_id = anchor_id(&anchor_dir);
    let _node = Daemon::start(
        "node",
        &nd,
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--peer".into(),
            format!(
                "/ip4/127.0.0.1/udp/{}/quic-v1/p2p/{anchor_id}",
                link.addr().port()
            ),
            "--site-api".into(),
            api.clone(),
        ],
        None,
    );
    assert!(all_connected(&anchor_dir, &["n1"], Duration::from_secs(30)));

    // TLS: no plain HTTP on the port; the CLI of another fleet's or
    // another site's engineer does not take n1 for its node (ADR 0014).
    let raw = raw_get(&api, "/api/view");
    assert!(!raw.contains("HTTP/1"), "a plain-HTTP answer: {raw}");
    let refused = |who: &Path| {
        let out = shoal(&["site", "get", "--node", &url, "--identity", s(who)]);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = refused(&stranger);
    assert!(e.contains("certificate") && e.contains("root"), "{e}");
    let e = refused(&eng2);
    assert!(e.contains("not of s2"), "{e}");
    // Authentication behind it: none → 401; another fleet's key → 401;
    // another site's engineer → 403; this site's engineer → the view.
    let (status, body) = site_http(&anchor_dir, "GET", &format!("{url}/api/view"), None, None);
    assert_eq!(status, 401, "{body}");
    let any_node = |who: &Path| {
        node::site_api::Client::new(&url, crdt_state::Identity::read(who).unwrap())
            .trusting_any_node_of(crdt_state::local::datadir::root_public(&anchor_dir).unwrap())
    };
    let e = any_node(&stranger)
        .get("/api/view")
        .unwrap_err()
        .to_string();
    assert!(e.contains("401"), "{e}");
    let e = any_node(&eng2).get("/api/view").unwrap_err().to_string();
    assert!(e.contains("403"), "{e}");
    let view = ok(&[
        "site",
        "get",
        "--node",
        &url,
        "--identity",
        s(&eng),
        "-o",
        "json",
    ]);
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    assert_eq!(view["node"], "n1");
    assert_eq!(view["site"], "s1");
    // Garbage changes with a valid signature: 400, nothing applied.
    let client = node::site_api::Client::new(&url, crdt_state::Identity::read(&eng).unwrap());
    let err = client
        .post("/api/site/changes", b"garbage".to_vec())
        .unwrap_err()
        .to_string();
    assert!(err.contains("400"), "{err}");

    // Cut the link; the operator and the engineer set the same field.
    link.set_cut(true);
    let op = write(root, "op.yaml", &site_yaml("s1", "web", "0.6"));
    ok(&["apply", "--data-dir", s(&anchor_dir), "-f", s(&op)]);
    let mine = write(root, "mine.yaml", &site_yaml("s1", "web", "0.5"));
    let out = ok(&[
        "site",
        "apply",
        "--node",
        &url,
        "--identity",
        s(&eng),
        "-f",
        s(&mine),
    ]);
    assert!(out.contains("siteoverride/s1"), "{out}");
    assert_eq!(site_version(&nd, "s1", "web").as_deref(), Some("0.5"));
    assert_eq!(
        site_version(&anchor_dir, "s1", "web").as_deref(),
        Some("0.6")
    );

    // The link returns: both sides agree, and both show the conflict.
    link.set_cut(false);
    let conflicted = |d: &Path| {
        get(d, "conflicts").as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["doc"] == "site/s1" && c["values"].as_array().is_some_and(|v| v.len() == 2)
            })
        })
    };
    assert!(
        wait_for(Duration::from_secs(30), || conflicted(&anchor_dir)
            && conflicted(&nd)),
        "anchor: {} node: {}",
        get(&anchor_dir, "conflicts"),
        get(&nd, "conflicts")
    );
    assert_eq!(
        site_version(&nd, "s1", "web"),
        site_version(&anchor_dir, "s1", "web")
    );
}

/// The node, not only its runtime, gives a kube app its own token: the
/// Secret in the app's namespace holds the token the site API accepts for
/// that app (HMAC of the app's name under the node's `app-key`), and its
/// pods are told where the site API is.
#[test]
fn a_kube_app_gets_its_own_site_api_token_from_the_node() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(apiserver::ApiServer::start());
    let kubeconfig = write(
        root,
        "kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: '{}'}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n",
            server.url()
        ),
    );
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir), "--name", "f"]);
    let anchor_listen = vec![
        "--listen".to_string(),
        format!("/ip4/127.0.0.1/udp/{}/quic-v1", free_udp_port()),
    ];
    let _anchor = Daemon::start("anchor", &anchor_dir, &anchor_listen, None);
    let nd = root.join("n1");
    enroll(&anchor_dir, &nd, "n1", "s1");
    let port = free_tcp_port();
    let node = Daemon::start(
        "node",
        &nd,
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--runtime".into(),
            "kube".into(),
            "--kubeconfig".into(),
            s(&kubeconfig).into(),
            "--site-api".into(),
            format!("0.0.0.0:{port}"),
        ],
        None,
    );
    let app = write(
        root,
        "web.yaml",
        "apiVersion: shoal.dev/v1\nkind: App\nmetadata: {name: web}\nspec:\n  runtime: kube\n  kube:\n    manifests: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: cfg}\n      data: {k: v}\n      ---\n      apiVersion: apps/v1\n      kind: Deployment\n      metadata: {name: cam}\n      spec:\n        selector: {matchLabels: {app: cam}}\n        template:\n          metadata: {labels: {app: cam}}\n          spec: {containers: [{name: cam, image: busybox}]}\n",
    );
    ok(&["apply", "--data-dir", s(&anchor_dir), "-f", s(&app)]);
    let secret = || server.get("v1", "Secret", Some("shoal-web"), "shoal-web-token");
    assert!(
        wait_for(Duration::from_secs(30), || secret().is_some()),
        "no token Secret within 30 s; the node said:\n{}\nthe anchor: {}\nrequests: {:?}",
        node.log_text(),
        get(&anchor_dir, "nodes"),
        server
            .requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<Vec<_>>()
    );
    let key = std::fs::read_to_string(nd.join("app-key")).unwrap();
    let want = node::site_api::app_token_for(key.trim(), "web");
    // Secret data is base64, as the API server keeps it.
    let stored: k8s_openapi::ByteString =
        serde_json::from_value(secret().unwrap()["data"]["token"].clone()).unwrap();
    let stored = String::from_utf8(stored.0).unwrap();
    assert_eq!(stored, want);
    // The site API takes the app's records with it.
    let (status, body) = site_http(
        &anchor_dir,
        "POST",
        &format!("https://127.0.0.1:{port}/v1/data"),
        Some(&stored),
        Some(r#"{"records": [{"series": "defects", "value": 1}]}"#),
    );
    assert_eq!(status, 200, "{body}");
    let d = server
        .get("apps/v1", "Deployment", Some("shoal-web"), "cam")
        .unwrap();
    let env = &d["spec"]["template"]["spec"]["containers"][0]["env"];
    assert_eq!(env[1]["value"], format!("https://$(SHOAL_NODE_IP):{port}"));
    // The certificate to trust is the one the site API presents.
    assert_eq!(env[2]["name"], "SHOAL_SITE_API_CA_PEM");
    assert_eq!(
        env[2]["value"].as_str(),
        std::fs::read_to_string(nd.join("site-api.pem"))
            .ok()
            .as_deref()
    );
    assert_eq!(
        env[3]["valueFrom"]["secretKeyRef"]["name"],
        "shoal-web-token"
    );
    drop(rt);
}
