//! Data-up figures (issue 15) with the real `shoal` binary: one node's
//! backlog of a day of 100 series at 1 Hz goes up to an anchor on loopback
//! QUIC while a pymodbus device keeps being polled live.
//!
//! ```text
//! cargo build --release --bins --examples
//! SHOAL_PYTHON=~/.cache/shoal/venv/bin/python \
//!   ./target/release/examples/data_bench backfill [readings] [--pg]
//! ```
//!
//! The backlog is written into the node's store before the node starts
//! (what a partition of a day leaves behind), then anchor and node start
//! and the node's backlog drains. It prints:
//! - readings per second landed in the anchor's store (its metrics: from
//!   the first record landed to the last), and with `--pg` copied to a
//!   throwaway PostgreSQL cluster;
//! - bytes of batches per reading (signature and framing within);
//! - the live reading's latency, poll → stored at the anchor, while the
//!   backlog drains (median, p99, max; seen by polling the anchor's API
//!   every 50 ms, so up to 50 ms late);
//! - the node's CPU (cores busy) and peak RSS during the backfill, and its
//!   RSS once idle.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use crdt_state::local::readings::Reading;
use support::*;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// CPU seconds of process `pid` (user + system).
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn status_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("backfill") {
        eprintln!("usage: data_bench backfill [readings] [--pg]");
        std::process::exit(2);
    }
    let total: u64 = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(8_640_000);
    let with_pg = args.iter().any(|a| a == "--pg");
    let series = 100u64;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor_dir = root.join("anchor");
    ok(&["fleet", "init", "--data-dir", s(&anchor_dir)]);
    let sim_port = free_tcp_port();
    let f = write(
        root,
        "live.yaml",
        &format!(
            "apiVersion: shoal.dev/v1\nkind: DeviceProfile\nmetadata: {{name: meter}}\nspec:\n  resources:\n  - {{name: temp, table: holding-registers, offset: 0, valueType: float32}}\n---\napiVersion: shoal.dev/v1\nkind: Device\nmetadata: {{name: live}}\nspec:\n  profile: meter\n  node: n1\n  protocol: modbus-tcp\n  tcp: {{host: 127.0.0.1, port: {sim_port}}}\n  pollMs: 100\n  timeoutMs: 1000\n"
        ),
    );
    ok(&["apply", "--data-dir", s(&anchor_dir), "-f", s(&f)]);
    let node_dir = bundle_node(&anchor_dir, root, "n1", "s1");

    // The backlog: a day of 100 series at 1 Hz ending now, regular floats
    // that move a little (a meter's 230.1, 230.2…).
    let t = Instant::now();
    {
        let dd = crdt_state::DataDir::open(&node_dir, None).unwrap();
        let store = dd.store();
        let seconds = total / series;
        let start = now_ms() - seconds * 1000;
        let mut batch = Vec::with_capacity(100_000);
        for sec in 0..seconds {
            for i in 0..series {
                batch.push(Reading {
                    series: format!("meter{}/r{}", i / 10, i % 10),
                    at_ms: start + sec * 1000,
                    value: format!("{:.1}", 230.0 + ((sec + i * 7) % 40) as f64 / 10.0)
                        .into_bytes(),
                });
            }
            if batch.len() >= 100_000 {
                store.append_readings(&batch, u64::MAX).unwrap();
                batch.clear();
            }
        }
        if !batch.is_empty() {
            store.append_readings(&batch, u64::MAX).unwrap();
        }
    }
    let fill = t.elapsed().as_secs_f64();
    println!(
        "backlog of {total} readings written to the node's store in {fill:.1} s ({:.0}/s)",
        total as f64 / fill
    );

    let pg = with_pg.then(Postgres::start);
    let _sim = tcp_sim(sim_port, &root.join("sim.log"));
    let anchor_port = free_udp_port();
    let mut args = vec![
        "--listen".to_string(),
        format!("/ip4/127.0.0.1/udp/{anchor_port}/quic-v1"),
        "--http".into(),
        "127.0.0.1:0".into(),
        "--insecure-http".into(),
    ];
    if let Some(pg) = &pg {
        args.extend(["--readings-db".into(), pg.url()]);
    }
    let anchor = Daemon::start("anchor", &anchor_dir, &args, None);
    let url = http_url(&anchor_dir);
    let token = operator_token(&anchor_dir, "bench");
    let node = Daemon::start(
        "node",
        &node_dir,
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--peer".into(),
            anchor.addr_on("127.0.0.1"),
            // The whole backlog is kept (the default cap is 1 M).
            "--readings-cap".into(),
            (total * 2).to_string(),
        ],
        None,
    );
    let pid = node.child.id();
    let cpu0 = cpu_of(pid);
    let t0 = Instant::now();
    // Live readings seen at the anchor while the backlog drains.
    let mut seen = std::collections::BTreeSet::new();
    let mut latencies: Vec<f64> = Vec::new();
    let mut first_landed: Option<Instant> = None;
    let mut landed_at: Option<Instant> = None;
    let mut exported_at: Option<Instant> = None;
    let mut exported_by_landed = 0u64;
    let mut peak_rss = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut last_metrics = Instant::now() - Duration::from_secs(1);
    loop {
        assert!(
            Instant::now() < deadline,
            "the backfill did not finish in 30 min"
        );
        let now = now_ms();
        let v = api_get(
            &format!(
                "{url}/api/nodes/n1/series/live/temp?from={}&to={}",
                now - 20_000,
                now + 1000
            ),
            &token,
        );
        let at = now_ms();
        for p in v["points"].as_array().into_iter().flatten() {
            let t = p["t"].as_u64().unwrap();
            if seen.insert(t) && landed_at.is_none() && first_landed.is_some() {
                latencies.push((at.saturating_sub(t)) as f64 / 1000.0);
            }
        }
        peak_rss = peak_rss.max(status_mb(pid, "VmRSS:"));
        if last_metrics.elapsed() >= Duration::from_millis(250) {
            last_metrics = Instant::now();
            let landed = metric(&url, &token, "shoal_data_records_new_total");
            if landed > 0 && first_landed.is_none() {
                first_landed = Some(Instant::now());
            }
            if landed_at.is_none() && landed >= total {
                landed_at = Some(Instant::now());
                if pg.is_some() {
                    exported_by_landed = metric(&url, &token, "shoal_export_rows_total");
                }
            }
            if pg.is_some()
                && exported_at.is_none()
                && metric(&url, &token, "shoal_export_rows_total") >= total
            {
                exported_at = Some(Instant::now());
            }
            if landed_at.is_some() && (pg.is_none() || exported_at.is_some()) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let busy = t0.elapsed().as_secs_f64();
    let cores = (cpu_of(pid) - cpu0) / busy;
    let start = first_landed.unwrap();
    let embedded = landed_at.unwrap().duration_since(start).as_secs_f64();
    let records = metric(&url, &token, "shoal_data_records_total");
    let bytes = metric(&url, &token, "shoal_data_bytes_total");
    println!(
        "embedded: {total} readings in {embedded:.1} s = {:.0} readings/s (first landed {:.1} s after the node started)",
        total as f64 / embedded,
        start.duration_since(t0).as_secs_f64()
    );
    if let Some(e) = exported_at {
        let d = e.duration_since(start).as_secs_f64();
        let after = e.duration_since(landed_at.unwrap()).as_secs_f64();
        println!(
            "postgres: {total} readings in {d:.1} s = {:.0} readings/s (node to PostgreSQL; {} rows were copied while the node's backlog landed, the other {} in {after:.1} s after it)",
            total as f64 / d,
            exported_by_landed,
            total.saturating_sub(exported_by_landed),
        );
    }
    println!(
        "wire: {bytes} bytes of batches for {records} records = {:.2} B/reading",
        bytes as f64 / records.max(1) as f64
    );
    latencies.sort_by(|a, b| a.total_cmp(b));
    if !latencies.is_empty() {
        println!(
            "live during the backfill: {} readings, latency median {:.2} s, p99 {:.2} s, max {:.2} s",
            latencies.len(),
            percentile(&mut latencies.clone(), 0.5),
            percentile(&mut latencies.clone(), 0.99),
            latencies.last().unwrap()
        );
    }
    println!(
        "node during the backfill: {cores:.2} cores busy, RSS peak {peak_rss:.1} MB (VmHWM {:.1} MB)",
        status_mb(pid, "VmHWM:")
    );
    std::thread::sleep(Duration::from_secs(20));
    println!("node idle after: RSS {:.1} MB", rss_mb(pid));
    drop(node);
    drop(anchor);
}
