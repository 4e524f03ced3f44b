//! The driver both daemons share: the data dir (store), the mesh and the
//! control socket around one [`Core`], and the clock it is given.
//!
//! A composition (the edge node in `node`, the anchor in `cloud-anchor`)
//! opens a [`Base`], runs its own `select!` over [`Base::recv`] and its own
//! sources (HTTP servers, devices, a tick), hands each input to the base or
//! to the core, and then takes [`Base::next_action`] until it returns
//! `None`: the base carries out what touches the mesh and the store itself
//! (admission, frames, commits, saved states, the peer list) and returns the
//! rest (reconcile, report, view updates) for the composition to do.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, anyhow};
use crdt_state::local::store::Prepared;
use crdt_state::signed::sync::{Engine, SyncConfig};
use crdt_state::{DataDir, DocId, Identity};
use mesh::{Event, Mesh, Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use crate::command::{Answer, Incoming, Refusal};
use crate::control;
use crate::core::{Action, Arrival, Core, Now, Settings};
use crate::enroll::{self, ADDRS_FILE};

/// Where the daemon listens and whom it dials.
#[derive(Clone, Debug, Default)]
pub struct MeshOptions {
    /// The data dir.
    pub data_dir: PathBuf,
    /// Addresses to listen on (empty: every interface, `default_port`).
    pub listen: Vec<Multiaddr>,
    /// Peers to keep connected to (besides those in `peers.json`).
    pub peers: Vec<Multiaddr>,
    /// mDNS discovery on the local network.
    pub mdns: bool,
    /// Most bytes the blob store may hold (artifacts).
    pub blob_quota: Option<u64>,
}

/// What a composition asks of the mesh.
#[derive(Clone, Debug, Default)]
pub struct Role {
    /// UDP port when no listen address is given (0: any).
    pub default_port: u16,
    /// Serve circuit relay (anchors).
    pub relay_server: bool,
    /// Request protocols answered here (the anchor's enrollment).
    pub serve: Vec<mesh::StreamProtocol>,
    /// What it does with data up (`/shoal/data/1`).
    pub data: DataMode,
}

/// What a daemon does with data up from the edge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DataMode {
    /// Sends its readings and records up to an anchor (an edge node).
    #[default]
    Send,
    /// Lands what nodes send (an anchor); `export`: queues it for an
    /// exporter as well.
    Land {
        /// Queue landed batches for the exporter.
        export: bool,
    },
}

/// One input from the shared sources.
pub enum Input {
    /// A mesh event.
    Mesh(Event),
    /// A command from a surface (the control socket, the operator API, the
    /// site API), for [`crate::command::dispatch`].
    Command(Incoming),
    /// The writer thread finished a commit.
    Committed(u64, Result<(), String>),
    /// A blob task finished something.
    Blob(crate::blobs::Event),
    /// A data stream ended or was refused something.
    Data(crate::data_up::Event),
    /// An enrollment's token was checked and spent on a blocking thread:
    /// the composition writes its certificate ([`Base::enrolled`]).
    Enrolled(Box<Enrolling>),
    /// The mesh stopped.
    Closed,
}

/// A request on a served protocol, for the composition to answer.
pub struct Request {
    /// The peer.
    pub peer: PeerId,
    /// Its address.
    pub addr: Multiaddr,
    /// The protocol.
    pub protocol: mesh::StreamProtocol,
    /// The request.
    pub bytes: Vec<u8>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Vec<u8>>,
}

/// How often blobs no artifact names are looked for, besides each change
/// of the set of artifacts.
pub const COLLECT_EVERY_MS: u64 = 10 * 60 * 1000;
/// A blob written within this long is kept even if no artifact names it
/// yet (a push copies the blob, then applies its Artifact).
pub const COLLECT_GRACE: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// The last collection of blobs: when, the fleet document's heads then,
/// and the blobs its artifacts named.
struct LastCollect {
    at: u64,
    heads: Vec<automerge::ChangeHash>,
    named: std::collections::HashSet<blobs::Hash>,
}

/// An enrollment request whose token was checked (and spent) off the loop.
pub struct Enrolling {
    /// The peer that asked.
    pub peer: PeerId,
    /// Its address.
    pub addr: Multiaddr,
    /// The certificate and Node, or why not.
    pub result: anyhow::Result<enroll::Enrollment>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Vec<u8>>,
}

