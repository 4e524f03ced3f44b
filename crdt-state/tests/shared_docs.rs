//! Documents that share one Automerge state (ADR 0016): copies share it
//! until one changes it, the same changes taken at the same heads are
//! applied once, and sharing never changes what a document holds or lets
//! two copies write as one actor.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::{fleet, set};
use crdt_state::signed::doc::share_applied;
use crdt_state::signed::verify::verify_and_apply;
use crdt_state::{DocId, Document, SignedChange};

fn text(doc: &Document, key: &str) -> Option<String> {
    doc.get(key).and_then(|v| v.as_str().map(str::to_string))
}

#[test]
fn a_copy_shares_the_state_until_one_side_writes() {
    let f = fleet();
    let mut original = Document::new(DocId::Fleet);
    set(&mut original, &f.op1, "configs.a", "one").unwrap();
    let mut copy = original.clone();
    assert!(copy.shares_state_with(&original));
    set(&mut copy, &f.op2, "configs.a", "two").unwrap();
    assert!(!copy.shares_state_with(&original), "the writer got its own");
    assert_eq!(text(&original, "configs.a").as_deref(), Some("one"));
    assert_eq!(text(&copy, "configs.a").as_deref(), Some("two"));
    assert_ne!(original.heads(), copy.heads());
}

/// A copy that goes on writing as the same writer must not reuse the
/// original's actor: two changes with one actor and one sequence number
/// would not merge anywhere.
#[test]
fn a_copy_writes_as_an_actor_of_its_own() {
    let f = fleet();
    let mut original = Document::new(DocId::Fleet);
    let first = set(&mut original, &f.op1, "configs.a", "one").unwrap();
    let mut copy = original.clone();
    let mut changes: Vec<SignedChange> = vec![first];
    changes.push(set(&mut original, &f.op1, "configs.b", "from the original").unwrap());
    changes.push(set(&mut copy, &f.op1, "configs.c", "from the copy").unwrap());
    changes.push(set(&mut copy, &f.op1, "configs.d", "from the copy again").unwrap());
    let mut third = Document::new(DocId::Fleet);
    verify_and_apply(&f.trust, &mut third, &changes).unwrap();
    for (k, v) in [
        ("configs.a", "one"),
        ("configs.b", "from the original"),
        ("configs.c", "from the copy"),
        ("configs.d", "from the copy again"),
    ] {
        assert_eq!(text(&third, k).as_deref(), Some(v), "{k}");
    }
    let actors: std::collections::BTreeSet<_> = third
        .automerge()
        .get_changes_meta(&[])
        .iter()
        .map(|m| m.actor.to_hex_string())
        .collect();
    assert_eq!(actors.len(), 3, "the first change's actor, then one each");
}

#[test]
fn the_same_changes_at_the_same_heads_are_applied_once() {
    share_applied(true);
    let f = fleet();
    let mut writer = Document::new(DocId::Fleet);
    let base = set(&mut writer, &f.op1, "configs.a", "one").unwrap();
    let next = set(&mut writer, &f.op1, "configs.b", "two").unwrap();
    // Two documents that never were copies of each other.
    let mut x = Document::new(DocId::Fleet);
    let mut y = Document::new(DocId::Fleet);
    verify_and_apply(&f.trust, &mut x, std::slice::from_ref(&base)).unwrap();
    verify_and_apply(&f.trust, &mut y, std::slice::from_ref(&base)).unwrap();
    assert!(x.shares_state_with(&y));
    verify_and_apply(&f.trust, &mut x, std::slice::from_ref(&next)).unwrap();
    assert!(!x.shares_state_with(&y), "y has not taken the change yet");
    verify_and_apply(&f.trust, &mut y, std::slice::from_ref(&next)).unwrap();
    assert!(x.shares_state_with(&y));
    assert_eq!(x.heads(), writer.heads());
    assert_eq!(text(&y, "configs.b").as_deref(), Some("two"));
    // One of them writing leaves the other as it was.
    set(&mut y, &f.op2, "configs.b", "three").unwrap();
    assert_eq!(text(&x, "configs.b").as_deref(), Some("two"));
    assert_eq!(text(&y, "configs.b").as_deref(), Some("three"));
    // A forged change is refused on a shared state too, and changes nothing.
    let mut z = Document::new(DocId::Fleet);
    verify_and_apply(&f.trust, &mut z, std::slice::from_ref(&base)).unwrap();
    let mut late = set(&mut Document::new(DocId::Fleet), &f.op2, "configs.c", "x").unwrap();
    late.signature[0] ^= 1;
    assert!(verify_and_apply(&f.trust, &mut z, &[late]).is_err());
    assert!(text(&z, "configs.c").is_none());
}
