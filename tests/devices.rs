//! Field devices with real simulators: a node polls Modbus TCP devices
//! (pymodbus, pinned in scripts/test.sh) and a Modbus RTU device over a
//! pseudo-terminal pair made with socat; faults (an exception, a register
//! slower than the timeout, a simulator killed and restarted) are reported
//! per device while the others keep polling; setpoints are written, read
//! back, or refused with the reason; bad profiles are refused at apply.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::*;

const WITHIN: Duration = Duration::from_secs(30);

const PROFILE: &str = r#"apiVersion: shoal.dev/v1
kind: DeviceProfile
metadata: {name: meter}
spec:
  description: a meter with a setpoint
  resources:
  - {name: temp, table: holding-registers, offset: 0, valueType: float32, units: degC, report: true}
  - {name: temp-ws, table: holding-registers, offset: 2, valueType: float32, wordSwap: true}
  - {name: setpoint, table: holding-registers, offset: 10, valueType: int16, access: read-write, minimum: 0, maximum: 100}
  - {name: locked, table: holding-registers, offset: 20, valueType: uint16, access: read-write}
  - {name: busy, table: holding-registers, offset: 60, valueType: uint16}
  - {name: flow, table: input-registers, offset: 1, valueType: int16, scale: 0.5}
  - {name: pump, table: coils, offset: 0, valueType: bool}
---
apiVersion: shoal.dev/v1
kind: DeviceProfile
metadata: {name: slowpoke}
spec:
  resources:
  - {name: slow, table: holding-registers, offset: 50, valueType: uint16}
"#;

fn device(name: &str, profile: &str, addr: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: shoal.dev/v1\nkind: Device\nmetadata: {{name: {name}}}\nspec:\n  profile: {profile}\n  node: n1\n  {addr}\n  pollMs: 200\n  timeoutMs: 1000\n{extra}"
    )
}

struct Site {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    node_dir: PathBuf,
    eng: PathBuf,
    api: String,
}

/// A fleet with `manifests` applied, node n1 enrolled offline (its bundle
/// carries them), an engineer of its site; the node is not started.
fn site(manifests: &str) -> Site {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let op = root.join("op");
    ok(&["fleet", "init", "--data-dir", s(&op)]);
    let eng = root.join("eng.json");
    site_engineer(&op, "s1", &eng);
    let f = write(&root, "devices.yaml", manifests);
    ok(&["apply", "--data-dir", s(&op), "-f", s(&f)]);
    let node_dir = bundle_node(&op, &root, "n1", "s1");
    let api = format!("127.0.0.1:{}", free_tcp_port());
    Site {
        _tmp: tmp,
        root,
        node_dir,
        eng,
        api,
    }
}

fn start_node(site: &Site) -> Daemon {
    Daemon::start(
        "node",
        &site.node_dir,
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--site-api".into(),
            site.api.clone(),
        ],
        None,
    )
}

