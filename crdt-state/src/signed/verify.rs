//! Verification of incoming signed changes.
//!
//! A change is accepted only if (1) it decodes, (2) its actor is bound to a
//! key — by the author footer of the actor's first change (automerge writes
//! the author only on `seq == 1`), (3) that key holds a certificate of this
//! fleet that allows writing the document and is not revoked for this
//! change, and (4) the signature over `(doc id, change hash)` verifies with
//! that key. One bad change refuses the whole batch.

use std::collections::{BTreeMap, HashMap};

use automerge::{ActorId, Change, ChangeHash};
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::signed::doc::{DocId, Document, SignedChange, signing_message};
use crate::signed::identity::{Certificate, PublicKey};

/// A revocation, as held in the fleet document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Why (for people).
    #[serde(default)]
    pub reason: String,
    /// Changes of the revoked key that stay valid: per actor (hex), the
    /// highest sequence number the operator had seen when revoking. Any
    /// other change by the key is refused. No clock involved.
    #[serde(default)]
    pub accepted: BTreeMap<String, u64>,
    /// For a revoked issuer: the node keys it certified that the operator
    /// had seen when revoking. Those certificates stay valid; any other
    /// it signed is refused, made before or after (ADR 0013).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certified: Vec<PublicKey>,
}

/// What a receiver trusts: the fleet root, the certificates it has
/// verified, and the revocations of the fleet document.
///
/// Cloning is cheap: the maps are shared until one copy changes (a data
/// dir and its daemon's engine, or ten thousand simulated nodes, hold one
/// map of a fleet's certificates, not one each).
#[derive(Clone, Debug)]
pub struct Trust {
    root: PublicKey,
    certs: std::sync::Arc<HashMap<PublicKey, Certificate>>,
    revoked: std::sync::Arc<HashMap<PublicKey, Revocation>>,
    /// Node name → site, from node certificates (for interest decisions).
    node_sites: std::sync::Arc<HashMap<String, String>>,
}

impl Trust {
    /// Trust anchored at the fleet root key.
    pub fn new(root: PublicKey) -> Self {
        Trust {
            root,
            certs: Default::default(),
            revoked: Default::default(),
            node_sites: Default::default(),
        }
    }

    /// The fleet root.
    pub fn root(&self) -> PublicKey {
        self.root
    }

    /// Checks a certificate against the root and, for a node an issuer
    /// certified, that the issuer is not revoked for it; does not add it.
    pub fn check(&self, cert: &Certificate) -> Result<()> {
        if self.holds(cert) {
            return Ok(());
        }
        cert.verify(&self.root)?;
        match self.revoked_issuer(cert) {
            Some(why) => Err(Error::Identity(why)),
            None => Ok(()),
        }
    }

    /// Adds a certificate after [`Trust::check`].
    pub fn add_cert(&mut self, cert: Certificate) -> Result<()> {
        if self.holds(&cert) {
            return Ok(());
        }
        self.check(&cert)?;
        if cert.role == crate::signed::identity::Role::Node
            && let Some(site) = &cert.site
        {
            std::sync::Arc::make_mut(&mut self.node_sites).insert(cert.name.clone(), site.clone());
        }
        std::sync::Arc::make_mut(&mut self.certs).insert(cert.key, cert);
        Ok(())
    }

    /// Records a revocation. Revoking an issuer drops the certificates it
    /// signed that the revocation does not list.
    pub fn revoke(&mut self, key: PublicKey, r: Revocation) {
        if self.revoked.get(&key) == Some(&r) {
            return;
        }
        std::sync::Arc::make_mut(&mut self.revoked).insert(key, r);
        let dropped: Vec<PublicKey> = self
            .certs
            .values()
            .filter(|c| self.revoked_issuer(c).is_some())
            .map(|c| c.key)
            .collect();
        if !dropped.is_empty() {
            let certs = std::sync::Arc::make_mut(&mut self.certs);
            for k in dropped {
                certs.remove(&k);
            }
        }
    }

    /// Why a node certificate of a revoked issuer is refused, if it is.
    fn revoked_issuer(&self, cert: &Certificate) -> Option<String> {
        let via = cert.via.as_ref()?;
        let r = self.revoked.get(&via.key)?;
        (!r.certified.contains(&cert.key)).then(|| {
            format!(
                "certificate of {} was signed by issuer {}, revoked ({}), and is not one it had certified before",
                cert.name, via.name, r.reason
            )
        })
    }

