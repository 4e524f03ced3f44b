//! The sync engine: sans-IO, one per node.
//!
//! Inputs: a peer connected (with its certificate and the sync states saved
//! for it), disconnected, a frame received, a local edit, a tick. Outputs:
//! frames to send, changes to persist, sync states to save, documents that
//! changed, security events and peers to cut off. No sockets, no clock: the
//! driver (the mesh, or the simulator) owns both.
//!
//! Per (peer, document) the engine keeps an Automerge `sync::State` and runs
//! Automerge's own sync protocol, but never lets Automerge apply a change:
//! every change a sync message carries is taken out of it, verified with the
//! signatures of the frame (`verify_and_apply`) and applied by Shoal, and
//! only the rest of the message (heads, have, need) is given to Automerge.
//!
//! On connect both sides send a digest of the (document, heads) pairs both
//! should hold. Equal digests end the exchange: a reconnect where nothing
//! changed costs one small frame each way, whatever the number of documents.
//! Otherwise both send their heads per document and sync the ones that
//! differ.

use std::collections::{BTreeMap, HashMap, VecDeque};

use automerge::sync::{Capability, ChunkList, Message, MessageVersion, State, SyncDoc};
use automerge::{Automerge, Change, ChangeHash};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::signed::doc::{DocId, Document, SignedChange, decode_change};
use crate::signed::identity::{Certificate, Identity, PublicKey, Role};
use crate::signed::verify::{Trust, verify_and_apply_decoded};
use crate::signed::wire::Frame;

/// Engine settings.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// Largest frame sent or accepted. A larger backlog goes in several
    /// messages; a peer that sends a larger frame is cut off.
    pub max_frame: usize,
    /// A node rolls its own document to a new epoch (a fresh document
    /// seeded with its current report) once the current one holds this many
    /// changes; peers drop the old epoch when the new one reaches them.
    pub node_epoch_after: usize,
    /// On a tick, peers that heard no digest from us for this long get one:
    /// a cheap anti-entropy round (one 34-byte frame when nothing differs).
    pub reannounce_ms: u64,
}

/// Documents of at most this many changes are sent as their changes, never
/// as a whole saved document (see `Engine::generate`): a node's document
/// until it rolls to a new epoch (2,000 by default), and a young fleet. At
/// ~100–300 B a change that is at most ~600 KB in one go, far under a frame.
const CHANGES_NOT_WHOLE: usize = 2_000;

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            max_frame: 4 << 20,
            node_epoch_after: 2000,
            reannounce_ms: 60_000,
        }
    }
}

/// What happens to the engine.
#[derive(Clone, Debug)]
pub enum Input {
    /// A peer passed admission.
    Connected {
        /// Its key (also its peer id).
        peer: PublicKey,
        /// Its certificate.
        cert: Certificate,
        /// Sync states saved for it, per document.
        saved: Vec<(DocId, Vec<u8>)>,
    },
    /// The connection to a peer ended.
    Disconnected {
        /// The peer.
        peer: PublicKey,
    },
    /// A frame arrived from a peer.
    Received {
        /// The peer.
        peer: PublicKey,
        /// The frame bytes.
        frame: Vec<u8>,
    },
    /// Signed changes made on this node outside the engine (a local tool,
    /// the site API): verified, applied, persisted and sent on like any.
    Local {
        /// The document.
        doc: DocId,
        /// The changes.
        changes: Vec<SignedChange>,
    },
    /// Time passed (milliseconds on the driver's monotonic clock).
    Tick {
        /// Now.
        now_ms: u64,
    },
}

