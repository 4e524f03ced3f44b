//! The daemon core: events and the time in, actions out.
//!
//! One [`Core`] per daemon owns the sync engine and every decision around
//! it. Its driver calls a method per event — a peer's hello, a frame, a
//! connection gone, a tick, a commit that finished, a local write — and
//! then takes [`Action`]s with [`Core::poll_action`] and carries them out
//! in order. Time comes in as a [`Now`]; nothing here reads a clock, a file
//! or a socket, so a simulator can run ten thousand cores in one thread.
//!
//! **Commit before send.** Every change the engine applied is handed out in
//! an [`Action::Commit`]; every frame, saved sync state, dropped document
//! and change notice that the engine produced after it waits until the
//! driver reports with [`Core::committed`] that the commit succeeded. A
//! failed commit keeps everything held (nothing is sent on what could not be
//! kept, and nothing is dropped) and is tried again at the next tick.
//!
//! `C` is the driver's handle for a connection (a libp2p peer id on the
//! mesh, an index in the simulator).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::Hash;

use crate::render::Contact;
use automerge::ChangeHash;
use crdt_state::fleet::device::DeviceReport;
use crdt_state::fleet::model::{self, ArtifactReport, FleetView, NodeReport, WorkloadReport};
use crdt_state::fleet::placement::{self, Workload};
use crdt_state::fleet::rollout;
use crdt_state::signed::sync::{Engine, Input, Output};
use crdt_state::{DocId, Document, Identity, PublicKey, SignedChange, Trust};

use crate::hello;

/// The time, as the driver's clock tells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Now {
    /// A monotonic clock (milliseconds since the daemon started): timers.
    pub mono_ms: u64,
    /// Wall-clock Unix seconds: what is written into documents.
    pub unix_s: i64,
}

/// How a core behaves.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The daemon runs a share of the fleet (an edge node): it reconciles
    /// and writes reports, and it listens through anchors' relays.
    pub workloads: bool,
    /// Feed a view (an anchor serving the operator API): timeline entries
    /// for changes merged from peers, and a `Heard` per frame.
    pub timeline: bool,
    /// Judge rollouts' gates and write the decisions (an anchor, ADR 0011).
    pub gates: bool,
    /// Sync states are saved at most this often (0: at once).
    pub state_flush_ms: u64,
    /// A node reconciles at least this often, changed or not (drift).
    pub reconcile_every_ms: u64,
    /// Reported device values are rewritten at most this often (state
    /// changes — online, errors, setpoints — are written at once).
    pub values_every_ms: u64,
    /// Peers to remember at start (multiaddrs ending in `/p2p/<peer id>`).
    pub known_peers: Vec<String>,
    /// A commit carries a document's snapshot once this many of its
    /// changes were stored since the last one (the store's chunks).
    pub compact_after: u64,
    /// While commits fail, at most this many engine outputs are held:
    /// past it every peer is cut off and none is admitted until a commit
    /// succeeds again (what they would send could not be stored; they
    /// resync from a digest afterwards).
    pub max_held: usize,
    /// Changes stored per document since its last snapshot, at start.
    pub stored_chunks: HashMap<DocId, u64>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            workloads: false,
            timeline: false,
            gates: false,
            state_flush_ms: 5_000,
            reconcile_every_ms: 30_000,
            values_every_ms: 30_000,
            known_peers: Vec::new(),
            compact_after: crdt_state::local::store::StoreConfig::default().compact_after,
            max_held: 4096,
            stored_chunks: HashMap::new(),
        }
    }
}

/// Sync states saved for a peer, per document.
pub type SavedStates = Vec<(DocId, Vec<u8>)>;

/// Changes to commit, per document, in an order that applies.
pub type Batch = Vec<(DocId, Vec<(ChangeHash, SignedChange)>)>;