/// GET /api/devices through a signed site API client (the CLI's library).
fn raw_devices(site: &Site) -> Value {
    let out = Command::new(bin())
        .args([
            "device",
            "read",
            "--node",
            &format!("https://{}", site.api),
            "--identity",
            s(&site.eng),
            "--json",
        ])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn latest(site: &Site, dev: &str, res: &str) -> Value {
    raw_devices(site)["devices"][dev]["latest"][res].clone()
}

fn device_cmd(site: &Site, args: &[&str]) -> std::process::Output {
    let api = format!("https://{}", site.api);
    let mut full = vec![
        "device",
        args[0],
        "--node",
        &api,
        "--identity",
        s(&site.eng),
    ];
    full.extend_from_slice(&args[1..]);
    shoal(&full)
}

#[test]
fn modbus_tcp_polls_reports_faults_and_takes_setpoints() {
    let (pa, pb, pslow) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
    let mut manifests = PROFILE.to_string();
    manifests.push_str(&device(
        "dev-a",
        "meter",
        &format!("protocol: modbus-tcp\n  tcp: {{host: 127.0.0.1, port: {pa}}}"),
        "",
    ));
    manifests.push_str(&device(
        "dev-b",
        "meter",
        &format!("protocol: modbus-tcp\n  tcp: {{host: 127.0.0.1, port: {pb}}}"),
        "",
    ));
    manifests.push_str(&device(
        "dev-slow",
        "slowpoke",
        &format!("protocol: modbus-tcp\n  tcp: {{host: 127.0.0.1, port: {pslow}}}"),
        "",
    ));
    // An edge app on the node reading its devices with the node's app token.
    let script = r#"
import os, json, ssl, time, urllib.request
url = os.environ['SHOAL_SITE_API'] + '/api/devices'
tok = os.environ['SHOAL_APP_TOKEN']
# The site API's own certificate is what the app trusts (it names no host).
ctx = ssl.create_default_context(cafile=os.environ['SHOAL_SITE_API_CA'])
ctx.check_hostname = False
while True:
    try:
        r = urllib.request.Request(url, headers={'Authorization': 'Bearer ' + tok})
        print('temp', json.load(urllib.request.urlopen(r, context=ctx))['devices']['dev-a']['latest']['temp']['value'], flush=True)
        break
    except Exception as e:
        print('waiting', e, flush=True)
        time.sleep(0.3)
try:
    urllib.request.urlopen(urllib.request.Request(url, headers={'Authorization': 'Bearer nope'}), context=ctx)
except Exception as e:
    print('wrong token:', e, flush=True)
time.sleep(3600)
"#;
    let command = serde_json::to_string(&[python().as_str(), "-c", script]).unwrap();
    manifests.push_str(&format!(
        "---\napiVersion: shoal.dev/v1\nkind: App\nmetadata: {{name: reader}}\nspec: {{native: {{command: {command}}}}}\n"
    ));
    let site = site(&manifests);
    let _a = tcp_sim(pa, &site.root.join("sim-a.log"));
    let b = tcp_sim(pb, &site.root.join("sim-b.log"));
    let _slow = tcp_sim(pslow, &site.root.join("sim-slow.log"));
    let node = start_node(&site);

    // Values, decoded with the profile: byte order, word swap, scale, bits.
    assert!(
        wait_for(WITHIN, || latest(&site, "dev-a", "temp")["value"] == 21.5),
        "no temperature: {}",
        raw_devices(&site)
    );
    assert_eq!(latest(&site, "dev-a", "temp-ws")["value"], 21.5);
    assert_eq!(latest(&site, "dev-a", "flow")["value"], 11, "22 × 0.5");
    assert_eq!(latest(&site, "dev-a", "pump")["value"], true);
    assert_eq!(latest(&site, "dev-a", "setpoint")["value"], 7);
    // An exception, reported on its resource with its code; the others fine.
    let busy = latest(&site, "dev-a", "busy")["error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(busy.contains("0x06") && busy.contains("busy"), "{busy}");
    // A register slower than the timeout: that device is offline, named why.
    assert!(
        wait_for(WITHIN, || {
            let d = &raw_devices(&site)["devices"]["dev-slow"];
            d["online"] == false
                && d["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("no answer within 1000 ms")
        }),
        "dev-slow: {}",
        raw_devices(&site)["devices"]["dev-slow"]
    );
    // …while the others keep polling.
    let t0 = latest(&site, "dev-a", "temp")["at_ms"].as_u64().unwrap();
    assert!(wait_for(WITHIN, || latest(&site, "dev-a", "temp")["at_ms"]
        .as_u64()
        > Some(t0 + 500)));

    // A simulator killed mid-poll: its device goes offline, comes back.
    drop(b);
    assert!(
        wait_for(WITHIN, || raw_devices(&site)["devices"]["dev-b"]["online"]
            == false),
        "dev-b not offline: {}",
        raw_devices(&site)["devices"]["dev-b"]
    );
    // The node's line about it carries the span of that device's task, so
    // a log says which device it is about.
    assert!(
        wait_for(WITHIN, || node.log_text().lines().any(|l| l
            .contains("device{device=dev-b}")
            && l.contains("device reachability changed"))),
        "node log: {}",
        node.log_text()
    );
    let t1 = latest(&site, "dev-a", "temp")["at_ms"].as_u64().unwrap();
    assert!(
        wait_for(WITHIN, || latest(&site, "dev-a", "temp")["at_ms"].as_u64()
            > Some(t1 + 500)),
        "dev-a stalled"
    );
    let _b = tcp_sim(pb, &site.root.join("sim-b2.log"));
    assert!(
        wait_for(
            Duration::from_secs(45),
            || raw_devices(&site)["devices"]["dev-b"]["online"] == true
        ),
        "dev-b not back: {}",
        raw_devices(&site)["devices"]["dev-b"]
    );

    // Setpoints: written and read back; refused with the reason.
    let out = device_cmd(&site, &["write", "dev-a", "setpoint", "42"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("read back"));
    assert!(wait_for(
        WITHIN,
        || latest(&site, "dev-a", "setpoint")["value"] == 42
    ));
    let out = device_cmd(&site, &["write", "dev-a", "setpoint", "500"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("outside"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = device_cmd(&site, &["write", "dev-a", "temp", "30"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("read-only"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = device_cmd(&site, &["write", "dev-a", "locked", "9"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("0x02") || err.contains("0x04"),
        "the device's refusal: {err}"
    );

    // The table and the CLI.
    let out = device_cmd(&site, &["read", "dev-a"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("online") && text.contains("temp"),
        "{text}"
    );
    let out = device_cmd(&site, &["read", "dev-a", "temp", "--since", "5m"]);
    let rows = String::from_utf8_lossy(&out.stdout).lines().count();
    assert!(rows >= 5, "stored readings: {rows}");
    // The live stream: one JSON line per poll, authenticated like the rest.
    let mut follow = Command::new(bin())
        .args([
            "device",
            "read",
            "--follow",
            "--node",
            &format!("https://{}", site.api),
            "--identity",
            s(&site.eng),
            "dev-a",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (ltx, lrx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if ltx.send(line).is_err() {
                break;
            }
        }
    });
    let first = lrx.recv_timeout(WITHIN).expect("no live reading");
    let v: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v["device"], "dev-a", "{first}");
    assert_eq!(v["values"]["temp"], 21.5, "{first}");
    let second = lrx.recv_timeout(WITHIN).expect("the stream stopped");
    let v2: Value = serde_json::from_str(&second).unwrap();
    assert!(v2["at_ms"].as_u64() > v["at_ms"].as_u64(), "{second}");
    let _ = follow.kill();
    let _ = follow.wait();
    // A key the node does not know (issued after its bundle) gets no stream.
    let other = site.root.join("other.json");
    ok(&[
        "identity",
        "create",
        "--data-dir",
        s(&site.root.join("op")),
        "--role",
        "site-engineer",
        "--site",
        "s1",
        "--name",
        "eng2",
        "--out",
        s(&other),
    ]);
    let out = shoal(&[
        "device",
        "read",
        "--follow",
        "--node",
        &format!("https://{}", site.api),
        "--identity",
        s(&other),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The edge app read its device through the site API with its token;
    // a wrong token is refused.
    let log = site.node_dir.join("apps/reader/stdout.log");
    assert!(
        wait_for(WITHIN, || std::fs::read_to_string(&log).is_ok_and(|l| l
            .contains("temp 21.5")
            && l.contains("wrong token: HTTP Error 401"))),
        "the app's log: {} / {} / node: {}",
        std::fs::read_to_string(&log).unwrap_or_default(),
        std::fs::read_to_string(log.with_file_name("stderr.log")).unwrap_or_default(),
        get(&site.node_dir, "nodes")["n1"]["report"]["workloads"]
    );

    // The node's report carries the device summary for the operator.
    let report = get(&site.node_dir, "nodes");
    assert!(report.to_string().contains("dev-a"), "{report}");
    assert!(alive(node.child.id() as i32), "the node kept running");
}

#[test]
fn modbus_rtu_over_a_pseudo_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let (dev_end, sim_end) = (tmp.path().join("ttyS1"), tmp.path().join("ttyS0"));
    let socat = Command::new("socat")
        .args([
            "-d",
            "-d",
            &format!("pty,raw,echo=0,link={}", sim_end.display()),
            &format!("pty,raw,echo=0,link={}", dev_end.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("socat (scripts/test.sh installs it)");
    let _socat = Proc(socat);
    assert!(
        wait_for(WITHIN, || dev_end.exists() && sim_end.exists()),
        "socat made no pty pair"
    );
    let log = tmp.path().join("sim.log");
    let sim = Command::new(python())
        .arg(sim_script())
        .args(["rtu", s(&sim_end)])
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(
            std::fs::File::create(log.with_extension("err")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let _sim = Proc(sim);
    assert!(wait_for(WITHIN, || std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("ready")));
    let mut manifests = PROFILE.to_string();
    manifests.push_str(&device(
        "dev-rtu",
        "meter",
        &format!(
            "protocol: modbus-rtu\n  rtu: {{path: {}, baud: 19200, unit: 1}}",
            dev_end.display()
        ),
        "",
    ));
    let site = site(&manifests);
    let _node = start_node(&site);
    assert!(
        wait_for(WITHIN, || latest(&site, "dev-rtu", "temp")["value"] == 21.5
            && latest(&site, "dev-rtu", "pump")["value"] == true),
        "RTU: {}",
        raw_devices(&site)
    );
    let out = device_cmd(&site, &["write", "dev-rtu", "setpoint", "55"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wait_for(
        WITHIN,
        || latest(&site, "dev-rtu", "setpoint")["value"] == 55
    ));
}

#[test]
fn bad_profiles_are_refused_at_apply_and_nothing_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let op = tmp.path().join("op");
    ok(&["fleet", "init", "--data-dir", s(&op)]);
    let cases = [
        (
            "resources: [ {name: x, table: holding-registers",
            "not valid YAML",
        ),
        (
            "resources:\n- {name: x, table: eeprom, offset: 0, valueType: uint16}",
            "spec.resources[0].table",
        ),
        (
            "resources:\n- {name: x, table: holding-registers, offset: 65534, valueType: float64}",
            "65,536",
        ),
        (
            "resources:\n- {name: x, table: input-registers, offset: 0, valueType: uint16, access: read-write}",
            "read-only in Modbus",
        ),
        (
            "resources:\n- {name: x, table: coils, offset: 0, valueType: float32}",
            "bool",
        ),
        (
            "resources:\n- {name: x, table: holding-registers, offset: 0, valueType: int16, minimum: 5, maximum: 1}",
            "above maximum",
        ),
    ];
    for (spec, want) in cases {
        let text = format!(
            "apiVersion: shoal.dev/v1\nkind: DeviceProfile\nmetadata: {{name: p}}\nspec:\n{}\n",
            indent(spec)
        );
        let f = write(tmp.path(), "p.yaml", &text);
        let out = shoal(&["apply", "--data-dir", s(&op), "-f", s(&f)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {text}");
        assert!(err.contains(want), "{want:?} not in: {err}");
        assert_eq!(
            get(&op, "profiles"),
            serde_json::json!({}),
            "nothing stored"
        );
    }
    // A device whose address does not match its protocol.
    let f = write(
        tmp.path(),
        "d.yaml",
        "apiVersion: shoal.dev/v1\nkind: Device\nmetadata: {name: d}\nspec: {profile: p, node: n1, protocol: modbus-rtu, tcp: {host: h}}\n",
    );
    let out = shoal(&["apply", "--data-dir", s(&op), "-f", s(&f)]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.rtu"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(get(&op, "devices"), serde_json::json!({}));
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

#[test]
fn opcua_device_polled_written_and_refused() {
    let port = free_tcp_port();
    let tmp = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sim/opcua_sim.py");
    let srv = Command::new(python())
        .arg(script)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(tmp.path().join("ua.err")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let _srv = Proc(srv);
    assert!(
        wait_for(WITHIN, || std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok()),
        "the OPC UA server did not listen"
    );
    let manifests = format!(
        r#"apiVersion: shoal.dev/v1
kind: DeviceProfile
metadata: {{name: pump}}
spec:
  resources:
  - {{name: setpoint, nodeId: "ns=2;s=Setpoint", valueType: float64, access: read-write, maximum: 100}}
  - {{name: counter, nodeId: "ns=2;s=Counter", valueType: int32, report: true}}
  - {{name: label, nodeId: "ns=2;s=Label", valueType: string}}
  - {{name: as-int, nodeId: "ns=2;s=Setpoint", valueType: int32, access: read-write}}
---
apiVersion: shoal.dev/v1
kind: Device
metadata: {{name: dev-ua}}
spec: {{profile: pump, node: n1, protocol: opcua, opcua: {{endpoint: "opc.tcp://127.0.0.1:{port}/shoal/"}}, pollMs: 300, timeoutMs: 2000}}
"#
    );
    let site = site(&manifests);
    let _node = start_node(&site);
    assert!(
        wait_for(WITHIN, || latest(&site, "dev-ua", "label")["value"]
            == "pump-1"
            && latest(&site, "dev-ua", "setpoint")["value"] == 1.5),
        "OPC UA: {}",
        raw_devices(&site)
    );
    let c0 = latest(&site, "dev-ua", "counter")["value"]
        .as_i64()
        .unwrap();
    assert!(wait_for(
        WITHIN,
        || latest(&site, "dev-ua", "counter")["value"].as_i64() > Some(c0)
    ));
    let out = device_cmd(&site, &["write", "dev-ua", "setpoint", "42.5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wait_for(
        WITHIN,
        || latest(&site, "dev-ua", "setpoint")["value"] == 42.5
    ));
    let out = device_cmd(&site, &["write", "dev-ua", "as-int", "5"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("BadTypeMismatch"), "{err}");
    let out = device_cmd(&site, &["write", "dev-ua", "counter", "3"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("read-only"));
    assert_eq!(raw_devices(&site)["devices"]["dev-ua"]["online"], true);
}