/// What the engine asks its driver to do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Send a frame to a peer.
    Send {
        /// The peer.
        peer: PublicKey,
        /// The frame.
        frame: Vec<u8>,
    },
    /// Persist changes now part of a document (before anything later is sent).
    Persist {
        /// The document.
        doc: DocId,
        /// The changes, in an order that applies.
        changes: Vec<(ChangeHash, SignedChange)>,
    },
    /// Save the sync state for (peer, document).
    SaveSyncState {
        /// The peer.
        peer: PublicKey,
        /// The document.
        doc: DocId,
        /// `automerge::sync::State::encode()`.
        state: Vec<u8>,
    },
    /// A document was superseded (an old node epoch): delete it from the store.
    Dropped {
        /// The document.
        doc: DocId,
    },
    /// A document's state changed (for reconcilers and UIs).
    Changed {
        /// The document.
        doc: DocId,
    },
    /// Something a peer sent was refused; nothing of it was applied.
    Security {
        /// The peer that sent it.
        peer: PublicKey,
        /// What was wrong.
        reason: String,
    },
    /// Cut the peer off (malformed or oversized frames, bad certificate).
    Disconnect {
        /// The peer.
        peer: PublicKey,
        /// Why.
        reason: String,
    },
}

struct Peer {
    cert: Certificate,
    states: HashMap<DocId, State>,
    /// When we last sent this peer a digest (driver's clock, ms).
    announced_ms: Option<u64>,
}

/// What [`Engine::submit`] took in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Submitted {
    /// Changes new to the document.
    pub applied: usize,
    /// Changes held back until changes they depend on arrive.
    pub waiting: usize,
}

/// The sync engine of one node.
pub struct Engine {
    me: Certificate,
    trust: Trust,
    docs: BTreeMap<DocId, Document>,
    sigs: HashMap<DocId, HashMap<ChangeHash, [u8; 64]>>,
    peers: BTreeMap<PublicKey, Peer>,
    /// Connected peers that are not nodes, and nodes by name: an anchor
    /// with 10,000 nodes finds who keeps a node's document without looking
    /// at every session.
    not_nodes: std::collections::BTreeSet<PublicKey>,
    nodes_by_name: HashMap<String, PublicKey>,
    out: VecDeque<Output>,
    config: SyncConfig,
    actor_seed: Option<u64>,
}

/// Whether the holder of `cert` keeps document `doc`: anchors and
/// operators keep everything; site engineers and nodes keep the fleet, their
/// site, and the node documents of their site (store-and-forward).
pub fn wants(trust: &Trust, cert: &Certificate, doc: &DocId) -> bool {
    match cert.role {
        Role::Anchor | Role::Operator => true,
        // An issuer's key is held by an anchor, never a peer of its own.
        Role::Issuer => false,
        Role::SiteEngineer | Role::Node => match doc {
            DocId::Fleet => true,
            DocId::Site(s) => cert.site.as_deref() == Some(s.as_str()),
            DocId::Node { name, .. } => {
                *name == cert.name
                    || (cert.site.is_some() && trust.node_site(name) == cert.site.as_deref())
            }
        },
    }
}

/// Whether `doc` goes only from `holder` to `other` on their session, never
/// back: a node keeps the documents of its site's other nodes to forward
/// them to an anchor (store-and-forward) and for site work while cut off,
/// but it hears them from those nodes, not from an anchor. Relayed by the
/// anchor, every report of a site reached every node of the site (site size²
/// verified changes per round of reports); ADR 0012.
pub fn upload_only(holder: &Certificate, other: &Certificate, doc: &DocId) -> bool {
    holder.role == Role::Node
        && other.role == Role::Anchor
        && matches!(doc, DocId::Node { name, .. } if *name != holder.name)
}

fn digest_of<'a>(pairs: impl Iterator<Item = (&'a DocId, Vec<ChangeHash>)>) -> ([u8; 32], u64) {
    let mut h = Sha256::new();
    let mut n = 0;
    for (id, mut heads) in pairs {
        heads.sort();
        h.update(id.to_string().as_bytes());
        h.update([0]);
        for head in heads {
            h.update(head.0);
        }
        h.update([0xff]);
        n += 1;
    }
    (h.finalize().into(), n)
}

