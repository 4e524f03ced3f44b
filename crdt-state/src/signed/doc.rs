//! Signed Automerge documents with a flat key space.
//!
//! Every Shoal document is one Automerge map whose keys are dotted paths
//! (`apps.inspect.native.command`) and whose values are JSON texts. Keeping
//! the map flat makes every field its own last-writer-wins register, so two
//! writers that touch different fields of the same object both survive a
//! merge, and only writes to the same field conflict (see
//! `docs/adr/0001-flat-documents.md`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    ActorId, Author, Automerge, Change, ChangeHash, ROOT, ReadDoc, ScalarValueRef, ValueRef,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::signed::identity::{Identity, PublicKey};

/// Domain separator for change signatures.
const CHANGE_DOMAIN: &[u8] = b"shoal/change/v1\0";

/// Which document: the unit of authority.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DocId {
    /// The fleet document, written by operators.
    Fleet,
    /// A site document (`site/<site>`), written by operators and that site's engineers.
    Site(String),
    /// A node's own report document (`node/<name>/<epoch>`).
    Node {
        /// The node name.
        name: String,
        /// The epoch: a node document rolls to a new epoch when its history grows.
        epoch: u32,
    },
}

impl DocId {
    /// Parses `fleet`, `site/<s>` or `node/<n>/<epoch>`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::NotFound(format!("document id {s:?}: {why}"));
        let mut parts = s.split('/');
        let id = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("fleet"), None, None, None) => DocId::Fleet,
            (Some("site"), Some(site), None, None) => {
                crate::fleet::model::validate_name("site", site).map_err(|e| bad(&e))?;
                DocId::Site(site.to_string())
            }
            (Some("node"), Some(name), Some(epoch), None) => {
                crate::fleet::model::validate_name("node", name).map_err(|e| bad(&e))?;
                let epoch = epoch.parse().map_err(|_| bad("epoch is not a number"))?;
                DocId::Node {
                    name: name.to_string(),
                    epoch,
                }
            }
            _ => return Err(bad("expected fleet, site/<site> or node/<name>/<epoch>")),
        };
        Ok(id)
    }

    /// Order in which documents must be verified: the fleet document first,
    /// since it holds the certificates and revocations the others need.
    pub fn rank(&self) -> u8 {
        match self {
            DocId::Fleet => 0,
            DocId::Site(_) => 1,
            DocId::Node { .. } => 2,
        }
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DocId::Fleet => f.write_str("fleet"),
            DocId::Site(s) => write!(f, "site/{s}"),
            DocId::Node { name, epoch } => write!(f, "node/{name}/{epoch}"),
        }
    }
}

/// A change in Automerge's binary form with its writer's signature.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedChange {
    /// The raw change chunk.
    pub bytes: Vec<u8>,
    /// Ed25519 signature over [`signing_message`] of the change hash.
    pub signature: [u8; 64],
}

impl fmt::Debug for SignedChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignedChange({} bytes)", self.bytes.len())
    }
}

/// The bytes a writer signs for a change: domain, document id, change hash.
pub fn signing_message(doc: &DocId, hash: &ChangeHash) -> Vec<u8> {
    let id = doc.to_string();
    let mut m = Vec::with_capacity(CHANGE_DOMAIN.len() + id.len() + 1 + 32);
    m.extend_from_slice(CHANGE_DOMAIN);
    m.extend_from_slice(id.as_bytes());
    m.push(0);
    m.extend_from_slice(&hash.0);
    m
}

/// Automerge's chunk magic.
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// Decodes one change from bytes that may come from anywhere. Only change
/// chunks (plain or compressed) are accepted, and a panic inside Automerge's
/// decoder (it has panicked on crafted input) becomes an error.
pub fn decode_change(bytes: &[u8]) -> std::result::Result<Change, String> {
    if bytes.len() < 9 || bytes[..4] != CHUNK_MAGIC {
        return Err("not an automerge chunk".into());
    }
    if !matches!(bytes[8], 1 | 2) {
        return Err(format!("chunk type {} is not a change", bytes[8]));
    }
    let owned = bytes.to_vec();
    match crate::panics::catch(move || Change::from_bytes(owned)) {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("malformed change: the decoder failed on it".into()),
    }
}