/// What the core asks its driver to do, in order.
#[derive(Debug)]
pub enum Action<C> {
    /// Let the connection's frames through (it passed admission).
    Admit {
        /// The connection.
        conn: C,
        /// Its certificate's name.
        name: String,
        /// Where it came from, as the hello said.
        from: String,
        /// Listen for inbound connections through this peer's relay (a node
        /// admitting an anchor).
        relay: bool,
    },
    /// Refuse and close the connection.
    Reject {
        /// The connection.
        conn: C,
        /// Why (sent to the peer and logged).
        reason: String,
    },
    /// Send a frame.
    Send {
        /// The connection.
        conn: C,
        /// The frame.
        frame: Vec<u8>,
    },
    /// Close the connection (the peer misbehaved).
    Disconnect {
        /// The connection.
        conn: C,
        /// Why.
        reason: String,
    },
    /// Commit these changes in one transaction, then call
    /// [`Core::committed`] with `batch` and the outcome. Everything it needs
    /// is in it: it may run on another thread while the core goes on.
    Commit {
        /// Names this commit in [`Core::committed`].
        batch: u64,
        /// The changes.
        changes: Batch,
        /// Snapshots of documents whose stored chunks are due for
        /// compaction: each is the document with every stored change and
        /// those of this batch, to replace its chunks.
        snapshots: BTreeMap<DocId, Vec<u8>>,
    },
    /// Save these sync states (peer, document, state).
    SaveSyncStates(Vec<(PublicKey, DocId, Vec<u8>)>),
    /// Delete a superseded document (an old node epoch) from the store.
    DropDoc(DocId),
    /// Save the list of peers worth dialling again.
    SavePeers(Vec<String>),
    /// Apply the node's share ([`Core::share`]) to the runtime now, then
    /// call [`Core::report`].
    Reconcile,
    /// Call [`Core::report`] with the runtime's status (written only when
    /// it changed).
    Report,
    /// A document changed (views re-read it).
    Changed(DocId),
    /// A peer connected or went away.
    Contact {
        /// Its name.
        name: String,
        /// Connected now.
        connected: bool,
    },
    /// A frame arrived from a named peer.
    Heard {
        /// Its name.
        name: String,
        /// The frame's size.
        bytes: usize,
    },
    /// The node went back from a rollout's new revision of `app` on its
    /// own (its report says why); a reconcile follows.
    RolledBack {
        /// The app.
        app: String,
        /// Why.
        reason: String,
    },
    /// A timeline entry.
    Timeline {
        /// `merged`.
        kind: &'static str,
        /// What it is about (a document).
        subject: String,
        /// In words.
        text: String,
    },
    /// A security event: something refused.
    Security {
        /// Who (a peer's name, or its key's short form, or an address).
        who: String,
        /// What was wrong.
        reason: String,
    },
}

/// A connection's hello, as it arrived.
pub struct Arrival<'a, C> {
    /// The connection.
    pub conn: C,
    /// The hello's bytes.
    pub bytes: &'a [u8],
    /// Whether the transport's handshake proved a key (on the mesh: the
    /// key the peer id embeds).
    pub proves: &'a dyn Fn(&PublicKey) -> bool,
    /// Where it came from, in words (for the security log).
    pub from: &'a str,
    /// The peer's address worth dialling again (None: it came through a
    /// relay).
    pub dialable: Option<String>,
}

/// One engine output held until the commit before it is done.
struct Held {
    output: Output,
    /// A `Persist` that is part of the commit in flight.
    in_batch: bool,
    /// A `Persist`'s place in the order changes were applied.
    seq: u64,
}

/// The daemon core of one node or anchor.
pub struct Core<C> {
    engine: Engine,
    me: Identity,
    settings: Settings,
    /// Admitted connections: their keys and names; and back.
    conns: HashMap<C, PublicKey>,
    names: HashMap<C, String>,
    keys: HashMap<PublicKey, C>,
    contacts: BTreeMap<String, Contact>,
    known_peers: Vec<String>,
    peers_dirty: bool,
    pending_states: HashMap<(PublicKey, DocId), Vec<u8>>,
    last_state_flush: u64,
    /// Engine outputs not yet released, oldest first.
    held: VecDeque<Held>,
    /// The commit in flight (handed out, no answer yet).
    in_flight: Option<u64>,
    /// The last commit failed: try again at the next tick.
    retry: bool,
    /// The last commit failed (cleared by the next that succeeds).
    failing: bool,
    next_batch: u64,
    commit_failures: u64,
    /// Changes applied so far (each engine `Persist` counts one) and how
    /// many of them are committed.
    applied_seq: u64,
    committed_seq: u64,
    /// Changes stored per document since its last snapshot.
    chunks: HashMap<DocId, u64>,
    /// What the commit in flight adds to `chunks` (None: a snapshot
    /// resets the document's count).
    in_flight_chunks: Vec<(DocId, Option<u64>)>,
    reconcile_due: bool,
    last_reconcile: u64,
    last_report: Option<NodeReport>,
    /// The node's uplink backlog, for its next report.
    uplink: Option<model::UplinkReport>,
    last_values: u64,
    /// Changes written here, told apart from merged ones on the timeline.
    local_hashes: HashSet<ChangeHash>,
    security_events: u64,
    /// The latest security events, for the node's report.
    recent_security: std::collections::VecDeque<crdt_state::fleet::model::SecurityReport>,
    /// Apps whose rollout this node rolled back on its own (its report's
    /// `rollbacks`, read back at start).
    rollbacks: BTreeMap<String, model::RollbackReport>,
    /// Per app of the last share: the revision asked of the runtime and
    /// the spec it came from.
    asked: BTreeMap<String, (String, model::AppSpec)>,
    /// An anchor's gates: what it has seen of each node under rollouts.
    gates: crate::gates::Gates,
    actions: VecDeque<Action<C>>,
}

