//! The edge node's daemon (`shoal node run`): the shared driver
//! ([`daemon::driver::Base`]: mesh, store, control socket, and the core that
//! decides) plus what only an edge node has — the runtime its share runs on,
//! its field devices, and the site API for field engineers and its apps.
//!
//! One task owns all of it. It reacts to mesh events and CLI verbs (through
//! the base), site API requests, device updates (stored within 250 ms) and
//! a one-second tick; after each step it takes the core's actions in order.
//! The base carries out
//! those that touch the mesh and the store (a change is committed before any
//! frame that follows it is sent); this composition does the rest: it
//! reconciles the runtime and devices when the core says so and hands the
//! core the status to report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use crdt_state::{DataDir, DocId, Role};
use daemon::driver::{Base, Input, MeshOptions};
use daemon::{Action, Settings};
use tokio::sync::mpsc;

use crate::runtime::Runtime;
use crate::runtime::native::Native;
use crate::site_api;
use crdt_state::fleet::model;
use crdt_state::fleet::placement::SiteApi;
use daemon::command::{self, Answer, Caller, Command, Refusal};

/// Node daemon settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// The data dir, listen addresses, peers, mDNS.
    pub mesh: MeshOptions,
    /// Serve the local site API here.
    pub site_api: Option<std::net::SocketAddr>,
    /// Over TLS, with a certificate for the node's own key (ADR 0014);
    /// plain HTTP when false.
    pub site_api_tls: bool,
    /// Where the node's share runs.
    pub runtime: RuntimeChoice,
    /// Most device readings kept in the store (oldest dropped beyond it).
    pub readings_cap: u64,
    /// Interval of the summaries of unacknowledged readings dropped at the
    /// cap (ms).
    pub summary_ms: u64,
}

/// How long a polled reading waits, at most, before it is stored in one
/// transaction with the others polled meanwhile: at most four commits a
/// second for readings, whatever the number of devices.
/// The site API's certificate in the data dir, for the node's apps to trust.
pub const SITE_API_CERT_FILE: &str = "site-api.pem";

const READINGS_FLUSH: Duration = Duration::from_millis(250);

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
    /// The site API's address as this node's apps reach it.
    site_api_url: Option<String>,
    /// The site API's certificate, as a file apps are pointed to and its
    /// PEM (kube apps get the text), when it serves HTTPS.
    site_api_ca: Option<(std::path::PathBuf, String)>,
    /// The site API's address as pods of the kube runtime reach it.
    site_api_pods: Option<String>,
    /// The node's shared token (`app-token`): device reads only; what
    /// apps were given before each had its own.
    app_token: Option<String>,
    /// The key of each app's own token (`app-key`).
    app_key: Option<String>,
    /// Device polling.
    devices: Option<crate::devices::Devices>,
    /// Device readings for the site API's live stream.
    live: tokio::sync::broadcast::Sender<String>,
    device_state: BTreeMap<String, DeviceState>,
    pending_readings: Vec<crdt_state::local::readings::Reading>,
    readings_cap: u64,
    summary_ms: u64,
    /// What the runtime was last given per app: an app whose artifacts
    /// are not all whole yet keeps running this.
    last_run: BTreeMap<String, crdt_state::fleet::placement::Workload>,
    /// The artifacts its apps name, by name: the blob and its size (what
    /// the report tells of).
    wanted: BTreeMap<String, (blobs::Hash, u64)>,
}

