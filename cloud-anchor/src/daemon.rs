//! The anchor's daemon (`shoal anchor run`): the shared driver
//! ([`daemon::driver::Base`]: mesh, store, control socket, and the core that
//! decides) plus what only an anchor has — the operator API and UI over a
//! [`View`], the enrollment server, circuit relay for nodes behind NAT.
//!
//! An anchor holds every document (its certificate's role says so), signs
//! operator edits made through the API with the data dir's operator
//! identity (ADR 0006) while its mesh identity is its own anchor
//! certificate, and listens on UDP 7411 by default.

use crdt_state::local::audit::{AuditEntry, AuditLog};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crdt_state::fleet::model::FleetView;
use crdt_state::{DataDir, DocId, Role};
use daemon::command;
use daemon::driver::{AfterCommit, Base, Enrolling, Input, MeshOptions, Request, unix_now as now};
use daemon::enroll;
use daemon::{Action, Settings};
use tokio::sync::{mpsc, watch};

use crate::view::{AuditMarks, SentEntry};
use crate::{Snapshot, View};

/// The file an anchor writes its HTTP address to (for tools and tests).
pub const HTTP_ADDR_FILE: &str = "http.addr";

/// Anchor daemon settings.
#[derive(Clone)]
pub struct Options {
    /// The data dir, listen addresses, peers, mDNS.
    pub mesh: MeshOptions,
    /// Serve the operator HTTP API and UI here.
    pub http: Option<std::net::SocketAddr>,
    /// Over TLS with this configuration; plain HTTP when absent (only
    /// with `--insecure-http`, and the UI says so).
    pub tls: Option<Arc<daemon::tls::ServerConfig>>,
    /// Demo controls for the UI (`shoal demo` only).
    pub demo: Option<Arc<dyn crate::Demo>>,
    /// Copy the data that comes up to this PostgreSQL as well
    /// (`postgres://…`).
    pub readings_db: Option<String>,
    /// Keep the data that came up this long in the anchor's own store
    /// (`None`: for ever).
    pub retention: Option<Duration>,
    /// Failed logins one client address may make in a minute before it is
    /// held back (0: no limit).
    pub failed_logins_per_minute: u32,
    /// Keep timeline and security entries this long (`None`: the newest
    /// 10,000 and 2,000 whatever their age).
    pub audit_retention: Option<Duration>,
}

/// The anchor's own identity (see [`daemon::enroll::anchor_identity`]).
pub use daemon::enroll::anchor_identity;

struct Anchor {
    base: Base,
    /// Enrollment answers waiting for the node's certificate to be committed.
    enrollments: AfterCommit<Vec<u8>>,
    /// The operator API's read model (when serving HTTP).
    view: Option<View>,
    snapshots: Option<watch::Sender<Arc<Snapshot>>>,
    /// The view's new timeline and security entries, to the task that
    /// appends them to the store (one writer: their order is kept). Bounded:
    /// while the disk is behind, entries wait in the view (itself bounded).
    audit: Option<tokio::sync::mpsc::Sender<Vec<(AuditLog, AuditEntry)>>>,
    audit_task: Option<tokio::task::JoinHandle<()>>,
    /// Pulls of other anchors' audit entries: when each peer anchor was
    /// last asked, and whether an answer is awaited.
    pulls: HashMap<mesh::PeerId, (Instant, bool)>,
    last_pull_scan: Instant,
    pulled_tx: mpsc::UnboundedSender<(mesh::PeerId, Result<Vec<u8>, String>)>,
}

/// How often an anchor asks each replica it is connected to for the audit
/// entries it lacks (and at once when the last answer said there is more).
const AUDIT_PULL_EVERY: Duration = Duration::from_secs(5);