impl Engine {
    /// An engine for the holder of `me`, with the documents it holds and
    /// the signatures of their changes (from the store).
    pub fn new(
        me: Certificate,
        trust: Trust,
        docs: Vec<(Document, HashMap<ChangeHash, [u8; 64]>)>,
        config: SyncConfig,
    ) -> Self {
        let mut engine = Engine {
            me,
            trust,
            docs: BTreeMap::new(),
            sigs: HashMap::new(),
            peers: BTreeMap::new(),
            not_nodes: Default::default(),
            nodes_by_name: HashMap::new(),
            out: VecDeque::new(),
            config,
            actor_seed: None,
        };
        for (doc, sigs) in docs {
            let id = doc.id().clone();
            if id == DocId::Fleet {
                engine.trust.absorb_fleet(&doc);
            }
            engine.sigs.insert(id.clone(), sigs);
            engine.docs.insert(id, doc);
        }
        engine
    }

    /// Derive actor ids from `seed` instead of the OS's randomness, so a
    /// simulation replays byte for byte. Give every engine start its own
    /// seed: an actor must never be reused.
    pub fn set_actor_seed(&mut self, seed: u64) {
        self.actor_seed = Some(seed);
    }

    /// The next thing for the driver to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// A document, if held.
    pub fn doc(&self, id: &DocId) -> Option<&Document> {
        self.docs.get(id)
    }

    /// Every document held.
    pub fn docs(&self) -> impl Iterator<Item = &Document> {
        self.docs.values()
    }

    /// The trust in force.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// Peers currently connected.
    pub fn peers(&self) -> impl Iterator<Item = &PublicKey> {
        self.peers.keys()
    }

    /// Feeds one input.
    pub fn handle(&mut self, input: Input) {
        match input {
            Input::Connected { peer, cert, saved } => self.connected(peer, cert, saved),
            Input::Disconnected { peer } => self.remove_peer(&peer),
            Input::Received { peer, frame } => self.received(peer, frame),
            Input::Local { doc, changes } => self.local(doc, changes),
            Input::Tick { now_ms } => self.tick(now_ms),
        }
    }

    fn local(&mut self, id: DocId, changes: Vec<SignedChange>) {
        if let Err(e) = self.submit(id.clone(), changes) {
            tracing::warn!(doc = %id, error = %e, "local changes refused");
        }
    }

    /// Verifies and applies signed changes made elsewhere (a bundle, a
    /// field engineer's laptop through the site API) and sends them on.
    /// A bad change refuses them all.
    pub fn submit(&mut self, id: DocId, changes: Vec<SignedChange>) -> Result<Submitted> {
        let decoded = crate::signed::verify::decode(&id, &changes)?;
        let s = self.ingest(&id, decoded)?;
        if s.applied > 0 {
            self.changed(&id, None);
        }
        Ok(s)
    }

    /// Adds certificates (those an offline bundle carries) after checking
    /// the root's signature on each; returns those refused.
    pub fn add_certs(&mut self, certs: Vec<Certificate>) -> Vec<crate::Error> {
        certs
            .into_iter()
            .filter_map(|c| self.trust.add_cert(c).err())
            .collect()
    }

    /// Verifies and applies signed changes to a document, remembers their
    /// signatures and asks the driver to persist them.
    fn ingest(&mut self, id: &DocId, changes: Vec<(Change, [u8; 64])>) -> Result<Submitted> {
        let doc = self
            .docs
            .entry(id.clone())
            .or_insert_with(|| Document::new(id.clone()));
        let (applied, waiting) = verify_and_apply_decoded(&self.trust, doc, changes)?;
        let s = Submitted {
            applied: applied.len(),
            waiting,
        };
        if !applied.is_empty() {
            self.record(id, applied);
        }
        Ok(s)
    }

    /// Remembers the signatures of changes now in a document and asks the
    /// driver to persist them.
    fn record(&mut self, id: &DocId, applied: Vec<(ChangeHash, SignedChange)>) {
        let table = self.sigs.entry(id.clone()).or_default();
        for (h, sc) in &applied {
            table.insert(*h, sc.signature);
        }
        self.out.push_back(Output::Persist {
            doc: id.clone(),
            changes: applied,
        });
    }

