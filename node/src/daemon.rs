//! The edge node's daemon (`shoal node run`): the shared driver
//! ([`daemon::driver::Base`]: mesh, store, control socket, and the core that
//! decides) plus what only an edge node has — the runtime its share runs on,
//! its field devices, and the site API for field engineers and its apps.
//!
//! One task owns all of it. It reacts to mesh events and CLI verbs (through
//! the base), site API requests, device updates and a one-second tick; after
//! each step it takes the core's actions in order. The base carries out
//! those that touch the mesh and the store (a change is committed before any
//! frame that follows it is sent); this composition does the rest: it
//! reconciles the runtime and devices when the core says so and hands the
//! core the status to report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use crdt_state::{DataDir, DocId, Role};
use daemon::driver::{AfterCommit, Base, Input, MeshOptions};
use daemon::{Action, Settings};
use tokio::sync::mpsc;

use crate::runtime::Runtime;
use crate::runtime::native::Native;
use crate::site_api::{self, Nonces, Reply};
use crdt_state::fleet::model;

/// Node daemon settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// The data dir, listen addresses, peers, mDNS.
    pub mesh: MeshOptions,
    /// Serve the local site API here.
    pub site_api: Option<std::net::SocketAddr>,
    /// Where the node's share runs.
    pub runtime: RuntimeChoice,
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
    latest: BTreeMap<String, (u64, Result<crdt_state::fleet::device::Value, String>)>,
    setpoints: BTreeMap<String, crdt_state::fleet::device::SetpointReport>,
}

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

struct Node {
    base: Base,
    runtime: Box<dyn Runtime>,
    nonces: Nonces,
    /// The site API's address as this node's apps reach it.
    site_api_url: Option<String>,
    /// The token this node's apps read their devices with (`SHOAL_APP_TOKEN`).
    app_token: Option<String>,
    /// Device polling.
    devices: Option<crate::devices::Devices>,
    /// Device readings for the site API's live stream.
    live: tokio::sync::broadcast::Sender<String>,
    device_state: BTreeMap<String, DeviceState>,
    pending_readings: Vec<crdt_state::local::readings::Reading>,
    readings_cap: u64,
    readings_dropped: u64,
    /// Site API answers waiting for their writes to be committed.
    answers: AfterCommit<Reply>,
    /// A store read that answers the current site API request.
    deferred: Option<StoreRead>,
}

/// A read of the store, run off the loop.
type StoreRead = Box<dyn FnOnce(&crdt_state::Store) -> Reply + Send>;

/// Runs the node until `shutdown` resolves.
pub async fn run(
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let data_dir = opts.mesh.data_dir.clone();
    let mut dd = DataDir::open(&data_dir, None)?;
    dd.forward_changes();
    let me = dd
        .identity()
        .cloned()
        .ok_or_else(|| anyhow!("{} has no identity: enroll first", data_dir.display()))?;
    if me.cert.role != Role::Node {
        anyhow::bail!(
            "{} holds a {} identity, not a node's: enroll a node data dir with `shoal node enroll`",
            data_dir.display(),
            me.cert.role
        );
    }
    let runtime: Box<dyn Runtime> = match &opts.runtime {
        RuntimeChoice::Native => Box::new(Native::new(data_dir.join("apps"))),
        RuntimeChoice::Kube { kubeconfig } => {
            let client = crate::runtime::kube::client(kubeconfig.as_deref()).await?;
            Box::new(crate::runtime::kube::Kube::new(
                client,
                &data_dir.join("kube"),
            )?)
        }
    };
    let settings = Settings {
        workloads: true,
        ..Settings::default()
    };
    let role = daemon::driver::Role::default();
    let base = Base::open(dd, me, settings, &opts.mesh, role).await?;
    let (dev_tx, mut dev_rx) = mpsc::channel::<crate::devices::Update>(1024);
    let mut n = Node {
        base,
        runtime,
        nonces: Nonces::default(),
        site_api_url: None,
        app_token: Some(app_token(&data_dir)?),
        devices: Some(crate::devices::Devices::new(
            dev_tx,
            data_dir.join("opcua-pki"),
        )),
        live: tokio::sync::broadcast::channel(1024).0,
        device_state: BTreeMap::new(),
        pending_readings: Vec::new(),
        readings_cap: opts.readings_cap,
        readings_dropped: 0,
        answers: AfterCommit::default(),
        deferred: None,
    };
    let (site_tx, mut site_rx) = mpsc::channel::<site_api::Incoming>(16);
    if let Some(addr) = opts.site_api {
        let local = site_api::serve(addr, site_tx, n.live.clone()).await?;
        crate::say!("site API on http://{local}");
        // What the node's own apps dial (a wildcard bind is reached on loopback).
        let mut reach = local;
        if reach.ip().is_unspecified() {
            reach.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        n.site_api_url = Some(format!("http://{reach}"));
    }
    // The last desired state from the store, before any peer is heard.
    n.base.start();
    n.act();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            input = n.base.recv() => {
                if matches!(input, Input::Closed) {
                    break;
                }
                // A node serves no request protocol: nothing comes back.
                let _ = n.base.handle(input);
            }
            Some((req, reply)) = site_rx.recv() => {
                let r = n.on_site(req);
                if let Some(read) = n.deferred.take() {
                    let store = n.base.dd.shared_store();
                    tokio::task::spawn_blocking(move || {
                        let _ = reply.send(read(&store));
                    });
                } else {
                    // Answered once what it accepted is committed.
                    n.answers.hold(&n.base.core, reply, r);
                }
            }
            Some(u) = dev_rx.recv() => n.on_device(u),
            _ = tick.tick() => {
                n.flush_readings();
                n.base.tick();
            }
            _ = &mut shutdown => break,
        }
        n.act();
        n.answers.release(&n.base.core);
    }
    n.runtime.shutdown().await;
    if let Some(dev) = n.devices.as_mut() {
        dev.shutdown();
    }
    n.flush_readings();
    n.report();
    n.act();
    n.base.close().await;
    Ok(())
}