    /// Whether this very certificate is trusted: it was checked against the
    /// root when it was added, so it needs no signature check again (every
    /// fleet change, every reconnection).
    pub fn holds(&self, cert: &Certificate) -> bool {
        self.certs.get(&cert.key) == Some(cert)
    }

    /// The certificate of a key, if known.
    pub fn cert(&self, key: &PublicKey) -> Option<&Certificate> {
        self.certs.get(key)
    }

    /// The site of a node, from its certificate.
    pub fn node_site(&self, name: &str) -> Option<&str> {
        self.node_sites.get(name).map(String::as_str)
    }

    /// Every known certificate.
    pub fn certs(&self) -> impl Iterator<Item = &Certificate> {
        self.certs.values()
    }

    /// Whether `key` is revoked at all.
    pub fn is_revoked(&self, key: &PublicKey) -> bool {
        self.revoked.contains_key(key)
    }

    /// Reads the certificates (`certs.*`) and revocations (`revoked.*`)
    /// that the fleet document holds. Certificates that fail the root
    /// check are skipped and returned as errors for the caller to report.
    pub fn absorb_fleet(&mut self, fleet: &Document) -> Vec<Error> {
        let mut errors = Vec::new();
        // Revocations first: a revoked issuer's certificates are refused
        // as they are read.
        for (key, text) in fleet.fields("revoked.") {
            let Some(hex) = key.strip_prefix("revoked.") else {
                continue;
            };
            match (
                PublicKey::from_hex(hex),
                serde_json::from_str::<Revocation>(&text),
            ) {
                (Ok(k), Ok(r)) => self.revoke(k, r),
                _ => errors.push(Error::Identity(format!("malformed revocation {key}"))),
            }
        }
        for (_, text) in fleet.fields("certs.") {
            let parsed = serde_json::from_str::<String>(&text)
                .map_err(|e| Error::Identity(format!("certificate entry is not text: {e}")))
                .and_then(|s| Certificate::from_json(s.as_bytes()));
            // Called on every fleet change: `add_cert` checks only what it
            // does not already hold.
            match parsed.and_then(|c| self.add_cert(c)) {
                Ok(()) => {}
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    fn revoked_for(&self, key: &PublicKey, actor: &ActorId, seq: u64) -> bool {
        match self.revoked.get(key) {
            None => false,
            Some(r) => r
                .accepted
                .get(&actor.to_hex_string())
                .is_none_or(|max| seq > *max),
        }
    }
}

/// The fields a change writes and the text it puts there (`None`: a
/// delete). Every Shoal document is flat (one map at the root, ADR 0001);
/// an operation anywhere else, or a value that is not text, is an error.
fn change_fields(c: &Change) -> std::result::Result<Vec<(String, Option<String>)>, String> {
    use automerge::legacy::{Key, ObjectId, OpType};
    let expanded = crate::panics::catch(|| c.decode())
        .map_err(|e| format!("the change does not expand: {e}"))?;
    expanded
        .operations
        .iter()
        .map(|op| match (&op.obj, &op.key, &op.action) {
            (ObjectId::Root, Key::Map(k), OpType::Put(automerge::ScalarValue::Str(v))) => {
                Ok((k.to_string(), Some(v.to_string())))
            }
            (ObjectId::Root, Key::Map(k), OpType::Delete) => Ok((k.to_string(), None)),
            (ObjectId::Root, Key::Map(k), _) => Err(format!("{k}: not a text value")),
            _ => Err("an operation below the document's root".to_string()),
        })
        .collect()
}

/// An anchor registers a node (`nodes.<name>…`) only as the operator's
/// grant in that node's certificate says — its site and labels — and only
/// for a node an issuer certified: the certificate in the same change, or
/// one already held. It may drop fields the grant does not name (a node
/// enrolled again), never set one to anything else. So a taken-over
/// anchor cannot move a node to another site or relabel it, and so cannot
/// move operator-signed apps between nodes.
pub fn registrations_as_granted(
    trust: &Trust,
    fields: &[(String, Option<String>)],
) -> std::result::Result<(), String> {
    use crate::fleet::model::{NodeSpec, flatten};
    let mut grants: HashMap<String, crate::signed::identity::Grant> = HashMap::new();
    for (k, v) in fields {
        if let (Some(_), Some(v)) = (k.strip_prefix("certs."), v)
            && let Ok(json) = serde_json::from_str::<String>(v)
            && let Ok(c) = Certificate::from_json(json.as_bytes())
            && let Some(g) = c.grant
        {
            grants.insert(c.name, *g);
        }
    }
    for (k, v) in fields {
        let Some(rest) = k.strip_prefix("nodes.") else {
            continue;
        };
        let name = rest.split('.').next().unwrap_or_default();
        let grant = match grants.get(name) {
            Some(g) => g.clone(),
            None => trust
                .certs()
                .find(|c| c.name == name && c.role == crate::signed::identity::Role::Node)
                .and_then(|c| c.grant.as_deref().cloned())
                .ok_or_else(|| {
                    format!("{k}: node {name} has no operator's grant to register it by")
                })?,
        };
        let spec = NodeSpec {
            site: grant.site.clone(),
            labels: grant.labels.clone(),
        };
        let base = format!("nodes.{name}");
        let mut granted = BTreeMap::new();
        granted.insert(
            base.clone(),
            serde_json::Value::String("Node".into()).to_string(),
        );
        flatten(
            &base,
            &serde_json::to_value(&spec).unwrap_or_default(),
            &mut granted,
        );
        match v {
            Some(v) if granted.get(k) == Some(v) => {}
            None if !granted.contains_key(k) => {}
            Some(v) => return Err(format!("{k} = {v} is not what {name}'s grant says")),
            None => return Err(format!("{k}: the grant of {name} names it; it stays")),
        }
    }
    Ok(())
}

/// Largest number of changes held back for missing dependencies per document.
pub const MAX_PENDING: usize = 16_384;

/// The result of verifying a batch.
#[derive(Debug, Default)]
pub struct Verified {
    /// Verified changes whose dependencies are all present, in an order
    /// that applies (with their signatures).
    pub ready: Vec<(Change, [u8; 64])>,
    /// Changes that wait for dependencies (not verified yet).
    pub waiting: Vec<(Change, [u8; 64])>,
}

/// Verifies `incoming` for `doc`. Changes already in the document are
/// dropped; changes whose dependencies are neither in the document nor in
/// the batch wait (they cannot be checked before the actor's first change is
/// known). Every other change must verify, or the whole batch is refused,
/// naming the first bad change.
pub fn verify_changes(
    trust: &Trust,
    doc: &Document,
    incoming: Vec<(Change, [u8; 64])>,
) -> Result<Verified> {
    let id = doc.id();
    let reject = |hash: String, reason: String| Error::Rejected {
        doc: id.to_string(),
        hash,
        reason,
    };
    // Dedupe, drop known.
    let mut batch: HashMap<ChangeHash, (Change, [u8; 64])> = HashMap::with_capacity(incoming.len());
    for (c, sig) in incoming {
        let h = c.hash();
        if !batch.contains_key(&h) && !doc.has_change(&h) {
            batch.insert(h, (c, sig));
        }
    }
    // Causal readiness: a change is ready when each dependency is in the
    // document or is itself ready. Kahn's algorithm over the batch.
    let mut missing: HashMap<ChangeHash, usize> = HashMap::with_capacity(batch.len());
    let mut dependents: HashMap<ChangeHash, Vec<ChangeHash>> = HashMap::new();
    let mut queue = Vec::new();
    for (h, (c, _)) in &batch {
        let mut n = 0;
        for d in c.deps() {
            if batch.contains_key(d) {
                n += 1;
                dependents.entry(*d).or_default().push(*h);
            } else if !doc.has_change(d) {
                n += 1; // never satisfied within this batch
            }
        }
        missing.insert(*h, n);
        if n == 0 {
            queue.push(*h);
        }
    }
    // Deterministic order (replays in the simulator are byte-identical).
    queue.sort_unstable_by(|a, b| b.cmp(a));
    let mut order = Vec::with_capacity(batch.len());
    while let Some(h) = queue.pop() {
        order.push(h);
        for d in dependents.get(&h).map(Vec::as_slice).unwrap_or_default() {
            if let Some(n) = missing.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    queue.push(*d);
                }
            }
        }
    }
    let mut ready = Vec::with_capacity(order.len());
    for h in &order {
        if let Some(entry) = batch.remove(h) {
            ready.push(entry);
        }
    }
    let mut waiting: Vec<_> = batch.into_values().collect();
    waiting.sort_by_key(|(c, _)| c.hash());

    // Bind actors to keys: from the document, then from first changes here.
    let mut bound: HashMap<ActorId, PublicKey> = HashMap::new();
    for (c, _) in &ready {
        if c.seq() != 1 {
            continue;
        }
        let hash = c.hash();
        let key = match c.author() {
            Some(a) => PublicKey::from_slice(a.as_bytes())
                .map_err(|_| reject(hash.to_string(), "author is not an Ed25519 key".into()))?,
            None => {
                return Err(reject(
                    hash.to_string(),
                    "unsigned: first change of an actor carries no author".into(),
                ));
            }
        };
        let previous = doc
            .actor_key(c.actor_id())
            .or(bound.get(c.actor_id()).copied());
        if previous.is_some_and(|p| p != key) {
            return Err(reject(
                hash.to_string(),
                "actor already belongs to another key".into(),
            ));
        }
        bound.insert(c.actor_id().clone(), key);
    }

    // Certificates travel inside the fleet document (`certs.<key>`), so the
    // first change that introduces a writer may carry that writer's own
    // certificate. Certificates are root-signed: take them from the batch
    // when a writer is unknown, checking each against the root.
    let extended;
    let mut trust = trust;
    let unknown_writer = ready.iter().any(|(c, _)| {
        bound
            .get(c.actor_id())
            .copied()
            .or_else(|| doc.actor_key(c.actor_id()))
            .is_some_and(|k| trust.cert(&k).is_none())
    });
    if unknown_writer && *id == DocId::Fleet {
        let mut t = trust.clone();
        for cert in certs_in(&ready) {
            if let Err(e) = t.add_cert(cert) {
                tracing::warn!(error = %e, "a change carries an invalid certificate");
            }
        }
        extended = t;
        trust = &extended;
    }

    let mut keys: HashMap<PublicKey, VerifyingKey> = HashMap::new();
    let mut messages = Vec::with_capacity(ready.len());
    let mut sigs = Vec::with_capacity(ready.len());
    let mut vks = Vec::with_capacity(ready.len());
    for (c, sig) in &ready {
        let hash = c.hash();
        let actor = c.actor_id();
        let key = bound
            .get(actor)
            .copied()
            .or_else(|| doc.actor_key(actor))
            .ok_or_else(|| {
                reject(
                    hash.to_string(),
                    format!(
                        "actor {} has no known key (its first change is missing)",
                        actor.to_hex_string()
                    ),
                )
            })?;
        if let Some(a) = c.author()
            && a.as_bytes() != key.0
        {
            return Err(reject(
                hash.to_string(),
                "author does not match the actor's key".into(),
            ));
        }
        let cert = trust.cert(&key).ok_or_else(|| {
            reject(
                hash.to_string(),
                format!("writer {} has no certificate of this fleet", key.short()),
            )
        })?;
        if !cert.may_write(id) {
            return Err(reject(
                hash.to_string(),
                format!(
                    "unauthorised: {} ({}{}) may not write {id}",
                    cert.name,
                    cert.role,
                    cert.site
                        .as_deref()
                        .map(|s| format!(" of site {s}"))
                        .unwrap_or_default()
                ),
            ));
        }
        if cert.role == crate::signed::identity::Role::Anchor {
            // Field by field (ADR 0013): an anchor's own writes only, and
            // a registration only as an operator granted it.
            let fields = change_fields(c).map_err(|e| reject(hash.to_string(), e))?;
            if let Some((f, _)) = fields.iter().find(|(f, _)| !cert.may_write_field(id, f)) {
                return Err(reject(
                    hash.to_string(),
                    format!(
                        "unauthorised: anchor {} may not write {f} of {id} (anchors write node registrations and rollout decisions only)",
                        cert.name
                    ),
                ));
            }
            registrations_as_granted(trust, &fields).map_err(|e| {
                reject(
                    hash.to_string(),
                    format!("unauthorised: anchor {}: {e}", cert.name),
                )
            })?;
        }
        if trust.revoked_for(&key, actor, c.seq()) {
            return Err(reject(
                hash.to_string(),
                format!("writer {} is revoked", cert.name),
            ));
        }
        let vk = match keys.get(&key) {
            Some(vk) => *vk,
            None => {
                let vk = key
                    .verifying_key()
                    .map_err(|e| reject(hash.to_string(), e.to_string()))?;
                keys.insert(key, vk);
                vk
            }
        };
        messages.push(signing_message(id, &hash));
        sigs.push(Signature::from_bytes(sig));
        vks.push(vk);
    }
    check_signatures(&messages, &sigs, &vks)
        .map_err(|i| reject(ready[i].0.hash().to_string(), "bad signature".into()))?;
    Ok(Verified { ready, waiting })
}

/// Certificates written by changes (`certs.<key>` puts), not yet verified.
fn certs_in(changes: &[(Change, [u8; 64])]) -> Vec<Certificate> {
    use automerge::legacy::{Key, OpType};
    let mut out = Vec::new();
    for (c, _) in changes {
        let Ok(expanded) = crate::panics::catch(|| c.decode()) else {
            continue;
        };
        for op in expanded.operations {
            if let (Key::Map(k), OpType::Put(automerge::ScalarValue::Str(v))) =
                (&op.key, &op.action)
                && k.starts_with("certs.")
                && let Ok(text) = serde_json::from_str::<String>(v)
                && let Ok(cert) = Certificate::from_json(text.as_bytes())
            {
                out.push(cert);
            }
        }
    }
    out
}

/// Decodes signed changes; a malformed one refuses the batch.
pub fn decode(doc: &DocId, incoming: &[SignedChange]) -> Result<Vec<(Change, [u8; 64])>> {
    incoming
        .iter()
        .enumerate()
        .map(|(i, sc)| {
            crate::signed::doc::decode_change(&sc.bytes)
                .map(|c| (c, sc.signature))
                .map_err(|e| Error::Rejected {
                    doc: doc.to_string(),
                    hash: "?".into(),
                    reason: format!("change #{i} is not an automerge change: {e}"),
                })
        })
        .collect()
}

/// Verifies all signatures, in one batch when there are several. On
/// failure returns the index of the first bad one.
fn check_signatures(
    messages: &[Vec<u8>],
    sigs: &[Signature],
    vks: &[VerifyingKey],
) -> std::result::Result<(), usize> {
    if messages.is_empty() {
        return Ok(());
    }
    if messages.len() > 1 {
        let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        if ed25519_dalek::verify_batch(&refs, sigs, vks).is_ok() {
            return Ok(());
        }
    }
    for (i, ((m, s), k)) in messages.iter().zip(sigs).zip(vks).enumerate() {
        if k.verify_strict(m, s).is_err() {
            return Err(i);
        }
    }
    Ok(())
}

/// Verifies and applies `incoming` to `doc`, together with the changes
/// the document already holds back. Returns the changes now part of the
/// document (for the caller to persist) and how many still wait for
/// dependencies (kept in the document, in memory, bounded).
pub fn verify_and_apply(
    trust: &Trust,
    doc: &mut Document,
    incoming: &[SignedChange],
) -> Result<(Vec<(ChangeHash, SignedChange)>, usize)> {
    let decoded = decode(doc.id(), incoming)?;
    verify_and_apply_decoded(trust, doc, decoded)
}

/// [`verify_and_apply`] for changes the caller has decoded already (a sync
/// message's changes are decoded to match them with their signatures).
pub fn verify_and_apply_decoded(
    trust: &Trust,
    doc: &mut Document,
    mut all: Vec<(Change, [u8; 64])>,
) -> Result<(Vec<(ChangeHash, SignedChange)>, usize)> {
    let held = doc.take_pending();
    all.extend(held.iter().cloned());
    let verified = match verify_changes(trust, doc, all) {
        Ok(v) => v,
        Err(e) => {
            doc.set_pending(held);
            return Err(e);
        }
    };
    let mut persisted = Vec::with_capacity(verified.ready.len());
    let mut changes = Vec::with_capacity(verified.ready.len());
    for (c, signature) in verified.ready {
        persisted.push((
            c.hash(),
            SignedChange {
                bytes: c.raw_bytes().to_vec(),
                signature,
            },
        ));
        changes.push(c);
    }
    doc.apply_verified(changes)?;
    let waiting = verified.waiting.len();
    doc.set_pending(verified.waiting);
    Ok((persisted, waiting))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signed::identity::{Grant, Identity, Role, generate_key};

    /// A change made unsigned for a key held elsewhere (a browser's, ADR
    /// 0015) and signed there verifies as that writer's; signed by another
    /// key, it is refused.
    #[test]
    fn a_change_made_for_a_key_held_elsewhere_verifies_once_signed() -> anyhow::Result<()> {
        use crate::signed::doc::{DocId, Document, SignedChange, signing_message};
        let root = generate_key()?;
        let mut trust = Trust::new(PublicKey(root.verifying_key().to_bytes()));
        let alice = Identity::issue(&root, generate_key()?, "alice", Role::Operator, None, 0)?;
        let mallory = Identity::issue(&root, generate_key()?, "mallory", Role::Operator, None, 0)?;
        trust.add_cert(alice.cert.clone())?;
        trust.add_cert(mallory.cert.clone())?;
        // The anchor's copy already holds a change by alice's key.
        let mut anchor = Document::new(DocId::Fleet);
        let ops = |v: &str| -> BTreeMap<String, Option<String>> {
            [("configs.c".to_string(), Some(format!("\"{v}\"")))].into()
        };
        anchor.edit(&alice, 0, &ops("one"))?;
        let copy = || Document::load(DocId::Fleet, &anchor.save());
        let (hash, bytes) = copy()?
            .unsigned_change(alice.key(), 1, &ops("two"))?
            .ok_or_else(|| Error::NotFound("a change".into()))?;
        assert!(
            copy()?
                .unsigned_change(alice.key(), 1, &ops("one"))?
                .is_none(),
            "nothing to change"
        );
        for (signer, taken) in [(&mallory, false), (&alice, true)] {
            let signed = SignedChange {
                bytes: bytes.clone(),
                signature: signer.sign(&signing_message(&DocId::Fleet, &hash)),
            };
            let mut held = copy()?;
            let r = verify_and_apply(&trust, &mut held, &[signed]);
            assert_eq!(r.is_ok(), taken, "signed by {}: {r:?}", signer.cert.name);
            if taken {
                assert_eq!(held.raw("configs.c").as_deref(), Some("\"two\""));
                let last = held.history().pop().map(|m| m.writer);
                assert_eq!(last, Some(Some(alice.key())));
            }
        }
        Ok(())
    }

    /// A change an anchor signs in the fleet document is taken only when
    /// every field it writes is one anchors write on their own: an app,
    /// a config, a rollout's target or a revocation is refused, whatever
    /// else the change holds; a site document not at all (ADR 0013).
    #[test]
    fn an_anchor_writes_no_desired_state() -> anyhow::Result<()> {
        use crate::signed::doc::{DocId, Document};
        let root = generate_key()?;
        let mut trust = Trust::new(PublicKey(root.verifying_key().to_bytes()));
        let anchor = Identity::issue(&root, generate_key()?, "a1", Role::Anchor, None, 0)?;
        trust.add_cert(anchor.cert.clone())?;
        let try_write = |doc: DocId, fields: &[&str]| -> Result<usize> {
            let mut made = Document::new(doc.clone());
            let ops: BTreeMap<String, Option<String>> = fields
                .iter()
                .map(|f| (f.to_string(), Some("\"x\"".to_string())))
                .collect();
            let (_, change, _) = made
                .edit(&anchor, 0, &ops)?
                .ok_or_else(|| Error::NotFound("a change".into()))?;
            let mut held = Document::new(doc);
            Ok(verify_and_apply(&trust, &mut held, &[change])?.0.len())
        };
        assert_eq!(
            try_write(
                DocId::Fleet,
                &[
                    "certs.ab",
                    "rollouts.web.open.r2.1.a1",
                    "rollouts.web.halted.r2.a1"
                ]
            )?,
            1
        );
        for bad in [
            "apps.rogue",
            "apps.web.version",
            "configs.c",
            "rollouts.web",
            "rollouts.web.from",
            "rollouts.web.open",
            "revoked.ab",
            "devices.d",
        ] {
            let e = try_write(DocId::Fleet, &["certs.ab", bad])
                .expect_err(bad)
                .to_string();
            assert!(e.contains(&format!("may not write {bad}")), "{bad}: {e}");
        }
        let e = try_write(DocId::Site("s1".into()), &["apps.web.version"])
            .expect_err("a site document")
            .to_string();
        assert!(e.contains("may not write site/s1"), "{e}");
        Ok(())
    }

    /// An anchor registers a node only as its grant says: in the same
    /// change as the node's certificate, or later for a node whose
    /// certificate is held; another site or another label is refused, as
    /// is a registration of a node no operator granted.
    #[test]
    fn an_anchor_registers_only_what_was_granted() -> anyhow::Result<()> {
        use crate::local::datadir::cert_ops;
        use crate::signed::doc::{DocId, Document};
        let root = generate_key()?;
        let mut trust = Trust::new(PublicKey(root.verifying_key().to_bytes()));
        let alice = Identity::issue(&root, generate_key()?, "alice", Role::Operator, None, 0)?;
        let anchor = Identity::issue(&root, generate_key()?, "a1", Role::Anchor, None, 0)?;
        let issuer = Identity::issue_issuer(&root, generate_key()?, "iss", &["s1".into()], 0)?;
        trust.add_cert(anchor.cert.clone())?;
        trust.add_cert(issuer.cert.clone())?;
        let labels = BTreeMap::from([("rack".to_string(), "r1".to_string())]);
        let grant = Grant::sign(&alice, "n1", "s1", labels, 0)?;
        let key = PublicKey(generate_key()?.verifying_key().to_bytes());
        let n1 = Certificate::issue_via(&issuer, key, grant, 0)?;
        let write = |trust: &Trust, ops: BTreeMap<String, Option<String>>| -> Result<usize> {
            let mut made = Document::new(DocId::Fleet);
            let (_, change, _) = made
                .edit(&anchor, 0, &ops)?
                .ok_or_else(|| Error::NotFound("a change".into()))?;
            let mut held = Document::new(DocId::Fleet);
            Ok(verify_and_apply(trust, &mut held, &[change])?.0.len())
        };
        let node = |site: &str, rack: &str| -> BTreeMap<String, Option<String>> {
            BTreeMap::from([
                ("nodes.n1".to_string(), Some("\"Node\"".to_string())),
                ("nodes.n1.site".to_string(), Some(format!("\"{site}\""))),
                (
                    "nodes.n1.labels.rack".to_string(),
                    Some(format!("\"{rack}\"")),
                ),
            ])
        };
        // With its certificate, as enrollment writes it.
        let mut enrollment = node("s1", "r1");
        enrollment.extend(cert_ops(&n1));
        assert_eq!(write(&trust, enrollment)?, 1);
        // Without: only once the certificate is held.
        let e = write(&trust, node("s1", "r1"))
            .expect_err("no grant held")
            .to_string();
        assert!(e.contains("has no operator's grant"), "{e}");
        trust.add_cert(n1)?;
        assert_eq!(write(&trust, node("s1", "r1"))?, 1);
        for (site, rack) in [("s2", "r1"), ("s1", "r9")] {
            let e = write(&trust, node(site, rack))
                .expect_err("not granted")
                .to_string();
            assert!(e.contains("is not what n1's grant says"), "{e}");
        }
        Ok(())
    }

    /// Revoking an issuer keeps the node certificates the operator had seen
    /// it make (the revocation lists them) and refuses every other, whether
    /// it was held already or arrives later (ADR 0013).
    #[test]
    fn a_revoked_issuer_keeps_only_what_it_had_certified() -> anyhow::Result<()> {
        let root = generate_key()?;
        let mut trust = Trust::new(PublicKey(root.verifying_key().to_bytes()));
        let alice = Identity::issue(&root, generate_key()?, "alice", Role::Operator, None, 0)?;
        let issuer = Identity::issue_issuer(&root, generate_key()?, "iss", &["s1".into()], 0)?;
        let node = |name: &str| -> anyhow::Result<Certificate> {
            let grant = Grant::sign(&alice, name, "s1", Default::default(), 0)?;
            let key = PublicKey(generate_key()?.verifying_key().to_bytes());
            Ok(Certificate::issue_via(&issuer, key, grant, 0)?)
        };
        let (seen, unseen, later) = (node("n1")?, node("n2")?, node("n3")?);
        trust.add_cert(issuer.cert.clone())?;
        trust.add_cert(seen.clone())?;
        trust.add_cert(unseen.clone())?;
        assert_eq!(trust.node_site("n2"), Some("s1"));
        trust.revoke(
            issuer.key(),
            Revocation {
                reason: "anchor taken over".into(),
                accepted: BTreeMap::new(),
                certified: vec![seen.key],
            },
        );
        assert!(trust.holds(&seen), "seen before the revocation: kept");
        assert!(
            trust.cert(&unseen.key).is_none(),
            "held, but not listed: dropped"
        );
        let e = trust.add_cert(later).expect_err("after the revocation");
        assert!(e.to_string().contains("revoked"), "{e}");
        let e = trust.add_cert(unseen).expect_err("again");
        assert!(e.to_string().contains("revoked"), "{e}");
        Ok(())
    }
}
