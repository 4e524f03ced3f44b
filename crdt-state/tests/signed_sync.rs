//! CRDT laws under signatures: any interleaving, duplication or reordering
//! of the same signed changes converges, and a forged change is never
//! applied.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeMap;

use common::{fleet, set, site_a};
use crdt_state::signed::verify::{Revocation, verify_and_apply};
use crdt_state::{DocId, Document, Error, SignedChange};
use proptest::prelude::*;

/// Delivers `changes` to `doc` in `chunk`-sized batches; every batch must verify.
fn deliver(f: &common::Fleet, doc: &mut Document, changes: &[SignedChange], chunk: usize) {
    for batch in changes.chunks(chunk.max(1)) {
        verify_and_apply(&f.trust, doc, batch).unwrap();
    }
}

#[derive(Clone, Debug)]
enum Step {
    /// Replica `r` sets key `k` to value `v`.
    Edit { r: usize, k: u8, v: u8 },
    /// Replica `from` sends everything it knows to `to`.
    Sync { from: usize, to: usize },
}

fn step(n: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..n, 0u8..4, 0u8..8).prop_map(|(r, k, v)| Step::Edit { r, k, v }),
        1 => (0..n, 0..n).prop_map(|(from, to)| Step::Sync { from, to }),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, Vec<Step>, u64, usize)> {
    (2usize..=5).prop_flat_map(|n| {
        (
            Just(n),
            proptest::collection::vec(step(n), 1..24),
            any::<u64>(),
            1usize..6,
        )
    })
}