/// One value of a field, with who wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldValue {
    /// The value as JSON text.
    pub value: String,
    /// The writer's public key, when known.
    pub writer: Option<PublicKey>,
    /// Whether this is the value readers see.
    pub winner: bool,
    /// The message of the change that wrote it (who asked, when a service
    /// signed it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One change of a document, for people (`shoal get changes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeMeta {
    /// The change.
    pub hash: ChangeHash,
    /// The key that signed it (through its actor's first change).
    pub writer: Option<PublicKey>,
    /// Seconds since the epoch on the writer's clock (never trusted).
    pub time: i64,
    /// Operations in it.
    pub ops: u64,
    /// Who asked for it, when a service signed it.
    pub message: Option<String>,
}

/// The Automerge state of a document. Copies of a [`Document`] share it
/// until one of them changes it (copy on write): the simulator's thousands
/// of cores in one process hold one fleet document, not thousands
/// (docs/adr/0016-documents-shared-copy-on-write.md). A daemon's documents
/// are never copied, so there it is the one owner's and is never cloned.
///
/// The lock is there because Automerge's `receive_sync_message` takes
/// `&mut` even for a message that carries no changes, which changes
/// nothing in the document; [`Document::receive_sync`] is that call, on a
/// shared state, under the lock.
struct Shared(Mutex<Automerge>);

impl Shared {
    fn new(doc: Automerge) -> Arc<Shared> {
        Arc::new(Shared(Mutex::new(doc)))
    }

    fn lock(&self) -> MutexGuard<'_, Automerge> {
        // A panic inside Automerge while the lock was held is caught where
        // it happens (`panics::catch`), and the document dropped there.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Clone for Shared {
    /// A copy for one [`Document`] to change (`Arc::make_mut`); the
    /// document then writes as a fresh actor (see [`Document::am_mut`]).
    fn clone(&self) -> Self {
        Shared(Mutex::new(self.lock().clone()))
    }
}

/// Read access to a document's Automerge state (held under its lock).
pub struct AutomergeRef<'a>(MutexGuard<'a, Automerge>);

impl Deref for AutomergeRef<'_> {
    type Target = Automerge;
    fn deref(&self) -> &Automerge {
        &self.0
    }
}

/// Results of applying changes, shared between the documents of one
/// process when [`share_applied`] is on: the state a set of changes makes
/// from a state with given heads is the same wherever it is computed
/// (Automerge's state is a function of the changes it holds, and heads
/// name that set), so the second document to take the same changes at the
/// same heads takes the first one's result instead of applying them again.
/// Off (the default) in daemons; the simulator turns it on.
static SHARING: AtomicBool = AtomicBool::new(false);

type AppliedKey = (Vec<ChangeHash>, Vec<ChangeHash>);

struct Applied {
    results: HashMap<AppliedKey, Weak<Shared>>,
    since_sweep: usize,
}

static APPLIED: Mutex<Option<Applied>> = Mutex::new(None);

/// Turns on (or off) sharing of applied changes between this process's
/// documents (see [`Document`]): for a process that holds many copies of
/// the same documents, the simulator.
pub fn share_applied(on: bool) {
    SHARING.store(on, Ordering::Relaxed);
    let mut memo = APPLIED.lock().unwrap_or_else(PoisonError::into_inner);
    if !on {
        *memo = None;
    } else if memo.is_none() {
        *memo = Some(Applied {
            results: HashMap::new(),
            since_sweep: 0,
        });
    }
}

fn applied_key(before: Vec<ChangeHash>, changes: &[Change]) -> AppliedKey {
    let mut before = before;
    before.sort();
    let mut hashes: Vec<ChangeHash> = changes.iter().map(Change::hash).collect();
    hashes.sort();
    (before, hashes)
}

fn applied_get(key: &AppliedKey) -> Option<Arc<Shared>> {
    let memo = APPLIED.lock().unwrap_or_else(PoisonError::into_inner);
    memo.as_ref()?.results.get(key)?.upgrade()
}