/// Runs the anchor until `shutdown` resolves.
pub async fn run(
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let data_dir = opts.mesh.data_dir.clone();
    let config = crdt_state::StoreConfig {
        cache_bytes: crdt_state::local::store::ANCHOR_CACHE_BYTES,
        ..Default::default()
    };
    let mut dd = DataDir::open_with(&data_dir, None, config)?;
    let me = anchor_identity(&mut dd, now())?;
    let settings = Settings {
        timeline: opts.http.is_some(),
        gates: true,
        ..Settings::default()
    };
    let role = daemon::driver::Role {
        default_port: 7411,
        relay_server: true,
        serve: vec![mesh::ENROLL, mesh::AUDIT],
        data: daemon::driver::DataMode::Land {
            export: opts.readings_db.is_some(),
        },
    };
    let base = Base::open(dd, me, settings, &opts.mesh, role).await?;
    let export = opts.readings_db.clone().map(|url| {
        let stats = Arc::new(crate::export::Stats::default());
        let exporter = crate::export::Exporter {
            url,
            store: base.dd.shared_store(),
            wake: base.data.landed(),
            stats: stats.clone(),
        };
        tokio::spawn(exporter.run());
        stats
    });
    if let Some(keep) = opts.retention {
        tokio::spawn(retain(base.dd.shared_store(), keep));
    }
    let (pulled_tx, mut pulled_rx) = mpsc::unbounded_channel();
    let mut a = Anchor {
        base,
        enrollments: AfterCommit::default(),
        view: None,
        snapshots: None,
        audit: None,
        audit_task: None,
        pulls: HashMap::new(),
        // The first look at the replicas comes a period after the start.
        last_pull_scan: Instant::now(),
        pulled_tx,
    };
    if let Some(addr) = opts.http {
        let mut view = View::new(&a.base.core.me().cert.name);
        view.set_retention(opts.audit_retention.map(|d| d.as_secs() as i64));
        // What the store kept of the timeline and the security log (one
        // read at start, before the loop runs).
        let store = a.base.dd.shared_store();
        let reader = store.clone();
        let kept = tokio::task::spawn_blocking(move || {
            Ok::<_, crdt_state::Error>((
                reader.audit(AuditLog::Timeline, crate::view::TIMELINE_KEPT)?,
                reader.audit(AuditLog::Security, crate::view::SECURITY_KEPT)?,
            ))
        })
        .await;
        match kept {
            Ok(Ok((t, s))) => view.restore(t, s),
            Ok(Err(e)) => tracing::warn!(error = %e, "the stored timeline could not be read"),
            Err(e) => tracing::warn!(error = %e, "the stored timeline could not be read"),
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<(AuditLog, AuditEntry)>>(16);
        let writer = store.clone();
        a.audit_task = Some(tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                let store = writer.clone();
                let r = tokio::task::spawn_blocking(move || save_audit(&store, &batch)).await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "timeline not stored");
                }
            }
        }));
        a.audit = Some(tx);
        if let Some(keep) = opts.audit_retention {
            tokio::spawn(prune_audit(store.clone(), keep));
        }
        let first = {
            let engine = a.base.core.engine();
            view.publish(
                &|id| engine.doc(id),
                &mut engine.docs(),
                engine.trust(),
                now(),
                true,
            )
        }
        .unwrap_or_default();
        let (tx, rx) = watch::channel(first);
        let local = crate::api::serve(
            addr,
            opts.tls.clone(),
            crate::Server {
                snapshot: rx,
                commands: a.base.commands(),
                tokens: crate::tokens::Tokens::new(&data_dir),
                blobs: Some(a.base.blobs.shared_store()),
                store: Some(a.base.dd.shared_store()),
                data: Some(a.base.data.counters.clone()),
                export: export.clone(),
                demo: opts.demo.clone(),
                throttle: crate::api::Throttle::new(opts.failed_logins_per_minute),
            },
        )
        .await?;
        let _ = std::fs::write(data_dir.join(HTTP_ADDR_FILE), local.to_string());
        let scheme = if opts.tls.is_some() { "https" } else { "http" };
        daemon::say!("HTTP API and UI on {scheme}://{local}");
        a.view = Some(view);
        a.snapshots = Some(tx);
    }
    a.base.start();
    a.act();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            input = a.base.recv() => match input {
                Input::Closed => break,
                // The control socket's and the operator API's commands.
                Input::Command(c) => command::dispatch(&mut a, c),
                Input::Enrolled(e) => a.on_enrolled(*e),
                other => {
                    if let Some(req) = a.base.handle(other) {
                        a.on_request(req);
                    }
                }
            },
            _ = tick.tick() => {
                a.base.tick();
                a.pull_audit();
                if let Some(v) = a.view.as_mut() {
                    v.expire(now());
                }
            }
            Some((peer, answer)) = pulled_rx.recv() => a.on_pulled(peer, answer),
            _ = &mut shutdown => break,
        }
        a.act();
        a.answer();
        a.publish_with(false);
    }
    // What happened since the last round is stored, after what was queued
    // before it, before the store closes.
    if let (Some(v), Some(audit)) = (a.view.as_mut(), a.audit.take()) {
        let _ = audit.send(v.take_unsaved()).await;
    }
    if let Some(task) = a.audit_task.take() {
        let _ = task.await;
    }
    a.base.close().await;
    Ok(())
}