/// A tiny deterministic shuffle with duplicates (xorshift).
fn shuffled_with_dups(items: &[SignedChange], seed: u64) -> Vec<SignedChange> {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut out: Vec<SignedChange> = items.to_vec();
    for item in items {
        if next() % 3 == 0 {
            out.push(item.clone());
        }
    }
    for i in (1..out.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        out.swap(i, j);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_delivery_order_converges((n, steps, seed, chunk) in scenario()) {
        let f = fleet();
        let writers = [&f.op1, &f.op2, &f.eng_a, &f.op1, &f.eng_a];
        let mut docs: Vec<Document> = (0..n).map(|_| Document::new(site_a())).collect();
        let mut known: Vec<Vec<SignedChange>> = vec![Vec::new(); n];
        for s in &steps {
            match *s {
                Step::Edit { r, k, v } => {
                    if let Some(c) = set(&mut docs[r], writers[r], &format!("apps.x.env.K{k}"), &format!("v{v}")) {
                        known[r].push(c);
                    }
                }
                Step::Sync { from, to } if from != to => {
                    let batch = shuffled_with_dups(&known[from], seed);
                    deliver(&f, &mut docs[to], &batch, chunk);
                    let extra: Vec<_> = known[from].clone();
                    for c in extra {
                        if !known[to].contains(&c) {
                            known[to].push(c);
                        }
                    }
                }
                Step::Sync { .. } => {}
            }
        }
        let mut all: Vec<SignedChange> = Vec::new();
        for k in &known {
            for c in k {
                if !all.contains(c) {
                    all.push(c.clone());
                }
            }
        }
        for (i, doc) in docs.iter_mut().enumerate() {
            let batch = shuffled_with_dups(&all, seed.wrapping_add(i as u64));
            deliver(&f, doc, &batch, chunk);
            prop_assert_eq!(doc.pending_len(), 0);
        }
        let mut heads0 = docs[0].heads();
        heads0.sort();
        let fields0 = docs[0].fields("");
        for d in &docs[1..] {
            let mut h = d.heads();
            h.sort();
            prop_assert_eq!(&h, &heads0);
            prop_assert_eq!(&d.fields(""), &fields0);
            prop_assert_eq!(d.conflicts(), docs[0].conflicts());
        }
    }

    #[test]
    fn forged_changes_are_never_applied(seed in any::<u64>(), kind in 0u8..5, chunk in 1usize..4) {
        let f = fleet();
        let mut writer_doc = Document::new(site_a());
        let mut legit = Vec::new();
        for i in 0..4 {
            legit.push(set(&mut writer_doc, &f.eng_a, &format!("configs.c.data.k{i}"), "v").unwrap());
        }
        // The forgery, made on a copy that already holds the legit changes.
        let mut forger_doc = Document::new(site_a());
        deliver(&f, &mut forger_doc, &legit, 4);
        let forged = match kind {
            // a writer this fleet never certified
            0 => set(&mut forger_doc, &f.rogue, "configs.c.data.k0", "evil").unwrap(),
            // a certified writer of another site
            1 => set(&mut forger_doc, &f.eng_b, "configs.c.data.k0", "evil").unwrap(),
            // a legit writer's change with a corrupted signature
            2 => {
                let mut c = set(&mut forger_doc, &f.eng_a, "configs.c.data.k0", "evil").unwrap();
                c.signature[(seed % 64) as usize] ^= 1 << (seed % 8);
                c
            }
            // signed by another certified key than the author's
            3 => {
                let c = set(&mut forger_doc, &f.eng_a, "configs.c.data.k0", "evil").unwrap();
                let h = automerge::Change::from_bytes(c.bytes.clone()).unwrap().hash();
                SignedChange { bytes: c.bytes, signature: f.op1.sign(&crdt_state::signed::doc::signing_message(&site_a(), &h)) }
            }
            // signed for another document
            _ => {
                let c = set(&mut forger_doc, &f.eng_a, "configs.c.data.k0", "evil").unwrap();
                let h = automerge::Change::from_bytes(c.bytes.clone()).unwrap().hash();
                SignedChange { bytes: c.bytes, signature: f.eng_a.sign(&crdt_state::signed::doc::signing_message(&DocId::Fleet, &h)) }
            }
        };
        let forged_hash = automerge::Change::from_bytes(forged.bytes.clone()).unwrap().hash();
        let mut mixed = legit.clone();
        mixed.push(forged);
        let mixed = shuffled_with_dups(&mixed, seed);
        let mut victim = Document::new(site_a());
        let before = victim.heads();
        let res = verify_and_apply(&f.trust, &mut victim, &mixed);
        // The whole message is dropped (the forgery may wait for nothing: it
        // depends only on legit changes present in the same batch).
        let rejected = matches!(res, Err(Error::Rejected { .. }));
        prop_assert!(rejected, "forgery kind {} accepted: {:?}", kind, res.map(|r| r.0.len()));
        prop_assert_eq!(victim.heads(), before);
        prop_assert!(!victim.has_change(&forged_hash));
        // The legit changes alone still apply.
        deliver(&f, &mut victim, &legit, chunk);
        prop_assert_eq!(victim.get("configs.c.data.k0"), Some(serde_json::json!("v")));
        prop_assert!(!victim.has_change(&forged_hash));
    }
}

#[test]
fn unsigned_automerge_changes_are_rejected() {
    let f = fleet();
    let mut plain = automerge::AutoCommit::new();
    use automerge::transaction::Transactable;
    plain.put(automerge::ROOT, "apps.x.paused", "true").unwrap();
    let c = plain.get_last_local_change().unwrap();
    let mut victim = Document::new(site_a());
    let res = verify_and_apply(
        &f.trust,
        &mut victim,
        &[SignedChange {
            bytes: c.raw_bytes().to_vec(),
            signature: [0; 64],
        }],
    );
    let msg = res.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("no author"), "{msg}");
    assert!(victim.fields("").is_empty());
}

#[test]
fn garbage_bytes_are_rejected_with_a_reason() {
    let f = fleet();
    let mut victim = Document::new(site_a());
    let res = verify_and_apply(
        &f.trust,
        &mut victim,
        &[SignedChange {
            bytes: vec![0x85, 0x6f, 1, 2],
            signature: [0; 64],
        }],
    );
    let msg = res.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("not an automerge change"), "{msg}");
}

#[test]
fn out_of_order_changes_wait_then_apply() {
    let f = fleet();
    let mut w = Document::new(site_a());
    let c1 = set(&mut w, &f.eng_a, "apps.x.paused", "1").unwrap();
    let c2 = set(&mut w, &f.eng_a, "apps.x.paused", "2").unwrap();
    let mut r = Document::new(site_a());
    let (applied, waiting) = verify_and_apply(&f.trust, &mut r, &[c2]).unwrap();
    assert_eq!((applied.len(), waiting), (0, 1));
    let (applied, waiting) = verify_and_apply(&f.trust, &mut r, &[c1]).unwrap();
    assert_eq!((applied.len(), waiting), (2, 0));
    assert_eq!(r.get("apps.x.paused"), Some(serde_json::json!("2")));
}

