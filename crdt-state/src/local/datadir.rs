//! A data directory: the store, this writer's identity and (on the machine
//! that created the fleet) the root key. The operations of the `shoal` CLI
//! live here; `main.rs` only parses and dispatches.
//!
//! ```text
//! <data-dir>/store.redb     the redb store
//! <data-dir>/identity.json  this writer's certificate and secret key (0600)
//! <data-dir>/root.key       the fleet root secret key (0600; fleet init only)
//! ```

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::fleet::manifest::{Manifest, Spec};
use crate::fleet::model::{self, FleetView, Kind, flatten};
use crate::local::store::{Store, StoreConfig};
use crate::signed::bundle::Bundle;
use crate::signed::doc::{DocId, Document, SignedChange};
use crate::signed::identity::{
    Certificate, Identity, PublicKey, Role, generate_key, parse_secret, write_private,
};
use crate::signed::verify::{Revocation, Trust, verify_and_apply};

/// Name of the store file in a data dir.
pub const STORE_FILE: &str = "store.redb";
/// Name of the identity file in a data dir.
pub const IDENTITY_FILE: &str = "identity.json";
/// Name of the root key file in a data dir.
pub const ROOT_KEY_FILE: &str = "root.key";

/// What `apply` did to one manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// Kind of the manifest.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// The document written.
    pub doc: String,
    /// How many fields were set or deleted (0: unchanged).
    pub fields: usize,
}

/// One conflicting value, for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConflictValue {
    /// The value (JSON).
    pub value: serde_json::Value,
    /// Writer name (or key prefix when unknown).
    pub writer: String,
    /// Writer role.
    pub role: Option<Role>,
    /// Writer key.
    pub key: Option<PublicKey>,
    /// Whether readers currently see this value.
    pub winner: bool,
    /// Who asked for it, when a service signed it (the change's message).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One signed change of the fleet or a site document, for people: who
/// wrote it is the certificate its signature checks against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChangeEntry {
    /// The document.
    pub doc: String,
    /// The change's hash.
    pub hash: String,
    /// Seconds since the epoch on the writer's clock (informational).
    pub time: i64,
    /// Writer name (or key prefix when unknown).
    pub writer: String,
    /// Writer role.
    pub role: Option<Role>,
    /// Operations in the change.
    pub ops: u64,
    /// Who asked for it, when a service signed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Most changes `shoal get changes` lists (the latest, by writer's time).
pub const CHANGES_LISTED: usize = 200;

/// A field with concurrent values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conflict {
    /// The document.
    pub doc: String,
    /// The field (dotted key).
    pub field: String,
    /// Every value; exactly one is the winner.
    pub values: Vec<ConflictValue>,
}

/// What a bundle import brought.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    /// New changes per document (documents with none are left out).
    pub new_changes: BTreeMap<String, usize>,
    /// Changes held back because changes they depend on are missing.
    pub waiting: usize,
}

/// An open data directory.
pub struct DataDir {
    path: PathBuf,
    store: std::sync::Arc<Store>,
    identity: Option<Identity>,
    trust: Trust,
    /// Documents loaded for writing. The data dir holds the store's lock,
    /// so nobody else changes them behind our back (a running daemon never
    /// writes through its data dir: its writes go through its core).
    cache: HashMap<DocId, Document>,
    /// When set, every change this data dir commits is also queued here
    /// for a daemon to hand to its sync engine.
    outbox: Option<Vec<(DocId, Vec<SignedChange>)>>,
    /// Recorded in every change this data dir makes while set.
    message: Option<String>,
}

impl std::fmt::Debug for DataDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataDir").field("path", &self.path).finish()
    }
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

impl DataDir {
    /// Creates a fleet: root key, a first operator identity (`admin`) and
    /// the fleet document. Refuses a data dir that already holds a fleet.
    pub fn init(path: &Path, fleet_name: &str, now: i64) -> Result<DataDir> {
        model::validate_name("fleet", fleet_name).map_err(Error::Identity)?;
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        let store = Store::open(&path.join(STORE_FILE), StoreConfig::default())?;
        if store.fleet_root()?.is_some() || path.join(ROOT_KEY_FILE).exists() {
            return Err(Error::DataDir {
                path: path.into(),
                reason: "already holds a fleet".into(),
            });
        }
        let root = generate_key()?;
        let root_pub = PublicKey(root.verifying_key().to_bytes());
        write_private(
            &path.join(ROOT_KEY_FILE),
            hex::encode(root.to_bytes()).as_bytes(),
        )?;
        let identity = Identity::issue(&root, generate_key()?, "admin", Role::Operator, None, now)?;
        let cert = identity.cert.clone();
        identity.write(&path.join(IDENTITY_FILE))?;
        store.set_fleet_root(root_pub)?;
        store.put_certs(std::slice::from_ref(&cert))?;
        let mut trust = Trust::new(root_pub);
        trust.add_cert(cert.clone())?;
        let mut dd = DataDir {
            path: path.into(),
            store: std::sync::Arc::new(store),
            identity: Some(identity),
            trust,
            cache: HashMap::new(),
            outbox: None,
            message: None,
        };
        let mut ops = BTreeMap::new();
        ops.insert("fleet.name".to_string(), Some(json_str(fleet_name)));
        ops.insert(
            format!("certs.{}", cert.key),
            Some(json_str(&cert.to_json())),
        );
        dd.write(&DocId::Fleet, &ops, now)?;
        Ok(dd)
    }

