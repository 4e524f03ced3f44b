//! The redb store: one file per node.
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | bytes (`format`, `fleet_root`) |
//! | `docs` | doc id | (next chunk number, chunks since the snapshot) |
//! | `snapshots` | doc id | saved Automerge document |
//! | `changes` | (doc id, chunk number) | one incremental change |
//! | `signatures` | (doc id, change hash) | 64-byte signature, kept for every change ever accepted |
//! | `certs` | public key | certificate JSON |
//! | `sync` | (peer, doc id) | per-peer sync state |
//!
//! Device readings live in tables of their own (`readings.rs`).
//!
//! Crash-only: a change is reported as accepted only after the transaction
//! that holds it (and its signature) commits. Compaction writes the
//! snapshot and deletes the chunks it replaces in one transaction.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use automerge::ChangeHash;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{Error, Result};
use crate::signed::doc::{DocId, Document, SignedChange};
use crate::signed::identity::{Certificate, PublicKey};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const DOCS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("docs");
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const CHANGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("changes");
const SIGNATURES: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("signatures");
const CERTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("certs");
const SYNC: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("sync");

/// The format marker in `meta`.
const FORMAT: &[u8] = b"shoal-store/1";

/// Changes to commit with [`Store::commit_prepared`].
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The document.
    pub doc: DocId,
    /// Its new changes, in an order that applies.
    pub changes: Vec<(ChangeHash, SignedChange)>,
    /// The whole document, to replace its chunks (`Document::save`).
    pub snapshot: Option<Vec<u8>>,
}

/// One document's part of a commit.
type Item<'a> = (&'a DocId, &'a [(ChangeHash, SignedChange)], Snapshot<'a>);

/// Where a commit's snapshot comes from.
enum Snapshot<'a> {
    /// From the document, once it has gathered enough chunks.
    Due(&'a Document),
    /// As given (none: no snapshot now).
    Given(Option<&'a [u8]>),
}

/// Store settings.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Write a snapshot once a document has this many incremental chunks.
    pub compact_after: u64,
    /// Most memory redb caches pages in (its own default is 1 GiB, which a
    /// node's backlog of readings would fill and keep).
    pub cache_bytes: usize,
}

/// Page cache of a store by default: an edge node's (an anchor asks for
/// more, [`ANCHOR_CACHE_BYTES`]).
pub const CACHE_BYTES: usize = 16 << 20;
/// Page cache of an anchor's store.
pub const ANCHOR_CACHE_BYTES: usize = 256 << 20;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            compact_after: 512,
            cache_bytes: CACHE_BYTES,
        }
    }
}

/// An open store file.
pub struct Store {
    /// Always `Some` until the store is dropped (see `Drop`).
    db: Option<Database>,
    path: PathBuf,
    config: StoreConfig,
}

impl Drop for Store {
    /// redb writes its allocator state when the database closes and has
    /// panicked doing so on a damaged file (seen in a release build of
    /// `corrupt_and_foreign_store_files_are_clear_errors`): caught, so that
    /// closing a corrupt store is not a crash.
    fn drop(&mut self) {
        if let Some(db) = self.db.take()
            && let Err(e) = crate::panics::catch(move || drop(db))
        {
            tracing::warn!(path = %self.path.display(), "closing the store failed: {e}");
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

trait StoreErr<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T, E: std::fmt::Display> StoreErr<T> for std::result::Result<T, E> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|e| Error::Store {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }
}

/// Runs `f`, turning a panic inside the storage engine into an error:
/// redb trusts its pages and can panic on a corrupt file instead of
/// returning an error. The store must not be used after such an error.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match crate::panics::catch(f) {
        Ok(r) => r,
        Err(msg) => Err(Error::Store {
            path: path.to_path_buf(),
            reason: format!("is corrupt: the storage engine failed reading it ({msg})"),
        }),
    }
}

impl Store {
    /// The database (for the readings table in `readings.rs`).
    pub(crate) fn db(&self) -> Result<&Database> {
        self.db.as_ref().ok_or_else(|| Error::Store {
            path: self.path.clone(),
            reason: "is closed".into(),
        })
    }