#[test]
fn revocation_keeps_what_was_seen_and_refuses_the_rest() {
    let mut f = fleet();
    let mut w = Document::new(site_a());
    let seen = set(&mut w, &f.eng_a, "apps.x.paused", "1").unwrap();
    let later = set(&mut w, &f.eng_a, "apps.x.paused", "2").unwrap();
    let actor = automerge::Change::from_bytes(seen.bytes.clone())
        .unwrap()
        .actor_id()
        .to_hex_string();
    f.trust.revoke(
        f.eng_a.key(),
        Revocation {
            reason: "laptop stolen".into(),
            accepted: BTreeMap::from([(actor, 1)]),
            certified: Vec::new(),
        },
    );
    let mut r = Document::new(site_a());
    verify_and_apply(&f.trust, &mut r, std::slice::from_ref(&seen)).unwrap();
    let err = verify_and_apply(&f.trust, &mut r, &[later])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("revoked"), "{err}");
    assert_eq!(r.get("apps.x.paused"), Some(serde_json::json!("1")));
}

#[test]
fn concurrent_writes_to_different_fields_both_survive() {
    let f = fleet();
    let mut base = Document::new(DocId::Fleet);
    let c0 = set(&mut base, &f.op1, "apps.x.version", "v1").unwrap();
    let mut a = Document::new(DocId::Fleet);
    let mut b = Document::new(DocId::Fleet);
    deliver(&f, &mut a, std::slice::from_ref(&c0), 1);
    deliver(&f, &mut b, std::slice::from_ref(&c0), 1);
    let ca = set(&mut a, &f.op1, "apps.x.version", "v2").unwrap();
    let cb = set(&mut b, &f.op2, "apps.x.replicas", "3").unwrap();
    deliver(&f, &mut a, std::slice::from_ref(&cb), 1);
    deliver(&f, &mut b, std::slice::from_ref(&ca), 1);
    for d in [&a, &b] {
        assert_eq!(d.get("apps.x.version"), Some(serde_json::json!("v2")));
        assert_eq!(d.get("apps.x.replicas"), Some(serde_json::json!("3")));
        assert!(d.conflicts().is_empty());
    }
}

/// Found by the `verify_changes` fuzz target: a crafted "bundle" chunk made
/// automerge's decoder panic. It must be a clear rejection.
#[test]
fn crafted_chunks_that_crash_the_decoder_are_rejected() {
    let f = fleet();
    let crash: &[u8] = &[
        0x85, 0x6f, 0x4a, 0x83, 0xed, 0xed, 0xce, 0x11, 0x03, 0x27, 0x00, 0x00, 0x03, 0x03, 0x03,
        0x03, 0x03, 0x03, 0x03, 0x03, 0x03, 0x03, 0x03, 0x03, 0x03, 0x03, 0x03, 0x03, 0x03, 0x03,
        0x03, 0x03, 0x03, 0x23, 0x03, 0x03, 0x03, 0x03, 0x03, 0x03, 0x03, 0x03, 0x03, 0x03, 0x03,
        0x03, 0x03, 0x03, 0x03, 0x03, 0x03, 0x3b, 0x03, 0xc3,
    ];
    let mut victim = Document::new(site_a());
    for bytes in [
        crash.to_vec(),
        {
            let mut b = crash.to_vec();
            b[8] = 1;
            b
        },
        {
            let mut b = crash.to_vec();
            b[8] = 2;
            b
        },
    ] {
        let res = verify_and_apply(
            &f.trust,
            &mut victim,
            &[SignedChange {
                bytes,
                signature: [0; 64],
            }],
        );
        assert!(
            matches!(res, Err(Error::Rejected { .. })),
            "{:?}",
            res.map(|r| r.1)
        );
    }
    assert!(victim.heads().is_empty());
}