/// Answers that leave only once what their request wrote is committed
/// (the CLI through the socket, the site API, the operator API).
pub struct AfterCommit<R> {
    waiting: Vec<(u64, oneshot::Sender<R>, R)>,
}

impl<R> Default for AfterCommit<R> {
    fn default() -> Self {
        AfterCommit {
            waiting: Vec::new(),
        }
    }
}

impl<R> AfterCommit<R> {
    /// Holds `answer` until everything the core applied so far is committed.
    pub fn hold<C: Copy + Eq + std::hash::Hash + std::fmt::Debug>(
        &mut self,
        core: &Core<C>,
        reply: oneshot::Sender<R>,
        answer: R,
    ) {
        self.waiting.push((core.applied_mark(), reply, answer));
    }

    /// Whether any held answer may leave now.
    pub fn any_ready<C: Copy + Eq + std::hash::Hash + std::fmt::Debug>(
        &self,
        core: &Core<C>,
    ) -> bool {
        let done = core.committed_mark();
        self.waiting.iter().any(|(mark, _, _)| *mark <= done)
    }

    /// Sends the answers whose writes are committed now.
    pub fn release<C: Copy + Eq + std::hash::Hash + std::fmt::Debug>(&mut self, core: &Core<C>) {
        if !self.any_ready(core) {
            return;
        }
        let done = core.committed_mark();
        let (ready, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(mark, _, _)| *mark <= done);
        self.waiting = wait;
        for (_, reply, answer) in ready {
            let _ = reply.send(answer);
        }
    }
}

/// Frames and bytes sent (for an anchor's metrics).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    /// Frames.
    pub messages: u64,
    /// Bytes.
    pub bytes: u64,
}

/// The shared part of a running daemon.
pub struct Base {
    /// The data dir: the store, and the verbs of the control socket.
    pub dd: DataDir,
    /// Every decision.
    pub core: Core<PeerId>,
    /// The mesh.
    pub mesh: Mesh,
    /// Frames sent so far.
    pub sent: Sent,
    events: mesh::Events,
    commands: mpsc::Receiver<Incoming>,
    commands_tx: mpsc::Sender<Incoming>,
    listening: Vec<String>,
    started: Instant,
    /// Commits run on a blocking thread; their outcomes come back here.
    done_tx: mpsc::UnboundedSender<(u64, Result<(), String>)>,
    done_rx: mpsc::UnboundedReceiver<(u64, Result<(), String>)>,
    /// The documents of the commit in flight.
    committing: Vec<DocId>,
    /// Commands answered once what they wrote is committed.
    answers: AfterCommit<Result<Answer, Refusal>>,
    /// Artifacts: the blob store, what is served and fetched.
    pub blobs: crate::blobs::Blobs,
    blob_rx: mpsc::UnboundedReceiver<crate::blobs::Event>,
    /// Data up: the node's stream to an anchor, or the anchor's landing.
    pub data: crate::data_up::DataUp,
    data_rx: mpsc::UnboundedReceiver<crate::data_up::Event>,
    /// When blobs were last collected, and the fleet and artifacts then.
    last_collect: Option<LastCollect>,
    /// Enrollments checked on blocking threads come back here.
    enroll_tx: mpsc::UnboundedSender<Enrolling>,
    enroll_rx: mpsc::UnboundedReceiver<Enrolling>,
    /// Actions of the base's own (blob security events, a blob ready).
    own: std::collections::VecDeque<Action<PeerId>>,
    /// Commit on the loop (at shutdown).
    inline: bool,
}