impl Node {
    /// Does what the core asked of the node (the base did the rest).
    fn act(&mut self) {
        while let Some(action) = self.base.next_action() {
            match action {
                Action::Reconcile => self.reconcile(),
                Action::Report => self.report(),
                Action::Changed(doc) => tracing::debug!(%doc, "document changed"),
                _ => {}
            }
        }
    }

    /// Applies the node's share to the runtime and its devices, then reports.
    fn reconcile(&mut self) {
        let mut desired = self.base.core.share();
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
        self.runtime.reconcile(&desired);
        if self.devices.is_some() {
            let (fleet, site) = self.base.core.desired();
            let name = self.base.core.me().cert.name.clone();
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
        let workloads = self.runtime.status();
        let devices = self.device_reports();
        let t = self.base.now();
        self.base.core.report(t, workloads, devices);
    }

    /// The devices part of the node's report.
    fn device_reports(&self) -> BTreeMap<String, crdt_state::fleet::device::DeviceReport> {
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
                crdt_state::fleet::device::DeviceReport {
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
                        self.pending_readings
                            .push(crdt_state::local::readings::Reading {
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
                    Ok(v) => crdt_state::fleet::device::SetpointReport {
                        desired,
                        applied: true,
                        read_back: serde_json::to_value(v).ok(),
                        error: None,
                    },
                    Err(e) => {
                        tracing::warn!(%device, %resource, error = %e, "setpoint not applied");
                        crdt_state::fleet::device::SetpointReport {
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
        match self
            .base
            .dd
            .store()
            .append_readings(&batch, self.readings_cap)
        {
            Ok(dropped) => self.readings_dropped += dropped,
            Err(e) => tracing::warn!(error = %e, readings = batch.len(), "readings not stored"),
        }
    }

    /// One site API request (see `site_api`).
    fn on_site(&mut self, req: site_api::Request) -> Reply {
        let Some(site) = self.base.core.me().cert.site.clone() else {
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
        let who = match site_api::authenticate(
            &req,
            &mut self.nonces,
            self.base.core.trust(),
            &site,
        ) {
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
                    .base
                    .core
                    .contacts()
                    .iter()
                    .filter(|(_, c)| c.connected)
                    .map(|(n, _)| n)
                    .collect();
                Reply {
                    status: 200,
                    body: serde_json::json!({
                        "node": self.base.core.me().cert.name,
                        "site": site,
                        "desired": self.base.core.share(),
                        "report": self.base.core.last_report(),
                        "peers": peers,
                        "site_overrides": self.base.core.doc(&site_doc).map(model::read_site),
                    }),
                }
            }
            ("GET", "/api/site/bundle") => match self.base.dd.export_some(|id| *id == site_doc) {
                Ok(b) => Reply {
                    status: 200,
                    body: serde_json::json!({ "bundle": hex::encode(b) }),
                },
                Err(e) => Reply::error(500, e.to_string()),
            },
            _ => {
                let bundle = match crdt_state::signed::bundle::Bundle::decode(&req.body) {
                    Ok(b) => b,
                    Err(e) => return Reply::error(400, format!("body: {e}")),
                };
                if bundle.root != Some(self.base.core.trust().root()) {
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
                    let t = self.base.now();
                    match self.base.core.submit(t, doc, changes) {
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

    /// The site API's device routes: `/api/devices` (latest values and
    /// state of every device), `/api/devices/<device>/<resource>/range/<from
    /// ms>/<to ms>` (stored readings, oldest first, at most 100,000).
    fn device_api(&mut self, path: &str) -> Reply {
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
                self.read_later(move |store| {
                    let stats = store.reading_stats().unwrap_or_default();
                    Reply {
                        status: 200,
                        body: serde_json::json!({ "devices": devices, "readings": stats }),
                    }
                })
            }
            [dev, res, "range", from, to] => {
                let (Ok(from), Ok(to)) = (from.parse::<u64>(), to.parse::<u64>()) else {
                    return Reply::error(400, "range bounds are Unix milliseconds");
                };
                let series = format!("{dev}/{res}");
                self.read_later(move |store| {
                    match store.readings_between(&series, from, to, 100_000) {
                        Ok(rows) => {
                            let rows: Vec<serde_json::Value> = rows
                                .into_iter()
                                .map(|(at, v)| {
                                    let v: serde_json::Value = serde_json::from_slice(&v)
                                        .unwrap_or(serde_json::Value::Null);
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
                })
            }
            _ => Reply::error(404, format!("no GET {path}")),
        }
    }

    /// Answers the current site API request with a read of the store on a
    /// blocking thread (up to 100,000 readings), not on the loop.
    fn read_later(
        &mut self,
        read: impl FnOnce(&crdt_state::Store) -> Reply + Send + 'static,
    ) -> Reply {
        self.deferred = Some(Box::new(read));
        Reply::error(500, "answered from the store")
    }
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
    crdt_state::signed::identity::write_private(&path, token.as_bytes())?;
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