    /// Opens an existing data dir. `identity` overrides `identity.json`.
    pub fn open(path: &Path, identity: Option<&Path>) -> Result<DataDir> {
        Self::open_with(path, identity, StoreConfig::default())
    }

    /// [`DataDir::open`] with store settings of its own (an anchor's
    /// larger page cache).
    pub fn open_with(path: &Path, identity: Option<&Path>, config: StoreConfig) -> Result<DataDir> {
        let store_path = path.join(STORE_FILE);
        if !store_path.exists() {
            return Err(Error::DataDir {
                path: path.into(),
                reason:
                    "holds no Shoal store: run `shoal fleet init` or `shoal identity use` first"
                        .into(),
            });
        }
        let store = Store::open(&store_path, config)?;
        let root = store.fleet_root()?.ok_or_else(|| Error::DataDir {
            path: path.into(),
            reason: "store belongs to no fleet yet: run `shoal identity use` first".into(),
        })?;
        let identity = match identity {
            Some(p) => Some(Identity::read(p)?),
            None if path.join(IDENTITY_FILE).exists() => {
                Some(Identity::read(&path.join(IDENTITY_FILE))?)
            }
            None => None,
        };
        let mut trust = Trust::new(root);
        for c in store.certs()? {
            if let Err(e) = trust.add_cert(c) {
                tracing::warn!(error = %e, "ignoring a stored certificate");
            }
        }
        if let Some(id) = &identity {
            id.cert.verify(&root)?;
            trust.add_cert(id.cert.clone())?;
        }
        if let Some(fleet) = store.load(&DocId::Fleet)? {
            for e in trust.absorb_fleet(&fleet) {
                tracing::warn!(error = %e, "fleet document holds an invalid entry");
            }
        }
        Ok(DataDir {
            path: path.into(),
            store: std::sync::Arc::new(store),
            identity,
            trust,
            cache: HashMap::new(),
            outbox: None,
            message: None,
        })
    }

    /// Records `message` in every change made until it is set again (who
    /// asked for an edit that a service signs).
    pub fn set_message(&mut self, message: Option<String>) {
        self.message = message;
    }

    /// Queue every change committed from now on for [`DataDir::take_outbox`].
    pub fn forward_changes(&mut self) {
        self.outbox.get_or_insert_with(Vec::new);
    }

    /// The changes committed since the last call (with forwarding on).
    pub fn take_outbox(&mut self) -> Vec<(DocId, Vec<SignedChange>)> {
        self.outbox.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Signs with `identity` instead of the data dir's own (None: back to
    /// the data dir's own); returns the one it replaces.
    pub fn swap_identity(&mut self, identity: Option<Identity>) -> Result<Option<Identity>> {
        if let Some(id) = &identity {
            id.cert.verify(&self.trust.root())?;
            self.trust.add_cert(id.cert.clone())?;
        }
        Ok(std::mem::replace(&mut self.identity, identity))
    }

    /// Installs an identity file into a data dir (creating it and binding
    /// its store to the identity's fleet if new).
    pub fn use_identity(path: &Path, file: &Path) -> Result<DataDir> {
        let identity = Identity::read(file)?;
        identity.cert.verify(&identity.cert.root())?;
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        let store = Store::open(&path.join(STORE_FILE), StoreConfig::default())?;
        store.set_fleet_root(identity.cert.root())?;
        store.put_certs(std::slice::from_ref(&identity.cert))?;
        identity.write(&path.join(IDENTITY_FILE))?;
        drop(store);
        DataDir::open(path, None)
    }

    /// The data dir.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The store, shared with a thread that writes off the caller's loop.
    pub fn shared_store(&self) -> std::sync::Arc<Store> {
        self.store.clone()
    }

    /// The trust (root, certificates, revocations).
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// The writer identity in use.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// The identity this data dir signs with, or why there is none.
    pub fn writer(&self) -> Result<&Identity> {
        self.identity.as_ref().ok_or_else(|| Error::DataDir {
            path: self.path.clone(),
            reason: "has no identity to sign with: run `shoal identity use` or pass --identity"
                .into(),
        })
    }

    /// Loads a document, or a new empty one.
    pub fn doc(&self, id: &DocId) -> Result<Document> {
        Ok(self
            .store
            .load(id)?
            .unwrap_or_else(|| Document::new(id.clone())))
    }

    /// Makes one signed change to `id` with this data dir's identity and
    /// commits it. Returns the number of fields written.
    pub fn write(
        &mut self,
        id: &DocId,
        ops: &BTreeMap<String, Option<String>>,
        now: i64,
    ) -> Result<usize> {
        self.write_many(vec![(id.clone(), ops.clone())], now)
    }

    fn check_may_write(
        &self,
        id: &DocId,
        ops: &BTreeMap<String, Option<String>>,
    ) -> Result<&Identity> {
        let writer = self.writer()?;
        check_writer(&self.trust, writer, id, ops)?;
        Ok(writer)
    }

    fn cached(&mut self, id: &DocId) -> Result<&mut Document> {
        match self.cache.entry(id.clone()) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(v) => {
                let doc = self
                    .store
                    .load(id)?
                    .unwrap_or_else(|| Document::new(id.clone()));
                Ok(v.insert(doc))
            }
        }
    }

