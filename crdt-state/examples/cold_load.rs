//! Cold load of a fleet document with N signed changes, in a fresh process,
//! reporting wall time and peak memory (VmHWM). Used for the figures in
//! docs/benchmarks.md:
//!
//! ```sh
//! cargo run --release -p crdt-state --example cold_load -- build /tmp/cold 100000
//! cargo run --release -p crdt-state --example cold_load -- load /tmp/cold
//! ```
#![allow(clippy::unwrap_used, missing_docs)]
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use crdt_state::signed::identity::generate_key;
use crdt_state::{DocId, Document, Identity, Role, Store, StoreConfig};

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(2).map(String::as_str).unwrap_or("/tmp/cold"));
    let path = dir.join("store.redb");
    match args.get(1).map(String::as_str) {
        Some("build") => {
            let n: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100_000);
            std::fs::create_dir_all(dir).unwrap();
            let _ = std::fs::remove_file(&path);
            let root = generate_key().unwrap();
            let op = Identity::issue(
                &root,
                generate_key().unwrap(),
                "op",
                Role::Operator,
                None,
                0,
            )
            .unwrap();
            let store = Store::open(
                &path,
                StoreConfig {
                    compact_after: u64::MAX,
                    ..Default::default()
                },
            )
            .unwrap();
            let mut doc = Document::new(DocId::Fleet);
            let mut batch = Vec::new();
            for i in 0..n {
                let mut ops = BTreeMap::new();
                ops.insert(
                    format!("apps.app{}.version", i % 500),
                    Some(format!("\"v{i}\"")),
                );
                let (h, c, _) = doc.edit(&op, i as i64, &ops).unwrap().unwrap();
                batch.push((h, c));
                if batch.len() == 10_000 {
                    store.commit(&doc, &batch).unwrap();
                    batch.clear();
                }
            }
            store.commit(&doc, &batch).unwrap();
            store.compact(&doc).unwrap();
            println!(
                "built {n} changes; snapshot {} bytes; file {} bytes",
                doc.save().len(),
                std::fs::metadata(&path).unwrap().len()
            );
        }
        _ => {
            let t = Instant::now();
            let store = Store::open(&path, StoreConfig::default()).unwrap();
            let t_open = t.elapsed();
            let doc = store.load(&DocId::Fleet).unwrap().unwrap();
            let t_all = t.elapsed();
            println!(
                "open {:.1} ms, open+load {:.1} ms, heads {}, peak RSS {} MB",
                t_open.as_secs_f64() * 1e3,
                t_all.as_secs_f64() * 1e3,
                doc.heads().len(),
                peak_rss_kb() / 1024
            );
        }
    }
}
