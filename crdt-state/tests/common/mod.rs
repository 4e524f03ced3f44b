//! Shared fixtures: a fleet root and writers of every kind.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;

use crdt_state::signed::identity::generate_key;
use crdt_state::{DocId, Document, Identity, PublicKey, Role, SignedChange, Trust};

pub struct Fleet {
    pub trust: Trust,
    pub op1: Identity,
    pub op2: Identity,
    pub eng_a: Identity,
    pub eng_b: Identity,
    pub node1: Identity,
    /// Certified by another root: not a writer of this fleet.
    pub rogue: Identity,
}

pub fn identity(
    root: &ed25519_dalek::SigningKey,
    name: &str,
    role: Role,
    site: Option<&str>,
) -> Identity {
    Identity::issue(root, generate_key().unwrap(), name, role, site, 0).unwrap()
}

pub fn fleet() -> Fleet {
    let root = generate_key().unwrap();
    let other_root = generate_key().unwrap();
    let mut trust = Trust::new(PublicKey(root.verifying_key().to_bytes()));
    let f = Fleet {
        op1: identity(&root, "op1", Role::Operator, None),
        op2: identity(&root, "op2", Role::Operator, None),
        eng_a: identity(&root, "eng-a", Role::SiteEngineer, Some("a")),
        eng_b: identity(&root, "eng-b", Role::SiteEngineer, Some("b")),
        node1: identity(&root, "node1", Role::Node, Some("a")),
        rogue: identity(&other_root, "op1", Role::Operator, None),
        trust: Trust::new(PublicKey([0; 32])),
    };
    for id in [&f.op1, &f.op2, &f.eng_a, &f.eng_b, &f.node1] {
        trust.add_cert(id.cert.clone()).unwrap();
    }
    Fleet { trust, ..f }
}

/// Sets `key = value` (a JSON string) as `who`.
pub fn set(doc: &mut Document, who: &Identity, key: &str, value: &str) -> Option<SignedChange> {
    let mut ops = BTreeMap::new();
    ops.insert(
        key.to_string(),
        Some(serde_json::Value::String(value.into()).to_string()),
    );
    doc.edit(who, 0, &ops).unwrap().map(|(_, c, _)| c)
}

pub fn site_a() -> DocId {
    DocId::Site("a".into())
}