    /// One signed change per document, all committed in one transaction:
    /// either every document is written or none. Checks authority for all
    /// of them before writing any.
    pub fn write_many(
        &mut self,
        edits: Vec<(DocId, BTreeMap<String, Option<String>>)>,
        now: i64,
    ) -> Result<usize> {
        for (id, ops) in &edits {
            self.check_may_write(id, ops)?;
        }
        let ids: Vec<DocId> = edits.iter().map(|(id, _)| id.clone()).collect();
        let result = self.write_unchecked(edits, now);
        if result.is_err() {
            // Edits made in memory but not committed must not linger.
            for id in &ids {
                self.cache.remove(id);
            }
        }
        result
    }

    fn write_unchecked(
        &mut self,
        edits: Vec<(DocId, BTreeMap<String, Option<String>>)>,
        now: i64,
    ) -> Result<usize> {
        let writer = self.writer()?.clone();
        let mut staged = Vec::new();
        let mut total = 0;
        for (id, ops) in edits {
            let message = self.message.clone();
            if let Some((hash, change, n)) =
                self.cached(&id)?
                    .edit_with_message(&writer, now, &ops, message.as_deref())?
            {
                total += n;
                staged.push((id, vec![(hash, change)]));
            }
        }
        let items: Vec<(&Document, &[(automerge::ChangeHash, SignedChange)])> = staged
            .iter()
            .filter_map(|(id, c)| self.cache.get(id).map(|d| (d, c.as_slice())))
            .collect();
        self.store.commit_batch(&items)?;
        if let Some(fleet) = self.cache.get(&DocId::Fleet)
            && staged.iter().any(|(id, _)| *id == DocId::Fleet)
        {
            self.trust.absorb_fleet(fleet);
        }
        if let Some(outbox) = &mut self.outbox {
            for (id, changes) in staged {
                outbox.push((id, changes.into_iter().map(|(_, c)| c).collect()));
            }
        }
        Ok(total)
    }

    /// Applies manifests: one signed change per document touched, writing
    /// only the fields that differ; all documents in one transaction.
    pub fn apply(&mut self, manifests: &[Manifest], now: i64) -> Result<Vec<Applied>> {
        for m in manifests {
            self.cached(&target(m))?;
        }
        let cache = &self.cache;
        let (results, edits) = plan_apply(manifests, &|id| cache.get(id));
        self.write_many(edits, now)?;
        Ok(results)
    }

    /// Deletes an entity (`app`, `config`, `node`) from the fleet document,
    /// or a site's overrides.
    pub fn delete(&mut self, kind: Kind, name: &str, now: i64) -> Result<usize> {
        let id = delete_target(kind, name);
        let doc = self.doc(&id)?;
        let (id, ops) = plan_delete(kind, name, &|_| Some(&doc))?;
        self.write(&id, &ops, now)
    }

