//! Frames on `/shoal/sync/1` come from peers: decoding and handling any
//! bytes must end in a frame, a security event or a cut-off, never a panic,
//! and nothing unverified may reach a document.
#![no_main]
use libfuzzer_sys::fuzz_target;

use crdt_state::signed::identity::{Certificate, Role};
use crdt_state::signed::sync::{Engine, Input, SyncConfig};
use crdt_state::{DocId, PublicKey, Trust};

fuzz_target!(|data: &[u8]| {
    crdt_state::panics::install_hook();
    let _ = crdt_state::signed::wire::Frame::decode(data);
    // Fixed keys: a crash found here replays from its input alone.
    let key = |b: u8| ed25519_dalek::SigningKey::from_bytes(&[b; 32]);
    let (root, me, them) = (key(1), key(2), key(3));
    let cert = |k: &ed25519_dalek::SigningKey, name: &str, role| {
        Certificate::issue(&root, PublicKey(k.verifying_key().to_bytes()), name, role, None, 0)
    };
    let (Ok(my_cert), Ok(their_cert)) = (cert(&me, "anchor", Role::Anchor), cert(&them, "op", Role::Operator)) else {
        return;
    };
    let trust = Trust::new(PublicKey(root.verifying_key().to_bytes()));
    let mut engine = Engine::new(my_cert, trust, vec![], SyncConfig::default());
    let peer = their_cert.key;
    engine.handle(Input::Connected { peer, cert: their_cert, saved: vec![] });
    engine.handle(Input::Received { peer, frame: data.to_vec() });
    while engine.poll_output().is_some() {}
    // The peer signed nothing: no document may hold a change.
    assert!(engine.doc(&DocId::Fleet).is_none_or(|d| d.heads().is_empty()));
});