    fn tick(&mut self, now_ms: u64) {
        let due: Vec<PublicKey> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.announced_ms
                    .is_none_or(|t| now_ms.saturating_sub(t) >= self.config.reannounce_ms)
            })
            .map(|(k, _)| *k)
            .collect();
        for peer in due {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.announced_ms = Some(now_ms);
            }
            self.announce(peer);
        }
    }

    fn announce(&mut self, peer: PublicKey) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        let docs = self.shared_docs(p);
        let (digest, n) = digest_of(
            docs.iter()
                .filter_map(|id| self.docs.get(id).map(|d| (id, d.heads()))),
        );
        self.send(peer, Frame::Digest { digest, docs: n });
    }

    /// Makes a signed change to `doc` as `writer` and sends it to every
    /// connected peer that keeps the document.
    pub fn edit(
        &mut self,
        doc: &DocId,
        writer: &Identity,
        now: i64,
        ops: &BTreeMap<String, Option<String>>,
    ) -> Result<Option<ChangeHash>> {
        Ok(self
            .edit_with_message(doc, writer, now, ops, None)?
            .map(|(h, _)| h))
    }

    /// [`Engine::edit`] recording `message` in the change (who asked a
    /// service to write it); also returns how many fields it wrote.
    pub fn edit_with_message(
        &mut self,
        doc: &DocId,
        writer: &Identity,
        now: i64,
        ops: &BTreeMap<String, Option<String>>,
        message: Option<&str>,
    ) -> Result<Option<(ChangeHash, usize)>> {
        if !writer.cert.may_write(doc) {
            return Err(Error::NotAllowed(format!(
                "{} ({}) may not write {doc}",
                writer.cert.name, writer.cert.role
            )));
        }
        let d = self
            .docs
            .entry(doc.clone())
            .or_insert_with(|| Document::new(doc.clone()));
        let actor = self.actor_seed.map(|seed| {
            let mut h = Sha256::new();
            h.update(seed.to_be_bytes());
            h.update(doc.to_string().as_bytes());
            h.update(writer.key().0);
            let full: [u8; 32] = h.finalize().into();
            let mut a = [0u8; 16];
            a.copy_from_slice(&full[..16]);
            a
        });
        let Some((hash, change, fields)) = d.edit_with(writer, now, ops, actor, message)? else {
            return Ok(None);
        };
        self.record(doc, vec![(hash, change)]);
        self.changed(doc, None);
        if let DocId::Node { name, epoch } = doc
            && *name == writer.cert.name
            && self.sigs.get(doc).map_or(0, HashMap::len) >= self.config.node_epoch_after
        {
            self.roll_epoch(doc, name, *epoch, writer, now)?;
        }
        Ok(Some((hash, fields)))
    }

    /// Starts `node/<name>/<epoch+1>` with the current fields of the old
    /// epoch, then drops the old one.
    fn roll_epoch(
        &mut self,
        old: &DocId,
        name: &str,
        epoch: u32,
        writer: &Identity,
        now: i64,
    ) -> Result<()> {
        let Some(current) = self.docs.get(old) else {
            return Ok(());
        };
        let seed: BTreeMap<String, Option<String>> = current
            .fields("")
            .into_iter()
            .map(|(k, v)| (k, Some(v)))
            .collect();
        let next = DocId::Node {
            name: name.to_string(),
            epoch: epoch + 1,
        };
        self.edit(&next, writer, now, &seed)?;
        self.drop_older(&next);
        Ok(())
    }

    /// Drops node documents of the same node with an older epoch.
    fn drop_older(&mut self, newer: &DocId) {
        let DocId::Node { name, epoch } = newer else {
            return;
        };
        let lo = DocId::Node {
            name: name.clone(),
            epoch: 0,
        };
        let hi = DocId::Node {
            name: name.clone(),
            epoch: *epoch,
        };
        let old: Vec<DocId> = self.docs.range(lo..hi).map(|(d, _)| d.clone()).collect();
        for d in old {
            self.docs.remove(&d);
            self.sigs.remove(&d);
            for p in self.peers.values_mut() {
                p.states.remove(&d);
            }
            self.out.push_back(Output::Dropped { doc: d });
        }
    }

    /// Whether a newer epoch of this node document is held.
    fn superseded(&self, doc: &DocId) -> bool {
        let DocId::Node { name, epoch } = doc else {
            return false;
        };
        let Some(next) = epoch.checked_add(1) else {
            return false;
        };
        let lo = DocId::Node {
            name: name.clone(),
            epoch: next,
        };
        let hi = DocId::Node {
            name: name.clone(),
            epoch: u32::MAX,
        };
        self.docs.range(lo..=hi).next().is_some()
    }

    fn changed(&mut self, doc: &DocId, except: Option<PublicKey>) {
        if *doc == DocId::Fleet
            && let Some(fleet) = self.docs.get(doc)
        {
            self.trust.absorb_fleet(fleet);
        }
        self.out.push_back(Output::Changed { doc: doc.clone() });
        let keeps = |k: &PublicKey, p: &Peer| {
            Some(*k) != except
                && wants(&self.trust, &p.cert, doc)
                && !upload_only(&p.cert, &self.me, doc)
        };
        let peers: Vec<PublicKey> = match doc {
            // At an anchor a node's document concerns only that node and
            // the peers that are not nodes (its site's other nodes only
            // upload it): found by index, not by a walk over every session.
            DocId::Node { name, .. } if self.me.role == Role::Anchor => self
                .not_nodes
                .iter()
                .chain(self.nodes_by_name.get(name))
                .filter(|k| self.peers.get(k).is_some_and(|p| keeps(k, p)))
                .copied()
                .collect(),
            _ => self
                .peers
                .iter()
                .filter(|(k, p)| keeps(k, p))
                .map(|(k, _)| *k)
                .collect(),
        };
        for p in peers {
            self.generate(p, doc);
        }
    }

    fn cut_off(&mut self, peer: PublicKey, reason: String) {
        self.out.push_back(Output::Security {
            peer,
            reason: reason.clone(),
        });
        self.out.push_back(Output::Disconnect { peer, reason });
        self.remove_peer(&peer);
    }

    fn remove_peer(&mut self, peer: &PublicKey) {
        if let Some(p) = self.peers.remove(peer) {
            self.not_nodes.remove(peer);
            if self.nodes_by_name.get(&p.cert.name) == Some(peer) {
                self.nodes_by_name.remove(&p.cert.name);
            }
        }
    }

    /// The documents both sides sync both ways: announced in digests and
    /// compared by heads. Upload-only documents are not among them: they
    /// are offered when they change and when the session opens.
    fn shared_docs(&self, peer: &Peer) -> Vec<DocId> {
        if self.me.role == Role::Anchor && peer.cert.role == Role::Node {
            // The fleet, its site and its own documents: not a walk over
            // every node's document.
            let own = DocId::Node {
                name: peer.cert.name.clone(),
                epoch: 0,
            }..=DocId::Node {
                name: peer.cert.name.clone(),
                epoch: u32::MAX,
            };
            let site = peer.cert.site.clone().map(DocId::Site);
            return [Some(DocId::Fleet), site]
                .into_iter()
                .flatten()
                .filter(|id| self.docs.contains_key(id))
                .chain(self.docs.range(own).map(|(id, _)| id.clone()))
                .collect();
        }
        self.docs
            .keys()
            .filter(|id| {
                wants(&self.trust, &peer.cert, id)
                    && !upload_only(&self.me, &peer.cert, id)
                    && !upload_only(&peer.cert, &self.me, id)
            })
            .cloned()
            .collect()
    }

    fn connected(&mut self, peer: PublicKey, cert: Certificate, saved: Vec<(DocId, Vec<u8>)>) {
        if cert.key != peer {
            return self.cut_off(peer, "certificate is for another key".into());
        }
        if let Err(e) = self.trust.add_cert(cert.clone()) {
            return self.cut_off(peer, e.to_string());
        }
        if self.trust.is_revoked(&peer) {
            return self.cut_off(peer, format!("{} is revoked", cert.name));
        }
        let mut states = HashMap::new();
        for (doc, bytes) in saved {
            if let Ok(s) = State::decode(&bytes) {
                states.insert(doc, s);
            }
        }
        let p = Peer {
            cert,
            states,
            announced_ms: None,
        };
        let uploads: Vec<DocId> = self
            .docs
            .keys()
            .filter(|id| upload_only(&self.me, &p.cert, id))
            .cloned()
            .collect();
        if p.cert.role == Role::Node {
            self.nodes_by_name.insert(p.cert.name.clone(), peer);
        } else {
            self.not_nodes.insert(peer);
        }
        self.peers.insert(peer, p);
        self.announce(peer);
        for id in uploads {
            self.generate(peer, &id);
        }
    }

    fn send(&mut self, peer: PublicKey, frame: Frame) {
        self.out.push_back(Output::Send {
            peer,
            frame: frame.encode(),
        });
    }

    fn received(&mut self, peer: PublicKey, bytes: Vec<u8>) {
        if !self.peers.contains_key(&peer) {
            return self.cut_off(peer, "frame from a peer that was not admitted".into());
        }
        if bytes.len() > self.config.max_frame {
            return self.cut_off(
                peer,
                format!(
                    "frame of {} bytes exceeds the limit of {}",
                    bytes.len(),
                    self.config.max_frame
                ),
            );
        }
        let frame = match Frame::decode(&bytes) {
            Ok(f) => f,
            Err(e) => return self.cut_off(peer, e.to_string()),
        };
        match frame {
            Frame::Digest { digest, docs } => {
                let Some(p) = self.peers.get(&peer) else {
                    return;
                };
                let ids = self.shared_docs(p);
                let (mine, n) = digest_of(
                    ids.iter()
                        .filter_map(|id| self.docs.get(id).map(|d| (id, d.heads()))),
                );
                if mine != digest || n != docs {
                    let heads = ids
                        .iter()
                        .filter_map(|id| self.docs.get(id).map(|d| (id.clone(), d.heads())))
                        .collect();
                    self.send(peer, Frame::Heads(heads));
                }
            }
            Frame::Heads(entries) => {
                let Some(p) = self.peers.get(&peer) else {
                    return;
                };
                let mut to_sync: Vec<DocId> = Vec::new();
                let theirs: HashMap<&DocId, &Vec<ChangeHash>> =
                    entries.iter().map(|(d, h)| (d, h)).collect();
                for id in self.shared_docs(p) {
                    let mut mine = self.docs.get(&id).map(|d| d.heads()).unwrap_or_default();
                    mine.sort();
                    let mut other = theirs.get(&id).map(|h| (*h).clone()).unwrap_or_default();
                    other.sort();
                    if mine != other {
                        to_sync.push(id);
                    }
                }
                for (id, _) in &entries {
                    if !self.docs.contains_key(id)
                        && wants(&self.trust, &self.me, id)
                        && !self.superseded(id)
                    {
                        self.docs.insert(id.clone(), Document::new(id.clone()));
                        to_sync.push(id.clone());
                    }
                }
                // One side opens each document's sync (the smaller key); the
                // other answers. Both opening would run two exchanges side
                // by side and send every change twice.
                if self.me.key < peer {
                    for id in to_sync {
                        self.generate(peer, &id);
                    }
                }
            }
            Frame::Sync { doc, msg, sigs } => self.sync_message(peer, doc, msg, sigs),
        }
    }

    fn sync_message(&mut self, peer: PublicKey, id: DocId, msg: Vec<u8>, sigs: Vec<[u8; 64]>) {
        if !wants(&self.trust, &self.me, &id) {
            self.out.push_back(Output::Security {
                peer,
                reason: format!("sent {id}, which this node does not keep"),
            });
            return;
        }
        if self.superseded(&id) {
            return; // an old epoch a peer has not dropped yet
        }
        let message = match crate::panics::catch(|| Message::decode(&msg)) {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                return self.cut_off(peer, format!("malformed sync message for {id}: {e}"));
            }
            Err(_) => return self.cut_off(peer, format!("malformed sync message for {id}")),
        };
        let changes = match carried_changes(&message.changes) {
            Ok(c) => c,
            Err(e) => return self.cut_off(peer, format!("sync message for {id}: {e}")),
        };
        let mut applied_any = false;
        let carried = !changes.is_empty();
        if !changes.is_empty() || !sigs.is_empty() {
            if changes.len() != sigs.len() {
                self.out.push_back(Output::Security {
                    peer,
                    reason: format!(
                        "sync message for {id} carries {} changes and {} signatures; dropped",
                        changes.len(),
                        sigs.len()
                    ),
                });
                return;
            }
            let mut by_hash: Vec<Change> = changes;
            by_hash.sort_by_key(|c| c.hash());
            let signed: Vec<(Change, [u8; 64])> = by_hash.into_iter().zip(sigs).collect();
            match self.ingest(&id, signed) {
                Ok(s) => applied_any = s.applied > 0,
                Err(e) => {
                    self.out.push_back(Output::Security {
                        peer,
                        reason: format!("dropped a sync message: {e}"),
                    });
                    return;
                }
            }
        }
        // Let Automerge track heads, have and need; the changes are ours.
        let mut rest = message;
        rest.changes = ChunkList::empty();
        let doc = self
            .docs
            .entry(id.clone())
            .or_insert_with(|| Document::new(id.clone()));
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let state = p.states.entry(id.clone()).or_default();
        one_way(state, &self.me, &p.cert, &id);
        let before = state.shared_heads.clone();
        let last_sent = state.last_sent_heads.clone();
        let received = doc.receive_sync(state, rest);
        if carried {
            // Automerge took the message for one without changes that
            // found us at its heads already (we applied them first), and
            // would then never acknowledge them. Keep what we last sent.
            state.last_sent_heads = last_sent;
        }
        if received.is_err() {
            return self.cut_off(
                peer,
                format!("sync message for {id} could not be processed"),
            );
        }
        if state.shared_heads != before {
            let encoded = state.encode();
            self.out.push_back(Output::SaveSyncState {
                peer,
                doc: id.clone(),
                state: encoded,
            });
        }
        if applied_any {
            self.changed(&id, Some(peer));
            self.drop_older(&id);
        }
        self.generate(peer, &id);
    }

    /// Generates and sends the next sync message for (peer, doc), if any,
    /// within the frame limit.
    fn generate(&mut self, peer: PublicKey, id: &DocId) {
        let Some(doc) = self.docs.get(id) else { return };
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let state = p.states.entry(id.clone()).or_default();
        one_way(state, &self.me, &p.cert, id);
        // Automerge asks only for what it knows is missing; changes we hold
        // back (their dependencies have not arrived) are invisible to it, so
        // ask for their missing dependencies ourselves. Without this, a
        // bloom-filter false positive that hid such a dependency from the
        // sender would stall the sync for good.
        let extra_need = doc.pending_missing_deps();
        // Automerge sends a whole saved document when the peer holds none of
        // it or lacks more than a third of it. For a small document that
        // costs more than it saves: a save (and deflate) here, and a load
        // into a scratch document on each side to list the changes for their
        // signatures. A node's report going to its site peers is that case,
        // once per report per peer. So small documents go as their changes.
        let small = self.sigs.get(id).map_or(0, HashMap::len) <= CHANGES_NOT_WHOLE;
        let caps = state.their_capabilities.clone();
        if small && let Some(c) = state.their_capabilities.as_mut() {
            c.retain(|c| *c != Capability::MessageV2);
        }
        // Held to the end: no other read of `doc` below (its lock).
        let am = doc.automerge();
        let msg = am.generate_sync_message(state);
        state.their_capabilities = caps;
        let Some(mut msg) = msg else {
            return;
        };
        if !extra_need.is_empty() {
            msg.need.extend(extra_need);
            msg.need.sort();
            msg.need.dedup();
        }
        let sig_table = self.sigs.get(id);
        let budget = self.config.max_frame.saturating_sub(1024);
        let mut changes: Vec<Change> = carried_changes(&msg.changes).unwrap_or_default();
        let carried_size: usize =
            msg.changes.iter().map(<[u8]>::len).sum::<usize>() + changes.len() * 64;
        if msg.version == MessageVersion::V2 && carried_size > budget {
            // Too big as one document: send change chunks, as many as fit.
            // Only what the peer lacks: everything after the heads it
            // announced (those we know).
            let theirs: Vec<ChangeHash> = state
                .their_heads
                .iter()
                .flatten()
                .filter(|h| am.get_change_meta_by_hash(h).is_some())
                .copied()
                .collect();
            changes = am.get_changes(&theirs);
            msg.version = MessageVersion::V1;
            msg.changes = ChunkList::from(
                changes
                    .iter()
                    .map(|c| c.raw_bytes().to_vec())
                    .collect::<Vec<_>>(),
            );
        }
        if msg.version == MessageVersion::V1 {
            let mut kept = Vec::new();
            let mut size = 0;
            for c in changes {
                let sz = c.raw_bytes().len() + 64 + 8;
                if size + sz > budget && !kept.is_empty() {
                    // Not sent this time: Automerge must offer it again.
                    state.sent_hashes.remove(&c.hash());
                    continue;
                }
                size += sz;
                kept.push(c);
            }
            msg.changes = ChunkList::from(
                kept.iter()
                    .map(|c| c.raw_bytes().to_vec())
                    .collect::<Vec<_>>(),
            );
            changes = kept;
        }
        let mut hashes: Vec<ChangeHash> = changes.iter().map(|c| c.hash()).collect();
        hashes.sort();
        let mut sigs = Vec::with_capacity(hashes.len());
        for h in &hashes {
            match sig_table.and_then(|t| t.get(h)) {
                Some(s) => sigs.push(*s),
                None => {
                    tracing::error!(doc = %id, change = %h, "no signature for a change to send");
                    state.sent_hashes.remove(h);
                    return;
                }
            }
        }
        let frame = Frame::Sync {
            doc: id.clone(),
            msg: msg.encode(),
            sigs,
        };
        drop(am);
        self.send(peer, frame);
    }
}