    /// Reads of the committed documents.
    pub fn reader(&self) -> Reader<'_> {
        Reader {
            store: &self.store,
            trust: &self.trust,
        }
    }

    /// The fleet document, read.
    pub fn fleet(&self) -> Result<FleetView> {
        self.reader().fleet()
    }

    /// Each node's latest report (from the highest epoch of its document held).
    pub fn reports(&self) -> Result<BTreeMap<String, model::NodeReport>> {
        self.reader().reports()
    }

    /// The latest signed changes of the fleet and site documents (at most
    /// [`CHANGES_LISTED`], oldest first): who changed desired state, as
    /// every holder can check it without any server.
    pub fn changes(&self) -> Result<Vec<ChangeEntry>> {
        self.reader().changes()
    }

    /// Every site document held, read.
    pub fn sites(&self) -> Result<BTreeMap<String, model::SiteOverrideSpec>> {
        self.reader().sites()
    }

    /// Every field with concurrent values, in every document.
    pub fn conflicts(&self) -> Result<Vec<Conflict>> {
        self.reader().conflicts()
    }

    /// Creates another writer's identity, signed by the root key of this
    /// data dir, and publishes its certificate in the fleet document.
    pub fn create_identity(
        &mut self,
        role: Role,
        site: Option<&str>,
        name: &str,
        now: i64,
    ) -> Result<Identity> {
        let root = self.root_key()?;
        let identity = Identity::issue(&root, generate_key()?, name, role, site, now)?;
        self.publish_cert(&identity.cert, now)?;
        Ok(identity)
    }

    /// Makes an issuer for `sites` (ADR 0013): a new key, certified with
    /// this data dir's root key and published in the fleet document. An
    /// anchor that holds it enrolls nodes of those sites without the root.
    pub fn create_issuer(&mut self, name: &str, sites: &[String], now: i64) -> Result<Identity> {
        let root = self.root_key()?;
        let identity = Identity::issue_issuer(&root, generate_key()?, name, sites, now)?;
        self.publish_cert(&identity.cert, now)?;
        Ok(identity)
    }

    /// Certifies a key generated elsewhere (a node enrolling with a token)
    /// with this data dir's root key, and publishes the certificate.
    pub fn certify(
        &mut self,
        key: PublicKey,
        role: Role,
        site: Option<&str>,
        name: &str,
        now: i64,
    ) -> Result<Certificate> {
        let cert = self.issue(key, role, site, name, now)?;
        self.publish_cert(&cert, now)?;
        Ok(cert)
    }

    /// Signs a certificate for `key` with this data dir's root key, without
    /// publishing it (a daemon publishes it through its own write path,
    /// [`cert_ops`]).
    pub fn issue(
        &self,
        key: PublicKey,
        role: Role,
        site: Option<&str>,
        name: &str,
        now: i64,
    ) -> Result<Certificate> {
        issue_in(&self.path, &self.trust.root(), key, role, site, name, now)
    }

    /// Checks that the data dir holds its fleet's root key.
    pub fn check_root_key(&self) -> Result<()> {
        self.root_key().map(|_| ())
    }

    fn root_key(&self) -> Result<ed25519_dalek::SigningKey> {
        read_root_key(&self.path, &self.trust.root())
    }

    fn publish_cert(&mut self, cert: &Certificate, now: i64) -> Result<()> {
        self.store.put_certs(std::slice::from_ref(cert))?;
        self.trust.add_cert(cert.clone())?;
        self.write(&DocId::Fleet, &cert_ops(cert), now)?;
        Ok(())
    }

    /// Finds a certified key by hex key or by writer name.
    pub fn find_key(&self, key_or_name: &str) -> Result<PublicKey> {
        find_key(&self.trust, key_or_name)
    }

    /// Revokes a writer's key. The changes of that key this data dir holds
    /// stay valid (per-actor watermarks, see ADR 0003); any other change by
    /// the key is refused everywhere the revocation reaches.
    pub fn revoke(&mut self, key: PublicKey, reason: &str, now: i64) -> Result<Revocation> {
        let mut docs = Vec::new();
        for id in self.store.doc_ids()? {
            if let Some(doc) = self.store.load(&id)? {
                docs.push(doc);
            }
        }
        let (r, ops) = plan_revoke(key, reason, docs.iter(), &self.trust);
        self.write(&DocId::Fleet, &ops, now)?;
        Ok(r)
    }

    /// Every document's signed changes, for an offline bundle.
    pub fn export(&self) -> Result<Vec<u8>> {
        self.export_some(|_| true)
    }

    /// The signed changes of the documents `keep` selects, for an offline bundle.
    pub fn export_some(&self, keep: impl Fn(&DocId) -> bool) -> Result<Vec<u8>> {
        self.reader().export_some(keep)
    }

    /// Verifies every change of a bundle and merges it. A bundle with any
    /// bad certificate or change is refused whole: nothing is stored.
    pub fn import(&mut self, bytes: &[u8]) -> Result<ImportReport> {
        let bundle = Bundle::decode(bytes)?;
        if bundle.root != Some(self.trust.root()) {
            return Err(Error::Bundle(format!(
                "it belongs to fleet {}, this data dir to fleet {}",
                bundle.root.map(|r| r.short()).unwrap_or_default(),
                self.trust.root().short()
            )));
        }
        let mut trust = self.trust.clone();
        for (i, c) in bundle.certs.iter().enumerate() {
            trust
                .add_cert(c.clone())
                .map_err(|e| Error::Bundle(format!("certificate #{i}: {e}")))?;
        }
        let mut docs = bundle.docs;
        docs.sort_by(|a, b| a.0.rank().cmp(&b.0.rank()).then(a.0.cmp(&b.0)));
        let mut staged = Vec::new();
        let mut report = ImportReport::default();
        for (id, changes) in &docs {
            let mut doc = self.doc(id)?;
            let (applied, waiting) = verify_and_apply(&trust, &mut doc, changes)
                .map_err(|e| Error::Bundle(e.to_string()))?;
            report.waiting += waiting;
            if *id == DocId::Fleet {
                trust.absorb_fleet(&doc);
            }
            if !applied.is_empty() {
                report.new_changes.insert(id.to_string(), applied.len());
            }
            staged.push((doc, applied));
        }
        // Changes held back for missing dependencies are not stored.
        let items: Vec<(&Document, &[(automerge::ChangeHash, SignedChange)])> = staged
            .iter()
            .filter(|(_, a)| !a.is_empty())
            .map(|(d, a)| (d, a.as_slice()))
            .collect();
        self.store.commit_batch(&items)?;
        for (doc, applied) in staged {
            if let Some(outbox) = &mut self.outbox
                && !applied.is_empty()
            {
                outbox.push((
                    doc.id().clone(),
                    applied.into_iter().map(|(_, c)| c).collect(),
                ));
            }
            self.cache.insert(doc.id().clone(), doc);
        }
        let certs: Vec<Certificate> = bundle
            .certs
            .into_iter()
            .filter(|c| self.trust.cert(&c.key).is_none())
            .collect();
        self.store.put_certs(&certs)?;
        self.trust = trust;
        Ok(report)
    }
}