/// At most this much JSON in one answer to an audit pull (a request's
/// frame is at most 64 KiB).
const AUDIT_ANSWER_BYTES: usize = 60 << 10;

/// The answer to an audit pull.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditAnswer {
    /// Entries the asker lacked, each anchor's in its order.
    pub entries: Vec<SentEntry>,
    /// More remain: ask again.
    pub more: bool,
}

/// Deletes stored audit entries older than `keep`, once a minute.
async fn prune_audit(store: Arc<crdt_state::Store>, keep: Duration) {
    every_minute("audit entries", move || {
        let before = now() - keep.as_secs() as i64;
        Ok(store.prune_audit(AuditLog::Timeline, before)?
            + store.prune_audit(AuditLog::Security, before)?)
    })
    .await
}

/// Runs `prune` on a blocking thread once a minute, for ever, and logs
/// what it deleted (`what`) or why it could not.
async fn every_minute(
    what: &'static str,
    prune: impl Fn() -> crdt_state::Result<u64> + Clone + Send + 'static,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        match tokio::task::spawn_blocking(prune.clone()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(deleted = n, "{what} past their retention deleted"),
            Ok(Err(e)) => tracing::warn!(error = %e, "retention: {what} not deleted"),
            Err(e) => tracing::warn!(error = %e, "retention of {what}: the task failed"),
        }
    }
}

/// Appends the view's new entries to the store, each log bounded.
fn save_audit(
    store: &crdt_state::Store,
    batch: &[(AuditLog, AuditEntry)],
) -> crdt_state::Result<()> {
    for (log, keep) in [
        (AuditLog::Timeline, crate::view::TIMELINE_KEPT),
        (AuditLog::Security, crate::view::SECURITY_KEPT),
    ] {
        let entries: Vec<AuditEntry> = batch
            .iter()
            .filter(|(l, _)| *l == log)
            .map(|(_, e)| e.clone())
            .collect();
        store.append_audit(log, &entries, keep as u64)?;
    }
    Ok(())
}

/// Deletes what came up longer ago than `keep` from the anchor's store,
/// once a minute, in transactions of at most 50,000 records.
async fn retain(store: Arc<crdt_state::Store>, keep: Duration) {
    every_minute("records", move || {
        let before = (now().max(0) as u64)
            .saturating_mul(1000)
            .saturating_sub(keep.as_millis() as u64);
        let mut gone = 0;
        loop {
            let n = store.prune_landed(before, 50_000)?;
            gone += n;
            if n < 50_000 {
                return Ok(gone);
            }
        }
    })
    .await
}

impl command::Host for Anchor {
    fn base(&mut self) -> &mut Base {
        &mut self.base
    }

    /// From memory: loading 10,000 node documents from the store would
    /// take seconds.
    fn nodes(&mut self, output: daemon::render::Format) -> Option<String> {
        let view = self.view.as_ref()?;
        let fleet = self
            .base
            .core
            .doc(&DocId::Fleet)
            .map(FleetView::read)
            .unwrap_or_default();
        Some(daemon::render::nodes_with_contacts(
            output,
            &fleet,
            Some(self.base.core.contacts()),
            view.reports(),
            now(),
        ))
    }

    fn event(&mut self, kind: &str, subject: &str, text: String) {
        if let Some(v) = self.view.as_mut() {
            v.event(now(), kind, subject, text);
        }
    }

    fn event_by(&mut self, caller: &command::Caller, kind: &str, subject: &str, text: String) {
        use command::Caller;
        let (who, from) = match caller {
            Caller::Operator(name, from) => (Some(name.clone()), from.clone()),
            Caller::Owner => (None, Some("the anchor's control socket".to_string())),
            Caller::Signed(key) => (
                self.base
                    .core
                    .trust()
                    .cert(key)
                    .map(|c| c.name.clone())
                    .or_else(|| Some(key.short())),
                None,
            ),
            Caller::App(app) => (app.clone(), None),
            Caller::Surface(s) => (None, Some(s.clone())),
        };
        if let Some(v) = self.view.as_mut() {
            v.event_by(now(), kind, subject, text, who, from);
        }
    }