/// Runs the node until `shutdown` resolves.
pub async fn run(
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let data_dir = opts.mesh.data_dir.clone();
    let dd = DataDir::open(&data_dir, None)?;
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
        site_api_url: None,
        site_api_ca: None,
        site_api_pods: None,
        app_token: Some(secret_file(&data_dir, "app-token")?),
        app_key: Some(secret_file(&data_dir, "app-key")?),
        devices: Some(crate::devices::Devices::new(
            dev_tx,
            data_dir.join("opcua-pki"),
        )),
        live: tokio::sync::broadcast::channel(1024).0,
        device_state: BTreeMap::new(),
        pending_readings: Vec::new(),
        readings_cap: opts.readings_cap,
        summary_ms: opts.summary_ms,
        last_run: BTreeMap::new(),
        wanted: BTreeMap::new(),
    };
    if let Some(addr) = opts.site_api {
        let surface = site_api::Surface::new(
            n.base.core.me().cert.site.clone(),
            n.base.commands(),
            n.live.clone(),
            n.app_token.clone(),
            n.app_key.clone(),
        );
        let tls = if opts.site_api_tls {
            let creds = daemon::tls::Credentials::for_identity(&n.base.identity()?)?;
            let pem = creds.chain_pem();
            let path = opts.mesh.data_dir.join(SITE_API_CERT_FILE);
            std::fs::write(&path, &pem).with_context(|| format!("writing {}", path.display()))?;
            n.site_api_ca = Some((path, pem));
            Some(creds.server_config()?)
        } else {
            None
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let local = site_api::serve(addr, surface, tls).await?;
        crate::say!("site API on {scheme}://{local}");
        // What the node's own apps dial (a wildcard bind is reached on loopback).
        let mut reach = local;
        if reach.ip().is_unspecified() {
            reach.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        n.site_api_url = Some(format!("{scheme}://{reach}"));
        n.site_api_pods = Some(pods_url(scheme, local));
    }
    // The last desired state from the store, before any peer is heard.
    n.base.start();
    n.act();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Readings wait at most this long to be stored (and so to go up); the
    // timer runs only while some wait.
    let mut flush = tokio::time::interval(READINGS_FLUSH);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            input = n.base.recv() => match input {
                Input::Closed => break,
                // The control socket's and the site API's commands.
                Input::Command(c) => command::dispatch(&mut n, c),
                // A node serves no request protocol: nothing comes back.
                other => {
                    let _ = n.base.handle(other);
                }
            },
            Some(u) = dev_rx.recv() => n.on_device(u),
            _ = flush.tick(), if !n.pending_readings.is_empty() => n.flush_readings(),
            _ = tick.tick() => n.base.tick(),
            _ = &mut shutdown => break,
        }
        n.act();
        n.base.release_answers();
    }
    n.runtime.shutdown().await;
    if let Some(dev) = n.devices.as_mut() {
        dev.shutdown();
    }
    // Stored on the loop, before the process ends.
    let batch = std::mem::take(&mut n.pending_readings);
    if let Err(e) =
        n.base
            .dd
            .store()
            .append_readings_with(&batch, n.readings_cap, Some(n.summary_ms))
    {
        tracing::warn!(error = %e, readings = batch.len(), "readings not stored");
    }
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
                Action::RolledBack { app, reason } => tracing::warn!(
                    %app,
                    %reason,
                    "the new revision failed here: rolled back to the one before"
                ),
                _ => {}
            }
        }
    }

    /// Applies the node's share to the runtime and its devices, then reports.
    fn reconcile(&mut self) {
        let share = self.base.core.share();
        let desired = self.with_artifacts(share);
        self.run(desired);
    }

    /// The share as it may run now: every artifact an app names is fetched;
    /// an app whose artifacts are all whole gets their paths
    /// (`SHOAL_ARTIFACT_<NAME>`), one that waits for any keeps what it ran
    /// before (or does not start yet).
    fn with_artifacts(
        &mut self,
        share: Vec<crdt_state::fleet::placement::Workload>,
    ) -> Vec<crdt_state::fleet::placement::Workload> {
        let apps: std::collections::BTreeSet<String> =
            share.iter().map(|w| w.app.clone()).collect();
        self.last_run.retain(|app, _| apps.contains(app));
        self.wanted.clear();
        if share.iter().all(|w| w.spec.artifacts.is_empty()) {
            // No app names an artifact: no second read of the fleet. What
            // each runs is kept, for when its next version waits for one.
            for w in &share {
                self.last_run.insert(w.app.clone(), w.clone());
            }
            self.keep_fetching_wanted();
            return share;
        }
        let (fleet, _) = self.base.core.desired();
        let mut out = Vec::new();
        for mut w in share {
            let mut env = BTreeMap::new();
            let mut waiting = Vec::new();
            for (local, name) in &w.spec.artifacts {
                let blob = fleet
                    .artifacts
                    .get(name)
                    .and_then(|a| blobs::Hash::parse(&a.hash).ok().map(|h| (h, a.size)));
                let Some((hash, size)) = blob else {
                    waiting.push(format!("{name} (not declared)"));
                    continue;
                };
                self.base.blobs.want(hash, size);
                self.wanted.insert(name.clone(), (hash, size));
                let store = self.base.blobs.store();
                if store.has(&hash) {
                    env.insert(local.clone(), store.path(&hash).display().to_string());
                } else {
                    waiting.push(name.clone());
                }
            }
            if !waiting.is_empty() {
                tracing::info!(app = %w.app, waiting = ?waiting, "app waits for its artifacts");
                if let Some(prev) = self.last_run.get(&w.app) {
                    out.push(prev.clone());
                }
                continue;
            }
            if let Some(n) = w.spec.native.as_mut() {
                for (local, path) in &env {
                    n.env
                        .insert(crate::runtime::native::artifact_var(local), path.clone());
                }
            }
            // The kube runtime mounts them (hostPath), the native runtime
            // links them into the app's directory.
            w.artifacts = env;
            self.last_run.insert(w.app.clone(), w.clone());
            out.push(w);
        }
        self.keep_fetching_wanted();
        out
    }

    /// Fetches of blobs no app here names any more stop; the blobs the
    /// apps run with now (a previous version's, while the next waits) are
    /// pinned, so collection keeps them even if their Artifact is deleted.
    fn keep_fetching_wanted(&mut self) {
        let wanted = self.wanted.values().map(|(h, _)| *h).collect();
        self.base.blobs.keep_only(&wanted);
        let in_use = self
            .last_run
            .values()
            .flat_map(|w| w.artifacts.values())
            .filter_map(|path| {
                let name = std::path::Path::new(path).file_name()?.to_str()?;
                blobs::Hash::parse(name).ok()
            })
            .collect();
        self.base.blobs.pin(in_use);
    }

    fn run(&mut self, mut desired: Vec<crdt_state::fleet::placement::Workload>) {
        // The node's apps read their devices through the site API.
        for w in &mut desired {
            if let Some(n) = w.spec.native.as_mut() {
                if let Some(key) = &self.app_key {
                    // Its own token: device reads, and records of its own
                    // series (`POST /v1/data`).
                    n.env.insert(
                        "SHOAL_APP_TOKEN".into(),
                        site_api::app_token_for(key, &w.app),
                    );
                }
                if let Some(u) = &self.site_api_url {
                    n.env.insert("SHOAL_SITE_API".into(), u.clone());
                }
                if let Some((path, _)) = &self.site_api_ca {
                    n.env
                        .insert("SHOAL_SITE_API_CA".into(), path.display().to_string());
                }
            }
            if w.spec.kube.is_some()
                && let (Some(key), Some(url)) = (&self.app_key, &self.site_api_pods)
            {
                w.site_api = Some(SiteApi {
                    url: url.clone(),
                    token: site_api::app_token_for(key, &w.app),
                    ca_pem: self.site_api_ca.as_ref().map(|(_, pem)| pem.clone()),
                });
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
        let uplink = self.uplink_backlog();
        self.base.core.set_uplink(uplink);
        let workloads = self.runtime.status();
        let devices = self.device_reports();
        let artifacts = self.artifact_reports();
        let t = self.base.now();
        self.base.core.report(t, workloads, devices, artifacts);
    }

    /// The uplink's backlog, when the oldest record waiting is older than
    /// [`model::UPLINK_BACKLOG_AFTER_MS`] (a read of a few counters of the
    /// store).
    fn uplink_backlog(&self) -> Option<model::UplinkReport> {
        let st = self.base.dd.store().reading_stats().ok()?;
        let oldest = st.oldest_unacked_ms?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        (st.unacked > 0 && now.saturating_sub(oldest) >= model::UPLINK_BACKLOG_AFTER_MS).then_some(
            model::UplinkReport {
                records: st.unacked,
                oldest_ms: oldest,
                summarised: st.summarised,
            },
        )
    }

    /// The artifacts part of the node's report: how much of each is held,
    /// from whom it came, why it is not kept.
    fn artifact_reports(&self) -> BTreeMap<String, crdt_state::fleet::model::ArtifactReport> {
        self.wanted
            .iter()
            .map(|(name, (hash, size))| {
                let p = self.base.blobs.progress(hash, *size);
                let from = p
                    .from
                    .into_iter()
                    .map(|(peer, bytes)| {
                        let who = self
                            .base
                            .core
                            .name_of(&peer)
                            .unwrap_or_else(|| peer.to_string());
                        (who, bytes)
                    })
                    .fold(BTreeMap::new(), |mut m, (who, b)| {
                        *m.entry(who).or_insert(0) += b;
                        m
                    });
                (
                    name.clone(),
                    crdt_state::fleet::model::ArtifactReport {
                        hash: hash.to_string(),
                        held: p.held,
                        size: *size,
                        from,
                        error: p.error,
                    },
                )
            })
            .collect()
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
        let (cap, every) = (self.readings_cap, self.summary_ms);
        let wake = self.base.data.waker();
        // A redb commit: on a blocking thread, not on the loop; then the
        // uplink hears there is more to send.
        self.base.store_write(move |store| {
            match store.append_readings_with(&batch, cap, Some(every)) {
                Ok(0) => {}
                Ok(dropped) => tracing::debug!(dropped, "oldest readings dropped at the cap"),
                Err(e) => tracing::warn!(error = %e, readings = batch.len(), "readings not stored"),
            }
            wake.notify_one();
        });
    }

    /// The site API's `GET /api/view`: the node, its site, its desired
    /// workloads, its last report, its connected peers, its site's overrides.
    fn view(&self) -> serde_json::Value {
        let core = &self.base.core;
        let site = core.me().cert.site.clone();
        let peers: Vec<&String> = core
            .contacts()
            .iter()
            .filter(|(_, c)| c.connected)
            .map(|(n, _)| n)
            .collect();
        let overrides = site
            .as_ref()
            .and_then(|s| core.doc(&DocId::Site(s.clone())))
            .map(model::read_site);
        serde_json::json!({
            "node": core.me().cert.name,
            "site": site,
            "desired": core.preview_share(),
            "report": core.last_report(),
            "peers": peers,
            "site_overrides": overrides,
        })
    }

    /// The site API's device routes: `/api/devices` (latest values and
    /// state of every device), `/api/devices/<device>/<resource>/range/<from
    /// ms>/<to ms>` (stored readings, oldest first, at most 100,000).
    fn device_api(&mut self, path: &str) -> Result<Answer, Refusal> {
        let parts: Vec<&str> = path
            .trim_start_matches("/api/devices")
            .split('/')
            .filter(|p| !p.is_empty())
            .collect();
        match parts.as_slice() {
            // Authenticated: the site API's server streams from here on.
            ["stream"] => Ok(Answer::Json(serde_json::json!({ "stream": true }))),
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
                Ok(Answer::Blocking(Box::new(move |store| {
                    let stats = store.reading_stats().unwrap_or_default();
                    Ok(Answer::Json(
                        serde_json::json!({ "devices": devices, "readings": stats }),
                    ))
                })))
            }
            [dev, res, "range", from, to] => {
                let (Ok(from), Ok(to)) = (from.parse::<u64>(), to.parse::<u64>()) else {
                    return Err(Refusal::new(400, "range bounds are Unix milliseconds"));
                };
                let series = format!("{dev}/{res}");
                Ok(Answer::Blocking(Box::new(move |store| {
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
                            Ok(Answer::Json(
                                serde_json::json!({ "series": series, "readings": rows }),
                            ))
                        }
                        Err(e) => Err(Refusal::new(500, e.to_string())),
                    }
                })))
            }
            _ => Err(Refusal::new(404, format!("no GET {path}"))),
        }
    }
}