/// Edits made away from the documents' holder, signed here: the documents
/// of `bundle` (fetched from an anchor or a node) are verified against the
/// fleet root that certified `identity_file` in a scratch data dir, `edit`
/// writes with that identity, and the new signed changes come back as a
/// bundle to post (`None` when nothing changed). The scratch dir is removed
/// either way; the secret key never leaves this machine.
pub fn edit_offline<R>(
    bundle: &[u8],
    identity_file: &Path,
    edit: impl FnOnce(&mut DataDir) -> Result<R>,
) -> Result<(R, Option<Vec<u8>>)> {
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed)
        .map_err(|e| Error::Identity(format!("no randomness from the OS: {e}")))?;
    let scratch = std::env::temp_dir().join(format!("shoal-edit-{}", hex::encode(seed)));
    let result = (|| {
        let mut dd = DataDir::use_identity(&scratch, identity_file)?;
        dd.import(bundle)?;
        dd.forward_changes();
        let r = edit(&mut dd)?;
        let docs = dd.take_outbox();
        if docs.is_empty() {
            return Ok((r, None));
        }
        let root = dd.trust().root();
        let out = Bundle {
            root: Some(root),
            certs: Vec::new(),
            docs,
        };
        Ok((r, Some(out.encode(root))))
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Whether `writer` may write `doc` now: its certificate's authority, and
/// not revoked. The one check every local write passes (a data dir's verbs,
/// the daemon core's writes).
pub fn check_writer(
    trust: &Trust,
    writer: &Identity,
    id: &DocId,
    ops: &BTreeMap<String, Option<String>>,
) -> Result<()> {
    if let Some(field) = ops.keys().find(|k| !writer.cert.may_write_field(id, k))
        && writer.cert.may_write(id)
    {
        return Err(Error::NotAllowed(format!(
            "{} ({}) may not write {field} of {id}: anchors write node registrations and rollout decisions only",
            writer.cert.name, writer.cert.role
        )));
    }
    if writer.cert.role == Role::Anchor && *id == DocId::Fleet {
        let fields: Vec<(String, Option<String>)> =
            ops.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        crate::signed::verify::registrations_as_granted(trust, &fields)
            .map_err(|e| Error::NotAllowed(format!("{} (anchor): {e}", writer.cert.name)))?;
    }
    if !writer.cert.may_write(id) {
        return Err(Error::NotAllowed(format!(
            "{} ({}{}) may not write {id}",
            writer.cert.name,
            writer.cert.role,
            writer
                .cert
                .site
                .as_deref()
                .map(|s| format!(" of site {s}"))
                .unwrap_or_default()
        )));
    }
    if trust.is_revoked(&writer.key()) {
        return Err(Error::NotAllowed(format!(
            "identity {} is revoked",
            writer.cert.name
        )));
    }
    Ok(())
}

/// What applying `manifests` writes, against the current documents: per
/// manifest what it touches, and per document the fields that differ.
#[allow(clippy::type_complexity)]
pub fn plan_apply<'d>(
    manifests: &[Manifest],
    docs: &dyn Fn(&DocId) -> Option<&'d Document>,
) -> (Vec<Applied>, Vec<(DocId, BTreeMap<String, Option<String>>)>) {
    let mut per_doc: BTreeMap<DocId, BTreeMap<String, Option<String>>> = BTreeMap::new();
    let mut results = Vec::new();
    for m in manifests {
        let id = target(m);
        let empty = Document::new(id.clone());
        let doc = docs(&id).unwrap_or(&empty);
        let mut ops = ops_for(doc, m);
        if let Spec::App(app) = &m.spec {
            // A new revision of an App with a rollout starts it (ADR 0011).
            ops.extend(crate::fleet::rollout::plan_start(doc, &m.name, app));
        }
        results.push(Applied {
            kind: m.kind(),
            name: m.name.clone(),
            doc: id.to_string(),
            fields: ops.len(),
        });
        per_doc.entry(id).or_default().extend(ops);
    }
    let edits = per_doc
        .into_iter()
        .filter(|(_, ops)| !ops.is_empty())
        .collect();
    (results, edits)
}

/// The document a delete of `kind`/`name` writes.
pub fn delete_target(kind: Kind, name: &str) -> DocId {
    match kind {
        Kind::SiteOverride => DocId::Site(name.to_string()),
        _ => DocId::Fleet,
    }
}

/// What deleting an entity writes, against the current documents.
pub fn plan_delete<'d>(
    kind: Kind,
    name: &str,
    docs: &dyn Fn(&DocId) -> Option<&'d Document>,
) -> Result<(DocId, BTreeMap<String, Option<String>>)> {
    let id = delete_target(kind, name);
    let empty = Document::new(id.clone());
    let doc = docs(&id).unwrap_or(&empty);
    let keys = match kind {
        Kind::SiteOverride => {
            let mut keys: Vec<String> = doc.fields("apps.").into_keys().collect();
            keys.extend(doc.fields("configs.").into_keys());
            keys.extend(doc.fields("devices.").into_keys());
            keys
        }
        _ => {
            let base = format!("{}.{name}", kind.prefix());
            if doc.get(&base).is_none() {
                return Err(Error::NotFound(format!("{} {name}", kind.as_str())));
            }
            let mut keys: Vec<String> = doc.fields(&format!("{base}.")).into_keys().collect();
            keys.push(base);
            if kind == Kind::App {
                // Its rollout goes with it.
                let r = crate::fleet::rollout::key(name);
                keys.extend(doc.fields(&format!("{r}.")).into_keys());
                if doc.raw(&r).is_some() {
                    keys.push(r);
                }
            }
            keys
        }
    };
    Ok((id, keys.into_iter().map(|k| (k, None)).collect()))
}

