//! Admission at the hello: only a certificate of this fleet, unrevoked, for
//! the key the connection proved, gets in; no bytes make it panic.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crdt_state::signed::identity::{Certificate, Role, generate_key};
use crdt_state::signed::verify::Revocation;
use crdt_state::{PublicKey, Trust};
use proptest::prelude::*;

struct Setup {
    trust: Trust,
    cert: Certificate,
    peer: mesh::PeerId,
    hello: Vec<u8>,
}

fn setup() -> Setup {
    let root = generate_key().unwrap();
    let key = generate_key().unwrap();
    let pk = PublicKey(key.verifying_key().to_bytes());
    let cert = Certificate::issue(&root, pk, "n1", Role::Node, Some("s1"), 0).unwrap();
    let trust = Trust::new(PublicKey(root.verifying_key().to_bytes()));
    let peer = mesh::peer_id_of(&pk.0).unwrap();
    let hello = daemon::hello::encode(trust.root(), &cert);
    Setup {
        trust,
        cert,
        peer,
        hello,
    }
}

#[test]
fn a_valid_hello_is_admitted_and_each_defect_is_named() {
    let s = setup();
    assert_eq!(
        daemon::hello::check_on_mesh(&s.trust, &s.peer, &s.hello).unwrap(),
        s.cert
    );
    // Another connection's key.
    let other = mesh::peer_id_of(&generate_key().unwrap().verifying_key().to_bytes()).unwrap();
    let e = daemon::hello::check_on_mesh(&s.trust, &other, &s.hello).unwrap_err();
    assert!(e.contains("another key"), "{e}");
    // Another fleet.
    let foreign = Trust::new(PublicKey(
        generate_key().unwrap().verifying_key().to_bytes(),
    ));
    let e = daemon::hello::check_on_mesh(&foreign, &s.peer, &s.hello).unwrap_err();
    assert!(e.contains("belongs to fleet"), "{e}");
    // Revoked.
    let mut revoked = s.trust.clone();
    revoked.revoke(
        s.cert.key,
        Revocation {
            reason: "stolen".into(),
            accepted: Default::default(),
            certified: Vec::new(),
        },
    );
    let e = daemon::hello::check_on_mesh(&revoked, &s.peer, &s.hello).unwrap_err();
    assert!(e.contains("revoked"), "{e}");
    // A self-made certificate for the right key, claiming this fleet.
    let fake_root = generate_key().unwrap();
    let mut fake = Certificate::issue(&fake_root, s.cert.key, "n1", Role::Anchor, None, 0).unwrap();
    fake.issuer = s.trust.root();
    let hello = daemon::hello::encode(s.trust.root(), &fake);
    assert!(daemon::hello::check_on_mesh(&s.trust, &s.peer, &hello).is_err());
    // Garbage and oversized input.
    assert!(daemon::hello::check_on_mesh(&s.trust, &s.peer, b"\xff\x00garbage").is_err());
    let big = vec![b' '; mesh::MAX_SMALL_FRAME + 1];
    let e = daemon::hello::check_on_mesh(&s.trust, &s.peer, &big).unwrap_err();
    assert!(e.contains("too large"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn mutated_hellos_never_admit_anything_else(pos in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
        let s = setup();
        let mut h = s.hello.clone();
        let i = pos % h.len();
        h[i] = byte;
        if let Ok(mut c) = daemon::hello::check_on_mesh(&s.trust, &s.peer, &h) {
            // Hex digits may change case; the certificate is the same.
            c.signature = c.signature.to_lowercase();
            prop_assert_eq!(c, s.cert.clone());
        }
        let t = &s.hello[..cut % s.hello.len()];
        prop_assert!(daemon::hello::check_on_mesh(&s.trust, &s.peer, t).is_err());
    }

    #[test]
    fn random_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let s = setup();
        prop_assert!(daemon::hello::check_on_mesh(&s.trust, &s.peer, &bytes).is_err());
        if let Ok((frames, used)) = mesh::frame::decode(&bytes, 64) {
            prop_assert!(used <= bytes.len());
            prop_assert!(frames.iter().all(|f| f.len() <= 64));
        }
    }

    #[test]
    fn frames_round_trip(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 0..8), split in any::<usize>()) {
        let mut buf = Vec::new();
        for b in &bodies {
            buf.extend(mesh::frame::encode(b));
        }
        let (frames, used) = mesh::frame::decode(&buf, 100).unwrap();
        prop_assert_eq!(used, buf.len());
        prop_assert_eq!(frames.iter().map(|f| f.to_vec()).collect::<Vec<_>>(), bodies.clone());
        // A prefix decodes to a prefix of the frames.
        let cut = if buf.is_empty() { 0 } else { split % buf.len() };
        let (some, used) = mesh::frame::decode(&buf[..cut], 100).unwrap();
        prop_assert!(used <= cut);
        prop_assert!(some.len() <= bodies.len());
    }
}