impl command::Host for Node {
    fn base(&mut self) -> &mut Base {
        &mut self.base
    }

    /// The site API's view, device routes and app records.
    fn local(&mut self, caller: &Caller, cmd: Command) -> Result<Answer, Refusal> {
        match cmd {
            Command::View => Ok(Answer::Json(self.view())),
            Command::Devices { path } => self.device_api(&path),
            Command::Data { records } => {
                let Caller::App(Some(app)) = caller else {
                    return Err(Refusal::new(
                        403,
                        "only an app posts data, with its own token",
                    ));
                };
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let readings = app_readings(app, records, now)?;
                let (cap, every) = (self.readings_cap, self.summary_ms);
                let wake = self.base.data.waker();
                // Answered once stored (then it goes up like a reading).
                Ok(Answer::Blocking(Box::new(move |store| {
                    store
                        .append_readings_with(&readings, cap, Some(every))
                        .map_err(|e| Refusal::new(503, format!("not stored: {e}")))?;
                    wake.notify_one();
                    Ok(Answer::Json(
                        serde_json::json!({ "stored": readings.len() }),
                    ))
                })))
            }
            other => Err(Refusal::new(
                404,
                format!("{} is not answered by a node", other.verb()),
            )),
        }
    }
}

/// Most records in one `POST /v1/data`.
pub const MAX_APP_RECORDS: usize = 1000;
/// Largest value of an app record, as JSON text.
pub const MAX_APP_VALUE: usize = 16 * 1024;
/// Longest series name an app gives (within `app/<app>/`).
pub const MAX_APP_SERIES: usize = 128;