fn target(m: &Manifest) -> DocId {
    match m.spec {
        Spec::SiteOverride(_) => DocId::Site(m.name.clone()),
        _ => DocId::Fleet,
    }
}

/// The field writes that make `doc` hold what `m` declares.
fn ops_for(doc: &Document, m: &Manifest) -> BTreeMap<String, Option<String>> {
    let (prefixes, desired) = match &m.spec {
        Spec::SiteOverride(s) => {
            let mut desired = BTreeMap::new();
            let v = serde_json::to_value(s).unwrap_or_default();
            for (k, sub) in v.as_object().into_iter().flatten() {
                flatten(k, sub, &mut desired);
            }
            (
                vec![
                    "apps.".to_string(),
                    "configs.".to_string(),
                    "devices.".to_string(),
                ],
                desired,
            )
        }
        other => {
            let kind = m.kind();
            let base = format!("{}.{}", kind.prefix(), m.name);
            let v = match other {
                Spec::App(a) => serde_json::to_value(a),
                Spec::Config(c) => serde_json::to_value(c),
                Spec::Node(n) => serde_json::to_value(n),
                Spec::SiteOverride(s) => serde_json::to_value(s),
                Spec::DeviceProfile(p) => serde_json::to_value(p),
                Spec::Device(d) => serde_json::to_value(d),
                Spec::Artifact(a) => serde_json::to_value(a),
            }
            .unwrap_or_default();
            let mut desired = BTreeMap::new();
            desired.insert(base.clone(), json_str(kind.as_str()));
            flatten(&base, &v, &mut desired);
            (vec![format!("{base}.")], desired)
        }
    };
    let mut ops = BTreeMap::new();
    for (k, v) in &desired {
        // Writing the value already there still resolves a conflict.
        if doc.raw(k).as_ref() != Some(v) || doc.is_conflicted(k) {
            ops.insert(k.clone(), Some(v.clone()));
        }
    }
    let mut current = BTreeMap::new();
    for p in &prefixes {
        current.extend(doc.fields(p));
    }
    for k in current.keys() {
        if !desired.contains_key(k) {
            ops.insert(k.clone(), None);
        }
    }
    ops
}