    fn security(&mut self, who: &str, reason: &str) {
        if let Some(v) = self.view.as_mut() {
            v.security(now(), who, reason);
        }
    }
}

impl Anchor {
    /// Sends the answers whose writes are committed, after publishing a
    /// snapshot that holds them (read your writes).
    fn answer(&mut self) {
        if self.base.answers_ready() || self.enrollments.any_ready(&self.base.core) {
            self.publish_with(true);
            self.base.release_answers();
            self.enrollments.release(&self.base.core);
        }
    }

    /// Does what the core asked of the anchor (the base did the rest).
    fn act(&mut self) {
        while let Some(action) = self.base.next_action() {
            let Some(v) = self.view.as_mut() else {
                continue;
            };
            match action {
                Action::Changed(doc) => v.doc_changed(&doc),
                Action::Contact { name, connected } => v.contact(&name, connected, now()),
                Action::Heard { name, bytes } => {
                    v.heard(&name, now());
                    v.counters.sync_bytes_in += bytes as u64;
                    v.counters.sync_messages_in += 1;
                }
                Action::Timeline {
                    kind,
                    subject,
                    text,
                } => v.event(now(), kind, &subject, text),
                Action::Security { who, reason } => v.security(now(), &who, &reason),
                _ => {}
            }
        }
    }

    /// A request on `/shoal/enroll/1`: a node with a token asks for its
    /// certificate. The token is checked off the loop first. On
    /// `/shoal/audit/1`, another anchor asks for the audit entries it lacks.
    fn on_request(&mut self, req: Request) {
        if req.protocol == mesh::ENROLL {
            self.base.enroll(req);
        } else if req.protocol == mesh::AUDIT {
            let answer = match self.anchor_peer(&req.peer) {
                Err(why) => {
                    self.refused(&format!("{} at {}", req.peer, req.addr), &why);
                    AuditAnswer::default()
                }
                Ok(_) => match (serde_json::from_slice::<AuditMarks>(&req.bytes), &self.view) {
                    (Ok(marks), Some(v)) => {
                        let (entries, more) = v.audit_since(&marks, AUDIT_ANSWER_BYTES);
                        AuditAnswer { entries, more }
                    }
                    (Err(e), _) => {
                        self.refused(
                            &format!("{} at {}", req.peer, req.addr),
                            &format!("an audit pull that is not one: {e}"),
                        );
                        AuditAnswer::default()
                    }
                    // No operator API here: no timeline kept.
                    (Ok(_), None) => AuditAnswer::default(),
                },
            };
            let _ = req
                .reply
                .send(serde_json::to_vec(&answer).unwrap_or_default());
        }
    }

    fn refused(&mut self, who: &str, why: &str) {
        tracing::warn!(%who, reason = %why, "refused");
        if let Some(v) = self.view.as_mut() {
            v.security(now(), who, why);
        }
    }

    /// The name of an admitted peer that is an anchor of this fleet, or
    /// why it is not one.
    fn anchor_peer(&self, peer: &mesh::PeerId) -> Result<String, String> {
        let name = self
            .base
            .core
            .name_of(peer)
            .ok_or("an audit pull from a peer that is not admitted")?;
        let key = mesh::key_of(peer)
            .map(crdt_state::PublicKey)
            .ok_or("an audit pull from a peer with no Ed25519 key")?;
        match self.base.core.trust().cert(&key) {
            Some(c) if c.role == Role::Anchor => Ok(name),
            _ => Err(format!("an audit pull from {name}, which is not an anchor")),
        }
    }