/// Sets Automerge's read-only flags on an upload-only document's sync state
/// (they are not saved with it): the uploader asks for nothing and takes in
/// nothing, the anchor sends no changes even before it heard the flag.
fn one_way(state: &mut State, me: &Certificate, peer: &Certificate, id: &DocId) {
    if upload_only(me, peer, id) {
        state.set_read_only(true);
    } else if upload_only(peer, me, id) {
        state.peer_read_only = true;
    }
}

/// The changes a sync message carries: change chunks, several change
/// chunks concatenated (Automerge's V2 form for changes), or a whole
/// document (V2, loaded into a scratch document to list its changes).
fn carried_changes(chunks: &ChunkList) -> std::result::Result<Vec<Change>, String> {
    let mut out = Vec::new();
    for chunk in chunks.iter() {
        if chunk.len() > 8 && chunk[8] == 0 {
            let bytes = chunk.to_vec();
            let scratch = match crate::panics::catch(move || Automerge::load(&bytes)) {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => return Err(format!("whole-document chunk: {e}")),
                Err(_) => return Err("whole-document chunk: the decoder failed on it".into()),
            };
            out.extend(scratch.get_changes(&[]));
            continue;
        }
        for piece in split_chunks(chunk)? {
            out.push(decode_change(piece)?);
        }
    }
    Ok(out)
}

/// Splits concatenated Automerge chunks (magic, checksum, type, LEB128
/// length, body) without trusting any length beyond the buffer.
fn split_chunks(data: &[u8]) -> std::result::Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let header = data
            .get(pos..pos + 9)
            .ok_or_else(|| format!("truncated chunk header at byte {pos}"))?;
        if header[..4] != [0x85, 0x6f, 0x4a, 0x83] {
            return Err(format!("no chunk magic at byte {pos}"));
        }
        let mut len: u64 = 0;
        let mut i = pos + 9;
        let mut shift = 0;
        loop {
            let b = *data.get(i).ok_or("truncated chunk length")?;
            i += 1;
            len |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 56 {
                return Err("chunk length too long".into());
            }
        }
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| i.checked_add(l))
            .filter(|e| *e <= data.len())
            .ok_or_else(|| format!("chunk at byte {pos} runs past the message"))?;
        out.push(&data[pos..end]);
        pos = end;
    }
    Ok(out)
}
