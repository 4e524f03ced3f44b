//! Foundation figures (see docs/benchmarks.md):
//! - cold load from redb of a fleet document with 100,000 signed changes;
//! - verify-and-apply throughput of signed changes;
//! - bundle export + import of 10,000 changes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::time::Duration;

use crdt_state::signed::identity::generate_key;
use crdt_state::signed::verify::verify_and_apply;
use crdt_state::{
    DataDir, DocId, Document, Identity, PublicKey, Role, SignedChange, Store, StoreConfig, Trust,
};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

struct Writer {
    trust: Trust,
    op: Identity,
}

fn writer() -> Writer {
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
    let mut trust = Trust::new(PublicKey(root.verifying_key().to_bytes()));
    trust.add_cert(op.cert.clone()).unwrap();
    Writer { trust, op }
}

/// `n` small operator edits (one field each) to the fleet document.
fn changes(w: &Writer, n: usize) -> (Document, Vec<(automerge::ChangeHash, SignedChange)>) {
    let mut doc = Document::new(DocId::Fleet);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut ops = BTreeMap::new();
        ops.insert(
            format!("apps.app{}.version", i % 500),
            Some(format!("\"v{i}\"")),
        );
        let (h, c, _) = doc.edit(&w.op, i as i64, &ops).unwrap().unwrap();
        out.push((h, c));
    }
    (doc, out)
}

fn cold_load(c: &mut Criterion) {
    let w = writer();
    let (doc, all) = changes(&w, 100_000);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("store.redb");
    {
        let store = Store::open(
            &path,
            StoreConfig {
                compact_after: u64::MAX,
                ..Default::default()
            },
        )
        .unwrap();
        for chunk in all.chunks(10_000) {
            store.commit(&doc, chunk).unwrap();
        }
        store.compact(&doc).unwrap();
    }
    let mut g = c.benchmark_group("cold_load");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("fleet_100k_changes", |b| {
        b.iter(|| {
            let store = Store::open(&path, StoreConfig::default()).unwrap();
            let d = store.load(&DocId::Fleet).unwrap().unwrap();
            assert_eq!(d.heads(), doc.heads());
        })
    });
    g.finish();
}

fn verify_apply(c: &mut Criterion) {
    let w = writer();
    let (_, all) = changes(&w, 10_000);
    let signed: Vec<SignedChange> = all.into_iter().map(|(_, c)| c).collect();
    let mut g = c.benchmark_group("verify_and_apply");
    g.sample_size(10)
        .throughput(Throughput::Elements(signed.len() as u64));
    for batch in [10_000usize, 100] {
        g.bench_function(format!("10k_changes_batches_of_{batch}"), |b| {
            b.iter_batched(
                || Document::new(DocId::Fleet),
                |mut doc| {
                    for chunk in signed.chunks(batch) {
                        verify_and_apply(&w.trust, &mut doc, chunk).unwrap();
                    }
                    doc
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn bundle(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dd = DataDir::init(&src, "bench", 0).unwrap();
    let op = dd.identity().unwrap().clone();
    let mut doc = dd.doc(&DocId::Fleet).unwrap();
    let mut batch = Vec::new();
    for i in 1..10_000 {
        let mut ops = BTreeMap::new();
        ops.insert(
            format!("apps.app{}.version", i % 500),
            Some(format!("\"v{i}\"")),
        );
        let (h, c, _) = doc.edit(&op, 0, &ops).unwrap().unwrap();
        batch.push((h, c));
    }
    dd.store().commit(&doc, &batch).unwrap();
    let identity = src.join(crdt_state::local::datadir::IDENTITY_FILE);
    let mut g = c.benchmark_group("bundle");
    g.sample_size(10).throughput(Throughput::Elements(10_000));
    let mut n = 0;
    g.bench_function("export_import_10k_changes", |b| {
        b.iter_batched(
            || {
                n += 1;
                let dst = tmp.path().join(format!("dst{n}"));
                DataDir::use_identity(&dst, &identity).unwrap()
            },
            |mut dst| {
                let bytes = dd.export().unwrap();
                let r = dst.import(&bytes).unwrap();
                assert_eq!(r.new_changes["fleet"], 10_000);
                dst
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, cold_load, verify_apply, bundle);
criterion_main!(benches);
