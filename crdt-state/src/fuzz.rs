//! Properties the fuzz targets check (and the property tests, without
//! coverage guidance), with the fixtures they need.
//!
//! `POST /api/changes` takes a bundle of changes an operator signed on their
//! own machine. Whatever bytes arrive, the holder's fleet document either
//! takes changes that a certified writer with authority signed, or nothing.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;

use crate::local::datadir::cert_ops;
use crate::signed::bundle::Bundle;
use crate::signed::doc::{DocId, Document};
use crate::signed::identity::{Identity, Role};
use crate::signed::verify::{Trust, verify_and_apply};

/// A fleet with an operator (alice) and a site engineer of site `a`
/// (eve), the fleet document that certifies both, and a bundle of one edit
/// alice signed against it: what a CLI posts.
pub struct Fixture {
    /// The holder's trust.
    pub trust: Trust,
    /// The holder's fleet document, saved.
    pub fleet: Vec<u8>,
    /// Alice's valid edit of the fleet, encoded.
    pub bundle: Vec<u8>,
    /// Eve's identity (may write site `a` only).
    pub eve: Identity,
}

impl Fixture {
    /// The holder's fleet document, loaded afresh.
    pub fn fleet_doc(&self) -> crate::Result<Document> {
        Document::load(DocId::Fleet, &self.fleet)
    }
}

/// Builds the [`Fixture`] from fixed keys (the same on every run).
pub fn fixture() -> crate::Result<Fixture> {
    let root = SigningKey::from_bytes(&[1; 32]);
    let alice = Identity::issue(
        &root,
        SigningKey::from_bytes(&[2; 32]),
        "alice",
        Role::Operator,
        None,
        0,
    )?;
    let eve = Identity::issue(
        &root,
        SigningKey::from_bytes(&[3; 32]),
        "eve",
        Role::SiteEngineer,
        Some("a"),
        0,
    )?;
    let mut trust = Trust::new(alice.cert.issuer);
    trust.add_cert(alice.cert.clone())?;
    trust.add_cert(eve.cert.clone())?;
    let mut fleet = Document::new(DocId::Fleet);
    let mut ops = cert_ops(&alice.cert);
    ops.extend(cert_ops(&eve.cert));
    fleet.edit_with_actor(&alice, 0, &ops, Some([0xa1; 16]))?;
    let saved = fleet.save();
    let mut edited = Document::load(DocId::Fleet, &saved)?;
    let mut ops = BTreeMap::new();
    ops.insert("apps.web".to_string(), Some("{}".to_string()));
    ops.insert("apps.web.version".to_string(), Some("\"v2\"".to_string()));
    let (_, change, _) = edited
        .edit_with_actor(&alice, 1, &ops, None)?
        .ok_or_else(|| crate::Error::NotFound("the fixture's edit".into()))?;
    let bundle = Bundle {
        root: Some(trust.root()),
        certs: vec![eve.cert.clone()],
        docs: vec![(DocId::Fleet, vec![change])],
    }
    .encode(trust.root());
    Ok(Fixture {
        trust,
        fleet: saved,
        bundle,
        eve,
    })
}

/// The bytes a target tests: `data` as edits of the fixture's valid bundle
/// (three bytes each: a big-endian offset and a byte to XOR there), or,
/// when `data` starts with `0`, the rest of it as a bundle of its own.
pub fn mutated(valid: &[u8], data: &[u8]) -> Vec<u8> {
    if let Some((0, raw)) = data.split_first() {
        return raw.to_vec();
    }
    let mut out = valid.to_vec();
    for e in data.chunks_exact(3) {
        let at = usize::from(u16::from_be_bytes([e[0], e[1]]));
        if let Some(b) = out.get_mut(at % valid.len().max(1)) {
            *b ^= e[2];
        }
    }
    out
}

/// Feeds `bytes` to what `POST /api/changes` does with a body: decode, the
/// fleet check, verification against the fixture's fleet. Panics (the
/// target's crash) when a change nobody with authority signed is taken, or
/// when a refused batch left anything behind.
pub fn signed_changes(fx: &Fixture, bytes: &[u8]) {
    let Ok(bundle) = Bundle::decode(bytes) else {
        return;
    };
    if bundle.root != Some(fx.trust.root()) {
        return;
    }
    let mut trust = fx.trust.clone();
    for c in bundle.certs {
        let _ = trust.add_cert(c);
    }
    for (id, changes) in bundle.docs {
        let mut doc = match id.clone() {
            DocId::Fleet => match Document::load(DocId::Fleet, &fx.fleet) {
                Ok(d) => d,
                Err(e) => panic!("the fixture's fleet does not load: {e}"),
            },
            other => Document::new(other),
        };
        let before = doc.heads();
        match verify_and_apply(&trust, &mut doc, &changes) {
            Err(_) => assert_eq!(doc.heads(), before, "a refused batch changed {id}"),
            Ok((applied, _)) => {
                for (hash, c) in applied {
                    let change = crate::signed::doc::decode_change(&c.bytes)
                        .unwrap_or_else(|e| panic!("{hash} applied but does not decode: {e}"));
                    let key = doc
                        .actor_key(change.actor_id())
                        .unwrap_or_else(|| panic!("{hash} applied with no writer"));
                    let cert = trust
                        .cert(&key)
                        .unwrap_or_else(|| panic!("{hash} applied, written by an unknown key"));
                    assert!(
                        cert.may_write(&id),
                        "{hash} applied to {id}, written by {} ({}) who may not",
                        cert.name,
                        cert.role
                    );
                    let msg = crate::signed::doc::signing_message(&id, &hash);
                    assert!(
                        key.verify_signature(&msg, &c.signature).is_ok(),
                        "{hash} applied with a signature that does not check"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_fixture_edit_is_taken_and_a_flipped_bit_is_not() -> crate::Result<()> {
        let fx = fixture()?;
        let mut doc = fx.fleet_doc()?;
        let bundle = Bundle::decode(&fx.bundle)?;
        let (applied, _) = verify_and_apply(&fx.trust, &mut doc, &bundle.docs[0].1)?;
        assert_eq!(applied.len(), 1);
        // Each bit of the signature: refused, and the fleet untouched.
        let sig_at = fx.bundle.len() - 64;
        for bit in [0u8, 3, 7] {
            let mut bytes = fx.bundle.clone();
            bytes[sig_at + 9] ^= 1 << bit;
            let b = Bundle::decode(&bytes)?;
            let mut doc = fx.fleet_doc()?;
            assert!(verify_and_apply(&fx.trust, &mut doc, &b.docs[0].1).is_err());
            assert_eq!(doc.heads(), fx.fleet_doc()?.heads());
        }
        // Eve's own fleet edit, validly signed, is refused: no authority.
        let mut doc = fx.fleet_doc()?;
        let mut ops = BTreeMap::new();
        ops.insert("apps.web".to_string(), Some("{}".to_string()));
        let (_, change, _) = doc
            .edit_with_actor(&fx.eve, 2, &ops, None)?
            .ok_or_else(|| crate::Error::NotFound("eve's edit".into()))?;
        let mut doc = fx.fleet_doc()?;
        assert!(verify_and_apply(&fx.trust, &mut doc, &[change]).is_err());
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn mutated_bundles_never_smuggle_a_change(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let fx = fixture().map_err(|e| TestCaseError::fail(e.to_string()))?;
            signed_changes(&fx, &mutated(&fx.bundle, &data));
        }
    }
}
