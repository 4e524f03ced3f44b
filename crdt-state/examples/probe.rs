//! Times the parts of cold load and verify-and-apply (a probe for tuning).
#![allow(clippy::unwrap_used, missing_docs)]
use std::collections::BTreeMap;
use std::time::Instant;

use crdt_state::identity::generate_key;
use crdt_state::verify::verify_and_apply;
use crdt_state::{Certificate, DocId, Document, Identity, PublicKey, Role, SignedChange, Trust};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let batch: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let root = generate_key().unwrap();
    let key = generate_key().unwrap();
    let cert = Certificate::issue(
        &root,
        PublicKey(key.verifying_key().to_bytes()),
        "op",
        Role::Operator,
        None,
        0,
    )
    .unwrap();
    let mut trust = Trust::new(PublicKey(root.verifying_key().to_bytes()));
    trust.add_cert(cert.clone()).unwrap();
    let op = Identity::new(cert, key).unwrap();
    let mut doc = Document::new(DocId::Fleet);
    let mut all: Vec<SignedChange> = Vec::new();
    for i in 0..n {
        let mut ops = BTreeMap::new();
        ops.insert(
            format!("apps.app{}.version", i % 500),
            Some(format!("\"v{i}\"")),
        );
        all.push(doc.edit(&op, 0, &ops).unwrap().unwrap().1);
    }
    let t = Instant::now();
    let bytes = doc.save();
    println!("save: {:?} ({} bytes)", t.elapsed(), bytes.len());
    let t = Instant::now();
    let d = Document::load(DocId::Fleet, &bytes).unwrap();
    println!("load: {:?}", t.elapsed());
    drop(d);
    let mut r = Document::new(DocId::Fleet);
    let t = Instant::now();
    for chunk in all.chunks(batch) {
        verify_and_apply(&trust, &mut r, chunk).unwrap();
    }
    let e = t.elapsed();
    println!(
        "verify_and_apply {n} in batches of {batch}: {e:?} = {:.0}/s",
        n as f64 / e.as_secs_f64()
    );
    let t = Instant::now();
    let mut hits = 0;
    for c in all.iter().take(1000) {
        let h = automerge::Change::from_bytes(c.bytes.clone())
            .unwrap()
            .hash();
        if r.has_change(&h) {
            hits += 1;
        }
    }
    println!("1000 has_change: {:?} ({hits})", t.elapsed());
}
