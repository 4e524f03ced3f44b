//! Bytes from a peer before and at admission: stream framing, the hello on
//! `/shoal/hello/1`, the enrollment request on `/shoal/enroll/1`, tokens,
//! and the site API's Authorization header. Any input must end in frames,
//! a refusal or an error, never a panic; nothing nobody signed is ever
//! admitted; no request certifies a key on an anchor that issued no token;
//! what decodes re-encodes to the same thing.
#![no_main]
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;

use crdt_state::{DataDir, PublicKey, Trust};
use daemon::enroll::{self, EnrollRequest, Token};

/// An anchor's data dir that never issued a token (made once per run).
fn anchor() -> &'static Mutex<Option<DataDir>> {
    static DD: OnceLock<Mutex<Option<DataDir>>> = OnceLock::new();
    DD.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("shoal-fuzz-anchor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Mutex::new(DataDir::init(&dir, "fuzz", 0).ok())
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok((frames, used)) = mesh::frame::decode(data, 4096) {
        assert!(used <= data.len());
        assert!(frames.iter().all(|f| f.len() <= 4096));
        // What was taken is whole frames: encoding them gives the bytes back.
        let again: Vec<u8> = frames.iter().flat_map(|f| mesh::frame::encode(f)).collect();
        assert_eq!(again, data[..used]);
    }
    let trust = Trust::new(PublicKey([7u8; 32]));
    let key = ed25519_dalek::SigningKey::from_bytes(&[1u8; 32]).verifying_key().to_bytes();
    let Some(peer) = mesh::peer_id_of(&key) else {
        return;
    };
    assert!(daemon::hello::check_on_mesh(&trust, &peer, data).is_err());
    if let Ok(req) = serde_json::from_slice::<EnrollRequest>(data) {
        let again: EnrollRequest =
            serde_json::from_slice(&serde_json::to_vec(&req).unwrap()).unwrap();
        assert_eq!((again.secret, again.key), (req.secret, req.key));
        if let Ok(mut guard) = anchor().lock()
            && let Some(dd) = guard.as_mut()
        {
            let answer = enroll::check(dd, data, 0);
            assert!(answer.is_err(), "{answer:?}");
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(t) = Token::decode(text) {
            let again = Token::decode(&t.encode()).unwrap();
            assert_eq!((again.secret, again.anchors, again.fleet), (t.secret, t.anchors, t.fleet));
        }
        let req = node::site_api::Request {
            method: "GET".into(),
            path: "/api/view".into(),
            auth: Some(text.to_string()),
            body: data.to_vec(),
        };
        let mut nonces = node::site_api::Nonces::default();
        assert!(node::site_api::authenticate(&req, &mut nonces).is_err());
    }
});