    /// Runs `f` with storage-engine panics turned into errors.
    pub(crate) fn guard<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        guarded(&self.path, f)
    }

    /// Saves several sync states in one transaction.
    pub fn put_sync_states(&self, states: &[(String, DocId, Vec<u8>)]) -> Result<()> {
        guarded(&self.path, || {
            let p = &self.path;
            let wtx = self.db()?.begin_write().at(p)?;
            {
                let mut t = wtx.open_table(SYNC).at(p)?;
                for (peer, doc, state) in states {
                    t.insert((peer.as_str(), doc.to_string().as_str()), state.as_slice())
                        .at(p)?;
                }
            }
            wtx.commit().at(p)
        })
    }

    /// Opens (or creates) the store at `path`. A file that is not a Shoal
    /// store, or is corrupt, is a clear error.
    pub fn open(path: &Path, config: StoreConfig) -> Result<Self> {
        guarded(path, || Self::open_inner(path, config))
    }

    fn open_inner(path: &Path, config: StoreConfig) -> Result<Self> {
        let db = Database::builder()
            .set_cache_size(config.cache_bytes)
            .create(path)
            .map_err(|e| {
                let reason = match e {
                    redb::DatabaseError::DatabaseAlreadyOpen => {
                        "is in use by another shoal process (a running daemon?)".to_string()
                    }
                    other => format!("cannot be opened as a Shoal store: {other}"),
                };
                Error::Store {
                    path: path.to_path_buf(),
                    reason,
                }
            })?;
        // No full page check here: it reads the whole file (17 ms for a
        // 71 MB store, growing with the file) on every start. redb repairs
        // an unclean shutdown by itself; damage found while reading is an
        // error, and a panic inside redb is caught (`guarded`).
        // `Store::check` runs the full check on demand.
        let store = Store {
            db: Some(db),
            path: path.to_path_buf(),
            config,
        };
        store.check_format()?;
        Ok(store)
    }

    fn check_format(&self) -> Result<()> {
        let p = &self.path;
        {
            let rtx = self.db()?.begin_read().at(p)?;
            let has_tables = rtx.list_tables().at(p)?.next().is_some();
            if has_tables {
                let format = match rtx.open_table(META) {
                    Ok(t) => t.get("format").at(p)?.map(|v| v.value().to_vec()),
                    Err(redb::TableError::TableDoesNotExist(_)) => None,
                    Err(e) => return Err(e).at(p),
                };
                return match format.as_deref() {
                    Some(FORMAT) => Ok(()),
                    Some(other) => Err(Error::Store {
                        path: p.clone(),
                        reason: format!(
                            "has format {:?}, this shoal reads {:?}",
                            String::from_utf8_lossy(other),
                            String::from_utf8_lossy(FORMAT)
                        ),
                    }),
                    None => Err(Error::Store {
                        path: p.clone(),
                        reason: "is a redb file but not a Shoal store".into(),
                    }),
                };
            }
        }
        let wtx = self.db()?.begin_write().at(p)?;
        {
            wtx.open_table(META).at(p)?.insert("format", FORMAT).at(p)?;
            wtx.open_table(DOCS).at(p)?;
            wtx.open_table(SNAPSHOTS).at(p)?;
            wtx.open_table(CHANGES).at(p)?;
            wtx.open_table(SIGNATURES).at(p)?;
            wtx.open_table(CERTS).at(p)?;
            wtx.open_table(SYNC).at(p)?;
        }
        wtx.commit().at(p)
    }

    /// Checks every page of the store file against its checksum (reads the
    /// whole file). Returns whether it was intact; a damaged file that redb
    /// could repair returns `false`, one it could not is an error.
    pub fn check(path: &Path) -> Result<bool> {
        guarded(path, || {
            let mut db = Database::open(path).at(path)?;
            db.check_integrity().at(path)
        })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fleet root this store belongs to, once set.
    pub fn fleet_root(&self) -> Result<Option<PublicKey>> {
        guarded(&self.path, || self.fleet_root_inner())
    }

    fn fleet_root_inner(&self) -> Result<Option<PublicKey>> {
        let p = &self.path;
        let rtx = self.db()?.begin_read().at(p)?;
        let t = rtx.open_table(META).at(p)?;
        match t.get("fleet_root").at(p)? {
            None => Ok(None),
            Some(v) => Ok(Some(PublicKey::from_slice(v.value()).map_err(|_| {
                Error::Store {
                    path: p.clone(),
                    reason: "fleet_root entry is corrupt".into(),
                }
            })?)),
        }
    }

    /// Binds the store to a fleet root; refuses a different one.
    pub fn set_fleet_root(&self, root: PublicKey) -> Result<()> {
        guarded(&self.path, || self.set_fleet_root_inner(root))
    }

    fn set_fleet_root_inner(&self, root: PublicKey) -> Result<()> {
        if let Some(existing) = self.fleet_root()? {
            if existing != root {
                return Err(Error::Store {
                    path: self.path.clone(),
                    reason: format!(
                        "belongs to fleet {}, not to fleet {}",
                        existing.short(),
                        root.short()
                    ),
                });
            }
            return Ok(());
        }
        let p = &self.path;
        let wtx = self.db()?.begin_write().at(p)?;
        wtx.open_table(META)
            .at(p)?
            .insert("fleet_root", root.0.as_slice())
            .at(p)?;
        wtx.commit().at(p)
    }

    /// The documents held.
    pub fn doc_ids(&self) -> Result<Vec<DocId>> {
        guarded(&self.path, || self.doc_ids_inner())
    }

    fn doc_ids_inner(&self) -> Result<Vec<DocId>> {
        let p = &self.path;
        let rtx = self.db()?.begin_read().at(p)?;
        let t = rtx.open_table(DOCS).at(p)?;
        let mut out = Vec::new();
        for entry in t.iter().at(p)? {
            let (k, _) = entry.at(p)?;
            out.push(DocId::parse(k.value()).map_err(|_| Error::CorruptDocument {
                doc: k.value().to_string(),
                reason: "not a document id".into(),
            })?);
        }
        out.sort_by(|a, b| a.rank().cmp(&b.rank()).then(a.cmp(b)));
        Ok(out)
    }

    /// Loads a document: its snapshot, then its incremental chunks. The
    /// store is this node's own and held only verified changes, so
    /// signatures are not checked again here.
    pub fn load(&self, id: &DocId) -> Result<Option<Document>> {
        guarded(&self.path, || self.load_inner(id))
    }

    fn load_inner(&self, id: &DocId) -> Result<Option<Document>> {
        let p = &self.path;
        let key = id.to_string();
        let rtx = self.db()?.begin_read().at(p)?;
        if rtx
            .open_table(DOCS)
            .at(p)?
            .get(key.as_str())
            .at(p)?
            .is_none()
        {
            return Ok(None);
        }
        let mut doc = match rtx.open_table(SNAPSHOTS).at(p)?.get(key.as_str()).at(p)? {
            Some(bytes) => Document::load(id.clone(), bytes.value())?,
            None => Document::new(id.clone()),
        };
        let t = rtx.open_table(CHANGES).at(p)?;
        let mut changes = Vec::new();
        for entry in t
            .range((key.as_str(), 0)..=(key.as_str(), u64::MAX))
            .at(p)?
        {
            let (_, v) = entry.at(p)?;
            let c = crate::signed::doc::decode_change(v.value()).map_err(|e| {
                Error::CorruptDocument {
                    doc: key.clone(),
                    reason: format!("stored change: {e}"),
                }
            })?;
            changes.push(c);
        }
        if !changes.is_empty() {
            doc.apply_verified(changes)?;
        }
        Ok(Some(doc))
    }

    /// Persists changes already applied to `doc` (and so verified), with
    /// their signatures, in one transaction; compacts the document when it
    /// has gathered enough chunks. Returns once the transaction committed.
    pub fn commit(&self, doc: &Document, changes: &[(ChangeHash, SignedChange)]) -> Result<()> {
        self.commit_batch(&[(doc, changes)])
    }

    /// [`Store::commit`] for several documents in one transaction.
    pub fn commit_batch(&self, items: &[(&Document, &[(ChangeHash, SignedChange)])]) -> Result<()> {
        let items: Vec<_> = items
            .iter()
            .map(|(doc, changes)| (doc.id(), *changes, Snapshot::Due(doc)))
            .collect();
        guarded(&self.path, || self.commit_batch_inner(&items))
    }

    /// Commits changes in one transaction without the documents at hand
    /// (a daemon's writer thread): each item's snapshot, when given, is the
    /// document with every stored change and these (`Document::save`), and
    /// replaces its chunks; without one, chunks accumulate.
    pub fn commit_prepared(&self, items: &[Prepared]) -> Result<()> {
        let items: Vec<_> = items
            .iter()
            .map(|i| {
                (
                    &i.doc,
                    i.changes.as_slice(),
                    Snapshot::Given(i.snapshot.as_deref()),
                )
            })
            .collect();
        guarded(&self.path, || self.commit_batch_inner(&items))
    }

    /// Incremental chunks stored per document since its last snapshot.
    pub fn chunk_counts(&self) -> Result<HashMap<DocId, u64>> {
        guarded(&self.path, || {
            let p = &self.path;
            let rtx = self.db()?.begin_read().at(p)?;
            let t = rtx.open_table(DOCS).at(p)?;
            let mut out = HashMap::new();
            for entry in t.iter().at(p)? {
                let (k, v) = entry.at(p)?;
                if let Ok(id) = DocId::parse(k.value()) {
                    out.insert(id, v.value().1);
                }
            }
            Ok(out)
        })
    }

    fn commit_batch_inner(&self, items: &[Item<'_>]) -> Result<()> {
        let p = &self.path;
        let wtx = self.db()?.begin_write().at(p)?;
        {
            let mut docs = wtx.open_table(DOCS).at(p)?;
            let mut sigs = wtx.open_table(SIGNATURES).at(p)?;
            let mut table = wtx.open_table(CHANGES).at(p)?;
            let mut snapshots = wtx.open_table(SNAPSHOTS).at(p)?;
            for (id, changes, snapshot) in items {
                let key = id.to_string();
                let (mut next, mut chunks) = docs
                    .get(key.as_str())
                    .at(p)?
                    .map(|v| v.value())
                    .unwrap_or((0, 0));
                for (hash, sc) in changes.iter() {
                    // Committing a change already stored (a daemon persists
                    // what its sync engine applied, which may be a change
                    // the data dir committed first) is a no-op.
                    if sigs.get((key.as_str(), hash.0.as_slice())).at(p)?.is_some() {
                        continue;
                    }
                    sigs.insert((key.as_str(), hash.0.as_slice()), sc.signature.as_slice())
                        .at(p)?;
                    table
                        .insert((key.as_str(), next), sc.bytes.as_slice())
                        .at(p)?;
                    next += 1;
                    chunks += 1;
                }
                let bytes = match snapshot {
                    Snapshot::Due(doc) if chunks >= self.config.compact_after => Some(doc.save()),
                    Snapshot::Given(Some(b)) => Some(b.to_vec()),
                    _ => None,
                };
                if let Some(bytes) = bytes {
                    snapshots.insert(key.as_str(), bytes.as_slice()).at(p)?;
                    table
                        .retain_in((key.as_str(), 0)..=(key.as_str(), u64::MAX), |_, _| false)
                        .at(p)?;
                    chunks = 0;
                }
                docs.insert(key.as_str(), (next, chunks)).at(p)?;
            }
        }
        wtx.commit().at(p)
    }

    /// Writes a snapshot of `doc` now and drops its chunks, in one transaction.
    pub fn compact(&self, doc: &Document) -> Result<()> {
        guarded(&self.path, || self.compact_inner(doc))
    }

    fn compact_inner(&self, doc: &Document) -> Result<()> {
        let p = &self.path;
        let key = doc.id().to_string();
        let wtx = self.db()?.begin_write().at(p)?;
        {
            let mut docs = wtx.open_table(DOCS).at(p)?;
            let (next, _) = docs
                .get(key.as_str())
                .at(p)?
                .map(|v| v.value())
                .unwrap_or((0, 0));
            wtx.open_table(SNAPSHOTS)
                .at(p)?
                .insert(key.as_str(), doc.save().as_slice())
                .at(p)?;
            wtx.open_table(CHANGES)
                .at(p)?
                .retain_in((key.as_str(), 0)..=(key.as_str(), u64::MAX), |_, _| false)
                .at(p)?;
            docs.insert(key.as_str(), (next, 0)).at(p)?;
        }
        wtx.commit().at(p)
    }

    /// Deletes a document (snapshot, chunks, signatures, sync states) in one
    /// transaction: an old node epoch that a newer one replaced.
    pub fn drop_doc(&self, id: &DocId) -> Result<()> {
        guarded(&self.path, || self.drop_doc_inner(id))
    }

    fn drop_doc_inner(&self, id: &DocId) -> Result<()> {
        let p = &self.path;
        let key = id.to_string();
        let wtx = self.db()?.begin_write().at(p)?;
        {
            wtx.open_table(DOCS).at(p)?.remove(key.as_str()).at(p)?;
            wtx.open_table(SNAPSHOTS)
                .at(p)?
                .remove(key.as_str())
                .at(p)?;
            wtx.open_table(CHANGES)
                .at(p)?
                .retain_in((key.as_str(), 0)..=(key.as_str(), u64::MAX), |_, _| false)
                .at(p)?;
            let lo: &[u8] = &[];
            let hi: &[u8] = &[0xff; 33];
            wtx.open_table(SIGNATURES)
                .at(p)?
                .retain_in((key.as_str(), lo)..(key.as_str(), hi), |_, _| false)
                .at(p)?;
            wtx.open_table(SYNC)
                .at(p)?
                .retain(|(_, d), _| d != key.as_str())
                .at(p)?;
        }
        wtx.commit().at(p)
    }

    /// The signatures of every change of a document.
    pub fn signatures(&self, id: &DocId) -> Result<HashMap<ChangeHash, [u8; 64]>> {
        guarded(&self.path, || self.signatures_inner(id))
    }

    fn signatures_inner(&self, id: &DocId) -> Result<HashMap<ChangeHash, [u8; 64]>> {
        let p = &self.path;
        let key = id.to_string();
        let rtx = self.db()?.begin_read().at(p)?;
        let t = rtx.open_table(SIGNATURES).at(p)?;
        let lo: &[u8] = &[];
        let hi: &[u8] = &[0xff; 33];
        let mut out = HashMap::new();
        for entry in t.range((key.as_str(), lo)..(key.as_str(), hi)).at(p)? {
            let (k, v) = entry.at(p)?;
            let (_, hash) = k.value();
            let (Ok(hash), Ok(sig)) = (<[u8; 32]>::try_from(hash), <[u8; 64]>::try_from(v.value()))
            else {
                return Err(Error::CorruptDocument {
                    doc: key,
                    reason: "a stored signature is malformed".into(),
                });
            };
            out.insert(ChangeHash(hash), sig);
        }
        Ok(out)
    }

    /// Remembers a verified certificate.
    pub fn put_certs(&self, certs: &[Certificate]) -> Result<()> {
        guarded(&self.path, || self.put_certs_inner(certs))
    }

    fn put_certs_inner(&self, certs: &[Certificate]) -> Result<()> {
        let p = &self.path;
        let wtx = self.db()?.begin_write().at(p)?;
        {
            let mut t = wtx.open_table(CERTS).at(p)?;
            for c in certs {
                t.insert(c.key.0.as_slice(), c.to_json().as_bytes()).at(p)?;
            }
        }
        wtx.commit().at(p)
    }

    /// Every remembered certificate (not re-verified: callers add them to a
    /// [`crate::signed::verify::Trust`], which does).
    pub fn certs(&self) -> Result<Vec<Certificate>> {
        guarded(&self.path, || self.certs_inner())
    }

    fn certs_inner(&self) -> Result<Vec<Certificate>> {
        let p = &self.path;
        let rtx = self.db()?.begin_read().at(p)?;
        let t = rtx.open_table(CERTS).at(p)?;
        let mut out = Vec::new();
        for entry in t.iter().at(p)? {
            let (_, v) = entry.at(p)?;
            out.push(Certificate::from_json(v.value())?);
        }
        Ok(out)
    }

    /// Every sync state saved for `peer`, in one read (a range of the
    /// table): what a daemon hands its engine when the peer connects.
    pub fn sync_states_of(&self, peer: &str) -> Result<Vec<(DocId, Vec<u8>)>> {
        guarded(&self.path, || {
            let p = &self.path;
            let rtx = self.db()?.begin_read().at(p)?;
            let t = rtx.open_table(SYNC).at(p)?;
            let mut out = Vec::new();
            for entry in t.range((peer, "")..).at(p)? {
                let (k, v) = entry.at(p)?;
                let (who, doc) = k.value();
                if who != peer {
                    break;
                }
                // A document id this version cannot read: its state is
                // only an optimisation, skipped.
                if let Ok(id) = DocId::parse(doc) {
                    out.push((id, v.value().to_vec()));
                }
            }
            Ok(out)
        })
    }

    /// Saves sync state for (peer, document).
    pub fn put_sync_state(&self, peer: &str, doc: &DocId, state: &[u8]) -> Result<()> {
        guarded(&self.path, || self.put_sync_state_inner(peer, doc, state))
    }

    fn put_sync_state_inner(&self, peer: &str, doc: &DocId, state: &[u8]) -> Result<()> {
        let p = &self.path;
        let d = doc.to_string();
        let wtx = self.db()?.begin_write().at(p)?;
        wtx.open_table(SYNC)
            .at(p)?
            .insert((peer, d.as_str()), state)
            .at(p)?;
        wtx.commit().at(p)
    }
}
