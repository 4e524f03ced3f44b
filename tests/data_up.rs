//! Data up from the edge with real processes (issue 15): a node polls a
//! pymodbus device and its readings reach the anchor over `/shoal/data/1`
//! on loopback QUIC, exactly once and in order per series, through an
//! anchor killed with SIGKILL and a node killed with SIGKILL while the
//! anchor was away.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::*;

const WITHIN: Duration = Duration::from_secs(30);

const MANIFESTS: &str = r#"apiVersion: shoal.dev/v1
kind: DeviceProfile
metadata: {name: meter}
spec:
  resources:
  - {name: temp, table: holding-registers, offset: 0, valueType: float32}
  - {name: flow, table: input-registers, offset: 1, valueType: int16, scale: 0.5}
  - {name: pump, table: coils, offset: 0, valueType: bool}
"#;

fn device_yaml(port: u16, poll_ms: u64) -> String {
    format!(
        "---\napiVersion: shoal.dev/v1\nkind: Device\nmetadata: {{name: m1}}\nspec:\n  profile: meter\n  node: n1\n  protocol: modbus-tcp\n  tcp: {{host: 127.0.0.1, port: {port}}}\n  pollMs: {poll_ms}\n  timeoutMs: 1000\n"
    )
}

struct Fleet {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    anchor_dir: PathBuf,
    anchor_port: u16,
    node_dir: PathBuf,
    eng: PathBuf,
    site_api: String,
}

fn fleet(poll_ms: u64, sim_port: u16) -> Fleet {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir)]);
    let eng = root.join("eng.json");
    site_engineer(&anchor_dir, "s1", &eng);
    let f = write(
        &root,
        "devices.yaml",
        &format!("{MANIFESTS}{}", device_yaml(sim_port, poll_ms)),
    );
    ok(&["apply", "--data-dir", s(&anchor_dir), "-f", s(&f)]);
    let node_dir = bundle_node(&anchor_dir, &root, "n1", "s1");
    Fleet {
        _tmp: tmp,
        root,
        anchor_dir,
        anchor_port: free_udp_port(),
        node_dir,
        eng,
        site_api: format!("127.0.0.1:{}", free_tcp_port()),
    }
}

fn start_anchor(f: &Fleet) -> Daemon {
    let _ = std::fs::remove_file(f.anchor_dir.join("http.addr"));
    Daemon::start(
        "anchor",
        &f.anchor_dir,
        &[
            "--listen".into(),
            format!("/ip4/127.0.0.1/udp/{}/quic-v1", f.anchor_port),
            "--http".into(),
            "127.0.0.1:0".into(),
        ],
        None,
    )
}

fn start_node(f: &Fleet, anchor_peer: &str) -> Daemon {
    Daemon::start(
        "node",
        &f.node_dir,
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--peer".into(),
            format!(
                "/ip4/127.0.0.1/udp/{}/quic-v1/p2p/{anchor_peer}",
                f.anchor_port
            ),
            "--site-api".into(),
            f.site_api.clone(),
        ],
        None,
    )
}

/// The series as it landed at the anchor: (time ms, value) per record.
fn landed(url: &str, token: &str, series: &str) -> Vec<(u64, Value)> {
    let v = api_get(
        &format!("{url}/api/nodes/n1/series/{series}?from=0&to=99999999999999"),
        token,
    );
    v["points"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| (p["t"].as_u64().unwrap(), p["v"].clone()))
        .collect()
}

/// The series as the node stored it, through its site API.
fn stored(f: &Fleet, resource: &str) -> Vec<(u64, Value)> {
    let out = Command::new(bin())
        .args([
            "device",
            "read",
            "--node",
            &format!("http://{}", f.site_api),
            "--identity",
            s(&f.eng),
            "m1",
            resource,
            "--since",
            "1d",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (t, v) = l.split_once('\t').unwrap();
            (t.parse().unwrap(), serde_json::from_str(v).unwrap())
        })
        .collect()
}