    /// Asks each connected replica for the audit entries this anchor lacks,
    /// every [`AUDIT_PULL_EVERY`] (one question at a time per replica).
    fn pull_audit(&mut self) {
        // The admitted peers (every node too) are looked through once per
        // period, not at every tick.
        if self.view.is_none() || self.last_pull_scan.elapsed() < AUDIT_PULL_EVERY {
            return;
        }
        self.last_pull_scan = Instant::now();
        let peers: Vec<mesh::PeerId> = self
            .base
            .core
            .admitted()
            .map(|(p, _)| *p)
            .filter(|p| self.anchor_peer(p).is_ok())
            .collect();
        self.pulls.retain(|p, _| peers.contains(p));
        let due: Vec<mesh::PeerId> = peers
            .into_iter()
            .filter(|p| !self.pulls.get(p).is_some_and(|(_, asking)| *asking))
            .collect();
        let Some(view) = self.view.as_ref().filter(|_| !due.is_empty()) else {
            return;
        };
        let marks = serde_json::to_vec(&view.audit_marks()).unwrap_or_default();
        for peer in due {
            self.ask(peer, marks.clone());
        }
    }

    fn ask(&mut self, peer: mesh::PeerId, marks: Vec<u8>) {
        self.pulls.insert(peer, (Instant::now(), true));
        let mesh = self.base.mesh.clone();
        let tx = self.pulled_tx.clone();
        let addr = mesh::Multiaddr::empty().with(mesh::multiaddr_p2p(peer));
        tokio::spawn(async move {
            let r = mesh
                .request(addr, mesh::AUDIT, marks)
                .await
                .map_err(|e| e.to_string());
            let _ = tx.send((peer, r));
        });
    }

    /// A replica's answer: its entries this anchor lacked are kept; if it
    /// has more, it is asked again at once.
    fn on_pulled(&mut self, peer: mesh::PeerId, answer: Result<Vec<u8>, String>) {
        if let Some(p) = self.pulls.get_mut(&peer) {
            p.1 = false;
        }
        let answer = match answer.and_then(|b| {
            serde_json::from_slice::<AuditAnswer>(&b).map_err(|e| format!("not an answer: {e}"))
        }) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "audit pull failed");
                return;
            }
        };
        let Some(view) = self.view.as_mut() else {
            return;
        };
        let n = view.audit_merge(answer.entries, now());
        if n > 0 {
            tracing::debug!(%peer, entries = n, "audit entries from a replica");
        }
        if answer.more && n > 0 {
            let marks = serde_json::to_vec(&view.audit_marks()).unwrap_or_default();
            self.ask(peer, marks);
        }
    }

    /// An enrollment whose token was checked: the certificate is written,
    /// and the answer leaves once it is committed.
    fn on_enrolled(&mut self, e: Enrolling) {
        let Enrolling {
            peer,
            addr,
            result,
            reply,
        } = e;
        let answer = self.base.enrolled(result);
        match &answer {
            enroll::EnrollResponse::Certified(c) => {
                tracing::info!(%peer, %addr, node = %c.name, "node enrolled");
                if let Some(v) = self.view.as_mut() {
                    v.event(
                        now(),
                        "enrolled",
                        &c.name,
                        format!("{} enrolled from {addr}", c.name),
                    );
                }
            }
            enroll::EnrollResponse::Refused(why) => {
                tracing::warn!(%peer, %addr, reason = %why, "enrollment refused");
                if let Some(v) = self.view.as_mut() {
                    v.security(
                        now(),
                        &format!("{peer} at {addr}"),
                        &format!("enrollment refused: {why}"),
                    );
                }
            }
        }
        let bytes = serde_json::to_vec(&answer).unwrap_or_default();
        self.enrollments.hold(&self.base.core, reply, bytes);
    }

    /// Publishes a new snapshot to the HTTP API when something changed
    /// (`force`: even if the last one is younger than the publish interval).
    fn publish_with(&mut self, force: bool) {
        let (Some(view), Some(tx)) = (self.view.as_mut(), self.snapshots.as_ref()) else {
            return;
        };
        if let Some(audit) = &self.audit
            && audit.capacity() > 0
        {
            let unsaved = view.take_unsaved();
            if !unsaved.is_empty() {
                let _ = audit.try_send(unsaved);
            }
        }
        view.counters.sync_bytes_out = self.base.sent.bytes;
        view.counters.sync_messages_out = self.base.sent.messages;
        let engine = self.base.core.engine();
        view.counters.documents = engine.docs().count();
        view.counters.store_bytes = std::fs::metadata(self.base.dd.path().join("store.redb"))
            .map(|m| m.len())
            .unwrap_or(0);
        if let Some(snap) = view.publish(
            &|id| engine.doc(id),
            &mut engine.docs(),
            engine.trust(),
            now(),
            force,
        ) {
            let _ = tx.send(snap);
        }
    }
}
