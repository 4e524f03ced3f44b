//! The daemon behind `shoal node run` and `shoal anchor run`: the store,
//! the sync engine and the mesh in one loop.
//!
//! One task owns the data dir (store) and the engine; it reacts to mesh
//! events (hello → admission, frames → engine), control-socket requests
//! (CLI verbs on the held data dir; the changes they commit are handed to
//! the engine) and a one-second tick. After each step it carries out what
//! the engine asked, in order: changes are committed before any frame that
//! follows them is sent; sync states are saved every few seconds and on
//! shutdown.
//!
//! An anchor differs from a node in four things: it holds every document
//! (its certificate's role), it answers enrollment requests, it serves
//! circuit relay, and it signs operator edits with the data dir's operator
//! identity while its mesh identity is its own anchor certificate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use crdt_state::sync::{Engine, SyncConfig};
use crdt_state::{DataDir, DocId, Identity, Role};
use daemon::{Action, Core, Now, Settings};
use mesh::{Event, Mesh, Multiaddr, PeerId};
use tokio::sync::mpsc;

use crate::control::{self, Incoming, Live};
use crate::enroll::{self, ADDRS_FILE, ANCHOR_IDENTITY_FILE};
use crate::hello;
use crate::runtime::Runtime;
use crate::runtime::native::Native;
use crate::site_api::{self, Nonces, Reply};
use crdt_state::model::{self, FleetView};

/// Daemon settings.
#[derive(Clone)]
pub struct Options {
    /// The data dir.
    pub data_dir: PathBuf,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to keep connected to (besides those in `peers.json`).
    pub peers: Vec<Multiaddr>,
    /// mDNS discovery on the local network.
    pub mdns: bool,
    /// Run as an anchor.
    pub anchor: bool,
    /// Serve the local site API here (nodes).
    pub site_api: Option<std::net::SocketAddr>,
    /// Where the node's share runs.
    pub runtime: RuntimeChoice,
    /// Serve the operator HTTP API and UI here (anchors).
    pub http: Option<std::net::SocketAddr>,
    /// Demo controls for the UI (`shoal demo` only).
    pub demo: Option<std::sync::Arc<dyn cloud_anchor::Demo>>,
    /// Most device readings kept in the store (oldest dropped beyond it).
    pub readings_cap: u64,
}

/// Device readings kept by default: about 11 days of 1 resource at 1 Hz,
/// or 8 minutes of 20 devices × 100 resources (~100 bytes each on disk).
pub const DEFAULT_READINGS_CAP: u64 = 1_000_000;

/// What the node knows of one device now.
#[derive(Debug, Default)]
struct DeviceState {
    online: Option<bool>,
    error: Option<String>,
    missed_polls: u64,
    /// Latest value (or error) per resource, with its time.
    latest: BTreeMap<String, (u64, Result<crdt_state::device::Value, String>)>,
    setpoints: BTreeMap<String, crdt_state::device::SetpointReport>,
}

/// The file an anchor writes its HTTP address to (for tools and tests).
pub const HTTP_ADDR_FILE: &str = "http.addr";