fn applied_put(key: AppliedKey, state: &Arc<Shared>) {
    let mut memo = APPLIED.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(m) = memo.as_mut() else { return };
    m.results.insert(key, Arc::downgrade(state));
    m.since_sweep += 1;
    // Results no document holds any more are forgotten now and then: the
    // table stays about as large as the states alive.
    if m.since_sweep > 4096 && m.since_sweep > m.results.len() {
        m.results.retain(|_, w| w.strong_count() > 0);
        m.since_sweep = 0;
    }
}

/// The key bound to an actor through its first (authored) change.
fn actor_key_in(am: &Automerge, actor: &ActorId) -> Option<PublicKey> {
    let author = am.get_author_for_actor(actor)?;
    PublicKey::from_slice(author.as_bytes()).ok()
}

/// A signed Automerge document.
pub struct Document {
    id: DocId,
    doc: Arc<Shared>,
    writer: Option<PublicKey>,
    /// Changes received before their dependencies (not verified yet).
    pending: Vec<(Change, [u8; 64])>,
}

impl fmt::Debug for Document {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Document").field("id", &self.id).finish()
    }
}

impl Clone for Document {
    /// A copy that shares the Automerge state until one side changes it.
    fn clone(&self) -> Self {
        Document {
            id: self.id.clone(),
            doc: self.doc.clone(),
            // The copy's first write sets its own actor.
            writer: None,
            pending: self.pending.clone(),
        }
    }
}

impl Document {
    /// A new, empty document.
    pub fn new(id: DocId) -> Self {
        Document {
            id,
            doc: Shared::new(Automerge::new()),
            writer: None,
            pending: Vec::new(),
        }
    }

    /// Loads a saved document (from this node's own store: trusted, already verified).
    pub fn load(id: DocId, bytes: &[u8]) -> Result<Self> {
        let doc = Automerge::load_unverified_heads(bytes).map_err(|e| Error::CorruptDocument {
            doc: id.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Document {
            id,
            doc: Shared::new(doc),
            writer: None,
            pending: Vec::new(),
        })
    }

    /// The document id.
    pub fn id(&self) -> &DocId {
        &self.id
    }

    /// The whole document in Automerge's compressed form.
    pub fn save(&self) -> Vec<u8> {
        self.am().save()
    }

    /// The current heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.am().get_heads()
    }