/// Loads every stored document into a sync engine for `me`.
pub fn load_engine(dd: &DataDir, me: &Identity) -> anyhow::Result<Engine> {
    let store = dd.store();
    let mut docs = Vec::new();
    for id in store.doc_ids()? {
        if let Some(doc) = store.load(&id)? {
            let sigs = store.signatures(&id)?;
            docs.push((doc, sigs));
        }
    }
    // Sessions are reliable streams, and a failed one restarts from a
    // digest; the periodic digest is only a backstop (cost: ~100 bytes
    // per peer per 5 minutes).
    let config = SyncConfig {
        reannounce_ms: 300_000,
        ..SyncConfig::default()
    };
    Ok(Engine::new(
        me.cert.clone(),
        dd.trust().clone(),
        docs,
        config,
    ))
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Base {
    /// Loads the store into a core for `me`, starts the mesh and the
    /// control socket.
    pub async fn open(
        dd: DataDir,
        me: Identity,
        mut settings: Settings,
        opts: &MeshOptions,
        role: Role,
    ) -> anyhow::Result<Base> {
        let engine = load_engine(&dd, &me)?;
        let mut config = mesh::Config::new(me.secret_bytes());
        config.listen = if opts.listen.is_empty() {
            vec![format!("/ip4/0.0.0.0/udp/{}/quic-v1", role.default_port).parse()?]
        } else {
            opts.listen.clone()
        };
        let mut known_peers = enroll::read_peers(&opts.data_dir);
        for p in &opts.peers {
            // DNS names (replicas on a cluster) are resolved at start.
            let p = match mesh::resolve_dns(p) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "peer skipped");
                    continue;
                }
            };
            if !known_peers.contains(&p.to_string()) {
                known_peers.push(p.to_string());
            }
        }
        let own = mesh::peer_id_of(&me.key().0);
        for p in &known_peers {
            match p.parse::<Multiaddr>() {
                // Replicas share one list of anchors, themselves included.
                Ok(a) if mesh::peer_of(&a).is_some() && mesh::peer_of(&a) == own => {}
                Ok(a) if mesh::peer_of(&a).is_some() => config.peers.push(a),
                _ => anyhow::bail!("peer address {p} must be a multiaddr ending in /p2p/<peer id>"),
            }
        }
        config.mdns = opts.mdns;
        config.relay_server = role.relay_server;
        config.serve = role.serve;
        config.serve_streams.push(mesh::BLOB);
        if matches!(role.data, DataMode::Land { .. }) {
            config.serve_streams.push(mesh::DATA);
        }
        let root = dd.trust().root();
        let (mesh, events) = Mesh::start(config, crate::hello::encode(root, &me.cert))
            .map_err(|e| anyhow!("{e}"))?;
        // One queue for every surface's commands; a full queue makes the
        // surfaces wait (their HTTP or socket clients with them).
        let (commands_tx, commands) = mpsc::channel::<Incoming>(64);
        control::serve(&opts.data_dir, commands_tx.clone()).await?;
        tracing::info!(peer = %mesh.peer_id(), name = %me.cert.name, "daemon started");
        settings.known_peers = known_peers;
        settings.stored_chunks = dd.store().chunk_counts()?;
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let (blob_tx, blob_rx) = mpsc::unbounded_channel();
        let (enroll_tx, enroll_rx) = mpsc::unbounded_channel();
        let store = crate::artifact::store(dd.path(), opts.blob_quota)?;
        let blobs = crate::blobs::Blobs::new(store, blob_tx);
        let (data_tx, data_rx) = mpsc::unbounded_channel();
        let data = match role.data {
            DataMode::Send => crate::data_up::DataUp::send(dd.shared_store(), me.clone(), data_tx),
            DataMode::Land { export } => {
                crate::data_up::DataUp::land(dd.shared_store(), dd.trust().clone(), export, data_tx)
            }
        };
        Ok(Base {
            dd,
            core: Core::new(engine, me, settings),
            mesh,
            sent: Sent::default(),
            events,
            commands,
            commands_tx,
            listening: Vec::new(),
            started: Instant::now(),
            done_tx,
            done_rx,
            committing: Vec::new(),
            answers: AfterCommit::default(),
            blobs,
            blob_rx,
            data,
            data_rx,
            enroll_tx,
            enroll_rx,
            last_collect: None,
            own: std::collections::VecDeque::new(),
            inline: false,
        })
    }

    /// Hands the core its start (a node reconciles from its store before it
    /// hears any peer).
    pub fn start(&mut self) {
        let t = self.now();
        self.core.start(t);
    }

    /// The time for the core.
    pub fn now(&self) -> Now {
        Now {
            mono_ms: self.started.elapsed().as_millis() as u64,
            unix_s: unix_now(),
        }
    }

    /// The next input from the mesh or the control socket (cancel-safe).
    pub async fn recv(&mut self) -> Input {
        tokio::select! {
            ev = self.events.next() => match ev {
                Some(ev) => Input::Mesh(ev),
                None => Input::Closed,
            },
            Some(inc) = self.commands.recv() => Input::Command(inc),
            Some((batch, result)) = self.done_rx.recv() => Input::Committed(batch, result),
            Some(ev) = self.blob_rx.recv() => Input::Blob(ev),
            Some(ev) = self.data_rx.recv() => Input::Data(ev),
            Some(e) = self.enroll_rx.recv() => Input::Enrolled(Box::new(e)),
        }
    }

    /// The addresses this daemon listens on (with its peer id).
    pub fn addrs(&self) -> &[String] {
        &self.listening
    }

    /// Where a surface sends its commands.
    pub fn commands(&self) -> mpsc::Sender<Incoming> {
        self.commands_tx.clone()
    }

    /// Hands one input to the core; a request on a served protocol comes
    /// back for the composition to answer. A command is the composition's
    /// to dispatch ([`crate::command::dispatch`]), since it may need more
    /// than the base.
    pub fn handle(&mut self, input: Input) -> Option<Request> {
        match input {
            Input::Mesh(ev) => self.on_mesh(ev),
            Input::Command((_, cmd, reply)) => {
                tracing::error!(verb = cmd.verb(), "a command reached Base::handle; refused");
                let _ = reply.send(Err(Refusal::new(500, "command not dispatched")));
                None
            }
            Input::Committed(batch, result) => {
                self.finish_commit(batch, result);
                None
            }
            Input::Blob(ev) => {
                let t = self.now();
                let out = self.blobs.on_event(&self.mesh, t.mono_ms, ev);
                for (peer, reason) in out.security {
                    self.peer_security(peer, reason);
                }
                if !out.ready.is_empty() {
                    // A wanted artifact is whole: what waited for it may run.
                    self.own.push_back(Action::Reconcile);
                }
                None
            }
            Input::Data(ev) => {
                let t = self.now();
                if let Some((peer, reason)) = self.data.on_event(&self.mesh, t.mono_ms, ev) {
                    self.peer_security(peer, reason);
                }
                None
            }
            Input::Enrolled(e) => {
                tracing::error!(peer = %e.peer, "an enrollment reached Base::handle; refused");
                let answer = enroll::EnrollResponse::Refused("enrollment not handled".into());
                let _ = e
                    .reply
                    .send(serde_json::to_vec(&answer).unwrap_or_default());
                None
            }
            Input::Closed => None,
        }
    }

    fn on_mesh(&mut self, ev: Event) -> Option<Request> {
        let t = self.now();
        match ev {
            Event::Listening(addr) => {
                let me = self.mesh.peer_id();
                let full = if mesh::peer_of(&addr) == Some(me) {
                    addr
                } else {
                    addr.with(mesh::multiaddr_p2p(me))
                };
                crate::say!("listening on {full}");
                self.listening.push(full.to_string());
                // Whole or not at all (written then renamed): the CLI and
                // tests read it while the daemon adds addresses.
                let path = self.dd.path().join(ADDRS_FILE);
                let tmp = path.with_extension("json.tmp");
                if let Ok(text) = serde_json::to_vec_pretty(&self.listening)
                    && std::fs::write(&tmp, text).is_ok()
                {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
            Event::Hello { peer, addr, hello } => {
                // Keep peers whose address we dialed or that dialed us from
                // their listening socket.
                let dialable = (!mesh::is_relayed(&addr))
                    .then(|| addr.clone().with(mesh::multiaddr_p2p(peer)).to_string());
                let from = format!("{peer} at {addr}");
                let proven = mesh::key_of(&peer);
                let store = self.dd.store();
                let arrival = Arrival {
                    conn: peer,
                    bytes: &hello,
                    proves: &|k| Some(k.0) == proven,
                    from: &from,
                    dialable,
                };
                self.core.hello(t, arrival, &mut |key| {
                    store.sync_states_of(&key.to_hex()).unwrap_or_default()
                });
            }
            Event::Frame { peer, bytes } => self.core.frame(t, peer, bytes),
            Event::Down { peer } => {
                self.blobs.peer_down(&self.mesh, peer);
                self.data.peer_down(peer);
                self.core.down(t, peer);
            }
            Event::Stream {
                peer,
                protocol,
                stream,
            } if protocol == mesh::BLOB => {
                let admitted = self.core.name_of(&peer).is_some();
                self.blobs.serve(admitted, peer, stream);
            }
            Event::Stream {
                peer,
                protocol,
                stream,
            } if protocol == mesh::DATA => match self.core.name_of(&peer) {
                Some(name) => self.data.serve(peer, name, stream),
                None => tracing::debug!(%peer, "a data stream from a peer not admitted; closed"),
            },
            Event::Stream { peer, protocol, .. } => {
                tracing::debug!(%peer, %protocol, "a stream on a protocol not served; closed");
            }
            Event::Request {
                peer,
                addr,
                protocol,
                bytes,
                reply,
            } => {
                return Some(Request {
                    peer,
                    addr,
                    protocol,
                    bytes,
                    reply,
                });
            }
        }
        None
    }

    /// Sends a command's answer: a read of the store runs on a blocking
    /// thread and answers from there; anything else waits until what the
    /// core applied so far is committed.
    pub fn answer(
        &mut self,
        r: Result<Answer, Refusal>,
        reply: oneshot::Sender<Result<Answer, Refusal>>,
    ) {
        match r {
            Ok(Answer::Blocking(read)) => {
                let store = self.dd.shared_store();
                let span = tracing::debug_span!("store_read");
                tokio::task::spawn_blocking(move || {
                    let _entered = span.enter();
                    let _ = reply.send(read(&store));
                });
            }
            other => self.answers.hold(&self.core, reply, other),
        }
    }

    /// Whether any held answer's writes are committed now.
    pub fn answers_ready(&self) -> bool {
        self.answers.any_ready(&self.core)
    }

    /// Sends the answers whose writes are committed.
    pub fn release_answers(&mut self) {
        self.answers.release(&self.core);
    }

    /// Applies manifests as `writer` through the core (the daemon's one
    /// write path).
    pub fn apply(
        &mut self,
        manifests: &[crdt_state::fleet::manifest::Manifest],
        writer: &Identity,
        message: Option<&str>,
    ) -> crdt_state::Result<Vec<crdt_state::local::datadir::Applied>> {
        let core = &self.core;
        let (applied, edits) =
            crdt_state::local::datadir::plan_apply(manifests, &|id| core.doc(id));
        let t = self.now();
        self.core.write_many(t, &edits, writer, message)?;
        Ok(applied)
    }

    /// Deletes an entity as `writer` through the core.
    pub fn delete(
        &mut self,
        kind: crdt_state::fleet::model::Kind,
        name: &str,
        writer: &Identity,
        message: Option<&str>,
    ) -> crdt_state::Result<usize> {
        let core = &self.core;
        let (id, ops) = crdt_state::local::datadir::plan_delete(kind, name, &|id| core.doc(id))?;
        let t = self.now();
        self.core.write_many(t, &[(id, ops)], writer, message)
    }

    /// Writes fields of one document as `writer` through the core.
    pub fn write(
        &mut self,
        id: &DocId,
        ops: &std::collections::BTreeMap<String, Option<String>>,
        writer: &Identity,
        message: Option<&str>,
    ) -> crdt_state::Result<usize> {
        let t = self.now();
        self.core
            .write_many(t, &[(id.clone(), ops.clone())], writer, message)
    }

    /// The data dir's identity (an anchor's operator identity, ADR 0006).
    pub fn identity(&self) -> crdt_state::Result<Identity> {
        self.dd.writer().cloned()
    }

    /// Who writes what the daemon publishes on its own (certificates,
    /// registrations): the data dir's operator identity where there is one
    /// (ADR 0006); else the daemon's own certificate, which may write those
    /// fields (an anchor's, ADR 0013).
    pub fn publisher(&self) -> Identity {
        match self.identity() {
            Ok(w) => w,
            Err(_) => self.core.me().clone(),
        }
    }

    /// Revokes `key` as `writer`: the changes of that key the documents
    /// hold stay valid, any other is refused wherever this reaches.
    pub fn revoke(
        &mut self,
        key: crdt_state::PublicKey,
        reason: &str,
        writer: &Identity,
    ) -> crdt_state::Result<crdt_state::signed::verify::Revocation> {
        let (r, ops) = crdt_state::local::datadir::plan_revoke(
            key,
            reason,
            self.core.engine().docs(),
            self.core.trust(),
        );
        self.write(&DocId::Fleet, &ops, writer, None)?;
        Ok(r)
    }

    /// Verifies and merges a bundle of signed changes made elsewhere, like
    /// changes from a peer (`only`: every document in it must be this one).
    /// A bundle that does not decode, or holds a change that is not one, is
    /// refused whole; one whose change fails verification stops there: the
    /// documents before it (the fleet first) were verified and are kept.
    pub fn import(
        &mut self,
        bytes: &[u8],
        only: Option<&DocId>,
    ) -> Result<crdt_state::local::datadir::ImportReport, Refusal> {
        let bundle = crdt_state::signed::bundle::Bundle::decode(bytes)
            .map_err(|e| Refusal::new(400, format!("bundle: {e}")))?;
        let root = self.core.trust().root();
        if bundle.root != Some(root) {
            return Err(Refusal::new(
                400,
                format!(
                    "the changes belong to fleet {}, this daemon to fleet {}",
                    bundle.root.map(|r| r.short()).unwrap_or_default(),
                    root.short()
                ),
            ));
        }
        if let Some(only) = only
            && let Some((doc, _)) = bundle.docs.iter().find(|(d, _)| d != only)
        {
            return Err(Refusal::new(
                403,
                format!("only {only} may be edited here, not {doc}"),
            ));
        }
        let mut docs = bundle.docs;
        docs.sort_by(|a, b| a.0.rank().cmp(&b.0.rank()).then(a.0.cmp(&b.0)));
        // Every change decodes before any is taken.
        for (doc, changes) in &docs {
            crdt_state::signed::verify::decode(doc, changes)?;
        }
        let certs = bundle.certs;
        if let Some(e) = self.core.add_certs(certs.clone()).into_iter().next() {
            return Err(Refusal::new(400, format!("bundle: a certificate: {e}")));
        }
        if !certs.is_empty() {
            // Kept for the next start, like the certificates the fleet
            // document carries.
            self.off_loop(move |store| {
                if let Err(e) = store.put_certs(&certs) {
                    tracing::warn!(error = %e, "a bundle's certificates not stored");
                }
            });
        }
        let mut report = crdt_state::local::datadir::ImportReport::default();
        let t = self.now();
        for (doc, changes) in docs {
            let s = self.core.submit(t, doc.clone(), changes)?;
            report.waiting += s.waiting;
            if s.applied > 0 {
                report.new_changes.insert(doc.to_string(), s.applied);
            }
        }
        Ok(report)
    }

    /// Starts an enrollment (a request on `/shoal/enroll/1`): its token is
    /// checked and spent, and the certificate signed, on a blocking thread
    /// (they are files: a slow disk must not stall the loop); the outcome
    /// comes back as [`Input::Enrolled`].
    pub fn enroll(&self, req: Request) {
        let dir = self.dd.path().to_path_buf();
        let root = self.core.trust().root();
        let tx = self.enroll_tx.clone();
        let span = tracing::debug_span!("enroll", peer = %req.peer);
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let result = enroll::spend(&dir, &root, &req.bytes, unix_now());
            let _ = tx.send(Enrolling {
                peer: req.peer,
                addr: req.addr,
                result,
                reply: req.reply,
            });
        });
    }

    /// Writes an enrolled node's certificate and Node through the core; the
    /// answer for the node (to send once that is committed).
    pub fn enrolled(
        &mut self,
        result: anyhow::Result<enroll::Enrollment>,
    ) -> enroll::EnrollResponse {
        match result.and_then(|e| self.write_enrollment(e)) {
            Ok(cert) => enroll::EnrollResponse::Certified(cert),
            Err(e) => enroll::EnrollResponse::Refused(format!("{e:#}")),
        }
    }

    fn write_enrollment(
        &mut self,
        e: enroll::Enrollment,
    ) -> anyhow::Result<crdt_state::Certificate> {
        let writer = self.publisher();
        let core = &self.core;
        let (_, mut edits) =
            crdt_state::local::datadir::plan_apply(std::slice::from_ref(&e.node), &|id| {
                core.doc(id)
            });
        let certs = crdt_state::local::datadir::cert_ops(&e.cert);
        match edits.iter_mut().find(|(id, _)| *id == DocId::Fleet) {
            Some((_, ops)) => ops.extend(certs),
            None => edits.push((DocId::Fleet, certs)),
        }
        let t = self.now();
        self.core
            .write_many(t, &edits, &writer, None)
            .context("the token is spent; ask for a new one")?;
        Ok(e.cert)
    }

    /// A tick of the clock (about once a second).
    pub fn tick(&mut self) {
        let t = self.now();
        self.core.tick(t);
        self.blobs.tick(&self.mesh, t.mono_ms);
        self.data.tick(&self.mesh, t.mono_ms);
        if self.data.lands() {
            self.data.set_trust(self.core.trust());
        }
        self.collect_blobs(t.mono_ms);
    }

    /// Blobs no artifact names any more are removed: when the set of
    /// artifacts changes, and every [`COLLECT_EVERY_MS`] (what a restart
    /// or a failed removal left). Only the `artifacts.*` fields of the fleet
    /// document are read (a handful, whatever the fleet's size).
    fn collect_blobs(&mut self, mono_ms: u64) {
        // The artifacts are read again only when the fleet document moved.
        let heads = self
            .core
            .doc(&DocId::Fleet)
            .map(|d| d.heads())
            .unwrap_or_default();
        if let Some(c) = &self.last_collect
            && c.heads == heads
            && mono_ms.saturating_sub(c.at) < COLLECT_EVERY_MS
        {
            return;
        }
        let named: std::collections::HashSet<blobs::Hash> = self
            .core
            .doc(&DocId::Fleet)
            .map(|d| {
                crdt_state::fleet::model::entities::<crdt_state::fleet::model::ArtifactSpec>(
                    d,
                    crdt_state::fleet::model::Kind::Artifact,
                )
            })
            .unwrap_or_default()
            .values()
            .filter_map(|a| blobs::Hash::parse(&a.hash).ok())
            .collect();
        let due = self
            .last_collect
            .as_ref()
            .is_none_or(|c| c.named != named || mono_ms.saturating_sub(c.at) >= COLLECT_EVERY_MS);
        let at = if due {
            self.blobs.collect(named.clone(), COLLECT_GRACE);
            mono_ms
        } else {
            self.last_collect.as_ref().map_or(mono_ms, |c| c.at)
        };
        self.last_collect = Some(LastCollect { at, heads, named });
    }

    /// Carries out the core's actions on the mesh and the store, and
    /// returns the next one that is the composition's to do.
    pub fn next_action(&mut self) -> Option<Action<PeerId>> {
        if let Some(a) = self.own.pop_front() {
            if let Action::Security { who, reason } = &a {
                self.security_seen(who, reason);
            }
            return Some(a);
        }
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Admit {
                    conn,
                    name,
                    from,
                    relay,
                } => {
                    tracing::info!(peer = %conn, %from, %name, "peer admitted");
                    self.mesh.admit(conn);
                    let anchor = mesh::key_of(&conn).and_then(|k| {
                        self.core
                            .trust()
                            .cert(&crdt_state::PublicKey(k))
                            .map(|c| c.role)
                    }) == Some(crdt_state::Role::Anchor);
                    self.blobs.peer_up(&self.mesh, conn, anchor);
                    let t = self.now();
                    self.data.peer_up(&self.mesh, conn, anchor, t.mono_ms);
                    if relay {
                        self.mesh.listen_via(conn);
                    }
                }
                Action::Reject { conn, reason } => {
                    tracing::warn!(peer = %conn, %reason, "peer refused");
                    self.blobs.peer_down(&self.mesh, conn);
                    self.data.peer_down(conn);
                    self.mesh.reject(conn, reason);
                }
                Action::Send { conn, frame } => {
                    self.sent.messages += 1;
                    self.sent.bytes += frame.len() as u64;
                    self.mesh.send(conn, frame);
                }
                Action::Disconnect { conn, reason } => self.mesh.disconnect(conn, reason),
                Action::Commit {
                    batch,
                    changes,
                    snapshots,
                } => self.commit(batch, changes, snapshots),
                Action::SaveSyncStates(states) => {
                    let states: Vec<(String, DocId, Vec<u8>)> = states
                        .into_iter()
                        .map(|(k, d, s)| (k.to_hex(), d, s))
                        .collect();
                    // A lost sync state costs a digest on the next
                    // connection, nothing more: saved off the loop.
                    self.off_loop(move |store| {
                        if let Err(e) = store.put_sync_states(&states) {
                            tracing::warn!(error = %e, "sync states not saved");
                        }
                    });
                }
                Action::DropDoc(doc) => {
                    self.off_loop(move |store| {
                        if let Err(e) = store.drop_doc(&doc) {
                            tracing::warn!(%doc, error = %e, "superseded document not dropped");
                        }
                    });
                }
                Action::SavePeers(peers) => {
                    if let Err(e) = enroll::write_peers(self.dd.path(), &peers) {
                        tracing::warn!(error = %e, "peers not saved");
                    }
                }
                Action::Security { who, reason } => {
                    self.security_seen(&who, &reason);
                    return Some(Action::Security { who, reason });
                }
                other => return Some(other),
            }
        }
        None
    }

    /// A security event about `peer` that the driver saw (a blob or data
    /// peer refused), named as the core knows it, for the composition.
    fn peer_security(&mut self, peer: PeerId, reason: String) {
        let who = match self.core.name_of(&peer) {
            Some(name) => format!("{name} ({peer})"),
            None => peer.to_string(),
        };
        self.own.push_back(Action::Security { who, reason });
    }

    /// A security event, the core's or the driver's own: logged, and kept
    /// for the node's report.
    fn security_seen(&mut self, who: &str, reason: &str) {
        tracing::warn!(%who, %reason, "security event");
        let at = self.now().unix_s;
        self.core.note_security(at, who, reason);
    }

    /// Runs a store write on a blocking thread (on the loop at shutdown):
    /// what a composition stores besides documents (a node's readings).
    pub fn store_write(&self, job: impl FnOnce(&crdt_state::Store) + Send + 'static) {
        self.off_loop(job)
    }

    fn off_loop(&self, job: impl FnOnce(&crdt_state::Store) + Send + 'static) {
        let store = self.dd.shared_store();
        if self.inline {
            job(&store);
        } else {
            let span = tracing::debug_span!("store_write");
            tokio::task::spawn_blocking(move || {
                let _entered = span.enter();
                job(&store);
            });
        }
    }

    /// Hands a commit to a blocking thread (the loop goes on with sync,
    /// the APIs and the devices meanwhile; what follows the commit waits
    /// in the core).
    fn commit(
        &mut self,
        batch: u64,
        changes: crate::core::Batch,
        mut snapshots: std::collections::BTreeMap<DocId, Vec<u8>>,
    ) {
        self.committing = changes.iter().map(|(id, _)| id.clone()).collect();
        let items: Vec<Prepared> = changes
            .into_iter()
            .map(|(doc, changes)| Prepared {
                snapshot: snapshots.remove(&doc),
                doc,
                changes,
            })
            .collect();
        let store = self.dd.shared_store();
        if self.inline {
            let result = store.commit_prepared(&items).map_err(|e| e.to_string());
            self.finish_commit(batch, result);
            return;
        }
        let done = self.done_tx.clone();
        let span = tracing::debug_span!("commit", batch, docs = items.len());
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let result = store.commit_prepared(&items).map_err(|e| e.to_string());
            let _ = done.send((batch, result));
        });
    }

    fn finish_commit(&mut self, batch: u64, result: Result<(), String>) {
        self.committing.clear();
        if let Err(e) = &result {
            // Not stored: the core holds what follows it.
            tracing::error!(error = %e, "could not commit synced changes; holding sends");
        }
        let t = self.now();
        self.core.committed(t, batch, result);
    }

    /// Saves what is pending, stops the mesh and removes the socket.
    pub async fn close(mut self) {
        // A commit still on its thread finishes first; what it held back
        // and anything after it commits on the loop.
        if !self.committing.is_empty()
            && let Some((batch, result)) = self.done_rx.recv().await
        {
            self.finish_commit(batch, result);
        }
        self.inline = true;
        let t = self.now();
        self.core.flush(t);
        while self.next_action().is_some() {}
        self.mesh.shutdown().await;
        let _ = std::fs::remove_file(self.dd.path().join(control::SOCKET_FILE));
    }
}

/// Reads a data dir's addresses file (for tests and tools).
pub fn listening(dir: &Path) -> Vec<String> {
    enroll::read_addrs(dir)
}