/// An app's records as readings of its own series (`app/<app>/<series>`),
/// or why not, naming the record: a series outside `[a-z0-9._/-]`, a time
/// before 2000 or more than a day ahead of the node's clock, a value over
/// [`MAX_APP_VALUE`] (413), too many or no records. Nothing is stored when
/// any is refused.
fn app_readings(
    app: &str,
    records: Vec<command::AppRecord>,
    now_ms: u64,
) -> Result<Vec<crdt_state::local::readings::Reading>, Refusal> {
    if records.is_empty() {
        return Err(Refusal::new(400, "no records"));
    }
    if records.len() > MAX_APP_RECORDS {
        return Err(Refusal::new(
            413,
            format!(
                "{} records (at most {MAX_APP_RECORDS} a request)",
                records.len()
            ),
        ));
    }
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let bad = |status: u16, why: String| Refusal::new(status, format!("record {i}: {why}"));
            let ok_char =
                |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c);
            if r.series.is_empty()
                || r.series.len() > MAX_APP_SERIES
                || !r.series.chars().all(ok_char)
                || r.series.split('/').any(|p| p.is_empty() || p == "." || p == "..")
            {
                return Err(bad(
                    400,
                    format!(
                        "series {:?}: 1 to {MAX_APP_SERIES} characters of a-z, 0-9, '.', '_', '-', names (not . or ..) between '/'",
                        r.series
                    ),
                ));
            }
            let at = r.time.unwrap_or(now_ms);
            if at < 946_684_800_000 || at > now_ms + 86_400_000 {
                return Err(bad(
                    400,
                    format!("time {at}: milliseconds since the epoch, after 2000 and at most a day ahead of the node's clock"),
                ));
            }
            let value = serde_json::to_vec(&r.value)
                .map_err(|e| bad(400, format!("value: {e}")))?;
            if value.len() > MAX_APP_VALUE {
                return Err(bad(
                    413,
                    format!("a value of {} bytes (at most {MAX_APP_VALUE})", value.len()),
                ));
            }
            Ok(crdt_state::local::readings::Reading {
                series: format!("app/{app}/{}", r.series),
                at_ms: at,
                value,
            })
        })
        .collect()
}