    /// Read access to the Automerge document.
    pub fn automerge(&self) -> AutomergeRef<'_> {
        AutomergeRef(self.am())
    }

    /// Whether this copy and `other` hold one shared Automerge state (see
    /// [`share_applied`]).
    pub fn shares_state_with(&self, other: &Document) -> bool {
        Arc::ptr_eq(&self.doc, &other.doc)
    }

    fn am(&self) -> MutexGuard<'_, Automerge> {
        self.doc.lock()
    }

    /// Makes the Automerge state this copy's own: copied first if another
    /// copy (or the table of shared results) holds it. Such a state carries
    /// the other copy's actor, so this copy's next write takes a fresh
    /// actor: `writer` is forgotten.
    fn make_own(&mut self) {
        if Arc::get_mut(&mut self.doc).is_none() {
            self.writer = None;
            Arc::make_mut(&mut self.doc);
        }
    }

    /// The Automerge state to change ([`Document::make_own`] first).
    fn am_mut(&mut self) -> &mut Automerge {
        self.make_own();
        let shared = Arc::make_mut(&mut self.doc);
        shared.0.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    /// Automerge's bookkeeping of a peer's sync message that carries no
    /// changes (the engine applies changes itself, after verifying them):
    /// heads, have and need go into `state`; the document is not changed,
    /// so this is done on a state other copies share.
    pub(crate) fn receive_sync(
        &self,
        state: &mut automerge::sync::State,
        message: automerge::sync::Message,
    ) -> Result<()> {
        if !message.changes.is_empty() {
            return Err(Error::CorruptDocument {
                doc: self.id.to_string(),
                reason: "a sync message with changes reached the bookkeeping".into(),
            });
        }
        let mut am = self.am();
        let doc: &mut Automerge = am.deref_mut();
        match crate::panics::catch(|| {
            automerge::sync::SyncDoc::receive_sync_message(doc, state, message)
        }) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(Error::CorruptDocument {
                doc: self.id.to_string(),
                reason: "automerge failed reading a sync message".into(),
            }),
        }
    }

    /// Whether the document holds the change with this hash.
    pub fn has_change(&self, hash: &ChangeHash) -> bool {
        self.am().get_change_meta_by_hash(hash).is_some()
    }

    /// Every change (for export), in causal order.
    pub fn changes(&self) -> Vec<Change> {
        self.am().get_changes(&[])
    }

    /// Every change's metadata, in causal order: hash, writer key, time
    /// (the writer's clock, informational), number of operations, message.
    pub fn history(&self) -> Vec<ChangeMeta> {
        let am = self.am();
        am.get_changes_meta(&[])
            .into_iter()
            .map(|m| ChangeMeta {
                hash: m.hash,
                writer: actor_key_in(&am, &m.actor),
                time: m.timestamp,
                ops: (m.max_op + 1).saturating_sub(m.start_op),
                message: m.message.map(|s| s.into_owned()),
            })
            .collect()
    }

    /// The key bound to an actor through its first (authored) change.
    pub fn actor_key(&self, actor: &ActorId) -> Option<PublicKey> {
        actor_key_in(&self.am(), actor)
    }

    /// Applies changes that have already been verified and whose
    /// dependencies are present.
    pub(crate) fn apply_verified(&mut self, changes: Vec<Change>) -> Result<()> {
        let key = SHARING
            .load(Ordering::Relaxed)
            .then(|| applied_key(self.heads(), &changes));
        if let Some(k) = &key
            && let Some(state) = applied_get(k)
        {
            self.doc = state;
            // Another copy's state: this one's next write sets its actor.
            self.writer = None;
            return Ok(());
        }
        let doc = self.am_mut();
        let r = match crate::panics::catch(|| doc.apply_changes(changes)) {
            Ok(r) => Ok(r?),
            // The document may be half-updated: callers drop it (nothing was
            // stored) and load it again from the store.
            Err(_) => Err(Error::CorruptDocument {
                doc: self.id.to_string(),
                reason: "automerge failed applying verified changes".into(),
            }),
        };
        if r.is_ok()
            && let Some(k) = key
        {
            applied_put(k, &self.doc);
        }
        r
    }

    /// Changes held back for missing dependencies.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Dependencies of held-back changes that are neither in the document
    /// nor held back: what to ask peers for.
    pub fn pending_missing_deps(&self) -> Vec<ChangeHash> {
        let held: std::collections::HashSet<ChangeHash> =
            self.pending.iter().map(|(c, _)| c.hash()).collect();
        let mut out: Vec<ChangeHash> = self
            .pending
            .iter()
            .flat_map(|(c, _)| c.deps().iter().copied())
            .filter(|d| !held.contains(d) && !self.has_change(d))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    pub(crate) fn take_pending(&mut self) -> Vec<(Change, [u8; 64])> {
        std::mem::take(&mut self.pending)
    }

    pub(crate) fn set_pending(&mut self, mut pending: Vec<(Change, [u8; 64])>) {
        if pending.len() > crate::signed::verify::MAX_PENDING {
            let excess = pending.len() - crate::signed::verify::MAX_PENDING;
            tracing::warn!(doc = %self.id, dropped = excess, "too many changes wait for dependencies");
            pending.drain(..excess);
        }
        self.pending = pending;
    }

    /// The value of one field, decoded from JSON.
    pub fn get(&self, key: &str) -> Option<serde_json::Value> {
        serde_json::from_str(&self.raw(key)?).ok()
    }

    /// Every field whose key starts with `prefix`, as raw JSON texts.
    pub fn fields(&self, prefix: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let am = self.am();
        let range = am.map_range(ROOT, prefix.to_string()..);
        for item in range {
            if !item.key.starts_with(prefix) {
                break;
            }
            if let ValueRef::Scalar(ScalarValueRef::Str(s)) = item.value {
                out.insert(item.key.into_owned(), s.into_owned());
            }
        }
        out
    }

    /// Fields with concurrent values: key and every value with its writer.
    /// Concurrent writes of the same value are left out: they are no
    /// conflict to a person and need no resolving.
    pub fn conflicts(&self) -> Vec<(String, Vec<FieldValue>)> {
        let keys: Vec<String> = self
            .am()
            .map_range(ROOT, ..)
            .filter(|i| i.conflict)
            .map(|i| i.key.into_owned())
            .collect();
        keys.into_iter()
            .map(|k| {
                let values = self.values(&k);
                (k, values)
            })
            .filter(|(_, values)| values.iter().any(|v| v.value != values[0].value))
            .collect()
    }

    /// The message of the change by `actor` that holds operation `counter`
    /// (a walk over the document's change metadata: for conflicts, which
    /// are rare, not for every read).
    fn message_of(&self, actor: &ActorId, counter: u64) -> Option<String> {
        self.am()
            .get_changes_meta(&[])
            .into_iter()
            .find(|m| *m.actor == *actor && m.start_op <= counter && counter <= m.max_op)
            .and_then(|m| m.message.map(|s| s.into_owned()))
    }

    /// All values of a field, the winner marked.
    pub fn values(&self, key: &str) -> Vec<FieldValue> {
        let (winner, all) = {
            let am = self.am();
            let winner = am.get(ROOT, key).ok().flatten().map(|(_, id)| id);
            let all: Vec<_> = am
                .get_all(ROOT, key)
                .unwrap_or_default()
                .into_iter()
                .map(|(v, id)| (v.into_owned(), id))
                .collect();
            (winner, all)
        };
        all.into_iter()
            .map(|(v, id)| {
                let value = match v {
                    automerge::Value::Scalar(s) => match s.as_ref() {
                        automerge::ScalarValue::Str(t) => t.to_string(),
                        other => other.to_string(),
                    },
                    automerge::Value::Object(t) => format!("<{t:?}>"),
                };
                let (writer, message) = match &id {
                    automerge::ObjId::Id(counter, actor, _) => {
                        (self.actor_key(actor), self.message_of(actor, *counter))
                    }
                    automerge::ObjId::Root => (None, None),
                };
                FieldValue {
                    value,
                    writer,
                    winner: Some(&id) == winner.as_ref(),
                    message,
                }
            })
            .collect()
    }

    /// Makes one signed change that sets (`Some`) or deletes (`None`) the
    /// given fields, as `writer`, with the change's timestamp `now` (seconds;
    /// informational). Returns `None` when nothing would change.
    pub fn edit(
        &mut self,
        writer: &Identity,
        now: i64,
        ops: &BTreeMap<String, Option<String>>,
    ) -> Result<Option<(ChangeHash, SignedChange, usize)>> {
        self.edit_with(writer, now, ops, None, None)
    }

    /// [`Document::edit`] with a message recorded in the change (signed
    /// with it): who asked for the edit when the writer is a service.
    pub fn edit_with_message(
        &mut self,
        writer: &Identity,
        now: i64,
        ops: &BTreeMap<String, Option<String>>,
        message: Option<&str>,
    ) -> Result<Option<(ChangeHash, SignedChange, usize)>> {
        self.edit_with(writer, now, ops, None, message)
    }

    /// [`Document::edit`], with the actor id to use if this edit needs a
    /// fresh actor (the simulator's determinism; callers must never reuse
    /// an actor across processes).
    pub fn edit_with_actor(
        &mut self,
        writer: &Identity,
        now: i64,
        ops: &BTreeMap<String, Option<String>>,
        actor: Option<[u8; 16]>,
    ) -> Result<Option<(ChangeHash, SignedChange, usize)>> {
        self.edit_with(writer, now, ops, actor, None)
    }

    pub(crate) fn edit_with(
        &mut self,
        writer: &Identity,
        now: i64,
        ops: &BTreeMap<String, Option<String>>,
        actor: Option<[u8; 16]>,
        message: Option<&str>,
    ) -> Result<Option<(ChangeHash, SignedChange, usize)>> {
        let Some((hash, bytes, n)) = self.build(writer.key(), now, ops, actor, message)? else {
            return Ok(None);
        };
        let signature = writer.sign(&signing_message(&self.id, &hash));
        Ok(Some((hash, SignedChange { bytes, signature }, n)))
    }

    /// The change that sets or deletes `ops` as `author` would make it,
    /// unsigned, for the author to check and sign elsewhere (an operator's
    /// browser, ADR 0015): a fresh actor whose first change names the key.
    /// The document takes the change; callers use a copy. `None` when
    /// nothing would change.
    pub fn unsigned_change(
        &mut self,
        author: PublicKey,
        now: i64,
        ops: &BTreeMap<String, Option<String>>,
    ) -> Result<Option<(ChangeHash, Vec<u8>)>> {
        let mut actor = [0u8; 16];
        getrandom::fill(&mut actor)
            .map_err(|e| Error::Identity(format!("no randomness from the OS: {e}")))?;
        // Another author's fresh actor even if this copy wrote as `author`.
        self.writer = None;
        Ok(self
            .build(author, now, ops, Some(actor), None)?
            .map(|(hash, bytes, _)| (hash, bytes)))
    }

    /// Makes the change (raw bytes) that writes `ops` as `author`.
    fn build(
        &mut self,
        author: PublicKey,
        now: i64,
        ops: &BTreeMap<String, Option<String>>,
        actor: Option<[u8; 16]>,
        message: Option<&str>,
    ) -> Result<Option<(ChangeHash, Vec<u8>, usize)>> {
        let ops: Vec<_> = ops
            .iter()
            .filter(|(k, v)| self.would_change(k, v.as_deref()))
            .collect();
        if ops.is_empty() {
            return Ok(None);
        }
        self.make_own();
        let fresh = self.writer != Some(author);
        self.writer = Some(author);
        let doc = self.am_mut();
        if fresh {
            // A fresh actor for this writer in this process (never reuse an
            // actor in two places, nor one another copy of this state
            // wrote as); its first change carries the author.
            doc.set_author(Some(Author::from(author.0.to_vec())));
            doc.set_actor(match actor {
                Some(a) => ActorId::from(a.as_slice()),
                None => ActorId::random(),
            });
        }
        let n = ops.len();
        let mut tx = doc.transaction();
        for (k, v) in ops {
            match v {
                Some(v) => tx.put(ROOT, k.as_str(), v.as_str())?,
                None => tx.delete(ROOT, k.as_str())?,
            }
        }
        let mut options = CommitOptions::default().with_time(now);
        if let Some(m) = message {
            options = options.with_message(m.to_string());
        }
        let (hash, _) = tx.commit_with(options);
        let Some(hash) = hash else { return Ok(None) };
        let change = doc
            .get_change_by_hash(&hash)
            .ok_or_else(|| Error::NotFound(format!("change {hash} just made")))?;
        Ok(Some((hash, change.raw_bytes().to_vec(), n)))
    }

    /// Whether writing `value` (`None`: deleting) to `key` changes the
    /// document: another value there, or concurrent values (writing the one
    /// shown still settles the conflict).
    pub fn would_change(&self, key: &str, value: Option<&str>) -> bool {
        self.raw(key).as_deref() != value || self.is_conflicted(key)
    }

    /// Whether a field holds concurrent values.
    pub fn is_conflicted(&self, key: &str) -> bool {
        self.am()
            .get_all(ROOT, key)
            .map(|v| v.len() > 1)
            .unwrap_or(false)
    }

    /// The winning value of one field as its raw JSON text.
    pub fn raw(&self, key: &str) -> Option<String> {
        match self.am().get(ROOT, key).ok()?? {
            (automerge::Value::Scalar(s), _) => match s.as_ref() {
                automerge::ScalarValue::Str(t) => Some(t.to_string()),
                _ => None,
            },
            _ => None,
        }
    }
}
