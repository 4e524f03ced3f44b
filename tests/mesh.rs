//! The mesh with real processes over real QUIC on loopback: an anchor and
//! nodes enrolled with tokens, changes both ways, the anchor killed and
//! restarted, and admission of strangers and revoked nodes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::*;

const SYNC_WITHIN: Duration = Duration::from_secs(30);

fn listen_any() -> Vec<String> {
    vec!["--listen".into(), "/ip4/127.0.0.1/udp/0/quic-v1".into()]
}

struct Fleet {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    anchor_dir: PathBuf,
    anchor_port: u16,
}

impl Fleet {
    fn new() -> Fleet {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let anchor_dir = root.join("anchor");
        ok(&["fleet", "init", "--data-dir", s(&anchor_dir), "--name", "f"]);
        Fleet {
            _tmp: tmp,
            root,
            anchor_dir,
            anchor_port: free_udp_port(),
        }
    }

    fn start_anchor(&self) -> Daemon {
        Daemon::start(
            "anchor",
            &self.anchor_dir,
            &[
                "--listen".into(),
                format!("/ip4/127.0.0.1/udp/{}/quic-v1", self.anchor_port),
            ],
            None,
        )
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

#[test]
fn anchor_and_three_nodes_sync_both_ways_survive_anchor_loss() {
    let f = Fleet::new();
    let eng = f.dir("eng.json");
    site_engineer(&f.anchor_dir, "s1", &eng);
    let mut anchor = f.start_anchor();
    let (n1d, n2d, n3d) = (f.dir("n1"), f.dir("n2"), f.dir("n3"));
    enroll(&f.anchor_dir, &n1d, "n1", "s1");
    enroll(&f.anchor_dir, &n2d, "n2", "s1");
    enroll(&f.anchor_dir, &n3d, "n3", "s2");
    // A token works once.
    let token = ok(&[
        "fleet",
        "token",
        "create",
        "--data-dir",
        s(&f.anchor_dir),
        "--node",
        "n4",
    ]);
    ok(&[
        "node",
        "enroll",
        "--data-dir",
        s(&f.dir("n4")),
        "--token",
        token.trim(),
    ]);
    let again = shoal(&[
        "node",
        "enroll",
        "--data-dir",
        s(&f.dir("n4b")),
        "--token",
        token.trim(),
    ]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already used"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    let n1 = Daemon::start("node", &n1d, &listen_any(), None);
    let mut n2_args = listen_any();
    n2_args.extend(["--peer".to_string(), n1.addr_on("127.0.0.1")]);
    let n2 = Daemon::start("node", &n2d, &n2_args, None);
    let n3 = Daemon::start("node", &n3d, &listen_any(), None);

    // An operator change at the anchor reaches every node.
    let nodes = [n1d.as_path(), n2d.as_path(), n3d.as_path()];
    roll_out(&f.anchor_dir, &f.root, "1", &nodes, SYNC_WITHIN);
    // The anchor shows the nodes as connected.
    assert!(all_connected(
        &f.anchor_dir,
        &["n1", "n2", "n3"],
        SYNC_WITHIN
    ));
    // A site engineer's change made on a node reaches the anchor.
    let o1 = write(&f.root, "o1.yaml", &site_yaml("s1", "web", "0.9"));
    apply_as(&n1d, &eng, &o1);
    assert!(
        wait_for(SYNC_WITHIN, || site_version(&f.anchor_dir, "s1", "web")
            .as_deref()
            == Some("0.9")),
        "site edit did not reach the anchor"
    );
    // The site-s2 node does not hold site s1's document.
    assert_eq!(site_version(&n3d, "s1", "web"), None);

    // Kill the anchor: n1 and n2 still exchange a change directly.
    anchor.kill();
    let o2 = write(&f.root, "o2.yaml", &site_yaml("s1", "web", "0.8"));
    apply_as(&n2d, &eng, &o2);
    assert!(
        wait_for(SYNC_WITHIN, || site_version(&n1d, "s1", "web").as_deref()
            == Some("0.8")),
        "n2's change did not reach n1 without the anchor"
    );
    assert_eq!(
        site_version(&f.anchor_dir, "s1", "web").as_deref(),
        Some("0.9"),
        "the stopped anchor's store changed"
    );

    // Restart the anchor: everything converges, and the nodes reconnect.
    let _anchor = f.start_anchor();
    assert!(
        wait_for(SYNC_WITHIN, || site_version(&f.anchor_dir, "s1", "web")
            .as_deref()
            == Some("0.8")),
        "the restarted anchor did not get the change made while it was down"
    );
    roll_out(&f.anchor_dir, &f.root, "2", &nodes, SYNC_WITHIN);
    assert!(all_connected(
        &f.anchor_dir,
        &["n1", "n2", "n3"],
        SYNC_WITHIN
    ));
    drop((n1, n2, n3));
}

#[test]
fn strangers_and_revoked_nodes_never_get_documents() {
    let f = Fleet::new();
    // A revoked node: enrolled offline, then revoked before it ever connects.
    let rd = f.dir("revoked");
    let rb = f.dir("revoked.bundle");
    ok(&[
        "fleet",
        "node-bundle",
        "--data-dir",
        s(&f.anchor_dir),
        "--node",
        "r1",
        "--out",
        s(&rb),
    ]);
    ok(&["node", "enroll", "--data-dir", s(&rd), "--bundle", s(&rb)]);
    ok(&[
        "identity",
        "revoke",
        "--data-dir",
        s(&f.anchor_dir),
        "r1",
        "--reason",
        "stolen",
    ]);
    // A stranger: a node of another fleet.
    let other = f.dir("other");
    ok(&["fleet", "init", "--data-dir", s(&other), "--name", "other"]);
    let sb = f.dir("stranger.bundle");
    ok(&[
        "fleet",
        "node-bundle",
        "--data-dir",
        s(&other),
        "--node",
        "x1",
        "--out",
        s(&sb),
    ]);
    let sd = f.dir("stranger");
    ok(&["node", "enroll", "--data-dir", s(&sd), "--bundle", s(&sb)]);

    let anchor = f.start_anchor();
    let gd = f.dir("good");
    enroll(&f.anchor_dir, &gd, "g1", "s1");
    let app = write(&f.root, "secret.yaml", &app_yaml("secret-app", "1"));
    ok(&["apply", "--data-dir", s(&f.anchor_dir), "-f", s(&app)]);

    let peer = vec![
        "--peer".to_string(),
        anchor.addr_on("127.0.0.1"),
        "--listen".into(),
        "/ip4/127.0.0.1/udp/0/quic-v1".into(),
    ];
    let good = Daemon::start("node", &gd, &peer, None);
    let revoked = Daemon::start("node", &rd, &peer, None);
    let stranger = Daemon::start("node", &sd, &peer, None);
    assert!(wait_for(SYNC_WITHIN, || app_version(&gd, "secret-app").is_some()));
    // Both were refused at the hello, logged with their address.
    assert!(
        wait_for(SYNC_WITHIN, || {
            let log = anchor.log_text();
            log.matches("admission refused").count() >= 2
                && log.contains("is revoked")
                && log.contains("belongs to fleet")
        }),
        "anchor log: {}",
        anchor.log_text()
    );
    assert!(anchor.log_text().contains("/ip4/127.0.0.1/udp/"));
    // The mesh's lines carry its task's span, naming this peer, so a log
    // line says whose mesh it is about.
    let addr = anchor.addr_on("127.0.0.1");
    let me = addr.rsplit("/p2p/").next().unwrap();
    let span = format!("mesh{{me={me}}}");
    assert!(
        anchor
            .log_text()
            .lines()
            .any(|l| l.contains(&span) && l.contains("peer refused admission")),
        "no refusal under {span}: {}",
        anchor.log_text()
    );
    // The good node got the app long ago; the refused never do.
    assert_eq!(app_version(&rd, "secret-app"), None);
    assert_eq!(app_version(&sd, "secret-app"), None);
    // And the anchor lists neither as connected.
    let nodes = get(&f.anchor_dir, "nodes");
    assert_eq!(nodes["g1"]["connected"], serde_json::json!(true));
    assert_ne!(nodes["r1"]["connected"], serde_json::json!(true));
    drop((good, revoked, stranger));
}

/// A revocation made through the running anchor (the control socket, so
/// the anchor's one write path) reaches its core at once: the revoked node,
/// connected until then, is cut off and gets nothing written after it.
/// `--log-format json`: every line the daemon logs is one JSON object, and
/// a line logged inside a task's span carries that span with its fields
/// (here the mesh task's own peer id), as the text format does.
#[test]
fn json_logs_carry_the_span_of_each_line() {
    let f = Fleet::new();
    let anchor = Daemon::start(
        "anchor",
        &f.anchor_dir,
        &[
            "--listen".into(),
            format!("/ip4/127.0.0.1/udp/{}/quic-v1", f.anchor_port),
            "--log-format".into(),
            "json".into(),
        ],
        None,
    );
    let addr = anchor.addr_on("127.0.0.1");
    let me = addr.rsplit("/p2p/").next().unwrap().to_string();
    let listening = |log: &str| {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| {
                v["fields"]["message"] == "listening"
                    && v["spans"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s["name"] == "mesh" && s["me"] == me))
            })
    };
    assert!(
        wait_for(SYNC_WITHIN, || listening(&anchor.log_text())),
        "no JSON line 'listening' inside the mesh span of {me}: {}",
        anchor.log_text()
    );
    // Every line of the log is JSON (the daemon's few plain `say!` lines
    // go to stdout, which the harness appends to the same file: skip them).
    let log = anchor.log_text();
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with('{') && serde_json::from_str::<serde_json::Value>(l).is_err())
        .collect();
    assert!(bad.is_empty(), "lines that are not JSON: {bad:?}");
    // An unknown format is refused, not taken as text.
    let out = shoal(&[
        "--log-format",
        "jsn",
        "get",
        "nodes",
        "--data-dir",
        s(&f.anchor_dir),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("jsn"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn revoking_through_a_running_anchor_cuts_the_node_off_at_once() {
    let f = Fleet::new();
    let anchor = f.start_anchor();
    let (gd, rd) = (f.dir("g1"), f.dir("r1"));
    enroll(&f.anchor_dir, &gd, "g1", "s1");
    enroll(&f.anchor_dir, &rd, "r1", "s1");
    let mut peer = listen_any();
    peer.extend(["--peer".to_string(), anchor.addr_on("127.0.0.1")]);
    let good = Daemon::start("node", &gd, &peer, None);
    let revoked = Daemon::start("node", &rd, &peer, None);
    assert!(all_connected(&f.anchor_dir, &["g1", "r1"], SYNC_WITHIN));
    let out = ok(&[
        "identity",
        "revoke",
        "--data-dir",
        s(&f.anchor_dir),
        "r1",
        "--reason",
        "stolen",
    ]);
    assert!(out.starts_with("revoked "), "{out}");
    let app = write(&f.root, "after.yaml", &app_yaml("after-revoke", "1"));
    ok(&["apply", "--data-dir", s(&f.anchor_dir), "-f", s(&app)]);
    assert!(wait_for(SYNC_WITHIN, || app_version(&gd, "after-revoke").is_some()));
    // r1 shares g1's link to the anchor: had it not been cut off, the app
    // would have reached it as it reached g1.
    assert_eq!(app_version(&rd, "after-revoke"), None);
    assert!(
        wait_for(
            SYNC_WITHIN,
            || get(&f.anchor_dir, "nodes")["r1"]["connected"] != serde_json::json!(true)
        ),
        "r1 still listed as connected"
    );
    // The anchor's log says why it was cut off.
    assert!(
        wait_for(SYNC_WITHIN, || anchor.log_text().contains("was revoked")),
        "anchor log: {}",
        anchor.log_text()
    );
    drop((good, revoked));
}

#[test]
fn cli_verbs_reach_a_running_daemon_and_print_the_same() {
    let f = Fleet::new();
    let app = write(&f.root, "a.yaml", &app_yaml("a", "1"));
    let offline = ok(&["apply", "--data-dir", s(&f.anchor_dir), "-f", s(&app)]);
    let offline_get = ok(&["get", "apps", "--data-dir", s(&f.anchor_dir)]);
    let mut anchor = f.start_anchor();
    let sock = f.anchor_dir.join("control.sock");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket must be owner-only");
    let b = write(&f.root, "b.yaml", &app_yaml("b", "1"));
    let online = ok(&["apply", "--data-dir", s(&f.anchor_dir), "-f", s(&b)]);
    assert_eq!(offline.replace("app/a", "app/b"), online);
    let online_get = ok(&["get", "apps", "--data-dir", s(&f.anchor_dir)]);
    assert!(online_get.starts_with(offline_get.lines().next().unwrap()));
    assert!(online_get.contains("\nb "), "{online_get}");
    // Errors come back the same way.
    let bad = write(
        &f.root,
        "bad.yaml",
        "apiVersion: shoal.dev/v1\nkind: App\nmetadata: {name: x}\nspec: {replicas: -1}\n",
    );
    let out = shoal(&["apply", "--data-dir", s(&f.anchor_dir), "-f", s(&bad)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.yaml: document 1"));
    let out = shoal(&["delete", "app", "nope", "--data-dir", s(&f.anchor_dir)]);
    assert!(!out.status.success());
    // A bundle exported through the daemon imports elsewhere.
    let bundle = f.dir("x.bundle");
    ok(&[
        "bundle",
        "export",
        "--data-dir",
        s(&f.anchor_dir),
        "--out",
        s(&bundle),
    ]);
    assert!(std::fs::metadata(&bundle).unwrap().len() > 100);
    // A clean stop removes the socket, and the verbs work directly again.
    assert!(anchor.stop().success());
    assert!(!sock.exists());
    let direct = ok(&["get", "apps", "--data-dir", s(&f.anchor_dir)]);
    assert_eq!(direct, online_get);
}

#[test]
fn nodes_reach_each_other_through_the_anchor_relay() {
    let f = Fleet::new();
    let _anchor = f.start_anchor();
    let (n1d, n2d) = (f.dir("n1"), f.dir("n2"));
    enroll(&f.anchor_dir, &n1d, "n1", "s1");
    enroll(&f.anchor_dir, &n2d, "n2", "s1");
    let n1 = Daemon::start("node", &n1d, &listen_any(), None);
    // n1 takes a reservation on the anchor's relay once admitted there.
    assert!(
        wait_for(SYNC_WITHIN, || n1
            .addrs()
            .iter()
            .any(|a| a.contains("/p2p-circuit/"))),
        "n1 never listened through the relay: {:?}\n{}",
        n1.addrs(),
        n1.log_text()
    );
    let circuit = n1
        .addrs()
        .into_iter()
        .find(|a| a.contains("/p2p-circuit/"))
        .unwrap();
    let n2 = Daemon::start(
        "node",
        &n2d,
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--peer".into(),
            circuit,
        ],
        None,
    );
    // n2 reaches and admits n1 over the relayed connection, then DCUtR
    // upgrades it to a direct one (trivially, on loopback).
    assert!(
        wait_for(SYNC_WITHIN, || n2
            .log_text()
            .lines()
            .any(|l| l.contains("peer admitted")
                && l.contains("p2p-circuit")
                && l.contains("n1"))),
        "n2 log: {}",
        n2.log_text()
    );
    assert!(
        wait_for(SYNC_WITHIN, || n2
            .log_text()
            .contains("direct connection through hole punching")),
        "n2 log: {}",
        n2.log_text()
    );
    drop((n1, n2));
}