/// The node's readings table: held, unacknowledged, …
fn stats(f: &Fleet) -> Value {
    let out = Command::new(bin())
        .args([
            "device",
            "read",
            "--node",
            &format!("http://{}", f.site_api),
            "--identity",
            s(&f.eng),
            "--json",
        ])
        .output()
        .unwrap();
    serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null)["readings"].clone()
}

fn unacked(f: &Fleet) -> u64 {
    stats(f)["unacked"].as_u64().unwrap_or(0)
}

fn records_new(url: &str, token: &str) -> u64 {
    let (_, text) = http("GET", &format!("{url}/metrics"), Some(token), None);
    text.lines()
        .find_map(|l| l.strip_prefix("shoal_data_records_new_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn sim_log(root: &Path, n: u32) -> PathBuf {
    root.join(format!("sim-{n}.log"))
}

/// Readings stored while the anchor is killed (SIGKILL) and while the node
/// is killed too reach the anchor once both are back: for every series,
/// the anchor holds exactly what the node stored, in order, and nothing
/// twice; live readings keep arriving meanwhile.
#[test]
fn readings_reach_the_anchor_exactly_once_through_kills() {
    let sim_port = free_tcp_port();
    let f = fleet(100, sim_port);
    let sim = tcp_sim(sim_port, &sim_log(&f.root, 1));
    let mut anchor = start_anchor(&f);
    let url = http_url(&f.anchor_dir);
    let token = operator_token(&f.anchor_dir, "ops");
    let anchor_peer = anchor.peer_id();
    let mut node = start_node(&f, &anchor_peer);

    // Live: readings reach the anchor while they are made.
    assert!(
        wait_for(WITHIN, || landed(&url, &token, "m1/temp").len() >= 20),
        "no readings at the anchor: {:?}\nnode log: {}",
        landed(&url, &token, "m1/temp"),
        node.log_text()
    );
    assert_eq!(landed(&url, &token, "m1/temp")[0].1, 21.5);

    // The anchor dies; the node keeps polling and storing.
    anchor.kill();
    let before = unacked(&f);
    assert!(
        wait_for(WITHIN, || unacked(&f) >= before + 150),
        "no backlog grew: {}",
        stats(&f)
    );
    // The node dies too, with its backlog on disk; it comes back and goes
    // on storing while the anchor is still away.
    node.kill();
    let node = start_node(&f, &anchor_peer);
    let held = unacked(&f);
    assert!(
        held >= before + 150,
        "the backlog did not survive SIGKILL: {}",
        stats(&f)
    );
    assert!(wait_for(WITHIN, || unacked(&f) >= held + 60));

    // The anchor returns: the backlog goes up behind the live readings.
    let anchor = start_anchor(&f);
    let url = http_url(&f.anchor_dir);
    assert!(
        wait_for(Duration::from_secs(60), || records_new(&url, &token) > 0
            && unacked(&f) < 60),
        "the backlog did not drain: {}\nnode log: {}",
        stats(&f),
        node.log_text()
    );

    // The device stops; then the anchor holds exactly what the node stored.
    drop(sim);
    let series = ["temp", "flow", "pump"];
    let same = || {
        series
            .iter()
            .all(|r| landed(&url, &token, &format!("m1/{r}")) == stored(&f, r))
    };
    assert!(
        wait_for(WITHIN, || same() && unacked(&f) == 0),
        "anchor and node differ: {}",
        series
            .iter()
            .map(|r| format!(
                "{r}: anchor {} node {}",
                landed(&url, &token, &format!("m1/{r}")).len(),
                stored(&f, r).len()
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for r in series {
        let got = landed(&url, &token, &format!("m1/{r}"));
        assert!(got.len() > 60, "{r}: only {} readings", got.len());
        assert!(
            got.windows(2).all(|w| w[0].0 <= w[1].0),
            "{r} not in time order"
        );
    }
    drop(anchor);
    drop(node);
}
