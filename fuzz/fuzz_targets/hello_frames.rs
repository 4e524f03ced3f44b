//! Bytes from a peer before and at admission: stream framing, the hello on
//! `/shoal/hello/1`, the enrollment request on `/shoal/enroll/1`, and the
//! site API's Authorization header. Any input must end in frames, a refusal
//! or an error, never a panic, and nothing nobody signed is ever admitted.
#![no_main]
use libfuzzer_sys::fuzz_target;

use crdt_state::{PublicKey, Trust};

fuzz_target!(|data: &[u8]| {
    if let Ok((frames, used)) = mesh::frame::decode(data, 4096) {
        assert!(used <= data.len());
        assert!(frames.iter().all(|f| f.len() <= 4096));
    }
    let trust = Trust::new(PublicKey([7u8; 32]));
    let key = ed25519_dalek::SigningKey::from_bytes(&[1u8; 32]).verifying_key().to_bytes();
    let Some(peer) = mesh::peer_id_of(&key) else {
        return;
    };
    assert!(node::hello::check(&trust, &peer, data).is_err());
    let _ = serde_json::from_slice::<node::enroll::EnrollRequest>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = node::enroll::Token::decode(text);
        let req = node::site_api::Request {
            method: "GET".into(),
            path: "/api/view".into(),
            auth: Some(text.to_string()),
            body: data.to_vec(),
        };
        let mut nonces = node::site_api::Nonces::default();
        assert!(node::site_api::authenticate(&req, &mut nonces, &trust, "s1").is_err());
    }
});
