//! Signed changes arrive from peers: verification of arbitrary bytes must
//! refuse them with an error and leave the document untouched.
#![no_main]
use libfuzzer_sys::fuzz_target;

use crdt_state::{DocId, Document, PublicKey, SignedChange, Trust};

fuzz_target!(|data: &[u8]| {
    // Shoal turns panics inside automerge's decoder into errors; keep
    // libfuzzer's abort-on-panic hook from firing for those caught panics.
    // An uncaught panic still reaches libfuzzer-sys and counts as a crash.
    crdt_state::panics::install_hook();
    let trust = Trust::new(PublicKey([7; 32]));
    let mut doc = Document::new(DocId::Fleet);
    let changes: Vec<SignedChange> = data
        .split(|b| *b == 0xff)
        .map(|chunk| SignedChange { bytes: chunk.to_vec(), signature: [0; 64] })
        .collect();
    // No certificate is known, so nothing may ever be applied.
    let _ = crdt_state::signed::verify::verify_and_apply(&trust, &mut doc, &changes);
    assert!(doc.heads().is_empty());
});