impl<C: Copy + Eq + Hash + std::fmt::Debug> Core<C> {
    /// A core over an engine loaded from the store, for the identity `me`.
    pub fn new(engine: Engine, me: Identity, mut settings: Settings) -> Self {
        Core {
            engine,
            me,
            // Taken, not copied: the core keeps them up to date from here.
            chunks: std::mem::take(&mut settings.stored_chunks),
            in_flight_chunks: Vec::new(),
            known_peers: std::mem::take(&mut settings.known_peers),
            // A node acts on its stored desired state before any network.
            reconcile_due: settings.workloads,
            settings,
            conns: HashMap::new(),
            names: HashMap::new(),
            keys: HashMap::new(),
            contacts: BTreeMap::new(),
            peers_dirty: false,
            pending_states: HashMap::new(),
            last_state_flush: 0,
            held: VecDeque::new(),
            in_flight: None,
            retry: false,
            failing: false,
            next_batch: 0,
            commit_failures: 0,
            applied_seq: 0,
            committed_seq: 0,
            last_reconcile: 0,
            last_report: None,
            uplink: None,
            last_values: 0,
            local_hashes: HashSet::new(),
            security_events: 0,
            recent_security: Default::default(),
            rollbacks: BTreeMap::new(),
            asked: BTreeMap::new(),
            gates: Default::default(),
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do, oldest first.
    pub fn poll_action(&mut self) -> Option<Action<C>> {
        self.actions.pop_front()
    }

    // ----- events -------------------------------------------------------

    /// The daemon started: a node acts on its stored desired state at once,
    /// before any network.
    pub fn start(&mut self, now: Now) {
        self.last_state_flush = now.mono_ms;
        self.last_values = now.mono_ms;
        if self.settings.workloads {
            // What this node rolled back before it stopped stays rolled back.
            let id = self.node_doc();
            if let Some(doc) = self.engine.doc(&id) {
                self.rollbacks = NodeReport::read(doc).rollbacks;
            }
        }
        self.release(now);
    }

    /// A connection's hello arrived; `saved` reads the sync states stored
    /// for the peer (one read, whatever the number of documents).
    pub fn hello(
        &mut self,
        now: Now,
        arrival: Arrival<'_, C>,
        saved: &mut dyn FnMut(&PublicKey) -> SavedStates,
    ) {
        let Arrival {
            conn,
            bytes,
            proves,
            from,
            dialable,
        } = arrival;
        if self.failing && self.held.len() > self.settings.max_held {
            self.actions.push_back(Action::Reject {
                conn,
                reason: "this peer cannot store what it receives now (its commits fail)".into(),
            });
            return;
        }
        let cert = match hello::check(self.engine.trust(), proves, bytes) {
            Ok(cert) => cert,
            Err(reason) => {
                self.security_events += 1;
                self.actions.push_back(Action::Security {
                    who: from.to_string(),
                    reason: format!("admission refused: {reason}"),
                });
                self.actions.push_back(Action::Reject { conn, reason });
                return;
            }
        };
        let key = cert.key;
        // A key already connected under another handle: the newer wins.
        if let Some(old) = self.keys.insert(key, conn)
            && old != conn
        {
            self.conns.remove(&old);
            self.names.remove(&old);
            self.engine.handle(Input::Disconnected { peer: key });
        }
        self.conns.insert(conn, key);
        self.names.insert(conn, cert.name.clone());
        self.actions.push_back(Action::Admit {
            conn,
            name: cert.name.clone(),
            from: from.to_string(),
            relay: cert.role == crdt_state::Role::Anchor && self.settings.workloads,
        });
        self.contacts.insert(
            cert.name.clone(),
            Contact {
                connected: true,
                last_contact: Some(now.unix_s),
            },
        );
        self.actions.push_back(Action::Contact {
            name: cert.name.clone(),
            connected: true,
        });
        if let Some(full) = dialable {
            // Keep peers whose address we dialled or that dialled us from
            // their listening socket (one address per peer id).
            if !self.known_peers.contains(&full) {
                let id = full.rsplit("/p2p/").next().unwrap_or_default().to_string();
                self.known_peers
                    .retain(|p| p.rsplit("/p2p/").next() != Some(id.as_str()));
                self.known_peers.push(full);
                self.peers_dirty = true;
            }
        }
        let saved: Vec<(DocId, Vec<u8>)> = saved(&key)
            .into_iter()
            .filter(|(id, _)| self.engine.doc(id).is_some())
            .collect();
        self.engine.handle(Input::Connected {
            peer: key,
            cert,
            saved,
        });
        self.pump(now);
    }

    /// A frame arrived on a connection (ignored unless it was admitted).
    pub fn frame(&mut self, now: Now, conn: C, bytes: Vec<u8>) {
        let Some(key) = self.conns.get(&conn).copied() else {
            return;
        };
        if let Some(name) = self.names.get(&conn) {
            if let Some(c) = self.contacts.get_mut(name) {
                c.last_contact = Some(now.unix_s);
            }
            if self.settings.timeline {
                self.actions.push_back(Action::Heard {
                    name: name.clone(),
                    bytes: bytes.len(),
                });
            }
        }
        self.engine.handle(Input::Received {
            peer: key,
            frame: bytes,
        });
        self.pump(now);
        // A node acts on a new desired state at once (a wave opened), not
        // at its next tick.
        if self.settings.workloads && self.reconcile_due {
            self.reconcile(now);
        }
    }

    /// A connection ended.
    pub fn down(&mut self, now: Now, conn: C) {
        self.forget_conn(now, conn);
        self.pump(now);
    }

    fn forget_conn(&mut self, now: Now, conn: C) {
        let Some(key) = self.conns.remove(&conn) else {
            return;
        };
        self.names.remove(&conn);
        self.keys.remove(&key);
        if let Some(name) = self.engine.trust().cert(&key).map(|c| c.name.clone()) {
            self.contacts.insert(
                name.clone(),
                Contact {
                    connected: false,
                    last_contact: Some(now.unix_s),
                },
            );
            self.actions.push_back(Action::Contact {
                name,
                connected: false,
            });
        }
        self.engine.handle(Input::Disconnected { peer: key });
    }

    /// A tick (about once a second): anti-entropy, a failed commit tried
    /// again, reconcile or report, sync states and peers saved.
    pub fn tick(&mut self, now: Now) {
        self.engine.handle(Input::Tick {
            now_ms: now.mono_ms,
        });
        if self.retry {
            self.retry = false;
            self.start_commit();
        }
        self.pump(now);
        if self.settings.workloads {
            if self.reconcile_due
                || now.mono_ms.saturating_sub(self.last_reconcile)
                    >= self.settings.reconcile_every_ms
            {
                self.reconcile(now);
            } else {
                self.actions.push_back(Action::Report);
            }
        }
        if self.settings.gates {
            self.judge_gates(now);
        }
        if now.mono_ms.saturating_sub(self.last_state_flush) >= self.settings.state_flush_ms {
            self.flush(now);
        }
    }

    /// An anchor judges the gates of rollouts in progress and writes what
    /// it decides: once a tick while any rollout is in progress (reading
    /// only the node reports that changed), nothing otherwise.
    fn judge_gates(&mut self, now: Now) {
        let Some(fleet) = self.engine.doc(&DocId::Fleet) else {
            return;
        };
        let decisions = self.gates.judge(now, fleet, self.engine.docs());
        if decisions.is_empty() {
            return;
        }
        let me = self.me.clone();
        for d in decisions {
            let mark = rollout::Mark {
                at: now.unix_s,
                by: me.cert.name.clone(),
                reason: d.why.clone(),
            };
            let Some(fleet) = self.engine.doc(&DocId::Fleet) else {
                return;
            };
            let ops = rollout::decision_ops(fleet, &d.app, &d.revision, &d.decision, &mark);
            match self.write_ops(now, &[(DocId::Fleet, ops)], &me, None) {
                Ok(_) => self.actions.push_back(Action::Timeline {
                    kind: "rollout",
                    subject: format!("app {}", d.app),
                    text: format!("{}: {}", d.describe(), d.why),
                }),
                Err(e) => self.actions.push_back(Action::Security {
                    who: me.cert.name.clone(),
                    reason: format!("rollout decision on {} not written: {e}", d.app),
                }),
            }
        }
    }

    /// The driver finished the commit `batch` (`Err`: nothing of it was
    /// stored).
    pub fn committed(&mut self, now: Now, batch: u64, result: Result<(), String>) {
        if self.in_flight != Some(batch) {
            return;
        }
        self.in_flight = None;
        let counted = std::mem::take(&mut self.in_flight_chunks);
        if result.is_ok() {
            self.failing = false;
            for (doc, added) in counted {
                match added {
                    Some(n) => *self.chunks.entry(doc).or_default() += n,
                    None => {
                        self.chunks.insert(doc, 0);
                    }
                }
            }
        }
        if result.is_err() {
            // Not stored: hold everything (nothing is sent on what could
            // not be kept) and try again at the next tick.
            self.commit_failures += 1;
            self.retry = true;
            self.failing = true;
            for h in &mut self.held {
                h.in_batch = false;
            }
            return;
        }
        let mut merged: Vec<(DocId, Vec<(ChangeHash, SignedChange)>)> = Vec::new();
        while let Some(front) = self.held.front() {
            if matches!(front.output, Output::Persist { .. }) && !front.in_batch {
                break; // a newer change: it needs its own commit first
            }
            let Some(h) = self.held.pop_front() else {
                break;
            };
            match h.output {
                Output::Persist { doc, changes } => {
                    self.committed_seq = self.committed_seq.max(h.seq);
                    merged.push((doc, changes));
                }
                other => self.carry(other, now),
            }
        }
        if self.settings.timeline {
            self.note_merges(&merged);
        }
        self.release(now);
    }

    /// Writes `ops` to `doc` as `writer`: signed, applied, committed before
    /// anything that follows is sent, synced. See [`Core::write_many`].
    pub fn write(
        &mut self,
        now: Now,
        doc: &DocId,
        writer: &Identity,
        ops: &BTreeMap<String, Option<String>>,
    ) -> crdt_state::Result<Option<ChangeHash>> {
        let (_, hashes) = self.write_ops(now, &[(doc.clone(), ops.clone())], writer, None)?;
        Ok(hashes.first().copied())
    }

    /// The one write path of a running daemon (CLI verbs through the
    /// socket, the operator API, the node's reports, the simulator's
    /// edits): the writer's authority over every document and its
    /// revocation are checked first ([`crdt_state::local::datadir::check_writer`],
    /// as a data dir's own verbs do), then one signed change per document
    /// is applied to the engine's documents — the process's only copy —
    /// committed once, and synced. `message` records who asked a service
    /// to write. Returns the number of fields written.
    pub fn write_many(
        &mut self,
        now: Now,
        edits: &[(DocId, BTreeMap<String, Option<String>>)],
        writer: &Identity,
        message: Option<&str>,
    ) -> crdt_state::Result<usize> {
        Ok(self.write_ops(now, edits, writer, message)?.0)
    }

    fn write_ops(
        &mut self,
        now: Now,
        edits: &[(DocId, BTreeMap<String, Option<String>>)],
        writer: &Identity,
        message: Option<&str>,
    ) -> crdt_state::Result<(usize, Vec<ChangeHash>)> {
        for (id, ops) in edits {
            crdt_state::local::datadir::check_writer(self.engine.trust(), writer, id, ops)?;
        }
        let mut fields = 0;
        let mut hashes = Vec::new();
        let mut result = Ok(());
        for (id, ops) in edits {
            match self
                .engine
                .edit_with_message(id, writer, now.unix_s, ops, message)
            {
                Ok(Some((h, n))) => {
                    fields += n;
                    hashes.push(h);
                    if self.settings.timeline {
                        self.local_hashes.insert(h);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.pump(now);
        result.map(|()| (fields, hashes))
    }

    /// Signed changes made elsewhere (a bundle, a field engineer's laptop
    /// through the site API): verified like synced ones, applied,
    /// committed, synced.
    pub fn submit(
        &mut self,
        now: Now,
        doc: DocId,
        changes: Vec<SignedChange>,
    ) -> crdt_state::Result<crdt_state::signed::sync::Submitted> {
        let r = self.engine.submit(doc, changes);
        self.pump(now);
        r
    }

    /// Certificates an offline bundle carries, checked against the root;
    /// returns those refused.
    pub fn add_certs(&mut self, certs: Vec<crdt_state::Certificate>) -> Vec<crdt_state::Error> {
        self.engine.add_certs(certs)
    }

    /// The node's runtime status: written into the node's document when it
    /// differs from the last report (device values alone at most every
    /// `values_every_ms`).
    pub fn report(
        &mut self,
        now: Now,
        workloads: BTreeMap<String, WorkloadReport>,
        devices: BTreeMap<String, DeviceReport>,
        artifacts: BTreeMap<String, ArtifactReport>,
    ) {
        if self.failing {
            // Commits are failing: a report would be one more change held
            // in memory. The next one after the disk recovers differs from
            // the last written, so it is written then.
            return;
        }
        let mut workloads = workloads;
        for (app, r) in workloads.iter_mut() {
            if let Some((rev, _)) = self.asked.get(app) {
                r.revision = Some(rev.clone());
            }
        }
        self.roll_back_failures(now, &workloads);
        let heads = |id: &DocId| -> Vec<String> {
            let mut h: Vec<String> = self
                .engine
                .doc(id)
                .map(|d| d.heads().iter().map(|h| h.to_string()).collect())
                .unwrap_or_default();
            h.sort();
            h
        };
        let mut report = NodeReport {
            fleet_heads: heads(&DocId::Fleet),
            site_heads: self
                .me
                .cert
                .site
                .as_ref()
                .map(|s| heads(&DocId::Site(s.clone())))
                .unwrap_or_default(),
            workloads,
            reconciled_at: 0,
            peers: self
                .contacts
                .iter()
                .filter(|(_, c)| c.connected)
                .map(|(n, _)| n.clone())
                .collect(),
            devices,
            artifacts,
            security: self.recent_security.iter().cloned().collect(),
            uplink: self.uplink.clone(),
            rollbacks: self.rollbacks.clone(),
        };
        if let Some(last) = &self.last_report {
            let mut same = report.clone();
            same.reconciled_at = last.reconciled_at;
            if same == *last {
                return;
            }
            // Only reported values (or a fetch's progress) moved: not more
            // often than the setting.
            let mut values_only = same.clone();
            for (k, d) in values_only.devices.iter_mut() {
                if let Some(old) = last.devices.get(k) {
                    d.values = old.values.clone();
                }
            }
            // The backlog's figures move with every batch: reported with
            // the values, not more often (its coming and going at once).
            if values_only.uplink.is_some() && last.uplink.is_some() {
                values_only.uplink = last.uplink.clone();
            }
            for (k, a) in values_only.artifacts.iter_mut() {
                if let Some(old) = last.artifacts.get(k)
                    && old.hash == a.hash
                    && a.held < a.size
                {
                    a.held = old.held;
                    a.from = old.from.clone();
                }
            }
            if values_only == *last
                && now.mono_ms.saturating_sub(self.last_values) < self.settings.values_every_ms
            {
                return;
            }
        }
        self.last_values = now.mono_ms;
        report.reconciled_at = now.unix_s;
        let id = self.node_doc();
        let empty = Document::new(id.clone());
        let ops = report.ops(self.engine.doc(&id).unwrap_or(&empty));
        let me = self.me.clone();
        match self.write_ops(now, &[(id, ops)], &me, None) {
            Ok(_) => self.last_report = Some(report),
            Err(e) => self.actions.push_back(Action::Security {
                who: me.cert.name.clone(),
                reason: format!("own report not written: {e}"),
            }),
        }
    }

    /// Saves what is pending (sync states, the peer list): at shutdown.
    pub fn flush(&mut self, now: Now) {
        self.last_state_flush = now.mono_ms;
        if !self.pending_states.is_empty() {
            let states = self
                .pending_states
                .drain()
                .map(|((k, d), s)| (k, d, s))
                .collect();
            self.actions.push_back(Action::SaveSyncStates(states));
        }
        if self.peers_dirty {
            self.peers_dirty = false;
            self.actions
                .push_back(Action::SavePeers(self.known_peers.clone()));
        }
    }

    // ----- reads --------------------------------------------------------

    /// The sync engine (its documents and trust).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// A document held.
    pub fn doc(&self, id: &DocId) -> Option<&Document> {
        self.engine.doc(id)
    }

    /// The trust the engine verifies with.
    pub fn trust(&self) -> &Trust {
        self.engine.trust()
    }

    /// This daemon's identity.
    pub fn me(&self) -> &Identity {
        &self.me
    }

    /// Peers by name: connected now, last heard.
    pub fn contacts(&self) -> &BTreeMap<String, Contact> {
        &self.contacts
    }

    /// The node's uplink backlog for its next report (`None`: it keeps up).
    pub fn set_uplink(&mut self, uplink: Option<model::UplinkReport>) {
        self.uplink = uplink;
    }

    /// Notes a security event (the core's own, which it raised as
    /// [`Action::Security`], or one its driver saw) for the node's next
    /// report; the oldest beyond
    /// [`crdt_state::fleet::model::SECURITY_REPORTED`] are dropped.
    pub fn note_security(&mut self, at: i64, who: &str, reason: &str) {
        use crdt_state::fleet::model::{SECURITY_REPORTED, SecurityReport};
        if self.recent_security.len() == SECURITY_REPORTED {
            self.recent_security.pop_front();
        }
        self.recent_security.push_back(SecurityReport {
            at,
            who: who.to_string(),
            reason: reason.to_string(),
        });
    }

    /// The name of an admitted connection's peer.
    pub fn name_of(&self, conn: &C) -> Option<String> {
        self.names.get(conn).cloned()
    }

    /// Every admitted connection and its peer's name.
    pub fn admitted(&self) -> impl Iterator<Item = (&C, &str)> {
        self.names.iter().map(|(c, n)| (c, n.as_str()))
    }

    /// The last report written into the node's document.
    pub fn last_report(&self) -> Option<&NodeReport> {
        self.last_report.as_ref()
    }

    /// Security events raised so far.
    pub fn security_events(&self) -> u64 {
        self.security_events
    }

    /// Commits that failed so far.
    pub fn commit_failures(&self) -> u64 {
        self.commit_failures
    }

    /// A mark for everything applied so far: once [`Core::committed_mark`]
    /// reaches it, all of it is stored (an answer that promises a write
    /// is durable waits for that).
    pub fn applied_mark(&self) -> u64 {
        self.applied_seq
    }

    /// How far committed changes reach (see [`Core::applied_mark`]).
    pub fn committed_mark(&self) -> u64 {
        self.committed_seq
    }

    /// Engine outputs held behind a commit (frames not yet sent).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The fleet document and this node's site document, read.
    pub fn desired(&self) -> (std::sync::Arc<FleetView>, Option<model::SiteOverrideSpec>) {
        let fleet = self
            .engine
            .doc(&DocId::Fleet)
            .map(crate::gates::fleet_view)
            .unwrap_or_default();
        let site = self
            .me
            .cert
            .site
            .as_ref()
            .and_then(|s| self.engine.doc(&DocId::Site(s.clone())))
            .map(model::read_site);
        (fleet, site)
    }

    /// The node's share now: fleet state for it, its site's overrides on
    /// top, each app under a rollout at the revision its wave (or its own
    /// rollback) gives it. Remembers which revision it asked for of each,
    /// for its reports; [`Core::preview_share`] only looks.
    pub fn share(&mut self) -> Vec<Workload> {
        let (share, fleet) = self.compute_share();
        // Rollbacks of revisions no rollout names any more are forgotten.
        self.rollbacks.retain(|app, b| {
            fleet
                .rollouts
                .get(app)
                .is_some_and(|r| r.revision == b.revision)
        });
        self.asked = share
            .iter()
            .map(|w| {
                let spec = match fleet.apps.get(&w.app) {
                    Some(a) if rollout::revision(a) == w.revision => a.clone(),
                    _ => fleet
                        .rollouts
                        .get(&w.app)
                        .and_then(|r| r.from.clone())
                        .unwrap_or_else(|| w.spec.clone()),
                };
                (w.app.clone(), (w.revision.clone(), spec))
            })
            .collect();
        share
    }

    /// A rollout as this daemon sees it (an anchor: with the health it has
    /// watched; anything else: health over time unknown).
    pub fn rollout_status(&self, app: &str, now: Now) -> Option<rollout::RolloutStatus> {
        let fleet = self.engine.doc(&DocId::Fleet)?;
        self.gates.status(now, fleet, self.engine.docs(), app)
    }

    /// The share [`Core::share`] would hand the runtime now.
    pub fn preview_share(&self) -> Vec<Workload> {
        self.compute_share().0
    }

    fn compute_share(&self) -> (Vec<Workload>, std::sync::Arc<FleetView>) {
        let (fleet, site) = self.desired();
        let name = &self.me.cert.name;
        let rolled_back = self
            .rollbacks
            .iter()
            .filter(|(app, b)| {
                fleet
                    .rollouts
                    .get(*app)
                    .is_some_and(|r| r.revision == b.revision)
            })
            .map(|(a, b)| (a.clone(), b.revision.clone()))
            .collect();
        let heads = self
            .engine
            .doc(&DocId::Fleet)
            .map(|d| d.heads())
            .unwrap_or_default();
        // Every registered node counts as healthy for replica placement
        // until reports of health feed into it.
        let share = placement::share_with(
            &fleet,
            site.as_ref(),
            name,
            &|_| true,
            &rolled_back,
            &mut |app| crate::gates::wave_of(&heads, &fleet, app, name),
        );
        (share, fleet)
    }

    /// A node that runs the new revision of a rollout in progress and sees
    /// it fail goes back to the revision before, on its own (ADR 0011).
    fn roll_back_failures(&mut self, now: Now, workloads: &BTreeMap<String, WorkloadReport>) {
        let failing: Vec<(String, String, String)> = workloads
            .iter()
            .filter_map(|(app, r)| {
                let (rev, spec) = self.asked.get(app)?;
                let why = rollout::failure(spec, r)?;
                Some((app.clone(), rev.clone(), why))
            })
            .collect();
        if failing.is_empty() {
            return;
        }
        let (fleet, _) = self.desired();
        for (app, rev, why) in failing {
            let Some(state) = fleet.rollouts.get(&app) else {
                continue;
            };
            if state.revision != rev
                || !state.in_progress()
                || self.rollbacks.get(&app).is_some_and(|b| b.revision == rev)
            {
                continue;
            }
            self.rollbacks.insert(
                app.clone(),
                model::RollbackReport {
                    revision: rev,
                    reason: why.clone(),
                    at: now.unix_s,
                },
            );
            self.reconcile_due = true;
            self.actions
                .push_back(Action::RolledBack { app, reason: why });
        }
        if self.reconcile_due {
            self.reconcile(now);
        }
    }

    /// The node's current document (highest epoch held).
    pub fn node_doc(&self) -> DocId {
        let name = &self.me.cert.name;
        let epoch = self
            .engine
            .docs()
            .filter_map(|d| match d.id() {
                DocId::Node { name: n, epoch } if n == name => Some(*epoch),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        DocId::Node {
            name: name.clone(),
            epoch,
        }
    }

    // ----- inside -------------------------------------------------------

    fn reconcile(&mut self, now: Now) {
        self.reconcile_due = false;
        self.last_reconcile = now.mono_ms;
        self.actions.push_back(Action::Reconcile);
    }

    /// Takes the engine's outputs and releases what may go.
    fn pump(&mut self, now: Now) {
        self.take_outputs();
        if self.failing && self.held.len() > self.settings.max_held && !self.conns.is_empty() {
            // The disk refuses commits and what arrives piles up: stop the
            // inflow until a commit succeeds.
            let conns: Vec<C> = self.conns.keys().copied().collect();
            for conn in conns {
                self.actions.push_back(Action::Disconnect {
                    conn,
                    reason: "commits are failing here; resync later".into(),
                });
                self.forget_conn(now, conn);
            }
            self.take_outputs();
        }
        self.release(now);
    }

    fn take_outputs(&mut self) {
        while let Some(output) = self.engine.poll_output() {
            let seq = if matches!(output, Output::Persist { .. }) {
                self.applied_seq += 1;
                self.applied_seq
            } else {
                0
            };
            self.held.push_back(Held {
                output,
                in_batch: false,
                seq,
            });
        }
    }

    /// Releases held outputs up to the first change not yet committed, and
    /// starts its commit.
    fn release(&mut self, now: Now) {
        if self.in_flight.is_some() || self.retry {
            return;
        }
        while let Some(front) = self.held.front() {
            if matches!(front.output, Output::Persist { .. }) {
                self.start_commit();
                return;
            }
            if let Some(h) = self.held.pop_front() {
                self.carry(h.output, now);
            }
        }
        if self.reconcile_due && self.settings.workloads {
            // A new desired state: act on it now, not at the next tick.
            self.reconcile(now);
        }
        if self.settings.state_flush_ms == 0 {
            self.flush(now);
        }
    }

    /// Hands out every held change in one commit.
    fn start_commit(&mut self) {
        let mut changes: Batch = Vec::new();
        for h in &mut self.held {
            if let Output::Persist { doc, changes: c } = &h.output {
                h.in_batch = true;
                changes.push((doc.clone(), c.clone()));
            }
        }
        if changes.is_empty() {
            return;
        }
        // The documents hold exactly what is stored plus this batch now:
        // the moment a snapshot of them may replace their chunks.
        let mut adds: BTreeMap<DocId, u64> = BTreeMap::new();
        for (doc, c) in &changes {
            *adds.entry(doc.clone()).or_default() += c.len() as u64;
        }
        let mut snapshots = BTreeMap::new();
        self.in_flight_chunks.clear();
        for (doc, n) in adds {
            let stored = self.chunks.get(&doc).copied().unwrap_or(0);
            if stored + n >= self.settings.compact_after
                && let Some(d) = self.engine.doc(&doc)
            {
                snapshots.insert(doc.clone(), d.save());
                self.in_flight_chunks.push((doc, None));
            } else {
                self.in_flight_chunks.push((doc, Some(n)));
            }
        }
        self.next_batch += 1;
        self.in_flight = Some(self.next_batch);
        self.actions.push_back(Action::Commit {
            batch: self.next_batch,
            changes,
            snapshots,
        });
    }

    /// One released engine output.
    fn carry(&mut self, output: Output, now: Now) {
        match output {
            Output::Persist { .. } => {}
            Output::Send { peer, frame } => {
                if let Some(conn) = self.keys.get(&peer) {
                    self.actions.push_back(Action::Send { conn: *conn, frame });
                }
            }
            Output::SaveSyncState { peer, doc, state } => {
                self.pending_states.insert((peer, doc), state);
            }
            Output::Dropped { doc } => {
                self.pending_states.retain(|(_, d), _| *d != doc);
                self.chunks.remove(&doc);
                self.actions.push_back(Action::DropDoc(doc));
            }
            Output::Changed { doc } => {
                if doc == DocId::Fleet {
                    self.cut_revoked(now);
                }
                let my_site = self.me.cert.site.as_ref().map(|s| DocId::Site(s.clone()));
                if doc == DocId::Fleet || Some(&doc) == my_site.as_ref() {
                    self.reconcile_due = true;
                }
                self.actions.push_back(Action::Changed(doc));
            }
            Output::Security { peer, reason } => {
                self.security_events += 1;
                let who = self
                    .engine
                    .trust()
                    .cert(&peer)
                    .map(|c| c.name.clone())
                    .unwrap_or_else(|| peer.short());
                self.actions.push_back(Action::Security { who, reason });
            }
            Output::Disconnect { peer, reason } => {
                if let Some(conn) = self.keys.get(&peer) {
                    self.actions.push_back(Action::Disconnect {
                        conn: *conn,
                        reason,
                    });
                }
            }
        }
    }

    /// Cuts off connected peers whose certificate was revoked, and forgets
    /// them at once: the mesh closes a refused connection only after a
    /// grace period (so the refusal reaches the peer), and nothing written
    /// from now on may be sent to it meanwhile.
    fn cut_revoked(&mut self, now: Now) {
        let revoked: Vec<(C, PublicKey)> = self
            .conns
            .iter()
            .filter(|(_, k)| self.engine.trust().is_revoked(k))
            .map(|(c, k)| (*c, *k))
            .collect();
        for (conn, key) in revoked {
            self.actions.push_back(Action::Reject {
                conn,
                reason: format!("{} was revoked", key.short()),
            });
            self.forget_conn(now, conn);
        }
    }

    /// Timeline entries for changes that arrived from peers (not made here).
    fn note_merges(&mut self, persisted: &[(DocId, Vec<(ChangeHash, SignedChange)>)]) {
        for (id, changes) in persisted {
            if matches!(id, DocId::Node { .. }) {
                continue;
            }
            let mut writers = BTreeSet::new();
            let mut n = 0;
            for (hash, c) in changes {
                if self.local_hashes.remove(hash) {
                    continue;
                }
                n += 1;
                if let (Ok(ch), Some(doc)) = (
                    crdt_state::signed::doc::decode_change(&c.bytes),
                    self.engine.doc(id),
                ) && let Some(key) = doc.actor_key(ch.actor_id())
                {
                    let name = self
                        .engine
                        .trust()
                        .cert(&key)
                        .map(|c| c.name.clone())
                        .unwrap_or_else(|| key.short());
                    writers.insert(name);
                }
            }
            if n > 0 {
                let who: Vec<String> = writers.into_iter().collect();
                self.actions.push_back(Action::Timeline {
                    kind: "merged",
                    subject: id.to_string(),
                    text: format!(
                        "{n} change(s) to {id} merged, written by {}",
                        who.join(", ")
                    ),
                });
            }
        }
    }
}