/// The node's shared token for the site API's device routes (`app-token`,
/// what apps were given before each had its own), and the key each app's
/// own token is made with (`app-key`, never given to an app, so no app
/// can make another's): each made once (256 random bits, owner-only
/// file), kept across restarts so an app's spec, and so the app, do not
/// change when the node restarts.
/// The site API's URL as a pod dials it. A wildcard bind is reached at
/// the pod's host IP (`$(SHOAL_NODE_IP)`, which the kube runtime sets from
/// the downward API); a loopback bind only from pods on the host's network;
/// any other address as it is.
fn pods_url(scheme: &str, local: std::net::SocketAddr) -> String {
    let port = local.port();
    match local.ip() {
        ip if ip.is_unspecified() => format!("{scheme}://$(SHOAL_NODE_IP):{port}"),
        _ => format!("{scheme}://{local}"),
    }
}

fn secret_file(dir: &Path, name: &str) -> anyhow::Result<String> {
    let path = dir.join(name);
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
        let t = secret_file(dir.path(), "app-token")?;
        assert_eq!(t.len(), 64);
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        assert_eq!(std::fs::read_to_string(&path)?, t);
        assert!(!dir.path().join("app-token.tmp").exists());
        // Kept across restarts.
        assert_eq!(secret_file(dir.path(), "app-token")?, t);
        Ok(())
    }

    #[test]
    fn pods_reach_a_wildcard_site_api_at_their_host_ip() -> anyhow::Result<()> {
        assert_eq!(
            pods_url("https", "0.0.0.0:8700".parse()?),
            "https://$(SHOAL_NODE_IP):8700"
        );
        assert_eq!(
            pods_url("https", "[::]:8700".parse()?),
            "https://$(SHOAL_NODE_IP):8700"
        );
        assert_eq!(
            pods_url("http", "10.1.2.3:8700".parse()?),
            "http://10.1.2.3:8700"
        );
        assert_eq!(
            pods_url("https", "[fd00::1]:8700".parse()?),
            "https://[fd00::1]:8700"
        );
        Ok(())
    }
}