/// The runtime a node uses.
#[derive(Clone, Debug, Default)]
pub enum RuntimeChoice {
    /// Native processes (the embedded default).
    #[default]
    Native,
    /// The local K3s, through the Kubernetes API.
    Kube {
        /// A kubeconfig file (default: in-cluster, then `KUBECONFIG`).
        kubeconfig: Option<PathBuf>,
    },
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The anchor's own identity: made (and certified with the root key) the
/// first time the anchor runs on a data dir.
pub fn anchor_identity(dd: &mut DataDir) -> anyhow::Result<Identity> {
    let path = dd.path().join(ANCHOR_IDENTITY_FILE);
    if path.exists() {
        return Ok(Identity::read(&path)?);
    }
    let mut suffix = [0u8; 4];
    getrandom::fill(&mut suffix).map_err(|e| anyhow!("{e}"))?;
    let name = format!("anchor-{}", hex::encode(suffix));
    let id = dd
        .create_identity(Role::Anchor, None, &name, now())
        .context(
            "an anchor runs on the data dir made by `shoal fleet init` (it needs the root key)",
        )?;
    id.write(&path)?;
    Ok(id)
}

fn load_engine(dd: &DataDir, me: &Identity) -> anyhow::Result<Engine> {
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

struct Daemon {
    dd: DataDir,
    /// Every decision: sessions, commits, reconcile and report timing.
    core: Core<PeerId>,
    mesh: Mesh,
    anchor: bool,
    listening: Vec<String>,
    started: Instant,
    /// The runtime (nodes only).
    runtime: Option<Box<dyn Runtime>>,
    nonces: Nonces,
    /// The site API's address as this node's apps reach it.
    site_api_url: Option<String>,
    /// The token this node's apps read their devices with (`SHOAL_APP_TOKEN`).
    app_token: Option<String>,
    /// The operator API's read model (anchors serving HTTP).
    view: Option<cloud_anchor::View>,
    snapshots: Option<tokio::sync::watch::Sender<std::sync::Arc<cloud_anchor::Snapshot>>>,
    /// Device polling (nodes).
    devices: Option<crate::devices::Devices>,
    /// Device readings for the site API's live stream.
    live: tokio::sync::broadcast::Sender<String>,
    device_state: BTreeMap<String, DeviceState>,
    pending_readings: Vec<crdt_state::readings::Reading>,
    readings_cap: u64,
    readings_dropped: u64,
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut dd = DataDir::open(&opts.data_dir, None)?;
    dd.forward_changes();
    let me = if opts.anchor {
        anchor_identity(&mut dd)?
    } else {
        let id = dd
            .identity()
            .cloned()
            .ok_or_else(|| anyhow!("{} has no identity: enroll first", opts.data_dir.display()))?;
        if id.cert.role != Role::Node {
            anyhow::bail!(
                "{} holds a {} identity, not a node's: enroll a node data dir with `shoal node enroll`",
                opts.data_dir.display(),
                id.cert.role
            );
        }
        id
    };
    // The anchor's certificate may be new: take what create_identity wrote.
    let _ = dd.take_outbox();
    let engine = load_engine(&dd, &me)?;
    // A node starts its last desired state from the store before anything
    // else: no network needed.
    let runtime: Option<Box<dyn Runtime>> = match (&opts.runtime, opts.anchor) {
        (_, true) => None,
        (RuntimeChoice::Native, false) => Some(Box::new(Native::new(opts.data_dir.join("apps")))),
        (RuntimeChoice::Kube { kubeconfig }, false) => {
            let client = crate::runtime::kube::client(kubeconfig.as_deref()).await?;
            Some(Box::new(crate::runtime::kube::Kube::new(
                client,
                &opts.data_dir.join("kube"),
            )?))
        }
    };
    let mut config = mesh::Config::new(me.secret_bytes());
    config.listen = if opts.listen.is_empty() {
        let port = if opts.anchor { 7411 } else { 0 };
        vec![format!("/ip4/0.0.0.0/udp/{port}/quic-v1").parse()?]
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
    config.relay_server = opts.anchor;
    if opts.anchor {
        config.serve.push(mesh::ENROLL);
    }
    let root = dd.trust().root();
    let (mesh, mut events) =
        Mesh::start(config, hello::encode(root, &me.cert)).map_err(|e| anyhow!("{e}"))?;
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Incoming>(16);
    control::serve(&opts.data_dir, ctl_tx).await?;
    tracing::info!(peer = %mesh.peer_id(), name = %me.cert.name, "daemon started");
    let name = me.cert.name.clone();
    let settings = Settings {
        workloads: runtime.is_some(),
        timeline: opts.http.is_some(),
        known_peers,
        ..Settings::default()
    };
    let mut d = Daemon {
        dd,
        core: Core::new(engine, me, settings),
        mesh,
        anchor: opts.anchor,
        listening: Vec::new(),
        started: Instant::now(),
        runtime,
        nonces: Nonces::default(),
        site_api_url: None,
        app_token: None,
        view: None,
        snapshots: None,
        devices: None,
        live: tokio::sync::broadcast::channel(1024).0,
        device_state: BTreeMap::new(),
        pending_readings: Vec::new(),
        readings_cap: opts.readings_cap,
        readings_dropped: 0,
    };
    let (dev_tx, mut dev_rx) = mpsc::channel::<crate::devices::Update>(1024);
    if d.runtime.is_some() {
        d.devices = Some(crate::devices::Devices::new(
            dev_tx,
            opts.data_dir.join("opcua-pki"),
        ));
    }
    let (api_tx, mut api_rx) = mpsc::channel::<cloud_anchor::Incoming>(64);
    if let Some(addr) = opts.http {
        if !opts.anchor {
            anyhow::bail!("--http is for anchors");
        }
        let mut view = cloud_anchor::View::new(&name);
        let first = {
            let engine = d.core.engine();
            view.publish(
                &|id| engine.doc(id),
                &mut engine.docs(),
                engine.trust(),
                now(),
                true,
            )
        }
        .unwrap_or_default();
        let (tx, rx) = tokio::sync::watch::channel(first);
        let local = cloud_anchor::api::serve(
            addr,
            cloud_anchor::Server {
                snapshot: rx,
                commands: api_tx,
                tokens: cloud_anchor::tokens::Tokens::new(&opts.data_dir),
                demo: opts.demo.clone(),
            },
        )
        .await?;
        let _ = std::fs::write(opts.data_dir.join(HTTP_ADDR_FILE), local.to_string());
        crate::say!("HTTP API and UI on http://{local}");
        d.view = Some(view);
        d.snapshots = Some(tx);
    }
    let (site_tx, mut site_rx) = mpsc::channel::<site_api::Incoming>(16);
    if let Some(addr) = opts.site_api {
        let local = site_api::serve(addr, site_tx, d.live.clone()).await?;
        crate::say!("site API on http://{local}");
        // What the node's own apps dial (a wildcard bind is reached on loopback).
        let mut reach = local;
        if reach.ip().is_unspecified() {
            reach.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        d.site_api_url = Some(format!("http://{reach}"));
    }
    if d.runtime.is_some() {
        d.app_token = Some(app_token(&opts.data_dir)?);
    }
    let now = d.now();
    d.core.start(now);
    d.act();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(ev) => d.on_mesh(ev),
                None => break,
            },
            Some((req, reply)) = ctl_rx.recv() => {
                let live = Live {
                    contacts: Some(d.core.contacts().clone()),
                    addrs: d.listening.clone(),
                };
                let r = control::execute(&mut d.dd, req, &live);
                d.forward_local();
                let _ = reply.send(r);
            }
            Some((req, reply)) = site_rx.recv() => {
                let r = d.on_site(req);
                // Answered once what it accepted is committed.
                d.act();
                let _ = reply.send(r);
            }
            Some(u) = dev_rx.recv() => d.on_device(u),
            Some((cmd, reply)) = api_rx.recv() => {
                let r = d.on_api(cmd);
                // Read your writes: the answer leaves after a snapshot
                // that holds the edit.
                d.act();
                d.publish_with(true);
                let _ = reply.send(r);
            }
            _ = tick.tick() => d.on_tick(),
            _ = &mut shutdown => break,
        }
        d.act();
        d.publish_with(false);
    }
    if let Some(rt) = d.runtime.as_mut() {
        rt.shutdown().await;
    }
    if let Some(dev) = d.devices.as_mut() {
        dev.shutdown();
    }
    d.flush_readings();
    d.report();
    let now = d.now();
    d.core.flush(now);
    d.act();
    d.mesh.shutdown().await;
    let _ = std::fs::remove_file(opts.data_dir.join(control::SOCKET_FILE));
    Ok(())
}

impl Daemon {
    fn now(&self) -> Now {
        Now {
            mono_ms: self.started.elapsed().as_millis() as u64,
            unix_s: now(),
        }
    }