/// The fields of one document with concurrent values, writers named
/// through `trust`.
pub fn conflicts_of(doc: &Document, trust: &Trust) -> Vec<Conflict> {
    doc.conflicts()
        .into_iter()
        .map(|(field, values)| Conflict {
            doc: doc.id().to_string(),
            field,
            values: values
                .into_iter()
                .map(|v| {
                    let cert = v.writer.and_then(|k| trust.cert(&k));
                    ConflictValue {
                        value: serde_json::from_str(&v.value)
                            .unwrap_or(serde_json::Value::String(v.value.clone())),
                        writer: cert.map(|c| c.name.clone()).unwrap_or_else(|| {
                            v.writer.map(|k| k.short()).unwrap_or_else(|| "?".into())
                        }),
                        role: cert.map(|c| c.role),
                        key: v.writer,
                        winner: v.winner,
                        message: v.message,
                    }
                })
                .collect(),
        })
        .collect()
}

/// The fleet document's field that publishes `cert`.
pub fn cert_ops(cert: &Certificate) -> BTreeMap<String, Option<String>> {
    let mut ops = BTreeMap::new();
    ops.insert(
        format!("certs.{}", cert.key),
        Some(json_str(&cert.to_json())),
    );
    ops
}

/// Finds a certified key by hex key or by writer name.
pub fn find_key(trust: &Trust, key_or_name: &str) -> Result<PublicKey> {
    if let Ok(k) = PublicKey::from_hex(key_or_name) {
        return Ok(k);
    }
    let matches: Vec<&Certificate> = trust.certs().filter(|c| c.name == key_or_name).collect();
    match matches.as_slice() {
        [one] => Ok(one.key),
        [] => Err(Error::NotFound(format!("no identity named {key_or_name}"))),
        many => Err(Error::NotAllowed(format!(
            "{} identities are named {key_or_name}: name one by its key ({})",
            many.len(),
            many.iter()
                .map(|c| c.key.short())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// What revoking `key` writes into the fleet document: the changes of that
/// key that `docs` hold stay valid (per-actor watermarks, ADR 0003), any
/// other change by the key is refused wherever the revocation reaches.
pub fn plan_revoke<'d>(
    key: PublicKey,
    reason: &str,
    docs: impl Iterator<Item = &'d Document>,
    trust: &Trust,
) -> (Revocation, BTreeMap<String, Option<String>>) {
    let author = automerge::Author::from(key.0.to_vec());
    let mut accepted = BTreeMap::new();
    for doc in docs {
        let am = doc.automerge();
        let actors = am.get_actors_for_author(&author);
        if actors.is_empty() {
            continue;
        }
        for meta in am.get_changes_meta(&[]) {
            if actors.contains(&meta.actor) {
                let e = accepted.entry(meta.actor.to_hex_string()).or_insert(0);
                *e = meta.seq.max(*e);
            }
        }
    }
    // An issuer's: the nodes it certified that this holder knows stay.
    let mut certified: Vec<PublicKey> = trust
        .certs()
        .filter(|c| c.via.as_ref().is_some_and(|v| v.key == key))
        .map(|c| c.key)
        .collect();
    certified.sort();
    let r = Revocation {
        reason: reason.to_string(),
        accepted,
        certified,
    };
    let mut ops = BTreeMap::new();
    ops.insert(
        format!("revoked.{key}"),
        Some(serde_json::to_string(&r).unwrap_or_default()),
    );
    (r, ops)
}

/// Reads of committed documents — what `shoal get` shows and what an
/// export carries — over a store and the trust that names writers. Holds
/// no lock of its own, so a daemon runs it on a blocking thread.
pub struct Reader<'a> {
    /// The store.
    pub store: &'a Store,
    /// The fleet's certificates and revocations.
    pub trust: &'a Trust,
}

impl Reader<'_> {
    /// Loads a document, or a new empty one.
    pub fn doc(&self, id: &DocId) -> Result<Document> {
        Ok(self
            .store
            .load(id)?
            .unwrap_or_else(|| Document::new(id.clone())))
    }

    /// The fleet document, read.
    pub fn fleet(&self) -> Result<FleetView> {
        Ok(FleetView::read(&self.doc(&DocId::Fleet)?))
    }

    /// Each node's latest report (from the highest epoch of its document held).
    pub fn reports(&self) -> Result<BTreeMap<String, model::NodeReport>> {
        let mut latest: BTreeMap<String, DocId> = BTreeMap::new();
        for id in self.store.doc_ids()? {
            if let DocId::Node { name, epoch } = &id {
                let newer = match latest.get(name) {
                    Some(DocId::Node { epoch: e, .. }) => epoch > e,
                    _ => true,
                };
                if newer {
                    latest.insert(name.clone(), id.clone());
                }
            }
        }
        let mut out = BTreeMap::new();
        for (name, id) in latest {
            if let Some(doc) = self.store.load(&id)? {
                out.insert(name, model::NodeReport::read(&doc));
            }
        }
        Ok(out)
    }

    /// The latest signed changes of the fleet and site documents (at most
    /// [`CHANGES_LISTED`], oldest first): who changed desired state, as
    /// every holder can check it without any server.
    pub fn changes(&self) -> Result<Vec<ChangeEntry>> {
        let mut out = Vec::new();
        for id in self.store.doc_ids()? {
            if matches!(id, DocId::Node { .. }) {
                continue;
            }
            let Some(doc) = self.store.load(&id)? else {
                continue;
            };
            for m in doc.history() {
                let cert = m.writer.and_then(|k| self.trust.cert(&k));
                out.push(ChangeEntry {
                    doc: id.to_string(),
                    hash: m.hash.to_string(),
                    time: m.time,
                    writer: cert.map(|c| c.name.clone()).unwrap_or_else(|| {
                        m.writer.map(|k| k.short()).unwrap_or_else(|| "?".into())
                    }),
                    role: cert.map(|c| c.role),
                    ops: m.ops,
                    message: m.message,
                });
            }
        }
        // Stable: causal order within a document stays for equal times.
        out.sort_by_key(|e| e.time);
        let skip = out.len().saturating_sub(CHANGES_LISTED);
        Ok(out.split_off(skip))
    }

    /// Every site document held, read.
    pub fn sites(&self) -> Result<BTreeMap<String, model::SiteOverrideSpec>> {
        let mut out = BTreeMap::new();
        for id in self.store.doc_ids()? {
            if let DocId::Site(name) = &id
                && let Some(doc) = self.store.load(&id)?
            {
                out.insert(name.clone(), model::read_site(&doc));
            }
        }
        Ok(out)
    }

    /// Every field with concurrent values, in every document.
    pub fn conflicts(&self) -> Result<Vec<Conflict>> {
        let mut out = Vec::new();
        for id in self.store.doc_ids()? {
            if let Some(doc) = self.store.load(&id)? {
                out.extend(conflicts_of(&doc, self.trust));
            }
        }
        Ok(out)
    }

    /// The signed changes of the documents `keep` selects, as an offline
    /// bundle.
    pub fn export_some(&self, keep: impl Fn(&DocId) -> bool) -> Result<Vec<u8>> {
        let mut bundle = Bundle {
            root: Some(self.trust.root()),
            certs: self.trust.certs().cloned().collect(),
            docs: Vec::new(),
        };
        bundle.certs.sort_by_key(|c| c.key);
        for id in self.store.doc_ids()? {
            if !keep(&id) {
                continue;
            }
            let Some(doc) = self.store.load(&id)? else {
                continue;
            };
            let sigs = self.store.signatures(&id)?;
            let mut changes = Vec::new();
            for c in doc.changes() {
                let signature = *sigs.get(&c.hash()).ok_or_else(|| Error::CorruptDocument {
                    doc: id.to_string(),
                    reason: format!("no signature stored for change {}", c.hash()),
                })?;
                changes.push(SignedChange {
                    bytes: c.raw_bytes().to_vec(),
                    signature,
                });
            }
            bundle.docs.push((id, changes));
        }
        Ok(bundle.encode(self.trust.root()))
    }
}

/// Reads the fleet root key a data dir holds (`root.key`), checked against
/// the fleet's root `root`.
/// The public half of the fleet root key held in `dir`, read without the
/// store (which a running daemon holds): where the root is, this proves it.
pub fn root_public(dir: &Path) -> Result<PublicKey> {
    Ok(PublicKey(root_secret(dir)?.verifying_key().to_bytes()))
}

/// The fleet root key held in `dir`.
fn root_secret(dir: &Path) -> Result<ed25519_dalek::SigningKey> {
    let root_path = dir.join(ROOT_KEY_FILE);
    let text = std::fs::read_to_string(&root_path).map_err(|_| Error::DataDir {
        path: dir.to_path_buf(),
        reason: "holds no fleet root key (root.key): run this where `shoal fleet init` ran".into(),
    })?;
    parse_secret(&text).map_err(|e| Error::Identity(format!("{}: {e}", root_path.display())))
}

fn read_root_key(dir: &Path, root: &PublicKey) -> Result<ed25519_dalek::SigningKey> {
    let key = root_secret(dir)?;
    if PublicKey(key.verifying_key().to_bytes()) != *root {
        return Err(Error::Identity(format!(
            "{} is not the root key of this store's fleet",
            dir.join(ROOT_KEY_FILE).display()
        )));
    }
    Ok(key)
}

/// Issues a certificate with the root key of the data dir at `dir` (fleet
/// `root`) without its store: for a daemon's blocking threads, which must
/// not wait for the store the daemon holds open.
pub fn issue_in(
    dir: &Path,
    root: &PublicKey,
    key: PublicKey,
    role: Role,
    site: Option<&str>,
    name: &str,
    now: i64,
) -> Result<Certificate> {
    let root = read_root_key(dir, root)?;
    Certificate::issue(&root, key, name, role, site, now)
}
