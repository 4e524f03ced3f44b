//! Field adapter figures with the real `shoal` binary and real simulators.
//!
//! ```text
//! cargo build --release --bins --examples
//! SHOAL_PYTHON=~/.cache/shoal/venv/bin/python ./target/release/examples/device_bench poll [devices] [seconds]
//! ./target/release/examples/device_bench store [readings]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crdt_state::local::readings::Reading;
use crdt_state::{Store, StoreConfig};
use support::{Daemon, bundle_node, ok, percentile, rss_mb, s, wait_for, write};

fn store(n: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let st = Store::open(&tmp.path().join("s.redb"), StoreConfig::default()).unwrap();
    let series: Vec<String> = (0..100).map(|i| format!("dev{}/r{i}", i % 20)).collect();
    let t0 = 1_700_000_000_000u64;
    let t = Instant::now();
    let mut written = 0usize;
    let mut second = 0u64;
    while written < n {
        let batch: Vec<Reading> = series
            .iter()
            .map(|sr| Reading {
                series: sr.clone(),
                at_ms: t0 + second * 1000,
                value: format!("{}.5", second % 1000).into_bytes(),
            })
            .collect();
        written += batch.len();
        st.append_readings(&batch, n as u64).unwrap();
        second += 1;
    }
    println!(
        "{n} readings (100 series at 1 Hz, one transaction per second of readings) written in {:.1} s; file {:.1} MB",
        t.elapsed().as_secs_f64(),
        std::fs::metadata(tmp.path().join("s.redb")).unwrap().len() as f64 / 1e6
    );
    // Beyond the cap: the oldest go, the count stays.
    let extra: Vec<Reading> = (0..10_000)
        .map(|i| Reading {
            series: series[i % 100].clone(),
            at_ms: t0 + (second + (i / 100) as u64) * 1000,
            value: b"1".to_vec(),
        })
        .collect();
    st.append_readings(&extra, n as u64).unwrap();
    let stats = st.reading_stats().unwrap();
    println!(
        "after 10,000 more: {} held, {} dropped",
        stats.count, stats.dropped
    );
    let mut lat = Vec::new();
    for i in 0..1000 {
        let t = Instant::now();
        let v = st.latest_reading(&series[i % 100]).unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(v.is_some());
    }
    println!(
        "latest value of a series (1,000 queries): median {:.3} ms, p99 {:.3} ms",
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.99)
    );
    let mut rng = Vec::new();
    let end = t0 + second * 1000;
    for i in 0..100 {
        let to = end - (i as u64 % 10) * 60_000;
        let t = Instant::now();
        let rows = st
            .readings_between(&series[i % 100], to - 3_600_000, to, 100_000)
            .unwrap();
        rng.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(rows.len() >= 3000, "{}", rows.len());
    }
    println!(
        "one-hour range of a series (3,600 readings, 100 queries): median {:.2} ms, p99 {:.2} ms",
        percentile(&mut rng, 0.5),
        percentile(&mut rng, 0.99)
    );
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit(')').next().unwrap();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime: fields 14 and 15, i.e. 12 and 13 after the name.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn poll(devices: usize, seconds: u64) {
    let python = std::env::var("SHOAL_PYTHON").expect("SHOAL_PYTHON: a Python with pymodbus");
    let sim = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sim/modbus_sim.py");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut sims = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..devices {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&python)
            .arg(&sim)
            .args(["tcp", "127.0.0.1", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        sims.push(Proc(child));
        ports.push(port);
    }
    for p in &ports {
        assert!(wait_for(Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok()
        }));
    }
    let mut yaml = String::from(
        "apiVersion: shoal.dev/v1\nkind: DeviceProfile\nmetadata: {name: hundred}\nspec:\n  resources:\n",
    );
    for i in 0..100 {
        yaml.push_str(&format!(
            "  - {{name: r{i}, table: holding-registers, offset: {}, valueType: uint16}}\n",
            100 + i
        ));
    }
    for (i, p) in ports.iter().enumerate() {
        yaml.push_str(&format!(
            "---\napiVersion: shoal.dev/v1\nkind: Device\nmetadata: {{name: d{i}}}\nspec: {{profile: hundred, node: n1, protocol: modbus-tcp, tcp: {{host: 127.0.0.1, port: {p}}}, pollMs: 1000, timeoutMs: 1000}}\n"
        ));
    }
    let op = root.join("op");
    ok(&["fleet", "init", "--data-dir", s(&op)]);
    let eng = root.join("eng.json");
    support::site_engineer(&op, "s1", &eng);
    let f = write(root, "d.yaml", &yaml);
    ok(&["apply", "--data-dir", s(&op), "-f", s(&f)]);
    let n1 = bundle_node(&op, root, "n1", "s1");
    let api = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let node = Daemon::start(
        "node",
        &n1,
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--site-api".into(),
            api.clone(),
        ],
        None,
    );
    let state = || -> serde_json::Value {
        let out = Command::new(support::bin())
            .args([
                "device",
                "read",
                "--node",
                &format!("https://{api}"),
                "--identity",
                s(&eng),
                "--json",
            ])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    assert!(
        wait_for(Duration::from_secs(60), || {
            let v = state();
            (0..devices).all(|i| v["devices"][format!("d{i}")]["online"] == true)
        }),
        "not all devices online"
    );
    let pid = node.child.id();
    let before = state()["readings"]["count"].as_u64().unwrap_or(0);
    let ticks0 = cpu_ticks(pid);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let ticks = cpu_ticks(pid) - ticks0;
    let wall = t.elapsed().as_secs_f64();
    // Readings reach the store once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let v = state();
    let after = v["readings"]["count"].as_u64().unwrap_or(0);
    let missed: u64 = (0..devices)
        .map(|i| {
            v["devices"][format!("d{i}")]["missed_polls"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    let cpu = ticks as f64 / 100.0 / wall * 100.0;
    println!(
        "{devices} devices × 100 registers at 1 Hz for {wall:.0} s: node CPU {cpu:.1}% of one core; readings stored {} (expected ~{}); missed polls {missed}; RSS {:.1} MB",
        after - before,
        devices as u64 * 100 * seconds,
        rss_mb(pid)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    match args.first().map(String::as_str) {
        Some("store") => store(arg(1, 1_000_000)),
        Some("poll") => poll(arg(1, 20), arg(2, 60) as u64),
        _ => eprintln!("usage: device_bench store [readings] | poll [devices] [seconds]"),
    }
}
