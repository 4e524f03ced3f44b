//! How fast an anchor's landing table takes data that came up
//! (`cargo run --release -p crdt-state --example landing_bench -- [records] [per-batch]`):
//! one node's day of 100 series at 1 Hz, landed in batches as a backfill
//! would bring them, then the same batches again (a replay: nothing new).
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Instant;

use crdt_state::local::landing::Landed;
use crdt_state::{Store, StoreConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let total: u64 = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let per: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("anchor.redb"), StoreConfig::default()).unwrap();
    let series: Vec<String> = (0..100).map(|i| format!("meter{i}/voltage")).collect();
    let batches: Vec<Vec<Landed>> = (0..total / per)
        .map(|b| {
            (0..per)
                .map(|i| {
                    let seq = b * per + i;
                    Landed {
                        series: series[(seq % 100) as usize].clone(),
                        seq,
                        at_ms: 1_764_000_000_000 + (seq / 100) * 1000,
                        kind: 0,
                        value: format!("{:.1}", 230.0 + (seq % 7) as f64 / 10.0).into_bytes(),
                    }
                })
                .collect()
        })
        .collect();
    let t = Instant::now();
    let mut new = 0;
    for b in &batches {
        new += s.land("n1", b, None).unwrap();
    }
    let d = t.elapsed().as_secs_f64();
    println!(
        "{new} records in batches of {per}: {d:.2} s = {:.0} records/s",
        new as f64 / d
    );
    let t = Instant::now();
    let mut again = 0;
    for b in &batches {
        again += s.land("n1", b, None).unwrap();
    }
    let d = t.elapsed().as_secs_f64();
    println!(
        "the same again (a replay): {again} new, {d:.2} s = {:.0} records/s",
        total as f64 / d
    );
    let size = std::fs::metadata(dir.path().join("anchor.redb"))
        .unwrap()
        .len();
    println!(
        "file {:.1} MB, {:.0} bytes a record",
        size as f64 / 1e6,
        size as f64 / total as f64
    );
}