    fn on_mesh(&mut self, ev: Event) {
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
                let path = self.dd.path().join(ADDRS_FILE);
                if let Ok(text) = serde_json::to_vec_pretty(&self.listening) {
                    let _ = std::fs::write(path, text);
                }
            }
            Event::Hello { peer, addr, hello } => {
                // Keep peers whose address we dialed or that dialed us from
                // their listening socket.
                let dialable = (!mesh::is_relayed(&addr))
                    .then(|| addr.clone().with(mesh::multiaddr_p2p(peer)).to_string());
                let store = self.dd.store();
                let from = format!("{peer} at {addr}");
                let arrival = daemon::Arrival {
                    conn: peer,
                    bytes: &hello,
                    proves: &|k| mesh::peer_id_of(&k.0) == Some(peer),
                    from: &from,
                    dialable,
                };
                self.core.hello(t, arrival, &mut |key, doc| {
                    store.sync_state(&key.to_hex(), doc).ok().flatten()
                });
            }
            Event::Frame { peer, bytes } => self.core.frame(t, peer, bytes),
            Event::Down { peer } => self.core.down(t, peer),
            Event::Request {
                peer,
                addr,
                protocol,
                bytes,
                reply,
            } => {
                if protocol == mesh::ENROLL && self.anchor {
                    let answer = enroll::handle(&mut self.dd, &bytes, now());
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
                    self.forward_local();
                    let _ = reply.send(serde_json::to_vec(&answer).unwrap_or_default());
                }
            }
        }
    }

    /// Hands changes the data dir committed (CLI verbs, enrollment) to the engine.
    fn forward_local(&mut self) {
        let t = self.now();
        for (doc, changes) in self.dd.take_outbox() {
            self.core.local(t, doc, changes);
        }
    }

    /// Applies the node's share to the runtime and its devices, then reports.
    fn reconcile(&mut self) {
        if self.runtime.is_none() {
            return;
        }
        let mut desired = self.core.share();
        // The node's apps read their devices through the site API.
        for w in &mut desired {
            if let Some(n) = w.spec.native.as_mut() {
                if let Some(t) = &self.app_token {
                    n.env.insert("SHOAL_APP_TOKEN".into(), t.clone());
                }
                if let Some(u) = &self.site_api_url {
                    n.env.insert("SHOAL_SITE_API".into(), u.clone());
                }
            }
        }
        if let Some(rt) = self.runtime.as_mut() {
            rt.reconcile(&desired);
        }
        if self.devices.is_some() {
            let (fleet, site) = self.core.desired();
            let name = self.core.me().cert.name.clone();
            let want = crate::devices::assigned(&fleet, site.as_ref(), &name);
            self.device_state.retain(|k, _| want.contains_key(k));
            if let Some(dev) = self.devices.as_mut() {
                dev.reconcile(want);
            }
        }
        self.report();
    }

    /// Hands the runtime's and devices' status to the core, which writes
    /// it into the node's document when it changed.
    fn report(&mut self) {
        let Some(rt) = self.runtime.as_ref() else {
            return;
        };
        let workloads = rt.status();
        let devices = self.device_reports();
        let t = self.now();
        self.core.report(t, workloads, devices);
    }

    /// The devices part of the node's report.
    fn device_reports(&self) -> BTreeMap<String, crdt_state::device::DeviceReport> {
        let mut out = BTreeMap::new();
        for (name, st) in &self.device_state {
            let marked: Vec<String> = self
                .devices
                .as_ref()
                .and_then(|d| d.get(name))
                .and_then(|a| a.profile.as_ref())
                .map(|p| {
                    p.resources
                        .iter()
                        .filter(|r| r.report)
                        .map(|r| r.name.clone())
                        .collect()
                })
                .unwrap_or_default();
            let values = st
                .latest
                .iter()
                .filter(|(r, _)| marked.contains(r))
                .filter_map(|(r, (_, v))| {
                    v.as_ref()
                        .ok()
                        .and_then(|v| serde_json::to_value(v).ok())
                        .map(|v| (r.clone(), v))
                })
                .collect();
            out.insert(
                name.clone(),
                crdt_state::device::DeviceReport {
                    online: st.online,
                    error: st.error.clone(),
                    values,
                    setpoints: st.setpoints.clone(),
                },
            );
        }
        out
    }

    /// One update from a device task.
    fn on_device(&mut self, u: crate::devices::Update) {
        use crate::devices::Update;
        match u {
            Update::Readings {
                device,
                at_ms,
                values,
            } => {
                if self.live.receiver_count() > 0 {
                    let vals: serde_json::Map<String, serde_json::Value> = values
                        .iter()
                        .map(|(r, v)| {
                            let v = match v {
                                Ok(v) => serde_json::to_value(v).unwrap_or_default(),
                                Err(e) => serde_json::json!({ "error": e }),
                            };
                            (r.clone(), v)
                        })
                        .collect();
                    let line =
                        serde_json::json!({ "device": device, "at_ms": at_ms, "values": vals });
                    let _ = self.live.send(line.to_string());
                }
                let st = self.device_state.entry(device.clone()).or_default();
                let mut errors = Vec::new();
                for (res, v) in values {
                    if let Ok(val) = &v
                        && let Ok(text) = serde_json::to_vec(val)
                    {
                        self.pending_readings.push(crdt_state::readings::Reading {
                            series: format!("{device}/{res}"),
                            at_ms,
                            value: text,
                        });
                    }
                    if let Err(e) = &v {
                        errors.push(format!("{res}: {e}"));
                    }
                    st.latest.insert(res, (at_ms, v));
                }
                if st.online == Some(true) || st.online.is_none() {
                    st.error = (!errors.is_empty()).then(|| errors.join("; "));
                }
                if self.pending_readings.len() >= 20_000 {
                    self.flush_readings();
                }
            }
            Update::Status {
                device,
                online,
                error,
                missed_polls,
            } => {
                let st = self.device_state.entry(device).or_default();
                st.online = Some(online);
                st.error = error;
                st.missed_polls = missed_polls;
            }
            Update::Setpoint {
                device,
                resource,
                result,
            } => {
                let desired = self
                    .devices
                    .as_ref()
                    .and_then(|d| d.get(&device))
                    .and_then(|a| a.setpoints.get(&resource).cloned())
                    .unwrap_or_default();
                let st = self.device_state.entry(device.clone()).or_default();
                let report = match result {
                    Ok(v) => crdt_state::device::SetpointReport {
                        desired,
                        applied: true,
                        read_back: serde_json::to_value(v).ok(),
                        error: None,
                    },
                    Err(e) => {
                        tracing::warn!(%device, %resource, error = %e, "setpoint not applied");
                        crdt_state::device::SetpointReport {
                            desired,
                            applied: false,
                            read_back: None,
                            error: Some(e),
                        }
                    }
                };
                st.setpoints.insert(resource, report);
            }
        }
    }

    /// Writes buffered readings to the store (one transaction).
    fn flush_readings(&mut self) {
        if self.pending_readings.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.pending_readings);
        match self.dd.store().append_readings(&batch, self.readings_cap) {
            Ok(dropped) => self.readings_dropped += dropped,
            Err(e) => tracing::warn!(error = %e, readings = batch.len(), "readings not stored"),
        }
    }

    fn on_tick(&mut self) {
        self.flush_readings();
        let t = self.now();
        self.core.tick(t);
    }

    /// Carries out what the core asked, in order.
    fn act(&mut self) {
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
                    if relay {
                        self.mesh.listen_via(conn);
                    }
                }
                Action::Reject { conn, reason } => {
                    tracing::warn!(peer = %conn, %reason, "peer refused");
                    self.mesh.reject(conn, reason);
                }
                Action::Send { conn, frame } => {
                    if let Some(v) = self.view.as_mut() {
                        v.counters.sync_bytes_out += frame.len() as u64;
                        v.counters.sync_messages_out += 1;
                    }
                    self.mesh.send(conn, frame);
                }
                Action::Disconnect { conn, reason } => self.mesh.disconnect(conn, reason),
                Action::Commit { batch, changes } => {
                    let items: Vec<_> = changes
                        .iter()
                        .filter_map(|(id, c)| self.core.doc(id).map(|d| (d, c.as_slice())))
                        .collect();
                    let result = self.dd.store().commit_batch(&items);
                    let result = match result {
                        Ok(()) => {
                            let mut fleet_changed = false;
                            for (id, _) in &changes {
                                self.dd.forget(id);
                                fleet_changed |= *id == DocId::Fleet;
                            }
                            if fleet_changed && let Err(e) = self.dd.refresh_trust() {
                                tracing::warn!(error = %e, "trust not refreshed");
                            }
                            Ok(())
                        }
                        Err(e) => {
                            // Not stored: the core holds what follows.
                            tracing::error!(error = %e, "could not commit synced changes; holding sends");
                            Err(e.to_string())
                        }
                    };
                    let t = self.now();
                    self.core.committed(t, batch, result);
                }
                Action::SaveSyncStates(states) => {
                    let states: Vec<(String, DocId, Vec<u8>)> = states
                        .into_iter()
                        .map(|(k, d, s)| (k.to_hex(), d, s))
                        .collect();
                    if let Err(e) = self.dd.store().put_sync_states(&states) {
                        tracing::warn!(error = %e, "sync states not saved");
                    }
                }
                Action::DropDoc(doc) => {
                    if let Err(e) = self.dd.store().drop_doc(&doc) {
                        tracing::warn!(%doc, error = %e, "superseded document not dropped");
                    }
                    self.dd.forget(&doc);
                }
                Action::SavePeers(peers) => {
                    if let Err(e) = enroll::write_peers(self.dd.path(), &peers) {
                        tracing::warn!(error = %e, "peers not saved");
                    }
                }
                Action::Reconcile => self.reconcile(),
                Action::Report => self.report(),
                Action::Changed(doc) => {
                    tracing::debug!(%doc, "document changed");
                    if let Some(v) = self.view.as_mut() {
                        v.doc_changed(&doc);
                    }
                }
                Action::Contact { name, connected } => {
                    if let Some(v) = self.view.as_mut() {
                        v.contact(&name, connected, now());
                    }
                }
                Action::Heard { name, bytes } => {
                    if let Some(v) = self.view.as_mut() {
                        v.heard(&name, now());
                        v.counters.sync_bytes_in += bytes as u64;
                        v.counters.sync_messages_in += 1;
                    }
                }
                Action::Timeline {
                    kind,
                    subject,
                    text,
                } => {
                    if let Some(v) = self.view.as_mut() {
                        v.event(now(), kind, &subject, text);
                    }
                }
                Action::Security { who, reason } => {
                    tracing::warn!(%who, %reason, "security event");
                    if let Some(v) = self.view.as_mut() {
                        v.security(now(), &who, &reason);
                    }
                }
            }
        }
    }

    /// One site API request (see `site_api`).
    fn on_site(&mut self, req: site_api::Request) -> Reply {
        let Some(site) = self.core.me().cert.site.clone() else {
            return Reply::error(404, "this node belongs to no site");
        };
        let route = (req.method.as_str(), req.path.as_str());
        if route == ("GET", "/api/challenge") {
            return match self.nonces.issue() {
                Ok(n) => Reply {
                    status: 200,
                    body: serde_json::json!({ "nonce": hex::encode(n) }),
                },
                Err(e) => Reply::error(503, e.to_string()),
            };
        }
        let devices_route = req.method == "GET"
            && (req.path == "/api/devices" || req.path.starts_with("/api/devices/"));
        if !devices_route
            && !matches!(
                route,
                ("GET", "/api/view") | ("GET", "/api/site/bundle") | ("POST", "/api/site/changes")
            )
        {
            return Reply::error(404, format!("no {} {}", req.method, req.path));
        }
        // The node's own apps: read-only access to the device routes.
        if devices_route
            && let (Some(t), Some(h)) = (&self.app_token, req.auth.as_deref())
            && let Some(given) = h.strip_prefix("Bearer ")
        {
            use sha2::Digest;
            if sha2::Sha256::digest(given.trim().as_bytes()) == sha2::Sha256::digest(t.as_bytes()) {
                return self.device_api(&req.path);
            }
            return Reply::error(401, "unknown app token");
        }
        let who = match site_api::authenticate(&req, &mut self.nonces, self.core.trust(), &site) {
            Ok(k) => k,
            Err(reply) => {
                tracing::warn!(path = %req.path, error = %reply.body, "site API request refused");
                return reply;
            }
        };
        let site_doc = DocId::Site(site.clone());
        if devices_route {
            return self.device_api(&req.path);
        }
        match route {
            ("GET", "/api/view") => {
                let peers: Vec<&String> = self
                    .core
                    .contacts()
                    .iter()
                    .filter(|(_, c)| c.connected)
                    .map(|(n, _)| n)
                    .collect();
                Reply {
                    status: 200,
                    body: serde_json::json!({
                        "node": self.core.me().cert.name,
                        "site": site,
                        "desired": self.core.share(),
                        "report": self.core.last_report(),
                        "peers": peers,
                        "site_overrides": self.core.doc(&site_doc).map(model::read_site),
                    }),
                }
            }
            ("GET", "/api/site/bundle") => match self.dd.export_some(|id| *id == site_doc) {
                Ok(b) => Reply {
                    status: 200,
                    body: serde_json::json!({ "bundle": hex::encode(b) }),
                },
                Err(e) => Reply::error(500, e.to_string()),
            },
            _ => {
                let bundle = match crdt_state::bundle::Bundle::decode(&req.body) {
                    Ok(b) => b,
                    Err(e) => return Reply::error(400, format!("body: {e}")),
                };
                if bundle.root != Some(self.core.trust().root()) {
                    return Reply::error(400, "the changes belong to another fleet");
                }
                let mut new = false;
                for (doc, changes) in bundle.docs {
                    if doc != site_doc {
                        return Reply::error(
                            403,
                            format!("only {site_doc} may be edited here, not {doc}"),
                        );
                    }
                    let t = self.now();
                    match self.core.submit(t, doc, changes) {
                        Ok(n) => new |= n,
                        Err(crdt_state::Error::NotAllowed(m)) => return Reply::error(403, m),
                        Err(e @ crdt_state::Error::Rejected { .. }) => {
                            return Reply::error(403, e.to_string());
                        }
                        Err(e) => return Reply::error(400, e.to_string()),
                    }
                }
                tracing::info!(writer = %who.short(), new, "site edit through the site API");
                Reply {
                    status: 200,
                    body: serde_json::json!({ "new": new }),
                }
            }
        }
    }

    /// Publishes a new snapshot to the HTTP API when something changed
    /// (`force`: even if the last one is younger than the publish interval).
    fn publish_with(&mut self, force: bool) {
        let (Some(view), Some(tx)) = (self.view.as_mut(), self.snapshots.as_ref()) else {
            return;
        };
        let engine = self.core.engine();
        view.counters.documents = engine.docs().count();
        view.counters.store_bytes = std::fs::metadata(self.dd.path().join("store.redb"))
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

    /// The site API's device routes: `/api/devices` (latest values and
    /// state of every device), `/api/devices/<device>/<resource>/range/<from
    /// ms>/<to ms>` (stored readings, oldest first, at most 100,000).
    fn device_api(&self, path: &str) -> Reply {
        let parts: Vec<&str> = path
            .trim_start_matches("/api/devices")
            .split('/')
            .filter(|p| !p.is_empty())
            .collect();
        match parts.as_slice() {
            // Authenticated: the site API's server streams from here on.
            ["stream"] => Reply {
                status: 200,
                body: serde_json::json!({ "stream": true }),
            },
            [] => {
                let devices: serde_json::Map<String, serde_json::Value> = self
                    .device_state
                    .iter()
                    .map(|(name, st)| {
                        let latest: serde_json::Map<String, serde_json::Value> = st
                            .latest
                            .iter()
                            .map(|(r, (at, v))| {
                                let v = match v {
                                    Ok(v) => serde_json::json!({ "at_ms": at, "value": v }),
                                    Err(e) => serde_json::json!({ "at_ms": at, "error": e }),
                                };
                                (r.clone(), v)
                            })
                            .collect();
                        (
                            name.clone(),
                            serde_json::json!({
                                "online": st.online,
                                "error": st.error,
                                "missed_polls": st.missed_polls,
                                "latest": latest,
                                "setpoints": st.setpoints,
                            }),
                        )
                    })
                    .collect();
                let stats = self.dd.store().reading_stats().unwrap_or_default();
                Reply {
                    status: 200,
                    body: serde_json::json!({ "devices": devices, "readings": stats }),
                }
            }
            [dev, res, "range", from, to] => {
                let (Ok(from), Ok(to)) = (from.parse::<u64>(), to.parse::<u64>()) else {
                    return Reply::error(400, "range bounds are Unix milliseconds");
                };
                let series = format!("{dev}/{res}");
                match self.dd.store().readings_between(&series, from, to, 100_000) {
                    Ok(rows) => {
                        let rows: Vec<serde_json::Value> = rows
                            .into_iter()
                            .map(|(at, v)| {
                                let v: serde_json::Value =
                                    serde_json::from_slice(&v).unwrap_or(serde_json::Value::Null);
                                serde_json::json!([at, v])
                            })
                            .collect();
                        Reply {
                            status: 200,
                            body: serde_json::json!({ "series": series, "readings": rows }),
                        }
                    }
                    Err(e) => Reply::error(500, e.to_string()),
                }
            }
            _ => Reply::error(404, format!("no GET {path}")),
        }
    }

    /// One operator API command.
    fn on_api(
        &mut self,
        cmd: cloud_anchor::Command,
    ) -> Result<cloud_anchor::Answer, cloud_anchor::ApiError> {
        use cloud_anchor::{Answer, ApiError, Command};
        let status = |e: &crdt_state::Error| match e {
            crdt_state::Error::NotAllowed(_) => 403,
            crdt_state::Error::NotFound(_) => 404,
            _ => 500,
        };
        let result = match cmd {
            Command::Security { source, reason } => {
                tracing::warn!(%source, %reason, "API request refused");
                if let Some(v) = self.view.as_mut() {
                    v.security(now(), &source, &reason);
                }
                return Ok(Answer::Json(serde_json::json!({})));
            }
            Command::Get { what, output }
                if matches!(what.as_str(), "nodes" | "node") && self.view.is_some() =>
            {
                // From memory: loading 10,000 node documents from the store
                // would hold up the loop.
                let fleet = self
                    .core
                    .doc(&DocId::Fleet)
                    .map(FleetView::read)
                    .unwrap_or_default();
                let empty = std::collections::BTreeMap::new();
                let reports = self.view.as_ref().map(|v| v.reports()).unwrap_or(&empty);
                return Ok(Answer::Text(crdt_state::render::nodes_with_contacts(
                    output,
                    &fleet,
                    Some(self.core.contacts()),
                    reports,
                    now(),
                )));
            }
            Command::Get { what, output } => {
                let live = Live {
                    contacts: Some(self.core.contacts().clone()),
                    addrs: self.listening.clone(),
                };
                let r = control::execute(
                    &mut self.dd,
                    control::Request::Get {
                        what,
                        output: output.to_string(),
                    },
                    &live,
                );
                return match r.error {
                    Some(e) => Err(ApiError::new(400, e)),
                    None => Ok(Answer::Text(r.stdout)),
                };
            }
            Command::Apply {
                manifests,
                user,
                output,
            } => {
                self.dd
                    .set_message(Some(format!("{user} through the anchor API")));
                let r = self.dd.apply(&manifests, now());
                self.dd.set_message(None);
                match r {
                    Ok(applied) => {
                        if let Some(v) = self.view.as_mut() {
                            for a in applied.iter().filter(|a| a.fields > 0) {
                                v.event(
                                    now(),
                                    "edit",
                                    &a.doc,
                                    format!(
                                        "{user} applied {}/{} ({} fields)",
                                        a.kind.as_str().to_lowercase(),
                                        a.name,
                                        a.fields
                                    ),
                                );
                            }
                        }
                        Ok(match output {
                            Some(f) => Answer::Text(crdt_state::render::applied(f, &applied)),
                            None => Answer::Json(
                                serde_json::json!({ "applied": serde_json::to_value(&applied).unwrap_or_default() }),
                            ),
                        })
                    }
                    Err(e) => Err(ApiError::new(status(&e), e.to_string())),
                }
            }
            Command::Delete { kind, name, user } => {
                self.dd
                    .set_message(Some(format!("{user} through the anchor API")));
                let r = self.dd.delete(kind, &name, now());
                self.dd.set_message(None);
                match r {
                    Ok(n) => {
                        let what = format!("{}/{name}", kind.as_str().to_lowercase());
                        if let Some(v) = self.view.as_mut() {
                            v.event(now(), "edit", &what, format!("{user} deleted {what}"));
                        }
                        Ok(Answer::Json(
                            serde_json::json!({ "deleted": what, "fields": n }),
                        ))
                    }
                    Err(e) => Err(ApiError::new(status(&e), e.to_string())),
                }
            }
            Command::Resolve {
                doc,
                field,
                value,
                user,
            } => {
                let id = match DocId::parse(&doc) {
                    Ok(DocId::Node { .. }) => {
                        return Err(ApiError::new(
                            403,
                            "node documents are their node's to write",
                        ));
                    }
                    Ok(id) => id,
                    Err(e) => return Err(ApiError::new(400, format!("doc: {e}"))),
                };
                let ops = [(field.clone(), Some(value.to_string()))]
                    .into_iter()
                    .collect();
                self.dd.set_message(Some(format!(
                    "{user} resolved a conflict through the anchor API"
                )));
                let r = self.dd.write(&id, &ops, now());
                self.dd.set_message(None);
                match r {
                    Ok(_) => {
                        if let Some(v) = self.view.as_mut() {
                            v.event(
                                now(),
                                "edit",
                                &doc,
                                format!("{user} resolved {field} in {doc}: {value} kept"),
                            );
                        }
                        Ok(Answer::Json(
                            serde_json::json!({ "resolved": field, "value": value }),
                        ))
                    }
                    Err(e) => Err(ApiError::new(status(&e), e.to_string())),
                }
            }
        };
        self.forward_local();
        result
    }
}

/// Reads the data dir's addresses file (for tests and tools).
pub fn listening(dir: &Path) -> Vec<String> {
    enroll::read_addrs(dir)
}

/// The token this node's apps use on the site API's device routes: made
/// once (256 random bits, owner-only file), kept across restarts so an
/// app's spec, and so the app, do not change when the node restarts.
fn app_token(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("app-token");
    if let Ok(t) = std::fs::read_to_string(&path)
        && t.trim().len() == 64
    {
        return Ok(t.trim().to_string());
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow!("no randomness from the OS: {e}"))?;
    let token = hex::encode(secret);
    // A new owner-only file, synced, then renamed over whatever was there:
    // never a torn token, never a file another user could already read.
    crdt_state::identity::write_private(&path, token.as_bytes())?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_app_token_is_replaced_owner_only_and_kept() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("app-token");
        // A torn token left world-readable (by a crash, or another tool).
        std::fs::write(&path, "abc")?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        let t = app_token(dir.path())?;
        assert_eq!(t.len(), 64);
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        assert_eq!(std::fs::read_to_string(&path)?, t);
        assert!(!dir.path().join("app-token.tmp").exists());
        // Kept across restarts.
        assert_eq!(app_token(dir.path())?, t);
        Ok(())
    }
}
